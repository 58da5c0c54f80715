//! Post-copy: the VM moves at once and its memory follows.
//!
//! The source pauses the VM and sends its state; the destination runs it with all of guest RAM
//! behind the pager, whose page source asks the source for what the guest touches first. Two
//! connections: the first carries the stream of every page, the second only page requests and
//! their answers, so an urgent page never waits behind the stream; the stream moves on from
//! the last page asked for. Pages from the stream go in through the pager's one install path,
//! which never overwrites a page the guest already has.
//!
//! Once the state is sent the VM may be running at the destination, so the source never
//! resumes it after that: a failure leaves it paused (recovery after a cut is not built yet).

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use migrate::{read_message, write_message, Layout, Message, ProtocolError};
use pager::{Content, PageSource, SourceError};
use snapshot::state::GuestInfo;
use vmm::{DirtyPages, GuestRam, VmHandle, PAGE_SIZE};

use super::channel::{Channel, Tls};
use super::layout_of;
use super::send::{read_and_send, SendOptions, SendReport, Sent, RUN_PAGES};

/// How long a fault waits for the source to answer before its page counts as unavailable.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination waits for the page-request connection, and, at the end, for every
/// page to be in.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts one connection on `listener`, waiting at most `timeout`.
fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true)?;
    let accepted = loop {
        match listener.accept() {
            Ok((stream, _)) => break Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {} s", timeout.as_secs()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => break Err(e),
        }
    };
    listener.set_nonblocking(false)?;
    // An accepted socket does not inherit the listener's non-blocking mode on Linux; make sure.
    let stream = accepted?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A switch to post-copy on the source, after the hello (and, in a hybrid migration, the
/// pre-copy rounds).
pub(super) struct Switch<'a> {
    pub handle: &'a VmHandle,
    pub guest: Option<GuestInfo>,
    pub options: &'a SendOptions,
    pub started: Instant,
    pub setup: Duration,
    pub writer: BufWriter<Channel>,
    pub reader: BufReader<Channel>,
    pub paused_here: &'a mut bool,
    /// Pages the rounds sent that changed since (hybrid); `None`: nothing was sent yet.
    pub stale: Option<DirtyPages>,
    /// Every page taken from the dirty log, to give back if this fails before the state left.
    pub taken: &'a mut DirtyPages,
    pub ended_by: &'static str,
    /// What the rounds sent.
    pub before: Sent,
    pub rounds: u32,
}

/// The source side: pause, the state, then the pages that are still to come, streamed and on
/// request.
pub(super) fn send(switch: Switch<'_>) -> anyhow::Result<SendReport> {
    let Switch {
        handle,
        guest,
        options,
        started,
        setup,
        mut writer,
        mut reader,
        paused_here,
        stale,
        taken,
        ended_by,
        before,
        rounds,
    } = switch;
    let ram = handle.ram();
    // Post-copy begins: the destination takes the page-request connection before anything
    // else, and the VM still runs here until that works.
    write_message(&mut writer, &Message::SwitchOver { post_copy: true })?;
    writer.flush()?;
    let (urgent_writer, urgent_reader) =
        super::send::connect(handle, &options.to, options.tls.as_ref())
            .context("cannot open the page-request connection")?;
    let paused_at = Instant::now();
    super::send::pause_for_switch(handle, paused_here)?;
    let total = ram.size() / PAGE_SIZE;
    let to_come = match stale {
        Some(mut stale) => {
            stale.merge(&super::send::take(handle, taken)?);
            stale
        }
        None => DirtyPages::all(total),
    };
    let state = super::send::state_message(handle, guest)?;
    write_message(&mut writer, &state)?;
    write_message(
        &mut writer,
        &Message::Stale {
            pages: total,
            bitmap: to_come.words().to_vec(),
        },
    )?;
    writer.flush()?;
    // Once the destination has built the VM it runs it there, and it must never run here
    // again. Until then only its refusal is sure to leave it unbuilt: any other outcome
    // leaves the VM paused here.
    match read_message(&mut reader) {
        Ok(Message::Built) => *paused_here = false,
        Ok(Message::Abort(reason)) => bail!("the destination could not take the VM: {reason}"),
        Ok(other) => {
            *paused_here = false;
            bail!("the destination answered the state with {}", other.name())
        }
        Err(e) => {
            *paused_here = false;
            return Err(e).context("the destination did not say whether it runs the VM");
        }
    }
    let downtime = paused_at.elapsed();

    let shared = Arc::new(Streaming {
        sent: Mutex::new((0..total).map(|page| !to_come.contains(page)).collect()),
        hint: AtomicU64::new(NO_HINT),
        requests: AtomicU64::new(0),
    });
    let urgent_stream = urgent_reader.get_ref().try_clone()?;
    let server = {
        let handle = handle.clone();
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("postcopy-urgent".into())
            .spawn(move || {
                let channel = urgent_reader.get_ref().try_clone();
                let served = serve_requests(&handle, urgent_reader, urgent_writer, &shared);
                if served.is_err() {
                    // Faults at the destination must not wait for answers that will not come.
                    if let Ok(channel) = channel {
                        channel.shutdown();
                    }
                }
                served
            })?
    };
    let streamed = stream_pages(handle, &mut writer, &shared);
    let finished = streamed.and_then(|sent| {
        write_message(&mut writer, &Message::Done)?;
        writer.flush()?;
        match read_message(&mut reader).context("the destination did not confirm the migration")? {
            Message::Done => Ok(sent),
            Message::Abort(reason) => bail!("the destination gave up: {reason}"),
            other => bail!("the destination answered with {}", other.name()),
        }
    });
    urgent_stream.shutdown();
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("the page-request thread panicked"))?;
    let streamed = finished.context("post-copy failed")?;
    served.context("post-copy page requests failed")?;
    let sent = Sent {
        bytes: before.bytes + streamed.bytes,
        normal: before.normal + streamed.normal,
        zero: before.zero + streamed.zero,
    };
    let mode = if before.bytes > 0 { "hybrid" } else { "post" };
    Ok(SendReport::new(
        mode,
        ended_by,
        started,
        setup,
        downtime,
        &sent,
        rounds,
        0.0,
        shared.requests.load(Ordering::Relaxed),
    ))
}

