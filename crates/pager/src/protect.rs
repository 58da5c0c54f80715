//! Write protection of guest memory: the mechanism under a live snapshot.
//!
//! A caller protects runs of pages (`UFFDIO_WRITEPROTECT`) and gives a [`WriteGuard`]. A
//! write to a protected page stops the writer (a vCPU, or any thread) in the kernel and
//! queues a write-protect fault; a fault thread calls the guard (which saves the page as it
//! still is), then unprotects the page, which lets the write through and wakes the writer.
//! The caller unprotects the pages it has saved itself as it goes, and ends the protection
//! (every page unprotected) when it is done or has failed, so that no page stays protected
//! behind it.
//!
//! Page states: protection is orthogonal to the presence map. A page is protected only while
//! it is present (a missing page has nothing to protect: a live snapshot reads it from the
//! region's source instead); a page the pager installs while a protection is on is installed
//! writable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::stats::LatencyRecorder;
use serde::Serialize;

use uffd::UffdError;

use crate::engine::{AgainWait, EventQueue, InstallError, Shared};

/// What a protection does before a protected page is written.
pub trait WriteGuard: Send + Sync {
    /// Page `page` of region `region` is about to be written: save what it holds now. Called
    /// on a pager fault thread while the page is still protected; when it returns the pager
    /// unprotects the page, whatever happened, because the guest must run on. A guard that
    /// fails records that itself (and ends the protection through its owner).
    fn before_write(&self, region: usize, page: usize);
}

/// What a protection cost the guest, from its start to its end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProtectStats {
    /// Writes that hit a protected page.
    pub write_faults: u64,
    /// How long those writes waited, in microseconds: from the fault thread reading the fault
    /// to the page being unprotected (the guard's save included).
    pub stall_p50_us: u64,
    pub stall_p99_us: u64,
    pub stall_max_us: u64,
}

/// The protection in force, if any, and what it has cost so far.
pub(crate) struct Protection {
    guard: RwLock<Option<Arc<dyn WriteGuard>>>,
    /// A protection has been started at least once: write-protect faults are expected (one
    /// can still arrive just after a protection ended, and is only let through).
    ever: std::sync::atomic::AtomicBool,
    faults: AtomicU64,
    stall_us: LatencyRecorder,
}

impl Default for Protection {
    fn default() -> Self {
        Protection {
            guard: RwLock::new(None),
            ever: std::sync::atomic::AtomicBool::new(false),
            faults: AtomicU64::new(0),
            stall_us: LatencyRecorder::new(600_000_000),
        }
    }
}

impl Protection {
    /// Installs `guard` (replacing none: the caller checked) and resets the counters.
    pub(crate) fn begin(&self, guard: Arc<dyn WriteGuard>) {
        self.faults.store(0, Ordering::Relaxed);
        self.stall_us.reset();
        self.ever.store(true, Ordering::Release);
        *self.guard.write().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    }

    /// Write-protect faults are to be expected from now on (swap-out protects pages while it
    /// takes them).
    pub(crate) fn note_protecting(&self) {
        self.ever.store(true, Ordering::Release);
    }

    /// Whether a protection is in force.
    pub(crate) fn active(&self) -> bool {
        self.guard
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Drops the guard; returns what the protection cost.
    pub(crate) fn end(&self) -> ProtectStats {
        self.guard.write().unwrap_or_else(|e| e.into_inner()).take();
        self.stats()
    }

    pub(crate) fn stats(&self) -> ProtectStats {
        let stall = self.stall_us.summary();
        ProtectStats {
            write_faults: self.faults.load(Ordering::Relaxed),
            stall_p50_us: stall.p50,
            stall_p99_us: stall.p99,
            stall_max_us: stall.max,
        }
    }

    fn record(&self, stall: Duration) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.stall_us.record(stall);
    }
}

impl Shared {
    /// A write-protect fault at `address`, read at `read_at`: the guard saves the page, then
    /// the page is unprotected (which wakes the writer). With no protection ever started, the
    /// fault is a bug (a foreign registration): fatal, and the page is let go all the same.
    pub(crate) fn serve_write_protect(
        &self,
        address: u64,
        read_at: Instant,
        queue: &mut EventQueue,
    ) {
        let page_addr = address & !(uffd::PAGE_SIZE - 1);
        let region = self.find_region(address);
        // A swap-out batch protects the pages it takes: a write to one is left to the batch,
        // whose unprotect wakes the writer (it then faults again, on a missing page). The
        // range is checked and the page unprotected under the same lock, which a batch takes
        // to set its range: an unprotect here can never undo a later batch's protection.
        let range = self.swap_range.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some((batch_region, lo, hi)), Some(index)) = (*range, region) {
            let page = self.regions[index].page_of(address);
            if batch_region == index && (lo..hi).contains(&page) {
                self.protection.record(read_at.elapsed());
                return;
            }
        }
        if !self.protection.ever.load(Ordering::Acquire) {
            self.report_fatal(&format!(
                "a write-protect fault at {address:#x}, but nothing write-protected guest memory: this is a bug"
            ));
        } else {
            let guard = self
                .protection
                .guard
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let (Some(guard), Some(index)) = (guard, region) {
                guard.before_write(index, self.regions[index].page_of(address));
            }
        }
        if let Err(e) = self.set_protection(page_addr, uffd::PAGE_SIZE, false, Some(queue)) {
            // The writer stays blocked only while the range is registered and the pager
            // runs: a failure here (the range was unregistered under us, the pager stops) has
            // nothing left to wake.
            tracing::warn!("pager: cannot unprotect {page_addr:#x}: {e}");
        }
        drop(range);
        self.protection.record(read_at.elapsed());
    }

    /// Sets or clears write protection on `[start, start + len)`, waiting out EAGAIN (the
    /// address space is changing: a remove event waits to be read). A fault thread (`queue`)
    /// reads the pending events itself; any other thread backs off until a fault thread has.
    pub(crate) fn set_protection(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        mut queue: Option<&mut EventQueue>,
    ) -> Result<(), InstallError> {
        let mut again = AgainWait::new();
        loop {
            match self.uffd.writeprotect(start, len, protect, false) {
                Ok(()) => return Ok(()),
                Err(UffdError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    self.wait_out_again_with(&mut again, queue.as_deref_mut())?;
                }
                Err(e) => return Err(InstallError::Uffd(e)),
            }
        }
    }
}
