//! The fault service: the one install path, the fault threads and the background worker.
//!
//! A fault thread reads events from the userfaultfd into its own queue and dispatches them in
//! that order, by kind: a missing fault joins an install already in flight for its page (that
//! install wakes it) or claims the page, fetches it from the region's source and installs it;
//! remove events are applied at the moment they are read. Background work (prefetch, fill)
//! and caller-held pages (a working set) use the same claim-fetch-install path.
//!
//! Liveness: every claimed page ends installed or poisoned, and the ioctl that does it wakes
//! the threads waiting on it; a claim is released only after that. The one exception is a
//! page installed ahead of a toucher (speculatively) that cannot be had: its claim is
//! released and its waiters woken, so that they fault again and their own install settles
//! it. A fault thread that can no longer read its userfaultfd is a fatal error under every
//! policy.
//!
//! Remove versus install: the kernel lets `madvise` zap pages as soon as the remove event is
//! *read*, so an install whose copy lands after the zap would leave stale contents. Installs
//! therefore decide a page's content and install it under `event_gate` held shared, and event
//! reads hold it exclusively and mark removed pages discarded before releasing it: an install
//! either lands before the read (and the zap removes it) or starts after it and installs zeros.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use uffd::{Event, Outcome, Uffd, UffdError};

use crate::predict::Predictor;
use crate::region::Region;
use crate::source::{Content, SourceError};
use crate::stats::{Counters, FaultOrigin};
use crate::{FailurePolicy, PagerConfig};

/// The first wait after an install is refused with EAGAIN; it doubles up to the cap.
const AGAIN_FIRST_WAIT: Duration = Duration::from_micros(20);
const AGAIN_MAX_WAIT: Duration = Duration::from_millis(5);
/// How long an install keeps retrying EAGAIN before it is treated as an error (the condition
/// clears when a fault thread reads the pending remove event: only a dead reader keeps it).
const AGAIN_GIVE_UP: Duration = Duration::from_secs(30);

/// A source whose page reads take this long on average (a network store, a cold disk) may be
/// read in spans: one read brings many predicted pages, if the wait, not the bytes, is the
/// cost (see [`Shared::span_reads`]).
const SLOW_READ: Duration = Duration::from_micros(50);
/// The longest span read for predicted pages, in pages (2 MiB of 4 KiB pages).
const MAX_SPAN_PAGES: usize = 512;

/// Called with the message of a fatal error.
pub(crate) type FatalCallback = Box<dyn Fn(&str) + Send + Sync>;

/// A job for the background worker: `count` pages of `region` from `first`, `stride` apart
/// (1: a contiguous range; never 0).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub region: usize,
    pub first: usize,
    pub count: usize,
    pub stride: usize,
}

/// The background worker's queues: pages predicted ahead of a toucher come before fill.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    pub ahead: VecDeque<Job>,
    pub fill: VecDeque<Job>,
}

/// State shared by the pager's threads.
pub(crate) struct Shared {
    pub uffd: Uffd,
    pub regions: Vec<Region>,
    pub config: PagerConfig,
    pub counters: Counters,
    pub stop: AtomicBool,
    pub stop_evt: std::os::fd::OwnedFd,
    /// Faults read but not yet answered: background fill waits while this is non-zero.
    pub urgent_pending: AtomicU64,
    /// The background worker waits (on `background_cv`) for `urgent_pending` to reach zero:
    /// the fault thread that brings it there wakes it.
    pub fill_waits_for_faults: AtomicBool,
    pub background: Mutex<Jobs>,
    pub background_cv: Condvar,
    /// Follows each toucher's faults and says what to install ahead (`None`: prediction off).
    pub predictor: Option<Mutex<Predictor>>,
    /// The time a one-page source read takes, in nanoseconds (a moving average).
    pub page_read_ns: AtomicU64,
    /// The time a span read takes per page it brings that was wanted, in nanoseconds (a
    /// moving average; 0 until one is made).
    pub span_read_ns: AtomicU64,
    pub vcpu_threads: Mutex<Vec<u32>>,
    pub fatal: Mutex<Option<String>>,
    pub on_fatal: Option<FatalCallback>,
    /// (region, page) of each fault that claimed its page, when recording.
    pub fault_log: Mutex<Vec<(usize, usize)>>,
    /// Shared by installs while they decide and install a page's content; exclusive while
    /// events are read and remove events applied (see the module documentation).
    pub event_gate: RwLock<()>,
    /// The write protection in force (a live snapshot), if any.
    pub protection: crate::protect::Protection,
    /// Where swapped-out pages go (`PagerBuilder::swap_file`).
    pub swap: Option<crate::swap::SwapFile>,
    /// Held by a swap-out batch while it takes its pages, so that a write protection begins
    /// only between batches.
    pub swap_batch: Mutex<()>,
    /// The pages a swap-out batch protects now: (region, first, end). A write-protect fault
    /// on one is left to the batch, whose unprotect wakes the writer.
    pub swap_range: Mutex<Option<(usize, usize, usize)>>,
    pub swap_counters: crate::swap::SwapCounters,
    /// The resident limit's evictor.
    pub limiter: crate::limit::Limiter,
}

