//! A limit on resident guest memory (`PagerConfig::resident_limit`): before an install would
//! take the pages present past the limit, the installing thread wakes the evictor and waits
//! for room; the evictor swaps out the pages least recently faulted in or written, by CLOCK
//! over one `referenced` bit per page (set when a page is installed, and when the VMM says the
//! guest wrote it: `note_written`, from the dirty log), down to the limit less a margin.
//!
//! A wait for room is bounded ([`ROOM_WAIT`]), and cut short when waiting cannot help: while a
//! write protection (a live snapshot) is in force no page is evicted, and two eviction
//! attempts in a row that freed nothing mean every page is in use or in flight. The install
//! then goes ahead and the overrun is counted, rather than the guest waiting: the limit can
//! be exceeded until then.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::engine::Shared;
use crate::swap::{runs, SwapOutReport};
use crate::PagerError;

/// How long an install waits for the evictor before it goes ahead over the limit.
const ROOM_WAIT: Duration = Duration::from_secs(1);
/// How often the evictor looks even when nobody asks (a guest that only writes resident pages
/// never asks).
const EVICT_PERIOD: Duration = Duration::from_millis(50);
/// The evictor works once fewer pages than this are left under the limit.
const NEAR_LIMIT_PAGES: u64 = 16;

/// The evictor's state.
#[derive(Default)]
pub(crate) struct Limiter {
    /// The CLOCK hand: (region, page).
    hand: Mutex<(usize, usize)>,
    /// Signalled to wake the evictor, and by it when it made room.
    wake: Mutex<u64>,
    cv: Condvar,
    pub evicted: AtomicU64,
    /// Attempts in a row that freed nothing. One may (a turn of the hand that only cleared
    /// referenced bits); two mean every page is in use, in flight or held (a live snapshot):
    /// installs do not wait for the evictor then.
    fruitless: AtomicU64,
    /// Eviction attempts made so far.
    attempts: AtomicU64,
    /// The most pages an install waiting for room wants (cleared by each attempt).
    wanted: AtomicU64,
    pub overruns: AtomicU64,
    pub room_waits: AtomicU64,
}

impl Shared {
    /// The limit, in pages, if one is set.
    pub(crate) fn limit_pages(&self) -> Option<u64> {
        self.config
            .resident_limit
            .map(|bytes| (bytes / uffd::PAGE_SIZE).max(1))
    }

    /// Pages present now, all regions together (a count of every present bit).
    pub(crate) fn resident_now(&self) -> u64 {
        self.regions.iter().map(|r| r.present.count() as u64).sum()
    }

    /// Before installing `pages` pages: waits (bounded) until they fit under the limit.
    pub(crate) fn make_room(&self, pages: u64) {
        let Some(limit) = self.limit_pages() else {
            return;
        };
        if self.resident_now() + pages <= limit {
            return;
        }
        self.limiter.room_waits.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + ROOM_WAIT;
        let mut generation = self.limiter.wake.lock().unwrap_or_else(|e| e.into_inner());
        let attempts = self.limiter.attempts.load(Ordering::Acquire);
        self.limiter.wanted.fetch_max(pages, Ordering::AcqRel);
        while self.resident_now() + pages > limit {
            let now = Instant::now();
            // No use waiting while a live snapshot holds swap-outs off, or once an attempt
            // made since this wait began freed nothing.
            let hopeless = self.protection.active()
                || (self.limiter.attempts.load(Ordering::Acquire) > attempts
                    && self.limiter.fruitless.load(Ordering::Acquire) >= 2);
            if now >= deadline || self.stopping() || hopeless {
                self.limiter.overruns.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *generation += 1;
            self.limiter.cv.notify_all();
            generation = self
                .limiter
                .cv
                .wait_timeout(generation, (deadline - now).min(Duration::from_millis(5)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Wakes the evictor (and anyone waiting for room), to look again or to stop.
    pub(crate) fn wake_evictor(&self) {
        let mut generation = self.limiter.wake.lock().unwrap_or_else(|e| e.into_inner());
        *generation += 1;
        self.limiter.cv.notify_all();
    }

    /// The evictor thread: keeps the pages present under the limit.
    pub(crate) fn evict_loop(&self) {
        let Some(limit) = self.limit_pages() else {
            return;
        };
        // Evict down to the limit less a margin, so that the next faults find room at once.
        let target = limit - (limit / 8).max(1).min(limit);
        loop {
            {
                let generation = self.limiter.wake.lock().unwrap_or_else(|e| e.into_inner());
                if self.stopping() {
                    return;
                }
                let _ = self
                    .limiter
                    .cv
                    .wait_timeout(generation, EVICT_PERIOD)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if self.stopping() {
                return;
            }
            // At the limit, or close enough that an install would wait.
            let resident = self.resident_now();
            let wanted = self.limiter.wanted.swap(0, Ordering::AcqRel);
            let room = NEAR_LIMIT_PAGES.max(wanted);
            let target = target.min(limit.saturating_sub(wanted));
            if resident + room > limit && resident > target {
                let freed = match self.evict(resident - target, false) {
                    Ok(report) => report.swapped + report.zero,
                    Err(e) => {
                        tracing::debug!("pager: eviction stopped: {e}");
                        0
                    }
                };
                if freed == 0 {
                    self.limiter.fruitless.fetch_add(1, Ordering::AcqRel);
                } else {
                    self.limiter.fruitless.store(0, Ordering::Release);
                }
                self.limiter.attempts.fetch_add(1, Ordering::AcqRel);
            }
            self.limiter.cv.notify_all();
        }
    }

    /// Swaps out up to `pages` pages chosen by CLOCK: a page referenced since the hand last
    /// passed loses its bit and is spared this time. Without a limit there are no referenced
    /// bits, and pages go in address order from the hand. With `all_turns`, the hand goes
    /// round as often as it takes (an operator's swap-out), otherwise once.
    pub(crate) fn evict(&self, pages: u64, all_turns: bool) -> Result<SwapOutReport, PagerError> {
        let mut hand = self.limiter.hand.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = self.regions.iter().map(|r| r.pages()).sum();
        let mut chosen: Vec<Vec<usize>> = vec![Vec::new(); self.regions.len()];
        let mut found = 0u64;
        // One turn of the hand at most: a page spared now (its bit cleared) is a candidate
        // only the next time the hand comes by, if nothing referenced it meanwhile.
        let turns = if all_turns { 2 } else { 1 };
        for _ in 0..turns * total {
            if found >= pages {
                break;
            }
            let (index, page) = *hand;
            let region = &self.regions[index];
            if region.present.get(page) && !region.inflight.get(page) {
                if page < region.referenced.len() && region.referenced.get(page) {
                    region.referenced.clear(page);
                } else {
                    chosen[index].push(page);
                    found += 1;
                }
            }
            *hand = if page + 1 < region.pages() {
                (index, page + 1)
            } else {
                ((index + 1) % self.regions.len(), 0)
            };
        }
        drop(hand);
        let mut total_report = SwapOutReport::default();
        for (index, pages) in chosen.iter_mut().enumerate() {
            pages.sort_unstable();
            for (start, n) in runs(pages) {
                let report = self.swap_out(index, start, n)?;
                self.limiter
                    .evicted
                    .fetch_add(report.swapped + report.zero, Ordering::Relaxed);
                total_report.swapped += report.swapped;
                total_report.unchanged += report.unchanged;
                total_report.zero += report.zero;
                total_report.bytes_written += report.bytes_written;
            }
        }
        Ok(total_report)
    }
}
