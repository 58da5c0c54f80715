//! Post-copy on the destination: the page source that asks the migration source for what the
//! guest touches, the page stream taken in the background, and recovery after a cut.
//!
//! Two connections: the first carries the stream of every page, the second only page
//! requests and their answers, so an urgent page never waits behind the stream. Pages from
//! the stream go in through the pager's one install path, which never overwrites a page the
//! guest already has. When a connection breaks, both are shut down and the migration pauses
//! (see `incoming`); faults waiting for the source keep waiting, and their requests are asked
//! again on the connection that recovery opens.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use migrate::{read_message, write_message, Layout, Message, ProtocolError, VmIdentity};
use pager::{Content, PageSource, SourceError};
use vmm::{DirtyPages, GuestRam, PAGE_SIZE};

use super::channel::{read_within, stream_silence, Channel, Tls, REPLY_TIMEOUT};
use super::incoming::{Incoming, Offer, Phase};
use super::turns::{take_pages_in_turns, Failure};
use super::{layout_of, READ_BUFFER};
use crate::locking::{lock, wait, wait_timeout};

/// How long a connected source may take to answer a page request before the connection
/// counts as broken (it is then shut down, and the migration waits for recovery).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination waits for the page-request connection, and, at the end, for every
/// page to be in.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts one connection on `listener`, until `deadline` (if any) or until `give_up` gives a
/// reason to stop waiting.
fn accept_until(
    listener: &TcpListener,
    deadline: Option<Instant>,
    give_up: &dyn Fn() -> Option<&'static str>,
) -> anyhow::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let accepted = loop {
        // Looked at before each accept too: a withdrawn offer's listener may go on under a
        // newer offer, whose source this attempt must not take.
        if let Some(why) = give_up() {
            break Err(anyhow::anyhow!(why));
        }
        match listener.accept() {
            Ok((stream, _)) => break Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break Err(anyhow::anyhow!("no connection came in time"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => break Err(e.into()),
        }
    };
    listener.set_nonblocking(false)?;
    // An accepted socket does not inherit the listener's non-blocking mode on Linux; make sure.
    let stream = accepted?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A connection from the source on `listener`: accepted, its channel opened, hellos exchanged
/// (the source's first, checked against `ours`).
fn accept_link(
    listener: &TcpListener,
    tls: Option<&Tls>,
    ours: &VmIdentity,
    deadline: Option<Instant>,
    give_up: &dyn Fn() -> Option<&'static str>,
) -> anyhow::Result<(BufReader<Channel>, BufWriter<Channel>)> {
    let stream = accept_until(listener, deadline, give_up)?;
    let channel = super::channel::open(stream, tls, "")?;
    let mut writer = BufWriter::new(channel.try_clone()?);
    let mut reader = BufReader::with_capacity(READ_BUFFER, channel);
    let hello = read_within(&mut reader, REPLY_TIMEOUT).context("no hello")?;
    match hello {
        Message::Hello(theirs) => ours.check_matches(&theirs)?,
        other => bail!("the connection began with {}, not a hello", other.name()),
    }
    write_message(&mut writer, &Message::Hello(ours.clone()))?;
    writer.flush()?;
    Ok((reader, writer))
}

/// The destination's page source: every page it fetches is asked of the source on the
/// page-request connection, and waited for (while the migration is paused, as long as it
/// takes).
pub(super) struct NetworkSource {
    layout: Layout,
    incoming: Arc<Incoming>,
    /// The page-request connection's writing half (`None` before the first).
    writer: Mutex<Option<BufWriter<Channel>>>,
    answers: Mutex<Answers>,
    arrived: Condvar,
    /// Fetches waiting for an answer.
    outstanding: AtomicUsize,
}

#[derive(Default)]
struct Answers {
    /// Requests made and not answered yet, by address: (pages asked).
    asked: HashMap<u64, u32>,
    pages: HashMap<u64, Vec<u8>>,
    /// Whether a page-request connection is up; its number (answers from an older one are
    /// not waited for).
    connected: bool,
    connection: u64,
    /// Why no answer will ever come.
    failed: Option<String>,
}

impl NetworkSource {
    /// A source with no page-request connection yet: fetches wait for one
    /// ([`accept_requests`] brings it).
    pub(super) fn new(layout: Layout, incoming: Arc<Incoming>) -> Self {
        NetworkSource {
            layout,
            incoming,
            writer: Mutex::new(None),
            answers: Mutex::new(Answers::default()),
            arrived: Condvar::new(),
            outstanding: AtomicUsize::new(0),
        }
    }

    /// How many fetches wait for an answer now.
    fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    fn connected(&self) -> bool {
        lock(&self.answers).connected
    }

    /// No answer will come any more: every fetch fails.
    fn fail(&self, why: String) {
        lock(&self.answers).failed.get_or_insert(why);
        self.arrived.notify_all();
    }

    /// The page-request connection `connection` broke (`why`): the migration pauses.
    fn broken(&self, connection: u64, why: &str) {
        let recoverable = {
            let mut answers = lock(&self.answers);
            if answers.connection != connection || !answers.connected {
                return;
            }
            answers.connected = false;
            self.arrived.notify_all();
            drop(answers);
            self.incoming.pause(why)
        };
        if !recoverable {
            self.fail(why.to_string());
        }
    }

    /// Takes a (new) page-request connection: the requests still unanswered are asked again on
    /// it, and a thread takes its answers.
    fn connect(
        self: &Arc<Self>,
        reader: BufReader<Channel>,
        writer: BufWriter<Channel>,
    ) -> anyhow::Result<()> {
        self.incoming.add_link(reader.get_ref().try_clone()?);
        let mut slot = lock(&self.writer);
        // The connection is the one in use before its answers thread starts, so that a break
        // the thread finds at once is this connection's, not an older one's.
        let (connection, asked) = {
            let mut answers = lock(&self.answers);
            answers.connection += 1;
            answers.connected = true;
            let asked: Vec<(u64, u32)> = answers.asked.iter().map(|(&g, &n)| (g, n)).collect();
            (answers.connection, asked)
        };
        let answers = Arc::clone(self);
        let started = std::thread::Builder::new()
            .name("postcopy-answers".into())
            .spawn(move || answers.take_answers(reader, connection));
        if let Err(e) = started {
            lock(&self.answers).connected = false;
            return Err(e.into());
        }
        let writer = slot.insert(writer);
        let resent = asked
            .into_iter()
            .try_for_each(|(gpa, count)| {
                write_message(writer, &Message::PageRequest { gpa, count })
            })
            .and_then(|()| writer.flush());
        drop(slot);
        self.arrived.notify_all();
        if let Err(e) = resent {
            self.broken(
                connection,
                &format!("cannot ask the migration source again: {e}"),
            );
        }
        Ok(())
    }

    /// The page-request connection in use is given up (the stream found the break first):
    /// whatever its answers thread says later is about a connection no longer waited on.
    fn disconnect(&self) {
        let mut answers = lock(&self.answers);
        answers.connection += 1;
        answers.connected = false;
        self.arrived.notify_all();
    }

    /// Takes the answers of page-request connection `connection` until it ends.
    fn take_answers(&self, mut reader: BufReader<Channel>, connection: u64) {
        loop {
            let message = read_message(&mut reader).map_err(anyhow::Error::from);
            match message.and_then(|m| m.check(&self.layout).map(|()| m).map_err(Into::into)) {
                Ok(Message::Pages { gpa, data }) => {
                    let mut answers = lock(&self.answers);
                    // Only answers to requests made, of the size asked, are kept (a request
                    // asked again after a recovery may be answered twice).
                    if answers.asked.get(&gpa).map(|&n| u64::from(n) * PAGE_SIZE)
                        == Some(data.len() as u64)
                    {
                        answers.asked.remove(&gpa);
                        answers.pages.insert(gpa, data);
                        self.arrived.notify_all();
                    }
                }
                Ok(other) => {
                    // Not an answer: not the page-request connection it should be (a second
                    // resume that came here, say). The migration pauses rather than fails.
                    self.broken(
                        connection,
                        &format!("unexpected {} among page answers", other.name()),
                    );
                    return;
                }
                Err(e) => {
                    self.broken(connection, &format!("the page-request connection: {e:#}"));
                    return;
                }
            }
        }
    }

    /// Asks the source for `count` pages at `gpa`, if a connection is up (if not, the request
    /// is asked when one is).
    fn ask(&self, gpa: u64, count: u32) {
        let mut slot = lock(&self.writer);
        let connection = lock(&self.answers).connection;
        if let Some(writer) = slot.as_mut() {
            let sent = write_message(writer, &Message::PageRequest { gpa, count })
                .and_then(|()| writer.flush());
            if let Err(e) = sent {
                drop(slot);
                self.broken(connection, &format!("cannot ask the migration source: {e}"));
            }
        }
    }
}

impl PageSource for NetworkSource {
    fn describe(&self) -> String {
        "the migration source".into()
    }

    fn stop(&self) {
        self.fail("the pager stopped".into());
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let unavailable = |reason: String| SourceError::Unavailable { offset, reason };
        let regions = self.layout.regions();
        let (gpa, count) = image_to_gpa(regions, offset, buf.len() as u64)
            .ok_or_else(|| unavailable("not guest RAM".into()))?;
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let asked = Instant::now();
        lock(&self.answers).asked.insert(gpa, count);
        self.ask(gpa, count);
        let result = (|| {
            let mut answers = lock(&self.answers);
            let mut deadline = Instant::now() + ANSWER_TIMEOUT;
            loop {
                if let Some(data) = answers.pages.remove(&gpa) {
                    if data.len() != buf.len() {
                        return Err(unavailable(format!(
                            "the source answered with {} bytes for {} asked",
                            data.len(),
                            buf.len()
                        )));
                    }
                    buf.copy_from_slice(&data);
                    return Ok(Content::Data);
                }
                if let Some(why) = answers.failed.clone() {
                    answers.asked.remove(&gpa);
                    return Err(unavailable(format!("the migration source is gone: {why}")));
                }
                if !answers.connected {
                    // Paused: the request is asked again once the source is back.
                    answers = wait(&self.arrived, answers);
                    deadline = Instant::now() + ANSWER_TIMEOUT;
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // A source that does not answer is as good as a broken connection.
                    let connection = answers.connection;
                    drop(answers);
                    self.broken(
                        connection,
                        &format!(
                            "no answer from the migration source within {} s",
                            ANSWER_TIMEOUT.as_secs()
                        ),
                    );
                    answers = lock(&self.answers);
                    continue;
                }
                answers = wait_timeout(&self.arrived, answers, left);
            }
        })();
        self.incoming
            .record_latency(asked.elapsed().as_micros() as u64);
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        result
    }
}

/// The guest range of `len` bytes at `offset` of RAM laid out back to back.
fn image_to_gpa(regions: &[(u64, u64)], offset: u64, len: u64) -> Option<(u64, u32)> {
    let mut base = 0;
    for &(gpa, size) in regions {
        if offset >= base && offset + len <= base + size {
            return Some((gpa + offset - base, u32::try_from(len / PAGE_SIZE).ok()?));
        }
        base += size;
    }
    None
}

/// Accepts the page-request connection (and its hello) from `listener` and gives it to
/// `source` (which the pager was built on before), if it names `migration`.
pub(super) fn accept_requests(
    listener: &TcpListener,
    tls: Option<&Tls>,
    ours: &VmIdentity,
    migration: u64,
    source: &Arc<NetworkSource>,
) -> anyhow::Result<()> {
    let deadline = Some(Instant::now() + ACCEPT_TIMEOUT);
    let (reader, writer) = accept_requests_link(listener, tls, ours, migration, deadline, &|| None)
        .context("cannot accept the page-request connection")?;
    source.connect(reader, writer)
}

/// A page-request connection on `listener`: accepted, hellos exchanged, and its first message
/// naming `migration`. Anything else is told why and refused: only the source that began
/// this migration may answer its page faults.
fn accept_requests_link(
    listener: &TcpListener,
    tls: Option<&Tls>,
    ours: &VmIdentity,
    migration: u64,
    deadline: Option<Instant>,
    give_up: &dyn Fn() -> Option<&'static str>,
) -> anyhow::Result<(BufReader<Channel>, BufWriter<Channel>)> {
    let (mut reader, mut writer) = accept_link(listener, tls, ours, deadline, give_up)?;
    let wait = deadline.map_or(REPLY_TIMEOUT, |d| {
        d.saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), REPLY_TIMEOUT)
    });
    let refusal =
        match read_within(&mut reader, wait).context("no migration named after the hello")? {
            Message::Requests { migration: named } if named == migration => {
                return Ok((reader, writer))
            }
            Message::Requests { migration: named } => format!(
                "the page-request connection names migration {named:016x}; the one here is \
                 {migration:016x}"
            ),
            other => format!(
                "the page-request connection began with {}, not the migration it serves",
                other.name()
            ),
        };
    Err(refused(&mut writer, refusal))
}

