//! The dirty log on a real KVM VM, through its one interface (`VmHandle::take_dirty_pages`),
//! over the bitmap and over the dirty ring: the pages a take reports are exactly those the
//! guest wrote since the take before.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use faultline::micro::{MicroOptions, MicroVm};
use vmm::boot::micro::WorkRange;
use vmm::{VmHandle, PAGE_SIZE};

const RING_ENTRIES: u32 = 4096;

fn options(guest: &str, pages: u64, arg: u64, ring: Option<u32>) -> MicroOptions {
    let mut options = common::options(guest);
    // The boot area (2 MiB), then the work range.
    options.mem = (4 << 20) + pages * PAGE_SIZE;
    options.arg = Some(arg);
    options.track_dirty = true;
    options.dirty_ring = ring;
    options.range = Some(WorkRange {
        start: vmm::boot::layout::BOOT_AREA_END,
        pages,
    });
    options
}

fn wait_held(handle: &VmHandle, point: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while handle.control().held().len() != usize::from(handle.vcpu_count()) {
        assert!(Instant::now() < deadline, "never held at {point}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The work-range pages (indices in the range) that a take reports.
fn range_pages_taken(handle: &VmHandle, range: WorkRange) -> BTreeSet<u64> {
    in_range(handle, range, &handle.take_dirty_pages().unwrap())
}

/// The work-range pages (indices in the range) among `pages`.
fn in_range(handle: &VmHandle, range: WorkRange, pages: &vmm::DirtyPages) -> BTreeSet<u64> {
    let first = handle.ram().page_index(range.start).unwrap();
    pages
        .iter()
        .filter(|&p| p >= first && p < first + range.pages)
        .map(|p| p - first)
        .collect()
}

/// Stride 3: the passes write different pages. Stride 1: the same pages twice, so the second
/// pass is reported only if the first take re-protected them.
fn exactly_the_written_pages(ring: Option<u32>) {
    for stride in [3, 1] {
        written_between_takes(ring, stride);
    }
}

fn written_between_takes(ring: Option<u32>, stride: u64) {
    const PAGES: u64 = 48;
    let mut vm = MicroVm::new(&options("stores", PAGES, stride, ring)).unwrap();
    let handle = vm.vm.handle();
    let range = vm.range;
    range_pages_taken(&handle, range); // loading the guest is not the guest's doing
    vm.vm.control().set_hold_at(Some(1));
    let runner = std::thread::spawn(move || vm.run().unwrap());
    let written = |pass| -> BTreeSet<u64> {
        (0..PAGES)
            .filter(|&i| guests::stores_writes_page(i, stride, pass))
            .collect()
    };
    wait_held(&handle, 1);
    assert_eq!(range_pages_taken(&handle, range), written(1), "pass 1");
    handle.control().set_hold_at(Some(2));
    wait_held(&handle, 2);
    assert_eq!(range_pages_taken(&handle, range), written(2), "pass 2");
    handle.control().set_hold_at(None);
    runner.join().unwrap().check().unwrap();
    assert_eq!(
        range_pages_taken(&handle, range),
        BTreeSet::new(),
        "the last part only reads"
    );
}

#[test]
fn the_bitmap_reports_exactly_the_pages_written_between_takes() {
    require_kvm!();
    exactly_the_written_pages(None);
}

#[test]
fn the_ring_reports_exactly_the_pages_written_between_takes() {
    require_kvm!();
    // Each emulated store takes an entry here (about 350 a pass): 512 entries hold one pass
    // but not two, so a ring that was not reset after a take overflows.
    exactly_the_written_pages(Some(512));
}

/// A fast dirtier (`touch`: every page once, a few instructions each) over `pages` pages with
/// a ring of `entries`: every page written is reported (the ring is harvested on ring-full
/// exits), or the run ends with an error naming the overflow; never a lost page, never a hang.
fn fast_dirtier(entries: Option<u32>, pages: u64, background: bool) -> Result<(), String> {
    let mut vm = MicroVm::new(&options("touch", pages, 7, entries)).unwrap();
    let handle = vm.vm.handle();
    handle.memory().set_background_harvest(background);
    range_pages_taken(&handle, vm.range);
    if let Err(e) = vm.run() {
        return Err(format!("{e:#}"));
    }
    let taken = range_pages_taken(&handle, vm.range);
    let written: BTreeSet<u64> = (0..pages).collect();
    assert!(
        taken.is_superset(&written),
        "{} written pages were not reported",
        written.difference(&taken).count()
    );
    Ok(())
}

#[test]
fn a_full_ring_never_loses_a_page() {
    require_kvm!();
    // 16 times the ring, harvested in the background (the default) or only on ring-full exits.
    // On an instruction-emulating host the vCPU fills a ring before it exits, so KVM overflows
    // it: faultline then reports every page, or stops the VM naming the overflow.
    for background in [true, false] {
        for entries in [RING_ENTRIES, 256] {
            if let Err(e) = fast_dirtier(Some(entries), u64::from(entries) * 16, background) {
                assert!(e.contains("dirty ring overflowed"), "{e}");
            }
        }
    }
    // A ring larger than what the guest dirties never fills.
    fast_dirtier(Some(16384), 8192, false).unwrap();
}

#[test]
fn the_bitmap_under_a_fast_dirtier_reports_every_page() {
    require_kvm!();
    fast_dirtier(None, 65536, true).unwrap();
}

#[test]
fn bad_ring_sizes_are_refused_with_the_range() {
    require_kvm!();
    for entries in [100, 128, 1 << 20] {
        let error = MicroVm::new(&options("touch", 4, 1, Some(entries)))
            .err()
            .expect("refused");
        let text = format!("{error:#}");
        assert!(
            text.contains(&format!("--dirty-ring {entries}")) && text.contains("power of two"),
            "{text}"
        );
    }
}

/// The work-range pages a peek reports.
fn range_pages_peeked(handle: &VmHandle, range: WorkRange) -> BTreeSet<u64> {
    let peeked = handle.memory().peek_dirty_pages().unwrap().unwrap();
    in_range(handle, range, &peeked)
}

/// A peek reports the pages written since the last peek; a take still reports every page
/// written since the last take, peeks or not.
fn peeks_see_recent_writes_and_takes_see_them_all(ring: Option<u32>) {
    const PAGES: u64 = 48;
    let stride = 3;
    let mut vm = MicroVm::new(&options("stores", PAGES, stride, ring)).unwrap();
    let handle = vm.vm.handle();
    let range = vm.range;
    range_pages_taken(&handle, range);
    range_pages_peeked(&handle, range);
    vm.vm.control().set_hold_at(Some(1));
    let runner = std::thread::spawn(move || vm.run().unwrap());
    let written = |pass| -> BTreeSet<u64> {
        (0..PAGES)
            .filter(|&i| guests::stores_writes_page(i, stride, pass))
            .collect()
    };
    wait_held(&handle, 1);
    assert_eq!(
        range_pages_peeked(&handle, range),
        written(1),
        "peek after pass 1"
    );
    assert_eq!(
        range_pages_peeked(&handle, range),
        BTreeSet::new(),
        "nothing since"
    );
    handle.control().set_hold_at(Some(2));
    wait_held(&handle, 2);
    assert_eq!(
        range_pages_peeked(&handle, range),
        written(2),
        "peek after pass 2"
    );
    let both: BTreeSet<u64> = written(1).union(&written(2)).copied().collect();
    assert_eq!(
        range_pages_taken(&handle, range),
        both,
        "the take sees both passes"
    );
    handle.control().set_hold_at(None);
    runner.join().unwrap().check().unwrap();
}

#[test]
fn peeks_over_the_bitmap_see_recent_writes_and_takes_see_them_all() {
    require_kvm!();
    peeks_see_recent_writes_and_takes_see_them_all(None);
}

#[test]
fn peeks_over_the_ring_see_recent_writes_and_takes_see_them_all() {
    require_kvm!();
    peeks_see_recent_writes_and_takes_see_them_all(Some(4096));
}
