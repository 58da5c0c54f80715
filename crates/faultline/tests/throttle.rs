//! CPU throttling (pre-copy's auto-converge) on real vCPUs: under a throttle a running vCPU
//! sleeps its share of every slice; a pause still parks it; once the throttle is lifted, a
//! kick no longer makes it sleep.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmm::boot::micro;
use vmm::devices::ConsoleSink;
use vmm::throttle::Throttle;
use vmm::{GuestRam, Vm, VmConfig};

const HANG: Duration = Duration::from_secs(60);

#[test]
fn a_throttled_vcpu_sleeps_and_a_lifted_throttle_lets_it_run() {
    require_kvm!();
    let ram = GuestRam::new(8 << 20).unwrap();
    let config = VmConfig {
        vcpus: 2,
        console: ConsoleSink::default(),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(&config, ram).unwrap();
    let guest = guests::find("mix").unwrap();
    let range = micro::default_work_range(vm.ram());
    // `mix` with 0 passes runs until stopped.
    let entries = micro::load(vm.ram(), guest, range, 0, 2).unwrap();
    vm.set_entries(&entries).unwrap();
    let handle = vm.handle();
    let control = std::sync::Arc::clone(handle.control());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vm.run());
    });
    let deadline = Instant::now() + HANG;
    while !control.is_running() {
        assert!(Instant::now() < deadline, "the VM never ran");
        std::thread::yield_now();
    }

    // Unthrottled, kicks (a pause's) never make a vCPU sleep.
    handle.pause().unwrap();
    handle.resume().unwrap();
    assert_eq!(control.throttle_sleeps(), 0);

    let throttle = Throttle::start(std::sync::Arc::clone(&control), 95).unwrap();
    assert_eq!(throttle.percent(), 95);
    throttle.set(200);
    assert_eq!(throttle.percent(), vmm::throttle::MAX_THROTTLE_PERCENT);
    // Both vCPUs are kicked every slice and sleep most of it.
    while control.throttle_sleeps() < 40 {
        assert!(Instant::now() < deadline, "throttled vCPUs never slept");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A pause parks throttled vCPUs (a sleeping one wakes for it).
    let states = handle.pause().unwrap();
    assert_eq!(states.len(), 2);
    handle.resume().unwrap();

    drop(throttle);
    assert_eq!(control.throttle(), 0);
    // Counted once both are parked: a vCPU kicked just before the throttle was lifted may
    // still be on its way to the sleep it counts.
    handle.pause().unwrap();
    let slept = control.throttle_sleeps();
    handle.resume().unwrap();
    for _ in 0..3 {
        handle.pause().unwrap();
        handle.resume().unwrap();
    }
    assert_eq!(
        control.throttle_sleeps(),
        slept,
        "a lifted throttle still slept"
    );

    control.request_stop(vmm::control::StopReason::Requested);
    rx.recv_timeout(HANG).expect("the run ended").unwrap();
}