/// Tells the peer on `writer` why its connection is refused (if it still listens): the
/// refusal, as this side's error.
fn refused(writer: &mut BufWriter<Channel>, refusal: String) -> anyhow::Error {
    let _ = write_message(writer, &Message::Abort(refusal.clone()));
    let _ = writer.flush();
    anyhow::anyhow!(refusal)
}

/// What the stream thread works with.
pub(super) struct Stream {
    pub reader: BufReader<Channel>,
    pub writer: BufWriter<Channel>,
    pub ram: GuestRam,
    pub pager: pager::PagerHandle,
    pub source: Arc<NetworkSource>,
    pub incoming: Arc<Incoming>,
    pub ours: VmIdentity,
}

/// How taking the stream stopped short.
enum Stop {
    /// The connection broke: recoverable.
    Broken(anyhow::Error),
    /// Anything else: the migration fails.
    Fatal(anyhow::Error),
}

impl Failure for Stop {
    /// A lost connection, or bytes damaged on the way (never installed: a page goes in only
    /// once its message's checksum holds): a new connection mends both, and the source's
    /// memory waits, frozen, for it.
    fn from_read(error: ProtocolError) -> Self {
        if error.is_connection_loss() || error.is_damage() {
            Stop::Broken(anyhow::Error::from(error).context("the page stream broke"))
        } else {
            Stop::Fatal(error.into())
        }
    }

