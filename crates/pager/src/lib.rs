//! faultline's demand-paging engine.
//!
//! Hand it mapped memory ranges, each with a [`PageSource`]; it registers them with a
//! userfaultfd and, from then on, installs every missing page the first time anything touches
//! it: a vCPU, the kernel on a vCPU's behalf, or any other thread. It knows nothing of KVM,
//! which is what lets a plain host thread stand in for a vCPU in tests and benchmarks.
//!
//! Guarantees (each has a test): a page is installed at most once; an installed page is never
//! overwritten (UFFDIO_COPY refuses present pages, and the pager counts EEXIST as installed);
//! a fault is answered with the page's contents or an explicit error (poison), never garbage
//! and never left hanging; the presence map agrees with the kernel.

mod bitmap;
mod engine;
mod limit;
mod predict;
mod protect;
mod region;
mod source;
mod stats;
mod swap;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

pub use bitmap::AtomicBitmap;
pub use protect::{ProtectStats, WriteGuard};
pub use source::{
    data_extents, Content, FileSource, MemorySource, OffsetSource, PageSource, SlowSource,
    SourceError, ZeroSource,
};
pub use stats::{FaultOrigin, Latency, RegionStats, Stats};
pub use swap::{SwapOutReport, SwapStats};
use uffd::{Features, RegisterMode, Uffd, UffdError};

use engine::{Job, Jobs, Shared};
use region::Region;
use stats::Counters;

/// What to do when a page source cannot produce a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Poison the page: the toucher gets SIGBUS (a kernel-mode access, such as KVM's, gets
    /// EFAULT). Other pages keep being served.
    #[default]
    Poison,
    /// Poison the page and report a fatal error through the `on_fatal` callback (the VMM
    /// stops the VM with it).
    Stop,
}

/// Tuning knobs.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    /// Fault-service threads.
    pub fault_threads: usize,
    /// Events a fault thread reads at once (at least 1). A fault read in the same batch as
    /// one whose fetch waits on its source waits behind it: a pager over a source that waits
    /// on a peer for each fetch (a post-copy destination's) reads one at a time, with a fault
    /// thread for each thread that may fault, so that a slow page never holds up another's
    /// request.
    pub events_per_read: usize,
    /// Pages installed per fault, the faulting one first (1 = read-ahead off).
    pub readahead_pages: usize,
    /// Pages per background install.
    pub background_batch_pages: usize,
    /// Background bytes per second (None: as fast as urgent faults allow; at least one page
    /// a second otherwise).
    pub background_rate: Option<u64>,
    pub failure_policy: FailurePolicy,
    /// Keep the order in which faults claimed pages (for working-set recording). Recording
    /// turns `predict` off: a page installed ahead would never fault, and so never be recorded.
    pub record_faults: bool,
    /// Follow each toucher's faults and install the pages further along its line (a
    /// sequential or strided walk) before it reaches them.
    pub predict: bool,
    /// Swap pages out to this file (created when the pager starts; one already there is
    /// refused): a slot per page of every region, then a checksum per slot. Regions need a
    /// backing file.
    pub swap_file: Option<std::path::PathBuf>,
    /// Keep the pages present under this many bytes by swapping out those least recently
    /// faulted in or written (needs `swap_file`).
    pub resident_limit: Option<u64>,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig {
            fault_threads: 1,
            events_per_read: 64,
            readahead_pages: 1,
            background_batch_pages: 64,
            background_rate: None,
            failure_policy: FailurePolicy::Poison,
            record_faults: false,
            predict: true,
            swap_file: None,
            resident_limit: None,
        }
    }
}

