//! The API threads and what each request does to the VM.
//!
//! One thread accepts connections and hands each to a thread of its own, at most
//! [`MAX_CONNECTIONS`] at once, so a slow or idle client never delays another. A request must
//! arrive whole within [`REQUEST_DEADLINE`] of its connection. Operations that change the VM
//! (pause, resume, snapshot) run one at a time; reads and shutdown never wait for them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, ErrorKind, Read};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pager::PagerHandle;
use serde::Deserialize;
use serde_json::json;
use snapshot::create::{CreateOptions, MemoryBacking};
use snapshot::state::{GuestInfo, SnapshotRef};
use snapshot::SnapshotError;
use vmm::control::PauseError;
use vmm::tracking::TrackError;
use vmm::{VmError, VmHandle};

use super::http::{self, HttpError, Request, Response};
use super::migration::{self, Migrations};
use super::track::{self, EventQueue, TrackRequest};
use crate::locking::lock;

/// Most connections served at once; the accept thread answers any beyond with 503.
pub const MAX_CONNECTIONS: usize = 256;

/// Most `GET /track/events` streams open at once (each holds a connection for as long as its
/// client reads): the connections left always serve requests, shutdown and recovery among them.
pub const MAX_EVENT_STREAMS: usize = 64;

/// A request (head and body) must arrive in full within this long of its connection being
/// accepted, or it is answered with 408.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// How long writing a response may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the accept thread spends writing a refusal (to a fresh connection, whose buffer
/// is empty, so the write does not wait in practice).
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Stack of a connection thread. Stacks are committed as they are touched; a snapshot taken
/// through the API runs on this stack, so it is not cut to the bone.
const CONNECTION_STACK_BYTES: usize = 512 << 10;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("another process already serves the API socket {0}")]
    InUse(PathBuf),
    #[error("cannot listen on the API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} exists and is not a socket, so faultline will not replace it: choose another \
         --api-sock"
    )]
    NotASocket(PathBuf),
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
    #[error(
        "another faultline process has been binding the API socket {} for {} s (stopped?): \
         not waiting for it",
        .0.display(),
        BIND_LOCK_PATIENCE.as_secs()
    )]
    BindBusy(PathBuf),
}

/// What the API acts on: the VM, its pager, and the snapshot history of this process.
pub struct Controller {
    handle: VmHandle,
    pager: Option<PagerHandle>,
    guest: Option<GuestInfo>,
    started: Instant,
    /// The last snapshot this process wrote: the parent of the next diff snapshot. Only ever
    /// held for a read or a write of the value, never across a snapshot, so `GET /vm/stats`
    /// does not wait for one.
    last_snapshot: Mutex<Option<SnapshotRef>>,
    /// Held while an operation that changes the VM (pause, resume, snapshot) runs. A second
    /// one is refused with 409 rather than queued; reads and shutdown never take it.
    operation: Mutex<()>,
    shutdown: AtomicBool,
    /// The server is stopping: streams end (after writing what they hold).
    closing: AtomicBool,
    /// `GET /track/events` streams open.
    event_streams: AtomicUsize,
    /// Migrations of the VM, in and out.
    migrations: Migrations,
}

/// `PUT /vm/shutdown`: `force` shuts down also a source a paused migration still needs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownRequest {
    #[serde(default)]
    force: bool,
}

/// `PUT /vm/hold`: the micro-guest hold point vCPUs wait at (null: none, releasing them).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldRequest {
    at: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    dir: PathBuf,
    #[serde(rename = "type", default)]
    kind: SnapshotKind,
    /// The VM runs on while its memory is written (userfaultfd write protection).
    #[serde(default)]
    live: bool,
}

/// `PUT /vm/swap/out`: how much guest memory stays resident (bytes; 0 if absent).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapOutRequest {
    keep: Option<u64>,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum SnapshotKind {
    #[default]
    Full,
    Diff,
}

/// The whole cause chain of an error, on one line.
pub(super) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The status of a refused tracking request: the caller's mistake (400), a state that does not
/// allow it (409), or faultline's or KVM's failure (500).
fn track_error_status(error: &TrackError) -> u16 {
    match error {
        TrackError::ZeroLength
        | TrackError::Unaligned { .. }
        | TrackError::OutsideRam { .. }
        | TrackError::Memslots(vmm::MemslotError::TooMany { .. }) => 400,
        TrackError::NotTracked { .. } | TrackError::Pause(_) => 409,
        TrackError::Memslots(_) | TrackError::Dirty(_) => 500,
    }
}

/// The JSON body of `request`, or a 400 saying what is wrong with it and the `shape` expected.
fn json_body<T: serde::de::DeserializeOwned>(
    request: &Request,
    shape: &str,
) -> Result<T, Response> {
    request
        .json::<T>()
        .map_err(|e| Response::error(400, format!("{}: expected {shape}", chain(&e))))
}

/// How the dirty log is kept, as the API names it.
fn dirty_log_name(mode: vmm::DirtyMode) -> serde_json::Value {
    match mode {
        vmm::DirtyMode::Off => json!("off"),
        vmm::DirtyMode::Bitmap => json!("bitmap"),
        vmm::DirtyMode::Ring(entries) => json!({ "ring": entries }),
    }
}

