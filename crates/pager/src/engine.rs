//! The fault service: the one install path, the fault threads and the background worker.
//!
//! A fault is read from the userfaultfd, mapped to (region, page), and then either joins an
//! install already in flight for that page (the install wakes it) or claims the page, fetches
//! it from the region's source and installs it. Background work (prefetch, fill) uses the
//! same claim-fetch-install path, in small batches, and yields while urgent faults wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use uffd::{Event, Outcome, Uffd};

use crate::region::Region;
use crate::source::{Content, SourceError};
use crate::stats::{Counters, FaultOrigin};
use crate::{FailurePolicy, PagerConfig};

/// How many times an install is retried after EAGAIN before it is treated as an error.
const MAX_AGAIN_RETRIES: usize = 1000;
/// Events read per read(2).
const EVENT_BATCH: usize = 64;

/// Called with the message of a fatal source error.
pub(crate) type FatalCallback = Box<dyn Fn(&str) + Send + Sync>;

/// A page-range job for the background worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub region: usize,
    pub first: usize,
    pub count: usize,
}

/// State shared by the pager's threads.
pub(crate) struct Shared {
    pub uffd: Uffd,
    pub regions: Vec<Region>,
    pub config: PagerConfig,
    pub counters: Counters,
    pub stop: AtomicBool,
    pub stop_evt: std::os::fd::OwnedFd,
    /// Faults read but not yet answered: the background worker yields while this is non-zero.
    pub urgent_pending: AtomicU64,
    pub background: Mutex<VecDeque<Job>>,
    pub background_cv: Condvar,
    pub vcpu_threads: Mutex<Vec<u32>>,
    pub fatal: Mutex<Option<String>>,
    pub on_fatal: Option<FatalCallback>,
    /// (region, page) of each fault that claimed its page, when recording.
    pub fault_log: Mutex<Vec<(usize, usize)>>,
}

/// Why an install could not complete.
pub(crate) enum InstallError {
    Source(SourceError),
    Uffd(uffd::UffdError),
    TooManyRetries,
}

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallError::Source(e) => write!(f, "page source failed: {e}"),
            InstallError::Uffd(e) => write!(f, "install failed: {e}"),
            InstallError::TooManyRetries => write!(f, "install kept failing with EAGAIN"),
        }
    }
}

