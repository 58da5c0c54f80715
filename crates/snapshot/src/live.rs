//! A live snapshot: the VM is paused only to record its machine state and write-protect its
//! memory, then runs on while its pages are written in the background. A guest write to a page
//! not saved yet stops in the kernel; the pager's fault thread calls the [`Saver`], which saves
//! the page as it was, and the pager then lets the write through. The result is memory as it
//! was at the pause, with the vCPU, VM and device state of that same instant, in the regular
//! snapshot format (full or diff).
//!
//! Where each page of the snapshot comes from, decided while the VM is paused:
//! - a page in memory (resident, or installed by the pager) with data in its memfd: copied
//!   from RAM, before the guest's first write to it (write-protected until then);
//! - a page not in memory (still in a lazily restored VM's source, or swapped out): read
//!   through the pager from where it is, never faulted in (its instant contents are there,
//!   whatever the guest does later: no swap-out runs during a live snapshot, so no slot
//!   changes);
//! - a hole in the memfd, or a page the guest discarded: zero, nothing to write.
//!
//! A failure (a full file system, a write error, a page that cannot be read) ends the
//! protection at once (every page unprotected), so the VM runs on untouched; the snapshot's
//! staging directory is removed and the dirty log it took is given back.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pager::{AtomicBitmap, PageState, Pager, PagerBuilder, PagerConfig, PagerHandle, WriteGuard};
use serde::Serialize;
use vmm::{DirtyPages, GuestRam, MachineState, VmHandle};

use crate::create::{self, CreateOptions, CreateSummary, Staging, Watch};
use crate::memory::{LayerKind, PageImageWriter, PAGE_SIZE};
use crate::state::{self, MemoryKind, ParentRef};
use crate::SnapshotError;

/// Pages the writer reads at a time (256 KiB).
const STRIPE_PAGES: u64 = 64;
/// Protected runs closer than this many pages are protected as one (fewer ioctls in the
/// pause; a write to a page between them faults once and is let through).
const MERGE_GAP_PAGES: u64 = 512;
/// Pages read from a page source at a time.
const SOURCE_BATCH_PAGES: u64 = 256;

/// What a live snapshot cost the guest, and how long it took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LiveStats {
    /// Guest writes that hit a protected page.
    pub write_faults: u64,
    /// Pages a write fault saved ahead of the writer.
    pub pages_saved_by_faults: u64,
    /// How long those writes waited (from the fault being read to the page let go), µs.
    pub stall_p50_us: u64,
    pub stall_p99_us: u64,
    pub stall_max_us: u64,
    /// Pages read from where they were (a lazily restored VM's source, the swap file) rather
    /// than from RAM.
    pub pages_from_source: u64,
    /// From the pause to the snapshot being in place.
    pub total_ms: f64,
}

/// One RAM region as the live snapshot sees it.
struct PlanRegion {
    /// Index of this region's first page among all of RAM's pages.
    base: u64,
    pages: u64,
    pager_region: usize,
    memfd: Arc<File>,
}

/// Which pages have to be copied from RAM, and which have been.
///
/// No lock: whoever sets a page's `taken` bit (the writer, or a write fault's guard) writes
/// it to the image, once. The writer reads a page *before* it tries to take it, so a copy it
/// took holds the page as it was while still protected; a guard that finds a page taken
/// returns at once (the page is let go: the writer's copy is already in its buffer), and one
/// that takes it reads and writes it before returning. So a page is unprotected only after a
/// good copy exists, and a write fault never waits for the writer, whatever the scheduler
/// does to it.
struct Plan {
    regions: Vec<PlanRegion>,
    /// Pages to copy from RAM (write-protected until copied).
    pending: AtomicBitmap,
    /// Pages whose copy someone took.
    taken: AtomicBitmap,
    /// Pages to read through the pager from where they were at the pause (source, swap
    /// file), with that state.
    from_source: Vec<(u64, PageState)>,
}

