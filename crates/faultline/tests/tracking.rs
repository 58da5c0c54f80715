//! Guest page tracking on a real KVM VM: the `stores` micro-guest writes known values with
//! stores of every width into tracked and untracked pages, and what the notifiers are told is
//! checked store by store against what the guest does.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultline::micro::{MicroOptions, MicroVm};
use guests::{stores_checksum, stores_pass, Store};
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::layout::BOOT_AREA_END;
use vmm::boot::micro::{split_range, WorkRange};
use vmm::tracking::TrackError;
use vmm::{TrackEvent, TrackMode, TrackNotifier, PAGE_SIZE};

/// Records every event it is told of.
#[derive(Default)]
struct Recorder(Mutex<Vec<TrackEvent>>);

impl TrackNotifier for Recorder {
    fn notify(&self, event: &TrackEvent) {
        self.0.lock().unwrap().push(*event);
    }
}

impl Recorder {
    fn events(&self) -> Vec<TrackEvent> {
        self.0.lock().unwrap().clone()
    }
}

/// The `stores` guest over `pages` pages from the start of the default work range.
fn stores_options(vcpus: u8, pages: u64, stride: u64) -> MicroOptions {
    let mut options = common::options("stores");
    options.mem = 8 << 20;
    options.vcpus = vcpus;
    options.arg = Some(stride);
    options.range = Some(WorkRange {
        start: vmm::boot::layout::BOOT_AREA_END,
        pages,
    });
    options
}

/// A VM for `options` with a recorder registered.
fn recorded(options: &MicroOptions) -> (MicroVm, Arc<Recorder>) {
    let vm = MicroVm::new(options).expect("VM builds");
    let recorder = Arc::new(Recorder::default());
    vm.vm.handle().memory().register(recorder.clone());
    (vm, recorder)
}

/// Each vCPU's stores, in its order: both passes over its slice of the range.
fn stores_by_vcpu(vm: &MicroVm, stride: u64) -> Vec<Vec<Store>> {
    split_range(vm.range, vm.vm.vcpus().len() as u64)
        .into_iter()
        .map(|slice| {
            let mut stores = stores_pass(slice.start, slice.pages, stride, 1);
            stores.extend(stores_pass(slice.start, slice.pages, stride, 2));
            stores
        })
        .collect()
}

/// The bytes of the work range.
fn range_bytes(vm: &MicroVm) -> Vec<u8> {
    let mut bytes = vec![0u8; (vm.range.pages * PAGE_SIZE) as usize];
    vm.vm
        .ram()
        .memory()
        .read_slice(&mut bytes, GuestAddress(vm.range.start))
        .unwrap();
    bytes
}

/// The work range after an untracked run of `options`.
fn untracked_result(options: &MicroOptions) -> Vec<u8> {
    let (vm, report) = common::run(options);
    report.check().unwrap();
    range_bytes(&vm)
}

fn page_of(gpa: u64) -> u64 {
    gpa & !(PAGE_SIZE - 1)
}

/// The write events of vCPU `vcpu`, as stores.
fn writes_of(events: &[TrackEvent], vcpu: u8) -> Vec<Store> {
    events
        .iter()
        .filter_map(|e| match e {
            TrackEvent::Write { vcpu: v, gpa, data } if *v == vcpu => Some(Store {
                gpa: *gpa,
                bytes: data.as_slice().to_vec(),
            }),
            _ => None,
        })
        .collect()
}

