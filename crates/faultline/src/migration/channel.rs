//! A migration connection: plain TCP, or TLS with mutual authentication (rustls).
//!
//! The migration code splits a connection into a reading and a writing half (post-copy reads
//! answers on one thread while faults write requests on others). A TLS session cannot be split,
//! so it runs on a thread of its own that pumps bytes between the TCP socket and one end of a
//! local socket pair; the migration code gets the other end, which it can clone like a socket.
//! The handshake happens before that, on the caller's thread, so that a peer whose certificate
//! is not trusted is refused with an error saying so.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::locking::lock;

/// How long a peer may take to answer what asks for an answer (a hello, a resume, the
/// go-ahead): one that says nothing must not hold the other side forever.
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a destination may take to say it built the VM once the switch-over is written
/// (and, after a post-copy's stream, that it holds every page): to take what is still in the
/// connection's buffers (megabytes) and build it. One that says nothing for longer counts as
/// stalled.
pub fn build_timeout() -> std::time::Duration {
    patience(120)
}

/// How long a destination waits for the next bytes of a source's stream (of pages, rounds,
/// the switch-over): a source sends without a break, so one silent for longer counts as
/// stalled (a pre-copy fails, the source VM running on; a post-copy pauses for recovery). A
/// bound on each read, not on a message: a source that sends a byte now and then is not
/// caught by it (it can do worse to a VM it migrates).
pub fn stream_silence() -> std::time::Duration {
    patience(60)
}

/// `default` seconds, or what `FAULTLINE_PEER_TIMEOUT_S` says instead (at most a year): how
/// long a silent peer is waited for where it owes a message (a slow link's setting, or a
/// test's).
fn patience(default: u64) -> std::time::Duration {
    const MOST: u64 = 365 * 24 * 3600;
    let seconds = match std::env::var("FAULTLINE_PEER_TIMEOUT_S") {
        Ok(text) => text
            .parse::<u64>()
            .ok()
            .filter(|&s| s > 0)
            .map(|s| s.min(MOST))
            .unwrap_or_else(|| {
                tracing::warn!(
                "FAULTLINE_PEER_TIMEOUT_S={text:?} is not a number of seconds: {default} s it is"
            );
                default
            }),
        Err(_) => default,
    };
    std::time::Duration::from_secs(seconds)
}

/// Reads the next message on `reader`, the whole of it within `timeout` (a peer that sends a
/// byte now and then takes no longer than one that sends nothing).
pub fn read_within(
    reader: &mut std::io::BufReader<Channel>,
    timeout: std::time::Duration,
) -> Result<migrate::Message, migrate::ProtocolError> {
    let mut within = Within {
        reader,
        until: std::time::Instant::now() + timeout,
    };
    let before = within.reader.get_ref().read_timeout()?;
    let message = migrate::read_message(&mut within);
    // The message read (or why none was) is the answer, even if the timeout before cannot be
    // put back (setsockopt failing on a socket that works): that is only warned of.
    if let Err(e) = within.reader.get_ref().set_read_timeout(before) {
        tracing::warn!("the channel's read timeout could not be put back: {e}");
    }
    message
}

/// A reader whose every read waits only for the time left until `until`.
struct Within<'a> {
    reader: &'a mut std::io::BufReader<Channel>,
    until: std::time::Instant,
}

impl Read for Within<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.reader.buffer().is_empty() {
            let left = self
                .until
                .saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, NOTHING_SAID));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
        }
        self.reader.read(buf)
    }
}

/// The files a `--tls-dir` holds.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// One end of a migration connection.
pub enum Channel {
    Tcp(TcpStream),
    /// The plaintext end of a TLS session pumped by its own thread, and why that session
    /// ended, if it failed.
    Tls(UnixStream, Arc<Mutex<Option<String>>>),
}

