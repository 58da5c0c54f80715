//! What an outgoing migration is doing right now, for `GET /migration` and the progress line
//! of `faultline migrate send`: updated by the copy loops as pages go, read by anyone.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use serde_json::json;

use crate::locking::lock;

/// Counters of a migration in progress (its phase "connecting" until its first).
#[derive(Debug)]
pub struct Progress {
    phase: Mutex<&'static str>,
    round: AtomicU32,
    bytes: AtomicU64,
    pages: AtomicU64,
    /// Pages still to send in the current pass (pre-copy round, or post-copy stream).
    remaining: AtomicU64,
    throttle: AtomicU8,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            phase: Mutex::new("connecting"),
            round: AtomicU32::new(0),
            bytes: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            remaining: AtomicU64::new(0),
            throttle: AtomicU8::new(0),
        }
    }
}

impl Progress {
    /// A new phase ("pre-copy", "switch-over", "post-copy") with `remaining` pages to send.
    pub fn phase(&self, phase: &'static str, remaining: u64) {
        *lock(&self.phase) = phase;
        self.remaining.store(remaining, Ordering::Relaxed);
    }

    /// A pre-copy round begins, sending `remaining` pages.
    pub fn round(&self, round: u32, remaining: u64) {
        self.round.store(round, Ordering::Relaxed);
        self.remaining.store(remaining, Ordering::Relaxed);
    }

    /// `pages` went, in `bytes` on the wire.
    pub fn sent(&self, pages: u64, bytes: u64) {
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let _ = self
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                Some(left.saturating_sub(pages))
            });
    }

    pub fn throttled(&self, percent: u8) {
        self.throttle.store(percent, Ordering::Relaxed);
    }

    /// The counters as JSON.
    pub fn json(&self) -> serde_json::Value {
        json!({
            "phase": *lock(&self.phase),
            "round": self.round.load(Ordering::Relaxed),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "pages_sent": self.pages.load(Ordering::Relaxed),
            "remaining_pages": self.remaining.load(Ordering::Relaxed),
            "throttle_percent": self.throttle.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_went_and_what_is_left() {
        let progress = Progress::default();
        assert_eq!(
            progress.json()["phase"],
            "connecting",
            "named before its first phase"
        );
        progress.phase("pre-copy", 10);
        progress.sent(4, 4 * 4112);
        progress.round(1, 3);
        progress.sent(5, 100);
        progress.throttled(20);
        let json = progress.json();
        assert_eq!(json["phase"], "pre-copy");
        assert_eq!(json["round"], 1);
        assert_eq!(json["pages_sent"], 9);
        assert_eq!(json["bytes"], 4 * 4112 + 100);
        assert_eq!(json["remaining_pages"], 0, "never below zero");
        assert_eq!(json["throttle_percent"], 20);
    }
}
