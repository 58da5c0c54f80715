//! The faultline VMM's orchestration: it wires guest RAM, the VM, the pager, snapshots and the
//! control API together for the command line. Library crates below it do the work; this crate
//! decides policy.

pub mod api;
pub mod bench;
pub mod lazy;
pub mod linux;
pub mod micro;
pub mod restore;
pub mod size;

/// Sum (wrapping) of the first u64 of every page of `range` as the host sees guest memory:
/// what the `touch`, `checksum` and `dirty` guests report when memory is right.
pub fn host_checksum(ram: &vmm::GuestRam, range: vmm::boot::micro::WorkRange) -> u64 {
    (0..range.pages).fold(0u64, |sum, i| {
        let gpa = range.start + i * vmm::PAGE_SIZE;
        sum.wrapping_add(ram.read_u64(gpa).expect("the work range is guest RAM"))
    })
}