    fn panicked() -> Self {
        Stop::Fatal(anyhow::anyhow!("a page stream reader panicked"))
    }

    /// A fatal failure outranks a broken connection: it cannot be recovered.
    fn outranks(&self, kept: &Self) -> bool {
        matches!((kept, self), (Stop::Broken(_), Stop::Fatal(_)))
    }
}

/// Takes the page stream into the pager until the source is done, waits until every page of
/// RAM is in, then confirms it. A broken connection pauses the migration until it is
/// recovered; any other failure is told to the source.
pub(super) fn take_stream(stream: Stream) -> anyhow::Result<()> {
    let Stream {
        mut reader,
        mut writer,
        ram,
        pager,
        source,
        incoming,
        ours,
    } = stream;
    loop {
        // The source streams without a break: one silent for longer has stalled, which
        // pauses the migration as a cut does.
        if let Err(e) = reader.get_ref().set_read_timeout(Some(stream_silence())) {
            tracing::warn!("the page stream waits for its source without a bound: {e}");
        }
        match take_all(&mut reader, &ram, &pager, &source, &incoming) {
            Ok(()) => {
                incoming.finish(Phase::Completed, None);
                // Every page is here: a source that misses this Done can learn it by
                // resuming (see `confirm_completed`).
                let told = write_message(&mut writer, &Message::Done).and_then(|()| writer.flush());
                if let Err(e) = told {
                    tracing::warn!("every page is here, but the source was not told: {e}");
                }
                incoming.shut_links();
                return Ok(());
            }
            Err(Stop::Broken(e)) => {
                let why = format!("{e:#}");
                source.disconnect();
                if !incoming.pause(&why) {
                    source.fail(why.clone());
                    incoming.finish(Phase::Failed, Some(why));
                    return Err(e);
                }
                match recover(&ram, &pager, &source, &incoming, &ours) {
                    Ok((r, w)) => (reader, writer) = (r, w),
                    Err(e) => {
                        source.fail(format!("{e:#}"));
                        incoming.finish(Phase::Failed, Some(format!("{e:#}")));
                        return Err(e);
                    }
                }
            }
            Err(Stop::Fatal(e)) => {
                let _ = write_message(&mut writer, &Message::Abort(format!("{e:#}")));
                let _ = writer.flush();
                source.fail(format!("{e:#}"));
                incoming.finish(Phase::Failed, Some(format!("{e:#}")));
                incoming.shut_links();
                return Err(e);
            }
        }
    }
}

