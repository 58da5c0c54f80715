//! `faultline bench restore`: how fast a snapshot comes back in each restore mode, and how
//! fast a guest then finishes a fixed scattered workload.
//!
//! The snapshot is of the `scatter` micro-guest, loaded and about to run its first
//! instruction, over RAM whose work range is filled with data (so the image is dense, the
//! worst case for an eager restore). Restoring it and running it to the end gives both
//! figures from one run: the STARTED port marks the first guest instruction, the exit marks
//! the end of the workload (reading one word from each page of a 24 MiB set spread over RAM).
//! The baseline is `resident`: the same guest over RAM that is already in place (VM creation
//! included, as a restore includes it). The snapshot files are in the page cache (they were
//! just written): the figures are for a warm host, like a warm function host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pager::PagerConfig;
use serde::Serialize;
use vmm::boot::micro::WorkRange;
use vmm::devices::ConsoleSink;

use super::{median_ms, ratio};
use crate::micro::{GuestRun, MicroOptions, MicroReport, MicroVm};
use crate::restore::{restore, RestoreMode, RestoreOptions, RestoreTimings};

/// What to measure.
#[derive(Debug, Clone)]
pub struct RestoreBenchOptions {
    /// Guest RAM sizes for the restore-to-running table.
    pub mems: Vec<u64>,
    /// Guest RAM of the workload table (must be one of `mems`).
    pub workload_mem: u64,
    /// Bytes the workload touches.
    pub working_set: u64,
    /// Runs per mode and size; medians are reported.
    pub runs: usize,
    /// Where the snapshots go (a fresh directory, removed afterwards).
    pub dir: PathBuf,
}

/// One row of the restore table.
#[derive(Debug, Serialize)]
pub struct RestoreRow {
    pub mem_mib: u64,
    pub mode: RestoreMode,
    /// Restore start to the first guest instruction, median.
    pub to_running_ms: f64,
    /// Where the time to "ready" went (medians, cumulative from restore start): state and
    /// memory layers read, memory in place, VM built with its state, pager started.
    pub state_ms: f64,
    pub memory_ms: f64,
    pub vm_ms: f64,
    pub ready_ms: f64,
}

/// One row of the workload table.
#[derive(Debug, Serialize)]
pub struct WorkloadRow {
    /// eager, lazy, prefetch, or resident (the baseline).
    pub mode: &'static str,
    /// Restore start (resident: VM creation) to the guest's exit, median.
    pub ms: f64,
    /// Page faults the pager served for the guest (median run).
    pub faults: u64,
    pub to_running_ms: f64,
}

/// The ratios the targets are about.
#[derive(Debug, Serialize)]
pub struct RestoreRatios {
    /// Lazy restore-to-running, largest RAM over smallest (target: at most 1.5).
    pub lazy_largest_over_smallest: f64,
    /// Workload time, lazy over prefetch (target: at least 3).
    pub workload_lazy_over_prefetch: f64,
    /// Workload time, prefetch over resident (target: at most 1.3).
    pub workload_prefetch_over_resident: f64,
    /// Workload time, eager over resident.
    pub workload_eager_over_resident: f64,
}

/// The whole benchmark's output.
#[derive(Debug, Serialize)]
pub struct RestoreBench {
    pub bench: &'static str,
    pub baseline: &'static str,
    pub runs: usize,
    pub working_set_mib: u64,
    pub working_set_pages: u64,
    pub restore: Vec<RestoreRow>,
    pub workload: Vec<WorkloadRow>,
    pub ratios: RestoreRatios,
}

const FILL_SEED: u64 = 0x0f11_ab1e_5eed_0001;

/// The word the benchmark's fill leaves at `gpa`.
fn fill_word(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ FILL_SEED
}

/// Fills every byte of the work range with data.
fn fill(vm: &MicroVm) {
    let range = vm.range;
    let host = vm
        .vm
        .ram()
        .host_range(range.start, range.pages * vmm::PAGE_SIZE)
        .expect("the work range is RAM");
    let words = (range.pages * vmm::PAGE_SIZE / 8) as usize;
    // SAFETY: the work range is mapped, writable guest RAM owned by `vm`, and no vCPU runs.
    let memory = unsafe { std::slice::from_raw_parts_mut(host as *mut u64, words) };
    for (i, word) in memory.iter_mut().enumerate() {
        *word = fill_word(range.start + i as u64 * 8);
    }
}

