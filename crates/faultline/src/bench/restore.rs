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

use super::slowfs::SlowFs;
use super::{fc_file, interrupt};
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
    /// Slow sources to measure the workload over: a delay per read of the snapshot's memory.
    pub latencies: Vec<Duration>,
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
    /// eager, lazy, prefetch; fc-file (the peer: Firecracker's MAP_PRIVATE file restore);
    /// resident (the baseline).
    pub mode: &'static str,
    /// The snapshot files' page cache before each run: "warm" (just written or read) or
    /// "cold" (dropped); none for the resident baseline.
    pub cache: Option<&'static str>,
    /// Delay added to every read of the snapshot's memory (0: a local file).
    pub source_latency_us: u64,
    /// Restore start (resident: VM creation) to the guest's exit, median.
    pub ms: f64,
    /// Page faults: served by the pager for the guest (faultline modes), or taken by the
    /// process (the peer, whose faults are the kernel's); median run.
    pub faults: u64,
    pub to_running_ms: f64,
}

/// The ratios the targets are about.
#[derive(Debug, Serialize)]
pub struct RestoreRatios {
    /// Lazy restore-to-running, largest RAM over smallest (target: at most 1.5).
    pub lazy_largest_over_smallest: f64,
    /// Warm local image: faultline's default mode (no working set) over the peer (target: at
    /// most 1.0).
    pub warm_default_over_fc_file: f64,
    /// Warm local image: prefetch (a recorded working set) over resident (target: at most 1.1).
    pub warm_prefetch_over_resident: f64,
    /// Cold cache: the default mode over the peer.
    pub cold_default_over_fc_file: f64,
    /// The slowest source measured: the default mode over the peer through the same delay
    /// (target at 1 ms: at most 0.5).
    pub slow_default_over_fc_file: f64,
    /// The slowest source measured: prefetch over the peer.
    pub slow_prefetch_over_fc_file: f64,
    /// Warm: lazy over prefetch, and eager over resident.
    pub warm_lazy_over_prefetch: f64,
    pub warm_eager_over_resident: f64,
}

/// The whole benchmark's output.
#[derive(Debug, Serialize)]
pub struct RestoreBench {
    pub bench: &'static str,
    pub baseline: &'static str,
    pub peer: &'static str,
    /// The restore mode faultline uses when none is given.
    pub default_mode: RestoreMode,
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

/// A run's figures from its report: the guest must have started and finished.
fn sample(report: &MicroReport, timings: RestoreTimings, faults: u64) -> anyhow::Result<Sample> {
    Ok(Sample {
        to_running: report
            .to_first_instruction
            .context("the guest never started")?,
        done: report.to_completion.context("no completion time")?,
        timings,
        faults,
    })
}

/// Where a workload run's snapshot is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The local files, their page cache left as it is.
    Warm,
    /// The local files, their page cache dropped before the run.
    Cold,
    /// Behind this delay per read.
    Slow(Duration),
}

impl Source {
    fn cache(self) -> &'static str {
        match self {
            Source::Warm | Source::Slow(_) => "warm",
            Source::Cold => "cold",
        }
    }

    fn latency(self) -> Duration {
        match self {
            Source::Slow(delay) => delay,
            Source::Warm | Source::Cold => Duration::ZERO,
        }
    }

    /// Sets the page cache up. A slow source leaves the local files' cache as it is (warm:
    /// its rows run before the cold ones); its delay stands for the remote store's whole
    /// cost.
    fn prepare(self, dir: &Path) -> anyhow::Result<()> {
        match self {
            Source::Warm | Source::Slow(_) => Ok(()),
            Source::Cold => fc_file::drop_cache(dir),
        }
    }
}

fn restore_once(
    dir: &Path,
    mode: RestoreMode,
    source: Source,
    record: bool,
    expected: u64,
) -> anyhow::Result<Sample> {
    let options = RestoreOptions {
        pager: PagerConfig {
            record_faults: record,
            ..PagerConfig::default()
        },
        source_latency: source.latency(),
        ..RestoreOptions::new(dir, mode)
    };
    source.prepare(dir)?;
    let mut restored = restore(&options)?;
    let run = restored
        .guest_run()
        .context("the snapshot holds no guest")?;
    let report = run.run(&mut restored.vm, restored.pager.as_ref())?;
    check(&report, expected)?;
    if record {
        restored.write_working_set(dir)?;
    }
    let faults = report.pager.as_ref().map_or(0, |p| p.faults_vcpu);
    sample(&report, restored.timings.clone(), faults)
}

