//! The destination's view of a migration once the VM runs there: its status for
//! `GET /migration`, and the meeting point for recovery after a network cut.
//!
//! A post-copy whose connection breaks is *paused*, not failed: every connection is shut down,
//! faults that need a page from the source wait, vCPUs that need nothing from it run on.
//! `PUT /migration/recover` (`faultline migrate recover`) hands the paused migration a
//! listener; the source reconnects to it (`faultline migrate send --resume`), and the page
//! stream goes on from what the destination holds.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use migrate::VmIdentity;
use serde_json::json;

use super::channel::{Channel, Tls};
use crate::locking::{lock, wait};

/// Where the migration stands on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The VM runs here; pages still come from the source.
    PostcopyActive,
    /// A connection broke: the migration waits for `recover`.
    PostcopyPaused,
    /// The source is reconnecting.
    PostcopyRecover,
    /// Every page is here.
    Completed,
    /// It cannot complete (why is said).
    Failed,
}

impl Phase {
    /// The name QEMU's `query-migrate` uses for the same status.
    pub fn name(self) -> &'static str {
        match self {
            Phase::PostcopyActive => "postcopy-active",
            Phase::PostcopyPaused => "postcopy-paused",
            Phase::PostcopyRecover => "postcopy-recover",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
        }
    }
}