fn vm_error(error: VmError) -> Response {
    let status = match error {
        VmError::Pause(PauseError::Timeout(_)) => 500,
        VmError::Pause(_) | VmError::Running | VmError::DirtyTrackingOff => 409,
        _ => 500,
    };
    Response::error(status, chain(&error))
}

/// The answer to an operation that changes the VM while another one runs.
fn busy() -> Response {
    Response::error(
        409,
        "another operation is in progress (a snapshot, a migration, a pause or a resume): try \
         again when it ends",
    )
}

impl Controller {
    pub fn new(handle: VmHandle, pager: Option<PagerHandle>, guest: Option<GuestInfo>) -> Self {
        Controller {
            handle,
            pager,
            guest,
            started: Instant::now(),
            last_snapshot: Mutex::new(None),
            operation: Mutex::new(()),
            shutdown: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            event_streams: AtomicUsize::new(0),
            migrations: Migrations::new(None),
        }
    }

    /// The controller of a VM that arrived by migration (`GET /migration` reports it, and
    /// `PUT /migration/recover` recovers it if its post-copy pauses).
    pub fn arrived(mut self, incoming: Arc<crate::migration::incoming::Incoming>) -> Self {
        self.migrations = Migrations::new(Some(incoming));
        self
    }

    /// Whether a client asked the VM to shut down (the guest then ends unfinished, as asked).
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Whether the VM was migrated away (its run here then ends unfinished, as it should).
    pub fn migrated(&self) -> bool {
        self.migrations.migrated()
    }