/// Why an install could not complete.
#[derive(Debug)]
pub(crate) enum InstallError {
    Source(SourceError),
    Uffd(UffdError),
    /// EAGAIN did not clear (no fault thread read the pending event).
    AgainForever(Duration),
    /// The pager is stopping.
    Stopped,
}

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallError::Source(e) => write!(f, "page source failed: {e}")?,
            InstallError::Uffd(e) => write!(f, "install failed: {e}")?,
            InstallError::AgainForever(waited) => write!(
                f,
                "the address space kept changing (EAGAIN) for {waited:?}: no fault thread read the pending event"
            )?,
            InstallError::Stopped => write!(f, "the pager stopped before the page was installed")?,
        }
        // The causes, on one line: these messages end up in logs and fatal errors.
        let mut source = match self {
            InstallError::Source(e) => std::error::Error::source(e),
            InstallError::Uffd(e) => std::error::Error::source(e),
            _ => None,
        };
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// The events a fault thread has read and not dispatched yet, in order.
#[derive(Default)]
pub(crate) struct EventQueue {
    pending: VecDeque<Event>,
    scratch: Vec<Event>,
    /// When the last batch was read: a write-protect fault's stall is counted from there.
    read_at: Option<Instant>,
}

/// Who is installing: a fault thread reads the userfaultfd itself when an install is refused
/// because the address space is changing; any other thread waits for a fault thread to do it.
enum Role<'q> {
    FaultThread(&'q mut EventQueue),
    Other,
}

/// What an install needs besides the pages: who installs, for which queue, and a buffer.
/// Installs by a fault thread count as urgent, all others as background.
pub(crate) struct InstallContext<'q> {
    role: Role<'q>,
    /// Installs ahead of a toucher that nobody asked for yet: a page that cannot be had is
    /// left to its toucher's own fault (see [`Shared::install_claimed`]).
    speculative: bool,
    buf: Vec<u8>,
}

impl InstallContext<'static> {
    /// For a thread that is not a fault thread (background worker, working-set installer).
    pub(crate) fn other() -> Self {
        InstallContext {
            role: Role::Other,
            speculative: false,
            buf: Vec::new(),
        }
    }

    /// For the background worker's installs of predicted pages.
    fn ahead() -> Self {
        InstallContext {
            speculative: true,
            ..Self::other()
        }
    }
}

impl InstallContext<'_> {
    /// `len` bytes of the buffer from byte `at`, grown to hold them.
    fn buffer(&mut self, at: usize, len: usize) -> &mut [u8] {
        if self.buf.len() < at + len {
            self.buf.resize(at + len, 0);
        }
        &mut self.buf[at..at + len]
    }
}

/// Where the bytes of a run come from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bytes {
    Zero,
    /// A host address holding the run's bytes (a mapped source, or pages the caller holds).
    Address(u64),
    /// The context's buffer.
    Buffer,
}

/// What [`Shared::fill`] did with a claimed run.
#[derive(Default)]
struct Filled {
    /// Pages from the first that are now present (installed, or found present).
    done: usize,
    /// Of those, the pages this call installed.
    installed: usize,
    error: Option<InstallError>,
}

impl Shared {
    pub(crate) fn find_region(&self, addr: u64) -> Option<usize> {
        self.regions.iter().position(|r| r.contains(addr))
    }