/// Errors setting the pager up.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    #[error("cannot open the userfaultfd")]
    Uffd(#[source] UffdError),
    #[error("cannot register [{start:#x}, +{len:#x}) for demand paging")]
    Register {
        start: u64,
        len: u64,
        #[source]
        source: UffdError,
    },
    #[error("region [{start:#x}, +{len:#x}) is not page aligned or is empty")]
    Misaligned { start: u64, len: u64 },
    #[error("region [{start:#x}, +{len:#x}) overlaps another region")]
    Overlap { start: u64, len: u64 },
    #[error("cannot read which pages of [{start:#x}, +{len:#x}) are resident")]
    Residency {
        start: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the pager's stop eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start a pager thread")]
    Thread(#[source] std::io::Error),
    #[error("no region {0}")]
    NoRegion(usize),
    #[error("invalid pager configuration: {0}")]
    Config(String),
    #[error("the pager has stopped")]
    Stopped,
    #[error("cannot write-protect guest memory: {0}")]
    WriteProtect(String),
    #[error("page {page} of region {region} was still being installed after {waited:?}")]
    Unsettled {
        region: usize,
        page: usize,
        waited: std::time::Duration,
    },
    #[error("the pager has no swap file")]
    NoSwap,
    #[error("swap: {0}")]
    Swap(String),
    #[error("cannot create the swap file {path}")]
    SwapFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a write protection is in force already (one live snapshot at a time)")]
    ProtectionActive,
}

/// How long [`PagerHandle::settled_page_state`] waits for an install under way.
pub const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The features the pager needs from the kernel.
pub const REQUIRED_FEATURES: Features = Features(
    Features::MISSING_SHMEM.0
        | Features::THREAD_ID.0
        | Features::EVENT_REMOVE.0
        | Features::POISON.0,
);

/// Collects regions, then starts the pager.
pub struct PagerBuilder {
    config: PagerConfig,
    uffd: Uffd,
    regions: Vec<Region>,
    on_fatal: Option<engine::FatalCallback>,
}

impl PagerBuilder {
    /// Opens the userfaultfd.
    pub fn new(config: PagerConfig) -> Result<Self, PagerError> {
        // Write protection of shared memory (a live snapshot) is asked for where the kernel
        // has it; without it, only `write_protect` fails, saying so.
        let offered = uffd::supported_features().map_err(PagerError::Uffd)?;
        let features = Features(REQUIRED_FEATURES.0 | (offered.0 & Features::WP_HUGETLBFS_SHMEM.0));
        let uffd = Uffd::open(features).map_err(PagerError::Uffd)?;
        Ok(PagerBuilder {
            config,
            uffd,
            regions: Vec::new(),
            on_fatal: None,
        })
    }

    /// Gives `region` its backing file (guest RAM's memfd; byte 0 of the region is byte
    /// `offset` of `file`), which swap-out reads pages from and releases them in. Pages the
    /// file holds are present from now on, those the kernel swapped out among them (which
    /// the residency probe cannot see).
    pub fn backing(
        &mut self,
        region: usize,
        file: Arc<std::fs::File>,
        offset: u64,
    ) -> Result<(), PagerError> {
        let region = self
            .regions
            .get_mut(region)
            .ok_or(PagerError::NoRegion(region))?;
        let backing = region::Backing { file, offset };
        let (start, len) = (region.start, region.len);
        let swapped = region
            .mark_file_data(&backing)
            .map_err(|source| PagerError::Residency { start, len, source })?;
        if swapped > 0 {
            tracing::debug!(
                start,
                swapped,
                "pager: pages held in the file but not resident"
            );
        }
        region.backing = Some(backing);
        Ok(())
    }

    /// Registers `[start, start + len)` (mapped, page aligned) to be served from `source`.
    /// Pages already resident (written before this call) are never fetched. Returns the
    /// region's index.
    ///
    /// # Safety
    ///
    /// The pager installs pages into the range (and poisons those its source cannot provide)
    /// behind the back of any Rust reference into it, and a touch of a missing page blocks
    /// until the pager answers. The range must be memory the caller manages as raw pages
    /// (guest RAM), mapped for as long as the pager runs (it must be shut down before the
    /// mapping goes), and never memory Rust code owns as an ordinary object.
    pub unsafe fn region(
        &mut self,
        start: u64,
        len: u64,
        source: Arc<dyn PageSource>,
    ) -> Result<usize, PagerError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.add_region(start, len, source, true) }
    }

    /// Like [`region`](Self::region), for a range the caller knows has never been touched
    /// (fresh memory, as a restore has): residency is not probed, which on a large range
    /// saves a `mincore` walk of every page.
    ///
    /// # Safety
    ///
    /// As for [`region`](Self::region).
    pub unsafe fn region_untouched(
        &mut self,
        start: u64,
        len: u64,
        source: Arc<dyn PageSource>,
    ) -> Result<usize, PagerError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.add_region(start, len, source, false) }
    }

    /// Registers `[start, start + len)` for write protection only: every page is the
    /// caller's (resident, or a hole that reads as zero), nothing is ever installed, and the
    /// pager only serves the write-protect faults of a [`PagerHandle::begin_write_protect`]
    /// (a live snapshot of a VM whose RAM is all in place).
    ///
    /// # Safety
    ///
    /// A write to a protected page blocks until the pager answers. The range must be memory
    /// the caller manages as raw pages (guest RAM), mapped for as long as the pager runs.
    pub unsafe fn region_write_protect_only(
        &mut self,
        start: u64,
        len: u64,
    ) -> Result<usize, PagerError> {
        let page_size = uffd::PAGE_SIZE;
        self.check_new_region(start, len)?;
        let region = Region::new(start, len, page_size, Arc::new(ZeroSource));
        // SAFETY: the caller vouches for the range; the pager serves its write-protect faults.
        unsafe { self.uffd.register(start, len, RegisterMode::WP) }
            .map_err(|source| PagerError::Register { start, len, source })?;
        region.present.set_all();
        region
            .write_protect_registered
            .store(true, Ordering::Release);
        self.regions.push(region);
        Ok(self.regions.len() - 1)
    }

    /// Refuses a misaligned, empty or overlapping range.
    fn check_new_region(&self, start: u64, len: u64) -> Result<(), PagerError> {
        let page_size = uffd::PAGE_SIZE;
        if len == 0 || !start.is_multiple_of(page_size) || !len.is_multiple_of(page_size) {
            return Err(PagerError::Misaligned { start, len });
        }
        if self
            .regions
            .iter()
            .any(|r| start < r.start + r.len && r.start < start + len)
        {
            return Err(PagerError::Overlap { start, len });
        }
        Ok(())
    }

    /// # Safety
    ///
    /// As for [`region`](Self::region).
    unsafe fn add_region(
        &mut self,
        start: u64,
        len: u64,
        source: Arc<dyn PageSource>,
        probe_residency: bool,
    ) -> Result<usize, PagerError> {
        let page_size = uffd::PAGE_SIZE;
        self.check_new_region(start, len)?;
        let region = Region::new(start, len, page_size, source);
        // SAFETY: the caller vouches for the range (see `region`); the pager serves its faults.
        unsafe { self.uffd.register(start, len, RegisterMode::MISSING) }
            .map_err(|source| PagerError::Register { start, len, source })?;
        let resident = if probe_residency {
            region
                .mark_resident()
                .map_err(|source| PagerError::Residency { start, len, source })?
        } else {
            0
        };
        tracing::debug!(start, len, resident, "pager: region registered");
        self.regions.push(region);
        Ok(self.regions.len() - 1)
    }

    /// Called once, from a pager thread, if a source fails under [`FailurePolicy::Stop`].
    pub fn on_fatal(&mut self, callback: impl Fn(&str) + Send + Sync + 'static) {
        self.on_fatal = Some(Box::new(callback));
    }

    /// Starts the fault threads and the background worker. If a thread cannot be started,
    /// those already started are stopped before the error is returned.
    pub fn start(mut self) -> Result<Pager, PagerError> {
        if self.config.background_rate == Some(0) {
            return Err(PagerError::Config(
                "a background rate of 0 bytes per second would never finish".into(),
            ));
        }
        if let Some(limit) = self.config.resident_limit {
            if self.config.swap_file.is_none() {
                return Err(PagerError::Config(
                    "a resident limit needs a swap file to move pages to".into(),
                ));
            }
            if limit < uffd::PAGE_SIZE * 64 {
                return Err(PagerError::Config(format!(
                    "a resident limit of {limit} bytes is below 64 pages (256 KiB)"
                )));
            }
            for region in &mut self.regions {
                region.referenced = bitmap::AtomicBitmap::new(region.pages());
            }
        }
        if self.config.swap_file.is_some() && self.regions.iter().any(|r| r.backing.is_none()) {
            return Err(PagerError::Config(
                "swap needs a backing file for every region (PagerBuilder::backing)".into(),
            ));
        }
        // Before the start, only a write-protect-only region is registered for write
        // protection. It gets no missing faults: a page swapped out of it would come back as
        // a zero page the kernel makes, its data lost.
        if self.config.swap_file.is_some()
            && self
                .regions
                .iter()
                .any(|r| r.write_protect_registered.load(Ordering::Acquire))
        {
            return Err(PagerError::Config(
                "swap cannot serve a write-protect-only region (it gets no missing faults to \
                 swap pages in)"
                    .into(),
            ));
        }
        let mut slots = 0;
        for region in &mut self.regions {
            region.swap_base = slots;
            slots += region.pages() as u64;
        }
        let swap = match &self.config.swap_file {
            None => None,
            Some(path) => {
                // Swap-out write-protects the pages it takes: every region is registered for
                // that too.
                register_write_protect(&self.uffd, &self.regions)?;
                Some(swap::SwapFile::create(path, slots).map_err(|source| {
                    PagerError::SwapFile {
                        path: path.clone(),
                        source,
                    }
                })?)
            }
        };
        let stop_evt = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| PagerError::EventFd(e.into()))?;
        let shared = Arc::new(Shared {
            uffd: self.uffd,
            regions: self.regions,
            config: self.config.clone(),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            stop_evt,
            urgent_pending: AtomicU64::new(0),
            fill_waits_for_faults: AtomicBool::new(false),
            background: Mutex::new(Jobs::default()),
            background_cv: Condvar::new(),
            predictor: (self.config.predict && !self.config.record_faults)
                .then(|| Mutex::new(predict::Predictor::default())),
            page_read_ns: AtomicU64::new(0),
            span_read_ns: AtomicU64::new(0),
            vcpu_threads: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            on_fatal: self.on_fatal,
            fault_log: Mutex::new(Vec::new()),
            event_gate: RwLock::new(()),
            protection: Default::default(),
            swap,
            swap_batch: Mutex::new(()),
            swap_range: Mutex::new(None),
            swap_counters: Default::default(),
            limiter: Default::default(),
        });
        let mut pager = Pager {
            handle: PagerHandle { shared },
            threads: Vec::new(),
        };
        for i in 0..self.config.fault_threads.max(1) {
            let shared = Arc::clone(&pager.handle.shared);
            // On an error `pager` is dropped, which stops and joins the threads started.
            let thread = std::thread::Builder::new()
                .name(format!("pager-fault{i}"))
                .spawn(move || shared.fault_loop())
                .map_err(PagerError::Thread)?;
            pager.threads.push(thread);
        }
        let background = Arc::clone(&pager.handle.shared);
        let thread = std::thread::Builder::new()
            .name("pager-background".into())
            .spawn(move || background.background_loop())
            .map_err(PagerError::Thread)?;
        pager.threads.push(thread);
        if self.config.resident_limit.is_some() {
            let evictor = Arc::clone(&pager.handle.shared);
            let thread = std::thread::Builder::new()
                .name("pager-evict".into())
                .spawn(move || evictor.evict_loop())
                .map_err(PagerError::Thread)?;
            pager.threads.push(thread);
        }
        Ok(pager)
    }
}

