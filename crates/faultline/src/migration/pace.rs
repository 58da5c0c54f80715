//! A cap on how fast pre-copy sends pages while the guest runs (QEMU's `max-bandwidth`): a
//! migration that must share its link, or a guest that must keep its memory bandwidth, can
//! ask for it. What goes while the VM is paused, and a post-copy's stream, are not capped:
//! they hold the guest up.

use std::time::{Duration, Instant};

/// Holds a sender to `cap` bytes a second on average since it started.
#[derive(Debug)]
pub(super) struct Pacer {
    cap: u64,
    started: Instant,
}

impl Pacer {
    /// A pacer starting now, or none for no cap.
    pub(super) fn new(cap: Option<u64>) -> Option<Pacer> {
        cap.map(|cap| Pacer {
            cap,
            started: Instant::now(),
        })
    }

    /// Waits until `sent` bytes since the start are within the cap.
    pub(super) fn wait(&self, sent: u64) {
        let ahead = ahead_of_cap(sent, self.cap, self.started.elapsed());
        if !ahead.is_zero() {
            std::thread::sleep(ahead);
        }
    }
}

/// How far ahead of `cap` bytes a second `sent` bytes after `elapsed` are (zero if not).
fn ahead_of_cap(sent: u64, cap: u64, elapsed: Duration) -> Duration {
    let due = Duration::from_secs_f64(sent as f64 / cap.max(1) as f64);
    due.saturating_sub(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_ahead_of_its_cap_waits_the_difference_and_one_behind_does_not() {
        let mb = 1_000_000;
        let ms = Duration::from_millis;
        // 10 MB at 100 MB/s are due at 100 ms.
        assert_eq!(ahead_of_cap(10 * mb, 100 * mb, ms(40)), ms(60));
        assert_eq!(ahead_of_cap(10 * mb, 100 * mb, ms(100)), Duration::ZERO);
        assert_eq!(ahead_of_cap(10 * mb, 100 * mb, ms(250)), Duration::ZERO);
        assert_eq!(ahead_of_cap(0, 100 * mb, Duration::ZERO), Duration::ZERO);
        // A cap of 0 is taken as 1 byte a second rather than a division by zero.
        assert_eq!(ahead_of_cap(5, 0, Duration::ZERO), Duration::from_secs(5));
    }
}
