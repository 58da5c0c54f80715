//! Loading a micro-guest: its code at `CODE_BASE`, page tables over all of RAM, a stack and a
//! slice of the work range for every vCPU.

use guests::{MicroGuest, CODE_BASE};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_AREA_END, MICRO_MAX_PDS, MICRO_MAX_VCPUS, MICRO_STACK_SIZE, MICRO_STACK_TOP,
};
use super::long_mode::{write_gdt, write_identity_map};
use super::{BootError, VcpuEntry};
use crate::memory::{GuestRam, PAGE_SIZE};

/// Where a micro-guest works and with what argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkRange {
    /// First guest-physical address (page aligned).
    pub start: u64,
    /// Number of 4 KiB pages.
    pub pages: u64,
}

/// The default work range: from the end of the boot area to the end of low RAM. (High RAM,
/// above the MMIO gap, is left out so that the range is one contiguous run.)
pub fn default_work_range(ram: &GuestRam) -> WorkRange {
    let end = ram.low_size();
    WorkRange {
        start: BOOT_AREA_END,
        pages: end.saturating_sub(BOOT_AREA_END) / PAGE_SIZE,
    }
}

/// Splits `range` into `parts` nearly equal contiguous slices, in order.
pub fn split_range(range: WorkRange, parts: u64) -> Vec<WorkRange> {
    let base = range.pages / parts;
    let extra = range.pages % parts;
    let mut start = range.start;
    (0..parts)
        .map(|i| {
            let pages = base + u64::from(i < extra);
            let slice = WorkRange { start, pages };
            start += pages * PAGE_SIZE;
            slice
        })
        .collect()
}

/// Writes the micro-guest and its boot structures; returns each vCPU's entry. vCPU `i` works on
/// the `i`-th slice of `range`.
pub fn load(
    ram: &GuestRam,
    guest: &MicroGuest,
    range: WorkRange,
    arg: u64,
    vcpus: u8,
) -> Result<Vec<VcpuEntry>, BootError> {
    if u64::from(vcpus) > MICRO_MAX_VCPUS {
        return Err(BootError::TooManyVcpus(vcpus, MICRO_MAX_VCPUS));
    }
    let needed = if guest.uses_work_range {
        BOOT_AREA_END + PAGE_SIZE
    } else {
        BOOT_AREA_END
    };
    if ram.size() < needed {
        return Err(BootError::TooSmall {
            what: format!("micro-guest {:?}", guest.name),
            needed,
            available: ram.size(),
        });
    }
    let gib = ram.end().div_ceil(1 << 30);
    if gib > MICRO_MAX_PDS {
        return Err(BootError::TooSmall {
            what: "micro-guest page tables (guest RAM end)".into(),
            needed: ram.end(),
            available: MICRO_MAX_PDS << 30,
        });
    }
    let mem = ram.memory();
    write_gdt(mem)?;
    write_identity_map(mem, gib)?;
    mem.write_slice(guest.code, GuestAddress(CODE_BASE))
        .map_err(|e| BootError::Write("micro-guest code", e))?;

    Ok(split_range(range, u64::from(vcpus))
        .into_iter()
        .enumerate()
        .map(|(i, slice)| VcpuEntry::LongMode {
            rip: CODE_BASE,
            rsp: MICRO_STACK_TOP - i as u64 * MICRO_STACK_SIZE,
            rdi: slice.start,
            rsi: slice.pages,
            rdx: arg,
            rcx: i as u64,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_range_in_order() {
        let range = WorkRange {
            start: 0x20_0000,
            pages: 10,
        };
        let parts = split_range(range, 3);
        assert_eq!(
            parts.iter().map(|p| p.pages).collect::<Vec<_>>(),
            vec![4, 3, 3]
        );
        assert_eq!(parts[1].start, 0x20_0000 + 4 * 4096);
        assert_eq!(parts[2].start, 0x20_0000 + 7 * 4096);
    }

    #[test]
    fn load_places_code_and_entries() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let guest = guests::find("touch").unwrap();
        let range = default_work_range(&ram);
        assert_eq!(
            range,
            WorkRange {
                start: 0x20_0000,
                pages: (6 << 20) / 4096
            }
        );
        let entries = load(&ram, guest, range, 5, 2).unwrap();
        assert_eq!(entries.len(), 2);
        let mut code = vec![0u8; guest.code.len()];
        ram.memory()
            .read_slice(&mut code, GuestAddress(CODE_BASE))
            .unwrap();
        assert_eq!(code, guest.code);
        match entries[1] {
            VcpuEntry::LongMode {
                rip, rsp, rdx, rcx, ..
            } => {
                assert_eq!((rip, rdx, rcx), (CODE_BASE, 5, 1));
                assert_eq!(rsp, MICRO_STACK_TOP - MICRO_STACK_SIZE);
            }
            other => panic!("unexpected entry {other:?}"),
        }
    }

    #[test]
    fn too_small_for_a_work_range() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let err = load(
            &ram,
            guests::find("touch").unwrap(),
            default_work_range(&ram),
            0,
            1,
        );
        assert!(matches!(err, Err(BootError::TooSmall { .. })));
        assert!(load(
            &ram,
            guests::find("hello").unwrap(),
            default_work_range(&ram),
            0,
            1
        )
        .is_ok());
    }
}
