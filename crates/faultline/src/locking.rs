//! Locks, and waits on condition variables, whose holder may have panicked.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Locks `mutex`, also after a panic in a thread that held it: what faultline's mutexes guard
/// stays consistent between statements (a panic is reported as a failure where it happens),
/// and the API, a migration and a VMM's exit must go on using it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `condvar` with `guard`, and has the lock back as [`lock`] takes it.
pub(crate) fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Waits on `condvar` with `guard` for at most `timeout`, and has the lock back as [`lock`]
/// takes it (whether the time ran out is for the caller to see on the clock).
pub(crate) fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    condvar
        .wait_timeout(guard, timeout)
        .map(|(guard, _)| guard)
        .unwrap_or_else(|e| e.into_inner().0)
}
