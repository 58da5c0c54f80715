//! Controlling a running VM from any thread: stopping it (a flag every vCPU loop checks, and
//! the reason), pausing it (vCPUs park after saving their state), and kicking vCPU threads out
//! of KVM_RUN.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::state::VcpuState;

/// How often a pause re-kicks vCPUs that have not parked yet (a kick that lands just before a
/// thread enters KVM_RUN is lost, so it is repeated).
const PAUSE_KICK_INTERVAL: Duration = Duration::from_millis(2);

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

/// Why a pause did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the VM is not running (its vCPUs have finished or not started)")]
    NotRunning,
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM stopped while pausing")]
    Stopped,
    #[error("vCPU {vcpu} could not save its state: {message}")]
    SaveFailed { vcpu: u8, message: String },
    #[error("the vCPUs did not pause within {0:?}")]
    Timeout(Duration),
    #[error(
        "the VM may be running on the destination of a migration, so it must not run here too"
    )]
    RunsElsewhere,
}

#[derive(Debug, Default)]
struct Threads {
    /// How many vCPUs this run has (set when the run begins; 0 before).
    vcpus: u8,
    /// vCPU index -> its thread, for the threads inside their run loop.
    running: BTreeMap<u8, libc::pthread_t>,
    /// vCPUs that have left their run loop during this run, with the state they ended in (or
    /// why it could not be saved).
    finished: BTreeMap<u8, Result<VcpuState, String>>,
    /// The state each parked vCPU saved as it parked (or why it could not), and the epoch it
    /// saved it in.
    parked: BTreeMap<u8, (u64, Result<VcpuState, String>)>,
    /// Moves on at every resume, and when a pause asks the parked vCPUs to save their states
    /// again: a parked vCPU waits until it changes (or the pause ends).
    epoch: u64,
    /// vCPUs waiting at a hold point, and the point (see [`RunControl::set_hold_at`]).
    held: BTreeMap<u8, u32>,
    /// A pause is in force (requested, possibly not reached yet).
    paused: bool,
    /// When the last vCPU to leave its run loop did.
    last_exit: Option<Instant>,
}

impl Threads {
    /// Whether every vCPU of the run has parked or finished.
    fn all_stopped(&self) -> bool {
        self.vcpus > 0 && self.parked.len() + self.finished.len() == usize::from(self.vcpus)
    }

    /// Whether every vCPU has parked, or finished, and each parked one saved its state in
    /// `epoch`.
    fn all_saved_in(&self, epoch: u64) -> bool {
        self.all_stopped() && self.parked.values().all(|(saved_in, _)| *saved_in == epoch)
    }

    /// Every vCPU's state, by index: parked ones as they parked, finished ones as they ended
    /// (or the first failure to save one).
    fn saved_states(&self) -> Result<Vec<VcpuState>, PauseError> {
        let mut states: Vec<(u8, &Result<VcpuState, String>)> = self
            .parked
            .iter()
            .map(|(&vcpu, (_, state))| (vcpu, state))
            .chain(self.finished.iter().map(|(&vcpu, state)| (vcpu, state)))
            .collect();
        states.sort_by_key(|(vcpu, _)| *vcpu);
        states
            .into_iter()
            .map(|(vcpu, state)| {
                state
                    .clone()
                    .map_err(|message| PauseError::SaveFailed { vcpu, message })
            })
            .collect()
    }
}

/// Shared by the vCPU threads and whoever controls them.
#[derive(Debug)]
pub struct RunControl {
    stop: AtomicBool,
    pause: AtomicBool,
    /// The next run starts paused (see [`RunControl::set_start_paused`]).
    start_paused: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    threads: Mutex<Threads>,
    changed: Condvar,
    started: Mutex<Option<Instant>>,
    /// The micro-guest hold point vCPUs wait at (see [`RunControl::set_hold_at`]).
    hold_at: Mutex<Option<u32>>,
    /// The share of each throttle slice a kicked vCPU sleeps, in percent (0: none).
    throttle: AtomicU8,
    /// How many times a vCPU slept for the throttle.
    throttle_sleeps: AtomicU64,
    /// A migration sent the paused VM's state away: resuming it here is refused.
    runs_elsewhere: AtomicBool,
    kick_signal: libc::c_int,
}

