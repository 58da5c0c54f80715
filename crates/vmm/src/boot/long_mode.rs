//! The CPU state shared by every 64-bit entry: a flat GDT, identity page tables, and the
//! control registers that turn long mode on.

use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use super::BootError;

/// GDT selectors (index * 8).
pub const CODE32_SELECTOR: u16 = 0x08;
pub const CODE64_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

/// GDT entries: null, 32-bit code, 64-bit code, data, TSS. Flat 4 GiB segments.
pub const GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Builds a segment descriptor from its flags (access byte in bits 0..8, flags in 12..16).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a descriptor into the form KVM wants.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|e| BootError::Write("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|e| BootError::Write("IDT", e))?;
    Ok(())
}

/// Identity-maps `[0, gib GiB)` with 2 MiB pages.
pub fn write_identity_map(mem: &GuestMemoryMmap, gib: u64) -> Result<(), BootError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|e| BootError::Write("page tables", e))
    };
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write(PDPT_ADDR | PRESENT_WRITABLE, PML4_ADDR)?;
    for gb in 0..gib {
        let pd = PD_ADDR + gb * 0x1000;
        write(pd | PRESENT_WRITABLE, PDPT_ADDR + gb * 8)?;
        for i in 0..512u64 {
            write(
                ((gb << 30) + (i << 21)) | PRESENT_WRITABLE | HUGE,
                pd + i * 8,
            )?;
        }
    }
    Ok(())
}

/// Control and segment registers for 64-bit long mode with the tables above.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    flat_segments(sregs, CODE64_SELECTOR);
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Control and segment registers for 32-bit protected mode without paging (PVH entry).
pub fn protected_mode_sregs(sregs: &mut kvm_sregs) {
    flat_segments(sregs, CODE32_SELECTOR);
    sregs.cr0 = 1 | (1 << 4); // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
}

fn flat_segments(sregs: &mut kvm_sregs, code_selector: u16) {
    let code = kvm_segment_from_gdt(GDT[usize::from(code_selector / 8)], code_selector);
    let data = kvm_segment_from_gdt(GDT[usize::from(DATA_SELECTOR / 8)], DATA_SELECTOR);
    let tss = kvm_segment_from_gdt(GDT[usize::from(TSS_SELECTOR / 8)], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_as_intended() {
        let code64 = kvm_segment_from_gdt(GDT[2], CODE64_SELECTOR);
        assert_eq!(
            (code64.l, code64.db, code64.present, code64.type_),
            (1, 0, 1, 0xb)
        );
        assert_eq!(code64.limit, 0xffff_ffff);
        let code32 = kvm_segment_from_gdt(GDT[1], CODE32_SELECTOR);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = kvm_segment_from_gdt(GDT[3], DATA_SELECTOR);
        assert_eq!((data.type_, data.s, data.base), (0x3, 1, 0));
        let tss = kvm_segment_from_gdt(GDT[4], TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn known_descriptor_values() {
        assert_eq!(GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[3], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn identity_map_entries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_map(&mem, 2).unwrap();
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(read(PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(read(PDPT_ADDR + 8), (PD_ADDR + 0x1000) | 3);
        // Second GiB, third 2 MiB page.
        assert_eq!(
            read(PD_ADDR + 0x1000 + 2 * 8),
            ((1 << 30) + (2 << 21)) | 0x83
        );
    }
}
