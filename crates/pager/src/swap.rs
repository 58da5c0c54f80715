//! Host swap: the pager moves present pages out to a swap file, releases them from RAM, and
//! serves them back through its one install path when they are touched.
//!
//! Page states (beside present / in flight / discarded, see `region.rs`): a page swapped out
//! is *swapped*: not present, its contents in its slot of the swap file. Swapping out claims
//! each page (in flight, so no install or other swap-out touches it), write-protects it (a
//! writer waits), reads it from the region's backing memfd, and then:
//! - a zero page is dropped, not written: it becomes *discarded* (it reads as zero);
//! - a page whose slot already holds the same bytes (swapped out before, and not changed
//!   since it came back: same checksum, same bytes) is not rewritten;
//! - any other page is written to its slot, then its checksum.
//!
//! Then the pages are released with `fallocate(PUNCH_HOLE)` on the memfd, and only the pages
//! released change state. That makes no userfaultfd event: the pager tells its own releases
//! (swapped, or discarded when zero) from the guest's (a remove event: discarded). Then they
//! are unprotected (a waiting writer faults again, now on a missing page: a write-protect
//! fault on a page of the batch is left to the batch, never waited for on a fault thread) and
//! the claim is released, waking any fault that joined it. A later fault on a swapped page reads its slot, checks it against its checksum
//! (a damaged swap file is an error naming the page, never wrong data) and installs it.
//!
//! The swap file holds a slot per page of every region, back to back, then a CRC32 per slot:
//! sparse, so only what was written takes space. In memory, swap costs one bit per page
//! (`swapped`): 32 KiB per GiB of guest.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::stats::LatencyRecorder;
use serde::Serialize;

use crate::engine::Shared;
use crate::source::SourceError;
use crate::PagerError;

/// Pages swapped out per claim: a writer of one of them waits at most this batch.
const SWAP_BATCH_PAGES: usize = 512;
const PAGE: usize = 4096;

/// The swap file: a slot per page, then a checksum per slot.
pub(crate) struct SwapFile {
    path: PathBuf,
    file: File,
    slots: u64,
}

/// The file was created by this swap (never an existing one): it goes with it, when the
/// pager's last handle does.
impl Drop for SwapFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl SwapFile {
    /// Creates the swap file at `path` for `slots` pages; a file already there is refused
    /// (never overwritten).
    pub(crate) fn create(path: &Path, slots: u64) -> std::io::Result<SwapFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        // From here on it is this swap's file: dropped (by an error below too), it goes.
        let swap = SwapFile {
            path: path.to_path_buf(),
            file,
            slots,
        };
        swap.file.set_len(slots * (PAGE as u64 + 4))?;
        Ok(swap)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn sum_offset(&self, slot: u64) -> u64 {
        self.slots * PAGE as u64 + slot * 4
    }