/// Waits for `recover` to give a listener, then for the source to reconnect to it: the new
/// connections, once the source knows what this side holds. Failed attempts go back to
/// waiting (on the same listener, or a newer one `recover` gave); only a VM shut down ends it.
fn recover(
    ram: &GuestRam,
    pager: &pager::PagerHandle,
    source: &Arc<NetworkSource>,
    incoming: &Arc<Incoming>,
    ours: &VmIdentity,
) -> anyhow::Result<(BufReader<Channel>, BufWriter<Channel>)> {
    loop {
        let Some(offer) = incoming.wait_for_offer() else {
            bail!("the migration was paused, and the VM was shut down before it was recovered");
        };
        let held = || held_pages(ram, pager);
        match resume_from(&offer, incoming, ours, held, Some(source)) {
            Ok(links) => {
                if incoming.recovered() {
                    tracing::info!("post-copy recovered");
                } else {
                    tracing::warn!("post-copy recovered, and broken again at once");
                }
                return Ok(links);
            }
            Err(e) => {
                if incoming.abandoned() {
                    return Err(e);
                }
                tracing::warn!("a post-copy recovery attempt failed: {e:#}");
                incoming.shut_links();
                incoming.attempt_failed(format!("a recovery attempt failed: {e:#}"));
            }
        }
    }
}