    fn origin(&self, thread_id: u32) -> FaultOrigin {
        let vcpus = self.vcpu_threads.lock().unwrap_or_else(|e| e.into_inner());
        if vcpus.contains(&thread_id) {
            FaultOrigin::Vcpu
        } else {
            FaultOrigin::OtherThread
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Claims up to `max` contiguous pages from `first` that are neither present nor in flight
    /// and share `first`'s discarded state. Returns how many were claimed (0: `first` was
    /// taken).
    pub(crate) fn claim_run(&self, region: &Region, first: usize, max: usize) -> usize {
        if region.present.get(first) || !region.inflight.test_and_set(first) {
            return 0;
        }
        self.extend_claim(region, first, max)
    }

    /// Claims the page a missing fault is for, and up to `max - 1` more after it like
    /// [`claim_run`](Self::claim_run), even if the presence map says it is there: the fault
    /// proves the kernel has no page (a remove can zap an install that landed after its event
    /// was read but before the zap), and an install that finds the page there after all gets
    /// EEXIST, which wakes the thread. Returns 0 if the page is in flight (the fault joins).
    fn claim_fault(&self, region: &Region, page: usize, max: usize) -> usize {
        if !region.inflight.test_and_set(page) {
            return 0;
        }
        region.present.clear(page);
        self.extend_claim(region, page, max)
    }

    /// With `first` claimed: claims the pages after it that are absent, not in flight and
    /// share its discarded state, up to `max` in all. Returns the run's length.
    fn extend_claim(&self, region: &Region, first: usize, max: usize) -> usize {
        let discarded = region.discarded.get(first);
        let swapped = region.swapped.get(first);
        let mut count = 1;
        while count < max && first + count < region.pages() {
            let page = first + count;
            if region.present.get(page)
                || region.discarded.get(page) != discarded
                || region.swapped.get(page) != swapped
                || !region.inflight.test_and_set(page)
            {
                break;
            }
            count += 1;
        }
        count
    }

    fn release(&self, region: &Region, first: usize, count: usize) {
        for page in first..first + count {
            region.inflight.clear(page);
        }
    }

    /// Gives up a speculative claim on `count` pages from `first`, of which those from `from`
    /// were not installed: the claim is released, then the threads waiting on those pages are
    /// woken, to fault again and have their own install settle them.
    fn abandon(&self, region: &Region, first: usize, count: usize, from: usize) {
        self.release(region, first, count);
        let len = (first + count - from) as u64 * region.page_size;
        let _ = self.uffd.wake(region.addr_of(from), len);
    }

    /// Claims `page` for an install ahead of its toucher, unless the guest discarded it (its
    /// next touch installs it) or it is present or in flight: up to `max` pages from it.
    fn claim_ahead(&self, region: &Region, page: usize, max: usize) -> usize {
        if region.discarded.get(page) {
            return 0;
        }
        self.claim_run(region, page, max)
    }

    /// The single install path for `count` claimed pages of region `index` from `first`:
    /// fetch (unless `given` holds the bytes), install, and poison whatever could not be
    /// installed, exactly those pages. Every page ends present or poisoned, with its waiters
    /// woken; the claim is released last. A speculative context (pages predicted ahead) does
    /// not poison: it releases what it could not install and wakes its waiters to fault
    /// again. Returns the pages this call installed.
    pub(crate) fn install_claimed(
        &self,
        index: usize,
        first: usize,
        count: usize,
        ctx: &mut InstallContext<'_>,
        given: Option<Bytes>,
    ) -> usize {
        let region = &self.regions[index];
        let filled = self.fill(region, first, count, ctx, given);
        let mut installed = filled.installed;
        match filled.error {
            None => {}
            // A predicted page that cannot be had is not this install's to fail: the claim is
            // released and any toucher that joined it woken, to fault again; that fault's
            // install fails the page under the pager's policy, once, if it is ever touched.
            Some(error) if ctx.speculative => {
                let from = first + filled.done;
                tracing::debug!(
                    "pager: pages {from}..{} of region {index} were not installed ahead: {error}",
                    first + count
                );
                self.abandon(region, first, count, from);
                return installed;
            }
            // A multi-page fetch that failed: one bad page must not take its neighbours down,
            // so each page is tried on its own and only those that fail are poisoned.
            Some(InstallError::Source(_)) if filled.done == 0 && count > 1 => {
                for page in first..first + count {
                    let single = self.fill(region, page, 1, ctx, None);
                    installed += single.installed;
                    if let Some(error) = single.error {
                        self.fail_pages(region, page, 1, &error, ctx);
                    }
                }
            }
            Some(error) => {
                let from = first + filled.done;
                self.fail_pages(region, from, first + count - from, &error, ctx);
            }
        }
        self.release(region, first, count);
        installed
    }

    /// Fetches and installs a claimed run, stopping at the first error.
    fn fill(
        &self,
        region: &Region,
        first: usize,
        count: usize,
        ctx: &mut InstallContext<'_>,
        given: Option<Bytes>,
    ) -> Filled {
        let page_size = region.page_size;
        let mut filled = Filled::default();
        let mut bytes = match self.run_bytes(region, first, count, ctx, given) {
            Ok(bytes) => bytes,
            Err(error) => {
                filled.error = Some(error);
                return filled;
            }
        };
        let mut again = AgainWait::new();
        while filled.done < count {
            let gate = self.event_gate.read().unwrap_or_else(|e| e.into_inner());
            let page = first + filled.done;
            // Pages removed since the fetch are zero now (see the module documentation).
            let discarded = region.discarded.get(page);
            let mut run = 1;
            while filled.done + run < count && region.discarded.get(page + run) == discarded {
                run += 1;
            }
            let addr = region.addr_of(page);
            let run_len = run as u64 * page_size;
            let skip = filled.done * page_size as usize;
            Counters::add(&self.counters.install_ioctls, 1);
            // SAFETY: `addr` lies in a region registered with this userfaultfd, whose builder
            // took responsibility for its pages (`PagerBuilder::region`); this thread holds the
            // claim on these pages, and UFFDIO_COPY/ZEROPAGE never overwrite a present page.
            let outcome = unsafe {
                match (discarded, bytes) {
                    (true, _) | (false, Bytes::Zero) => self.uffd.zeropage(addr, run_len, false),
                    (false, Bytes::Address(src)) => self.uffd.copy_from_addr(
                        addr,
                        src + skip as u64,
                        run_len,
                        uffd::CopyMode::default(),
                    ),
                    (false, Bytes::Buffer) => self.uffd.copy(
                        addr,
                        &ctx.buf[skip..skip + run_len as usize],
                        uffd::CopyMode::default(),
                    ),
                }
            };
            let zero = discarded || bytes == Bytes::Zero;
            match outcome {
                Ok(Outcome::Done) => self.installed(region, page, run, zero, ctx, &mut filled),
                Ok(Outcome::Exists { done }) => {
                    // The page at `done` is there already: count it present, never overwrite
                    // it, and wake whoever waits on it.
                    Counters::add(&self.counters.eexist, 1);
                    let k = (done / page_size) as usize;
                    self.installed(region, page, k, zero, ctx, &mut filled);
                    region.present.set(page + k);
                    region.swapped.clear(page + k);
                    filled.done += 1;
                    let _ = self.uffd.wake(region.addr_of(page + k), region.page_size);
                }
                Ok(Outcome::Again { done }) => {
                    Counters::add(&self.counters.eagain, 1);
                    let k = (done / page_size) as usize;
                    self.installed(region, page, k, zero, ctx, &mut filled);
                    if k == 0 {
                        // The address space is changing: a remove event waits to be read.
                        drop(gate);
                        if let Err(error) = self.wait_out_again(&mut again, ctx) {
                            filled.error = Some(error);
                            return filled;
                        }
                    }
                }
                Err(e)
                    if is_efault(&e)
                        && given.is_none()
                        && !discarded
                        && matches!(bytes, Bytes::Address(_)) =>
                {
                    // The source's mapping could not be read (its file shrank, say): read the
                    // rest through `fetch`, whose error names the cause.
                    drop(gate);
                    match self.fetch(region, page, count - filled.done, skip, ctx) {
                        Ok(fetched) => bytes = fetched,
                        Err(error) => {
                            filled.error = Some(error);
                            return filled;
                        }
                    }
                }
                Err(e) => {
                    filled.error = Some(InstallError::Uffd(e));
                    return filled;
                }
            }
        }
        filled
    }

    /// Where the bytes of a claimed run come from, by what its pages are now: zeros for a
    /// discarded run (its true contents whatever the source holds), the swap file for a
    /// swapped run, the caller's bytes, the source's mapping, or a fetch into the context's
    /// buffer. Claims do not mix kinds (`extend_claim`), but a remove can land after the
    /// claim: a run that became mixed is assembled page kind by page kind in the buffer.
    /// (Pages removed after this decision are zeroed by `fill`, under the event gate.)
    fn run_bytes(
        &self,
        region: &Region,
        first: usize,
        count: usize,
        ctx: &mut InstallContext<'_>,
        given: Option<Bytes>,
    ) -> Result<Bytes, InstallError> {
        let len = count as u64 * region.page_size;
        let kind = |p: usize| PageKind::of(region, p);
        let first_kind = kind(first);
        let uniform = (first + 1..first + count).all(|p| kind(p) == first_kind);
        match (uniform, first_kind, given) {
            (true, PageKind::Zero, _) => Ok(Bytes::Zero),
            // The caller's bytes are the source's: never for a swapped page.
            (_, _, Some(bytes)) if (first..first + count).all(|p| kind(p) != PageKind::Swapped) => {
                Ok(bytes)
            }
            (true, PageKind::Swapped, _) => {
                self.read_swapped(region, first, count, 0, ctx)?;
                Ok(Bytes::Buffer)
            }
            (true, PageKind::Source, None) => {
                let offset = first as u64 * region.page_size;
                match region.source.mapped_addr(offset, len) {
                    Some(addr) => Ok(Bytes::Address(addr)),
                    None => self.fetch(region, first, count, 0, ctx),
                }
            }
            _ => {
                let page_len = region.page_size as usize;
                if ctx.buf.len() < count * page_len {
                    ctx.buf.resize(count * page_len, 0);
                }
                let mut done = 0;
                while done < count {
                    let k = kind(first + done);
                    let mut n = 1;
                    while done + n < count && kind(first + done + n) == k {
                        n += 1;
                    }
                    let at = done * page_len;
                    match k {
                        PageKind::Zero => ctx.buf[at..at + n * page_len].fill(0),
                        PageKind::Swapped => self.read_swapped(region, first + done, n, at, ctx)?,
                        PageKind::Source => {
                            if self.fetch(region, first + done, n, at, ctx)? == Bytes::Zero {
                                ctx.buf[at..at + n * page_len].fill(0);
                            }
                        }
                    }
                    done += n;
                }
                Ok(Bytes::Buffer)
            }
        }
    }

    /// Reads `count` swapped pages from `first` out of their slots into the context's buffer
    /// at byte `at`, each checked against its checksum.
    fn read_swapped(
        &self,
        region: &Region,
        first: usize,
        count: usize,
        at: usize,
        ctx: &mut InstallContext<'_>,
    ) -> Result<(), InstallError> {
        let swap = self
            .swap
            .as_ref()
            .expect("pages are swapped only with a swap file");
        let buf = ctx.buffer(at, count * region.page_size as usize);
        swap.read(region.swap_base + first as u64, buf)
            .map_err(InstallError::Source)
    }

    /// Fetches `count` pages from `first` into the context's buffer at byte `at` (where the
    /// run's bytes for `first` belong when it continues a run).
    fn fetch(
        &self,
        region: &Region,
        first: usize,
        count: usize,
        at: usize,
        ctx: &mut InstallContext<'_>,
    ) -> Result<Bytes, InstallError> {
        let offset = first as u64 * region.page_size;
        let average = (count == 1).then_some(&self.page_read_ns);
        let buf = ctx.buffer(at, count * region.page_size as usize);
        match self.timed_fetch(region, offset, buf, average, 1) {
            Ok(Content::Data) => Ok(Bytes::Buffer),
            Ok(Content::Zero) => Ok(Bytes::Zero),
            Err(e) => Err(InstallError::Source(e)),
        }
    }

    /// Reads from the region's source; with `average`, folds the time it took per `wanted`
    /// page into that moving average (over about the last eight reads; racing updates lose a
    /// sample, which is harmless).
    fn timed_fetch(
        &self,
        region: &Region,
        offset: u64,
        buf: &mut [u8],
        average: Option<&AtomicU64>,
        wanted: usize,
    ) -> Result<Content, SourceError> {
        let Some(average) = average else {
            return region.source.fetch(offset, buf);
        };
        let began = Instant::now();
        let result = region.source.fetch(offset, buf);
        let took = began.elapsed().as_nanos() as u64 / wanted as u64;
        let before = average.load(Ordering::Relaxed);
        let after = if before == 0 {
            took
        } else {
            before - before / 8 + took / 8
        };
        average.store(after, Ordering::Relaxed);
        result
    }

    /// Whether page reads are slow (see [`SLOW_READ`]).
    fn slow_reads(&self) -> bool {
        self.page_read_ns.load(Ordering::Relaxed) >= SLOW_READ.as_nanos() as u64
    }

    /// Whether predicted pages are read in spans: page reads are slow, and a span read costs
    /// less per page it brings that was wanted than a page read, as it does when the source's
    /// latency, not its bandwidth, is the cost. Tried once page reads turn slow; a source
    /// whose spans do not pay (a disk that reads them at its bandwidth) is read page by page.
    fn span_reads(&self) -> bool {
        let span = self.span_read_ns.load(Ordering::Relaxed);
        self.slow_reads() && (span == 0 || span < self.page_read_ns.load(Ordering::Relaxed))
    }

    /// Marks `run` pages from `page` installed (present), under the event gate.
    fn installed(
        &self,
        region: &Region,
        page: usize,
        run: usize,
        zero: bool,
        ctx: &InstallContext<'_>,
        filled: &mut Filled,
    ) {
        let mut swapped_in = 0;
        let recency = region.referenced.len() > 0;
        for p in page..page + run {
            region.present.set(p);
            if recency {
                region.referenced.set(p);
            }
            if region.swapped.get(p) {
                region.swapped.clear(p);
                swapped_in += 1;
            }
        }
        Counters::add(&self.swap_counters.swapped_in, swapped_in);
        let counter = match ctx.role {
            Role::FaultThread(_) => &self.counters.pages_installed_urgent,
            Role::Other => &self.counters.pages_installed_background,
        };
        Counters::add(counter, run as u64);
        if zero {
            Counters::add(&self.counters.zero_pages, run as u64);
        } else {
            Counters::add(&self.counters.bytes_copied, run as u64 * region.page_size);
        }
        filled.done += run;
        filled.installed += run;
    }

    /// After EAGAIN: a fault thread reads the pending events itself (faults are queued for
    /// later, in order; removes are applied); any other thread backs off until a fault thread
    /// has. Gives up when the pager stops or the condition outlasts [`AGAIN_GIVE_UP`].
    fn wait_out_again(
        &self,
        again: &mut AgainWait,
        ctx: &mut InstallContext<'_>,
    ) -> Result<(), InstallError> {
        let queue = match &mut ctx.role {
            Role::FaultThread(queue) => Some(&mut **queue),
            Role::Other => None,
        };
        self.wait_out_again_with(again, queue)
    }

    /// [`wait_out_again`](Self::wait_out_again) for any ioctl refused with EAGAIN: `queue`
    /// is the calling fault thread's own (`None` on any other thread).
    pub(crate) fn wait_out_again_with(
        &self,
        again: &mut AgainWait,
        queue: Option<&mut EventQueue>,
    ) -> Result<(), InstallError> {
        if self.stopping() {
            return Err(InstallError::Stopped);
        }
        if let Some(queue) = queue {
            match self.read_events(queue) {
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(InstallError::Uffd(e)),
            }
        }
        again.wait().map_err(InstallError::AgainForever)
    }

    /// The explicit answer to pages that cannot be had: poison them (the toucher gets
    /// SIGBUS, a kernel access EFAULT), record the error, and apply the failure policy.
    fn fail_pages(
        &self,
        region: &Region,
        first: usize,
        count: usize,
        error: &InstallError,
        ctx: &mut InstallContext<'_>,
    ) {
        Counters::add(&self.counters.source_errors, 1);
        let addr = region.addr_of(first);
        let message = format!(
            "pages {:#x}..{:#x}: {error}",
            addr,
            addr + count as u64 * region.page_size
        );
        // Tell the VMM first, so that it stops the VM before the toucher resumes with an error;
        // unless the pager is stopping, which fails whatever it was still fetching (its
        // sources are told to give up): that is the end of the run, not a memory failure.
        if self.stopping() {
            tracing::debug!("pager: stopped before it provided {message}");
        } else {
            tracing::error!("pager: {message}");
            if self.config.failure_policy == FailurePolicy::Stop {
                self.report_fatal(&message);
            }
        }
        let mut done = 0;
        let mut again = AgainWait::new();
        while done < count {
            let gate = self.event_gate.read().unwrap_or_else(|e| e.into_inner());
            let page = first + done;
            let len = (count - done) as u64 * region.page_size;
            // SAFETY: as for installs: a registered region's claimed pages; poisoning never
            // touches a present page.
            let outcome = unsafe { self.uffd.poison(region.addr_of(page), len, false) };
            let (poisoned, skip) = match outcome {
                Ok(Outcome::Done) => (count - done, 0),
                // A present page (installed before the failure): skip it.
                Ok(Outcome::Exists { done: d }) => ((d / region.page_size) as usize, 1),
                Ok(Outcome::Again { done: d }) => {
                    let k = (d / region.page_size) as usize;
                    if k == 0 {
                        drop(gate);
                        if let Err(e) = self.wait_out_again(&mut again, ctx) {
                            self.poison_failed(region, page, count - done, &e.to_string());
                            return;
                        }
                    }
                    (k, 0)
                }
                Err(e) => {
                    drop(gate);
                    self.poison_failed(region, page, count - done, &e.to_string());
                    return;
                }
            };
            for p in page..page + poisoned + skip {
                region.present.set(p);
            }
            Counters::add(&self.counters.pages_poisoned, poisoned as u64);
            done += poisoned + skip;
        }
    }

    /// Poisoning itself failed: nothing can answer these pages' waiters but stopping the VM,
    /// then waking them (they fault again and the VM is already stopping).
    fn poison_failed(&self, region: &Region, page: usize, count: usize, reason: &str) {
        let addr = region.addr_of(page);
        if !self.stopping() {
            self.report_fatal(&format!(
                "cannot poison pages {:#x}..{:#x} that could not be provided: {reason}",
                addr,
                addr + count as u64 * region.page_size
            ));
        }
        let _ = self.uffd.wake(addr, count as u64 * region.page_size);
    }

    /// Records the first fatal error and tells the VMM (once).
    pub(crate) fn report_fatal(&self, message: &str) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if fatal.is_none() {
            *fatal = Some(message.to_string());
            if let Some(callback) = &self.on_fatal {
                callback(message);
            }
        }
    }

    /// A fault thread lost its userfaultfd: fatal under every policy. The regions are
    /// unregistered so that no toucher stays blocked on a fault nobody will serve, and the
    /// pager's threads stop; the VMM must not report success after this.
    fn fail_fault_thread(&self, message: String) {
        tracing::error!("pager: {message}");
        self.report_fatal(&message);
        for region in &self.regions {
            let _ = self.uffd.unregister(region.start, region.len);
        }
        let _queue = self.background.lock().unwrap_or_else(|e| e.into_inner());
        self.stop.store(true, Ordering::Release);
        self.background_cv.notify_all();
    }

    /// Installs `data` (whole pages) at `first` onward in region `index`, skipping pages that
    /// are present or being installed: those hold what the guest has seen, never to be
    /// overwritten. Returns how many pages this call installed.
    pub(crate) fn install_given(&self, index: usize, first: usize, data: &[u8]) -> usize {
        let page_size = self.regions[index].page_size as usize;
        self.install_run(index, first, data.len() / page_size, |page| {
            Bytes::Address(data[(page - first) * page_size..].as_ptr() as u64)
        })
    }

    /// Installs `count` zero pages from `first` (UFFDIO_ZEROPAGE: nothing is copied), on the
    /// calling thread; pages present or in flight are left alone.
    pub(crate) fn install_zero(&self, index: usize, first: usize, count: usize) -> usize {
        self.install_run(index, first, count, |_| Bytes::Zero)
    }

    /// Installs `count` pages from `first` on the calling thread, the bytes of a run that
    /// starts at page `p` being `bytes(p)`, skipping pages present or in flight. Returns how
    /// many pages this call installed.
    fn install_run(
        &self,
        index: usize,
        first: usize,
        count: usize,
        bytes: impl Fn(usize) -> Bytes,
    ) -> usize {
        let region = &self.regions[index];
        let end = first.saturating_add(count).min(region.pages());
        let mut ctx = InstallContext::other();
        let mut installed = 0;
        let mut page = first;
        while page < end && !self.stopping() {
            let run = self.claim_run(region, page, end - page);
            if run == 0 {
                page += 1;
                continue;
            }
            installed += self.install_claimed(index, page, run, &mut ctx, Some(bytes(page)));
            page += run;
        }
        installed
    }

    /// Serves one missing fault.
    fn serve_missing(
        &self,
        address: u64,
        thread_id: u32,
        queue: &mut EventQueue,
        buf: &mut Vec<u8>,
    ) {
        let started = Instant::now();
        let Some(index) = self.find_region(address) else {
            tracing::warn!("pager: fault at {address:#x} outside every region");
            let _ = self
                .uffd
                .wake(address & !(uffd::PAGE_SIZE - 1), uffd::PAGE_SIZE);
            return;
        };
        let region = &self.regions[index];
        let page = region.page_of(address);
        if region.present.get(page) && region.is_resident(page) {
            // Read in a batch before another thread installed the page (a stream, a
            // prefetch), and over: its thread is woken, and nothing is fetched again (after a
            // migration there is no source left to fetch it from).
            Counters::add(&self.counters.faults_joined, 1);
            let _ = self.uffd.wake(region.addr_of(page), region.page_size);
            return;
        }
        let readahead = self.config.readahead_pages.max(1);
        self.make_room(readahead as u64);
        let count = self.claim_fault(region, page, readahead);
        if count == 0 {
            // Another thread's install is in flight: it wakes the faulting thread.
            Counters::add(&self.counters.faults_joined, 1);
            self.predict(thread_id, index, page);
            return;
        }
        if self.config.record_faults {
            self.fault_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((index, page));
        }
        let mut ctx = InstallContext {
            role: Role::FaultThread(queue),
            speculative: false,
            buf: std::mem::take(buf),
        };
        let from_swap = region.swapped.get(page);
        self.install_claimed(index, page, count, &mut ctx, None);
        *buf = ctx.buf;
        self.counters
            .record_fault(self.origin(thread_id), started.elapsed());
        if from_swap {
            self.swap_counters.record_swap_in(started.elapsed());
        }
        self.predict(thread_id, index, page);
    }

    /// Tells the predictor of a fault (after it was served: the toucher runs on meanwhile)
    /// and queues the pages it predicts, ahead of any fill.
    fn predict(&self, thread_id: u32, index: usize, page: usize) {
        let Some(predictor) = &self.predictor else {
            return;
        };
        let pages = self.regions[index].pages();
        let ahead = predictor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_fault(thread_id, index, page, pages);
        if let Some(ahead) = ahead {
            Counters::add(&self.counters.pages_predicted, ahead.count as u64);
            self.queue(
                Job {
                    region: index,
                    first: ahead.first,
                    count: ahead.count,
                    stride: ahead.stride,
                },
                true,
            );
        }
    }

    /// Queues a background job: ahead of the fill (predicted pages) or after it. An empty job
    /// is dropped.
    pub(crate) fn queue(&self, job: Job, ahead: bool) {
        if job.count == 0 {
            return;
        }
        self.counters
            .background_pending_pages
            .fetch_add(job.count as u64, Ordering::Relaxed);
        let mut jobs = self.background.lock().unwrap_or_else(|e| e.into_inner());
        if ahead {
            jobs.ahead.push_back(job);
        } else {
            jobs.fill.push_back(job);
        }
        drop(jobs);
        self.background_cv.notify_one();
    }

    /// A minor fault: no region is registered in minor mode (yet). Refused: the VM stops, and
    /// the thread is woken so that it does not wait forever.
    fn refuse_minor_fault(&self, address: u64) {
        let page = address & !(uffd::PAGE_SIZE - 1);
        self.report_fatal(&format!(
            "a minor fault at {address:#x}: the pager registers no memory in minor mode (yet), so this is a bug"
        ));
        let _ = self.uffd.wake(page, uffd::PAGE_SIZE);
    }

    /// Handles a remove (madvise DONTNEED/REMOVE, balloon) or an unmap: the pages are gone and
    /// read as zero from now on. Runs with the event gate held exclusively.
    fn apply_remove(&self, start: u64, end: u64) {
        for region in &self.regions {
            let lo = start.max(region.start);
            let hi = end.min(region.start + region.len);
            if lo >= hi {
                continue;
            }
            let first = region.page_of(lo);
            let last = region.page_of(hi - 1);
            for page in first..=last {
                region.discarded.set(page);
                region.swapped.clear(page);
                region.present.clear(page);
            }
            Counters::add(&self.counters.pages_removed, (last - first + 1) as u64);
        }
    }

    /// Reads the pending events (without blocking) with the event gate held exclusively:
    /// removes are applied at once, everything else joins the queue in order. Returns how
    /// many events were read.
    pub(crate) fn read_events(&self, queue: &mut EventQueue) -> Result<usize, UffdError> {
        let _gate = self.event_gate.write().unwrap_or_else(|e| e.into_inner());
        queue.scratch.clear();
        let n = self
            .uffd
            .read_events(&mut queue.scratch, self.config.events_per_read.max(1))?;
        queue.read_at = Some(Instant::now());
        if n > 0 {
            self.counters.note_batch(n as u64);
        }
        for event in queue.scratch.drain(..) {
            match event {
                Event::Remove { start, end } | Event::Unmap { start, end } => {
                    self.apply_remove(start, end)
                }
                Event::PageFault { .. } => {
                    self.urgent_pending.fetch_add(1, Ordering::AcqRel);
                    queue.pending.push_back(event);
                }
                other => queue.pending.push_back(other),
            }
        }
        Ok(n)
    }

    /// Handles one queued event by kind.
    fn dispatch(&self, event: Event, queue: &mut EventQueue, buf: &mut Vec<u8>) {
        match event {
            Event::PageFault {
                address,
                wp,
                minor,
                thread_id,
                ..
            } => {
                if wp {
                    let read_at = queue.read_at.unwrap_or_else(Instant::now);
                    self.serve_write_protect(address, read_at, queue);
                } else if minor {
                    self.refuse_minor_fault(address);
                } else {
                    self.serve_missing(address, thread_id, queue, buf);
                }
                self.fault_answered();
            }
            // Applied when read (see `read_events`).
            Event::Remove { .. } | Event::Unmap { .. } => {}
            Event::Remap { from, to, len } => self.report_fatal(&format!(
                "guest memory [{from:#x}, +{len:#x}) was moved to {to:#x} by mremap: the pager serves fixed addresses"
            )),
            // Not asked for (no UFFD_FEATURE_EVENT_FORK); the child's descriptor is closed.
            Event::Fork { uffd } => {
                tracing::warn!("pager: closing the userfaultfd of a forked child");
                drop(uffd);
            }
            Event::Unknown(kind) => tracing::warn!("pager: ignoring unknown event {kind}"),
        }
    }

    /// Waits until the userfaultfd has events (true) or the pager stops (false).
    fn wait_for_events(&self) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop_evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ret >= 0 {
                return Ok(fds[1].revents == 0 && !self.stopping());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// A fault thread: wait for events, read them into its queue, dispatch them in order. A
    /// failure to wait or read is fatal (see [`fail_fault_thread`](Self::fail_fault_thread)).
    pub fn fault_loop(&self) {
        let mut queue = EventQueue::default();
        let mut buf = Vec::new();
        loop {
            if queue.pending.is_empty() {
                match self.wait_for_events() {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        self.fail_fault_thread(format!(
                            "the pager's fault thread cannot poll its userfaultfd: {e}"
                        ));
                        return;
                    }
                }
                if let Err(e) = self.read_events(&mut queue) {
                    let cause = std::error::Error::source(&e)
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default();
                    self.fail_fault_thread(format!(
                        "the pager's fault thread cannot read its userfaultfd: {e}{cause}"
                    ));
                    return;
                }
            }
            while let Some(event) = queue.pending.pop_front() {
                self.dispatch(event, &mut queue, &mut buf);
            }
            if self.stopping() {
                return;
            }
        }
    }

    /// Waits, interruptibly, until `deadline`; false if the pager stopped first.
    fn sleep_until(&self, deadline: Instant) -> bool {
        let mut queue = self.background.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.stopping() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            queue = self
                .background_cv
                .wait_timeout(queue, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits while faults are being served (fill comes after them; a core spent spinning here
    /// would be taken from the fault threads and vCPUs). Woken by `fault_answered` or a stop.
    fn wait_out_urgent_faults(&self) {
        if self.urgent_pending.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut queue = self.background.lock().unwrap_or_else(|e| e.into_inner());
        // Said before the count is looked at again, under the lock the wake-up takes: a fault
        // answered after this look wakes the wait, one answered before it ends it.
        self.fill_waits_for_faults.store(true, Ordering::SeqCst);
        while self.urgent_pending.load(Ordering::SeqCst) > 0 && !self.stopping() {
            queue = self
                .background_cv
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
        }
        self.fill_waits_for_faults.store(false, Ordering::SeqCst);
    }

    /// A fault read from the userfaultfd has been answered: the last one outstanding lets a
    /// waiting fill go on.
    fn fault_answered(&self) {
        if self.urgent_pending.fetch_sub(1, Ordering::SeqCst) == 1
            && self.fill_waits_for_faults.load(Ordering::SeqCst)
        {
            let _queue = self.background.lock().unwrap_or_else(|e| e.into_inner());
            self.background_cv.notify_all();
        }
    }

    /// The next background job (predicted pages first), waiting for one, and whether it is
    /// fill; `None` once the pager stops.
    fn next_job(&self) -> Option<(Job, bool)> {
        let mut queue = self.background.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.stopping() {
                return None;
            }
            if let Some(job) = queue.ahead.pop_front() {
                return Some((job, false));
            }
            if let Some(job) = queue.fill.pop_front() {
                return Some((job, true));
            }
            queue = self
                .background_cv
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The background worker: installs queued jobs in batches, fill after urgent faults;
    /// fill keeps to the configured rate.
    pub fn background_loop(&self) {
        let mut fill_ctx = InstallContext::other();
        let mut ahead_ctx = InstallContext::ahead();
        let started = Instant::now();
        let mut bytes_done: u64 = 0;
        let mut span = Vec::new();
        while let Some((job, fill)) = self.next_job() {
            let region = &self.regions[job.region];
            let stride = job.stride;
            let spans = self.span_reads();
            if stride > 1 && spans {
                self.install_spans(job, &mut span, &mut ahead_ctx);
                continue;
            }
            // Strided pages are claimed one by one; a contiguous range in batches (long ones
            // from a slow source).
            let batch = match (stride, spans) {
                (1, false) => self.config.background_batch_pages.max(1),
                (1, true) => MAX_SPAN_PAGES.max(self.config.background_batch_pages),
                _ => 1,
            };
            let mut page = job.first;
            let end = job
                .first
                .saturating_add(job.count.saturating_sub(1).saturating_mul(stride))
                .saturating_add(1)
                .min(region.pages());
            while page < end {
                if let Some(rate) = self.config.background_rate.filter(|_| fill) {
                    let due = Duration::from_secs_f64(bytes_done as f64 / rate as f64);
                    if !self.sleep_until(started + due) {
                        return;
                    }
                }
                // Urgent faults before fill: wait while any is being served (looked at after
                // the rate's wait, which faults may have come in). Predicted pages do not
                // wait: they are what the faulting toucher needs next.
                if fill {
                    self.wait_out_urgent_faults();
                }
                if self.stopping() {
                    return;
                }
                self.make_room(batch.min(end - page) as u64);
                let count = if fill {
                    self.claim_run(region, page, batch.min(end - page))
                } else {
                    self.claim_ahead(region, page, batch.min(end - page))
                };
                if count == 0 {
                    page += stride;
                    self.counters
                        .background_pending_pages
                        .fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
                let ctx = if fill { &mut fill_ctx } else { &mut ahead_ctx };
                self.install_claimed(job.region, page, count, ctx, None);
                if fill {
                    bytes_done += count as u64 * region.page_size;
                }
                self.counters
                    .background_pending_pages
                    .fetch_sub(count as u64, Ordering::Relaxed);
                page += if stride == 1 { count } else { stride };
            }
        }
    }
}

impl Shared {
    /// Installs the pages of a strided job from a slow source: the job's pages in each span of
    /// up to [`MAX_SPAN_PAGES`] are claimed (those absent, not in flight and not discarded;
    /// a toucher that faults on one meanwhile joins the claim instead of reading it again),
    /// the span is read in one read, and the claimed pages are installed from it, all
    /// speculatively (`ctx`): a span that cannot be read releases its claims and wakes their
    /// waiters, whose own faults then read and report.
    fn install_spans(&self, job: Job, span: &mut Vec<u8>, ctx: &mut InstallContext<'_>) {
        let region = &self.regions[job.region];
        let page_size = region.page_size as usize;
        let per_read = (MAX_SPAN_PAGES / job.stride).max(1);
        let mut done = 0;
        while done < job.count && !self.stopping() {
            let n = per_read.min(job.count - done);
            let first = job.first + done * job.stride;
            let claimed: Vec<usize> = (first..)
                .step_by(job.stride)
                .take(n)
                .filter(|&p| p < region.pages() && self.claim_ahead(region, p, 1) == 1)
                .collect();
            if let (Some(&lo), Some(&hi)) = (claimed.first(), claimed.last()) {
                span.resize((hi - lo + 1) * page_size, 0);
                let offset = (lo * page_size) as u64;
                let average = Some(&self.span_read_ns);
                match self.timed_fetch(region, offset, span, average, claimed.len()) {
                    Ok(content) => {
                        if content == Content::Zero {
                            span.fill(0);
                        }
                        for page in claimed {
                            let at = span[(page - lo) * page_size..].as_ptr() as u64;
                            self.install_claimed(
                                job.region,
                                page,
                                1,
                                ctx,
                                Some(Bytes::Address(at)),
                            );
                        }
                    }
                    Err(e) => {
                        tracing::debug!("pager: a predicted span could not be read: {e}");
                        for page in claimed {
                            self.abandon(region, page, 1, page);
                        }
                    }
                }
            }
            self.counters
                .background_pending_pages
                .fetch_sub(n as u64, Ordering::Relaxed);
            done += n;
        }
    }
}

/// What a page not present holds, for the install that brings it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageKind {
    /// Discarded: zero.
    Zero,
    /// In its swap-file slot.
    Swapped,
    /// In the region's source.
    Source,
}

impl PageKind {
    fn of(region: &Region, page: usize) -> PageKind {
        if region.discarded.get(page) {
            PageKind::Zero
        } else if region.swapped.get(page) {
            PageKind::Swapped
        } else {
            PageKind::Source
        }
    }
}

/// Exponential back-off for EAGAIN, with a limit on the total.
pub(crate) struct AgainWait {
    next: Duration,
    since: Option<Instant>,
}

impl AgainWait {
    pub(crate) fn new() -> Self {
        AgainWait {
            next: AGAIN_FIRST_WAIT,
            since: None,
        }
    }

    /// Sleeps the next step; Err(total waited) once the total passes [`AGAIN_GIVE_UP`].
    pub(crate) fn wait(&mut self) -> Result<(), Duration> {
        let since = *self.since.get_or_insert_with(Instant::now);
        let waited = since.elapsed();
        if waited >= AGAIN_GIVE_UP {
            return Err(waited);
        }
        std::thread::sleep(self.next);
        self.next = (self.next * 2).min(AGAIN_MAX_WAIT);
        Ok(())
    }
}

fn is_efault(error: &UffdError) -> bool {
    matches!(error, UffdError::Ioctl { source, .. } if source.raw_os_error() == Some(libc::EFAULT))
}