impl Channel {
    /// Another handle on the same connection (one to read, one to write).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(match self {
            Channel::Tcp(s) => Channel::Tcp(s.try_clone()?),
            Channel::Tls(s, failure) => Channel::Tls(s.try_clone()?, Arc::clone(failure)),
        })
    }

    /// Bounds every read (`None`: reads wait as long as it takes); a read that runs out of
    /// time fails with `TimedOut`.
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Channel::Tcp(s) => s.set_read_timeout(timeout),
            Channel::Tls(s, _) => s.set_read_timeout(timeout),
        }
    }

    /// Bounds every write (`None`: writes wait as long as it takes); a write that runs out of
    /// time fails with `TimedOut`.
    pub fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Channel::Tcp(s) => s.set_write_timeout(timeout),
            Channel::Tls(s, _) => s.set_write_timeout(timeout),
        }
    }

    /// The bound on every read.
    pub fn read_timeout(&self) -> io::Result<Option<std::time::Duration>> {
        match self {
            Channel::Tcp(s) => s.read_timeout(),
            Channel::Tls(s, _) => s.read_timeout(),
        }
    }

    /// Why the TLS session under this channel failed, if it did (a read or write of the
    /// channel then sees only its end).
    pub fn failure(&self) -> Option<String> {
        match self {
            Channel::Tcp(_) => None,
            Channel::Tls(_, failure) => lock(failure).clone(),
        }
    }

    /// Whether [`send_file`](Self::send_file) works on this channel: a plain TCP one (a TLS
    /// one must encrypt the bytes here).
    pub fn can_send_file(&self) -> bool {
        matches!(self, Channel::Tcp(_))
    }

    /// Sends `len` bytes of `file` from `offset` straight from its page cache with
    /// sendfile(2): the bytes are never copied through this process (nor, on loopback, on this
    /// side at all). Only for a plain TCP channel: a TLS one must encrypt them here, and is
    /// refused (`Unsupported`) having sent nothing. Bounded like a write. (sendfile has
    /// no MSG_NOSIGNAL: a peer gone is EPIPE only because Rust's runtime ignores SIGPIPE, as
    /// for every other write to a socket here.)
    pub fn send_file(&self, file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
        let Channel::Tcp(socket) = self else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "sendfile on a TLS channel",
            ));
        };
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let chunk = usize::try_from(end - at).unwrap_or(usize::MAX);
            match rustix::fs::sendfile(socket, file, Some(&mut at), chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file ends at {at:#x}, before the {len:#x} bytes from {offset:#x}"
                        ),
                    ))
                }
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(out_of_time(e.into(), NOTHING_TAKEN)),
            }
        }
        Ok(())
    }

    /// Whether the peer has sent something that no read has taken yet, or ended the
    /// connection (asked without waiting; bytes a `BufReader` over it holds already are not
    /// seen).
    pub fn has_news(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut fds = match self {
            Channel::Tcp(s) => [PollFd::new(s, PollFlags::IN)],
            Channel::Tls(s, _) => [PollFd::new(s, PollFlags::IN)],
        };
        // An error asking counts as news: the read that follows says what it is.
        poll(&mut fds, Some(&zero)).map_or(true, |ready| ready > 0)
    }

    /// Ends the connection both ways (a reader blocked on it returns).
    pub fn shutdown(&self) {
        self.shutdown_how(Shutdown::Both);
    }

    /// Ends this side's writing (a writer fails at once), leaving what the peer sent, and
    /// sends, to be read.
    pub fn shutdown_write(&self) {
        self.shutdown_how(Shutdown::Write);
    }

    /// Throws away what `writer` holds unsent and ends this side's writing: after a write to
    /// the peer failed, nothing more of what it was left to send ever goes out. (A
    /// `BufWriter` dropped flushes what it holds again, and a second try may complete what
    /// the failed one left half sent: the peer would then take a message this side gave up
    /// on, a state say.) The connection's other handles still read.
    pub fn discard_unsent(writer: std::io::BufWriter<Channel>) {
        let (channel, _unsent) = writer.into_parts();
        channel.shutdown_write();
    }

    fn shutdown_how(&self, how: Shutdown) {
        let _ = match self {
            Channel::Tcp(s) => s.shutdown(how),
            Channel::Tls(s, _) => s.shutdown(how),
        };
    }
}

impl Channel {
    /// The error a read or write of a channel whose TLS session failed gets (`kind`, and
    /// why), rather than a plain end of the stream or a broken pipe; `None` if it did not.
    fn session_failure(&self, kind: io::ErrorKind) -> Option<io::Error> {
        self.failure().map(|why| io::Error::new(kind, why))
    }