    /// Ends every tracking-event stream once it has written what it holds (the server is
    /// stopping).
    fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// `PUT /track` (`add`) or `DELETE /track`.
    fn track(&self, request: &Request, add: bool) -> Response {
        let body = match json_body::<TrackRequest>(
            request,
            r#"{"gpa": N, "len": N, "mode": "write"|"access"}"#,
        ) {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        self.exclusively(|| self.track_change(&body, add))
    }

    fn track_change(&self, body: &TrackRequest, add: bool) -> Response {
        let memory = self.handle.memory();
        let result = if add {
            memory.track(body.gpa, body.len, body.mode)
        } else {
            memory.untrack(body.gpa, body.len, body.mode)
        };
        match result {
            Ok(()) => Response::no_content(),
            Err(e) => Response::error(track_error_status(&e), chain(&e)),
        }
    }

    /// `GET /track/events`: streams tracking events to `stream` until the client goes or
    /// the server stops, holding one of the [`MAX_EVENT_STREAMS`] places meanwhile.
    fn stream_track_events(&self, stream: &UnixStream, _place: EventStreamPlace<'_>) {
        let queue = Arc::new(EventQueue::default());
        let memory = self.handle.memory();
        let id = memory.register(queue.clone());
        let result = http::write_stream_head(&mut &*stream).and_then(|()| {
            track::stream_events(stream, &queue, || self.closing.load(Ordering::Acquire))
        });
        memory.unregister(id);
        if let Err(e) = result {
            tracing::debug!("api: tracking event stream ended: {e}");
        }
    }

    /// One of the [`MAX_EVENT_STREAMS`] places, held until the guard drops; `None` when all
    /// are taken.
    fn take_event_stream_place(&self) -> Option<EventStreamPlace<'_>> {
        self.event_streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < MAX_EVENT_STREAMS).then_some(open + 1)
            })
            .ok()
            .map(|_| EventStreamPlace(&self.event_streams))
    }

    /// Makes `snapshot` the parent of the next diff snapshot.
    fn set_last_snapshot(&self, snapshot: Option<SnapshotRef>) {
        *lock(&self.last_snapshot) = snapshot;
    }

    /// Runs `operation`, which changes the VM, unless another one runs (409).
    fn exclusively(&self, operation: impl FnOnce() -> Response) -> Response {
        match self.begin_operation() {
            Some(_running) => operation(),
            None => busy(),
        }
    }

    /// Starts an operation that changes the VM, or `None` while another one runs.
    fn begin_operation(&self) -> Option<MutexGuard<'_, ()>> {
        match self.operation.try_lock() {
            Ok(guard) => Some(guard),
            // The lock guards no data: a panic during an earlier operation leaves nothing to
            // repair.
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    fn state_name(&self) -> &'static str {
        let control = self.handle.control();
        if control.is_paused() {
            "paused"
        } else if control.is_running() {
            "running"
        } else {
            "stopped"
        }
    }

    fn info(&self) -> serde_json::Value {
        json!({
            "state": self.state_name(),
            "vcpus": self.handle.vcpu_count(),
            "mem_bytes": self.handle.ram().size(),
            "guest": self.guest,
            "dirty_tracking": self.handle.tracks_dirty(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "hold": {
                "at": self.handle.control().hold_at(),
                "held_vcpus": self.handle.control().held(),
            },
        })
    }

    fn stats(&self) -> serde_json::Value {
        let mut info = self.info();
        info["pager"] = json!(self.pager.as_ref().map(PagerHandle::stats));
        info["last_snapshot"] = json!(lock(&self.last_snapshot).as_ref().map(|last| &last.dir));
        info["ram_resident_bytes"] = match self.ram_resident_bytes() {
            Ok(bytes) => json!(bytes),
            Err(e) => json!({ "error": e.to_string() }),
        };
        info["swap"] = json!(self.pager.as_ref().map(PagerHandle::swap_stats));
        // Zero outside a live snapshot: one that ended left no page protected.
        info["write_protected_pages"] = match self.handle.ram().write_protected_pages() {
            Ok(pages) => json!(pages),
            Err(e) => json!({ "error": e.to_string() }),
        };
        info
    }

    /// The pager, if it has a swap file; a 409 saying how to get one otherwise.
    fn swapping_pager(&self) -> Result<&PagerHandle, Response> {
        match &self.pager {
            Some(pager) if pager.swaps() => Ok(pager),
            _ => Err(Response::error(
                409,
                "this VM has no swap file: start it with --swap-file PATH (or --mem-limit SIZE)",
            )),
        }
    }

    /// `PUT /vm/swap/out`: swaps guest memory out until at most `keep` bytes stay resident.
    fn swap_out(&self, request: &SwapOutRequest) -> Response {
        let pager = match self.swapping_pager() {
            Ok(pager) => pager,
            Err(refusal) => return refusal,
        };
        if let Some(fatal) = self.memory_failure() {
            return Response::error(
                500,
                format!("guest memory cannot be trusted, so nothing is swapped out: {fatal}"),
            );
        }
        let started = Instant::now();
        match pager.swap_out_keeping(request.keep.unwrap_or(0)) {
            Ok(report) => Response::ok(json!({
                "swapped_pages": report.swapped,
                "unchanged_pages": report.unchanged,
                "zero_pages": report.zero,
                "bytes_written": report.bytes_written,
                "ms": started.elapsed().as_secs_f64() * 1e3,
                "swap": pager.swap_stats(),
            })),
            Err(pager::PagerError::ProtectionActive) => Response::error(
                409,
                "a live snapshot is being written: swap out when it is done",
            ),
            Err(e) => Response::error(500, chain(&e)),
        }
    }

    /// Bytes of guest RAM its memfds hold now (allocated blocks): what the host really
    /// spends on the guest.
    fn ram_resident_bytes(&self) -> Result<u64, std::io::Error> {
        let mut bytes = 0;
        for region in self.handle.ram().regions() {
            let stat = rustix::fs::fstat(region.memfd())?;
            bytes += stat.st_blocks as u64 * 512;
        }
        Ok(bytes)
    }

    /// The pager's fatal error, if it had one: guest memory cannot be trusted after it.
    fn memory_failure(&self) -> Option<String> {
        self.pager.as_ref().and_then(PagerHandle::fatal_error)
    }

    /// Takes a snapshot; the caller holds the operation lock, so no other snapshot can change
    /// `last_snapshot` in between.
    fn snapshot(&self, request: &SnapshotRequest) -> Response {
        let refused = |fatal: String| {
            Response::error(
                500,
                format!("guest memory cannot be trusted, so no snapshot is taken: {fatal}"),
            )
        };
        if let Some(fatal) = self.memory_failure() {
            return refused(fatal);
        }
        let parent = {
            // Released at the end of this block: the snapshot is taken without it.
            let last = lock(&self.last_snapshot);
            match (request.kind, last.as_ref()) {
                (SnapshotKind::Full, _) => None,
                (SnapshotKind::Diff, Some(parent)) => Some(parent.clone()),
                (SnapshotKind::Diff, None) => return Response::error(
                    400,
                    "a diff snapshot needs an earlier snapshot of this VM: take a full one first",
                ),
            }
        };
        let options = CreateOptions {
            dir: request.dir.clone(),
            diff_parent: parent,
            guest: self.guest.clone(),
            backing: if self.pager.is_some() {
                MemoryBacking::Lazy
            } else {
                MemoryBacking::Resident
            },
            pager: self.pager.clone(),
        };
        if let Some(refusal) = self.migrations.refuse_snapshot() {
            return refusal;
        }
        if self.handle.control().runs_elsewhere() {
            return Response::error(
                409,
                "the VM may run on the destination of its migration: a snapshot of this copy \
                 would be a second, stale one",
            );
        }
        let taken = if request.live {
            snapshot::live::create_live(&self.handle, self.pager.as_ref(), &options)
        } else {
            snapshot::create::create(&self.handle, &options)
        };
        match (taken, self.memory_failure()) {
            // The pager failed while the snapshot was written: what it read may be wrong, and
            // it was not published.
            (Err(SnapshotError::PagerFailed(fatal)), _) => refused(fatal),
            // Published: every page was read before the pager was last seen sound, so a
            // failure since cannot concern it.
            (Ok(summary), _) => {
                self.set_last_snapshot(Some(SnapshotRef {
                    dir: summary.dir.clone(),
                    identity: summary.identity.clone(),
                }));
                Response::ok(json!(summary))
            }
            // It failed because the pager did (a page it read could not be provided): the
            // pager's failure is the cause to name.
            (Err(error), Some(fatal)) => {
                refused(format!("{fatal} (the snapshot stopped: {})", chain(&error)))
            }
            (Err(error), None) => {
                // The previous snapshot stays the parent of the next diff: a failed snapshot
                // puts back the dirty log it took, as if it had not been taken.
                let status = if error.is_usage() { 400 } else { 500 };
                Response::error(status, chain(&error))
            }
        }
    }

    /// Answers one request.
    pub fn handle(&self, request: &Request) -> Response {
        let path = request.path.trim_end_matches('/');
        match (request.method.as_str(), path) {
            ("GET", "/vm") => Response::ok(self.info()),
            ("GET", "/vm/stats") => Response::ok(self.stats()),
            ("PUT", "/vm/pause") => self.exclusively(|| match self.handle.pause() {
                Ok(_) => Response::no_content(),
                Err(e) => vm_error(e),
            }),
            ("PUT", "/vm/resume") => self.exclusively(|| match self.handle.resume() {
                Ok(()) => Response::no_content(),
                Err(e) => vm_error(e),
            }),
            // Never waits: it only sets a flag and asks the vCPUs to stop.
            ("PUT", "/vm/shutdown") => {
                let body = match json_body::<ShutdownRequest>(request, r#"{"force": BOOL}"#) {
                    Ok(body) => body,
                    Err(refusal) => return refusal,
                };
                if let Err(why) = self.migrations.shut_down(body.force) {
                    return Response::error(
                        409,
                        format!(
                            "not shut down: {why}; resume the migration (`faultline migrate \
                             send --resume`) or cancel it, or shut down anyway with \
                             {{\"force\": true}} (`faultline vm shutdown --force`)"
                        ),
                    );
                }
                self.shutdown.store(true, Ordering::Release);
                self.handle
                    .control()
                    .request_stop(vmm::control::StopReason::Requested);
                Response::no_content()
            }
            ("PUT", "/vm/hold") => {
                match json_body::<HoldRequest>(request, r#"{"at": N or null}"#) {
                    Ok(body) => {
                        self.handle.control().set_hold_at(body.at);
                        Response::no_content()
                    }
                    Err(refusal) => refusal,
                }
            }
            ("PUT", "/snapshot/create") => {
                let shape = r#"{"dir": PATH, "type": "full"|"diff", "live": BOOL}"#;
                match json_body::<SnapshotRequest>(request, shape) {
                    Ok(body) => self.exclusively(|| self.snapshot(&body)),
                    Err(refusal) => refusal,
                }
            }
            ("PUT", "/migration/send") => {
                match json_body::<migration::SendRequest>(request, migration::SEND_SHAPE) {
                    Ok(body) => self.exclusively(|| {
                        let memory = migration::MemoryState {
                            failure: self.memory_failure(),
                            holes_are_zero: self.pager.is_none(),
                        };
                        self.migrations
                            .send(&self.handle, self.guest.clone(), memory, &body)
                    }),
                    Err(refusal) => refusal,
                }
            }
            ("GET", "/migration") => Response::ok(self.migrations.status()),
            // Never waits: it only tells the migration in progress.
            ("PUT", "/migration/switchover") => self.migrations.switch_over(),
            // A migration in progress is only asked to give up (it holds the VM meanwhile);
            // a paused one is cancelled here.
            ("PUT", "/migration/cancel") => match self.migrations.give_up_in_progress() {
                Some(answer) => answer,
                None => self.exclusively(|| self.migrations.cancel(&self.handle)),
            },
            // Never waits: it only opens the listener the paused migration takes.
            ("PUT", "/migration/recover") => {
                match json_body::<migration::RecoverRequest>(request, migration::RECOVER_SHAPE) {
                    Ok(body) => self.migrations.recover(&body),
                    Err(refusal) => refusal,
                }
            }
            ("PUT", "/vm/swap/out") => {
                match json_body::<SwapOutRequest>(request, r#"{"keep": BYTES}"#) {
                    Ok(body) => self.exclusively(|| self.swap_out(&body)),
                    Err(refusal) => refusal,
                }
            }
            ("PUT", "/vm/swap/in") => match self.swapping_pager() {
                Ok(pager) => {
                    pager.swap_in_all();
                    Response::no_content()
                }
                Err(refusal) => refusal,
            },
            ("PUT", "/track") => self.track(request, true),
            ("DELETE", "/track") => self.track(request, false),
            ("GET", "/track") => Response::ok(json!({
                "ranges": self.handle.memory().tracked(),
                "dirty_log": dirty_log_name(self.handle.memory().dirty_mode()),
            })),
            (_, "/vm" | "/vm/stats" | "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/vm/hold")
            | (_, "/vm/swap/out" | "/vm/swap/in")
            | (_, "/snapshot/create" | "/track" | "/track/events")
            | (_, "/migration" | "/migration/send" | "/migration/switchover")
            | (_, "/migration/recover" | "/migration/cancel") => Response::error(
                405,
                format!("{} is not allowed on {}", request.method, request.path),
            ),
            _ => Response::error(404, format!("no such endpoint: {}", request.path)),
        }
    }
}