#[test]
fn tracked_writes_are_reported_once_with_their_bytes_in_order() {
    require_kvm!();
    let options = stores_options(2, 16, 1);
    let (mut vm, recorder) = recorded(&options);
    let memory = vm.vm.handle().memory().clone();
    let start = vm.range.start;
    // Pages 1-2 of vCPU 0's slice and page 3 of vCPU 1's (its slice starts at page 8).
    memory
        .track(start + PAGE_SIZE, 2 * PAGE_SIZE, TrackMode::Write)
        .unwrap();
    memory
        .track(start + 11 * PAGE_SIZE, PAGE_SIZE, TrackMode::Write)
        .unwrap();
    let tracked: BTreeSet<u64> = [1, 2, 11].map(|p| start + p * PAGE_SIZE).into();

    let report = vm.run().unwrap();
    report.check().unwrap();
    assert_eq!(
        report
            .vcpus
            .iter()
            .map(|v| v.reports[0])
            .fold(0u64, u64::wrapping_add),
        stores_checksum(start, 8, 1).wrapping_add(stores_checksum(start + 8 * PAGE_SIZE, 8, 1))
    );

    let events = recorder.events();
    for (vcpu, stores) in stores_by_vcpu(&vm, 1).into_iter().enumerate() {
        let expected: Vec<Store> = stores
            .into_iter()
            .filter(|s| tracked.contains(&page_of(s.gpa)))
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(writes_of(&events, vcpu as u8), expected, "vCPU {vcpu}");
    }
    assert!(
        events.iter().all(|e| matches!(e, TrackEvent::Write { .. })),
        "write mode reports no reads: {events:?}"
    );
    assert_eq!(range_bytes(&vm), untracked_result(&options));
}

#[test]
fn access_mode_reports_reads_and_the_guest_reads_the_right_values() {
    require_kvm!();
    let options = stores_options(1, 8, 2);
    let (mut vm, recorder) = recorded(&options);
    let memory = vm.vm.handle().memory().clone();
    let start = vm.range.start;
    // Page 2 is written by pass 1, page 3 by pass 2: both are read by the sum.
    memory
        .track(start + 2 * PAGE_SIZE, 2 * PAGE_SIZE, TrackMode::Access)
        .unwrap();
    let report = vm.run().unwrap();
    report.check().unwrap();
    assert_eq!(report.vcpus[0].reports, [stores_checksum(start, 8, 2)]);

    let events = recorder.events();
    let reads: Vec<(u64, u8)> = events
        .iter()
        .filter_map(|e| match *e {
            TrackEvent::Read { vcpu: 0, gpa, len } => Some((gpa, len)),
            _ => None,
        })
        .collect();
    assert_eq!(
        reads,
        [
            (start + 2 * PAGE_SIZE + 24, 8),
            (start + 3 * PAGE_SIZE + 24, 8)
        ],
        "the sum reads the qword at A + 24 of each page"
    );
    let expected: Vec<Store> = stores_by_vcpu(&vm, 2)
        .remove(0)
        .into_iter()
        .filter(|s| (2..4).contains(&((s.gpa - start) / PAGE_SIZE)))
        .collect();
    assert_eq!(writes_of(&events, 0), expected);
    assert_eq!(range_bytes(&vm), untracked_result(&options));
}

#[test]
fn a_frame_tracked_by_two_users_stays_tracked_until_both_remove_it() {
    require_kvm!();
    let options = stores_options(1, 4, 1);
    let (mut vm, recorder) = recorded(&options);
    let memory = vm.vm.handle().memory().clone();
    let frame = vm.range.start + PAGE_SIZE;
    let slots_untracked = memory.memslot_count();
    memory.track(frame, PAGE_SIZE, TrackMode::Write).unwrap();
    memory.track(frame, PAGE_SIZE, TrackMode::Write).unwrap();
    assert_eq!(memory.tracked()[0].count, 2);
    memory.untrack(frame, PAGE_SIZE, TrackMode::Write).unwrap();
    assert_eq!(memory.tracked()[0].count, 1, "one user left");
    vm.vm.control().set_hold_at(Some(1));
    let handle = vm.vm.handle();
    let runner = std::thread::spawn(move || {
        let report = vm.run().unwrap();
        (vm, report)
    });
    wait_held(&handle, 1);
    let pass1 = recorder.events().len();
    assert_eq!(pass1, 7, "still tracked: pass 1's stores into the frame");

    memory.untrack(frame, PAGE_SIZE, TrackMode::Write).unwrap();
    assert!(memory.tracked().is_empty());
    assert_eq!(
        memory.memslot_count(),
        slots_untracked,
        "untracked: the frame is back in a plain memslot, so its writes do not exit"
    );
    handle.control().set_hold_at(None);
    let (vm, report) = runner.join().unwrap();
    report.check().unwrap();
    assert_eq!(recorder.events().len(), pass1, "no events once untracked");
    assert!(matches!(
        memory.untrack(frame, PAGE_SIZE, TrackMode::Write),
        Err(TrackError::NotTracked { .. })
    ));
    assert_eq!(range_bytes(&vm), untracked_result(&options));
}