/// A cheap, clonable handle on a running pager (for stats, prefetch, vCPU registration).
#[derive(Clone)]
pub struct PagerHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PagerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagerHandle")
            .field("fatal", &self.fatal_error())
            .finish_non_exhaustive()
    }
}

impl PagerHandle {
    /// Counts faults from thread `tid` as vCPU faults.
    pub fn register_vcpu_thread(&self, tid: u32) {
        self.shared
            .vcpu_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tid);
    }

    /// Queues pages `[first, first + count)` of `region` for background install, in order.
    pub fn prefetch(&self, region: usize, first: usize, count: usize) -> Result<(), PagerError> {
        let pages = self.region(region)?.pages();
        let count = count.min(pages.saturating_sub(first));
        self.shared.queue(
            Job {
                region,
                first,
                count,
                stride: 1,
            },
            false,
        );
        Ok(())
    }

    /// Installs pages whose contents the caller holds (a recorded working set), on the
    /// calling thread: `data` covers whole pages from `first` on. Pages already present or in
    /// flight are left alone. Returns the number of pages installed.
    pub fn install_pages(
        &self,
        region: usize,
        first: usize,
        data: &[u8],
    ) -> Result<usize, PagerError> {
        self.check_install(region)?;
        Ok(self.shared.install_given(region, first, data))
    }

    /// Installs `count` zero pages from `first` on the calling thread, without copying (a
    /// page stream's zero ranges). Pages already present or in flight are left alone. Returns
    /// the number of pages installed.
    pub fn install_zero_pages(
        &self,
        region: usize,
        first: usize,
        count: usize,
    ) -> Result<usize, PagerError> {
        self.check_install(region)?;
        Ok(self.shared.install_zero(region, first, count))
    }

    /// Region `index`, or the error naming it.
    fn region(&self, index: usize) -> Result<&Region, PagerError> {
        self.shared
            .regions
            .get(index)
            .ok_or(PagerError::NoRegion(index))
    }

    /// Whether the caller may install into `region` now.
    fn check_install(&self, region: usize) -> Result<(), PagerError> {
        self.region(region)?;
        if self.shared.stop.load(Ordering::Acquire) {
            return Err(PagerError::Stopped);
        }
        Ok(())
    }

    /// Queues every page of every region for background install (background fill).
    pub fn fill_all(&self) {
        for (index, region) in self.shared.regions.iter().enumerate() {
            self.prefetch(index, 0, region.pages())
                .expect("the region exists");
        }
    }

    /// Whether `region`'s `page` is installed (or was resident).
    pub fn is_present(&self, region: usize, page: usize) -> bool {
        self.shared.regions[region].present.get(page)
    }

    /// Whether the pager can give `region`'s `page` without its source: it is present, or
    /// known to be zero (discarded).
    pub fn holds(&self, region: usize, page: usize) -> bool {
        let r = &self.shared.regions[region];
        r.present.get(page) || r.discarded.get(page)
    }

    /// `count` pages of `region` from `first` are zero (a migration stream's zero range): the
    /// ones not present are marked discarded, so that a touch installs a zero page without
    /// asking the source, and nothing is installed (or allocated) now. An install of one
    /// under way installs zero (it reads the discarded bit under the event gate).
    pub fn mark_zero(&self, region: usize, first: usize, count: usize) -> Result<(), PagerError> {
        let r = self.region(region)?;
        let _gate = self
            .shared
            .event_gate
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for page in first..first.saturating_add(count).min(r.pages()) {
            if !r.present.get(page) {
                r.discarded.set(page);
            }
        }
        Ok(())
    }

    /// The pager's counters now.
    pub fn stats(&self) -> Stats {
        self.shared
            .counters
            .snapshot(self.shared.regions.iter().map(Region::stats).collect())
    }

    /// The first fatal error, if any: a page that could not be had under
    /// [`FailurePolicy::Stop`], or, under any policy, a failure of the pager itself (a fault
    /// thread that cannot read its userfaultfd, an event it cannot handle). After one, guest
    /// memory cannot be trusted.
    pub fn fatal_error(&self) -> Option<String> {
        self.shared
            .fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// With [`PagerConfig::record_faults`]: the (region, page) of every fault that installed a
    /// page, in the order they came (a page appears once).
    pub fn fault_log(&self) -> Vec<(usize, usize)> {
        self.shared
            .fault_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What `region`'s `page` holds, once no install of it is under way: an install in
    /// flight may already have put the page in memory (and woken a toucher that wrote it)
    /// before the presence map says so, so a page in flight is waited for (up to
    /// [`SETTLE_LIMIT`]).
    pub fn settled_page_state(&self, region: usize, page: usize) -> Result<PageState, PagerError> {
        let r = self.region(region)?;
        let began = std::time::Instant::now();
        while r.inflight.get(page) {
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(PagerError::Stopped);
            }
            if began.elapsed() > SETTLE_LIMIT {
                return Err(PagerError::Unsettled {
                    region,
                    page,
                    waited: SETTLE_LIMIT,
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        Ok(if r.present.get(page) {
            PageState::Present
        } else if r.swapped.get(page) {
            PageState::Swapped
        } else if r.discarded.get(page) {
            PageState::Discarded
        } else {
            PageState::InSource
        })
    }

    /// Swaps out the present pages among `count` pages of `region` from `first`: zero pages
    /// are dropped, pages whose slot holds them already are not written again, the rest are
    /// written to the swap file; all are released from RAM and come back on touch. Refused
    /// while a write protection (a live snapshot) is in force.
    pub fn swap_out(
        &self,
        region: usize,
        first: usize,
        count: usize,
    ) -> Result<SwapOutReport, PagerError> {
        self.shared.swap_out(region, first, count)
    }

    /// Swaps out pages until at most `keep_bytes` of guest memory stay present: those least
    /// recently faulted in or written go first (with a resident limit; otherwise in address
    /// order from where the last eviction stopped). Pages in flight stay.
    pub fn swap_out_keeping(&self, keep_bytes: u64) -> Result<SwapOutReport, PagerError> {
        if self.shared.swap.is_none() {
            return Err(PagerError::NoSwap);
        }
        let keep = keep_bytes / uffd::PAGE_SIZE;
        let resident = self.resident_pages();
        if resident <= keep {
            return Ok(SwapOutReport::default());
        }
        self.shared.evict(resident - keep, true)
    }

    /// Queues every swapped-out page for background install (swap-in); faults still come
    /// first.
    pub fn swap_in_all(&self) {
        for (index, region) in self.shared.regions.iter().enumerate() {
            let mut page = 0;
            while page < region.pages() {
                if !region.swapped.get(page) {
                    page += 1;
                    continue;
                }
                let start = page;
                while page < region.pages() && region.swapped.get(page) {
                    page += 1;
                }
                self.prefetch(index, start, page - start)
                    .expect("the region exists");
            }
        }
    }

    /// The guest wrote `page` of `region` (the VMM's dirty log says so): it counts as
    /// recently used for the resident limit's eviction.
    pub fn note_written(&self, region: usize, page: usize) {
        if let Some(r) = self.shared.regions.get(region) {
            if page < r.referenced.len() {
                r.referenced.set(page);
            }
        }
    }

    /// Releases `count` pages of `region` from `first` from RAM (punched out of the region's
    /// backing file, as swap-out releases pages): they are missing now, and their contents
    /// are the source's again. For pages nothing installs meanwhile (a migration destination
    /// before its VM runs and its stream starts).
    pub fn release(&self, region: usize, first: usize, count: usize) -> Result<(), PagerError> {
        let r = self.region(region)?;
        let backing = r.backing.as_ref().ok_or_else(|| {
            PagerError::Swap(format!(
                "region {region} has no backing file to release pages from"
            ))
        })?;
        let count = count.min(r.pages().saturating_sub(first));
        backing
            .punch(first as u64 * r.page_size, count as u64 * r.page_size)
            .map_err(|e| PagerError::Swap(format!("cannot release guest RAM: {e}")))?;
        for page in first..first + count {
            // The source's again: neither present, nor known zero (a page marked zero, then
            // written, would otherwise read zero), nor in the swap file (its old contents).
            r.present.clear(page);
            r.discarded.clear(page);
            r.swapped.clear(page);
        }
        Ok(())
    }

    /// Pages present now, all regions together.
    pub fn resident_pages(&self) -> u64 {
        self.shared.resident_now()
    }

    /// Whether the pager swaps (it has a swap file).
    pub fn swaps(&self) -> bool {
        self.shared.swap.is_some()
    }

    /// Swap figures now.
    pub fn swap_stats(&self) -> SwapStats {
        let regions = &self.shared.regions;
        let swapped = regions.iter().map(|r| r.swapped.count() as u64).sum();
        let metadata = regions
            .iter()
            .map(|r| (r.swapped.bytes() + r.referenced.bytes()) as u64)
            .sum();
        self.shared.swap_counters.stats(
            swapped,
            self.resident_pages(),
            metadata,
            self.shared.swap.as_ref().map(|s| s.path().to_path_buf()),
            (self.shared.config.resident_limit, &self.shared.limiter),
        )
    }

    /// Reads `buf.len() / 4096` pages of `region` from `first` as they are in `state`: from
    /// their swap-file slots (`Swapped`), from the region's source (`InSource`), or zero
    /// (`Discarded`); whatever they are now (a live snapshot reads pages as they were at its
    /// pause, never faulting them in). `Present` pages are not read here.
    pub fn read_as(
        &self,
        region: usize,
        first: usize,
        buf: &mut [u8],
        state: PageState,
    ) -> Result<(), SourceError> {
        let r = &self.shared.regions[region];
        match state {
            PageState::Swapped => {
                let swap = self.shared.swap.as_ref().ok_or(SourceError::Unavailable {
                    offset: first as u64 * r.page_size,
                    reason: "the pager has no swap file".into(),
                })?;
                swap.read(r.swap_base + first as u64, buf)
            }
            PageState::Discarded => {
                buf.fill(0);
                Ok(())
            }
            PageState::InSource => {
                if r.source.fetch(first as u64 * r.page_size, buf)? == Content::Zero {
                    buf.fill(0);
                }
                Ok(())
            }
            PageState::Present => Err(SourceError::Unavailable {
                offset: first as u64 * r.page_size,
                reason: "a present page is read from memory, not through the pager".into(),
            }),
        }
    }

    /// `region`'s first address and length.
    pub fn region_range(&self, region: usize) -> (u64, u64) {
        let region = &self.shared.regions[region];
        (region.start, region.len)
    }

    /// Starts a write protection: from now on `guard` is called before a protected page is
    /// written (on a fault thread, with the writer waiting), and the page is then unprotected.
    /// Registers the regions in write-protect mode first, where they are not yet (a region
    /// keeps its registration afterwards: without protected pages it costs nothing). Nothing
    /// is protected yet: see [`protect`](Self::protect).
    pub fn begin_write_protect(&self, guard: Arc<dyn WriteGuard>) -> Result<(), PagerError> {
        let shared = &self.shared;
        if shared.stop.load(Ordering::Acquire) {
            return Err(PagerError::Stopped);
        }
        // No swap-out batch runs while the protection begins, and none starts while it is in
        // force (they would unprotect its pages).
        let _batch = shared.swap_batch.lock().unwrap_or_else(|e| e.into_inner());
        if shared.protection.active() {
            return Err(PagerError::ProtectionActive);
        }
        register_write_protect(&shared.uffd, &shared.regions)?;
        shared.protection.begin(guard);
        Ok(())
    }

    /// Write-protects `count` pages of `region` from `first` on (under a protection begun
    /// with [`begin_write_protect`](Self::begin_write_protect)). Pages that are not present
    /// hold nothing to protect and stay as they are.
    pub fn protect(&self, region: usize, first: usize, count: usize) -> Result<(), PagerError> {
        self.change_protection(region, first, count, true)
    }

    /// Lets writes to `count` pages of `region` from `first` on through again, waking any
    /// writer waiting on them.
    pub fn unprotect(&self, region: usize, first: usize, count: usize) -> Result<(), PagerError> {
        self.change_protection(region, first, count, false)
    }

    fn change_protection(
        &self,
        region: usize,
        first: usize,
        count: usize,
        protect: bool,
    ) -> Result<(), PagerError> {
        let r = self.region(region)?;
        let shared = &self.shared;
        if protect && !shared.protection.active() {
            return Err(PagerError::WriteProtect(
                "no write protection was begun (begin_write_protect)".into(),
            ));
        }
        if first.checked_add(count).is_none_or(|end| end > r.pages()) {
            return Err(PagerError::WriteProtect(format!(
                "pages [{first}, +{count}) are outside region {region} ({} pages)",
                r.pages()
            )));
        }
        if count == 0 {
            return Ok(());
        }
        shared
            .set_protection(r.addr_of(first), count as u64 * r.page_size, protect, None)
            .map_err(|e| PagerError::WriteProtect(e.to_string()))
    }

    /// Ends the write protection: every page of every region is unprotected (also those the
    /// caller did not get to) and the guard is dropped. Returns what the protection cost the
    /// guest, and the first region that could not be unprotected, if any.
    pub fn end_write_protect(&self) -> (ProtectStats, Result<(), PagerError>) {
        let shared = &self.shared;
        let mut result = Ok(());
        for (index, region) in shared.regions.iter().enumerate() {
            if !region.write_protect_registered.load(Ordering::Acquire) {
                continue;
            }
            if let Err(e) = self.change_protection(index, 0, region.pages(), false) {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        (shared.protection.end(), result)
    }

    /// What the write protection in force (or the last one) has cost so far.
    pub fn protect_stats(&self) -> ProtectStats {
        self.shared.protection.stats()
    }

    /// Number of regions.
    pub fn regions(&self) -> usize {
        self.shared.regions.len()
    }

    /// The userfaultfd's descriptor number, for fault-injection tests (replacing it with
    /// another file makes the fault threads' reads fail as a real kernel error would). Not
    /// for anything else: the pager owns the descriptor.
    #[doc(hidden)]
    pub fn userfaultfd_raw_fd(&self) -> RawFd {
        self.shared.uffd.as_raw_fd()
    }
}

/// Registers every region in write-protect mode too, where it is not yet: again on the same
/// userfaultfd, which adds the mode (missing faults go on being served throughout). A region
/// keeps its registration afterwards: without protected pages it costs nothing.
fn register_write_protect(uffd: &Uffd, regions: &[Region]) -> Result<(), PagerError> {
    if !uffd.features().contains(Features::WP_HUGETLBFS_SHMEM) {
        return Err(PagerError::WriteProtect(
            "the kernel's userfaultfd cannot write-protect shared memory (no WP_HUGETLBFS_SHMEM)"
                .into(),
        ));
    }
    for region in regions {
        if region.write_protect_registered.load(Ordering::Acquire) {
            continue;
        }
        // SAFETY: the range was registered by `PagerBuilder::region` (whose contract covers
        // it); the pager serves its write-protect faults from now on.
        unsafe {
            uffd.register(
                region.start,
                region.len,
                RegisterMode::MISSING | RegisterMode::WP,
            )
        }
        .map_err(|source| PagerError::Register {
            start: region.start,
            len: region.len,
            source,
        })?;
        region
            .write_protect_registered
            .store(true, Ordering::Release);
    }
    Ok(())
}

/// What a page holds, as the pager knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// In memory: installed, or resident when its region was added.
    Present,
    /// Still in the region's source (not installed yet).
    InSource,
    /// Swapped out: in the swap file.
    Swapped,
    /// Removed since (madvise, balloon): it reads as zero.
    Discarded,
}

/// A running pager. Dropping it stops its threads and unregisters its regions.
pub struct Pager {
    handle: PagerHandle,
    threads: Vec<JoinHandle<()>>,
}

impl Pager {
    pub fn handle(&self) -> PagerHandle {
        self.handle.clone()
    }

    /// Stops the threads, unregisters the regions (a later touch of a page never installed
    /// reads what the memory holds: a hole reads as zero) and returns the final stats.
    pub fn shutdown(mut self) -> Stats {
        self.stop_threads();
        self.handle.stats()
    }

    fn stop_threads(&mut self) {
        let shared = &self.handle.shared;
        shared.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&shared.stop_evt, &1u64.to_ne_bytes());
        {
            let _queue = shared.background.lock().unwrap_or_else(|e| e.into_inner());
            shared.background_cv.notify_all();
        }
        shared.wake_evictor();
        // A fault thread waiting in a fetch that may never be answered gives up.
        for region in &shared.regions {
            region.source.stop();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // Nobody serves the regions any more: unregister them, so that a later touch of a
        // page the pager never installed (one known zero, say) reads the memfd's hole (zero)
        // instead of waiting forever. (A region with write protection loses it too.)
        for region in &shared.regions {
            let _ = shared.uffd.unregister(region.start, region.len);
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

impl std::ops::Deref for Pager {
    type Target = PagerHandle;
    fn deref(&self) -> &PagerHandle {
        &self.handle
    }
}
