//! Live migration over the API: `PUT /migration/send` (also `"resume": true` after a broken
//! post-copy), `GET /migration`, `PUT /migration/switchover`, and on a destination
//! `PUT /migration/recover`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use snapshot::state::GuestInfo;
use vmm::VmHandle;

use super::http::Response;
use crate::locking::lock;
use crate::migration::incoming::{Incoming, RecoverError};
use crate::migration::progress::Progress;
use crate::migration::send::{
    self, GiveUp, GivenUp, Mode, PauseKind, PausedMigration, SendFailure, SendOptions,
};

/// Why a migration in progress gives up when `PUT /migration/cancel` asks.
const CANCELLED_BY_THE_OPERATOR: &str = "cancelled by the operator";

/// `PUT /migration/send`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    to: String,
    /// A directory with `ca.pem`, `cert.pem` and `key.pem`: TLS with mutual authentication.
    #[serde(default)]
    tls_dir: Option<PathBuf>,
    /// The settings of a new migration (absent: the defaults). A resume goes on as its
    /// migration began, so it refuses them.
    #[serde(default)]
    mode: Option<Mode>,
    /// `send::DEFAULT_DOWNTIME_MS` when absent.
    #[serde(default)]
    downtime_ms: Option<u64>,
    /// `send::DEFAULT_MAX_ROUNDS` when absent.
    #[serde(default)]
    max_rounds: Option<u32>,
    /// Resume a post-copy paused by a broken connection (`to`: where the destination's
    /// `recover` listens).
    #[serde(default)]
    resume: bool,
    /// Pre-copy: throttle the guest when rounds do not converge (yes when absent).
    #[serde(default)]
    throttle: Option<bool>,
    /// Pre-copy: send at most this many bytes a second while the guest runs.
    #[serde(default)]
    max_bandwidth: Option<u64>,
}

impl SendRequest {
    /// The settings of a new migration given with it.
    fn settings_given(&self) -> Vec<&'static str> {
        [
            ("mode", self.mode.is_some()),
            ("downtime_ms", self.downtime_ms.is_some()),
            ("max_rounds", self.max_rounds.is_some()),
            ("throttle", self.throttle.is_some()),
            ("max_bandwidth", self.max_bandwidth.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }

    /// The settings given that the mode asked for does not use (none for a resume, whose
    /// settings are refused whole): a post-copy has no rounds, a hybrid never throttles.
    fn settings_unused(&self) -> Vec<&'static str> {
        let unused: &[&str] = match self.mode {
            Some(Mode::Post) => &["downtime_ms", "max_rounds", "throttle", "max_bandwidth"],
            Some(Mode::Hybrid) => &["throttle"],
            _ => &[],
        };
        self.settings_given()
            .into_iter()
            .filter(|name| unused.contains(name))
            .collect()
    }
}

pub const SEND_SHAPE: &str = r#"{"to": "HOST:PORT", "mode": "pre"|"post"|"hybrid", "downtime_ms": N, "max_rounds": N, "tls_dir": DIR, "resume": BOOL, "throttle": BOOL, "max_bandwidth": BYTES_PER_S}"#;

/// What the migration must know of guest memory.
pub struct MemoryState {
    /// Why guest memory cannot be trusted, if so.
    pub failure: Option<String>,
    /// Whether all of it is in memory (no pager provides missing pages).
    pub holes_are_zero: bool,
}

/// `PUT /migration/recover`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    listen: String,
    #[serde(default)]
    tls_dir: Option<PathBuf>,
}

pub const RECOVER_SHAPE: &str = r#"{"listen": "HOST:PORT", "tls_dir": DIR}"#;