/// One recovery attempt on `offer`: the source's main connection (hello, resume), what this
/// side holds, then its page-request connection (taken by `source`, if any). Gives up when
/// `recover` replaces the offer or the VM is shut down.
fn resume_from(
    offer: &Offer,
    incoming: &Arc<Incoming>,
    ours: &VmIdentity,
    held: impl Fn() -> DirtyPages,
    source: Option<&Arc<NetworkSource>>,
) -> anyhow::Result<(BufReader<Channel>, BufWriter<Channel>)> {
    let give_up = || incoming.offer_withdrawn(offer.generation);
    let tls = offer.tls.as_ref();
    let (mut reader, mut writer) = accept_link(&offer.listener, tls, ours, None, &give_up)
        .context("cannot take the source's reconnection")?;
    incoming.add_link(reader.get_ref().try_clone()?);
    let first = read_within(&mut reader, REPLY_TIMEOUT).context("no resume after the hello")?;
    let Message::Resume { migration } = first else {
        bail!("the reconnection began with {}, not a resume", first.name());
    };
    // A source of another migration (of a VM of the same shape) must not fill this VM with
    // its pages, nor learn that its own migration completed.
    let named_here = incoming.migration();
    if named_here != Some(migration) {
        let refusal = format!(
            "the resume names migration {migration:016x}; the one here is {}",
            named_here.map_or_else(|| "unnamed".to_string(), |m| format!("{m:016x}"))
        );
        return Err(refused(&mut writer, refusal));
    }
    if source.is_some() {
        incoming.recovering();
    }
    let held = held();
    write_message(
        &mut writer,
        &Message::Received {
            pages: held.pages(),
            bitmap: held.words().to_vec(),
        },
    )?;
    writer.flush()?;
    let deadline = Some(Instant::now() + ACCEPT_TIMEOUT);
    let (requests_reader, requests_writer) =
        accept_requests_link(&offer.listener, tls, ours, migration, deadline, &give_up)
            .context("cannot take the source's new page-request connection")?;
    match source {
        Some(source) => source.connect(requests_reader, requests_writer)?,
        None => incoming.add_link(requests_reader.get_ref().try_clone()?),
    }
    Ok((reader, writer))
}

/// A completed migration whose source missed the end (its last Done was lost to a cut) and
/// resumes: it is told that every page is here, and done. Serves every `recover` asked of
/// it (a resume cut again is answered again), until the VM is shut down.
pub(super) fn confirm_completed(incoming: &Arc<Incoming>) {
    let Some(ours) = incoming.identity() else {
        return;
    };
    while let Some(offer) = incoming.wait_for_offer() {
        let all = || DirtyPages::all(ours.layout.pages());
        let confirmed =
            resume_from(&offer, incoming, &ours, all, None).and_then(|(mut reader, mut writer)| {
                // It has nothing left to send: its end comes at once, or the attempt is
                // over (and the next `recover` is waited for).
                match read_within(&mut reader, REPLY_TIMEOUT).context("no end from the source")? {
                    Message::Done => {}
                    other => bail!("the source sent {} where its end belongs", other.name()),
                }
                write_message(&mut writer, &Message::Done)?;
                writer.flush()?;
                Ok(())
            });
        incoming.shut_links();
        match confirmed {
            // The offer is spent: the next `recover` gives the next one (or has already).
            Ok(()) => incoming.spend_offer(offer.generation),
            Err(e) => {
                if incoming.abandoned() {
                    return;
                }
                // Still complete: the listener waits for the source's next attempt.
                tracing::warn!("telling the source the migration completed failed: {e:#}");
            }
        }
    }
}

