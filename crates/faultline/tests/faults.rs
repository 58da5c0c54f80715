//! Faults injected into a running VM, in process: a vCPU thread that panics, a pager whose
//! userfaultfd fails, and a pause that lands right as a 4-vCPU VM starts. Each must end the
//! run with an error that names the cause (or pause the whole VM), never hang. (A memory
//! error reported to a vCPU thread is tested in `vmm::sigbus`.)

mod common;

use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use faultline::lazy::LazySpec;
use faultline::micro::MicroVm;
use vmm::boot::micro;
use vmm::devices::ConsoleSink;
use vmm::vm::VcpuThreadHook;
use vmm::{GuestRam, Vm, VmConfig};

/// How long a run may take before the test calls it hung (runs here take well under a second).
const HANG: Duration = Duration::from_secs(60);

/// A VM running `mix` forever on `vcpus` vCPUs over 8 MiB, with `hook` on each vCPU thread.
fn forever_vm(vcpus: u8, hook: Option<VcpuThreadHook>) -> Vm {
    let ram = GuestRam::new(8 << 20).unwrap();
    let config = VmConfig {
        vcpus,
        console: ConsoleSink::default(),
        on_vcpu_thread: hook,
        ..VmConfig::default()
    };
    let vm = Vm::new(&config, ram).unwrap();
    let guest = guests::find("mix").unwrap();
    let range = micro::default_work_range(vm.ram());
    let entries = micro::load(vm.ram(), guest, range, 0, vcpus).unwrap();
    vm.set_entries(&entries).unwrap();
    vm
}

/// Writes a full snapshot of a paused (or not running) VM's `machine` state and RAM.
fn write_full_snapshot(dir: &std::path::Path, machine: vmm::MachineState, ram: &GuestRam) {
    snapshot::create::write(
        dir,
        machine,
        ram,
        None,
        snapshot::create::Watch::default(),
        snapshot::create::MemoryBacking::Resident,
        None,
    )
    .unwrap();
}

/// Runs `vm` on a thread and waits for its result, failing the test instead of hanging.
fn run_bounded(vm: Vm) -> Result<vmm::RunOutcome, vmm::VmError> {
    start_run(vm).recv_timeout(HANG).expect("the run ended")
}

/// Runs `vm` on a thread; its result arrives on the returned channel.
fn start_run(mut vm: Vm) -> mpsc::Receiver<Result<vmm::RunOutcome, vmm::VmError>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vm.run());
    });
    rx
}

/// The whole cause chain of an error, on one line.
fn chain(error: vmm::VmError) -> String {
    format!("{:#}", anyhow::Error::new(error))
}

#[test]
fn a_vcpu_thread_that_panics_ends_the_run_with_an_error_naming_it() {
    require_kvm!();
    // vCPU 1's thread panics as it starts; vCPU 0 runs forever unless it is stopped.
    let hook = VcpuThreadHook(Arc::new(|index, _| {
        if index == 1 {
            panic!("injected vCPU panic");
        }
    }));
    let error = run_bounded(forever_vm(2, Some(hook))).expect_err("the run fails");
    let message = chain(error);
    assert!(
        message.contains("vCPU 1") && message.contains("injected vCPU panic"),
        "{message}"
    );
}

#[test]
fn a_pager_whose_userfaultfd_fails_stops_the_vm_with_that_error() {
    require_kvm!();
    let mut options = common::options("touch");
    options.mem = 16 << 20;
    options.lazy = Some(LazySpec::Zero);
    let mut vm = MicroVm::new(&options).unwrap();
    let pager = vm.pager.as_ref().unwrap();
    // A directory where the userfaultfd was: the fault thread's next read fails (EISDIR).
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    // SAFETY: replaces the pager's descriptor number with another open file (fault
    // injection); the pager only uses it through system calls.
    let ret = unsafe { libc::dup2(dir.as_raw_fd(), pager.userfaultfd_raw_fd()) };
    assert!(ret >= 0, "{}", std::io::Error::last_os_error());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = vm.run().map(|_| ());
        let _ = tx.send(result.map_err(|e| format!("{e:#}")));
    });
    let message = rx
        .recv_timeout(HANG)
        .expect("the run ended")
        .expect_err("a run whose memory could not be served fails");
    assert!(message.contains("cannot read its userfaultfd"), "{message}");
}

