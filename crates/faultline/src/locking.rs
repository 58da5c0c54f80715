//! Locks whose holder may have panicked.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, also after a panic in a thread that held it: what faultline's mutexes guard
/// stays consistent between statements (a panic is reported as a failure where it happens),
/// and the API, a migration and a VMM's exit must go on using it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
