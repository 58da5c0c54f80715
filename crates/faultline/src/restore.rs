//! Bringing a snapshot back: eagerly (all memory read before the guest runs), lazily (the
//! pager serves the snapshot's pages on first touch), or lazily with the recorded working set
//! installed alongside (REAP's idea: the pages the guest will want, read in one go, installed
//! in the order the guest wanted them, while it runs).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pager::{FailurePolicy, PageSource, Pager, PagerConfig, PagerError, PagerHandle};
use serde::Serialize;
use snapshot::state::{self, SnapshotState};
use snapshot::{MemorySpanMut, SnapshotMemory, WorkingSet, PAGE_SIZE};
use vmm::devices::ConsoleSink;
use vmm::{GuestRam, Vm, VmConfig};

use crate::lazy::{start_pager, LazySpec, PagerLink, RamState, RecencyFeed};
use crate::micro::GuestRun;

/// How guest memory comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Read the whole image into RAM, then resume.
    Eager,
    /// Resume at once; the pager serves each page on first touch.
    Lazy,
    /// Install the recorded working set, resume, and serve the rest lazily.
    Prefetch,
}

impl RestoreMode {
    /// Every mode, in the order benchmarks list them.
    pub const ALL: [RestoreMode; 3] =
        [RestoreMode::Eager, RestoreMode::Lazy, RestoreMode::Prefetch];

    /// The mode's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            RestoreMode::Eager => "eager",
            RestoreMode::Lazy => "lazy",
            RestoreMode::Prefetch => "prefetch",
        }
    }
}

/// The mode a restore uses when none is given: the fastest for a user who has recorded
/// nothing (see `faultline bench restore`).
impl Default for RestoreMode {
    fn default() -> Self {
        RestoreMode::Lazy
    }
}

impl std::fmt::Display for RestoreMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RestoreMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "eager" => Ok(RestoreMode::Eager),
            "lazy" => Ok(RestoreMode::Lazy),
            "prefetch" => Ok(RestoreMode::Prefetch),
            _ => Err(format!(
                "{text:?} is not a restore mode: use eager, lazy or prefetch"
            )),
        }
    }
}

/// What to restore, and how.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    pub mode: RestoreMode,
    pub console: ConsoleSink,
    /// The pager's knobs (lazy and prefetch).
    pub pager: PagerConfig,
    /// Keep logging dirty pages even if the snapshot's VM did not.
    pub track_dirty: bool,
    /// Log them through a dirty ring of this many entries per vCPU (implies `track_dirty`).
    pub dirty_ring: Option<u32>,
    /// Track the pages the snapshot's VM tracked, with as many users each.
    pub keep_tracking: bool,
    /// Added to every read of the snapshot's memory by the pager and of its working set (lazy
    /// and prefetch modes): a stand-in for a snapshot store on the network. Zero: none.
    pub source_latency: Duration,
}

impl RestoreOptions {
    /// Restores `dir` in `mode`: the pager's defaults, no console, no added latency, dirty
    /// logging as the snapshot's VM had it.
    pub fn new(dir: impl Into<PathBuf>, mode: RestoreMode) -> Self {
        RestoreOptions {
            dir: dir.into(),
            mode,
            console: ConsoleSink::default(),
            pager: PagerConfig::default(),
            track_dirty: false,
            dirty_ring: None,
            keep_tracking: false,
            source_latency: Duration::ZERO,
        }
    }
}

/// Where a restore's time went, in milliseconds from its start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreTimings {
    /// State file(s) read and checked, memory layers opened.
    pub state_ms: f64,
    /// Memory in place (eager: all of it; lazy and prefetch: nothing yet).
    pub memory_ms: f64,
    /// VM built and its state restored.
    pub vm_ms: f64,
    /// Pager started (lazy modes): ready to run.
    pub ready_ms: f64,
    /// Pages loaded before the guest resumed (eager).
    pub pages_loaded: u64,
}

/// A restored VM, ready to run. Dropping it stops the pager and joins the working-set
/// installer before the VM and its RAM go.
pub struct RestoredVm {
    pub vm: Vm,
    /// The working-set installer (prefetch mode), running.
    pub prefetch: Option<JoinHandle<u64>>,
    pub pager: Option<Pager>,
    pub state: SnapshotState,
    pub memory: Arc<SnapshotMemory>,
    /// The snapshot and the parents it is layered on, newest first.
    pub chain: Vec<PathBuf>,
    pub mode: RestoreMode,
    pub started: Instant,
    pub timings: RestoreTimings,
    /// Feeds the guest's writes to a resident limit's eviction.
    recency: Option<RecencyFeed>,
}