/// The connections being served, by id: a clone of each stream, so that teardown can shut
/// them down. The accept thread adds each before starting its thread; the thread removes it as
/// it ends. Its size is the number of connections served at once.
type Open = Arc<Mutex<HashMap<u64, UnixStream>>>;

/// Removes a connection from [`Open`] when its thread ends (also by a panic).
struct Registered {
    open: Open,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.open).remove(&self.id);
    }
}

/// Reads from a stream, failing with [`ErrorKind::TimedOut`] once `deadline` has passed: every
/// read waits at most for the time left.
struct DeadlineReader {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timed_out = || io::Error::new(ErrorKind::TimedOut, "the request deadline passed");
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        self.stream.set_read_timeout(Some(left))?;
        match self.stream.read(buf) {
            // A socket read timeout reads as WouldBlock (EAGAIN) on Linux.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(timed_out())
            }
            other => other,
        }
    }
}

/// Reads one request from `stream`, all of which (head and body) must arrive by `deadline`;
/// gives the stream back for the answer.
fn read_by(stream: UnixStream, deadline: Instant) -> (UnixStream, Result<Request, HttpError>) {
    let mut reader = BufReader::new(DeadlineReader { stream, deadline });
    let request = http::read_request(&mut reader);
    (reader.into_inner().stream, request)
}

