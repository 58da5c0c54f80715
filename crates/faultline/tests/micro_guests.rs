//! End to end: every micro-guest on a real KVM VM, with what it reports checked against the
//! host's own view of guest memory and vCPU state.

mod common;

use faultline::host_checksum;
use vm_memory::{Bytes, GuestAddress};
use vmm::cpuid::{entry, ASYNC_PF_FEATURES, KVM_FEATURES_LEAF};

#[test]
fn hello_reports_its_constant() {
    require_kvm!();
    let (_, report) = common::run(&common::options("hello"));
    report.check().unwrap();
    assert_eq!(report.vcpus[0].reports, vec![guests::HELLO_REPORT]);
    assert!(report.to_first_instruction.is_some(), "STARTED was seen");
}

#[test]
fn touch_checksum_matches_guest_memory() {
    require_kvm!();
    let mut options = common::options("touch");
    options.arg = Some(0x1234_5678_9abc);
    let (vm, report) = common::run(&options);
    report.check().unwrap();
    let expected = guests::touch_checksum(vm.range.start, vm.range.pages, 0x1234_5678_9abc);
    assert_eq!(report.summed_report(0), Some(expected));
    assert_eq!(host_checksum(vm.vm.ram(), vm.range).unwrap(), expected);
    // Every page holds exactly its own value, not just the right sum.
    for i in [0, 1, vm.range.pages / 2, vm.range.pages - 1] {
        let gpa = vm.range.start + i * 4096;
        assert_eq!(vm.vm.ram().read_u64(gpa), Some(gpa ^ 0x1234_5678_9abc));
    }
}

#[test]
fn touch_splits_the_range_between_vcpus() {
    require_kvm!();
    let mut options = common::options("touch");
    options.vcpus = 3;
    options.mem = 32 << 20;
    let (vm, report) = common::run(&options);
    report.check().unwrap();
    assert_eq!(report.vcpus.len(), 3);
    assert!(report.vcpus.iter().all(|v| v.reports.len() == 1));
    let expected = guests::touch_checksum(vm.range.start, vm.range.pages, vm.arg);
    assert_eq!(report.summed_report(0), Some(expected));
    assert_eq!(host_checksum(vm.vm.ram(), vm.range).unwrap(), expected);
}

#[test]
fn checksum_reads_what_the_host_wrote() {
    require_kvm!();
    let options = common::options("checksum");
    let mut vm = faultline::micro::MicroVm::new(&options).unwrap();
    let mut expected = 0u64;
    for i in 0..vm.range.pages {
        let gpa = vm.range.start + i * 4096;
        let value = gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        vm.vm
            .ram()
            .memory()
            .write_obj(value, GuestAddress(gpa))
            .unwrap();
        expected = expected.wrapping_add(value);
    }
    let report = vm.run().unwrap();
    report.check().unwrap();
    assert_eq!(report.vcpus[0].reports, vec![expected]);
}

#[test]
fn dirty_rewrites_every_page_each_pass() {
    require_kvm!();
    let mut options = common::options("dirty");
    options.arg = Some(4);
    options.mem = 16 << 20;
    let (vm, report) = common::run(&options);
    report.check().unwrap();
    let expected = guests::dirty_checksum(vm.range.start, vm.range.pages, 4);
    assert_eq!(report.vcpus[0].reports, vec![4, expected]);
    assert_eq!(host_checksum(vm.vm.ram(), vm.range).unwrap(), expected);
}

fn kvm_features_seen(async_pf: bool) -> (u64, u32) {
    let mut options = common::options("cpuid");
    options.cpuid.async_pf = async_pf;
    let (vm, report) = common::run(&options);
    report.check().unwrap();
    assert_eq!(
        report.vcpus[0].reports[0],
        u64::from(u32::from_le_bytes(*b"KVMK"))
    );
    let from_kvm = entry(&vm.vm.vcpus()[0].cpuid().unwrap(), KVM_FEATURES_LEAF, 0)
        .unwrap()
        .eax;
    (report.vcpus[0].reports[1], from_kvm)
}

#[test]
fn async_pf_cpuid_bits_are_offered_by_default() {
    require_kvm!();
    let (guest_eax, kvm_eax) = kvm_features_seen(true);
    assert_eq!(guest_eax as u32 & ASYNC_PF_FEATURES, ASYNC_PF_FEATURES);
    assert_eq!(kvm_eax & ASYNC_PF_FEATURES, ASYNC_PF_FEATURES);
}

#[test]
fn async_pf_cpuid_bits_are_hidden_with_no_async_pf() {
    require_kvm!();
    let (guest_eax, kvm_eax) = kvm_features_seen(false);
    assert_eq!(guest_eax as u32 & ASYNC_PF_FEATURES, 0);
    assert_eq!(kvm_eax & ASYNC_PF_FEATURES, 0);
}

#[test]
fn cx16_can_be_masked() {
    require_kvm!();
    let mut options = common::options("cpuid");
    options.cpuid.mask = vmm::cpuid::FeatureMask::parse("cx16").unwrap();
    let (_, report) = common::run(&options);
    assert_eq!(
        report.vcpus[0].reports[2] & (1 << 13),
        0,
        "leaf 1 ecx bit 13 (cx16) is clear"
    );
}

#[test]
fn asyncpf_guest_enables_the_msrs_like_linux() {
    require_kvm!();
    const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
    const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
    let (vm, report) = common::run(&common::options("asyncpf"));
    report.check().unwrap();
    let enable = vm.range.start | 1 | 8; // area | ENABLED | DELIVERY_AS_INT
    assert_eq!(
        report.vcpus[0].reports,
        vec![0xf3, enable],
        "the guest reads back what it wrote"
    );
    let msrs = vm.vm.vcpus()[0]
        .read_msrs(&[MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT])
        .unwrap();
    assert_eq!(
        msrs,
        vec![(MSR_KVM_ASYNC_PF_EN, enable), (MSR_KVM_ASYNC_PF_INT, 0xf3)]
    );
}

#[test]
fn a_triple_fault_is_a_crash_not_a_success() {
    require_kvm!();
    let (_, report) = common::run(&common::options("fault"));
    let err = report.check().unwrap_err();
    assert!(err.to_string().contains("triple-faulted"), "{err}");
    assert!(report.vcpus[0].triple_fault);
}

#[test]
fn high_ram_above_the_mmio_gap_is_usable() {
    require_kvm!();
    // 3 GiB + 8 MiB: the top 8 MiB live above 4 GiB. Touch only those pages.
    let mut options = common::options("touch");
    options.mem = (3 << 30) + (8 << 20);
    options.range = Some(vmm::boot::micro::WorkRange {
        start: 1 << 32,
        pages: 2048,
    });
    let (vm, report) = common::run(&options);
    report.check().unwrap();
    assert_eq!(vm.vm.ram().regions().len(), 2);
    let expected = guests::touch_checksum(1 << 32, 2048, vm.arg);
    assert_eq!(report.summed_report(0), Some(expected));
    assert_eq!(host_checksum(vm.vm.ram(), vm.range).unwrap(), expected);
}
