//! `faultline bench boot`: time from the start of VM creation to the first guest instruction
//! and to the micro-guest's completion, for faultline and for a bare KVM VM built the shortest
//! way kvm-ioctls allows (anonymous memory, one memslot, no irqchip, real mode) as the floor.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use serde::Serialize;
use vmm::devices::ConsoleSink;

use super::{median_ms, ratio};
use crate::micro::{MicroOptions, MicroVm};

/// Figures for one side of a case.
#[derive(Debug, Serialize)]
pub struct Timing {
    pub to_first_instruction_ms: f64,
    pub to_completion_ms: f64,
}

/// One memory size.
#[derive(Debug, Serialize)]
pub struct BootCase {
    pub mem_mib: u64,
    pub guest: &'static str,
    pub runs: usize,
    pub faultline: Timing,
    pub baseline: Timing,
    /// faultline / baseline, to the first instruction.
    pub ratio_first_instruction: f64,
    /// faultline / baseline, to completion.
    pub ratio_completion: f64,
}

/// The whole benchmark's output.
#[derive(Debug, Serialize)]
pub struct BootBench {
    pub bench: &'static str,
    pub baseline: &'static str,
    pub cases: Vec<BootCase>,
}

/// Runs the `hello` micro-guest `runs` times per size, alternating with the baseline.
pub fn run(
    sizes: &[u64],
    runs: usize,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<BootBench> {
    let guest = guests::find("hello").expect("hello is built in");
    let mut cases = Vec::new();
    for &mem in sizes {
        let (mut ours_first, mut ours_done, mut base_first, mut base_done) =
            (vec![], vec![], vec![], vec![]);
        for i in 0..runs {
            progress(&format!("boot: {} MiB, run {}/{runs}", mem >> 20, i + 1));
            let options = MicroOptions {
                mem,
                console: ConsoleSink::default(),
                ..MicroOptions::new(guest)
            };
            let mut vm = MicroVm::new(&options)?;
            let report = vm.run()?;
            report.check()?;
            ours_first.push(
                report
                    .to_first_instruction
                    .context("hello never reported in")?,
            );
            ours_done.push(report.to_completion.expect("set on every run"));
            drop(vm);
            let (first, done) = bare_kvm_boot(mem)?;
            base_first.push(first);
            base_done.push(done);
        }
        let faultline = Timing {
            to_first_instruction_ms: median_ms(&ours_first),
            to_completion_ms: median_ms(&ours_done),
        };
        let baseline = Timing {
            to_first_instruction_ms: median_ms(&base_first),
            to_completion_ms: median_ms(&base_done),
        };
        cases.push(BootCase {
            mem_mib: mem >> 20,
            guest: guest.name,
            runs,
            ratio_first_instruction: ratio(
                faultline.to_first_instruction_ms,
                baseline.to_first_instruction_ms,
            ),
            ratio_completion: ratio(faultline.to_completion_ms, baseline.to_completion_ms),
            faultline,
            baseline,
        });
    }
    Ok(BootBench {
        bench: "boot",
        baseline: "bare KVM: anonymous memory, one memslot, real mode, no irqchip",
        cases,
    })
}

/// The floor: the fewest KVM calls that run a guest instruction with `mem` bytes of RAM.
fn bare_kvm_boot(mem: u64) -> anyhow::Result<(Duration, Duration)> {
    const LOAD_ADDR: u64 = 0x1000;
    let start = Instant::now();
    let kvm = Kvm::new().context("cannot open /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    // SAFETY: a fresh anonymous private mapping; the pointer is checked against MAP_FAILED.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mem as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        bail!(
            "mmap of {mem} bytes failed: {}",
            std::io::Error::last_os_error()
        );
    }
    let code = guests::BASELINE_REAL_MODE;
    // SAFETY: `host` maps `mem` bytes, far more than LOAD_ADDR + the code's length.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            (host as *mut u8).add(LOAD_ADDR as usize),
            code.len(),
        )
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem,
        userspace_addr: host as u64,
    };
    let result = (|| {
        // SAFETY: the mapping lives until the munmap below, after the VM is dropped.
        unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        let mut sregs = vcpu.get_sregs()?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)?;
        let regs = kvm_bindings::kvm_regs {
            rip: LOAD_ADDR,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs)?;
        let mut first = None;
        loop {
            match vcpu.run().context("KVM_RUN")? {
                VcpuExit::IoOut(guests::ports::STARTED, _) => first = Some(start.elapsed()),
                VcpuExit::IoOut(guests::ports::EXIT, _) => break,
                other => bail!("baseline guest: unexpected exit {other:?}"),
            }
        }
        Ok((first.context("baseline never started")?, start.elapsed()))
    })();
    drop(vm);
    // SAFETY: unmapping the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(host, mem as usize) };
    result
}
