//! End to end: micro-guests on KVM whose RAM is served by the pager through userfaultfd.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use faultline::host_checksum;
use faultline::lazy::LazySpec;
use faultline::micro::MicroVm;
use pager::{Content, FailurePolicy, MemorySource, PageSource, SourceError};

fn lazy_options(guest: &str, spec: LazySpec) -> faultline::micro::MicroOptions {
    let mut options = common::options(guest);
    options.mem = 16 << 20;
    options.lazy = Some(spec);
    options
}

#[test]
fn touch_over_lazy_zero_memory() {
    require_kvm!();
    let mut options = lazy_options("touch", LazySpec::Zero);
    options.vcpus = 2;
    let (vm, report) = common::run(&options);
    report.check().unwrap();
    let expected = guests::touch_checksum(vm.range.start, vm.range.pages, vm.arg);
    assert_eq!(report.summed_report(0), Some(expected));
    assert_eq!(host_checksum(vm.vm.ram(), vm.range).unwrap(), expected);
    let stats = report.pager.unwrap();
    // Every page of the work range was missing and installed, for a vCPU's fault or ahead of
    // it (each vCPU walks its half of the range in order, which prediction follows).
    assert!(stats.faults_vcpu > 0, "{stats:?}");
    assert!(stats.pages_predicted > 0, "{stats:?}");
    assert_eq!(stats.faults_other, 0);
    assert!(
        stats.pages_installed_urgent + stats.pages_installed_background >= vm.range.pages,
        "{stats:?}"
    );
    let present: u64 = stats.regions.iter().map(|r| r.pages_present).sum();
    assert!(present >= vm.range.pages, "{stats:?}");
    assert_eq!(stats.bytes_copied, 0, "zero pages are never copied");
}

/// A sparse raw image: page `i` of the work range holds `i * 3 + 1` in its first word for
/// every 5th page; the rest are holes.
fn sparse_image(name: &str, mem: u64) -> (std::path::PathBuf, u64) {
    let path = std::env::temp_dir().join(format!("faultline-lazy-{name}-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    file.set_len(mem).unwrap();
    let mut sum = 0u64;
    let start = vmm::boot::layout::BOOT_AREA_END;
    let mut page = start;
    while page < mem {
        if (page / 4096).is_multiple_of(5) {
            let value = (page / 4096) * 3 + 1;
            file.seek(SeekFrom::Start(page)).unwrap();
            file.write_all(&value.to_le_bytes()).unwrap();
            sum = sum.wrapping_add(value);
        }
        page += 4096;
    }
    (path, sum)
}

#[test]
fn checksum_over_a_lazy_file_image_equals_the_image() {
    require_kvm!();
    // Read-ahead (counted exactly, so without prediction); then prediction over a slow
    // source, which installs the guest's sequential walk ahead of it in long batches.
    for (readahead, predict, latency_us) in [(1, false, 0), (8, false, 0), (1, true, 200)] {
        let mem = 16 << 20;
        let (path, expected) = sparse_image(&format!("ra{readahead}-{latency_us}"), mem);
        let mut options = lazy_options("checksum", LazySpec::File(path.clone()));
        options.pager.readahead_pages = readahead;
        options.pager.predict = predict;
        options.source_latency = std::time::Duration::from_micros(latency_us);
        let (vm, report) = common::run(&options);
        std::fs::remove_file(&path).unwrap();
        report.check().unwrap();
        assert_eq!(
            report.vcpus[0].reports,
            vec![expected],
            "readahead {readahead}"
        );
        assert_eq!(host_checksum(vm.vm.ram(), vm.range).unwrap(), expected);
        let stats = report.pager.unwrap();
        assert!(stats.bytes_copied > 0, "data pages are copied: {stats:?}");
        if predict {
            assert!(
                stats.pages_predicted > 0,
                "the walk was followed: {stats:?}"
            );
        } else if readahead == 1 {
            assert!(stats.zero_pages > 0, "holes are zero pages: {stats:?}");
        } else {
            // Runs mixing data and holes are read and copied whole, in fewer ioctls.
            assert!(
                stats.install_ioctls < stats.pages_installed_urgent,
                "{stats:?}"
            );
        }
    }
}

#[test]
fn the_boot_area_stays_resident() {
    require_kvm!();
    let (vm, report) = common::run(&lazy_options("hello", LazySpec::Zero));
    report.check().unwrap();
    let stats = report.pager.unwrap();
    // The code page and page tables were written before the pager started: never fetched.
    assert!(stats.regions[0].pages_present >= 5);
    assert!(
        stats.faults_vcpu < 8,
        "only untouched boot-area pages (the stack) fault: {stats:?}"
    );
    drop(vm);
}

/// Fails the page at `bad` (an offset in the image).
struct BrokenImage {
    inner: MemorySource,
    bad: u64,
}

impl PageSource for BrokenImage {
    fn describe(&self) -> String {
        "broken".into()
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        if (offset..offset + buf.len() as u64).contains(&self.bad) {
            return Err(SourceError::Unavailable {
                offset: self.bad,
                reason: "the source host is gone".into(),
            });
        }
        self.inner.fetch(offset, buf)
    }
}

fn run_with_broken_page(policy: FailurePolicy) -> anyhow::Result<faultline::micro::MicroReport> {
    let mem = 16u64 << 20;
    let bad = 0x40_0000; // inside the work range
    let source = BrokenImage {
        inner: MemorySource::new(vec![0; mem as usize]),
        bad,
    };
    let mut options = lazy_options("checksum", LazySpec::Source(Arc::new(source)));
    options.pager.failure_policy = policy;
    let mut vm = MicroVm::new(&options)?;
    vm.run()
}

#[test]
fn a_failed_page_is_an_error_not_garbage_or_a_hang() {
    require_kvm!();
    for policy in [FailurePolicy::Poison, FailurePolicy::Stop] {
        let outcome = run_with_broken_page(policy);
        let failed = match &outcome {
            Err(e) => format!("{e:#}"),
            Ok(report) => match report.check() {
                Err(e) => e.to_string(),
                Ok(()) => {
                    panic!("{policy:?}: the guest finished as if the page were fine: {report:?}")
                }
            },
        };
        eprintln!("{policy:?}: {failed}");
        assert!(
            failed.contains("0x400000") || failed.contains("stopped"),
            "{policy:?}: {failed}"
        );
    }
}
