//! `faultline bench track`: what page tracking and the dirty log cost, each against its
//! baseline in the same run.
//! - A tracked write against an untracked one: the `dirty` guest rewriting the same pages pass
//!   after pass, with every page tracked in write mode, then with none tracked.
//! - Adding and removing tracking for 1, 64 and 4096 frames (memslots split and merged).
//! - Taking 1k, 16k and 256k dirty pages: the dirty ring (harvest and reset) against the bitmap
//!   (get and clear), after the `touch` guest wrote exactly that many pages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use vmm::boot::layout::BOOT_AREA_END;
use vmm::boot::micro::WorkRange;
use vmm::devices::ConsoleSink;
use vmm::{TrackEvent, TrackMode, TrackNotifier, PAGE_SIZE};

use super::{median_ms, ratio};
use crate::micro::{MicroOptions, MicroVm};

/// Pages the write case's guest rewrites, and how many times.
const WRITE_PAGES: u64 = 64;
const WRITE_PASSES: u64 = 300;
/// Frame counts of the add/remove case.
const CHANGE_FRAMES: [u64; 3] = [1, 64, 4096];
/// Dirty page counts of the harvest case.
const HARVEST_PAGES: [u64; 3] = [1024, 16384, 262144];
/// Ring entries per vCPU in the harvest case (KVM's largest), and the pages each vCPU may
/// write so that its ring never fills: on an instruction-emulating host every emulated store
/// takes an entry, page-table updates included.
const RING_ENTRIES: u32 = 65536;
const PAGES_PER_RING: u64 = 32768;

/// A tracked write against an untracked one.
#[derive(Debug, Serialize)]
pub struct WriteCase {
    pub pages: u64,
    pub writes: u64,
    pub untracked_ns_per_write: f64,
    pub tracked_ns_per_write: f64,
    /// Events the notifier received in the tracked runs (each run: `writes`).
    pub events_per_run: u64,
    /// tracked / untracked.
    pub ratio: f64,
}

/// Adding and removing tracking for a range of frames, on a VM that is not running and on one
/// whose vCPU runs (it is paused for the change).
#[derive(Debug, Serialize)]
pub struct ChangeCase {
    pub frames: u64,
    pub add_us: f64,
    pub remove_us: f64,
    pub running_add_us: f64,
    pub running_remove_us: f64,
    pub memslots_tracked: usize,
}