/// Whether reading a request failed because its deadline passed.
fn is_timeout(error: &HttpError) -> bool {
    matches!(error, HttpError::Io(e) if e.kind() == ErrorKind::TimedOut)
}

/// The answer to a request that did not arrive in time.
fn request_timeout() -> Response {
    Response::error(
        408,
        format!(
            "the request did not arrive in full within {} s of connecting: send the whole \
             request at once",
            REQUEST_DEADLINE.as_secs()
        ),
    )
}

/// A tracking event stream's place among the [`MAX_EVENT_STREAMS`], given back on drop.
struct EventStreamPlace<'a>(&'a AtomicUsize);

impl Drop for EventStreamPlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer to a connection beyond [`MAX_CONNECTIONS`].
fn too_many_connections() -> Response {
    Response::error(
        503,
        format!("too many API connections (at most {MAX_CONNECTIONS} at once); try again"),
    )
}

/// The answer to a `GET /track/events` beyond [`MAX_EVENT_STREAMS`].
fn too_many_event_streams() -> Response {
    Response::error(
        503,
        format!(
            "too many tracking event streams (at most {MAX_EVENT_STREAMS} at once); close one \
             and try again"
        ),
    )
}

/// Serves one connection (one request) that was accepted at `accepted`.
fn serve(stream: UnixStream, accepted: Instant, controller: &Controller) {
    let (stream, request) = read_by(stream, accepted + REQUEST_DEADLINE);
    let response = match request {
        Ok(request)
            if request.method == "GET" && request.path.trim_end_matches('/') == "/track/events" =>
        {
            match controller.take_event_stream_place() {
                Some(place) => {
                    controller.stream_track_events(&stream, place);
                    return;
                }
                None => too_many_event_streams(),
            }
        }
        Ok(request) => {
            tracing::debug!("api: {} {}", request.method, request.path);
            controller.handle(&request)
        }
        Err(HttpError::Closed) => return,
        Err(e) if is_timeout(&e) => request_timeout(),
        Err(e) => Response::error(400, chain(&e)),
    };
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    if let Err(e) = http::write_response(&mut &stream, &response) {
        tracing::warn!("api: cannot answer: {e}");
    }
}

/// Answers a connection that will not be served, without reading from it, and closes it.
fn refuse(stream: UnixStream, response: &Response) {
    let _ = stream.set_write_timeout(Some(REFUSAL_WRITE_TIMEOUT));
    let _ = http::write_response(&mut &stream, response);
}

/// Adds `stream` to the open connections as `id`, unless [`MAX_CONNECTIONS`] are open already;
/// `Err` carries the refusal to answer.
fn register(open: &Open, id: u64, stream: &UnixStream) -> Result<(), Response> {
    let mut open = lock(open);
    if open.len() >= MAX_CONNECTIONS {
        return Err(too_many_connections());
    }
    let clone = stream.try_clone().map_err(|e| {
        Response::error(
            503,
            format!("cannot serve this API connection ({e}); try again"),
        )
    })?;
    open.insert(id, clone);
    Ok(())
}

/// Joins the connection threads that have ended, so that their handles do not pile up.
fn reap(threads: &mut Vec<JoinHandle<()>>) {
    let (ended, running): (Vec<_>, Vec<_>) = std::mem::take(threads)
        .into_iter()
        .partition(|thread| thread.is_finished());
    *threads = running;
    for thread in ended {
        let _ = thread.join();
    }
}

/// The accept thread: hands every connection to a thread of its own until `stop` is set;
/// returns the connection threads that may still run.
fn accept_loop(
    listener: UnixListener,
    controller: Arc<Controller>,
    stop: Arc<AtomicBool>,
    open: Open,
) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    let mut next_id: u64 = 0;
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("api: accept failed: {e}");
                // Out of file descriptors, say: do not spin on it.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let accepted = Instant::now();
        reap(&mut threads);
        let id = next_id;
        next_id += 1;
        if let Err(refusal) = register(&open, id, &stream) {
            tracing::warn!("api: connection refused: {}", refusal.status);
            refuse(stream, &refusal);
            continue;
        }
        let thread_open = Arc::clone(&open);
        let thread_controller = Arc::clone(&controller);
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || {
                let _registered = Registered {
                    open: thread_open,
                    id,
                };
                serve(stream, accepted, &thread_controller);
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                tracing::warn!("api: cannot start a connection thread: {e}");
                // The stream went with the closure: answer on the registered clone.
                let clone = lock(&open).remove(&id);
                if let Some(clone) = clone {
                    refuse(
                        clone,
                        &Response::error(
                            503,
                            format!(
                                "cannot start a thread for this API connection ({e}); try again"
                            ),
                        ),
                    );
                }
            }
        }
    }
    threads
}

/// The (device, inode) of the socket file at `path`, if a socket is there.
fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::symlink_metadata(path).ok()?;
    metadata
        .file_type()
        .is_socket()
        .then(|| (metadata.dev(), metadata.ino()))
}