    /// The checksums stored for `count` slots from `slot`.
    fn stored_sums(&self, slot: u64, count: usize) -> std::io::Result<Vec<u32>> {
        let mut raw = vec![0u8; count * 4];
        self.file.read_exact_at(&mut raw, self.sum_offset(slot))?;
        Ok(raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    }

    /// Reads `buf.len() / 4096` slots from `slot` and checks each against its checksum.
    pub(crate) fn read(&self, slot: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len();
        let io = |source: std::io::Error| SourceError::Io {
            path: self.path.clone(),
            offset: slot * PAGE as u64,
            len,
            source,
        };
        let count = buf.len() / PAGE;
        self.file
            .read_exact_at(buf, slot * PAGE as u64)
            .map_err(io)?;
        let sums = self
            .stored_sums(slot, count)
            .map_err(|source| SourceError::Io {
                path: self.path.clone(),
                offset: self.sum_offset(slot),
                len: count * 4,
                source,
            })?;
        for (i, page) in buf.chunks_exact(PAGE).enumerate() {
            if crc32fast::hash(page) != sums[i] {
                return Err(SourceError::Unavailable {
                    offset: (slot + i as u64) * PAGE as u64,
                    reason: format!(
                        "slot {} of the swap file {} does not match its checksum (the file was damaged)",
                        slot + i as u64,
                        self.path.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether `slot` holds exactly `page` already (its checksum, then its bytes).
    fn holds(&self, slot: u64, page: &[u8], sum: u32) -> std::io::Result<bool> {
        if self.stored_sums(slot, 1)?[0] != sum {
            return Ok(false);
        }
        let mut held = vec![0u8; PAGE];
        self.file.read_exact_at(&mut held, slot * PAGE as u64)?;
        Ok(held == page)
    }

    /// Writes `page` into `slot`, then its checksum.
    fn write(&self, slot: u64, page: &[u8], sum: u32) -> std::io::Result<()> {
        self.file.write_all_at(page, slot * PAGE as u64)?;
        self.file
            .write_all_at(&sum.to_le_bytes(), self.sum_offset(slot))
    }
}

/// What one swap-out did, in pages.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct SwapOutReport {
    /// Released from RAM, their contents in the swap file.
    pub swapped: u64,
    /// Of those, pages whose slot already held them: not written again.
    pub unchanged: u64,
    /// Zero pages released without being written (they read as zero).
    pub zero: u64,
    /// Bytes written to the swap file.
    pub bytes_written: u64,
}

/// Swap counters.
pub(crate) struct SwapCounters {
    pub swapped_out: AtomicU64,
    pub unchanged: AtomicU64,
    pub zero_dropped: AtomicU64,
    pub swapped_in: AtomicU64,
    pub bytes_written: AtomicU64,
    swap_in_us: LatencyRecorder,
}

impl Default for SwapCounters {
    fn default() -> Self {
        SwapCounters {
            swapped_out: AtomicU64::new(0),
            unchanged: AtomicU64::new(0),
            zero_dropped: AtomicU64::new(0),
            swapped_in: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            swap_in_us: LatencyRecorder::new(600_000_000),
        }
    }
}

impl SwapCounters {
    /// A fault served from the swap file took `service`.
    pub(crate) fn record_swap_in(&self, service: Duration) {
        self.swap_in_us.record(service);
    }

    /// The counters now, with the pages swapped out and resident now and the swap's own
    /// memory.
    pub(crate) fn stats(
        &self,
        swapped_pages: u64,
        resident_pages: u64,
        metadata_bytes: u64,
        file: Option<PathBuf>,
        limit: (Option<u64>, &crate::limit::Limiter),
    ) -> SwapStats {
        let (limit_bytes, limiter) = limit;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let swap_in = self.swap_in_us.summary();
        SwapStats {
            file,
            resident_bytes: resident_pages * PAGE as u64,
            swapped_bytes: swapped_pages * PAGE as u64,
            pages_swapped_out: get(&self.swapped_out),
            pages_unchanged: get(&self.unchanged),
            zero_pages_dropped: get(&self.zero_dropped),
            pages_swapped_in: get(&self.swapped_in),
            bytes_written: get(&self.bytes_written),
            swap_in_faults: swap_in.samples,
            swap_in_p50_us: swap_in.p50,
            swap_in_p99_us: swap_in.p99,
            swap_in_max_us: swap_in.max,
            metadata_bytes,
            limit_bytes,
            pages_evicted: get(&limiter.evicted),
            room_waits: get(&limiter.room_waits),
            limit_overruns: get(&limiter.overruns),
        }
    }
}

/// Swap figures, as `GET /vm/stats` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct SwapStats {
    /// The swap file, if the pager has one.
    pub file: Option<PathBuf>,
    /// Guest memory present now (installed or resident), in bytes.
    pub resident_bytes: u64,
    /// Guest memory swapped out now, in bytes.
    pub swapped_bytes: u64,
    pub pages_swapped_out: u64,
    /// Of those, pages whose slot held them already (not written again).
    pub pages_unchanged: u64,
    pub zero_pages_dropped: u64,
    pub pages_swapped_in: u64,
    pub bytes_written: u64,
    /// Faults served from the swap file, and their service time (µs).
    pub swap_in_faults: u64,
    pub swap_in_p50_us: u64,
    pub swap_in_p99_us: u64,
    pub swap_in_max_us: u64,
    /// Memory swap takes: one bit per page of guest RAM (two with a resident limit: its
    /// CLOCK's referenced bits).
    pub metadata_bytes: u64,
    /// The resident limit, if any, and what keeping it took.
    pub limit_bytes: Option<u64>,
    pub pages_evicted: u64,
    /// Installs that waited for the evictor to make room, and those that went ahead over
    /// the limit after waiting a second in vain.
    pub room_waits: u64,
    pub limit_overruns: u64,
}

impl Shared {
    /// Swaps out the present pages among `count` pages of region `index` from `first` (pages
    /// absent or in flight are left alone). See the module documentation.
    pub(crate) fn swap_out(
        &self,
        index: usize,
        first: usize,
        count: usize,
    ) -> Result<SwapOutReport, PagerError> {
        let swap = self.swap.as_ref().ok_or(PagerError::NoSwap)?;
        let region = self.regions.get(index).ok_or(PagerError::NoRegion(index))?;
        let Some(backing) = &region.backing else {
            return Err(PagerError::Swap(format!(
                "region {index} has no backing file to release pages from"
            )));
        };
        let end = first.saturating_add(count).min(region.pages());
        let mut report = SwapOutReport::default();
        let mut page = first;
        let mut buf = vec![0u8; SWAP_BATCH_PAGES * PAGE];
        while page < end {
            if self.stopping() {
                return Err(PagerError::Stopped);
            }
            let batch_end = (page + SWAP_BATCH_PAGES).min(end);
            let _batch = self.swap_batch.lock().unwrap_or_else(|e| e.into_inner());
            if self.protection.active() {
                return Err(PagerError::ProtectionActive);
            }
            // Claim the present pages of the batch.
            let mut claimed = Vec::new();
            for p in page..batch_end {
                if region.present.get(p) && region.inflight.test_and_set(p) {
                    if region.present.get(p) {
                        claimed.push(p);
                    } else {
                        // It went meanwhile: let go, and wake a fault that joined the claim.
                        region.inflight.clear(p);
                        let _ = self.uffd.wake(region.addr_of(p), region.page_size);
                    }
                }
            }
            let result = self.swap_out_claimed(index, swap, backing, &claimed, &mut buf);
            for &p in &claimed {
                region.inflight.clear(p);
            }
            // Faults that joined a claimed page wait for a wake: they fault again and are
            // served from the swap file.
            for (start, n) in runs(&claimed) {
                let _ = self
                    .uffd
                    .wake(region.addr_of(start), n as u64 * region.page_size);
            }
            let done = result?;
            report.swapped += done.swapped;
            report.unchanged += done.unchanged;
            report.zero += done.zero;
            report.bytes_written += done.bytes_written;
            page = batch_end;
        }
        Ok(report)
    }

    /// Swaps out `claimed` pages (ascending) of region `index`, which this thread holds in
    /// flight.
    fn swap_out_claimed(
        &self,
        index: usize,
        swap: &SwapFile,
        backing: &crate::region::Backing,
        claimed: &[usize],
        buf: &mut [u8],
    ) -> Result<SwapOutReport, PagerError> {
        let region = &self.regions[index];
        let mut report = SwapOutReport::default();
        let (Some(&first), Some(&last)) = (claimed.first(), claimed.last()) else {
            return Ok(report);
        };
        let set_protection = |on: bool| -> Result<(), PagerError> {
            let mut result = Ok(());
            for (start, n) in runs(claimed) {
                let done = self
                    .set_protection(region.addr_of(start), n as u64 * region.page_size, on, None)
                    .map_err(|e| PagerError::Swap(format!("write protection: {e}")));
                // Unprotecting goes on past a failure: as little as possible stays protected.
                if result.is_ok() {
                    result = done;
                }
                if on && result.is_err() {
                    break;
                }
            }
            result
        };
        // A write-protect fault on a page of this batch is left to the batch, whose unprotect
        // wakes the writer (the fault thread never waits for a batch).
        *self.swap_range.lock().unwrap_or_else(|e| e.into_inner()) = Some((index, first, last + 1));
        self.protection.note_protecting();
        let result = set_protection(true)
            .and_then(|()| self.take_pages(region, swap, backing, claimed, buf, &mut report));
        // Whatever happened, nothing stays protected: a writer faults again (missing, if the
        // page went) and is served.
        let unprotected = {
            let mut range = self.swap_range.lock().unwrap_or_else(|e| e.into_inner());
            let unprotected = set_protection(false);
            *range = None;
            unprotected
        };
        result?;
        unprotected?;
        let counters = &self.swap_counters;
        counters
            .swapped_out
            .fetch_add(report.swapped, Ordering::Relaxed);
        counters
            .unchanged
            .fetch_add(report.unchanged, Ordering::Relaxed);
        counters
            .zero_dropped
            .fetch_add(report.zero, Ordering::Relaxed);
        counters
            .bytes_written
            .fetch_add(report.bytes_written, Ordering::Relaxed);
        Ok(report)
    }

    /// With `claimed` protected: reads each page from the backing file, writes what must be
    /// written to its slot, releases the pages from RAM, then records their new states (a
    /// page whose release failed stays present, as it is).
    fn take_pages(
        &self,
        region: &crate::region::Region,
        swap: &SwapFile,
        backing: &crate::region::Backing,
        claimed: &[usize],
        buf: &mut [u8],
        report: &mut SwapOutReport,
    ) -> Result<(), PagerError> {
        let first = claimed[0];
        let mut outcome = Vec::with_capacity(claimed.len());
        for &p in claimed {
            let at = (p - first) * PAGE;
            let page = &mut buf[at..at + PAGE];
            backing
                .file
                .read_exact_at(page, backing.offset + p as u64 * region.page_size)
                .map_err(|e| PagerError::Swap(format!("cannot read guest RAM: {e}")))?;
            let slot = region.swap_base + p as u64;
            let state = if page.iter().all(|&b| b == 0) {
                PageOut::Zero
            } else {
                let sum = crc32fast::hash(page);
                let io = |e: std::io::Error| {
                    PagerError::Swap(format!("swap file {}: {e}", swap.path().display()))
                };
                if swap.holds(slot, page, sum).map_err(io)? {
                    PageOut::Unchanged
                } else {
                    swap.write(slot, page, sum).map_err(io)?;
                    PageOut::Written
                }
            };
            outcome.push(state);
        }
        // Released first, recorded after: a page that could not be released stays present.
        // (A fault on a released page joins the claim and is served once it is recorded.)
        let mut released = vec![false; claimed.len()];
        let mut failure = None;
        let mut at = 0;
        for (start, n) in runs(claimed) {
            match backing.punch(start as u64 * region.page_size, n as u64 * region.page_size) {
                Ok(()) => released[at..at + n].fill(true),
                Err(e) => {
                    failure
                        .get_or_insert(PagerError::Swap(format!("cannot release guest RAM: {e}")));
                }
            }
            at += n;
        }
        // The states change under the event gate, as installs decide content under it: a
        // guest's remove that came meanwhile wins (the page is discarded: zero).
        let _gate = self.event_gate.read().unwrap_or_else(|e| e.into_inner());
        for ((&p, state), released) in claimed.iter().zip(&outcome).zip(released) {
            if !released || (region.discarded.get(p) && !region.present.get(p)) {
                continue;
            }
            region.present.clear(p);
            match state {
                PageOut::Zero => {
                    region.discarded.set(p);
                    region.swapped.clear(p);
                    report.zero += 1;
                }
                PageOut::Unchanged | PageOut::Written => {
                    region.discarded.clear(p);
                    region.swapped.set(p);
                    report.swapped += 1;
                    if *state == PageOut::Unchanged {
                        report.unchanged += 1;
                    } else {
                        report.bytes_written += PAGE as u64;
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PageOut {
    Zero,
    Unchanged,
    Written,
}

/// Contiguous runs `(start, length)` of ascending `pages`.
pub(crate) fn runs(pages: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((start, n)) if *start + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}
