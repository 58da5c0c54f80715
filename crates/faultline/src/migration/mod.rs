//! Live migration between two faultline processes over TCP (or mutually authenticated TLS),
//! on the `migrate` wire protocol: pre-copy (rounds from the dirty log, a throttle for a guest
//! that does not converge, a short pause), post-copy (the VM moves at once, its pages follow,
//! those it touches first on a connection of their own), hybrid (rounds, then post-copy), and
//! recovery when the network breaks. The source side is `send` and `postcopy_send`, the
//! destination `receive`, `postcopy_receive` and `incoming`. A failure before the destination
//! may run the VM leaves the source VM running as it was; after that the source VM stays
//! paused (it never runs in two places) until the migration is resumed, or cancelled by an
//! operator who knows the destination does not run it. The destination builds the VM through
//! the same path as a restore.

/// A connection's read buffer: small messages are gathered, a run of pages (up to 1 MiB) is
/// larger and is read into its own buffer straight, without a copy through this one.
const READ_BUFFER: usize = 64 << 10;

pub mod channel;
pub mod incoming;
pub mod pace;
mod postcopy_receive;
pub mod postcopy_send;
pub mod progress;
pub mod receive;
pub mod send;
pub(crate) mod turns;

use migrate::{Layout, VmIdentity};
use vmm::{DirtyPages, GuestRam, PAGE_SIZE};

/// Whether `error` is a connection lost: a broken pipe, a reset, or the peer closing it or
/// ending a message short. Narrower than `ProtocolError::is_connection_loss`, which takes any
/// I/O error on a connection for a break that recovery may mend (a timeout too): this one
/// names what happened. (An unexpected end of file is not in it: on this side that comes from
/// reading guest RAM's memfd, never from a connection, which the wire reads itself.)
pub(crate) fn is_lost_connection(error: &anyhow::Error) -> bool {
    use std::io::ErrorKind;
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            )
        }) || matches!(
            cause.downcast_ref::<migrate::ProtocolError>(),
            Some(migrate::ProtocolError::PeerClosed | migrate::ProtocolError::Truncated { .. })
        )
    })
}

/// `error`, said to be the connection to `peer` lost where [`is_lost_connection`], which the
/// OS's or the wire's words alone do not name.
pub(crate) fn naming_a_lost_connection(error: anyhow::Error, peer: &str) -> anyhow::Error {
    if is_lost_connection(&error) {
        error.context(format!(
            "the connection to {peer} was lost ({peer} ended or closed it, or the network failed)"
        ))
    } else {
        error
    }
}

/// The identity a VM with `ram` and `vcpus` vCPUs has on this host.
pub fn identity(ram: &GuestRam, vcpus: u8) -> anyhow::Result<VmIdentity> {
    let kvm = kvm_ioctls::Kvm::new()?;
    Ok(VmIdentity {
        vcpus,
        layout: layout_of(ram),
        cpuid_digest: vmm::cpuid::host_digest(&kvm)?,
    })
}

/// The runs `(gpa, pages)` of the pages of `pages` (by index, regions back to back), lowest
/// first, each within one region and at most `max` pages long: found a word of 64 pages at
/// a time, not page by page.
pub(crate) fn page_runs(ram: &GuestRam, pages: &DirtyPages, max: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut page = 0;
    while let Some(run) = run_from(ram, pages, page, max) {
        runs.push((run.gpa, run.count));
        page = run.first + run.count;
    }
    runs
}

/// A run of pages of RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRun {
    /// Its first page's index (regions back to back).
    pub first: u64,
    /// Its first page's guest physical address.
    pub gpa: u64,
    pub count: u64,
}

/// The first run of the pages of `pages` at or after the page of index `from`, within one
/// region and at most `max` pages long.
pub(crate) fn run_from(ram: &GuestRam, pages: &DirtyPages, from: u64, max: u64) -> Option<PageRun> {
    let first = pages.first_from(from)?;
    let gpa = ram.gpa_of_page(first)?;
    let (_, region) = ram.region_at(gpa, PAGE_SIZE)?;
    let region_end = first + (region.gpa() + region.size() - gpa) / PAGE_SIZE;
    let count = pages.run_length(first, region_end.min(first.saturating_add(max)));
    Some(PageRun { first, gpa, count })
}

/// A new migration's name: a random number, so that a resume reaches the migration it
/// continues and no other (`std`'s hasher keys are drawn from the system's randomness).
pub(crate) fn new_migration_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The RAM layout of `ram`, as the protocol says it.
pub fn layout_of(ram: &GuestRam) -> Layout {
    Layout::new(ram.regions().iter().map(|r| (r.gpa(), r.size())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_runs_end_at_regions_and_at_the_longest_run() {
        // Above 3 GiB guest RAM has two regions, around the 32-bit hole (nothing is touched).
        let ram = GuestRam::new(4 << 30).unwrap();
        assert_eq!(ram.regions().len(), 2);
        let total = ram.size() / PAGE_SIZE;
        let low = ram.regions()[0].size() / PAGE_SIZE;
        let high = ram.regions()[1].gpa();
        let mut pages = DirtyPages::new(total);
        pages.mark_range(3, 2);
        pages.mark_range(low - 2, 5); // across the two regions
        pages.mark(total - 1);
        assert_eq!(
            page_runs(&ram, &pages, u64::MAX),
            [
                (3 * PAGE_SIZE, 2),
                ((low - 2) * PAGE_SIZE, 2),
                (high, 3),
                (high + (total - 1 - low) * PAGE_SIZE, 1)
            ]
        );
        let mut ten = DirtyPages::new(total);
        ten.mark_range(0, 10);
        assert_eq!(
            page_runs(&ram, &ten, 4),
            [(0, 4), (4 * PAGE_SIZE, 4), (8 * PAGE_SIZE, 2)]
        );
        assert!(page_runs(&ram, &DirtyPages::new(total), 4).is_empty());
    }

    #[test]
    fn a_run_from_a_page_starts_there_and_ends_at_its_region() {
        let ram = GuestRam::new(4 << 30).unwrap();
        let total = ram.size() / PAGE_SIZE;
        let low = ram.regions()[0].size() / PAGE_SIZE;
        let high = ram.regions()[1].gpa();
        let mut pages = DirtyPages::new(total);
        pages.mark_range(3, 4);
        pages.mark_range(low - 2, 5);
        let run = |from, max| run_from(&ram, &pages, from, max);
        // From inside a run: the rest of it, at most `max`.
        let expect = |first: u64, gpa: u64, count| Some(PageRun { first, gpa, count });
        assert_eq!(run(4, 100), expect(4, 4 * PAGE_SIZE, 3));
        assert_eq!(run(4, 2), expect(4, 4 * PAGE_SIZE, 2));
        // From before one: the next, cut at its region's end; the rest from the next region.
        assert_eq!(run(7, 100), expect(low - 2, (low - 2) * PAGE_SIZE, 2));
        assert_eq!(run(low, 100), expect(low, high, 3));
        // Past the last page marked, and past RAM: none.
        assert_eq!(run(low + 3, 100), None);
        assert_eq!(run(total, 100), None);
    }
}
