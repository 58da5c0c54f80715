//! Running a micro-guest end to end: RAM, VM, load, run, and what it reported.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use guests::MicroGuest;
use serde::Serialize;
use vmm::boot::micro::{self, WorkRange};
use vmm::cpuid::CpuidConfig;
use vmm::devices::ConsoleSink;
use vmm::vcpu::VcpuStop;
use vmm::{GuestRam, Vm, VmConfig};

use crate::lazy::{start_pager, LazySpec, PagerLink, RamState, RecencyFeed};
use pager::{Pager, PagerConfig};
use snapshot::create::MemoryBacking;
use snapshot::state::GuestInfo;
use snapshot::WriteSummary;

/// What to run.
#[derive(Debug, Clone)]
pub struct MicroOptions {
    pub guest: &'static MicroGuest,
    pub mem: u64,
    pub vcpus: u8,
    /// The guest's argument; `None` takes the guest's default.
    pub arg: Option<u64>,
    /// The work range; `None` takes all low RAM above the boot area.
    pub range: Option<WorkRange>,
    pub cpuid: CpuidConfig,
    pub console: ConsoleSink,
    /// Serve guest RAM lazily through the pager from this source.
    pub lazy: Option<LazySpec>,
    /// The pager's knobs (with `lazy`).
    pub pager: PagerConfig,
    /// Added to every read of the lazy source (with `lazy`; zero: none).
    pub source_latency: std::time::Duration,
    /// Log guest writes for diff snapshots.
    pub track_dirty: bool,
    /// Log them through a dirty ring of this many entries per vCPU (implies `track_dirty`).
    pub dirty_ring: Option<u32>,
    /// Hold vCPUs that reach this micro-guest hold point (tests: an exact snapshot point).
    pub hold_at: Option<u32>,
}

impl MicroOptions {
    /// Defaults for `guest`: 64 MiB, one vCPU, the guest's own argument.
    pub fn new(guest: &'static MicroGuest) -> Self {
        MicroOptions {
            guest,
            mem: 64 << 20,
            vcpus: 1,
            arg: None,
            range: None,
            cpuid: CpuidConfig::default(),
            console: ConsoleSink::stdout(),
            lazy: None,
            pager: PagerConfig::default(),
            source_latency: std::time::Duration::ZERO,
            track_dirty: false,
            dirty_ring: None,
            hold_at: None,
        }
    }
}

/// A micro-guest loaded into a VM, ready to run. Dropping it stops the pager (and every
/// thread holding its userfaultfd) before the VM and its RAM go.
pub struct MicroVm {
    pub vm: Vm,
    pub guest: &'static MicroGuest,
    pub range: WorkRange,
    pub arg: u64,
    /// The pager serving guest RAM, when it is lazy (or swaps).
    pub pager: Option<Pager>,
    /// Feeds the guest's writes to a resident limit's eviction.
    recency: Option<RecencyFeed>,
    created: Instant,
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        drop(self.recency.take());
        if let Some(pager) = self.pager.take() {
            pager.shutdown();
        }
    }
}

/// What one vCPU of a micro-guest did.
#[derive(Debug, Clone, Serialize)]
pub struct VcpuReport {
    pub vcpu: u8,
    /// The exit code, if the guest wrote one.
    pub exit_code: Option<u32>,
    pub reports: Vec<u64>,
    pub triple_fault: bool,
}

/// What a micro-guest run produced.
#[derive(Debug, Clone, Serialize)]
pub struct MicroReport {
    pub guest: &'static str,
    pub mem: u64,
    pub arg: u64,
    pub range_start: u64,
    pub range_pages: u64,
    pub vcpus: Vec<VcpuReport>,
    /// From the start of VM creation to the guest's first instruction.
    #[serde(serialize_with = "as_micros")]
    pub to_first_instruction: Option<Duration>,
    /// From the start of VM creation to the last vCPU's exit.
    #[serde(serialize_with = "as_micros")]
    pub to_completion: Option<Duration>,
    /// The pager's counters after the run, when RAM was lazy.
    pub pager: Option<pager::Stats>,
}

fn as_micros<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(d.as_micros() as u64),
        None => s.serialize_none(),
    }
}