impl Default for RunControl {
    fn default() -> Self {
        RunControl {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            start_paused: AtomicBool::new(false),
            reason: Mutex::new(None),
            threads: Mutex::new(Threads::default()),
            changed: Condvar::new(),
            started: Mutex::new(None),
            hold_at: Mutex::new(None),
            throttle: AtomicU8::new(0),
            throttle_sleeps: AtomicU64::new(0),
            runs_elsewhere: AtomicBool::new(false),
            kick_signal: vmm_sys_util::signal::SIGRTMIN(),
        }
    }
}

impl RunControl {
    fn threads(&self) -> MutexGuard<'_, Threads> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU to stop; the first reason given is kept. Parked vCPUs wake and leave.
    pub fn request_stop(&self, reason: StopReason) {
        let mut current = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        current.get_or_insert(reason);
        drop(current);
        self.stop.store(true, Ordering::SeqCst);
        let threads = self.threads();
        self.kick(&threads);
        self.changed.notify_all();
    }

    /// Whether a stop was requested.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sets the throttle (see [`crate::throttle::Throttle`], which also kicks the vCPUs).
    pub(crate) fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent, Ordering::Release);
        self.changed.notify_all();
    }

    /// The throttle in force, in percent of each slice (0: none).
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Acquire)
    }

    /// How many times a vCPU has slept for the throttle.
    pub fn throttle_sleeps(&self) -> u64 {
        self.throttle_sleeps.load(Ordering::Relaxed)
    }

    /// Called by a vCPU thread kicked out of KVM_RUN: under a throttle, it sleeps its share of
    /// the slice (less if a pause or stop comes, or the throttle is lifted).
    pub(crate) fn throttle_pause(&self) {
        let percent = self.throttle();
        if percent == 0 {
            return;
        }
        let until = Instant::now() + crate::throttle::THROTTLE_SLICE * u32::from(percent) / 100;
        self.throttle_sleeps.fetch_add(1, Ordering::Relaxed);
        let mut threads = self.threads();
        while self.throttle() > 0 && !self.pause_requested() && !self.should_stop() {
            let now = Instant::now();
            if now >= until {
                break;
            }
            threads = self
                .changed
                .wait_timeout(threads, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether vCPUs should park.
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// The reason of the first stop request, if any.
    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clears a previous stop (and pause) so that a run of `vcpus` vCPUs can begin.
    pub fn begin_run(&self, vcpus: u8) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.stop.store(false, Ordering::SeqCst);
        // Under the lock a resume takes: one that came before the run began is not undone.
        let mut threads = self.threads();
        let paused = self.start_paused.swap(false, Ordering::SeqCst);
        self.pause.store(paused, Ordering::SeqCst);
        threads.vcpus = vcpus;
        threads.finished.clear();
        threads.parked.clear();
        threads.held.clear();
        threads.paused = paused;
        threads.last_exit = None;
    }

    /// Makes the next run start paused: each vCPU parks, with its state saved, before its
    /// first instruction, and the VM is paused (as [`pause`](Self::pause) leaves it) until
    /// [`resume`](Self::resume). Whatever must be in place before the guest runs can be set up
    /// meanwhile. A resume that comes before the run begins takes this back: the run starts
    /// running.
    pub fn set_start_paused(&self, paused: bool) {
        let _threads = self.threads();
        self.start_paused.store(paused, Ordering::SeqCst);
    }

    /// Makes micro-guest vCPUs that reach hold point `point` (a write of `point` to the HOLD
    /// port) wait there until the hold point changes or the VM stops: a test can then
    /// snapshot the guest at an exact point of its run, whatever the speed of the CPU, and
    /// let it go on to the next. `None` (the default) holds nowhere and releases held vCPUs.
    pub fn set_hold_at(&self, point: Option<u32>) {
        *self.hold_at.lock().unwrap_or_else(|e| e.into_inner()) = point;
        let _threads = self.threads();
        self.changed.notify_all();
    }

    /// The hold point in force.
    pub fn hold_at(&self) -> Option<u32> {
        *self.hold_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a vCPU that reached hold point `point` must wait there.
    pub(crate) fn holds_at(&self, point: u32) -> bool {
        *self.hold_at.lock().unwrap_or_else(|e| e.into_inner()) == Some(point)
    }

    /// The vCPUs waiting at the hold point in force. A vCPU still waiting at the point before
    /// (the hold point just moved, and it has not woken yet) is not among them.
    pub fn held(&self) -> Vec<u8> {
        let point = self.hold_at();
        let threads = self.threads();
        threads
            .held
            .iter()
            .filter(|&(_, &at)| Some(at) == point)
            .map(|(&vcpu, _)| vcpu)
            .collect()
    }

    /// Called by a vCPU thread that reached hold point `point` while it is the one in force:
    /// waits there until the hold point changes or the VM stops, parking (with the state
    /// `save` gives) whenever it is paused meanwhile.
    pub(crate) fn hold(
        &self,
        vcpu: u8,
        point: u32,
        mut save: impl FnMut() -> Result<VcpuState, String>,
    ) {
        self.threads().held.insert(vcpu, point);
        while !self.should_stop() && self.holds_at(point) {
            if self.pause_requested() {
                self.park(vcpu, save());
                continue;
            }
            let threads = self.threads();
            if !self.should_stop() && !self.pause_requested() && self.holds_at(point) {
                drop(
                    self.changed
                        .wait_timeout(threads, PAUSE_KICK_INTERVAL * 25)
                        .unwrap_or_else(|e| e.into_inner()),
                );
            }
        }
        self.threads().held.remove(&vcpu);
    }

    /// When the last vCPU left its run loop in this run.
    pub fn last_exit(&self) -> Option<Instant> {
        self.threads().last_exit
    }

    /// Records that the guest signalled it runs (the micro-guest STARTED port); the first
    /// signal of a run is kept.
    pub fn mark_started(&self) {
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
    }

    /// When the guest first signalled it runs, in this run.
    pub fn started_at(&self) -> Option<Instant> {
        *self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any vCPU thread is inside its run loop.
    pub fn is_running(&self) -> bool {
        !self.threads().running.is_empty()
    }

    /// Whether the VM is paused (every vCPU has parked or finished).
    pub fn is_paused(&self) -> bool {
        let threads = self.threads();
        threads.paused && threads.all_saved_in(threads.epoch)
    }

    /// Called by a vCPU thread as it enters its run loop.
    pub(crate) fn enter(&self, vcpu: u8) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads().running.insert(vcpu, me);
    }

    /// Called by a vCPU thread as it leaves its run loop (before the thread ends, so that no
    /// kick is ever sent to a thread that no longer exists), with the state it ended in: a
    /// pause counts it as parked in that state.
    pub(crate) fn leave(&self, vcpu: u8, final_state: Result<VcpuState, String>) {
        let mut threads = self.threads();
        threads.running.remove(&vcpu);
        threads.parked.remove(&vcpu);
        threads.finished.insert(vcpu, final_state);
        self.changed.notify_all();
    }

    /// Records that a vCPU's guest work ended now (its last exit), for completion times.
    pub(crate) fn mark_exit(&self) {
        self.threads().last_exit = Some(Instant::now());
    }

    /// Interrupts KVM_RUN in every running vCPU thread.
    pub fn kick_all(&self) {
        let threads = self.threads();
        self.kick(&threads);
    }

    fn kick(&self, threads: &Threads) {
        for &thread in threads.running.values() {
            // SAFETY: the thread is registered, so it has not left its run loop and still
            // exists (it deregisters under this same lock before ending); the signal has a
            // handler that does nothing, so delivering it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(thread, self.kick_signal) };
        }
    }

    /// Called by a vCPU thread that saw a pause request: hands over its saved state and waits
    /// until the VM is resumed or stopped, or the pause asks for the state again (the caller
    /// then finds the pause still requested, saves again and parks again).
    pub(crate) fn park(&self, vcpu: u8, state: Result<VcpuState, String>) {
        let mut threads = self.threads();
        let epoch = threads.epoch;
        threads.parked.insert(vcpu, (epoch, state));
        self.changed.notify_all();
        while self.pause_requested() && !self.should_stop() && threads.epoch == epoch {
            threads = self
                .changed
                .wait(threads)
                .unwrap_or_else(|e| e.into_inner());
        }
        if !self.pause_requested() || self.should_stop() {
            threads.parked.remove(&vcpu);
        }
    }

    /// Pauses the VM: every vCPU leaves KVM_RUN, completes pending I/O, saves its state and
    /// parks; a vCPU that has finished counts as parked in the state it ended in, and one
    /// whose thread has not entered its loop yet parks as it does. Returns once every vCPU of
    /// the run is accounted for, with their states by vCPU index.
    pub fn pause(&self, timeout: Duration) -> Result<Vec<VcpuState>, PauseError> {
        let deadline = Instant::now() + timeout;
        let mut threads = self.threads();
        if threads.paused {
            return Err(PauseError::AlreadyPaused);
        }
        if threads.vcpus == 0 || threads.finished.len() == usize::from(threads.vcpus) {
            return Err(PauseError::NotRunning);
        }
        threads.paused = true;
        self.pause.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        // Every vCPU parks, then (in a run of more than one) each saves its state again: a
        // vCPU that parked early may have been sent an interrupt (an IPI) by one still
        // running (or finishing), which its first save missed and which no vCPU can send any
        // more now.
        let mut resaved = false;
        let result = loop {
            if self.should_stop() {
                break Err(PauseError::Stopped);
            }
            if threads.all_saved_in(threads.epoch) && (resaved || threads.vcpus <= 1) {
                break Ok(());
            }
            if threads.all_stopped() && !resaved {
                resaved = true;
                threads.epoch += 1;
                self.changed.notify_all();
            }
            if Instant::now() >= deadline {
                break Err(PauseError::Timeout(timeout));
            }
            self.kick(&threads);
            threads = self
                .changed
                .wait_timeout(threads, PAUSE_KICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        let states = result.and_then(|()| threads.saved_states());
        if states.is_err() {
            // Never leave a half-paused VM behind.
            threads.paused = false;
            threads.epoch += 1;
            threads.parked.clear();
            self.pause.store(false, Ordering::SeqCst);
            self.changed.notify_all();
        }
        states
    }

    /// The states the parked vCPUs saved, while the VM is paused. A VM that started paused
    /// may have vCPUs on their way to park: they are waited for (up to the pause timeout).
    pub fn paused_states(&self, timeout: Duration) -> Result<Vec<VcpuState>, PauseError> {
        let deadline = Instant::now() + timeout;
        let mut threads = self.threads();
        loop {
            if !threads.paused {
                return Err(PauseError::NotPaused);
            }
            // (States of the epoch in force: a pause still asking for them again is waited for.)
            if threads.all_saved_in(threads.epoch) {
                return threads.saved_states();
            }
            if self.should_stop() {
                return Err(PauseError::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PauseError::Timeout(timeout));
            }
            threads = self
                .changed
                .wait_timeout(threads, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Marks the paused VM as (possibly) running elsewhere, or not: while it is, [`resume`]
    /// refuses, whoever asks.
    ///
    /// [`resume`]: RunControl::resume
    pub fn set_runs_elsewhere(&self, elsewhere: bool) {
        self.runs_elsewhere.store(elsewhere, Ordering::SeqCst);
    }

    /// Whether the VM may be running elsewhere (see [`RunControl::set_runs_elsewhere`]).
    pub fn runs_elsewhere(&self) -> bool {
        self.runs_elsewhere.load(Ordering::SeqCst)
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) -> Result<(), PauseError> {
        let mut threads = self.threads();
        if !threads.paused {
            // A run set to start paused that has not begun yet starts running instead.
            return match self.start_paused.swap(false, Ordering::SeqCst) {
                true => Ok(()),
                false => Err(PauseError::NotPaused),
            };
        }
        if self.runs_elsewhere() {
            return Err(PauseError::RunsElsewhere);
        }
        threads.paused = false;
        // States saved in this pause are over: a pause that comes before a vCPU wakes waits
        // for it to save anew.
        threads.epoch += 1;
        threads.parked.clear();
        self.pause.store(false, Ordering::SeqCst);
        self.changed.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    #[test]
    fn a_resume_before_a_paused_start_begins_lets_the_run_start_running() {
        let control = RunControl::default();
        control.set_start_paused(true);
        assert!(control.resume().is_ok());
        control.begin_run(1);
        assert!(!control.pause_requested());
        assert!(matches!(control.resume(), Err(PauseError::NotPaused)));

        // Without a resume, the run starts paused and waits for one.
        control.set_start_paused(true);
        control.begin_run(1);
        assert!(control.pause_requested());
        assert!(control.resume().is_ok());
        assert!(!control.pause_requested());
    }

    /// Fake vCPU threads for `control`'s run: each saves (a numbered "state", as the message of
    /// a failed save) and parks when a pause is asked for, until the run stops.
    fn fake_vcpus(
        control: &Arc<RunControl>,
        vcpus: u8,
        saves: &Arc<AtomicU64>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        (0..vcpus)
            .map(|vcpu| {
                let (control, saves) = (Arc::clone(control), Arc::clone(saves));
                std::thread::spawn(move || loop {
                    if control.should_stop() {
                        return;
                    }
                    if control.pause_requested() {
                        let n = saves.fetch_add(1, Ordering::SeqCst);
                        control.park(vcpu, Err(format!("{n}")));
                        continue;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                })
            })
            .collect()
    }

    /// The number of vCPU 0's save that a pause returned (its state is the fake failure).
    fn save_returned(paused: Result<Vec<VcpuState>, PauseError>) -> u64 {
        match paused {
            Err(PauseError::SaveFailed { vcpu: 0, message }) => message.parse().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pause_returns_states_saved_once_every_vcpu_had_stopped_and_never_old_ones() {
        let control = Arc::new(RunControl::default());
        control.begin_run(2);
        let saves = Arc::new(AtomicU64::new(0));
        let threads = fake_vcpus(&control, 2, &saves);
        for _ in 0..20 {
            // Saves before that pause came from earlier pauses.
            let before = saves.load(Ordering::SeqCst);
            // The two first saves of this pause come before both vCPUs had stopped: the state
            // returned is from a save made after (an interrupt sent meanwhile is in it).
            let n = save_returned(control.pause(Duration::from_secs(10)));
            assert!(
                n >= before + 2,
                "save {n} returned; {before} before the pause"
            );
            // The failed "states" unpaused the VM; the next pause comes at once, before the
            // vCPUs have woken, and must not take their old states.
        }
        control.request_stop(StopReason::Requested);
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn first_reason_wins() {
        let control = RunControl::default();
        assert!(!control.should_stop());
        control.request_stop(StopReason::Reset);
        control.request_stop(StopReason::Requested);
        assert!(control.should_stop());
        assert_eq!(control.reason(), Some(StopReason::Reset));
        control.begin_run(1);
        assert!(!control.should_stop());
        assert_eq!(control.reason(), None);
    }

    #[test]
    fn held_means_held_at_the_point_in_force() {
        let control = RunControl::default();
        control.begin_run(2);
        control.set_hold_at(Some(1));
        // vCPU 0 waits at point 1; vCPU 1 at point 2 (it got there before the point moved).
        control.threads().held.insert(0, 1);
        control.threads().held.insert(1, 2);
        assert_eq!(control.held(), [0]);
        // The point moves on: vCPU 0, not awake yet, still sits in its wait at 1, but it is not
        // held at 2 (a test waiting for "held at 2" must not see it there).
        control.set_hold_at(Some(2));
        assert_eq!(control.held(), [1]);
        control.set_hold_at(None);
        assert!(control.held().is_empty());
    }
}