const NO_HINT: u64 = u64::MAX;

/// What the stream and the request server share on the source.
struct Streaming {
    /// By page index (regions back to back): sent already, by either.
    sent: Mutex<Vec<bool>>,
    /// The page index last asked for, where the stream goes on from.
    hint: AtomicU64,
    requests: AtomicU64,
}

/// Sends every page not sent yet, in runs, moving to the last page asked for when there is one.
fn stream_pages<W: Write>(
    handle: &VmHandle,
    writer: &mut W,
    shared: &Streaming,
) -> anyhow::Result<Sent> {
    let ram = handle.ram();
    let mut buffer = vec![0u8; (RUN_PAGES * PAGE_SIZE) as usize];
    let mut sent = Sent::default();
    let mut next = 0u64;
    loop {
        let hint = shared.hint.swap(NO_HINT, Ordering::AcqRel);
        if hint != NO_HINT {
            next = hint;
        }
        let run = {
            let mut done = shared.sent.lock().unwrap_or_else(|e| e.into_inner());
            let total = done.len() as u64;
            let Some(first) = (0..total)
                .map(|i| (next + i) % total)
                .find(|&page| !done[page as usize])
            else {
                break;
            };
            let gpa = ram.gpa_of_page(first).context("a page past RAM")?;
            let mut count = 1;
            while count < RUN_PAGES
                && first + count < total
                && !done[(first + count) as usize]
                && ram.gpa_of_page(first + count) == Some(gpa + count * PAGE_SIZE)
            {
                count += 1;
            }
            for page in first..first + count {
                done[page as usize] = true;
            }
            next = first + count;
            (gpa, count)
        };
        read_and_send(writer, ram, &mut buffer, run.0, run.1, &mut sent)?;
    }
    Ok(sent)
}