/// Why a micro-guest run did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum GuestFailure {
    #[error("guest {guest:?} crashed: vCPU {vcpu} triple-faulted")]
    TripleFault { guest: &'static str, vcpu: u8 },
    #[error("guest {guest:?} failed: vCPU {vcpu} exited with code {code}")]
    ExitCode {
        guest: &'static str,
        vcpu: u8,
        code: u32,
    },
    #[error("guest {guest:?} stopped before vCPU {vcpu} finished")]
    Unfinished { guest: &'static str, vcpu: u8 },
}

impl MicroReport {
    /// Ok if every vCPU exited with code 0.
    pub fn check(&self) -> Result<(), GuestFailure> {
        for v in &self.vcpus {
            let guest = self.guest;
            match (v.triple_fault, v.exit_code) {
                (true, _) => {
                    return Err(GuestFailure::TripleFault {
                        guest,
                        vcpu: v.vcpu,
                    })
                }
                (false, Some(0)) => {}
                (false, Some(code)) => {
                    return Err(GuestFailure::ExitCode {
                        guest,
                        vcpu: v.vcpu,
                        code,
                    })
                }
                (false, None) => {
                    return Err(GuestFailure::Unfinished {
                        guest,
                        vcpu: v.vcpu,
                    })
                }
            }
        }
        Ok(())
    }

    /// The `index`-th value each vCPU reported, summed (wrapping): the checksum of a guest whose
    /// vCPUs each report a partial sum.
    pub fn summed_report(&self, index: usize) -> Option<u64> {
        self.vcpus
            .iter()
            .map(|v| v.reports.get(index).copied())
            .try_fold(0u64, |sum, r| r.map(|r| sum.wrapping_add(r)))
    }
}

impl MicroVm {
    /// Creates RAM and the VM, loads the guest, and (with `lazy`) puts the RAM that the load
    /// did not write behind the pager.
    pub fn new(options: &MicroOptions) -> anyhow::Result<Self> {
        let created = Instant::now();
        // Swap needs RAM behind the pager: what the loader did not write is then served as
        // zero on first touch, as `--lazy zero` does.
        let lazy = match (&options.lazy, &options.pager.swap_file) {
            (None, Some(_)) => Some(LazySpec::Zero),
            (lazy, _) => lazy.clone(),
        };
        let ram = GuestRam::new(options.mem).context("cannot create guest RAM")?;
        let link = PagerLink::default();
        let config = VmConfig {
            vcpus: options.vcpus,
            cpuid: options.cpuid.clone(),
            console: options.console.clone(),
            on_vcpu_thread: lazy.as_ref().map(|_| link.vcpu_hook()),
            // A resident limit learns of the guest's writes from the dirty log.
            track_dirty: options.track_dirty || options.pager.resident_limit.is_some(),
            dirty_ring: options.dirty_ring,
        };
        let vm = Vm::new(&config, ram).context("cannot create the VM")?;
        vm.control().set_hold_at(options.hold_at);
        let range = options
            .range
            .unwrap_or_else(|| micro::default_work_range(vm.ram()));
        let arg = options.arg.unwrap_or(options.guest.default_arg);
        let entries = micro::load(vm.ram(), options.guest, range, arg, options.vcpus)
            .with_context(|| format!("cannot load micro-guest {:?}", options.guest.name))?;
        vm.set_entries(&entries)
            .context("cannot set the vCPUs' entry state")?;
        let pager = match &lazy {
            Some(spec) => Some(start_pager(
                vm.ram(),
                RamState::Loaded,
                spec,
                options.source_latency,
                options.pager.clone(),
                &link,
                vm.control(),
            )?),
            None => None,
        };
        let recency = match (&pager, options.pager.resident_limit) {
            (Some(pager), Some(_)) => Some(RecencyFeed::start(vm.handle(), pager.handle())?),
            _ => None,
        };
        Ok(MicroVm {
            vm,
            guest: options.guest,
            range,
            arg,
            pager,
            recency,
            created,
        })
    }

    /// What a snapshot records of the guest, so that a restore can report and check it.
    pub fn guest_info(&self) -> GuestInfo {
        GuestInfo {
            name: self.guest.name.into(),
            range_start: self.range.start,
            range_pages: self.range.pages,
            arg: self.arg,
        }
    }

    /// Writes a full snapshot of this VM, which must not be running (not started yet, or
    /// finished), into the new directory `dir`.
    pub fn write_snapshot(&mut self, dir: &Path) -> anyhow::Result<WriteSummary> {
        let machine = self.vm.save_state().context("cannot save the VM state")?;
        let backing = if self.pager.is_some() {
            MemoryBacking::Lazy
        } else {
            MemoryBacking::Resident
        };
        let guest = self.guest_info();
        snapshot::create::write(
            dir,
            machine,
            self.vm.ram(),
            Some(guest),
            snapshot::create::Watch::of(self.vm.handle().memory()),
            backing,
            self.pager.as_ref().map(Pager::handle),
        )
        .with_context(|| format!("cannot write a snapshot into {}", dir.display()))
    }

    /// The guest's run, its report timed from `since`.
    pub fn guest_run(&self, since: Instant) -> GuestRun {
        GuestRun {
            guest: self.guest,
            range: self.range,
            arg: self.arg,
            since,
        }
    }

    /// Runs the guest to the end.
    pub fn run(&mut self) -> anyhow::Result<MicroReport> {
        let run = self.guest_run(self.created);
        run.run(&mut self.vm, self.pager.as_ref())
    }
}

/// A micro-guest run to report on: which guest, with what, timed from when.
#[derive(Debug, Clone, Copy)]
pub struct GuestRun {
    pub guest: &'static MicroGuest,
    pub range: WorkRange,
    pub arg: u64,
    /// Times in the report count from here (VM creation; restore start).
    pub since: Instant,
}

impl GuestRun {
    /// The run a snapshot's guest record describes, if it names a guest faultline knows.
    pub fn from_info(info: &snapshot::state::GuestInfo, since: Instant) -> Option<GuestRun> {
        Some(GuestRun {
            guest: guests::find(&info.name)?,
            range: WorkRange {
                start: info.range_start,
                pages: info.range_pages,
            },
            arg: info.arg,
            since,
        })
    }
}

impl GuestRun {
    /// Runs `vm` until its vCPUs are done and reports what the guest did. A fatal error of
    /// the pager (memory that could not be provided, a pager that failed) fails the run, with
    /// the pager's message, whatever the vCPUs did: guest memory cannot be trusted after it.
    pub fn run(&self, vm: &mut Vm, pager: Option<&Pager>) -> anyhow::Result<MicroReport> {
        let outcome = vm.run();
        let failed = || format!("micro-guest {:?} failed", self.guest.name);
        if let Some(fatal) = pager.and_then(|p| p.fatal_error()) {
            let fatal = format!("guest memory could not be provided: {fatal}");
            return Err(match outcome {
                Err(e) => anyhow::Error::new(e).context(fatal),
                Ok(_) => anyhow::anyhow!(fatal),
            })
            .with_context(failed);
        }
        let outcome = outcome.with_context(failed)?;
        let finished = outcome.last_exit.unwrap_or_else(Instant::now);
        let vcpus = outcome
            .vcpus
            .iter()
            .map(|v| VcpuReport {
                vcpu: v.vcpu,
                exit_code: match v.stop {
                    VcpuStop::Exited(code) => Some(code),
                    _ => None,
                },
                reports: v.reports.clone(),
                triple_fault: v.stop == VcpuStop::TripleFault,
            })
            .collect();
        Ok(MicroReport {
            guest: self.guest.name,
            mem: vm.ram().size(),
            arg: self.arg,
            range_start: self.range.start,
            range_pages: self.range.pages,
            vcpus,
            to_first_instruction: outcome.first_instruction.map(|t| t - self.since),
            to_completion: Some(finished - self.since),
            pager: pager.map(|p| p.stats()),
        })
    }
}

/// Checks the memory of the `counter` guest described by `info`, as it is now, against its
/// vCPUs' `passes` (see [`guests::counter_check`]): the passes each vCPU's slice shows as
/// complete.
pub fn check_counter_memory(
    ram: &GuestRam,
    info: &GuestInfo,
    passes: &[u64],
) -> anyhow::Result<Vec<u64>> {
    if info.name != "counter" {
        anyhow::bail!(
            "only the counter guest's memory can be checked mid-run, not {:?}'s",
            info.name
        );
    }
    let range = WorkRange {
        start: info.range_start,
        pages: info.range_pages,
    };
    micro::split_range(range, passes.len() as u64)
        .into_iter()
        .enumerate()
        .map(|(vcpu, slice)| {
            let words = (0..slice.pages)
                .map(|i| {
                    let gpa = slice.start + i * vmm::PAGE_SIZE;
                    ram.read_u64(gpa)
                        .with_context(|| format!("guest RAM at {gpa:#x} cannot be read"))
                })
                .collect::<anyhow::Result<Vec<u64>>>()?;
            guests::counter_check(&words, Some(passes[vcpu]))
                .map_err(|e| anyhow::anyhow!("vCPU {vcpu}'s pages from {:#x}: {e}", slice.start))
        })
        .collect()
}
