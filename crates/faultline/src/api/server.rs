//! The API thread and what each request does to the VM.

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pager::PagerHandle;
use serde::Deserialize;
use serde_json::json;
use snapshot::create::{CreateOptions, MemoryBacking};
use snapshot::state::GuestInfo;
use vmm::control::PauseError;
use vmm::{VmError, VmHandle};

use super::http::{self, Request, Response};

/// How long the API thread waits for a slow client before giving up on it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// What the API acts on: the VM, its pager, and the snapshot history of this process.
pub struct Controller {
    handle: VmHandle,
    pager: Option<PagerHandle>,
    guest: Option<GuestInfo>,
    started: Instant,
    /// The last snapshot this process wrote: the parent of the next diff snapshot.
    last_snapshot: Mutex<Option<PathBuf>>,
    shutdown: AtomicBool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    dir: PathBuf,
    #[serde(rename = "type", default)]
    kind: SnapshotKind,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum SnapshotKind {
    #[default]
    Full,
    Diff,
}

/// The whole cause chain of an error, on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn vm_error(error: VmError) -> Response {
    let status = match error {
        VmError::Pause(PauseError::Timeout(_)) => 500,
        VmError::Pause(_) | VmError::Running | VmError::DirtyTrackingOff => 409,
        _ => 500,
    };
    Response::error(status, chain(&error))
}

impl Controller {
    pub fn new(handle: VmHandle, pager: Option<PagerHandle>, guest: Option<GuestInfo>) -> Self {
        Controller {
            handle,
            pager,
            guest,
            started: Instant::now(),
            last_snapshot: Mutex::new(None),
            shutdown: AtomicBool::new(false),
        }
    }

    /// Whether a client asked the VM to shut down (the guest then ends unfinished, as asked).
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Makes `dir` the parent of the next diff snapshot (a VM restored from it).
    pub fn set_last_snapshot(&self, dir: Option<PathBuf>) {
        *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) = dir;
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
        })
    }

    fn stats(&self) -> serde_json::Value {
        let mut info = self.info();
        info["pager"] = json!(self.pager.as_ref().map(PagerHandle::stats));
        info["last_snapshot"] =
            json!(*self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()));
        info
    }

    fn snapshot(&self, request: &SnapshotRequest) -> Response {
        let parent = {
            let last = self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner());
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
        };
        match snapshot::create::create(&self.handle, &options) {
            Ok(summary) => {
                let dir = summary.dir.clone();
                self.set_last_snapshot(Some(dir));
                Response::ok(json!(summary))
            }
            Err(error) => {
                // A failed snapshot may have consumed dirty-log bits: a later diff against the
                // older parent would miss pages, so the chain starts again with a full one.
                if self.handle.tracks_dirty() {
                    self.set_last_snapshot(None);
                }
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
            ("PUT", "/vm/pause") => match self.handle.pause() {
                Ok(_) => Response::no_content(),
                Err(e) => vm_error(e),
            },
            ("PUT", "/vm/resume") => match self.handle.resume() {
                Ok(()) => Response::no_content(),
                Err(e) => vm_error(e),
            },
            ("PUT", "/vm/shutdown") => {
                self.shutdown.store(true, Ordering::Release);
                self.handle
                    .control()
                    .request_stop(vmm::control::StopReason::Requested);
                Response::no_content()
            }
            ("PUT", "/snapshot/create") => match request.json::<SnapshotRequest>() {
                Ok(body) => self.snapshot(&body),
                Err(e) => Response::error(
                    400,
                    format!(
                        "{}: expected {{\"dir\": PATH, \"type\": \"full\"|\"diff\"}}",
                        chain(&e)
                    ),
                ),
            },
            (_, "/vm" | "/vm/stats" | "/vm/pause" | "/vm/resume" | "/vm/shutdown")
            | (_, "/snapshot/create") => Response::error(
                405,
                format!("{} is not allowed on {}", request.method, request.path),
            ),
            _ => Response::error(404, format!("no such endpoint: {}", request.path)),
        }
    }
}

/// The API server: a thread answering requests on a Unix socket until dropped.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn serve(stream: UnixStream, controller: &Controller) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let response = match http::read_request(&mut reader) {
        Ok(request) => {
            tracing::debug!("api: {} {}", request.method, request.path);
            controller.handle(&request)
        }
        Err(http::HttpError::Closed) => return,
        Err(e) => Response::error(400, chain(&e)),
    };
    if let Err(e) = http::write_response(&mut writer, &response) {
        tracing::warn!("api: cannot answer: {e}");
    }
}

impl ApiServer {
    /// Listens on `path` (a stale socket file left by a dead process is replaced; one that a
    /// live process serves is not) and answers requests with `controller`.
    pub fn start(path: &Path, controller: Arc<Controller>) -> Result<ApiServer, ApiError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.into()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.into(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if thread_stop.load(Ordering::Acquire) {
                        break;
                    }
                    match stream {
                        Ok(stream) => serve(stream, &controller),
                        Err(e) => tracing::warn!("api: accept failed: {e}"),
                    }
                }
            })
            .map_err(ApiError::Thread)?;
        Ok(ApiServer {
            path: path.into(),
            stop,
            thread: Some(thread),
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
        // Wake the accept loop with a connection of our own, then remove the socket.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