/// The pages the pager holds, by index (regions back to back).
fn held_pages(ram: &GuestRam, pager: &pager::PagerHandle) -> DirtyPages {
    let mut held = DirtyPages::new(ram.size() / PAGE_SIZE);
    let mut first = 0u64;
    for (index, region) in ram.regions().iter().enumerate() {
        let count = region.size() / PAGE_SIZE;
        for page in 0..count {
            if pager.holds(index, page as usize) {
                held.mark(first + page);
            }
        }
        first += count;
    }
    held
}

fn take_all(
    reader: &mut BufReader<Channel>,
    ram: &GuestRam,
    pager: &pager::PagerHandle,
    source: &NetworkSource,
    incoming: &Incoming,
) -> Result<(), Stop> {
    // Threads take turns at the stream, each installing what it read (`turns`).
    let layout = layout_of(ram);
    let install_message = |message: &Message| -> Result<(), Stop> {
        message.check(&layout).map_err(|e| Stop::Fatal(e.into()))?;
        match message {
            Message::Pages { gpa, data } => {
                install(ram, pager, *gpa, data).map_err(Stop::Fatal)?;
                incoming
                    .normal_pages
                    .fetch_add(data.len() as u64 / PAGE_SIZE, Ordering::Relaxed);
                incoming
                    .bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Message::ZeroPages { gpa, count } => {
                mark_zeros(ram, pager, *gpa, *count).map_err(Stop::Fatal)?;
                incoming.zero_pages.fetch_add(*count, Ordering::Relaxed);
            }
            _ => unreachable!("only page messages are installed"),
        }
        Ok(())
    };
    match take_pages_in_turns(reader, "postcopy-install", &install_message)? {
        Message::Done => {}
        Message::Abort(reason) => {
            return Err(Stop::Fatal(anyhow::anyhow!("the source gave up: {reason}")))
        }
        other => {
            return Err(Stop::Fatal(anyhow::anyhow!(
                "unexpected {} in the page stream",
                other.name()
            )))
        }
    }
    // Every page is in, or on its way to a fault that asked for it: wait for those, so that
    // the source may go. A page missing with no request out for it is the source's mistake;
    // one asked for is waited for as any request is (a silent source pauses the migration).
    let mut deadline = Instant::now() + ACCEPT_TIMEOUT;
    // A page once present stays so: each look starts where the last one stopped.
    let mut from = (0, 0);
    loop {
        if let Some(fatal) = pager.fatal_error() {
            return Err(Stop::Fatal(anyhow::anyhow!(
                "guest memory could not be provided: {fatal}"
            )));
        }
        let missing = first_missing(ram, pager, from);
        match missing {
            // Every page is here: done, whatever became of the page-request connection.
            None if source.outstanding() == 0 => return Ok(()),
            None => {}
            Some(at) => from = at,
        }
        if !source.connected() {
            return Err(Stop::Broken(anyhow::anyhow!(
                "the page-request connection broke while the last pages came"
            )));
        }
        if source.outstanding() > 0 {
            deadline = Instant::now() + ACCEPT_TIMEOUT;
        } else if let (Some((index, page)), true) = (missing, Instant::now() >= deadline) {
            return Err(Stop::Fatal(anyhow::anyhow!(
                "guest RAM at {:#x} was still missing {} s after the stream ended",
                ram.regions()[index].gpa() + page as u64 * PAGE_SIZE,
                ACCEPT_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The first page, `(region, page)` from `from` on, that the pager does not have yet.
fn first_missing(
    ram: &GuestRam,
    pager: &pager::PagerHandle,
    from: (usize, usize),
) -> Option<(usize, usize)> {
    ram.regions()
        .iter()
        .enumerate()
        .skip(from.0)
        .find_map(|(index, region)| {
            let start = if index == from.0 { from.1 } else { 0 };
            (start..(region.size() / PAGE_SIZE) as usize)
                .find(|&page| !pager.holds(index, page))
                .map(|page| (index, page))
        })
}

/// `count` pages from `gpa` are zero: the pager gives them as zero pages when they are
/// touched, without asking the source, and allocates nothing for them now (pages already
/// there are left alone).
pub(super) fn mark_zeros(
    ram: &GuestRam,
    pager: &pager::PagerHandle,
    gpa: u64,
    count: u64,
) -> anyhow::Result<()> {
    let (index, first) = ram
        .region_page(gpa, count * PAGE_SIZE)
        .context("streamed zero pages outside RAM")?;
    pager
        .mark_zero(index, first, count as usize)
        .context("cannot mark streamed zero pages")?;
    Ok(())
}

/// Installs `data` at `gpa` through the pager (pages already there are left alone).
fn install(
    ram: &GuestRam,
    pager: &pager::PagerHandle,
    gpa: u64,
    data: &[u8],
) -> anyhow::Result<()> {
    let (index, first) = ram
        .region_page(gpa, data.len() as u64)
        .context("streamed pages outside RAM")?;
    pager
        .install_pages(index, first, data)
        .context("cannot install streamed pages")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(stop: &Stop) -> &'static str {
        match stop {
            Stop::Broken(_) => "broken",
            Stop::Fatal(_) => "fatal",
        }
    }

    #[test]
    fn only_an_answer_to_a_page_asked_of_the_size_asked_is_taken() {
        let layout = Layout::new(vec![(0, 1 << 20)]);
        let incoming = Arc::new(Incoming::new("test".into(), None, false));
        let source = Arc::new(NetworkSource::new(layout, incoming));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let theirs = listener.accept().unwrap().0;
        source
            .connect(
                BufReader::new(Channel::Tcp(ours.try_clone().unwrap())),
                BufWriter::new(Channel::Tcp(ours)),
            )
            .unwrap();
        // A source that answers a page nobody asked for, then the page asked with the wrong
        // size, then the page asked.
        let peer = std::thread::spawn(move || {
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let mut writer = theirs;
            let Message::PageRequest { gpa, count: 1 } = read_message(&mut reader).unwrap() else {
                panic!("not a request for one page");
            };
            for (at, byte, pages) in [(gpa + PAGE_SIZE, 9u8, 1), (gpa, 8, 2), (gpa, 7, 1)] {
                let data = vec![byte; pages * PAGE_SIZE as usize];
                write_message(&mut writer, &Message::Pages { gpa: at, data }).unwrap();
            }
            // Closed: this side reads the answers, then the end.
        });
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let fetched = source.fetch(0x3000, &mut page);
        peer.join().unwrap();
        assert_eq!(fetched.unwrap(), Content::Data);
        assert!(
            page.iter().all(|&b| b == 7),
            "the answer taken: {:?}",
            &page[..8]
        );
        // Every answer read (the end after them too): the others were dropped, not kept for a
        // fetch to find later.
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&source.answers).connected {
            assert!(
                Instant::now() < deadline,
                "the end of the connection was never read"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            lock(&source.answers).pages.is_empty(),
            "an answer nobody asked for was kept"
        );
    }

    #[test]
    fn a_lost_connection_or_damaged_bytes_are_a_break_and_a_fatal_failure_outranks_one() {
        let broken = Stop::from_read(ProtocolError::PeerClosed);
        let fatal = Stop::from_read(ProtocolError::Malformed {
            kind: "pages",
            why: "a page count of 0".into(),
        });
        assert_eq!((kind(&broken), kind(&fatal)), ("broken", "fatal"));
        assert_eq!(
            kind(&Stop::panicked()),
            "fatal",
            "a panic cannot be recovered"
        );
        assert!(fatal.outranks(&broken));
        assert!(!broken.outranks(&fatal));
        assert!(
            !fatal.outranks(&Stop::panicked()),
            "of two fatal ones, the first"
        );
        assert!(!broken.outranks(&Stop::from_read(ProtocolError::PeerClosed)));
        assert_eq!(
            kind(&Stop::from_read(ProtocolError::Checksum { kind: "pages" })),
            "broken",
            "damaged on the way: a new connection mends it"
        );
    }
}