    /// `error` from a read or write, said as what it is: out of time, or the TLS session's
    /// failure.
    fn said(&self, error: io::Error, out_of_time_says: &'static str) -> io::Error {
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                out_of_time(error, out_of_time_says)
            }
            kind => self.session_failure(kind).unwrap_or(error),
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = match self {
            Channel::Tcp(s) => s.read(buf),
            Channel::Tls(s, _) => s.read(buf),
        };
        match read {
            // The end of a TLS session that failed is that failure, not a peer that closed.
            Ok(0) if !buf.is_empty() => self
                .session_failure(io::ErrorKind::ConnectionAborted)
                .map_or(Ok(0), Err),
            Ok(n) => Ok(n),
            Err(e) => Err(self.said(e, NOTHING_SAID)),
        }
    }
}

/// What a read or a write that ran out of time says.
const NOTHING_SAID: &str = "the peer said nothing in the time allowed";
const NOTHING_TAKEN: &str = "the peer took nothing in the time allowed";

/// `error`, said as `what` (`TimedOut`) if it is what a blocking socket says when its
/// timeout runs out.
fn out_of_time(error: io::Error, what: &'static str) -> io::Error {
    match error.kind() {
        io::ErrorKind::WouldBlock => io::Error::new(io::ErrorKind::TimedOut, what),
        _ => error,
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = match self {
            Channel::Tcp(s) => s.write(buf),
            Channel::Tls(s, _) => s.write(buf),
        };
        written.map_err(|e| self.said(e, NOTHING_TAKEN))
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Channel::Tcp(s) => s.flush(),
            Channel::Tls(s, _) => s.flush(),
        }
    }
}

/// TLS settings for one side, from a directory with `ca.pem` (the CA both sides' certificates
/// come from), `cert.pem` and `key.pem` (this side's).
#[derive(Clone)]
pub enum Tls {
    Client(Arc<ClientConfig>),
    Server(Arc<ServerConfig>),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::Client(_) => "Tls::Client",
            Tls::Server(_) => "Tls::Server",
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(
    dir: &Path,
) -> anyhow::Result<(
    RootCertStore,
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
)> {
    let ca_path = dir.join(CA_FILE);
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&ca_path)
        .with_context(|| format!("cannot read the CA certificate {}", ca_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM certificates", ca_path.display()))?;
    if cas.is_empty() {
        bail!("{} holds no certificate", ca_path.display());
    }
    for ca in cas {
        roots
            .add(ca)
            .with_context(|| format!("{} is not a usable CA certificate", ca_path.display()))?;
    }
    let cert_path = dir.join(CERT_FILE);
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("cannot read the certificate {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM certificates", cert_path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", cert_path.display());
    }
    let key_path = dir.join(KEY_FILE);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("cannot read the private key {}", key_path.display()))?;
    Ok((roots, certs, key))
}

impl Tls {
    /// The source's side: it proves itself with its certificate and checks the destination's.
    pub fn client(dir: &Path) -> anyhow::Result<Tls> {
        let (roots, certs, key) = load(dir)?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .context("the certificate and key do not go together")?;
        Ok(Tls::Client(Arc::new(config)))
    }

    /// The destination's side: it takes only sources whose certificate comes from the CA.
    pub fn server(dir: &Path) -> anyhow::Result<Tls> {
        let (roots, certs, key) = load(dir)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .context("cannot check client certificates against the CA")?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .context("the certificate and key do not go together")?;
        Ok(Tls::Server(Arc::new(config)))
    }
}

/// Wraps a connected TCP stream: plain without `tls`, else a TLS session whose handshake is
/// done here (`host` names the destination for a client, as its certificate must).
pub fn open(tcp: TcpStream, tls: Option<&Tls>, host: &str) -> anyhow::Result<Channel> {
    tcp.set_nodelay(true)?;
    detect_dead_peers(&tcp)?;
    let channel = match tls {
        None => Channel::Tcp(tcp),
        Some(tls) => handshake(tcp, tls, host)?,
    };
    // A peer that takes nothing for this long (alive: its kernel answers TCP's probes) has
    // stalled; a write to it must not wait for ever (TCP_USER_TIMEOUT does not end it).
    channel.set_write_timeout(Some(stream_silence()))?;
    Ok(channel)
}

/// The TLS session over `tcp`, its handshake done.
fn handshake(tcp: TcpStream, tls: &Tls, host: &str) -> anyhow::Result<Channel> {
    match tls {
        Tls::Client(config) => {
            let name = ServerName::try_from(host.to_string())
                .with_context(|| format!("{host:?} cannot name a TLS server"))?;
            let conn = ClientConnection::new(Arc::clone(config), name)?;
            pump(tcp, rustls::Connection::Client(conn))
        }
        Tls::Server(config) => {
            let conn = ServerConnection::new(Arc::clone(config))?;
            pump(tcp, rustls::Connection::Server(conn))
        }
    }
}

/// A peer that vanishes without closing the connection (a cut cable, a host gone) must not
/// leave either side waiting forever: keepalive probes find an idle connection dead within
/// about 20 s, and data unacknowledged for 30 s ends a busy one.
fn detect_dead_peers(tcp: &TcpStream) -> std::io::Result<()> {
    let set = |level: libc::c_int, option: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt on a socket this function borrows, with a c_int option value of
        // the size given.
        let done = unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                level,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if done == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 2)?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 30_000)
}