/// The migrations of one VM: the one that brought it here, if any, and those that send it on.
pub struct Migrations {
    /// The last outgoing migration: its report, status, or why it failed, and while it runs
    /// what it is doing (one lock: it is never seen active without its progress).
    outgoing: Mutex<Outgoing>,
    /// Set by `PUT /migration/switchover`: a hybrid migration goes post-copy.
    switch_now: Arc<AtomicBool>,
    /// An outgoing post-copy paused by a broken connection: the VM is paused here and runs on
    /// the destination.
    paused: Mutex<Option<Box<PausedMigration>>>,
    /// The VM has moved to another host: this process's run ends without it.
    migrated: AtomicBool,
    /// The migration that brought the VM here.
    incoming: Option<Arc<Incoming>>,
    /// The outgoing migration in progress, to give up (before its switch-over).
    in_progress: Mutex<InProgress>,
}

/// The outgoing migration in progress, and whether the VM is shutting down (one lock: a
/// shutdown and a migration that starts see each other).
#[derive(Default)]
struct InProgress {
    /// To give up (before its switch-over), and its mode.
    current: Option<(GiveUp, Mode)>,
    /// No migration starts any more.
    shutting_down: bool,
}

/// The outgoing migration's status, and its progress while it runs.
struct Outgoing {
    status: serde_json::Value,
    progress: Option<Arc<Progress>>,
}

impl Migrations {
    pub fn new(incoming: Option<Arc<Incoming>>) -> Self {
        Migrations {
            outgoing: Mutex::new(Outgoing {
                status: json!({ "status": "none" }),
                progress: None,
            }),
            switch_now: Arc::new(AtomicBool::new(false)),
            paused: Mutex::new(None),
            migrated: AtomicBool::new(false),
            incoming,
            in_progress: Mutex::default(),
        }
    }

    /// Whether the VM was migrated away.
    pub fn migrated(&self) -> bool {
        self.migrated.load(Ordering::Acquire)
    }

    /// `PUT /migration/cancel` while a migration runs: it is asked to give up, which it does
    /// before its next run of pages (the VM running on here); `None` when none runs.
    pub fn give_up_in_progress(&self) -> Option<Response> {
        let in_progress = lock(&self.in_progress);
        let (give_up, _) = in_progress.current.as_ref()?;
        Some(if give_up.ask(CANCELLED_BY_THE_OPERATOR) {
            Response {
                status: 202,
                body: Some(json!({
                    "status": "cancelling",
                    "detail": "the migration gives up before its next pages; the VM stays here \
                               as it was (running, or paused if it was before)",
                })),
            }
        } else {
            Response::error(
                409,
                "the migration in progress is past its switch-over (the VM may run on its \
                 destination): it is not cancelled now",
            )
        })
    }

    /// `PUT /migration/cancel`: gives up a migration paused before the destination
    /// confirmed it runs the VM (the operator knows it does not): the VM runs here again.
    pub fn cancel(&self, handle: &VmHandle) -> Response {
        // Looked at in its slot, and taken only to be cancelled: a shutdown meanwhile sees a
        // paused migration until it is given up.
        let paused = {
            let mut slot = lock(&self.paused);
            match slot.as_ref() {
                None => {
                    return Response::error(
                        409,
                        "no migration runs or is paused: nothing to cancel",
                    )
                }
                Some(paused) if paused.confirmed => {
                    return Response::error(
                        409,
                        "the destination confirmed that it runs the VM: it must not run here \
                         too (resume the migration instead)",
                    )
                }
                Some(_) => slot.take().expect("looked at above"),
            }
        };
        // Given up either way: the paused migration is gone, and the status says so.
        let cancelled = send::cancel(handle, *paused);
        let vm = if handle.control().is_paused() {
            "paused"
        } else {
            "running"
        };
        match cancelled {
            Ok(()) => {
                let cancelled = json!({ "status": "cancelled", "vm": vm });
                self.end_outgoing(cancelled.clone());
                Response::ok(cancelled)
            }
            Err(e) => {
                let message = format!("{e:#}");
                self.end_outgoing(json!({ "status": "cancelled", "vm": vm, "error": message }));
                Response::error(
                    500,
                    format!(
                        "the migration is cancelled, but the VM did not run again here \
                         (`faultline vm resume` may): {message}"
                    ),
                )
            }
        }
    }