impl Plan {
    /// The region holding RAM page `page`.
    fn region_of(&self, page: u64) -> &PlanRegion {
        self.regions
            .iter()
            .find(|r| page >= r.base && page < r.base + r.pages)
            .expect("the page is in RAM")
    }

    /// Reads RAM pages `[first, first + count)` (one region) from the memfd: a hole reads as
    /// zero, and nothing is faulted in.
    fn read_ram(&self, first: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let region = self.region_of(first);
        let offset = (first - region.base) * PAGE_SIZE;
        region
            .memfd
            .read_exact_at(buf, offset)
            .map_err(|source| SnapshotError::GuestMemory {
                offset: first * PAGE_SIZE,
                source,
            })
    }
}

/// The write guard: saves a page ahead of the writer when the guest is about to write it.
///
/// It is installed before the plan is made (beginning the protection holds swap-outs off, so
/// no page leaves RAM while its origin is decided), and given the plan and the image once
/// they exist, before any page is protected.
struct Saver {
    work: std::sync::OnceLock<(Arc<Plan>, Arc<PageImageWriter>)>,
    failure: Mutex<Option<SnapshotError>>,
    saved: AtomicU64,
    /// Pages a write fault copied, for the writer to write: the fault thread never writes the
    /// image itself (a write into the page cache can be held up for tens of milliseconds by
    /// writeback throttling, and the guest would wait that long), unless the queue is full.
    queue: Mutex<Vec<(u64, Box<[u8]>)>>,
    /// Calls of `before_write` under way: the snapshot waits for them before it finishes.
    busy: std::sync::atomic::AtomicUsize,
}

