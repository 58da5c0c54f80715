//! CPU throttling: a vCPU runs only part of each time slice, so that a guest that writes
//! memory faster than a migration can copy it slows down enough for the copy to catch up (what
//! QEMU calls auto-converge).
//!
//! A throttle thread kicks every vCPU out of KVM_RUN once per slice; a kicked vCPU sleeps the
//! throttled share of the slice before it runs again (see `RunControl::throttle_pause`), so it
//! runs the rest of the slice until the next kick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::control::RunControl;

/// The time slice a throttled vCPU runs part of.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// The highest share of time a throttle takes, in percent: a vCPU always runs some.
pub const MAX_THROTTLE_PERCENT: u8 = 99;

/// A throttle in force on one VM's vCPUs; dropping it lets them run freely again.
pub struct Throttle {
    control: Arc<RunControl>,
    stop: Arc<AtomicBool>,
    kicker: Option<JoinHandle<()>>,
}

impl Throttle {
    /// Starts throttling the vCPUs of `control` by `percent` (capped at
    /// [`MAX_THROTTLE_PERCENT`]).
    pub fn start(control: Arc<RunControl>, percent: u8) -> std::io::Result<Throttle> {
        let stop = Arc::new(AtomicBool::new(false));
        let kicker = {
            let control = Arc::clone(&control);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("vcpu-throttle".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        control.kick_all();
                        std::thread::sleep(THROTTLE_SLICE);
                    }
                })?
        };
        // Only once the kicker runs: a throttle without one would make every other kick
        // (a pause's) a sleep.
        control.set_throttle(percent.min(MAX_THROTTLE_PERCENT));
        Ok(Throttle {
            control,
            stop,
            kicker: Some(kicker),
        })
    }

    /// Changes the share taken (capped at [`MAX_THROTTLE_PERCENT`]).
    pub fn set(&self, percent: u8) {
        self.control.set_throttle(percent.min(MAX_THROTTLE_PERCENT));
    }

    /// The share taken now, in percent.
    pub fn percent(&self) -> u8 {
        self.control.throttle()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.control.set_throttle(0);
        self.stop.store(true, Ordering::Release);
        if let Some(kicker) = self.kicker.take() {
            let _ = kicker.join();
        }
    }
}