/// Answers page requests on the second connection until it closes.
fn serve_requests(
    handle: &VmHandle,
    mut reader: BufReader<Channel>,
    mut writer: BufWriter<Channel>,
    shared: &Streaming,
) -> anyhow::Result<()> {
    let ram = handle.ram();
    let layout = layout_of(ram);
    loop {
        let message = match read_message(&mut reader) {
            Ok(message) => message,
            Err(ProtocolError::PeerClosed) => return Ok(()),
            Err(ProtocolError::Io(e)) if e.kind() != std::io::ErrorKind::InvalidData => {
                // Shut down by the stream side once it is done.
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        message.check(&layout)?;
        let Message::PageRequest { gpa, count } = message else {
            bail!(
                "unexpected {} on the page-request connection",
                message.name()
            );
        };
        let len = u64::from(count) * PAGE_SIZE;
        let mut data = vec![0u8; len as usize];
        let host = ram
            .host_range(gpa, len)
            .context("requested pages not in RAM")?;
        vmm::memory::read_host(host as u64, &mut data)
            .with_context(|| format!("cannot read guest RAM at {gpa:#x}"))?;
        write_message(&mut writer, &Message::Pages { gpa, data })?;
        writer.flush()?;
        shared.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(first) = ram.page_index(gpa) {
            let mut done = shared.sent.lock().unwrap_or_else(|e| e.into_inner());
            for page in first..first + u64::from(count) {
                if let Some(slot) = done.get_mut(page as usize) {
                    *slot = true;
                }
            }
            shared
                .hint
                .store(first + u64::from(count), Ordering::Release);
        }
    }
}

/// The destination's page source: every page it fetches is asked of the source on the
/// page-request connection, and waited for.
pub(super) struct NetworkSource {
    layout: Layout,
    writer: Mutex<BufWriter<Channel>>,
    answers: Mutex<Answers>,
    arrived: Condvar,
    /// Fetches waiting for an answer.
    outstanding: AtomicUsize,
    /// Page requests made, and how long their answers took, in µs.
    latencies: Mutex<Vec<u64>>,
}

#[derive(Default)]
struct Answers {
    /// Requests sent and not answered yet, by address: (pages asked).
    asked: HashMap<u64, u32>,
    pages: HashMap<u64, Vec<u8>>,
    /// Why no more answers will come.
    failed: Option<String>,
}

impl NetworkSource {
    /// How many fetches wait for an answer now.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// The answer times so far, in µs.
    pub fn latencies_us(&self) -> Vec<u64> {
        self.latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn fail(&self, why: String) {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        answers.failed.get_or_insert(why);
        self.arrived.notify_all();
    }
}

impl PageSource for NetworkSource {
    fn describe(&self) -> String {
        "the migration source".into()
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let unavailable = |reason: String| SourceError::Unavailable { offset, reason };
        let regions = self.layout.regions();
        let (gpa, count) = image_to_gpa(regions, offset, buf.len() as u64)
            .ok_or_else(|| unavailable("not guest RAM".into()))?;
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let asked = Instant::now();
        let deadline = asked + ANSWER_TIMEOUT;
        let result = (|| {
            self.answers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .asked
                .insert(gpa, count);
            {
                let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
                write_message(&mut *writer, &Message::PageRequest { gpa, count })
                    .and_then(|()| writer.flush())
                    .map_err(|e| unavailable(format!("cannot ask the migration source: {e}")))?;
            }
            let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
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
                if let Some(why) = &answers.failed {
                    return Err(unavailable(format!("the migration source is gone: {why}")));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    answers.asked.remove(&gpa);
                    return Err(unavailable(format!(
                        "no answer from the migration source within {} s",
                        ANSWER_TIMEOUT.as_secs()
                    )));
                }
                answers = self
                    .arrived
                    .wait_timeout(answers, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        })();
        self.latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(asked.elapsed().as_micros() as u64);
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

/// Accepts the page-request connection (and its hello) from `listener`; the source to build
/// the pager on.
pub(super) fn accept_requests(
    listener: &TcpListener,
    tls: Option<&Tls>,
    ours: &migrate::VmIdentity,
) -> anyhow::Result<Arc<NetworkSource>> {
    let stream = accept_within(listener, ACCEPT_TIMEOUT)
        .context("cannot accept the page-request connection")?;
    let stream =
        super::channel::open(stream, tls, "").context("cannot open the page-request channel")?;
    let mut writer = BufWriter::new(stream.try_clone()?);
    let mut reader = BufReader::new(stream);
    match read_message(&mut reader).context("no hello on the page-request connection")? {
        Message::Hello(theirs) => ours.check_matches(&theirs)?,
        other => bail!("the page-request connection began with {}", other.name()),
    }
    write_message(&mut writer, &Message::Hello(ours.clone()))?;
    writer.flush()?;
    let source = Arc::new(NetworkSource {
        layout: ours.layout.clone(),
        writer: Mutex::new(writer),
        answers: Mutex::new(Answers::default()),
        arrived: Condvar::new(),
        outstanding: AtomicUsize::new(0),
        latencies: Mutex::new(Vec::new()),
    });
    let answers = Arc::clone(&source);
    std::thread::Builder::new()
        .name("postcopy-answers".into())
        .spawn(move || {
            let layout = answers.layout.clone();
            loop {
                let message = read_message(&mut reader).map_err(anyhow::Error::from);
                match message.and_then(|m| m.check(&layout).map(|()| m).map_err(Into::into)) {
                    Ok(Message::Pages { gpa, data }) => {
                        let mut pending = answers.answers.lock().unwrap_or_else(|e| e.into_inner());
                        // Only answers to requests made, of the size asked, are kept.
                        if pending.asked.get(&gpa).map(|&n| u64::from(n) * PAGE_SIZE)
                            == Some(data.len() as u64)
                        {
                            pending.asked.remove(&gpa);
                            pending.pages.insert(gpa, data);
                            answers.arrived.notify_all();
                        } else {
                            tracing::warn!("post-copy: an answer nobody asked for, at {gpa:#x}");
                        }
                    }
                    Ok(other) => {
                        answers.fail(format!("unexpected {} among page answers", other.name()));
                        return;
                    }
                    Err(e) => {
                        answers.fail(format!("{e:#}"));
                        return;
                    }
                }
            }
        })?;
    Ok(source)
}

/// Takes the page stream from the first connection into `pager` until the source's done,
/// waits until every page of RAM is in, then confirms it. Any failure is told to the source.
/// Returns (pages, zero pages) taken.
pub(super) fn take_stream(
    mut reader: BufReader<Channel>,
    mut writer: BufWriter<Channel>,
    ram: &GuestRam,
    pager: pager::PagerHandle,
    source: Arc<NetworkSource>,
) -> anyhow::Result<(u64, u64)> {
    let taken = take_all(&mut reader, ram, &pager, &source);
    let message = match &taken {
        Ok(_) => Message::Done,
        Err(e) => Message::Abort(format!("{e:#}")),
    };
    write_message(&mut writer, &message)?;
    writer.flush()?;
    taken
}

fn take_all(
    reader: &mut BufReader<Channel>,
    ram: &GuestRam,
    pager: &pager::PagerHandle,
    source: &NetworkSource,
) -> anyhow::Result<(u64, u64)> {
    let layout = layout_of(ram);
    let (mut normal, mut zero) = (0u64, 0u64);
    loop {
        let message = read_message(reader).context("the page stream failed")?;
        message.check(&layout)?;
        match message {
            Message::Pages { gpa, data } => {
                normal += data.len() as u64 / PAGE_SIZE;
                install(ram, pager, gpa, &data)?;
            }
            Message::ZeroPages { gpa, count } => {
                zero += count;
                install_zeros(ram, pager, gpa, count)?;
            }
            Message::Done => break,
            Message::Abort(reason) => bail!("the source gave up: {reason}"),
            other => bail!("unexpected {} in the page stream", other.name()),
        }
    }
    // Every page is in, or on its way to a fault that asked for it: wait for those, so that
    // the source may go.
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    // A page once present stays so: each look starts where the last one stopped.
    let mut from = (0, 0);
    loop {
        if let Some(fatal) = pager.fatal_error() {
            bail!("guest memory could not be provided: {fatal}");
        }
        let missing = first_missing(ram, pager, from);
        match missing {
            None if source.outstanding() == 0 => return Ok((normal, zero)),
            None => {}
            Some(at) => from = at,
        }
        if Instant::now() >= deadline {
            let (index, page) = missing.unwrap_or(from);
            bail!(
                "guest RAM at {:#x} was still missing {} s after the stream ended",
                ram.regions()[index].gpa() + page as u64 * PAGE_SIZE,
                ACCEPT_TIMEOUT.as_secs()
            );
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
                .find(|&page| !pager.is_present(index, page))
                .map(|page| (index, page))
        })
}

/// Installs `count` zero pages from `gpa` through the pager (pages already there are left
/// alone).
pub(super) fn install_zeros(
    ram: &GuestRam,
    pager: &pager::PagerHandle,
    gpa: u64,
    count: u64,
) -> anyhow::Result<()> {
    let zeros = vec![0u8; (RUN_PAGES.min(count) * PAGE_SIZE) as usize];
    let mut at = gpa;
    let mut left = count;
    while left > 0 {
        let n = left.min(RUN_PAGES);
        install(ram, pager, at, &zeros[..(n * PAGE_SIZE) as usize])?;
        at += n * PAGE_SIZE;
        left -= n;
    }
    Ok(())
}

/// Installs `data` at `gpa` through the pager (pages already there are left alone).
fn install(
    ram: &GuestRam,
    pager: &pager::PagerHandle,
    gpa: u64,
    data: &[u8],
) -> anyhow::Result<()> {
    let (index, region) = ram
        .regions()
        .iter()
        .enumerate()
        .find(|(_, r)| r.contains(gpa, data.len() as u64))
        .context("streamed pages outside RAM")?;
    let first = ((gpa - region.gpa()) / PAGE_SIZE) as usize;
    pager
        .install_pages(index, first, data)
        .context("cannot install streamed pages")?;
    Ok(())
}