/// The peer: the snapshot restored with its memory file mapped privately as guest RAM. Over a
/// slow source, the file is served by a FUSE file system that delays every read.
fn fc_file_once(dir: &Path, source: Source, expected: u64) -> anyhow::Result<Sample> {
    source.prepare(dir)?;
    let image = dir.join(snapshot::MEMORY_FILE);
    let slow = match source {
        Source::Slow(delay) => {
            let mountpoint = dir.join("slowfs");
            std::fs::create_dir_all(&mountpoint)
                .with_context(|| format!("cannot create {}", mountpoint.display()))?;
            let backing = std::fs::File::open(&image)
                .with_context(|| format!("cannot open {}", image.display()))?;
            Some(SlowFs::mount(
                &mountpoint,
                snapshot::MEMORY_FILE,
                backing,
                delay,
                SLOWFS_THREADS,
            )?)
        }
        Source::Warm | Source::Cold => None,
    };
    let image = slow.as_ref().map_or(image, SlowFs::file_path);
    let faults_before = fc_file::process_faults();
    let since = Instant::now();
    let state = snapshot::state::read(dir)?;
    let mut vm = fc_file::restore_mapped(&state, &image)
        .with_context(|| format!("cannot restore {} mapped", dir.display()))?;
    let run = state
        .guest
        .as_ref()
        .and_then(|info| GuestRun::from_info(info, since))
        .context("the snapshot holds no guest faultline knows")?;
    let report = run.run(&mut vm, None)?;
    let faults = fc_file::process_faults() - faults_before;
    check(&report, expected)?;
    // The VM (its mapping of the file) goes before the file system serving it.
    drop(vm);
    drop(slow);
    sample(&report, RestoreTimings::default(), faults)
}

fn resident_once(mem: u64, ws_pages: u64, expected: u64) -> anyhow::Result<Sample> {
    // RAM is created and filled before the clock starts: "memory already in place".
    let mut vm = MicroVm::new(&scatter_options(mem, ws_pages))?;
    fill(&vm);
    let run = vm.guest_run(Instant::now());
    let report = run.run(&mut vm.vm, None)?;
    check(&report, expected)?;
    sample(&report, RestoreTimings::default(), 0)
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

/// A workload mode: a faultline restore mode, the peer, or the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Faultline(RestoreMode),
    FcFile,
    Resident,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Faultline(mode) => mode.name(),
            Contender::FcFile => "fc-file",
            Contender::Resident => "resident",
        }
    }
}

/// The workload rows of one snapshot.
struct Workload<'a> {
    dir: &'a Path,
    mem: u64,
    ws_pages: u64,
    expected: u64,
    runs: usize,
    rows: Vec<WorkloadRow>,
}

impl Workload<'_> {
    fn measure(
        &mut self,
        contender: Contender,
        source: Source,
        progress: &mut impl FnMut(&str),
    ) -> anyhow::Result<Vec<Sample>> {
        let mut samples = Vec::new();
        for i in 0..self.runs {
            interrupt::check()?;
            progress(&format!(
                "restore: workload, {}, {source:?}, run {}/{}",
                contender.name(),
                i + 1,
                self.runs
            ));
            samples.push(match contender {
                Contender::Faultline(mode) => {
                    restore_once(self.dir, mode, source, false, self.expected)?
                }
                Contender::FcFile => fc_file_once(self.dir, source, self.expected)?,
                Contender::Resident => resident_once(self.mem, self.ws_pages, self.expected)?,
            });
        }
        self.rows.push(WorkloadRow {
            mode: contender.name(),
            cache: (contender != Contender::Resident).then(|| source.cache()),
            source_latency_us: source.latency().as_micros() as u64,
            ms: median_ms(&samples.iter().map(|s| s.done).collect::<Vec<_>>()),
            faults: median_faults(&samples),
            to_running_ms: median_ms(&samples.iter().map(|s| s.to_running).collect::<Vec<_>>()),
        });
        Ok(samples)
    }

    /// The median time of a measured row.
    fn ms(&self, contender: Contender, source: Source) -> f64 {
        self.rows
            .iter()
            .find(|row| {
                row.mode == contender.name()
                    && row.source_latency_us == source.latency().as_micros() as u64
                    && (contender == Contender::Resident || row.cache == Some(source.cache()))
            })
            .map_or(f64::NAN, |row| row.ms)
    }
}

/// The benchmark's snapshot directories are named this, then the RAM size.
const SNAPSHOT_PREFIX: &str = "scatter-";

/// Removes the benchmark's snapshot directories from its directory, and the directory itself
/// if that leaves it empty (it may be the user's own).
struct Cleanup<'a>(&'a Path);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.0) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(SNAPSHOT_PREFIX)
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(self.0);
    }
}