/// The directory `path` is in (`.` for a bare name).
fn container_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Removes the socket file at `path` if it still is the one `identity` names (someone may
/// have replaced it since).
fn remove_socket_if_ours(path: &Path, identity: Option<(u64, u64)>) {
    // Under the bind lock (if it can be had): the path is not replaced between the look and
    // the removal by a process that just found this socket gone (or took it for stale).
    let _locked = lock_socket_path(path).ok().flatten();
    if identity.is_some() && socket_identity(path) == identity {
        let _ = std::fs::remove_file(path);
    }
}

/// How long a faultline process waits for another one to finish binding the same socket path
/// (a moment, unless that one was stopped).
const BIND_LOCK_PATIENCE: Duration = Duration::from_secs(5);

/// An exclusive `flock` on `.NAME.lock` beside an API socket `NAME`, held by a faultline
/// process while it makes way for its socket and binds it, and while it removes it at exit. A
/// socket bound but not yet listening refuses connections exactly as a stale one does: without
/// the lock another process making way for the same path in that moment would take it for
/// stale and remove it, leaving its server unreachable. The lock file is removed before the
/// lock is let go (a dead process's lock goes with it; its file stays, and is reused), so
/// nothing is left beside the socket.
struct BindLock {
    path: PathBuf,
    _file: File,
}

impl Drop for BindLock {
    fn drop(&mut self) {
        // Still locked: whoever opened this file meanwhile finds it gone once it has the lock,
        // and opens the path again (`lock_socket_path`).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Locks the socket path `path` (see [`BindLock`]); `None` where its lock file cannot be had
/// (a directory faultline may not write, a symbolic link planted there: the lock is then
/// only not taken, and bind says what is wrong, if anything).
fn lock_socket_path(path: &Path) -> Result<Option<BindLock>, ApiError> {
    use rustix::fs::{flock, FlockOperation};
    use std::os::unix::fs::OpenOptionsExt;
    let lock_path = bind_lock_path(path);
    let deadline = Instant::now() + BIND_LOCK_PATIENCE;
    loop {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path);
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                tracing::debug!("api: no lock {} while binding: {e}", lock_path.display());
                return Ok(None);
            }
        };
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            // Locked, unless the holder before removed the file meanwhile: then again.
            Ok(()) if same_file(&file, &lock_path) => {
                return Ok(Some(BindLock {
                    path: lock_path,
                    _file: file,
                }))
            }
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(ApiError::BindBusy(path.into())),
            // A file system without flock: as before there was a lock.
            Err(e) => {
                tracing::debug!("api: cannot lock {}: {e}", lock_path.display());
                return Ok(None);
            }
        }
    }
}

/// Where the bind lock of the socket path `path` lies: `.NAME.lock` beside it.
fn bind_lock_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    container_dir(path).join(format!(".{name}.lock"))
}

/// Whether `file` is the file at `path` now.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Makes way for a new socket at `path`. Nothing there is fine; a socket that a live server
/// answers on is in use; a socket nobody answers on is stale (its process died) and is removed.
/// Anything else (a file, a directory, a symbolic link) is never touched.
fn clear_stale_socket(path: &Path) -> Result<(), ApiError> {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        // Nothing there (or nothing we may look at: bind says what is wrong).
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.into()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse(path.into())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            // If this fails, bind says so.
            let _ = std::fs::remove_file(path);
            Ok(())
        }
        // Not provably stale (say, a socket we may not connect to): leave it alone.
        Err(source) => Err(ApiError::Bind {
            path: path.into(),
            source,
        }),
    }
}

/// The API server: threads answering requests on a Unix socket until dropped.
pub struct ApiServer {
    path: PathBuf,
    /// The socket file's (device, inode) once bound: teardown removes the path only if it
    /// still is this socket.
    identity: Option<(u64, u64)>,
    /// The listening socket (a clone of the accept thread's), shut down to wake that thread.
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    open: Open,
    /// The accept thread; it returns the connection threads it started.
    thread: Option<JoinHandle<Vec<JoinHandle<()>>>>,
    controller: Arc<Controller>,
}

/// The API's socket, bound and not served yet: a path that cannot be used fails before
/// anything depends on it (a VM arriving by migration, say). Dropped unserved, it removes
/// its socket file.
pub struct BoundSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    identity: Option<(u64, u64)>,
}

impl BoundSocket {
    /// Checks, without binding it, that `path` can be bound now: nothing is there (a stale
    /// socket is removed), and its directory exists. What [`bind`](Self::bind) would refuse
    /// for what is at the path is refused the same way, before anything depends on it.
    pub fn check(path: &Path) -> Result<(), ApiError> {
        let _locked = lock_socket_path(path)?;
        clear_stale_socket(path)?;
        let dir = container_dir(path);
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(ApiError::Bind {
                path: path.into(),
                source: std::io::Error::new(
                    ErrorKind::NotADirectory,
                    format!("{} is not a directory", dir.display()),
                ),
            }),
            Err(source) => Err(ApiError::Bind {
                path: path.into(),
                source,
            }),
        }
    }

    /// Binds `path` (a stale socket left by a dead process is replaced; one that a live
    /// process serves, and anything that is not a socket, are not).
    pub fn bind(path: &Path) -> Result<BoundSocket, ApiError> {
        // Held until the socket listens (see `BindLock`).
        let _locked = lock_socket_path(path)?;
        clear_stale_socket(path)?;
        // Whoever can connect can pause the VM, write snapshots anywhere this process may, or
        // send its memory to any host: only this user may, whatever the umask. The socket is
        // created with mode 0600, never wider for a moment (the umask is the process's, set
        // around the bind: a file another thread creates meanwhile gets no more than 0600
        // either).
        // SAFETY: umask only swaps the process's file-creation mask.
        let umask = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, putting the mask back.
        unsafe { libc::umask(umask) };
        let listener = bound.map_err(|source| ApiError::Bind {
            path: path.into(),
            source,
        })?;
        Ok(BoundSocket {
            path: path.into(),
            identity: socket_identity(path),
            listener: Some(listener),
        })
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if self.listener.is_some() {
            remove_socket_if_ours(&self.path, self.identity);
        }
    }
}