/// Why `recover` was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("there is no paused migration to recover (the migration is {0})")]
    NotPaused(&'static str),
    #[error("this destination was started without --api-sock, so it cannot recover")]
    NotRecoverable,
    #[error("cannot listen on {listen}")]
    Listen {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the TLS settings in {dir} cannot be used: {why}")]
    Tls { dir: String, why: String },
    #[error("the migration arrived over TLS, so its recovery must use TLS too")]
    TlsRequired,
    #[error("the VM is shutting down: nothing will take the source's reconnection")]
    ShuttingDown,
}

/// A listener `recover` gave, for the source's reconnection.
#[derive(Clone)]
pub(super) struct Offer {
    pub listener: Arc<TcpListener>,
    pub tls: Option<Tls>,
    /// Which offer this is: a later one replaces it.
    pub generation: u64,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The TLS settings `recover` named, if any.
    pub tls_dir: Option<std::path::PathBuf>,
}

struct State {
    phase: Phase,
    /// Why the migration paused or failed, last.
    why: Option<String>,
    /// Connection breaks so far.
    breaks: u32,
    /// Where the source may reconnect, once `recover` said so (until it has).
    offer: Option<Offer>,
    generation: u64,
    /// Where a recovery attempt waits for the source now: the offer it took (an older one
    /// than `offer` until that attempt sees it was replaced and gives up).
    awaiting_source_on: Option<SocketAddr>,
    /// A thread answers reconnections to a completed migration (its source missed the end).
    confirming: bool,
    /// The VM was shut down: a paused migration waits no more.
    abandoned: bool,
}

/// The destination's migration, shared by the page stream, the page source and the API.
pub struct Incoming {
    peer: String,
    /// The TLS the migration arrived with: recovery must use TLS too.
    tls: Option<Tls>,
    /// Whether a break pauses (an API can then recover it) or fails the migration.
    recoverable: bool,
    /// The VM's identity (layout), once it is known.
    identity: Mutex<Option<VmIdentity>>,
    /// The migration's name, once its switch-over said it: only a resume naming it is
    /// answered.
    migration: Mutex<Option<u64>>,
    state: Mutex<State>,
    changed: Condvar,
    /// The connections in use, shut down together when one breaks.
    links: Mutex<Vec<Channel>>,
    pub(super) normal_pages: AtomicU64,
    pub(super) zero_pages: AtomicU64,
    pub(super) bytes: AtomicU64,
    /// Page requests' answer times, in µs.
    latencies: Mutex<Vec<u64>>,
}

impl Incoming {
    /// A migration from `peer` whose VM is on its way (it completes or goes post-copy).
    pub(super) fn new(peer: String, tls: Option<Tls>, recoverable: bool) -> Self {
        Incoming {
            peer,
            tls,
            recoverable,
            identity: Mutex::new(None),
            migration: Mutex::new(None),
            state: Mutex::new(State {
                phase: Phase::PostcopyActive,
                why: None,
                breaks: 0,
                offer: None,
                generation: 0,
                awaiting_source_on: None,
                confirming: false,
                abandoned: false,
            }),
            changed: Condvar::new(),
            links: Mutex::new(Vec::new()),
            normal_pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            latencies: Mutex::new(Vec::new()),
        }
    }

    /// The migration's name, as its switch-over said it.
    pub(super) fn set_migration(&self, migration: u64) {
        *lock(&self.migration) = Some(migration);
    }

    /// The migration's name, if its switch-over came.
    pub(super) fn migration(&self) -> Option<u64> {
        *lock(&self.migration)
    }

    /// The source's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn phase(&self) -> Phase {
        lock(&self.state).phase
    }

    pub(super) fn set_identity(&self, identity: VmIdentity) {
        *lock(&self.identity) = Some(identity);
    }

    pub(super) fn identity(&self) -> Option<VmIdentity> {
        lock(&self.identity).clone()
    }

    /// The migration completed (every page is here), or failed (`why`).
    pub(super) fn finish(&self, phase: Phase, why: Option<String>) {
        let mut state = lock(&self.state);
        state.phase = phase;
        if why.is_some() || phase == Phase::Completed {
            // (A break that came once every page was here is no reason any more.)
            state.why = why;
        }
        state.offer = None;
        state.awaiting_source_on = None;
        self.changed.notify_all();
    }

    /// The offer `generation` was used up (a source told the migration completed): it goes,
    /// unless `recover` gave a newer one meanwhile, which stands.
    pub(super) fn spend_offer(&self, generation: u64) {
        let mut state = lock(&self.state);
        if state
            .offer
            .as_ref()
            .is_some_and(|offer| offer.generation == generation)
        {
            state.offer = None;
        }
        self.changed.notify_all();
    }

    /// A connection of the migration, to shut down if another one breaks.
    /// Once the VM was shut down (`abandon`), a link added late (a recovery attempt that was
    /// accepting then) is shut at once: `abandon` marks before it shuts the links there are.
    pub(super) fn add_link(&self, channel: Channel) {
        let mut links = lock(&self.links);
        if lock(&self.state).abandoned {
            channel.shutdown();
        }
        links.push(channel);
    }

    /// Shuts down every connection of the migration.
    pub(super) fn shut_links(&self) {
        for link in lock(&self.links).drain(..) {
            link.shutdown();
        }
    }

    /// A connection broke (`why`): every connection is shut down (so that each side's
    /// threads see it), and the migration waits for recovery. Only the first call of a break
    /// counts. Returns false when the migration cannot be recovered (no API to do it).
    pub(super) fn pause(&self, why: &str) -> bool {
        {
            let mut state = lock(&self.state);
            if matches!(state.phase, Phase::PostcopyActive | Phase::PostcopyRecover) {
                tracing::warn!("post-copy paused: {why}");
                state.phase = Phase::PostcopyPaused;
                state.why = Some(why.to_string());
                state.breaks += 1;
            }
            self.changed.notify_all();
        }
        self.shut_links();
        self.recoverable
    }

    /// `PUT /migration/recover`: listens on `listen` for the source's reconnection (a later
    /// call replaces the listener). A completed migration answers it too, so that a source
    /// that missed the end learns it.
    pub fn offer(
        self: &Arc<Self>,
        listen: &str,
        tls_dir: Option<&Path>,
    ) -> Result<SocketAddr, RecoverError> {
        if !self.recoverable {
            return Err(RecoverError::NotRecoverable);
        }
        let tls = match tls_dir {
            Some(dir) => Some(Tls::server(dir).map_err(|e| RecoverError::Tls {
                dir: dir.display().to_string(),
                why: format!("{e:#}"),
            })?),
            None => self.tls.clone(),
        };
        if self.tls.is_some() && tls.is_none() {
            return Err(RecoverError::TlsRequired);
        }
        // Resolved before the status lock is taken: a stalled resolver must not stall
        // `GET /migration` and shutdown with it.
        let addrs: Vec<SocketAddr> = listen
            .to_socket_addrs()
            .map_err(|source| RecoverError::Listen {
                listen: listen.to_string(),
                source,
            })?
            .collect();
        let mut state = lock(&self.state);
        if state.abandoned {
            return Err(RecoverError::ShuttingDown);
        }
        if !matches!(state.phase, Phase::PostcopyPaused | Phase::Completed) {
            return Err(RecoverError::NotPaused(state.phase.name()));
        }
        // Asked again where the offer it replaces listens (a fixed port): with the same TLS
        // settings it stands as it is; with others, its listener goes on under the new offer,
        // since binding there again would find it in use.
        let listener =
            match state.offer.as_ref().filter(|o| addrs.contains(&o.addr)) {
                Some(offer) if offer.tls_dir.as_deref() == tls_dir => return Ok(offer.addr),
                Some(offer) => Arc::clone(&offer.listener),
                None => Arc::new(TcpListener::bind(&addrs[..]).map_err(|source| {
                    RecoverError::Listen {
                        listen: listen.to_string(),
                        source,
                    }
                })?),
            };
        let addr = listener
            .local_addr()
            .map_err(|source| RecoverError::Listen {
                listen: listen.to_string(),
                source,
            })?;
        state.generation += 1;
        let offer = Offer {
            listener,
            tls,
            generation: state.generation,
            addr,
            tls_dir: tls_dir.map(Path::to_path_buf),
        };
        state.offer = Some(offer.clone());
        if state.phase == Phase::Completed && !state.confirming {
            state.confirming = true;
            let incoming = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("migration-confirm".into())
                .spawn(move || super::postcopy_receive::confirm_completed(&incoming));
            if spawned.is_err() {
                state.confirming = false;
            }
        }
        self.changed.notify_all();
        Ok(addr)
    }

    /// Waits until `recover` gives a listener; `None` once the VM was shut down.
    pub(super) fn wait_for_offer(&self) -> Option<Offer> {
        let mut state = lock(&self.state);
        state.awaiting_source_on = None;
        loop {
            if state.abandoned {
                return None;
            }
            if let Some(offer) = state.offer.clone() {
                state.awaiting_source_on = Some(offer.addr);
                return Some(offer);
            }
            state = wait(&self.changed, state);
        }
    }

    /// Whether `generation` is still the offer to wait on (not replaced, VM not shut down).
    /// Why the recovery offer `generation` no longer stands, if so.
    pub(super) fn offer_withdrawn(&self, generation: u64) -> Option<&'static str> {
        let state = lock(&self.state);
        if state.abandoned {
            Some("the VM was shut down")
        } else if state.generation != generation {
            Some("a later `migrate recover` replaced this listener")
        } else {
            None
        }
    }

    /// The source reconnected and asked to resume.
    pub(super) fn recovering(&self) {
        let mut state = lock(&self.state);
        state.phase = Phase::PostcopyRecover;
        self.changed.notify_all();
    }

    /// The recovery worked: the migration goes on (true), unless a connection broke again
    /// while it was being made: then it stays paused, saying why, and the offer stands for
    /// the source's next attempt (false).
    pub(super) fn recovered(&self) -> bool {
        let mut state = lock(&self.state);
        let goes_on = state.phase == Phase::PostcopyRecover;
        if goes_on {
            state.phase = Phase::PostcopyActive;
            state.why = None;
            state.offer = None;
            state.awaiting_source_on = None;
        }
        self.changed.notify_all();
        goes_on
    }

    /// An attempt to recover failed (`why`): the offer stands for the next one.
    pub(super) fn attempt_failed(&self, why: String) {
        let mut state = lock(&self.state);
        if state.phase == Phase::PostcopyRecover {
            state.phase = Phase::PostcopyPaused;
        }
        state.why = Some(why);
        self.changed.notify_all();
    }

    /// The VM was shut down: a paused migration stops waiting.
    pub fn abandon(&self) {
        let mut state = lock(&self.state);
        state.abandoned = true;
        state.offer = None;
        state.awaiting_source_on = None;
        self.changed.notify_all();
    }

    pub(super) fn abandoned(&self) -> bool {
        lock(&self.state).abandoned
    }

    pub(super) fn record_latency(&self, us: u64) {
        lock(&self.latencies).push(us);
    }

    /// The status, as `GET /migration` on the destination says it.
    pub fn status(&self) -> serde_json::Value {
        // Sorted before the state is locked: a pause or a recovery never waits on it.
        let mut latencies = lock(&self.latencies).clone();
        latencies.sort_unstable();
        let state = lock(&self.state);
        let at = |q: f64| {
            (!latencies.is_empty()).then(|| latencies[((latencies.len() - 1) as f64 * q) as usize])
        };
        json!({
            "role": "destination",
            "status": state.phase.name(),
            "peer": self.peer,
            "why": state.why,
            "breaks": state.breaks,
            "listening": state.offer.as_ref().map(|o| o.addr.to_string()),
            "awaiting_source_on": state.awaiting_source_on.map(|addr| addr.to_string()),
            "normal_pages": self.normal_pages.load(Ordering::Relaxed),
            "zero_pages": self.zero_pages.load(Ordering::Relaxed),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "postcopy_requests": latencies.len(),
            "urgent_page_p50_us": at(0.5),
            "urgent_page_p99_us": at(0.99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpStream;

    /// Both ends of a loopback TCP connection.
    fn connection() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (near, listener.accept().unwrap().0)
    }

    /// Whether `far` sees its peer's end: its read returns 0 (bounded, so that a connection
    /// left open fails the test rather than hangs it).
    fn ended(mut far: TcpStream) -> bool {
        far.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        matches!(far.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn a_break_while_a_recovery_is_made_leaves_the_migration_paused_saying_why() {
        let incoming = Arc::new(Incoming::new("peer".into(), None, true));
        assert!(incoming.pause("the page stream broke"));
        let listening = incoming.offer("127.0.0.1:0", None).unwrap().to_string();
        incoming.recovering();
        // The new page-request connection breaks before the attempt is done.
        assert!(incoming.pause("the page-request connection: the peer closed it"));
        assert!(!incoming.recovered());
        let status = incoming.status();
        assert_eq!(status["status"], "postcopy-paused", "{status}");
        assert_eq!(status["breaks"], 2, "{status}");
        assert_eq!(
            status["why"], "the page-request connection: the peer closed it",
            "{status}"
        );
        // The listener stands for the source's next attempt.
        assert_eq!(status["listening"], listening, "{status}");
        // Then a recovery that holds.
        incoming.recovering();
        assert!(incoming.recovered());
        assert_eq!(incoming.phase(), Phase::PostcopyActive);
        assert_eq!(incoming.status()["why"], serde_json::Value::Null);
    }

    #[test]
    fn a_migration_completed_after_a_break_gives_no_reason() {
        let incoming = Incoming::new("peer".into(), None, true);
        assert!(incoming.pause("the page-request connection broke"));
        incoming.finish(Phase::Completed, None);
        let status = incoming.status();
        assert_eq!(status["status"], "completed", "{status}");
        assert_eq!(status["why"], serde_json::Value::Null, "{status}");
        // A failure keeps its reason.
        incoming.finish(Phase::Failed, Some("the source gave up".into()));
        assert_eq!(incoming.status()["why"], "the source gave up");
    }

    #[test]
    fn a_vm_shut_down_takes_no_recovery_offer() {
        let incoming = Arc::new(Incoming::new("peer".into(), None, true));
        assert!(incoming.pause("the page stream broke"));
        assert!(incoming.offer("127.0.0.1:0", None).is_ok());
        incoming.abandon();
        assert_eq!(incoming.status()["listening"], serde_json::Value::Null);
        assert!(matches!(
            incoming.offer("127.0.0.1:0", None),
            Err(RecoverError::ShuttingDown)
        ));
    }

    #[test]
    fn a_link_added_after_the_vm_was_shut_down_is_shut_at_once() {
        let incoming = Incoming::new("peer".into(), None, true);
        let (before, before_far) = connection();
        incoming.add_link(Channel::Tcp(before));
        incoming.abandon();
        incoming.shut_links();
        assert!(ended(before_far), "a link there when it was shut down");
        // A recovery attempt that accepted a connection before it saw the shutdown.
        let (late, late_far) = connection();
        incoming.add_link(Channel::Tcp(late));
        assert!(
            ended(late_far),
            "a link added after it was shut down stays open"
        );
    }
}