/// How long a TLS handshake may take, all of it: a peer that connects and stays silent, or
/// sends a byte now and then, must not hold the side waiting for it (a destination takes one
/// connection at a time, and this is before the peer is known). `FAULTLINE_PEER_TIMEOUT_S`
/// may shorten it, never lengthen it.
fn handshake_timeout() -> std::time::Duration {
    patience(30).min(std::time::Duration::from_secs(30))
}

/// What a failed handshake most likely means.
const HANDSHAKE_FAILED: &str =
    "the TLS handshake failed (is the peer's certificate from the same CA?)";

/// Completes the handshake, then starts the thread that carries the session.
fn pump(mut tcp: TcpStream, mut conn: rustls::Connection) -> anyhow::Result<Channel> {
    let limit = handshake_timeout();
    let deadline = std::time::Instant::now() + limit;
    let late = || {
        anyhow::anyhow!(
            "the TLS handshake did not finish within {} s",
            limit.as_secs()
        )
    };
    let failed = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => late(),
        _ => anyhow::Error::from(e).context(HANDSHAKE_FAILED),
    };
    // A flight at a time, each read and write bounded by the time left.
    while conn.is_handshaking() || conn.wants_write() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))?;
        if conn.wants_write() {
            conn.write_tls(&mut tcp).map_err(failed)?;
        } else {
            if conn.read_tls(&mut tcp).map_err(failed)? == 0 {
                bail!("the peer closed the connection during the TLS handshake");
            }
            if let Err(e) = conn.process_new_packets() {
                // The peer learns why (a certificate refused is an alert it reports).
                let _ = conn.write_tls(&mut tcp);
                return Err(anyhow::Error::from(e).context(HANDSHAKE_FAILED));
            }
        }
    }
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    let (ours, theirs) = UnixStream::pair()?;
    let failure = Arc::new(Mutex::new(None));
    let record = Arc::clone(&failure);
    std::thread::Builder::new()
        .name("migration-tls".into())
        .spawn(move || {
            // The failure is recorded before `theirs` closes, so that a reader who sees the
            // channel end finds why.
            let mut local = theirs;
            if let Err(e) = carry(tcp, conn, &mut local) {
                tracing::debug!("migration TLS session ended: {e}");
                // `carry` words the session's own failures (InvalidData); the connection's
                // errors under it are worded here, so that every reason reads whole.
                let why = match e.kind() {
                    io::ErrorKind::InvalidData => e.to_string(),
                    _ => format!("the TLS session failed: {e}"),
                };
                *lock(&record) = Some(why);
            }
        })?;
    Ok(Channel::Tls(ours, failure))
}

/// Decrypted bytes held for the plaintext socket past which the TLS thread stops reading the
/// peer (one read may take it a little past).
const LOCAL_BACKLOG: usize = 256 << 10;

