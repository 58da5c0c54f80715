//! Booting a Linux kernel and running it until it powers off, resets, or a timeout.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use vmm::boot::linux::{self, BootProtocol, LinuxBootConfig};
use vmm::control::StopReason;
use vmm::cpuid::CpuidConfig;
use vmm::devices::{ConsoleSink, LegacyDevices};
use vmm::{GuestRam, Vm, VmConfig};

/// The command line used when none is given: serial console (early and late), no ACPI and no
/// PCI (faultline has neither), reboot through the i8042 reset (that ends the VMM), reboot on
/// panic, no modules, only COM1, a short i8042 probe.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 acpi=off pci=off reboot=k panic=-1 nomodule tsc=reliable i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1";

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxOptions {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem: u64,
    pub vcpus: u8,
    pub cpuid: CpuidConfig,
    pub console: ConsoleSink,
    /// Stop the VM after this long (the guest CPU may be emulated and slow).
    pub timeout: Option<Duration>,
    /// Forward this process's stdin to the serial console (when it is a terminal).
    pub forward_stdin: bool,
}

/// How the Linux run ended.
#[derive(Debug, Clone)]
pub struct LinuxReport {
    pub protocol: BootProtocol,
    pub stop_reason: Option<StopReason>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Boots the kernel and runs it to the end.
pub fn run(options: &LinuxOptions) -> anyhow::Result<LinuxReport> {
    let start = Instant::now();
    let ram = GuestRam::new(options.mem).context("cannot create guest RAM")?;
    let config = VmConfig {
        vcpus: options.vcpus,
        cpuid: options.cpuid.clone(),
        console: options.console.clone(),
        on_vcpu_thread: None,
        track_dirty: false,
        dirty_ring: None,
    };
    let mut vm = Vm::new(&config, ram).context("cannot create the VM")?;
    let boot = LinuxBootConfig {
        kernel: options.kernel.clone(),
        initrd: options.initrd.clone(),
        cmdline: options.cmdline.clone(),
    };
    let loaded = linux::load(vm.ram(), &boot, options.vcpus).context("cannot load the kernel")?;
    vm.set_entries(&loaded.entries)
        .context("cannot set the vCPUs' entry state")?;
    tracing::info!(protocol = ?loaded.protocol, "booting {}", options.kernel.display());

    if options.forward_stdin && rustix::termios::isatty(std::io::stdin()) {
        spawn_stdin_forwarder(vm.devices());
    }
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(timeout) = options.timeout {
        let control = vm.control();
        let flag = Arc::clone(&timed_out);
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            control.request_stop(StopReason::Requested);
        });
    }
    let outcome = vm.run().context("the Linux guest failed")?;
    Ok(LinuxReport {
        protocol: loaded.protocol,
        stop_reason: outcome.stop_reason,
        timed_out: timed_out.load(std::sync::atomic::Ordering::SeqCst),
        elapsed: start.elapsed(),
    })
}

fn spawn_stdin_forwarder(devices: Arc<LegacyDevices>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            // A full FIFO drops input, as a real UART would.
            devices.serial_input(&buf[..n]);
        }
    });
}
