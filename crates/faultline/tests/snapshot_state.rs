//! Round trips of every saved state item through a real KVM VM: save from one VM, write the
//! state file, read it back, restore into a new VM, save again, and compare.

mod common;

use std::path::PathBuf;

use faultline::restore::{restore, RestoreMode, RestoreOptions};
use snapshot::create::MemoryBacking;
use snapshot::state;
use vmm::devices::ConsoleSink;
use vmm::state::{VcpuState, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
use vmm::{MachineState, Vm, VmConfig};

/// MSRs whose value moves with host time or that KVM recomputes, compared loosely below.
const MSR_IA32_TSC: u32 = 0x10;
const TIME_MSRS: [u32; 1] = [MSR_IA32_TSC];

fn tmp(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("faultline-state-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    path
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap()
}

/// Field-by-field equality of two vCPU states (time-driven MSRs aside).
fn assert_vcpu_eq(a: &VcpuState, b: &VcpuState) {
    assert_eq!(json(&a.regs), json(&b.regs), "regs");
    assert_eq!(json(&a.sregs), json(&b.sregs), "sregs");
    assert_eq!(a.fpu, b.fpu, "fpu");
    assert_eq!(json(&a.xsave), json(&b.xsave), "xsave");
    assert_eq!(json(&a.xcrs), json(&b.xcrs), "xcrs");
    assert_eq!(json(&a.debugregs), json(&b.debugregs), "debug regs");
    assert_eq!(json(&a.lapic), json(&b.lapic), "lapic");
    assert_eq!(a.mp_state.mp_state, b.mp_state.mp_state, "mp state");
    assert_eq!(json(&a.events), json(&b.events), "vcpu events");
    assert_eq!(json(&a.cpuid), json(&b.cpuid), "cpuid");
    assert_eq!(a.tsc_khz, b.tsc_khz, "tsc khz");
    let untimed = |s: &VcpuState| -> Vec<(u32, u64)> {
        s.msrs
            .iter()
            .filter(|m| !TIME_MSRS.contains(&m.index))
            .map(|m| (m.index, m.data))
            .collect()
    };
    assert_eq!(untimed(a), untimed(b), "MSRs");
    // The TSC goes on from where it was, never backwards.
    if let (Some(before), Some(after)) = (a.msr(MSR_IA32_TSC), b.msr(MSR_IA32_TSC)) {
        assert!(after >= before, "TSC went back: {before} -> {after}");
    }
}

fn assert_machine_eq(a: &MachineState, b: &MachineState) {
    assert_eq!(a.vcpus.len(), b.vcpus.len());
    for (x, y) in a.vcpus.iter().zip(&b.vcpus) {
        assert_vcpu_eq(x, y);
    }
    assert_eq!(json(&a.vm.pic_master), json(&b.vm.pic_master), "PIC master");
    assert_eq!(json(&a.vm.pic_slave), json(&b.vm.pic_slave), "PIC slave");
    assert_eq!(json(&a.vm.ioapic), json(&b.vm.ioapic), "IOAPIC");
    for (x, y) in a.vm.pit.channels.iter().zip(&b.vm.pit.channels) {
        // count_load_time is a host timestamp; everything else is the guest's programming.
        assert_eq!(
            (
                x.count,
                x.latched_count,
                x.status,
                x.read_state,
                x.write_state,
                x.mode,
                x.bcd,
                x.gate
            ),
            (
                y.count,
                y.latched_count,
                y.status,
                y.read_state,
                y.write_state,
                y.mode,
                y.bcd,
                y.gate
            ),
            "PIT channel"
        );
    }
    assert_eq!(a.vm.pit.flags, b.vm.pit.flags, "PIT flags");
    assert!(
        b.vm.clock.clock >= a.vm.clock.clock,
        "the guest clock went back"
    );
    assert_eq!(a.devices, b.devices, "devices");
}

/// Runs `guest` to its end, snapshots the finished VM to disk, restores it into a new VM, and
/// returns (saved before, saved after restore).
fn round_trip(guest: &str, vcpus: u8) -> (MachineState, MachineState, PathBuf) {
    let mut options = common::options(guest);
    options.vcpus = vcpus;
    options.mem = 8 << 20;
    let (mut vm, report) = common::run(&options);
    report.check().unwrap();
    let before = vm.vm.save_state().unwrap();
    let dir = tmp(guest);
    snapshot::create::write(
        &dir,
        before.clone(),
        vm.vm.ram(),
        Some(vm.guest_info()),
        snapshot::create::Watch::default(),
        MemoryBacking::Resident,
        None,
    )
    .unwrap();
    let read = state::read(&dir).unwrap();
    assert_machine_eq(&before, &read.machine);
    let mut restored = restore(&RestoreOptions::new(&dir, RestoreMode::Eager)).unwrap();
    let after = restored.vm.save_state().unwrap();
    (before, after, dir)
}

#[test]
fn every_state_item_survives_a_round_trip() {
    require_kvm!();
    // Two vCPUs that ran 64-bit code and touched memory: long-mode sregs, a used LAPIC, MSRs.
    let (before, after, dir) = round_trip("mix", 2);
    assert_machine_eq(&before, &after);
    assert!(before.vcpus[0].msrs.len() > 10, "KVM lists many MSRs");
    assert!(
        before.vcpus[0].sregs.efer & (1 << 10) != 0,
        "long mode was active"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn async_pf_msrs_survive_snapshot_and_restore() {
    require_kvm!();
    let (before, after, dir) = round_trip("asyncpf", 1);
    let enable = before.vcpus[0].msr(MSR_KVM_ASYNC_PF_EN).expect("saved");
    assert_eq!(
        enable & 0b1001,
        0b1001,
        "enabled, delivered as an interrupt"
    );
    assert_eq!(before.vcpus[0].msr(MSR_KVM_ASYNC_PF_INT), Some(0xf3));
    assert_eq!(after.vcpus[0].msr(MSR_KVM_ASYNC_PF_EN), Some(enable));
    assert_eq!(after.vcpus[0].msr(MSR_KVM_ASYNC_PF_INT), Some(0xf3));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_paused_vm_hands_over_its_state_and_resumes() {
    require_kvm!();
    let mut options = common::options("mix");
    options.mem = 8 << 20;
    options.arg = Some(0); // forever
    let mut vm = faultline::micro::MicroVm::new(&options).unwrap();
    let handle = vm.vm.handle();
    let runner = std::thread::spawn(move || {
        let report = vm.run().unwrap();
        (vm, report)
    });
    while !handle.control().is_running() {
        std::thread::yield_now();
    }
    let first = handle.pause().unwrap();
    assert!(handle.control().is_paused());
    // While paused, the saved state is stable and the same as what pause returned.
    let again = handle.paused_state().unwrap();
    assert_eq!(json(&first), json(&again.vcpus));
    assert!(handle.pause().is_err(), "pausing twice is refused");
    // Resume, and let the guest run until the end of its third pass from here, where it
    // waits: the second pause must find it there.
    let target = u32::try_from(first[0].regs.r13 + 3).unwrap();
    handle.control().set_hold_at(Some(target));
    handle.resume().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while handle.control().held() != [0] {
        assert!(std::time::Instant::now() < deadline, "the guest never ran");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let second = handle.pause().unwrap();
    assert_eq!(
        second[0].regs.r13,
        first[0].regs.r13 + 3,
        "the guest ran three passes between the pauses"
    );
    handle.control().set_hold_at(None);
    handle.resume().unwrap();
    handle
        .control()
        .request_stop(vmm::control::StopReason::Requested);
    let (_, report) = runner.join().unwrap();
    assert!(report.check().is_err(), "stopped, not finished");
}

#[test]
fn a_vm_that_is_not_running_cannot_be_paused() {
    require_kvm!();
    let config = VmConfig {
        console: ConsoleSink::default(),
        ..VmConfig::default()
    };
    let vm = Vm::new(&config, vmm::GuestRam::new(8 << 20).unwrap()).unwrap();
    let err = vm.handle().pause().unwrap_err();
    assert!(err.to_string().contains("pause"), "{err}");
    assert!(vm.handle().resume().is_err());
}