/// Taking the dirty pages after the guest wrote `pages` pages.
#[derive(Debug, Serialize)]
pub struct HarvestCase {
    pub pages: u64,
    pub vcpus: u8,
    pub bitmap_us: f64,
    pub ring_us: f64,
    /// Pages each take reported (at least `pages`: the guest's page tables are written too).
    pub bitmap_reported: u64,
    pub ring_reported: u64,
    /// ring / bitmap.
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct TrackBench {
    pub bench: &'static str,
    pub runs: usize,
    pub write: WriteCase,
    pub change: Vec<ChangeCase>,
    pub harvest: Vec<HarvestCase>,
}

/// Counts the events it is told of.
#[derive(Default)]
struct Counter(AtomicU64);

impl TrackNotifier for Counter {
    fn notify(&self, _: &TrackEvent) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn options(guest: &str, pages: u64, arg: u64, vcpus: u8) -> MicroOptions {
    let guest = guests::find(guest).expect("built in");
    MicroOptions {
        mem: BOOT_AREA_END + pages * PAGE_SIZE + (2 << 20),
        vcpus,
        arg: Some(arg),
        range: Some(WorkRange {
            start: BOOT_AREA_END,
            pages,
        }),
        console: ConsoleSink::default(),
        ..MicroOptions::new(guest)
    }
}

/// The guest's own time: from its first instruction to its last exit.
fn guest_time(vm: &mut MicroVm) -> anyhow::Result<Duration> {
    let report = vm.run()?;
    report.check()?;
    match (report.to_first_instruction, report.to_completion) {
        (Some(first), Some(done)) => Ok(done.saturating_sub(first)),
        _ => bail!("the guest did not report its start and end"),
    }
}

fn write_case(runs: usize, progress: &mut impl FnMut(&str)) -> anyhow::Result<WriteCase> {
    let writes = WRITE_PAGES * WRITE_PASSES;
    let (mut plain, mut tracked) = (Vec::new(), Vec::new());
    let mut events_per_run = 0;
    for run in 0..runs {
        progress(&format!("track: writes, run {}/{runs}", run + 1));
        let options = options("dirty", WRITE_PAGES, WRITE_PASSES, 1);
        plain.push(guest_time(&mut MicroVm::new(&options)?)?);
        let mut vm = MicroVm::new(&options)?;
        let counter = Arc::new(Counter::default());
        let memory = vm.vm.handle().memory().clone();
        memory.register(counter.clone());
        memory.track(BOOT_AREA_END, WRITE_PAGES * PAGE_SIZE, TrackMode::Write)?;
        tracked.push(guest_time(&mut vm)?);
        events_per_run = counter.0.load(Ordering::Relaxed);
        if events_per_run != writes {
            bail!("{events_per_run} tracked writes were reported, {writes} made");
        }
    }
    let per_write = |samples: &[Duration]| median_ms(samples) * 1e6 / writes as f64;
    let (untracked, tracked) = (per_write(&plain), per_write(&tracked));
    Ok(WriteCase {
        pages: WRITE_PAGES,
        writes,
        untracked_ns_per_write: untracked.round(),
        tracked_ns_per_write: tracked.round(),
        events_per_run,
        ratio: ratio(tracked, untracked),
    })
}

/// Median (µs) of adding then removing tracking of `frames` frames, `runs` times.
fn time_changes(
    memory: &vmm::MemoryMap,
    frames: u64,
    runs: usize,
) -> anyhow::Result<(f64, f64, usize)> {
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    let mut memslots = 0;
    for _ in 0..runs {
        let len = frames * PAGE_SIZE;
        let started = Instant::now();
        memory.track(BOOT_AREA_END, len, TrackMode::Write)?;
        add.push(started.elapsed());
        memslots = memory.memslot_count();
        let started = Instant::now();
        memory.untrack(BOOT_AREA_END, len, TrackMode::Write)?;
        remove.push(started.elapsed());
    }
    let us = |samples: &[Duration]| (median_ms(samples) * 1e3).round();
    Ok((us(&add), us(&remove), memslots))
}

fn change_cases(runs: usize, progress: &mut impl FnMut(&str)) -> anyhow::Result<Vec<ChangeCase>> {
    progress("track: adding and removing tracking");
    let runs = runs.max(5);
    let idle = MicroVm::new(&options("hello", 4096, 0, 1))?;
    // `dirty` rewriting its range forever: every change pauses it.
    let mut busy = MicroVm::new(&options("dirty", 4096, 0, 1))?;
    let handle = busy.vm.handle();
    let runner = std::thread::spawn(move || busy.run().map(|_| ()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while handle.control().started_at().is_none() && !runner.is_finished() {
        if Instant::now() > deadline {
            bail!("the running guest never started");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut cases = Vec::new();
    let mut measured = || -> anyhow::Result<()> {
        for frames in CHANGE_FRAMES {
            let (add_us, remove_us, memslots_tracked) =
                time_changes(idle.vm.handle().memory(), frames, runs)?;
            let (running_add_us, running_remove_us, _) =
                time_changes(handle.memory(), frames, runs)?;
            cases.push(ChangeCase {
                frames,
                add_us,
                remove_us,
                running_add_us,
                running_remove_us,
                memslots_tracked,
            });
        }
        Ok(())
    };
    let result = measured();
    handle
        .control()
        .request_stop(vmm::control::StopReason::Requested);
    let run = runner
        .join()
        .map_err(|_| anyhow::anyhow!("the running guest's thread panicked"))?;
    result?;
    // The guest was stopped, as asked; anything else is a failure.
    if let Err(e) = run {
        return Err(e.context("the running guest failed"));
    }
    Ok(cases)
}

/// Runs `touch` over `pages` pages with dirty logging (`ring`: the dirty ring, harvested only
/// by the take), then times the take.
fn take_after_touch(pages: u64, ring: bool) -> anyhow::Result<(Duration, u64, u8)> {
    let vcpus = pages.div_ceil(PAGES_PER_RING) as u8;
    let mut options = options("touch", pages, 7, vcpus);
    options.track_dirty = true;
    options.dirty_ring = ring.then_some(RING_ENTRIES);
    let mut vm = MicroVm::new(&options)?;
    let handle = vm.vm.handle();
    handle.memory().set_background_harvest(false);
    handle.take_dirty_pages()?; // what loading the guest did is not the guest's doing
    vm.run()?.check()?;
    let started = Instant::now();
    let dirty = handle.take_dirty_pages()?;
    let took = started.elapsed();
    let first = handle
        .ram()
        .page_index(BOOT_AREA_END)
        .context("work range in RAM")?;
    let missing = (first..first + pages)
        .filter(|&p| !dirty.contains(p))
        .count();
    if missing > 0 {
        bail!("{missing} written pages were not reported dirty");
    }
    Ok((took, dirty.count(), vcpus))
}

fn harvest_cases(runs: usize, progress: &mut impl FnMut(&str)) -> anyhow::Result<Vec<HarvestCase>> {
    let mut cases = Vec::new();
    for pages in HARVEST_PAGES {
        let (mut bitmap, mut ring) = (Vec::new(), Vec::new());
        let (mut bitmap_reported, mut ring_reported, mut vcpus) = (0, 0, 1);
        for run in 0..runs {
            progress(&format!(
                "track: harvest {pages} pages, run {}/{runs}",
                run + 1
            ));
            let (took, reported, _) = take_after_touch(pages, false)?;
            bitmap.push(took);
            bitmap_reported = reported;
            let (took, reported, used) = take_after_touch(pages, true)?;
            ring.push(took);
            ring_reported = reported;
            vcpus = used;
        }
        let (bitmap_us, ring_us) = (median_ms(&bitmap) * 1e3, median_ms(&ring) * 1e3);
        cases.push(HarvestCase {
            pages,
            vcpus,
            bitmap_us: bitmap_us.round(),
            ring_us: ring_us.round(),
            bitmap_reported,
            ring_reported,
            ratio: ratio(ring_us, bitmap_us),
        });
    }
    Ok(cases)
}

/// Runs every case `runs` times (medians reported).
pub fn run(runs: usize, mut progress: impl FnMut(&str)) -> anyhow::Result<TrackBench> {
    Ok(TrackBench {
        bench: "track",
        runs,
        write: write_case(runs, &mut progress)?,
        change: change_cases(runs, &mut progress)?,
        harvest: harvest_cases(runs, &mut progress)?,
    })
}