/// What `scatter` must report over the filled range.
fn expected_sum(range: WorkRange, arg: u64) -> u64 {
    let (start, stride, count) = guests::scatter_pages(range.start, range.pages, arg);
    (0..count).fold(0u64, |sum, i| {
        sum.wrapping_add(fill_word(start + i * stride))
    })
}

fn scatter_options(mem: u64, ws_pages: u64) -> MicroOptions {
    let guest = guests::find("scatter").expect("scatter is built in");
    MicroOptions {
        mem,
        arg: Some(ws_pages),
        console: ConsoleSink::default(),
        ..MicroOptions::new(guest)
    }
}

/// Builds the snapshot of a filled, not yet started `scatter` guest.
fn make_snapshot(dir: &Path, mem: u64, ws_pages: u64) -> anyhow::Result<u64> {
    let mut vm = MicroVm::new(&scatter_options(mem, ws_pages))?;
    fill(&vm);
    vm.write_snapshot(dir)?;
    Ok(expected_sum(vm.range, vm.arg))
}

struct Sample {
    to_running: Duration,
    done: Duration,
    timings: RestoreTimings,
    faults: u64,
}

fn check(report: &MicroReport, expected: u64) -> anyhow::Result<()> {
    report.check()?;
    let sum = report
        .summed_report(0)
        .context("scatter reported nothing")?;
    if sum != expected {
        bail!("scatter read {sum:#x}, expected {expected:#x}: restored memory is wrong");
    }
    Ok(())
}

fn restore_once(
    dir: &Path,
    mode: RestoreMode,
    record: bool,
    expected: u64,
) -> anyhow::Result<Sample> {
    let options = RestoreOptions {
        dir: dir.into(),
        mode,
        console: ConsoleSink::default(),
        pager: PagerConfig {
            record_faults: record,
            ..PagerConfig::default()
        },
        track_dirty: false,
    };
    let mut restored = restore(&options)?;
    let run = restored
        .guest_run()
        .context("the snapshot holds no guest")?;
    let report = run.run(&mut restored.vm, restored.pager.as_ref())?;
    check(&report, expected)?;
    if record {
        restored.write_working_set(dir)?;
    }
    if let Some(prefetch) = restored.prefetch.take() {
        let _ = prefetch.join();
    }
    Ok(Sample {
        to_running: report
            .to_first_instruction
            .context("the guest never started")?,
        done: report.to_completion.context("no completion time")?,
        timings: restored.timings.clone(),
        faults: report.pager.as_ref().map_or(0, |p| p.faults_vcpu),
    })
}

fn resident_once(mem: u64, ws_pages: u64, expected: u64) -> anyhow::Result<Sample> {
    // RAM is created and filled before the clock starts: "memory already in place".
    let mut vm = MicroVm::new(&scatter_options(mem, ws_pages))?;
    fill(&vm);
    let since = Instant::now();
    let run = GuestRun {
        guest: vm.guest,
        range: vm.range,
        arg: vm.arg,
        since,
    };
    let report = run.run(&mut vm.vm, None)?;
    check(&report, expected)?;
    Ok(Sample {
        to_running: report
            .to_first_instruction
            .context("the guest never started")?,
        done: report.to_completion.context("no completion time")?,
        timings: RestoreTimings::default(),
        faults: 0,
    })
}

fn median_of(samples: &[Sample], phase: impl Fn(&RestoreTimings) -> f64) -> f64 {
    let durations: Vec<Duration> = samples
        .iter()
        .map(|s| Duration::from_secs_f64(phase(&s.timings) / 1e3))
        .collect();
    median_ms(&durations)
}

fn median_faults(samples: &[Sample]) -> u64 {
    let mut faults: Vec<u64> = samples.iter().map(|s| s.faults).collect();
    faults.sort_unstable();
    faults.get(faults.len() / 2).copied().unwrap_or(0)
}