    /// `PUT /vm/shutdown`: decides, at once with what it sees, whether the VM may go. An
    /// outgoing migration before its switch-over gives up; one past it (a resume among them)
    /// or one paused here refuses, with why (its destination may run the VM and need pages,
    /// or an answer, that only this side has), unless `force`. Once it may go, no migration
    /// starts, and a paused incoming one stops waiting for recovery.
    pub fn shut_down(&self, force: bool) -> Result<(), &'static str> {
        let mut in_progress = lock(&self.in_progress);
        if let Some((give_up, _)) = in_progress.current.as_ref() {
            // Asked and closed under one lock: it gives up, or it is past its switch-over.
            if !give_up.ask("the VM is shutting down") && !force {
                return Err(
                    "a migration past its switch-over is in progress: the destination may run \
                     the VM and need pages, or an answer, that only this side has",
                );
            }
        }
        if !force {
            if let Some(paused) = lock(&self.paused).as_ref() {
                return Err(match paused.kind() {
                    PauseKind::SwitchOverUnconfirmed => {
                        "an unconfirmed switch-over is paused here: only this side can learn \
                         (by resuming) whether the destination runs the VM"
                    }
                    PauseKind::EndCut => {
                        "a migration is paused here before its last word: resuming ends it"
                    }
                    PauseKind::PostCopy => {
                        "a post-copy is paused here: the destination may run the VM and need \
                         pages that only this side has"
                    }
                });
            }
        }
        in_progress.shutting_down = true;
        drop(in_progress);
        if let Some(incoming) = &self.incoming {
            incoming.abandon();
        }
        Ok(())
    }

    /// `GET /migration`: the outgoing migration if there was one, else the one that brought
    /// the VM here.
    pub fn status(&self) -> serde_json::Value {
        let outgoing = {
            let current = lock(&self.outgoing);
            let mut status = current.status.clone();
            if let Some(progress) = &current.progress {
                status["progress"] = progress.json();
            }
            status
        };
        match &self.incoming {
            Some(incoming) if outgoing["status"] == "none" => incoming.status(),
            _ => outgoing,
        }
    }

    /// Why a snapshot cannot be taken now, if so: pages still on an incoming migration's
    /// source are not in guest RAM (a regular snapshot would save them as zeros), and the
    /// source may be unreachable until the migration is recovered.
    pub fn refuse_snapshot(&self) -> Option<Response> {
        let incoming = self.incoming.as_ref()?;
        let phase = incoming.phase();
        (phase != crate::migration::incoming::Phase::Completed).then(|| {
            Response::error(
                409,
                format!(
                    "the migration that brought the VM here is {}: no snapshot is taken \
                     before all its memory is here",
                    phase.name()
                ),
            )
        })
    }

    /// `PUT /migration/switchover`.
    pub fn switch_over(&self) -> Response {
        match lock(&self.in_progress).current.as_ref() {
            None => Response::error(409, "no migration is in progress"),
            Some((give_up, _)) if !give_up.before_switch_over() => {
                Response::error(409, "the migration in progress is past its rounds already")
            }
            Some((_, mode)) if *mode != Mode::Hybrid => Response::error(
                409,
                format!(
                    "the migration in progress is a {} one: only a hybrid migration goes \
                     post-copy when told",
                    mode.name()
                ),
            ),
            Some(_) => {
                self.switch_now.store(true, Ordering::Release);
                Response::no_content()
            }
        }
    }

    /// `PUT /migration/recover`: listens for the source of a paused incoming post-copy.
    pub fn recover(&self, request: &RecoverRequest) -> Response {
        let Some(incoming) = &self.incoming else {
            return Response::error(
                409,
                "this VM did not arrive by migration: nothing to recover",
            );
        };
        match incoming.offer(&request.listen, request.tls_dir.as_deref()) {
            Ok(addr) => Response::ok(json!({ "listening": addr.to_string() })),
            Err(e) => {
                let status = match e {
                    RecoverError::NotPaused(_)
                    | RecoverError::NotRecoverable
                    | RecoverError::ShuttingDown => 409,
                    RecoverError::Tls { .. } | RecoverError::TlsRequired => 400,
                    RecoverError::Listen { .. } => 400,
                };
                Response::error(status, super::server::chain(&e))
            }
        }
    }

    /// An outgoing migration begins: its status and its progress.
    fn begin_outgoing(&self, status: serde_json::Value, progress: &Arc<Progress>) {
        *lock(&self.outgoing) = Outgoing {
            status,
            progress: Some(Arc::clone(progress)),
        };
    }

    /// The outgoing migration has ended (or was cancelled): its last status, no progress.
    fn end_outgoing(&self, status: serde_json::Value) {
        *lock(&self.outgoing) = Outgoing {
            status,
            progress: None,
        };
    }

    /// `PUT /migration/send`: migrates the VM (or resumes a paused post-copy), answering when
    /// it is done or has failed. `memory_failure`: why guest memory cannot be trusted, if so.
    pub fn send(
        &self,
        handle: &VmHandle,
        guest: Option<GuestInfo>,
        memory: MemoryState,
        request: &SendRequest,
    ) -> Response {
        let MemoryState {
            failure: memory_failure,
            holes_are_zero,
        } = memory;
        use std::net::ToSocketAddrs;
        let mut addrs = match request.to.to_socket_addrs() {
            Ok(addrs) => addrs,
            Err(e) => {
                return Response::error(
                    400,
                    format!("{:?} is not a HOST:PORT that resolves: {e}", request.to),
                )
            }
        };
        if addrs.any(|addr| addr.port() == 0) {
            return Response::error(
                400,
                format!("{:?}: port 0 names no destination", request.to),
            );
        }
        if request.resume {
            let given = request.settings_given();
            if !given.is_empty() {
                return Response::error(
                    400,
                    format!(
                        "a resume goes on as its migration began: {} cannot be given with \
                         \"resume\"",
                        given.join(", ")
                    ),
                );
            }
        }
        let unused = request.settings_unused();
        if !unused.is_empty() {
            return Response::error(
                400,
                format!(
                    "{} {} nothing in a {} migration (post-copy sends no rounds; a hybrid goes \
                     post-copy rather than throttle)",
                    unused.join(", "),
                    if unused.len() == 1 {
                        "changes"
                    } else {
                        "change"
                    },
                    request.mode.unwrap_or_default().name(),
                ),
            );
        }
        use crate::migration::pace::MIN_CAP;
        if request.max_bandwidth.is_some_and(|cap| cap < MIN_CAP) {
            return Response::error(
                400,
                format!("max_bandwidth must be at least 1 MiB ({MIN_CAP} bytes) a second"),
            );
        }
        if let Some(incoming) = &self.incoming {
            let phase = incoming.phase();
            if phase != crate::migration::incoming::Phase::Completed {
                return Response::error(
                    409,
                    format!(
                        "the migration that brought the VM here is {}: it cannot move on \
                         before all its memory is here",
                        phase.name()
                    ),
                );
            }
        }
        if let Some(fatal) = memory_failure {
            return Response::error(
                500,
                format!("guest memory cannot be trusted, so the VM is not migrated: {fatal}"),
            );
        }
        let tls = match &request.tls_dir {
            Some(dir) => match crate::migration::channel::Tls::client(dir) {
                Ok(tls) => Some(tls),
                Err(e) => return Response::error(400, format!("{e:#}")),
            },
            None => None,
        };
        let mode = request.mode.unwrap_or_default();
        let give_up = GiveUp::default();
        // Both settled before the migration is published below: a resume is past its
        // switch-over already (a shutdown must not take it for one it can give up), and a
        // switch-over asked once it is published must not be undone.
        if request.resume {
            let _ = give_up.close();
        }
        self.switch_now.store(false, Ordering::Release);
        // The paused migration leaves its slot under the lock a shutdown takes (in the same
        // order, `in_progress` then `paused`), so that a shutdown sees it or this migration,
        // never neither.
        let paused = {
            let mut in_progress = lock(&self.in_progress);
            if in_progress.shutting_down {
                return Response::error(409, "the VM is shutting down: it migrates nowhere");
            }
            let mut slot = lock(&self.paused);
            match (slot.is_some(), request.resume) {
                (false, true) => {
                    return Response::error(409, "there is no paused migration to resume")
                }
                (true, false) => {
                    return Response::error(
                        409,
                        "a migration is paused (the VM may run on its destination): resume it \
                         with \"resume\": true",
                    )
                }
                _ => {}
            }
            in_progress.current = Some((give_up.clone(), mode));
            slot.take()
        };
        let progress = Arc::new(Progress::default());
        self.begin_outgoing(json!({ "status": "active", "to": request.to }), &progress);
        let options = SendOptions {
            give_up,
            switch_now: Arc::clone(&self.switch_now),
            tls,
            to: request.to.clone(),
            mode,
            downtime: Duration::from_millis(
                request.downtime_ms.unwrap_or(send::DEFAULT_DOWNTIME_MS),
            ),
            max_rounds: request.max_rounds.unwrap_or(send::DEFAULT_MAX_ROUNDS),
            throttle: request.throttle.unwrap_or(true),
            max_bandwidth: request.max_bandwidth,
            progress: Arc::clone(&progress),
            holes_are_zero,
        };
        let result = match paused {
            Some(paused) => crate::migration::postcopy_send::resume(handle, &options, paused),
            None => send::send(handle, guest, &options),
        };
        // The outcome is settled (a paused migration put in its slot) and the migration is done
        // with under one lock, the one a shutdown or a cancel takes first: they see it in
        // progress or settled, never an ended one as still running.
        let mut in_progress = lock(&self.in_progress);
        let answer = self.answer_send(handle, &request.to, result);
        in_progress.current = None;
        answer
    }

    /// The answer to `PUT /migration/send` whose migration ended with `result`.
    fn answer_send(
        &self,
        handle: &VmHandle,
        to: &str,
        result: Result<send::SendReport, SendFailure>,
    ) -> Response {
        match result {
            Ok(report) => {
                // Noted before the VM stops, so that the run ending here is known as a move.
                self.migrated.store(true, Ordering::Release);
                handle
                    .control()
                    .request_stop(vmm::control::StopReason::Requested);
                let report = json!(report);
                self.end_outgoing(report.clone());
                Response::ok(report)
            }
            Err(SendFailure::Here(e)) => {
                let message = format!("{e:#}");
                // Ended because the operator cancelled it (not by a failure that came first):
                // that is its outcome.
                let status = if GivenUp::reason_in(&e) == Some(CANCELLED_BY_THE_OPERATOR) {
                    "cancelled"
                } else {
                    "failed"
                };
                self.end_outgoing(json!({ "status": status, "error": message }));
                let control = handle.control();
                let here = if control.should_stop() {
                    "the VM is shutting down here"
                } else if control.is_paused() {
                    "the VM stays paused here"
                } else if !control.is_running() {
                    "the VM stays here (its vCPUs have finished)"
                } else {
                    "the VM runs on here"
                };
                let what = if status == "cancelled" {
                    "the migration was cancelled"
                } else {
                    "the migration failed"
                };
                Response::error(502, format!("{what}; {here}: {message}"))
            }
            Err(SendFailure::Paused(e, paused)) => {
                let message = format!("{e:#}");
                let (status, what) = (paused.kind().status(), paused.kind().describe());
                let where_now = if paused.confirmed {
                    "the VM runs on the destination, and stays paused here, never to run here \
                     again"
                } else {
                    "the destination may run the VM (it did not say whether it does before \
                     the connection broke or the wait ran out), so it stays paused here (if the destination surely does not run \
                     it, `faultline migrate cancel` runs it here again)"
                };
                self.end_outgoing(json!({
                    "status": status,
                    "to": to,
                    "error": message,
                    "destination_confirmed": paused.confirmed,
                }));
                *lock(&self.paused) = Some(paused);
                Response::error(
                    502,
                    format!(
                        "{what}; {where_now}: {message}. Recover it: `faultline migrate \
                         recover` on the destination, then `faultline migrate send --resume \
                         --to` the address it listens on"
                    ),
                )
            }
        }
    }
}