/// Threads serving the peer's slow file system: a few reads in flight, as a remote store
/// would allow.
const SLOWFS_THREADS: usize = 4;

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
    // Whatever ends the benchmark (an error, an interruption), its snapshots go.
    let _cleanup = Cleanup(&options.dir);
    let default = RestoreMode::default();
    let mut restore_rows = Vec::new();
    let mut lazy_to_running = Vec::new();
    let mut workload = None;
    for &mem in &options.mems {
        let dir = options.dir.join(format!("{SNAPSHOT_PREFIX}{}m", mem >> 20));
        progress(&format!("restore: snapshot of {} MiB", mem >> 20));
        let expected = make_snapshot(&dir, mem, ws_pages)?;
        progress(&format!(
            "restore: {} MiB, recording the working set",
            mem >> 20
        ));
        restore_once(&dir, RestoreMode::Lazy, Source::Warm, true, expected)?;
        for mode in RestoreMode::ALL {
            let mut samples = Vec::new();
            for i in 0..options.runs {
                interrupt::check()?;
                progress(&format!(
                    "restore: {} MiB, {mode:?}, run {}/{}",
                    mem >> 20,
                    i + 1,
                    options.runs
                ));
                samples.push(restore_once(&dir, mode, Source::Warm, false, expected)?);
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
        }
        if mem == options.workload_mem {
            let mut table = Workload {
                dir: &dir,
                mem,
                ws_pages,
                expected,
                runs: options.runs,
                rows: Vec::new(),
            };
            // Warm rows, then the slow sources (over a warm local cache: the delay stands for
            // the remote store's whole cost), then the cold rows, which drop the cache.
            for mode in RestoreMode::ALL {
                table.measure(Contender::Faultline(mode), Source::Warm, &mut progress)?;
            }
            table.measure(Contender::FcFile, Source::Warm, &mut progress)?;
            table.measure(Contender::Resident, Source::Warm, &mut progress)?;
            for &delay in &options.latencies {
                let source = Source::Slow(delay);
                // Eager restores read the image whole, not page by page: not measured here.
                for mode in [RestoreMode::Lazy, RestoreMode::Prefetch] {
                    table.measure(Contender::Faultline(mode), source, &mut progress)?;
                }
                table.measure(Contender::FcFile, source, &mut progress)?;
            }
            for mode in RestoreMode::ALL {
                table.measure(Contender::Faultline(mode), Source::Cold, &mut progress)?;
            }
            table.measure(Contender::FcFile, Source::Cold, &mut progress)?;
            let ms = |contender, source| table.ms(contender, source);
            // No slow source measured: the slow ratios are NaN (`null` in the JSON).
            let slowest = options.latencies.iter().max().map(|&d| Source::Slow(d));
            let slow_ms = |contender| slowest.map_or(f64::NAN, |source| ms(contender, source));
            let fl = Contender::Faultline;
            let ratios = RestoreRatios {
                lazy_largest_over_smallest: f64::NAN,
                warm_default_over_fc_file: ratio(
                    ms(fl(default), Source::Warm),
                    ms(Contender::FcFile, Source::Warm),
                ),
                warm_prefetch_over_resident: ratio(
                    ms(fl(RestoreMode::Prefetch), Source::Warm),
                    ms(Contender::Resident, Source::Warm),
                ),
                cold_default_over_fc_file: ratio(
                    ms(fl(default), Source::Cold),
                    ms(Contender::FcFile, Source::Cold),
                ),
                slow_default_over_fc_file: ratio(slow_ms(fl(default)), slow_ms(Contender::FcFile)),
                slow_prefetch_over_fc_file: ratio(
                    slow_ms(fl(RestoreMode::Prefetch)),
                    slow_ms(Contender::FcFile),
                ),
                warm_lazy_over_prefetch: ratio(
                    ms(fl(RestoreMode::Lazy), Source::Warm),
                    ms(fl(RestoreMode::Prefetch), Source::Warm),
                ),
                warm_eager_over_resident: ratio(
                    ms(fl(RestoreMode::Eager), Source::Warm),
                    ms(Contender::Resident, Source::Warm),
                ),
            };
            workload = Some((table.rows, ratios));
        }
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
        interrupt::check()?;
    }
    let (workload, mut ratios) = workload.context("the workload RAM size was not measured")?;
    ratios.lazy_largest_over_smallest = ratio(
        lazy_to_running.last().copied().unwrap_or(f64::NAN),
        lazy_to_running.first().copied().unwrap_or(f64::NAN),
    );
    Ok(RestoreBench {
        bench: "restore",
        baseline: "resident: the same guest over RAM already in place (VM creation included)",
        peer: "fc-file: Firecracker's default restore, guest RAM mapped MAP_PRIVATE from the memory file (over a slow source: the file served by a FUSE file system that delays every read)",
        default_mode: default,
        runs: options.runs,
        working_set_mib: options.working_set >> 20,
        working_set_pages: ws_pages,
        restore: restore_rows,
        workload,
        ratios,
    })
}
