//! Stopping a running VM from any thread: a flag every vCPU loop checks, and the reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Why a VM stopped as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset the machine through the i8042 controller (Linux `reboot=k`).
    Reset,
    /// The guest asked KVM for a system shutdown or reset event.
    SystemEvent(u32),
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u8 },
    /// A vCPU failed (see the run's error).
    VcpuError { vcpu: u8 },
    /// The VMM asked it to stop.
    Requested,
    /// Guest memory could not be provided (a page source failed under the Stop policy).
    MemoryUnavailable,
}

/// Shared by the vCPU threads and whoever may stop them.
#[derive(Debug, Default)]
pub struct RunControl {
    stop: AtomicBool,
    reason: Mutex<Option<StopReason>>,
}

impl RunControl {
    /// Asks every vCPU to stop; the first reason given is kept.
    pub fn request_stop(&self, reason: StopReason) {
        let mut current = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        current.get_or_insert(reason);
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The reason of the first stop request, if any.
    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clears a previous stop so the VM can run again.
    pub fn reset(&self) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.stop.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let control = RunControl::default();
        assert!(!control.should_stop());
        control.request_stop(StopReason::Reset);
        control.request_stop(StopReason::Requested);
        assert!(control.should_stop());
        assert_eq!(control.reason(), Some(StopReason::Reset));
        control.reset();
        assert!(!control.should_stop());
        assert_eq!(control.reason(), None);
    }
}
