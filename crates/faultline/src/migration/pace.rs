//! A cap on how fast pre-copy sends pages while the guest runs (QEMU's `max-bandwidth`): a
//! migration that must share its link, or a guest that must keep its memory bandwidth, can
//! ask for it. What goes while the VM is paused, and a post-copy's stream, are not capped:
//! they hold the guest up.

use std::time::{Duration, Instant};

/// The lowest cap taken: below it a single run of pages would hold the migration (and a
/// switch-over asked for meanwhile) for more than a second.
pub const MIN_CAP: u64 = 1 << 20;

/// How much time a sender that fell behind its cap (waiting for a sync, a slow round) may
/// make up at full speed: unused allowance older than this is not banked.
const BURST: Duration = Duration::from_millis(100);

/// Holds a sender to `cap` bytes a second, with bursts of at most [`BURST`].
#[derive(Debug)]
pub(super) struct Pacer {
    cap: u64,
    /// When the bytes taken so far are all due at the cap.
    due: Instant,
}

impl Pacer {
    /// A pacer starting now, or none for no cap.
    pub(super) fn new(cap: Option<u64>) -> Option<Pacer> {
        cap.map(|cap| Pacer {
            cap,
            due: Instant::now(),
        })
    }

    /// Takes `bytes` about to be sent: waits until they are within the cap.
    pub(super) fn take(&mut self, bytes: u64) {
        let now = Instant::now();
        let (due, wait) = schedule(self.due, now, bytes, self.cap);
        self.due = due;
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// With the bytes taken before due at `due`, `bytes` more at `cap` bytes a second taken at
/// `now`: when they are all due, and how long to wait before sending them.
fn schedule(due: Instant, now: Instant, bytes: u64, cap: u64) -> (Instant, Duration) {
    let earliest = now.checked_sub(BURST).unwrap_or(now);
    let due = due.max(earliest) + Duration::from_secs_f64(bytes as f64 / cap.max(1) as f64);
    (due, due.saturating_duration_since(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_waits_out_what_it_is_ahead_and_banks_no_more_than_a_burst() {
        let ms = Duration::from_millis;
        let start = Instant::now() + Duration::from_secs(10);
        let mb = 1_000_000;
        // 10 MB at 100 MB/s take 100 ms: taken at the start, they wait 100 ms.
        let (due, wait) = schedule(start, start, 10 * mb, 100 * mb);
        assert_eq!((due, wait), (start + ms(100), ms(100)));
        // 10 MB more, taken 40 ms later: due at 200 ms, so 160 ms to wait.
        let (due, wait) = schedule(due, start + ms(40), 10 * mb, 100 * mb);
        assert_eq!((due, wait), (start + ms(200), ms(160)));
        // A sender idle for a second gets 100 ms of allowance back, not a second's: 20 MB at
        // once wait 100 ms.
        let later = start + Duration::from_secs(2);
        let (due, wait) = schedule(due, later, 20 * mb, 100 * mb);
        assert_eq!((due, wait), (later + ms(100), ms(100)));
        // Within the burst: no wait.
        let (_, wait) = schedule(later, later + ms(300), 5 * mb, 100 * mb);
        assert_eq!(wait, Duration::ZERO);
    }
}