impl ApiServer {
    /// Listens on `path` (see [`BoundSocket::bind`]) and answers requests with `controller`.
    pub fn start(path: &Path, controller: Arc<Controller>) -> Result<ApiServer, ApiError> {
        ApiServer::serve(BoundSocket::bind(path)?, controller)
    }

    /// Answers requests on `bound` with `controller`.
    pub fn serve(
        mut bound: BoundSocket,
        controller: Arc<Controller>,
    ) -> Result<ApiServer, ApiError> {
        let listener = bound
            .listener
            .take()
            .expect("a bound socket has its listener");
        let (path, identity) = (bound.path.as_path(), bound.identity);
        let fail = |error: ApiError| {
            remove_socket_if_ours(path, identity);
            error
        };
        let waker = listener.try_clone().map_err(|source| {
            fail(ApiError::Bind {
                path: path.into(),
                source,
            })
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let open: Open = Arc::default();
        let thread_stop = Arc::clone(&stop);
        let thread_open = Arc::clone(&open);
        let thread_controller = Arc::clone(&controller);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, thread_controller, thread_stop, thread_open))
            .map_err(|e| fail(ApiError::Thread(e)))?;
        Ok(ApiServer {
            path: path.into(),
            identity,
            listener: waker,
            stop,
            open,
            thread: Some(thread),
            controller,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept thread: shutting the listening socket down fails its accept at once,
        // and a connection of our own (while the path is still ours) wakes it as well.
        // SAFETY: shutdown(2) on a socket this struct owns; it changes only the socket's state.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if self.identity.is_some() && socket_identity(&self.path) == self.identity {
            let _ = UnixStream::connect(&self.path);
        }
        let threads = self
            .thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default();
        // Nothing is accepted any more: end the reads of the connections still open (an idle
        // or stalled client's read returns at once), then wait for their threads, so that none
        // outlives the server with the VM. Their write side stays open: a request answered
        // just now (the shutdown that ended the VM, above all) still gets its response.
        for stream in lock(&self.open).values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        self.controller.close();
        for thread in threads {
            let _ = thread.join();
        }
        remove_socket_if_ours(&self.path, self.identity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A path in the temp directory for this test, with nothing at it.
    fn scratch(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("faultline-{}-server-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&path);
        path
    }

    /// A Unix socket bound at `path` but not listening (yet): it refuses connections.
    fn bound_not_listening(path: &Path) -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor this function owns.
        let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_un is plain data, valid zeroed.
        let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        address.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        assert!(bytes.len() < address.sun_path.len());
        for (to, from) in address.sun_path.iter_mut().zip(bytes) {
            *to = *from as libc::c_char;
        }
        // SAFETY: `address` is a valid sockaddr_un of the size given, `socket` a live socket.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&address as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        assert_eq!(bound, 0, "{}", io::Error::last_os_error());
        socket
    }

    /// Whether thread `tid` of this process sleeps (`S` in its stat).
    fn sleeps(tid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // "tid (comm) state ...": the comm may hold spaces, never a ')' after its own.
        stat[stat.rfind(')').unwrap() + 1..]
            .trim_start()
            .starts_with('S')
    }

    /// Takes the bind lock of the socket path `path` as another faultline process would.
    fn lock_as_another_process(path: &Path) -> (PathBuf, File) {
        use rustix::fs::{flock, FlockOperation};
        let lock_path = bind_lock_path(path);
        let lock = File::create(&lock_path).unwrap();
        flock(&lock, FlockOperation::LockExclusive).unwrap();
        (lock_path, lock)
    }

    #[test]
    fn a_socket_another_faultline_is_binding_is_never_taken_for_stale() {
        let dir = scratch("binding");
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("api.sock");
        // Another faultline between its bind and its listen: it holds the path's bind lock,
        // and its socket refuses connections as a stale one does.
        let (lock_path, lock) = lock_as_another_process(&path);
        let other = bound_not_listening(&path);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let binder = std::thread::spawn({
            let path = path.clone();
            move || {
                tid_tx.send(rustix::thread::gettid()).unwrap();
                BoundSocket::bind(&path).map(|bound| bound.identity)
            }
        });
        let tid = tid_rx.recv().unwrap().as_raw_nonzero().get();
        // The binder waits for the lock (asleep between tries), or, without one, is done.
        let deadline = Instant::now() + Duration::from_secs(4);
        while !binder.is_finished() && !sleeps(tid) {
            assert!(
                Instant::now() < deadline,
                "the binder neither waited nor ended"
            );
            std::thread::yield_now();
        }
        // The other one listens, and lets go as faultline does.
        // SAFETY: listen(2) on a live socket.
        assert_eq!(unsafe { libc::listen(other.as_raw_fd(), 1) }, 0);
        std::fs::remove_file(&lock_path).unwrap();
        drop(lock);
        let outcome = binder.join().unwrap();
        assert!(
            matches!(outcome, Err(ApiError::InUse(_))),
            "the other faultline's socket was taken: {outcome:?}"
        );
        assert!(!lock_path.exists(), "the lock file was left behind");
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_faultline_stopped_while_binding_is_not_waited_for_without_end() {
        let dir = scratch("stopped-binder");
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("api.sock");
        let _held = lock_as_another_process(&path);
        let outcome = BoundSocket::bind(&path);
        let Err(error @ ApiError::BindBusy(_)) = outcome else {
            panic!("{:?}", outcome.map(|bound| bound.identity));
        };
        assert!(error.to_string().contains("for 5 s (stopped?)"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_body_is_a_400_naming_the_shape_expected() {
        let request = Request {
            method: "PUT".into(),
            path: "/vm/hold".into(),
            body: br#"{"at": "soon"}"#.to_vec(),
        };
        let refusal = json_body::<HoldRequest>(&request, "SHAPE").err().unwrap();
        assert_eq!(refusal.status, 400);
        let message = refusal.body.unwrap()["error"].as_str().unwrap().to_string();
        assert!(message.ends_with(": expected SHAPE"), "{message}");
    }

    #[test]
    fn too_many_tracked_ranges_is_the_callers_mistake() {
        let too_many = TrackError::Memslots(vmm::MemslotError::TooMany {
            needed: 40000,
            max: 32764,
        });
        assert_eq!(track_error_status(&too_many), 400);
        assert_eq!(track_error_status(&TrackError::ZeroLength), 400);
    }

    #[test]
    fn a_request_that_stalls_times_out_at_its_deadline() {
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(b"PUT /vm/pau").unwrap();
        let started = Instant::now();
        let (_, request) = read_by(server, started + Duration::from_millis(200));
        let error = request.unwrap_err();
        assert!(is_timeout(&error), "{error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the deadline bounds the wait"
        );
    }

    #[test]
    fn a_request_in_pieces_within_its_deadline_is_read() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            for piece in [
                &b"PUT /vm/pa"[..],
                b"use HTTP/1.1\r\nContent-Le",
                b"ngth: 2\r\n\r\n{}",
            ] {
                client.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            client
        });
        let (_, request) = read_by(server, Instant::now() + Duration::from_secs(10));
        let _client = writer.join().unwrap();
        let request = request.unwrap();
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("PUT", "/vm/pause")
        );
        assert_eq!(request.body, b"{}");
    }

    #[test]
    fn a_passed_deadline_fails_without_waiting() {
        let (_client, server) = UnixStream::pair().unwrap();
        let mut reader = DeadlineReader {
            stream: server,
            deadline: Instant::now(),
        };
        let error = reader.read(&mut [0; 8]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::TimedOut);
    }

    #[test]
    fn what_is_not_a_socket_is_never_removed() {
        let file = scratch("file");
        std::fs::write(&file, b"keep me").unwrap();
        let error = clear_stale_socket(&file).unwrap_err();
        assert!(matches!(error, ApiError::NotASocket(_)), "{error:?}");
        assert!(
            error.to_string().contains(&file.display().to_string()),
            "{error}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        std::fs::remove_file(&file).unwrap();

        let dir = scratch("dir");
        std::fs::create_dir(&dir).unwrap();
        let error = clear_stale_socket(&dir).unwrap_err();
        assert!(matches!(error, ApiError::NotASocket(_)), "{error:?}");
        assert!(dir.is_dir());
        std::fs::remove_dir(&dir).unwrap();

        assert!(clear_stale_socket(&scratch("nothing")).is_ok());
    }

    #[test]
    fn a_live_socket_is_in_use_and_a_stale_one_is_replaced() {
        let path = scratch("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let error = clear_stale_socket(&path).unwrap_err();
        assert!(matches!(error, ApiError::InUse(_)), "{error:?}");
        assert!(path.exists());
        // Closing the listener leaves its file behind, answering nobody: stale.
        drop(listener);
        assert!(socket_identity(&path).is_some());
        clear_stale_socket(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).is_err(), "removed");
    }

    #[test]
    fn only_our_own_socket_is_removed() {
        let path = scratch("ours");
        let first = UnixListener::bind(&path).unwrap();
        let ours = socket_identity(&path);
        assert!(ours.is_some());
        // Someone replaces it: the path is no longer ours.
        std::fs::remove_file(&path).unwrap();
        let second = UnixListener::bind(&path).unwrap();
        remove_socket_if_ours(&path, ours);
        assert!(path.exists(), "a socket that replaced ours stays");
        remove_socket_if_ours(&path, socket_identity(&path));
        assert!(!path.exists());
        drop((first, second));
    }

    #[test]
    fn refusals_are_clear() {
        let Some(body) = too_many_connections().body else {
            panic!("a refusal has a body");
        };
        assert_eq!(
            body["error"],
            "too many API connections (at most 256 at once); try again"
        );
        assert_eq!(request_timeout().status, 408);
        assert_eq!(busy().status, 409);
    }
}