/// The writer's nice value while it writes.
const WRITER_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority to `nice` while it lives (when the thread
/// is allowed to; a failure changes nothing).
struct Niced {
    tid: libc::id_t,
    before: Option<i32>,
}

impl Niced {
    fn new(nice: i32) -> Niced {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        // getpriority returns -1 both as a value and for an error: errno tells them apart.
        // SAFETY: plain system calls on this thread's own priority.
        let before = unsafe {
            *libc::__errno_location() = 0;
            let value = libc::getpriority(libc::PRIO_PROCESS, tid);
            (*libc::__errno_location() == 0).then_some(value)
        };
        // SAFETY: as above.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        Niced { tid, before }
    }
}

impl Drop for Niced {
    fn drop(&mut self) {
        if let Some(before) = self.before {
            // SAFETY: restores this thread's own priority.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, before) };
        }
    }
}

/// Pages a write fault may leave for the writer (16 MiB).
const QUEUE_PAGES: usize = 4096;

impl Saver {
    fn new() -> Saver {
        Saver {
            work: std::sync::OnceLock::new(),
            failure: Mutex::new(None),
            saved: AtomicU64::new(0),
            queue: Mutex::new(Vec::new()),
            busy: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Writes the pages write faults copied.
    fn drain(&self, image: &PageImageWriter) -> Result<(), SnapshotError> {
        let pages = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        for (index, bytes) in pages {
            image.write_page(index, &bytes)?;
        }
        Ok(())
    }

    /// Waits until no `before_write` is under way (the protection has ended, so none starts),
    /// then writes what they left.
    fn settle(&self, image: &PageImageWriter) -> Result<(), SnapshotError> {
        while self.busy.load(Ordering::Acquire) > 0 {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        self.drain(image)
    }

    fn fail(&self, error: SnapshotError) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.get_or_insert(error);
    }

    fn failed(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn take_failure(&self) -> Option<SnapshotError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl WriteGuard for Saver {
    fn before_write(&self, pager_region: usize, page: usize) {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.save(pager_region, page);
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Saver {
    fn save(&self, pager_region: usize, page: usize) {
        // No page is protected before the plan is given.
        let Some((plan, image)) = self.work.get() else {
            return;
        };
        let Some(region) = plan.regions.iter().find(|r| r.pager_region == pager_region) else {
            return;
        };
        let index = region.base + page as u64;
        if !plan.pending.get(index as usize) || !plan.taken.test_and_set(index as usize) {
            // Not to be copied, or the writer holds its copy already.
            return;
        }
        let mut bytes: Box<[u8]> = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
        let saved = plan.read_ram(index, &mut bytes).and_then(|()| {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.len() < QUEUE_PAGES {
                queue.push((index, bytes));
                Ok(())
            } else {
                drop(queue);
                image.write_page(index, &bytes)
            }
        });
        // Saved or failed, the page is let go: the guest must run on.
        match saved {
            Ok(()) => {
                self.saved.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.fail(e),
        }
    }
}

/// Everything decided and set up while the VM is paused.
struct Prepared {
    plan: Arc<Plan>,
    saver: Arc<Saver>,
    image: Arc<PageImageWriter>,
    state: state::SnapshotState,
}

/// Takes a live snapshot of the VM behind `handle`. `pager` is the VM's pager if its RAM is
/// served lazily; without one, a pager that only serves write protection is started over RAM
/// for the snapshot's duration. A VM that is paused already is snapshotted as it is.
pub fn create_live(
    handle: &VmHandle,
    pager: Option<&PagerHandle>,
    options: &CreateOptions,
) -> Result<CreateSummary, SnapshotError> {
    if handle.control().is_paused() {
        // Nothing runs: a regular snapshot is already as live as it gets.
        return create::create(handle, options);
    }
    let mut staging = Staging::create(&options.dir)?;
    let parent = create::check_parent(handle, options)?;
    // Registered before the pause: a registration alone changes nothing for the guest.
    let own_pager = match pager {
        Some(_) => None,
        None => Some(protect_only_pager(handle.ram())?),
    };
    let pager: &PagerHandle = match (&own_pager, pager) {
        (Some(own), _) => own,
        (None, Some(pager)) => pager,
        (None, None) => unreachable!("one of them is set"),
    };

    let started = Instant::now();
    handle.pause().map_err(SnapshotError::Vm)?;
    let instant = instant_of(handle);
    let prepared = instant.and_then(|(machine, dirty)| {
        match prepare(
            handle,
            pager,
            parent,
            options,
            &staging,
            machine,
            dirty.as_ref(),
        ) {
            Ok(prepared) => Ok((prepared, dirty)),
            Err(error) => {
                if let Some(dirty) = dirty {
                    handle.return_dirty_pages(dirty);
                }
                Err(error)
            }
        }
    });
    let paused_ms = started.elapsed().as_secs_f64() * 1e3;
    let resumed = handle.resume().map_err(SnapshotError::Vm);
    let (
        Prepared {
            plan,
            saver,
            image,
            state,
        },
        dirty,
    ) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            // The failure is the answer (as `create` answers): a VM left paused shows as
            // paused, and the resume's failure is logged.
            if let Err(e) = resumed {
                tracing::warn!("live snapshot: the VM could not be resumed after it: {e}");
            }
            return Err(error);
        }
    };
    let written = resumed.and_then(|()| {
        // The writer is background work: the guest's vCPUs and the fault thread that lets its
        // writes through come first (on a small host, a write fault otherwise waits for a
        // scheduler slice).
        let _niced = Niced::new(WRITER_NICE);
        write_pages(pager, &plan, &saver, &image)
    });
    // Every page is let go before anything else: the guest must not wait on a snapshot that
    // is over, or failed.
    let (protect_stats, unprotected) = pager.end_write_protect();
    if let Some(own) = own_pager {
        own.shutdown();
    }
    // The last pages write faults copied (none start now), before the image is finished.
    let settled = saver.settle(&image);
    let result = written
        .and(settled)
        .and_then(|()| unprotected.map_err(SnapshotError::Protect))
        .and_then(|()| saver.take_failure().map_or(Ok(()), Err))
        .and_then(|()| image.finish())
        .and_then(|memory| state::write(staging.path(), &state).map(|()| memory))
        .and_then(|memory| Ok((memory, state::identity(staging.path())?)))
        .and_then(|written| staging.publish(options.pager.as_ref()).map(|()| written));
    let (memory, identity) = match result {
        Ok(written) => written,
        Err(error) => {
            image.abandon();
            if let Some(dirty) = dirty {
                handle.return_dirty_pages(dirty);
            }
            return Err(error);
        }
    };
    Ok(CreateSummary {
        dir: options.dir.clone(),
        kind: state.memory,
        parent: options
            .diff_parent
            .as_ref()
            .map(|parent| parent.dir.clone()),
        identity,
        vcpus: usize::from(handle.vcpu_count()),
        memory,
        paused_ms,
        live: Some(LiveStats {
            write_faults: protect_stats.write_faults,
            pages_saved_by_faults: saver.saved.load(Ordering::Relaxed),
            stall_p50_us: protect_stats.stall_p50_us,
            stall_p99_us: protect_stats.stall_p99_us,
            stall_max_us: protect_stats.stall_max_us,
            pages_from_source: plan.from_source.len() as u64,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        }),
    })
}

/// A pager over all of RAM that serves write protection only (a VM whose RAM is resident).
fn protect_only_pager(ram: &GuestRam) -> Result<Pager, SnapshotError> {
    let config = PagerConfig {
        fault_threads: 1,
        predict: false,
        ..PagerConfig::default()
    };
    let mut builder = PagerBuilder::new(config).map_err(SnapshotError::Protect)?;
    for region in ram.regions() {
        // SAFETY: guest RAM is raw memory no Rust object owns; it stays mapped while the
        // VM's handle lives, which outlives this pager (shut down, or dropped, before
        // `create_live` returns).
        unsafe { builder.region_write_protect_only(region.host_addr() as u64, region.size()) }
            .map_err(SnapshotError::Protect)?;
    }
    builder.start().map_err(SnapshotError::Protect)
}

/// The paused VM's machine state, and its dirty log (taken, if it keeps one).
fn instant_of(handle: &VmHandle) -> Result<(MachineState, Option<DirtyPages>), SnapshotError> {
    let machine = handle.paused_state().map_err(SnapshotError::Vm)?;
    let dirty = if handle.tracks_dirty() {
        Some(handle.take_dirty_pages().map_err(SnapshotError::Vm)?)
    } else {
        None
    };
    Ok((machine, dirty))
}

/// With the VM paused: decides where each page comes from, creates the image and
/// write-protects the pages to copy from RAM. A failure leaves nothing protected.
fn prepare(
    handle: &VmHandle,
    pager: &PagerHandle,
    parent: Option<ParentRef>,
    options: &CreateOptions,
    staging: &Staging,
    machine: MachineState,
    dirty: Option<&DirtyPages>,
) -> Result<Prepared, SnapshotError> {
    let ram = handle.ram();
    let kind = if parent.is_some() {
        MemoryKind::Diff
    } else {
        MemoryKind::Full
    };
    let included = match (&parent, dirty) {
        (Some(_), Some(dirty)) => Some(dirty),
        (Some(_), None) => return Err(create::no_dirty_tracking()),
        (None, _) => None,
    };
    let saver = Arc::new(Saver::new());
    pager
        .begin_write_protect(Arc::clone(&saver) as Arc<dyn WriteGuard>)
        .map_err(SnapshotError::Protect)?;
    let planned = plan(ram, pager, included).and_then(|plan| {
        let (layer, held) = match included {
            Some(dirty) => (LayerKind::Diff, Some(dirty.words().to_vec())),
            None => (LayerKind::Full, None),
        };
        let image = PageImageWriter::create(staging.path(), ram.size(), layer, held)?;
        Ok((Arc::new(plan), Arc::new(image)))
    });
    let (plan, image) = match planned {
        Ok(planned) => planned,
        Err(error) => {
            let _ = pager.end_write_protect();
            return Err(error);
        }
    };
    let _ = saver.work.set((Arc::clone(&plan), Arc::clone(&image)));
    let state = create::state_of(
        machine,
        ram,
        options.guest.clone(),
        Watch::of(handle.memory()),
        kind,
        parent,
    );
    if let Err(error) = protect(pager, &plan) {
        let _ = pager.end_write_protect();
        image.abandon();
        return Err(error);
    }
    Ok(Prepared {
        plan,
        saver,
        image,
        state,
    })
}

/// Where each page comes from (see the module documentation). `included`: the pages of a
/// diff (all pages for a full snapshot).
fn plan(
    ram: &GuestRam,
    pager: &PagerHandle,
    included: Option<&DirtyPages>,
) -> Result<Plan, SnapshotError> {
    let total = ram.size() / PAGE_SIZE;
    let pending = AtomicBitmap::new(total as usize);
    let mut present = Vec::new();
    let mut from_source = Vec::new();
    let mut regions = Vec::new();
    let mut base = 0u64;
    for region in ram.regions() {
        let pages = region.size() / PAGE_SIZE;
        let pager_region = (0..pager.regions())
            .find(|&i| pager.region_range(i).0 == region.host_addr() as u64)
            .ok_or_else(|| {
                SnapshotError::Usage(format!(
                    "RAM at {:#x} is not served by the pager",
                    region.gpa()
                ))
            })?;
        for page in 0..pages {
            let index = base + page;
            if included.is_some_and(|dirty| !dirty.contains(index)) {
                continue;
            }
            match pager
                .settled_page_state(pager_region, page as usize)
                .map_err(SnapshotError::Protect)?
            {
                PageState::Present => present.push(index),
                PageState::Discarded => {}
                // Read later from where it is now, whatever becomes of the page meanwhile.
                state @ (PageState::InSource | PageState::Swapped) => {
                    from_source.push((index, state))
                }
            }
        }
        regions.push(PlanRegion {
            base,
            pages,
            pager_region,
            memfd: region.memfd_file(),
        });
        base += pages;
    }
    // The memfd's data after the states: a page installed meanwhile (by background work;
    // the guest is paused) was taken as in the source, never as a hole.
    let data = create::resident_pages(ram)?;
    for index in present {
        if data[index as usize] {
            pending.set(index as usize);
        }
    }
    Ok(Plan {
        regions,
        pending,
        from_source,
        taken: AtomicBitmap::new(total as usize),
    })
}

/// Protects the pending pages (under a protection begun), runs less than
/// [`MERGE_GAP_PAGES`] apart as one.
fn protect(pager: &PagerHandle, plan: &Plan) -> Result<(), SnapshotError> {
    for region in &plan.regions {
        let mut run: Option<(u64, u64)> = None;
        for page in 0..region.pages {
            if !plan.pending.get((region.base + page) as usize) {
                continue;
            }
            run = match run {
                Some((first, end)) if page - end < MERGE_GAP_PAGES => Some((first, page + 1)),
                Some((first, end)) => {
                    pager
                        .protect(region.pager_region, first as usize, (end - first) as usize)
                        .map_err(SnapshotError::Protect)?;
                    Some((page, page + 1))
                }
                None => Some((page, page + 1)),
            };
        }
        if let Some((first, end)) = run {
            pager
                .protect(region.pager_region, first as usize, (end - first) as usize)
                .map_err(SnapshotError::Protect)?;
        }
    }
    Ok(())
}

/// The writer, while the VM runs: reads the pending pages 64 at a time, takes those no guard
/// has taken (see `Plan`), lets them go and writes them;
/// then reads the pages still in the source. Stops early when a write fault's save failed.
fn write_pages(
    pager: &PagerHandle,
    plan: &Plan,
    saver: &Saver,
    image: &PageImageWriter,
) -> Result<(), SnapshotError> {
    wait_for_test_gate();
    let page_len = PAGE_SIZE as usize;
    let total = plan.pending.len() as u64;
    let mut buf = vec![0u8; STRIPE_PAGES as usize * page_len];
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut won: Vec<u64> = Vec::new();
    for stripe in 0..total.div_ceil(STRIPE_PAGES) {
        if saver.failed() {
            return Ok(());
        }
        let lo = stripe * STRIPE_PAGES;
        let hi = (lo + STRIPE_PAGES).min(total);
        runs.clear();
        let untaken = |p: u64| plan.pending.get(p as usize) && !plan.taken.get(p as usize);
        let mut page = lo;
        while page < hi {
            if !untaken(page) {
                page += 1;
                continue;
            }
            let region = plan.region_of(page);
            let region_end = region.base + region.pages;
            let mut end = page + 1;
            while end < hi && end < region_end && untaken(end) {
                end += 1;
            }
            // Read first, take after: see `Plan`.
            let at = ((page - lo) as usize) * page_len;
            plan.read_ram(page, &mut buf[at..at + (end - page) as usize * page_len])?;
            runs.push((page, end));
            page = end;
        }
        // Take what a guard has not: only those pages are the writer's to let go (a page a
        // guard took stays protected until the guard has its copy).
        won.clear();
        for &(first, end) in &runs {
            won.extend((first..end).filter(|&p| plan.taken.test_and_set(p as usize)));
        }
        for (first, count) in region_runs(plan, &won) {
            let region = plan.region_of(first);
            pager
                .unprotect(
                    region.pager_region,
                    (first - region.base) as usize,
                    count as usize,
                )
                .map_err(SnapshotError::Protect)?;
        }
        for &page in &won {
            let at = ((page - lo) as usize) * page_len;
            image.write_page(page, &buf[at..at + page_len])?;
        }
        saver.drain(image)?;
    }
    write_source_pages(pager, plan, saver, image)
}

/// Contiguous runs `(first, count)` of ascending `pages`, none crossing a RAM region.
fn region_runs(plan: &Plan, pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((first, n)) if *first + *n == p && plan.region_of(p).base <= *first => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// A test hook: with `FAULTLINE_LIVE_WRITER_GATE=PATH` in the environment, the writer
/// creates `PATH.waiting` and waits (at most 60 s) until `PATH` exists before it copies a
/// page, so that a test can make the guest write while every page is still protected,
/// whatever the speed of the machine.
fn wait_for_test_gate() {
    let Some(gate) = std::env::var_os("FAULTLINE_LIVE_WRITER_GATE") else {
        return;
    };
    let gate = std::path::PathBuf::from(gate);
    let mut waiting = gate.clone().into_os_string();
    waiting.push(".waiting");
    let _ = std::fs::write(&waiting, b"");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while !gate.exists() && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Reads the pages still in the source, in batches of consecutive pages, and writes them.
fn write_source_pages(
    pager: &PagerHandle,
    plan: &Plan,
    saver: &Saver,
    image: &PageImageWriter,
) -> Result<(), SnapshotError> {
    let page_len = PAGE_SIZE as usize;
    let mut buf = vec![0u8; SOURCE_BATCH_PAGES as usize * page_len];
    let pages = &plan.from_source;
    let mut i = 0;
    while i < pages.len() {
        if saver.failed() {
            return Ok(());
        }
        let (first, state) = pages[i];
        let region = plan.region_of(first);
        let mut count = 1;
        while i + count < pages.len()
            && (count as u64) < SOURCE_BATCH_PAGES
            && pages[i + count] == (first + count as u64, state)
            && first + (count as u64) < region.base + region.pages
        {
            count += 1;
        }
        let bytes = &mut buf[..count * page_len];
        pager
            .read_as(
                region.pager_region,
                (first - region.base) as usize,
                bytes,
                state,
            )
            .map_err(|e| SnapshotError::Source {
                offset: first * PAGE_SIZE,
                reason: e.to_string(),
            })?;
        for (k, page) in bytes.chunks_exact(page_len).enumerate() {
            image.write_page(first + k as u64, page)?;
        }
        i += count;
    }
    Ok(())
}