/// Waits until every vCPU of the VM is held at `point`.
fn wait_held(handle: &vmm::VmHandle, point: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while handle.control().held().len() != usize::from(handle.vcpu_count()) {
        assert_eq!(handle.control().hold_at(), Some(point));
        assert!(
            Instant::now() < deadline,
            "vCPUs never reached hold point {point}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn region_removed_is_reported_when_the_vm_goes() {
    require_kvm!();
    let options = stores_options(1, 8, 1);
    let (vm, recorder) = recorded(&options);
    let memory = vm.vm.handle().memory().clone();
    let start = vm.range.start;
    memory.track(start, PAGE_SIZE, TrackMode::Write).unwrap();
    memory
        .track(start + PAGE_SIZE, PAGE_SIZE, TrackMode::Access)
        .unwrap();
    memory
        .track(start + 4 * PAGE_SIZE, 2 * PAGE_SIZE, TrackMode::Write)
        .unwrap();
    drop(vm);
    assert_eq!(
        recorder.events(),
        [
            TrackEvent::RegionRemoved {
                gpa: start,
                len: 2 * PAGE_SIZE
            },
            TrackEvent::RegionRemoved {
                gpa: start + 4 * PAGE_SIZE,
                len: 2 * PAGE_SIZE
            },
        ]
    );
    assert!(memory.tracked().is_empty());
}

#[test]
fn bad_ranges_are_refused_and_change_nothing() {
    require_kvm!();
    let options = stores_options(1, 8, 1);
    let vm = MicroVm::new(&options).unwrap();
    let memory = vm.vm.handle().memory().clone();
    let start = vm.range.start;
    memory.track(start, PAGE_SIZE, TrackMode::Write).unwrap();
    let table = memory.tracked();
    let slots = memory.memslot_count();
    let ram_end = vm.vm.ram().end();
    let refusals = [
        (memory.track(start, 0, TrackMode::Write), "len 0"),
        (
            memory.track(start + 8, PAGE_SIZE, TrackMode::Write),
            "multiples of 4 KiB",
        ),
        (
            memory.track(start, 100, TrackMode::Write),
            "multiples of 4 KiB",
        ),
        (
            memory.track(ram_end, PAGE_SIZE, TrackMode::Write),
            "not guest RAM",
        ),
        (
            memory.track(ram_end - PAGE_SIZE, 2 * PAGE_SIZE, TrackMode::Write),
            "not guest RAM",
        ),
        (
            memory.untrack(start, 2 * PAGE_SIZE, TrackMode::Write),
            "not tracked in write mode",
        ),
        (
            memory.untrack(start, PAGE_SIZE, TrackMode::Access),
            "not tracked in access mode",
        ),
    ];
    for (result, says) in refusals {
        let error = result.expect_err(says).to_string();
        assert!(error.contains(says), "{error:?} should say {says:?}");
    }
    assert_eq!(memory.tracked(), table);
    assert_eq!(memory.memslot_count(), slots);
}

#[test]
fn tracking_survives_dirty_logging_switches_and_tracked_writes_are_dirty() {
    require_kvm!();
    let mut options = stores_options(1, 8, 1);
    options.track_dirty = true;
    let (mut vm, recorder) = recorded(&options);
    let handle = vm.vm.handle();
    let memory = handle.memory().clone();
    let start = vm.range.start;
    let first = handle.ram().page_index(start).unwrap();
    memory
        .track(start + 2 * PAGE_SIZE, 2 * PAGE_SIZE, TrackMode::Write)
        .unwrap();
    let table = memory.tracked();
    let slots = memory.memslot_count();
    handle.take_dirty_pages().unwrap();
    vm.vm.control().set_hold_at(Some(1));
    let runner = std::thread::spawn(move || vm.run().unwrap());
    wait_held(&handle, 1);
    let range_dirty = |dirty: vmm::DirtyPages| -> Vec<u64> {
        dirty
            .iter()
            .filter(|p| (first..first + 8).contains(p))
            .map(|p| p - first)
            .collect()
    };
    // Pass 1 wrote all 8 pages; 2 and 3 through faultline (tracked), which KVM never sees.
    assert_eq!(
        range_dirty(handle.take_dirty_pages().unwrap()),
        (0..8).collect::<Vec<_>>()
    );

    memory.set_dirty_logging(false).unwrap();
    assert!(matches!(
        handle.take_dirty_pages(),
        Err(vmm::VmError::DirtyTrackingOff)
    ));
    memory.set_dirty_logging(true).unwrap();
    assert_eq!(
        memory.tracked(),
        table,
        "tracking survives dirty logging off and on"
    );
    assert_eq!(memory.memslot_count(), slots);
    assert_eq!(
        handle.take_dirty_pages().unwrap().count(),
        handle.ram().size() / PAGE_SIZE,
        "writes while logging was off are unknown: every page is dirty"
    );

    let before = recorder.events().len();
    handle.control().set_hold_at(Some(2));
    wait_held(&handle, 2);
    assert_eq!(
        range_dirty(handle.take_dirty_pages().unwrap()),
        (0..8).collect::<Vec<_>>()
    );
    assert_eq!(
        recorder.events().len() - before,
        2 * 7,
        "pass 2's stores into the two tracked pages are reported"
    );
    handle.control().set_hold_at(None);
    runner.join().unwrap().check().unwrap();
}

#[test]
fn code_in_an_access_tracked_frame_stops_the_guest_with_an_error_naming_it() {
    require_kvm!();
    let options = stores_options(1, 8, 1);
    let mut vm = MicroVm::new(&options).unwrap();
    let memory = vm.vm.handle().memory().clone();
    memory
        .track(guests::CODE_BASE, PAGE_SIZE, TrackMode::Access)
        .unwrap();
    let error = format!("{:#}", vm.run().unwrap_err());
    assert!(
        error.contains(&format!(
            "executed code from {:#x}, a frame tracked in access mode",
            guests::CODE_BASE
        )),
        "{error}"
    );
}

#[test]
fn a_snapshot_carries_the_tracking_table_to_a_restore_that_asks_for_it() {
    require_kvm!();
    let tmp = common::TempDir::new("track-restore");
    let options = stores_options(1, 8, 1);
    let mut vm = MicroVm::new(&options).unwrap();
    let memory = vm.vm.handle().memory().clone();
    let frame = vm.range.start + 3 * PAGE_SIZE;
    memory.track(frame, PAGE_SIZE, TrackMode::Write).unwrap();
    memory.track(frame, PAGE_SIZE, TrackMode::Write).unwrap();
    let table = memory.tracked();
    let dir = tmp.join("snap");
    vm.write_snapshot(&dir).unwrap();
    drop(vm);

    let mut restore = faultline::restore::RestoreOptions::new(&dir, Default::default());
    let plain = faultline::restore::restore(&restore).unwrap();
    assert!(plain.vm.handle().memory().tracked().is_empty(), "not asked");
    drop(plain);
    restore.keep_tracking = true;
    let mut restored = faultline::restore::restore(&restore).unwrap();
    let memory = restored.vm.handle().memory().clone();
    assert_eq!(memory.tracked(), table, "with its two users");
    let recorder = Arc::new(Recorder::default());
    memory.register(recorder.clone());
    let run = restored.guest_run().unwrap();
    run.run(&mut restored.vm, restored.pager.as_ref())
        .unwrap()
        .check()
        .unwrap();
    let expected: Vec<Store> = (1..=2)
        .flat_map(|pass| stores_pass(BOOT_AREA_END, 8, 1, pass))
        .filter(|s| page_of(s.gpa) == frame)
        .collect();
    assert_eq!(writes_of(&recorder.events(), 0), expected);
}

/// Asks for a pause from another thread at the first event, and returns only once the pause
/// is requested: the vCPU then parks between the two pieces of a split access.
struct PauseAtFirstEvent {
    handle: vmm::VmHandle,
    events: Mutex<Vec<TrackEvent>>,
    pauser: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl TrackNotifier for PauseAtFirstEvent {
    fn notify(&self, event: &TrackEvent) {
        let mut events = self.events.lock().unwrap();
        events.push(*event);
        if events.len() == 1 {
            let handle = self.handle.clone();
            *self.pauser.lock().unwrap() = Some(std::thread::spawn(move || {
                handle.pause().unwrap();
            }));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.handle.control().pause_requested() {
                assert!(Instant::now() < deadline, "the pause was never requested");
                std::thread::yield_now();
            }
        }
    }
}

#[test]
fn a_pause_between_the_two_pieces_of_a_split_access_loses_neither() {
    require_kvm!();
    const VALUE: u64 = 0x1122_3344_5566_7788;
    let mut options = common::options("straddle");
    options.mem = 8 << 20;
    options.arg = Some(VALUE);
    options.range = Some(WorkRange {
        start: BOOT_AREA_END,
        pages: 2,
    });
    let mut vm = MicroVm::new(&options).unwrap();
    let handle = vm.vm.handle();
    let notifier = Arc::new(PauseAtFirstEvent {
        handle: handle.clone(),
        events: Mutex::default(),
        pauser: Mutex::default(),
    });
    handle.memory().register(notifier.clone());
    handle
        .memory()
        .track(BOOT_AREA_END, 2 * PAGE_SIZE, TrackMode::Write)
        .unwrap();
    let runner = std::thread::spawn(move || {
        let report = vm.run().unwrap();
        (vm, report)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while notifier.pauser.lock().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the guest never wrote");
        std::thread::sleep(Duration::from_millis(1));
    }
    let pauser = notifier.pauser.lock().unwrap().take().unwrap();
    pauser.join().unwrap();
    handle.resume().unwrap();
    let (vm, report) = runner.join().unwrap();
    report.check().unwrap();
    assert_eq!(
        report.vcpus[0].reports,
        [VALUE],
        "the guest reads back what it wrote"
    );
    let at = BOOT_AREA_END + PAGE_SIZE - 4;
    assert_eq!(vm.vm.ram().read_u64(at), Some(VALUE));
    let bytes = VALUE.to_le_bytes();
    let writes = writes_of(&notifier.events.lock().unwrap(), 0);
    assert_eq!(
        writes,
        [
            Store {
                gpa: at,
                bytes: bytes[..4].to_vec()
            },
            Store {
                gpa: at + 4,
                bytes: bytes[4..].to_vec()
            },
        ]
    );
}

#[test]
fn tracking_changes_while_the_guest_runs_never_leave_it_without_memory() {
    require_kvm!();
    // `dirty` rewrites its pages forever; every change replaces the memslot its code and page
    // tables live in, as the vCPU runs.
    let mut options = stores_options(1, 16, 0);
    options.guest = guests::find("dirty").unwrap();
    let (mut vm, recorder) = recorded(&options);
    let handle = vm.vm.handle();
    let start = vm.range.start;
    let runner = std::thread::spawn(move || vm.run());
    let deadline = Instant::now() + Duration::from_secs(30);
    while handle.control().started_at().is_none() {
        assert!(Instant::now() < deadline, "the guest never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    for round in 0..20 {
        let gpa = start + (round % 16) * PAGE_SIZE;
        handle
            .memory()
            .track(gpa, PAGE_SIZE, TrackMode::Write)
            .unwrap();
        handle
            .memory()
            .untrack(gpa, PAGE_SIZE, TrackMode::Write)
            .unwrap();
    }
    handle
        .control()
        .request_stop(vmm::control::StopReason::Requested);
    let result = runner.join().unwrap();
    assert!(result.is_ok(), "{:#}", result.unwrap_err());
    assert!(recorder
        .events()
        .iter()
        .all(|e| matches!(e, TrackEvent::Write { .. })));
}