/// Runs the benchmark.
pub fn run(
    options: &RestoreBenchOptions,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<RestoreBench> {
    if !options.mems.contains(&options.workload_mem) {
        bail!("the workload RAM size must be one of the measured sizes");
    }
    let ws_pages = options.working_set / vmm::PAGE_SIZE;
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("cannot create {}", options.dir.display()))?;
    let mut restore_rows = Vec::new();
    let mut workload = Vec::new();
    let mut by_mode = std::collections::HashMap::new();
    let mut lazy_to_running = Vec::new();
    for &mem in &options.mems {
        let dir = options.dir.join(format!("scatter-{}m", mem >> 20));
        progress(&format!("restore: snapshot of {} MiB", mem >> 20));
        let expected = make_snapshot(&dir, mem, ws_pages)?;
        progress(&format!(
            "restore: {} MiB, recording the working set",
            mem >> 20
        ));
        restore_once(&dir, RestoreMode::Lazy, true, expected)?;
        for mode in [RestoreMode::Eager, RestoreMode::Lazy, RestoreMode::Prefetch] {
            let mut samples = Vec::new();
            for i in 0..options.runs {
                progress(&format!(
                    "restore: {} MiB, {mode:?}, run {}/{}",
                    mem >> 20,
                    i + 1,
                    options.runs
                ));
                samples.push(restore_once(&dir, mode, false, expected)?);
            }
            let to_running = median_ms(&samples.iter().map(|s| s.to_running).collect::<Vec<_>>());
            if mode == RestoreMode::Lazy {
                lazy_to_running.push(to_running);
            }
            restore_rows.push(RestoreRow {
                mem_mib: mem >> 20,
                mode,
                to_running_ms: to_running,
                state_ms: median_of(&samples, |t| t.state_ms),
                memory_ms: median_of(&samples, |t| t.memory_ms),
                vm_ms: median_of(&samples, |t| t.vm_ms),
                ready_ms: median_of(&samples, |t| t.ready_ms),
            });
            if mem == options.workload_mem {
                let name = match mode {
                    RestoreMode::Eager => "eager",
                    RestoreMode::Lazy => "lazy",
                    RestoreMode::Prefetch => "prefetch",
                };
                let ms = median_ms(&samples.iter().map(|s| s.done).collect::<Vec<_>>());
                by_mode.insert(name, ms);
                workload.push(WorkloadRow {
                    mode: name,
                    ms,
                    faults: median_faults(&samples),
                    to_running_ms: to_running,
                });
            }
        }
        if mem == options.workload_mem {
            let mut samples = Vec::new();
            for i in 0..options.runs {
                progress(&format!(
                    "restore: {} MiB, resident baseline, run {}/{}",
                    mem >> 20,
                    i + 1,
                    options.runs
                ));
                samples.push(resident_once(mem, ws_pages, expected)?);
            }
            let ms = median_ms(&samples.iter().map(|s| s.done).collect::<Vec<_>>());
            by_mode.insert("resident", ms);
            workload.push(WorkloadRow {
                mode: "resident",
                ms,
                faults: 0,
                to_running_ms: median_ms(&samples.iter().map(|s| s.to_running).collect::<Vec<_>>()),
            });
        }
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let _ = std::fs::remove_dir(&options.dir);
    let get = |mode: &str| by_mode.get(mode).copied().unwrap_or(f64::NAN);
    Ok(RestoreBench {
        bench: "restore",
        baseline: "resident: the same guest over RAM already in place (VM creation included)",
        runs: options.runs,
        working_set_mib: options.working_set >> 20,
        working_set_pages: ws_pages,
        restore: restore_rows,
        workload,
        ratios: RestoreRatios {
            lazy_largest_over_smallest: ratio(
                lazy_to_running.last().copied().unwrap_or(f64::NAN),
                lazy_to_running.first().copied().unwrap_or(f64::NAN),
            ),
            workload_lazy_over_prefetch: ratio(get("lazy"), get("prefetch")),
            workload_prefetch_over_resident: ratio(get("prefetch"), get("resident")),
            workload_eager_over_resident: ratio(get("eager"), get("resident")),
        },
    })
}