#[test]
fn a_pause_right_after_start_holds_every_vcpu() {
    require_kvm!();
    let vm = forever_vm(4, None);
    let handle = vm.handle();
    let rx = start_run(vm);
    // Pause as soon as the run has begun, before its vCPU threads have all started.
    let deadline = std::time::Instant::now() + HANG;
    let states = loop {
        match handle.pause() {
            Ok(states) => break states,
            Err(vmm::VmError::Pause(vmm::control::PauseError::NotRunning)) => {
                assert!(std::time::Instant::now() < deadline, "the VM never ran");
                std::thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(states.len(), 4, "every vCPU parked");
    let indices: Vec<u8> = states.iter().map(|s| s.index).collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    let machine = handle.paused_state().unwrap();
    assert_eq!(machine.vcpus.len(), 4);
    // A snapshot written from it holds the four vCPUs.
    let tmp = common::TempDir::new("pause-start");
    let dir = tmp.join("snap");
    write_full_snapshot(&dir, machine, handle.ram());
    assert_eq!(snapshot::state::read(&dir).unwrap().machine.vcpus.len(), 4);
    handle
        .control()
        .request_stop(vmm::control::StopReason::Requested);
    handle.resume().unwrap();
    rx.recv_timeout(HANG).expect("the run ended").unwrap();
}

#[test]
fn a_vcpu_that_had_finished_when_snapshotted_stays_finished_after_restore() {
    require_kvm!();
    const PASSES: u64 = 30;
    let vm = {
        let ram = GuestRam::new(8 << 20).unwrap();
        let config = VmConfig {
            vcpus: 2,
            console: ConsoleSink::default(),
            ..VmConfig::default()
        };
        let vm = Vm::new(&config, ram).unwrap();
        let guest = guests::find("mix").unwrap();
        let range = micro::default_work_range(vm.ram());
        let mut entries = micro::load(vm.ram(), guest, range, PASSES, 2).unwrap();
        // vCPU 1 makes one pass over no pages and exits at once; vCPU 0 works on.
        if let vmm::boot::VcpuEntry::LongMode { rsi, rdx, .. } = &mut entries[1] {
            *rsi = 0;
            *rdx = 1;
        }
        vm.set_entries(&entries).unwrap();
        vm
    };
    let handle = vm.handle();
    handle.control().set_hold_at(Some(10));
    let rx = start_run(vm);
    // Paused with vCPU 0 held at the end of pass 10 and vCPU 1 finished.
    let deadline = std::time::Instant::now() + HANG;
    let machine = loop {
        assert!(std::time::Instant::now() < deadline, "never paused so");
        if handle.control().held() != [0] {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let states = handle.pause().unwrap();
        if states[1].finished.is_some() {
            break handle.paused_state().unwrap();
        }
        handle.resume().unwrap();
    };
    assert_eq!(machine.vcpus[0].regs.r13, 10);
    let tmp = common::TempDir::new("finished");
    let dir = tmp.join("snap");
    write_full_snapshot(&dir, machine, handle.ram());
    handle
        .control()
        .request_stop(vmm::control::StopReason::Requested);
    handle.resume().unwrap();
    rx.recv_timeout(HANG).expect("the run ended").unwrap();

    // Restored, vCPU 0 finishes its passes; vCPU 1 is not run again (it would halt with
    // interrupts off, and the run would never end), and its outcome stands.
    let restored = faultline::restore::restore(&faultline::restore::RestoreOptions::new(
        &dir,
        faultline::restore::RestoreMode::Eager,
    ))
    .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut restored = restored;
        let _ = tx.send(restored.vm.run().map(|outcome| outcome.vcpus));
    });
    let vcpus = rx
        .recv_timeout(HANG)
        .expect("the restored run ended")
        .unwrap();
    assert_eq!(vcpus.len(), 2);
    assert_eq!(vcpus[0].stop, vmm::vcpu::VcpuStop::Exited(0));
    assert_eq!(vcpus[0].reports[0], PASSES);
    assert_eq!(vcpus[1].stop, vmm::vcpu::VcpuStop::Exited(0));
    assert_eq!(
        vcpus[1].reports,
        [1, 0],
        "vCPU 1's reports from before the snapshot"
    );
}

/// A page source that has no page to give.
struct NoPages;

impl pager::PageSource for NoPages {
    fn describe(&self) -> String {
        "no pages".into()
    }
    fn fetch(&self, offset: u64, _buf: &mut [u8]) -> Result<pager::Content, pager::SourceError> {
        Err(pager::SourceError::Unavailable {
            offset,
            reason: "gone for the test".into(),
        })
    }
}

#[test]
fn a_snapshot_is_not_published_once_the_pager_serving_memory_has_failed() {
    require_kvm!();
    // The pager fails on a page the snapshot never reads (its background install of a page
    // its source cannot give): every read of the snapshot succeeds, and still it must not be
    // published, since guest memory cannot be trusted after a pager failure.
    let ram = GuestRam::new(2 << 20).unwrap();
    let config = pager::PagerConfig {
        failure_policy: pager::FailurePolicy::Stop,
        ..Default::default()
    };
    let mut builder = pager::PagerBuilder::new(config).unwrap();
    let region = &ram.regions()[0];
    // SAFETY: the test's own guest RAM, mapped until `ram` drops after the pager; no Rust
    // reference points into it.
    unsafe { builder.region(region.host_addr() as u64, region.size(), Arc::new(NoPages)) }.unwrap();
    let failed_pager = builder.start().unwrap();
    let failed = failed_pager.handle();
    failed.prefetch(0, 0, 1).unwrap();
    let deadline = std::time::Instant::now() + HANG;
    while failed.fatal_error().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the pager never failed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    let vm = forever_vm(1, None);
    let handle = vm.handle();
    let rx = start_run(vm);
    let tmp = common::TempDir::new("snapshot-pager-failed");
    let dir = tmp.join("snap");
    let options = snapshot::create::CreateOptions {
        dir: dir.clone(),
        diff_parent: None,
        guest: None,
        backing: snapshot::create::MemoryBacking::Resident,
        pager: Some(failed.clone()),
    };
    let deadline = std::time::Instant::now() + HANG;
    let taken = loop {
        match snapshot::create::create(&handle, &options) {
            Err(snapshot::SnapshotError::Vm(vmm::VmError::Pause(
                vmm::control::PauseError::NotRunning,
            ))) => {
                assert!(std::time::Instant::now() < deadline, "the VM never ran");
                std::thread::yield_now();
            }
            taken => break taken,
        }
    };
    let error = taken.expect_err("a snapshot over a failed pager is refused");
    let message = format!("{:#}", anyhow::Error::new(error));
    assert!(message.contains("cannot be trusted"), "{message}");
    assert!(message.contains("gone for the test"), "{message}");
    assert!(!dir.exists(), "the snapshot was published");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "its staging was left: {left:?}");
    // The VM it paused runs again.
    assert!(!handle.control().is_paused());
    // Nor is one written from a paused VM's state (the benchmarks' way).
    handle.pause().unwrap();
    let written = tmp.join("written");
    let refused = snapshot::create::write(
        &written,
        handle.paused_state().unwrap(),
        handle.ram(),
        None,
        snapshot::create::Watch::default(),
        snapshot::create::MemoryBacking::Resident,
        Some(failed.clone()),
    );
    assert!(
        matches!(refused, Err(snapshot::SnapshotError::PagerFailed(_))),
        "{refused:?}"
    );
    assert!(!written.exists(), "the snapshot was published");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "its staging was left: {left:?}");
    handle.resume().unwrap();
    handle
        .control()
        .request_stop(vmm::control::StopReason::Requested);
    rx.recv_timeout(HANG).expect("the run ended").unwrap();
    failed_pager.shutdown();
}