impl Drop for RestoredVm {
    fn drop(&mut self) {
        drop(self.recency.take());
        // The pager first: once it stops, the installer's next install returns at once.
        if let Some(pager) = self.pager.take() {
            pager.shutdown();
        }
        if let Some(prefetch) = self.prefetch.take() {
            let _ = prefetch.join();
        }
    }
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Pages of the working set read (and checked) at once while streaming it: 1 MiB.
const PREFETCH_BATCH: usize = 256;

/// Where each RAM region starts among the image's pages: `(first page, pages)`.
fn region_bounds(ram: &GuestRam) -> Vec<(u64, u64)> {
    let mut bounds = Vec::new();
    let mut base = 0u64;
    for region in ram.regions() {
        let pages = region.size() / PAGE_SIZE;
        bounds.push((base, pages));
        base += pages;
    }
    bounds
}

/// Installs the working-set entries `pages` (image page indices) whose contents are
/// `contents`, back to back, run by run through the pager. Returns the pages installed, or
/// `None` once the pager has stopped.
fn install_entries(
    pager: &PagerHandle,
    bounds: &[(u64, u64)],
    pages: &[u64],
    contents: &[u8],
) -> Option<u64> {
    let mut installed = 0;
    for (first, index, count) in snapshot::working_set::runs(pages) {
        let Some(region) = bounds
            .iter()
            .position(|&(b, n)| first >= b && first + count as u64 <= b + n)
        else {
            tracing::warn!("prefetch: pages {first}+{count} are not in one RAM region");
            continue;
        };
        let data = &contents[index * PAGE_SIZE as usize..(index + count) * PAGE_SIZE as usize];
        match pager.install_pages(region, (first - bounds[region].0) as usize, data) {
            Ok(n) => installed += n as u64,
            Err(PagerError::Stopped) => return None,
            Err(e) => tracing::warn!("prefetch: {e}"),
        }
    }
    Some(installed)
}

/// Reads the working set in `dir` and installs it through the pager, in recorded order, on
/// its own thread while the guest runs: pages the guest reaches first are installed by its
/// faults, the rest arrive before it asks. The set is streamed (1 MiB at a time, each page
/// checked against the snapshot's checksum of it) so that installs start at once; a snapshot
/// whose checksums cover more than a page has its set read and checked whole first. A set
/// that cannot be read is reported and the rest skipped: every page is still served lazily
/// from the snapshot. Each read of the set waits `latency` first, as a read of the snapshot's
/// memory does (`--source-latency`). Returns the thread, which yields the pages it installed.
fn start_prefetch(
    pager: PagerHandle,
    ram: &GuestRam,
    memory: Arc<SnapshotMemory>,
    dir: PathBuf,
    latency: Duration,
) -> std::io::Result<JoinHandle<u64>> {
    let bounds = region_bounds(ram);
    std::thread::Builder::new()
        .name("prefetch".into())
        .spawn(move || {
            let began = Instant::now();
            let unusable = |e: snapshot::SnapshotError| {
                tracing::error!(
                    "prefetch: the working set is unusable, serving the rest lazily: {e}"
                );
            };
            let mut installed = 0u64;
            let total;
            if memory.pages_checkable() {
                let set = match snapshot::WorkingSetStream::open(&dir, &memory) {
                    Ok(set) => set,
                    Err(e) => {
                        unusable(e);
                        return 0;
                    }
                };
                total = set.pages().len();
                let mut buf = Vec::new();
                for i in (0..total).step_by(PREFETCH_BATCH) {
                    let count = PREFETCH_BATCH.min(total - i);
                    std::thread::sleep(latency);
                    if let Err(e) = set.read(i, count, &mut buf, &memory) {
                        unusable(e);
                        break;
                    }
                    let pages = &set.pages()[i..i + count];
                    match install_entries(&pager, &bounds, pages, &buf) {
                        Some(n) => installed += n,
                        None => break,
                    }
                }
            } else {
                std::thread::sleep(latency);
                let set = match WorkingSet::read(&dir, memory.size() / PAGE_SIZE) {
                    Ok(set) => set,
                    Err(e) => {
                        unusable(e);
                        return 0;
                    }
                };
                total = set.len();
                installed =
                    install_entries(&pager, &bounds, &set.pages, set.contents()).unwrap_or(0);
            }
            tracing::info!(
                "prefetch: {installed} of {total} pages installed in {:.2} ms",
                ms_since(began)
            );
            installed
        })
}

/// Fresh guest RAM for the snapshot state `state`, laid out as the state says (a layout this
/// faultline would not build is refused).
pub fn ram_for_state(state: &SnapshotState) -> anyhow::Result<GuestRam> {
    let ram = GuestRam::new(state.ram_size()).context("cannot create guest RAM")?;
    check_layout(state, &ram)?;
    Ok(ram)
}

/// Whether `ram` is laid out as the snapshot state `state` says.
pub fn check_layout(state: &SnapshotState, ram: &GuestRam) -> anyhow::Result<()> {
    let layout: Vec<(u64, u64)> = ram.regions().iter().map(|r| (r.gpa(), r.size())).collect();
    let saved: Vec<(u64, u64)> = state.layout.iter().map(|r| (r.gpa, r.size)).collect();
    if layout != saved {
        bail!(
            "the snapshot's RAM layout {saved:x?} is not what this faultline builds ({layout:x?})"
        );
    }
    Ok(())
}

/// Builds the VM a snapshot state describes over `ram` (which holds, or will be served, the
/// snapshot's memory): `config` with the state's vCPU count, then the saved vCPU, VM and
/// device state. The one path from saved state to a VM, for restores and their peers.
pub fn vm_from_state(state: &SnapshotState, ram: GuestRam, config: VmConfig) -> anyhow::Result<Vm> {
    let mut vm = vm_for(state.machine.vcpus.len() as u8, ram, config)?;
    state_into(&mut vm, state)?;
    Ok(vm)
}

/// The first half of [`vm_from_state`], for a VM built before its state is known (a
/// migration destination builds it while the pages come, not in the downtime): a VM of
/// `vcpus` vCPUs over `ram`, not run.
pub fn vm_for(vcpus: u8, ram: GuestRam, config: VmConfig) -> anyhow::Result<Vm> {
    let config = VmConfig { vcpus, ..config };
    Vm::new(&config, ram).context("cannot create the VM")
}

/// The second half: the saved vCPU, VM and device state into `vm`, built by [`vm_for`] and
/// never run, whose vCPU count and RAM must be the state's.
pub fn state_into(vm: &mut Vm, state: &SnapshotState) -> anyhow::Result<()> {
    let vcpus = usize::from(vm.handle().vcpu_count());
    if state.machine.vcpus.len() != vcpus {
        bail!(
            "the state has {} vCPUs, the VM built for it {vcpus}",
            state.machine.vcpus.len()
        );
    }
    check_layout(state, vm.ram())?;
    vm.restore_state(&state.machine)
        .context("cannot restore the VM's state")
}

/// Restores the snapshot in `options.dir` into a new VM. Nothing runs yet; the caller runs it.
pub fn restore(options: &RestoreOptions) -> anyhow::Result<RestoredVm> {
    let started = Instant::now();
    let mut timings = RestoreTimings::default();
    if options.mode == RestoreMode::Eager && !options.source_latency.is_zero() {
        bail!(
            "a source latency applies to the pager's reads: use it with --memory lazy or prefetch"
        );
    }
    let state = state::read(&options.dir)
        .with_context(|| format!("cannot restore {}", options.dir.display()))?;
    let chain = state::chain(&options.dir, &state)
        .with_context(|| format!("cannot restore {}", options.dir.display()))?;
    let memory = Arc::new(
        SnapshotMemory::open(&chain)
            .with_context(|| format!("cannot open the memory of {}", options.dir.display()))?,
    );
    if memory.size() != state.ram_size() {
        bail!(
            "cannot restore {}: its memory image holds {} bytes but its state describes {} \
             bytes of RAM",
            options.dir.display(),
            memory.size(),
            state.ram_size()
        );
    }
    // The working set is read and checked on the prefetch thread, while the VM is built and
    // runs; here only its presence is checked, so that a missing one is a clear error.
    let working_set = match options.mode {
        RestoreMode::Prefetch => {
            let path = options.dir.join(snapshot::WORKING_SET_FILE);
            if !path.is_file() {
                bail!(
                    "{} has no working set (record one with `faultline restore --memory lazy --record-ws`)",
                    options.dir.display()
                );
            }
            Some(options.dir.clone())
        }
        _ => None,
    };
    timings.state_ms = ms_since(started);

    let ram = ram_for_state(&state)?;
    match options.mode {
        RestoreMode::Eager => {
            let spans: Vec<MemorySpanMut> = ram
                .regions()
                .iter()
                // SAFETY: fresh, writable mappings owned by `ram`, which outlives the call;
                // nothing else uses them yet.
                .map(|r| unsafe { MemorySpanMut::new(r.host_addr() as *mut u8, r.size()) })
                .collect();
            let loaded = memory
                .load_into(&spans, &mut |_, _| {})
                .context("cannot load the snapshot's memory")?;
            timings.pages_loaded = loaded.bytes_copied / PAGE_SIZE;
        }
        RestoreMode::Lazy | RestoreMode::Prefetch => {}
    }
    timings.memory_ms = ms_since(started);

    let link = PagerLink::default();
    let lazy = options.mode != RestoreMode::Eager;
    // Swap puts an eager restore's RAM behind the pager too, once it is loaded.
    let paged = lazy || options.pager.swap_file.is_some();
    let config = VmConfig {
        console: options.console.clone(),
        on_vcpu_thread: paged.then(|| link.vcpu_hook()),
        // A resident limit learns of the guest's writes from the dirty log.
        track_dirty: state.track_dirty
            || options.track_dirty
            || options.pager.resident_limit.is_some(),
        dirty_ring: options.dirty_ring,
        ..VmConfig::default()
    };
    let vm = vm_from_state(&state, ram, config)?;
    if options.keep_tracking {
        let memory = vm.handle().memory().clone();
        for range in &state.tracking {
            memory
                .track_users(range.gpa, range.len, range.mode, range.count)
                .with_context(|| {
                    format!(
                        "cannot track [{:#x}, +{:#x}) in {} mode again, as the snapshot says",
                        range.gpa, range.len, range.mode
                    )
                })?;
        }
    }
    timings.vm_ms = ms_since(started);
    let pager = if lazy {
        let source: Arc<dyn PageSource> = memory.clone();
        // Nothing has written guest RAM since it was created: no residency to probe.
        Some(start_pager(
            vm.ram(),
            RamState::Fresh,
            &LazySpec::Source(source),
            options.source_latency,
            options.pager.clone(),
            &link,
            vm.control(),
        )?)
    } else if paged {
        // Loaded RAM: its pages with data stay resident, its holes are zero.
        Some(start_pager(
            vm.ram(),
            RamState::Loaded,
            &LazySpec::Zero,
            Duration::ZERO,
            PagerConfig {
                failure_policy: FailurePolicy::Stop,
                ..options.pager.clone()
            },
            &link,
            vm.control(),
        )?)
    } else {
        None
    };
    let recency = match (&pager, options.pager.resident_limit) {
        (Some(pager), Some(_)) => Some(RecencyFeed::start(vm.handle(), pager.handle())?),
        _ => None,
    };
    let prefetch = match (&pager, working_set) {
        (Some(pager), Some(dir)) => Some(
            start_prefetch(
                pager.handle(),
                vm.ram(),
                Arc::clone(&memory),
                dir,
                options.source_latency,
            )
            .context("cannot start the prefetch thread")?,
        ),
        _ => None,
    };
    timings.ready_ms = ms_since(started);
    Ok(RestoredVm {
        prefetch,
        vm,
        pager,
        state,
        memory,
        chain,
        mode: options.mode,
        started,
        timings,
        recency,
    })
}

impl RestoredVm {
    /// The micro-guest run this snapshot continues, if it holds one faultline knows.
    pub fn guest_run(&self) -> Option<GuestRun> {
        GuestRun::from_info(self.state.guest.as_ref()?, self.started)
    }

    /// With a pager that recorded its faults: writes them, in order, as the snapshot's working
    /// set (contents taken from the snapshot, not from the guest's changed memory). Returns the
    /// number of pages.
    pub fn write_working_set(&self, dir: &Path) -> anyhow::Result<u64> {
        let pager = self
            .pager
            .as_ref()
            .context("recording a working set needs a lazy restore")?;
        let bounds = region_bounds(self.vm.ram());
        let pages: Vec<u64> = pager
            .fault_log()
            .into_iter()
            .map(|(region, page)| bounds[region].0 + page as u64)
            .collect();
        snapshot::working_set::write(dir, &pages, &self.memory)
            .with_context(|| format!("cannot write the working set into {}", dir.display()))
    }
}
