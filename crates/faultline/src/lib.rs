//! The faultline VMM's orchestration: it wires guest RAM, the VM, the pager, snapshots and the
//! control API together for the command line. Library crates below it do the work; this crate
//! decides policy.

pub mod api;
pub mod bench;
pub mod duration;
pub mod lazy;
pub mod linux;
mod locking;
pub mod micro;
pub mod migration;
pub mod restore;
pub mod size;
mod unix_socket;

/// Sum (wrapping) of the first u64 of every page of `range` as the host sees guest memory:
/// what the `touch`, `checksum` and `dirty` guests report when memory is right. Guest RAM is
/// read with system calls, so a page that could not be provided is an error naming it.
pub fn host_checksum(
    ram: &vmm::GuestRam,
    range: vmm::boot::micro::WorkRange,
) -> anyhow::Result<u64> {
    (0..range.pages).try_fold(0u64, |sum, i| {
        let gpa = range.start + i * vmm::PAGE_SIZE;
        let word = ram.read_u64(gpa).ok_or_else(|| {
            anyhow::anyhow!("guest RAM at {gpa:#x} cannot be read (its page could not be provided)")
        })?;
        Ok(sum.wrapping_add(word))
    })
}
