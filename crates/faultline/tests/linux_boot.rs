//! Booting the default Linux guest (guests/linux/build.sh). Ignored by default: it needs the
//! built kernel, and with an emulated guest CPU Linux runs 100 to 1000 times slower than on
//! hardware. Run it with:
//!
//! ```sh
//! guests/linux/build.sh
//! cargo test --release -p faultline --test linux_boot -- --ignored --nocapture
//! ```
//!
//! FAULTLINE_LINUX_DIR picks another directory, FAULTLINE_LINUX_TIMEOUT (seconds, default 900)
//! bounds the run.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultline::linux::{LinuxOptions, DEFAULT_CMDLINE};
use vmm::cpuid::{CpuidConfig, FeatureMask};
use vmm::devices::ConsoleSink;

fn guest_dir() -> PathBuf {
    std::env::var_os("FAULTLINE_LINUX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guests/linux/out"))
}

#[test]
#[ignore = "needs guests/linux/build.sh and minutes of emulated CPU"]
fn the_debian_kernel_boots_to_its_console() {
    require_kvm!();
    let dir = guest_dir();
    let kernel = dir.join("vmlinux");
    assert!(
        kernel.exists(),
        "{} is missing: run guests/linux/build.sh first",
        kernel.display()
    );
    let timeout = std::env::var("FAULTLINE_LINUX_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900);
    let capture = Arc::new(Mutex::new(Vec::new()));
    let options = LinuxOptions {
        kernel,
        initrd: Some(dir.join("initramfs.cpio.gz")).filter(|p| p.exists()),
        cmdline: DEFAULT_CMDLINE.to_string(),
        mem: 256 << 20,
        vcpus: 1,
        cpuid: CpuidConfig {
            async_pf: true,
            mask: FeatureMask::parse("emulator").unwrap(),
        },
        console: ConsoleSink {
            to_stdout: true,
            capture: Some(Arc::clone(&capture)),
        },
        timeout: Some(Duration::from_secs(timeout)),
        forward_stdin: false,
    };
    let started = std::time::Instant::now();
    let report = faultline::linux::run(&options);
    let console = String::from_utf8_lossy(&capture.lock().unwrap()).into_owned();
    // On an instruction-emulating host the kernel ends in an emulation failure (Linux 6.1's
    // int3 self-test); on hardware virtualisation it runs /init and reboots. Either way the
    // kernel must have booted far enough to print its banner and enable the serial console.
    eprintln!(
        "\n--- {} bytes of console output after {:.1} s; run: {report:?}",
        console.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        console.contains("Linux version"),
        "the kernel's first console line did not appear"
    );
    assert!(
        console.contains("printk: console [ttyS0] enabled"),
        "the serial console driver did not start"
    );
    if let Err(e) = &report {
        let chain = format!("{e:#}");
        assert!(
            chain.contains("internal error"),
            "the only accepted failure is an emulation failure: {chain}"
        );
    }
}