impl Shared {
    fn find_region(&self, addr: u64) -> Option<usize> {
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

    /// Claims up to `max` contiguous pages from `first` that are neither present nor in flight
    /// and share `first`'s discarded state. Returns how many were claimed (0: `first` was
    /// taken).
    fn claim_run(&self, region: &Region, first: usize, max: usize) -> usize {
        if region.present.get(first) || !region.inflight.test_and_set(first) {
            return 0;
        }
        let discarded = region.discarded.get(first);
        let mut count = 1;
        while count < max && first + count < region.pages() {
            let page = first + count;
            if region.present.get(page)
                || region.discarded.get(page) != discarded
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

    /// The single install path: fetch `count` claimed pages from `first` and install them
    /// (zero pages without a copy), handling EEXIST (never overwrite) and EAGAIN (read
    /// pending events, retry). Marks what it installed present; releases the claim.
    /// `given` is the address of the pages' contents when the caller already has them (a
    /// working set read ahead of time); the source is then not asked.
    pub(crate) fn install(
        &self,
        region: &Region,
        first: usize,
        count: usize,
        buf: &mut Vec<u8>,
        background: bool,
        given: Option<u64>,
    ) -> Result<(), InstallError> {
        let page_size = region.page_size;
        let len = count * page_size as usize;
        buf.resize(len, 0);
        // Decide once where the bytes come from: a discarded page's true contents are zero
        // whatever the source holds; a source that maps the range is installed from directly;
        // others fill `buf`.
        let offset = first as u64 * page_size;
        let (content, mapped) = if region.discarded.get(first) {
            (Content::Zero, None)
        } else if let Some(addr) = given {
            (Content::Data, Some(addr))
        } else if let Some(addr) = region.source.mapped_addr(offset, len as u64) {
            (Content::Data, Some(addr))
        } else {
            match region.source.fetch(offset, &mut buf[..len]) {
                Ok(content) => (content, None),
                Err(e) => {
                    self.release(region, first, count);
                    return Err(InstallError::Source(e));
                }
            }
        };
        let mut done_pages = 0;
        let mut retries = 0;
        let result = loop {
            if done_pages == count {
                break Ok(());
            }
            let addr = region.addr_of(first + done_pages);
            let remaining = (count - done_pages) as u64 * page_size;
            Counters::add(&self.counters.install_ioctls, 1);
            let outcome = match content {
                Content::Zero => self.uffd.zeropage(addr, remaining, false),
                Content::Data => {
                    let skip = done_pages * page_size as usize;
                    match mapped {
                        // Straight from the source's mapping (a file image's page cache).
                        Some(src) => self.uffd.copy_from_addr(
                            addr,
                            src + skip as u64,
                            remaining,
                            uffd::CopyMode::default(),
                        ),
                        None => self
                            .uffd
                            .copy(addr, &buf[skip..len], uffd::CopyMode::default()),
                    }
                }
            };
            let (done, present_after) = match outcome {
                Ok(Outcome::Done) => (remaining, 0),
                // The page at `done` is already there: count it present, never overwrite it.
                Ok(Outcome::Exists { done }) => {
                    Counters::add(&self.counters.eexist, 1);
                    (done, 1)
                }
                Ok(Outcome::Again { done }) => {
                    Counters::add(&self.counters.eagain, 1);
                    retries += 1;
                    if retries > MAX_AGAIN_RETRIES {
                        break Err(InstallError::TooManyRetries);
                    }
                    if done == 0 {
                        // The address space is changing: a remove or unmap event is waiting.
                        self.drain_non_fault_events();
                    }
                    (done, 0)
                }
                Err(e) => break Err(InstallError::Uffd(e)),
            };
            let installed = (done / page_size) as usize;
            for page in first + done_pages..first + done_pages + installed + present_after {
                region.present.set(page);
            }
            let counter = if background {
                &self.counters.pages_installed_background
            } else {
                &self.counters.pages_installed_urgent
            };
            Counters::add(counter, installed as u64);
            match content {
                Content::Zero => Counters::add(&self.counters.zero_pages, installed as u64),
                Content::Data => Counters::add(&self.counters.bytes_copied, done),
            }
            done_pages += installed + present_after;
        };
        self.release(region, first, count);
        result
    }

    /// The explicit answer to a page that cannot be had: poison it (the toucher gets SIGBUS,
    /// a kernel access EFAULT), record the error, and apply the failure policy.
    fn fail_pages(&self, region: &Region, first: usize, count: usize, error: &InstallError) {
        Counters::add(&self.counters.source_errors, 1);
        let addr = region.addr_of(first);
        let message = format!(
            "pages {:#x}..{:#x}: {error}",
            addr,
            addr + count as u64 * region.page_size
        );
        tracing::error!("pager: {message}");
        // Tell the VMM first, so that it stops the VM before the toucher resumes with an error.
        if self.config.failure_policy == FailurePolicy::Stop {
            let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
            if fatal.is_none() {
                *fatal = Some(message.clone());
                if let Some(callback) = &self.on_fatal {
                    callback(&message);
                }
            }
        }
        match self
            .uffd
            .poison(addr, count as u64 * region.page_size, false)
        {
            Ok(_) => Counters::add(&self.counters.pages_poisoned, count as u64),
            Err(e) => tracing::error!("pager: cannot poison {addr:#x}: {e}"),
        }
    }

    /// Installs `data` (whole pages) at `first` onward in `region`, skipping pages that are
    /// present or being installed: those hold what the guest has seen, never to be overwritten.
    /// Returns how many pages this call installed.
    pub(crate) fn install_given(&self, index: usize, first: usize, data: &[u8]) -> usize {
        let region = &self.regions[index];
        let page_size = region.page_size as usize;
        let end = (first + data.len() / page_size).min(region.pages());
        let mut buf = Vec::new();
        let mut installed = 0;
        let mut page = first;
        while page < end {
            let count = self.claim_run(region, page, end - page);
            if count == 0 {
                page += 1;
                continue;
            }
            let addr = data[(page - first) * page_size..].as_ptr() as u64;
            match self.install(region, page, count, &mut buf, true, Some(addr)) {
                Ok(()) => installed += count,
                Err(e) => self.fail_pages(region, page, count, &e),
            }
            page += count;
        }
        installed
    }

    /// Serves one fault.
    fn serve_fault(&self, address: u64, thread_id: u32, buf: &mut Vec<u8>) {
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
        let count = self.claim_run(region, page, self.config.readahead_pages.max(1));
        if count == 0 {
            // Present already, or another thread's install is in flight: that install (or the
            // one that made it present) wakes the faulting thread. Wake anyway in case the
            // fault raced with an install that completed before the thread went to sleep.
            Counters::add(&self.counters.faults_joined, 1);
            if region.present.get(page) {
                let _ = self.uffd.wake(region.addr_of(page), region.page_size);
            }
            return;
        }
        if self.config.record_faults {
            self.fault_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((index, page));
        }
        if let Err(e) = self.install(region, page, count, buf, false, None) {
            self.fail_pages(region, page, count, &e);
        }
        self.counters
            .record_fault(self.origin(thread_id), started.elapsed());
    }

    /// Handles a remove (madvise DONTNEED/REMOVE, balloon): the pages are gone and read as
    /// zero from now on.
    fn handle_remove(&self, start: u64, end: u64) {
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
                region.present.clear(page);
            }
            Counters::add(&self.counters.pages_removed, (last - first + 1) as u64);
        }
    }

    fn handle_event(&self, event: Event, buf: &mut Vec<u8>) {
        match event {
            Event::PageFault {
                address, thread_id, ..
            } => self.serve_fault(address, thread_id, buf),
            Event::Remove { start, end } => self.handle_remove(start, end),
            Event::Unmap { start, end } => self.handle_remove(start, end),
            other => tracing::warn!("pager: ignoring event {other:?}"),
        }
    }

    /// Reads pending events and handles everything but faults, which are served later by
    /// the normal loop (used while retrying an install that got EAGAIN).
    fn drain_non_fault_events(&self) {
        let mut events = Vec::new();
        if self.uffd.read_events(&mut events, EVENT_BATCH).is_err() {
            return;
        }
        let mut deferred = Vec::new();
        for event in events {
            match event {
                Event::Remove { start, end } | Event::Unmap { start, end } => {
                    self.handle_remove(start, end)
                }
                Event::PageFault {
                    address, thread_id, ..
                } => deferred.push((address, thread_id)),
                other => tracing::warn!("pager: ignoring event {other:?}"),
            }
        }
        // Faults read here would otherwise be lost: their threads sleep until woken.
        let mut buf = Vec::new();
        for (address, thread_id) in deferred {
            self.serve_fault(address, thread_id, &mut buf);
        }
    }

    /// A fault thread: poll the userfaultfd and the stop eventfd, read events, serve them.
    pub fn fault_loop(&self) {
        use std::os::fd::AsRawFd;
        let mut events = Vec::with_capacity(EVENT_BATCH);
        let mut buf = Vec::new();
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
        while !self.stop.load(Ordering::Acquire) {
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ret < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                tracing::error!("pager: poll failed: {e}");
                break;
            }
            if fds[1].revents != 0 {
                break;
            }
            events.clear();
            match self.uffd.read_events(&mut events, EVENT_BATCH) {
                Ok(0) => continue,
                Ok(n) => {
                    self.counters.note_batch(n as u64);
                    self.urgent_pending.fetch_add(n as u64, Ordering::AcqRel);
                }
                Err(e) => {
                    tracing::error!("pager: {e}");
                    break;
                }
            }
            for event in events.drain(..) {
                self.handle_event(event, &mut buf);
                self.urgent_pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// The background worker: installs queued jobs in batches, yielding to urgent faults and
    /// keeping to the configured rate.
    pub fn background_loop(&self) {
        let mut buf = Vec::new();
        let batch = self.config.background_batch_pages.max(1);
        let started = Instant::now();
        let mut bytes_done: u64 = 0;
        loop {
            let job = {
                let mut queue = self.background.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    if let Some(job) = queue.pop_front() {
                        break job;
                    }
                    queue = self
                        .background_cv
                        .wait(queue)
                        .unwrap_or_else(|e| e.into_inner());
                }
            };
            let region = &self.regions[job.region];
            let mut page = job.first;
            let end = (job.first + job.count).min(region.pages());
            while page < end {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                // Urgent faults first: wait while any is being served.
                while self.urgent_pending.load(Ordering::Acquire) > 0 {
                    std::thread::yield_now();
                }
                if let Some(rate) = self.config.background_rate {
                    let due = Duration::from_secs_f64(bytes_done as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                let count = self.claim_run(region, page, batch.min(end - page));
                if count == 0 {
                    page += 1;
                    self.counters
                        .background_pending_pages
                        .fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
                if let Err(e) = self.install(region, page, count, &mut buf, true, None) {
                    self.fail_pages(region, page, count, &e);
                }
                bytes_done += count as u64 * region.page_size;
                self.counters
                    .background_pending_pages
                    .fetch_sub(count as u64, Ordering::Relaxed);
                page += count;
            }
        }
    }
}
