//! The Intel MultiProcessor Specification (1.4) table, which tells a Linux guest without ACPI
//! how many CPUs it has and how ISA interrupts reach the IOAPIC.
//!
//! Layout: the 16-byte floating pointer ("_MP_"), then the configuration table ("PCMP"): a
//! header, one processor entry per vCPU, the ISA bus, the IOAPIC, an I/O interrupt entry per
//! IOAPIC pin and the two local interrupt entries (ExtINT on LINT0, NMI on LINT1).

/// Where the local APIC is (every vCPU sees its own here).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Where KVM's in-kernel IOAPIC is.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Pins on KVM's IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REVISION: u8 = 4;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;

/// Sum of bytes that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// The IOAPIC's id: one past the last CPU.
fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// Builds the whole structure (floating pointer first) for a table placed at `addr`.
pub fn build(addr: u32, cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // feature flags: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id(cpus), IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // type, interrupt type, flags (u16: conforming), source bus, source IRQ, APIC, pin
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id(cpus),
            pin,
        ]);
    }
    // Local interrupts go to every local APIC (0xff).
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);

    let entry_count = u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2;
    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, below
    table.extend_from_slice(b"FAULTLN ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(addr + 16).to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_is_valid() {
        let mp = build(0x9fc00, 2);
        assert_eq!(&mp[..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(mp[4..8].try_into().unwrap()), 0x9fc10);
        assert_eq!(mp[8], 1, "length in 16-byte units");
        assert_eq!(sum(&mp[..16]), 0);
    }

    #[test]
    fn configuration_table_is_valid() {
        let cpus = 4;
        let mp = build(0x9fc00, cpus);
        let table = &mp[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, u16::from(cpus) + 2 + 24 + 2);
        // Processor entries first, the boot processor flagged.
        assert_eq!(&table[44..48], &[ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        assert_eq!(&table[64..68], &[ENTRY_PROCESSOR, 1, APIC_VERSION, 1]);
        // Fits in the last KiB of base memory.
        assert!(mp.len() <= 1024);
    }

    #[test]
    fn largest_table_fits_below_640k() {
        assert!(build(0x9fc00, 32).len() <= 1024);
    }
}