/// How long the TLS thread waits for the peer to end its side once this side is gone (every
/// end of the plaintext socket closed, everything sent): a peer that keeps TCP open and says
/// nothing must not hold the thread and its connection for good.
const PEER_END_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Moves bytes between the TLS session on `tcp` and the plaintext socket `local` until both
/// directions have ended (or this side is gone and the peer has not ended its side within
/// [`PEER_END_WAIT`]).
fn carry(
    mut tcp: TcpStream,
    mut conn: rustls::Connection,
    local: &mut UnixStream,
) -> io::Result<()> {
    tcp.set_nonblocking(true)?;
    local.set_nonblocking(true)?;
    let mut to_local: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    // The handshake may have read records beyond its own: data the peer sent straight after
    // it is already decrypted, and no new bytes on `tcp` will announce it.
    let mut tcp_done = take_plaintext(&mut conn, &mut to_local, &mut buf)?;
    let mut local_done = false;
    // When this side was found gone, everything of it sent.
    let mut gone_since: Option<std::time::Instant> = None;
    loop {
        // The peer's bytes are read only while this side keeps up with them: past a backlog,
        // TCP's flow control holds the peer, instead of this side's memory growing.
        let reading_tcp = !tcp_done && to_local.len() < LOCAL_BACKLOG;
        let mut fds = [
            libc::pollfd {
                fd: tcp.as_raw_fd(),
                events: if reading_tcp { libc::POLLIN } else { 0 }
                    | if conn.wants_write() { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: local.as_raw_fd(),
                events: if local_done || conn.wants_write() {
                    0
                } else {
                    libc::POLLIN
                } | if to_local.is_empty() {
                    0
                } else {
                    libc::POLLOUT
                },
                revents: 0,
            },
        ];
        // A socket nothing is wanted of is not polled: a hung-up one would wake the poll at
        // once, again and again (the local end is hung up once every clone of the migration
        // code's end is closed, and the session may run on till TCP ends).
        for fd in &mut fds {
            if fd.events == 0 {
                fd.fd = -1;
            }
        }
        if tcp_done && to_local.is_empty() {
            let _ = local.shutdown(Shutdown::Write);
        }
        if tcp_done && local_done && !conn.wants_write() {
            return Ok(());
        }
        if local_done
            && !conn.wants_write()
            && crate::unix_socket::peer_gone(local)
            && gone_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                >= PEER_END_WAIT
        {
            return Ok(());
        }
        // SAFETY: two valid pollfds; waits at most a second.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let hung_up = libc::POLLHUP | libc::POLLERR;
        if fds[0].revents & (libc::POLLIN | hung_up) != 0 && reading_tcp {
            match conn.read_tls(&mut tcp) {
                Ok(0) => tcp_done = true,
                Ok(_) => {
                    conn.process_new_packets().map_err(|e| {
                        let why = match e {
                            // TLS 1.3 refuses a client certificate after the client's side of
                            // the handshake is done: the refusal comes as the first record.
                            rustls::Error::AlertReceived(alert) => format!(
                                "the TLS handshake failed: the peer refused this side's \
                                 certificate ({alert:?}; is it from the CA the peer trusts?)"
                            ),
                            other => format!("the TLS session failed: {other}"),
                        };
                        io::Error::new(io::ErrorKind::InvalidData, why)
                    })?;
                    tcp_done |= take_plaintext(&mut conn, &mut to_local, &mut buf)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if conn.wants_write() {
            match conn.write_tls(&mut tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if !to_local.is_empty() {
            match local.write(&to_local) {
                Ok(n) => {
                    to_local.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if fds[1].revents & (libc::POLLIN | hung_up) != 0 && !local_done && !conn.wants_write() {
            match local.read(&mut buf) {
                Ok(0) => {
                    local_done = true;
                    conn.send_close_notify();
                }
                Ok(n) => {
                    conn.writer().write_all(&buf[..n])?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Moves the plaintext `conn` has decrypted into `to_local`; true when the peer has ended its
/// side of the session.
fn take_plaintext(
    conn: &mut rustls::Connection,
    to_local: &mut Vec<u8>,
    buf: &mut [u8],
) -> io::Result<bool> {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => to_local.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufWriter;
    use std::net::TcpListener;

    #[test]
    fn a_writer_whose_rest_is_discarded_sends_none_of_it_and_the_peer_sees_the_end() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = Channel::Tcp(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        let (mut peer, _) = listener.accept().unwrap();
        // Another handle stays open, as a migration's reader does: only the shutdown can end
        // the peer's reading.
        let reader = ours.try_clone().unwrap();
        let mut writer = BufWriter::new(ours);
        writer.write_all(b"sent").unwrap();
        writer.flush().unwrap();
        writer.write_all(b"a state given up on").unwrap();
        Channel::discard_unsent(writer);
        peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got)
            .expect("the end of the connection, not a wait");
        assert_eq!(got, b"sent");
        drop(reader);
    }
}
