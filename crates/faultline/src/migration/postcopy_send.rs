//! Post-copy on the source: the VM moves at once and its memory follows.
//!
//! The source pauses the VM and sends its state; the destination runs it with all of guest RAM
//! behind the pager, whose page source asks the source for what the guest touches first. Two
//! connections: the first carries the stream of every page, the second only page requests and
//! their answers, so an urgent page never waits behind the stream; the stream moves on from
//! the last page asked for.
//!
//! Once the state is sent the VM may be running at the destination, so the source never
//! resumes it after that. A failure from then on leaves it paused here (`postcopy-paused`):
//! `resume` reconnects, learns what the destination holds, and sends the rest.

use std::io::{BufReader, BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use migrate::{read_message, write_message, Message, ProtocolError};
use snapshot::state::GuestInfo;
use vmm::{DirtyPages, VmHandle, PAGE_SIZE};

use super::channel::{build_timeout, read_within, Channel, REPLY_TIMEOUT};
use super::progress::Progress;
use super::send::{
    Downtime, PageReader, PausedMigration, SendFailure, SendOptions, SendReport, Sent, RUN_PAGES,
};
use super::{layout_of, run_from};
use crate::locking::lock;

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
    /// Pages the guest dirtied per second over the rounds (hybrid).
    pub dirty_rate_pages_per_s: f64,
    /// The migration's name (for a resume).
    pub migration: u64,
}

/// The source side: pause, the state, then the pages that are still to come, streamed and on
/// request.
pub(super) fn send(switch: Switch<'_>) -> Result<SendReport, SendFailure> {
    let Switch {
        handle,
        guest,
        options,
        started,
        setup,
        mut writer,
        mut reader,
        paused_here,
        mut stale,
        taken,
        ended_by,
        before,
        rounds,
        dirty_rate_pages_per_s,
        migration,
    } = switch;
    let ram = handle.ram();
    // A give-up asked before is taken now; from here it is not (the VM may soon run there).
    options.give_up.close()?;
    // Until the stream begins (the destination may take up to `build_timeout` to build the
    // VM), not "connecting" any more.
    let total = ram.size() / PAGE_SIZE;
    options.progress.phase(
        "switch-over",
        stale.as_ref().map_or(total, DirtyPages::count),
    );
    // Post-copy begins: the destination makes the pages the rounds sent that changed since
    // missing (it has none in a plain post-copy) and takes the page-request connection, while
    // the VM still runs here.
    let none_sent = DirtyPages::new(total);
    let early = stale.as_ref().unwrap_or(&none_sent);
    write_message(
        &mut writer,
        &Message::SwitchOver {
            post_copy: true,
            migration,
        },
    )
    .and_then(|()| write_message(&mut writer, &stale_message(early)))
    .and_then(|()| writer.flush())
    .context("cannot send the switch-over")?;
    let urgent = open_requests(handle, options, migration)
        .context("cannot open the page-request connection")?;
    // A hybrid: the pages written since that list (while the destination got ready, some
    // tens of milliseconds) go too, and are dropped there while the VM still runs here, so
    // that the downtime drops only those of the next moment.
    if let Some(to_come_again) = &mut stale {
        let since = super::send::take(handle, taken)?;
        to_come_again.merge(&since);
        send_written_since(&mut writer, &mut reader, &since)?;
    }
    let paused_at = Instant::now();
    super::send::pause_for_switch(handle, paused_here)?;
    let to_come = match stale {
        Some(mut stale) => {
            stale.merge(&super::send::take(handle, taken)?);
            stale
        }
        None => DirtyPages::all(total),
    };
    let state = super::send::state_message(handle, guest)?;
    let sent = write_message(&mut writer, &state)
        .and_then(|()| write_message(&mut writer, &stale_message(&to_come)))
        .and_then(|()| writer.flush());
    if let Err(e) = sent {
        // The VM runs on here: the destination must never get the whole state, which it
        // would build and run (post-copy has no go-ahead), so what is left of it is dropped.
        Channel::discard_unsent(writer);
        return Err(anyhow::Error::from(e)
            .context("cannot send the state")
            .into());
    }
    let until_state_sent = paused_at.elapsed();
    // The destination may run the VM from now on: it must not run here again unless the
    // destination says it does not.
    handle.control().set_runs_elsewhere(true);
    // Page requests are answered from now on, not only once the destination says it built
    // the VM: putting the state in may touch guest pages (KVM maps a vCPU's kvmclock page
    // when its MSR is set), and memory is frozen here already.
    let mut paused = Box::new(PausedMigration {
        mode: if before.bytes > 0 { "hybrid" } else { "post" },
        ended_by,
        started,
        setup,
        paused_at,
        // The whole downtime is known once the destination answers; a pause before (a cut,
        // a silence) keeps this part for the report of the resume that completes it.
        downtime: Downtime {
            until_state_sent,
            ..Downtime::default()
        },
        sent: before,
        rounds,
        dirty_rate_pages_per_s,
        // A hybrid goes post-copy rather than throttle.
        throttle_percent: 0,
        requests: 0,
        confirmed: false,
        recoveries: 0,
        taken: None,
        paused_by_it: *paused_here,
        migration,
    });
    let server = match Server::start(handle, urgent, to_come, options, reader.get_ref()) {
        Ok(server) => server,
        Err(e) => {
            *paused_here = false;
            return Err(SendFailure::Paused(
                e.context("cannot answer page requests"),
                paused,
            ));
        }
    };
    // Once the destination has built the VM it runs it there, and it must never run here
    // again. Until then only its refusal is sure to leave it unbuilt: any other outcome
    // (silence too) leaves the VM paused here, for a recovery or a cancel to settle.
    match read_within(&mut reader, build_timeout()) {
        Ok(Message::Built) => {
            *paused_here = false;
            paused.confirmed = true;
        }
        Ok(Message::Abort(reason)) => {
            server.stop();
            handle.control().set_runs_elsewhere(false);
            return Err(anyhow::anyhow!("the destination could not take the VM: {reason}").into());
        }
        Ok(other) => {
            server.stop();
            *paused_here = false;
            let e = anyhow::anyhow!("the destination answered the state with {}", other.name());
            return Err(SendFailure::Paused(e, paused));
        }
        Err(e) => {
            server.stop();
            *paused_here = false;
            let e = anyhow::Error::from(e)
                .context("the destination did not say whether it runs the VM");
            return Err(SendFailure::Paused(e, paused));
        }
    }
    paused.downtime = Downtime {
        whole: paused_at.elapsed(),
        until_state_sent,
    };
    let completed = complete(options, (writer, reader), server, &mut paused);
    finished(completed, paused)
}

/// A stale list of `pages` (pages sent before that will come again).
fn stale_message(pages: &DirtyPages) -> Message {
    Message::Stale {
        pages: pages.pages(),
        bitmap: pages.words().to_vec(),
    }
}

/// Sends the pages written since the first stale list, and waits until the destination has
/// dropped them (it answers with a sync).
fn send_written_since(
    writer: &mut BufWriter<Channel>,
    reader: &mut BufReader<Channel>,
    since: &DirtyPages,
) -> anyhow::Result<()> {
    write_message(writer, &stale_message(since))?;
    writer.flush()?;
    match read_within(reader, REPLY_TIMEOUT)
        .context("the destination did not take the pages written since the switch-over")?
    {
        Message::Sync => Ok(()),
        Message::Abort(reason) => bail!("the destination gave up the migration: {reason}"),
        other => bail!(
            "the destination answered the pages written since with {}",
            other.name()
        ),
    }
}

/// Opens a page-request connection to the destination: hellos, then the name of the
/// `migration` whose page requests it answers (the destination takes no other).
fn open_requests(
    handle: &VmHandle,
    options: &SendOptions,
    migration: u64,
) -> anyhow::Result<(BufWriter<Channel>, BufReader<Channel>)> {
    let (mut writer, reader) = super::send::connect(handle, &options.to, options.tls.as_ref())?;
    write_message(&mut writer, &Message::Requests { migration })?;
    writer.flush()?;
    Ok((writer, reader))
}

/// Resumes a post-copy that `paused`: reconnects to the destination (whose `recover` listens
/// at `options.to`), learns what it holds, and sends the rest.
pub fn resume(
    handle: &VmHandle,
    options: &SendOptions,
    mut paused: Box<PausedMigration>,
) -> Result<SendReport, SendFailure> {
    paused.sent.progress = Some(Arc::clone(&options.progress));
    let attempt = (|| {
        let (mut writer, mut reader) =
            super::send::connect(handle, &options.to, options.tls.as_ref())?;
        write_message(
            &mut writer,
            &Message::Resume {
                migration: paused.migration,
            },
        )?;
        writer.flush()?;
        let answer = read_within(&mut reader, REPLY_TIMEOUT)
            .context("the destination did not say what it holds")?;
        let layout = layout_of(handle.ram());
        answer.check(&layout)?;
        let held = match answer {
            Message::Received { pages, bitmap } => DirtyPages::from_words(pages, bitmap)
                .context("a received bitmap of the wrong size")?,
            Message::Abort(reason) => bail!("the destination cannot resume: {reason}"),
            other => bail!("the destination answered the resume with {}", other.name()),
        };
        // It answered: it runs the VM (it holds what the first connection built), and the
        // migration is recovered (an attempt that never got this far is not counted). If its
        // word that it runs the VM (`Built`, a pre-copy's acknowledgement) was lost, this is
        // the first it says so: the downtime ends here.
        if !paused.confirmed {
            paused.downtime.whole = paused.paused_at.elapsed();
        }
        paused.confirmed = true;
        paused.recoveries += 1;
        let mut to_come = DirtyPages::all(held.pages());
        to_come.remove(&held);
        let urgent = open_requests(handle, options, paused.migration)
            .context("cannot open the page-request connection again")?;
        Ok(((writer, reader), urgent, to_come))
    })();
    let completed = attempt.and_then(|(main, urgent, to_come)| {
        let server = Server::start(handle, urgent, to_come, options, main.1.get_ref())?;
        complete(options, main, server, &mut paused)
    });
    finished(completed, paused).map_err(SendFailure::naming_a_lost_connection)
}

/// The report of a post-copy that `completed`, or where it is paused.
fn finished(
    completed: anyhow::Result<()>,
    paused: Box<PausedMigration>,
) -> Result<SendReport, SendFailure> {
    match completed {
        Ok(()) => Ok(paused.report()),
        Err(e) => Err(SendFailure::Paused(e, paused)),
    }
}

type Link = (BufWriter<Channel>, BufReader<Channel>);

/// The page-request server: a thread that answers the destination's page requests on their
/// own connection while the stream runs (and from the moment the state is sent).
struct Server {
    handle: VmHandle,
    shared: Arc<Streaming>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
    /// The page-request connection, shut down to stop the thread.
    urgent: Channel,
}

impl Server {
    /// Starts answering requests on `urgent` for the pages of `to_come`. If serving fails
    /// before the stream has ended, the stream's side of its connection (`main`) is shut down
    /// too, or it would write into a connection nobody reads until TCP gives up (30 s); what
    /// the destination sent on it (its `Abort`, saying why) is still read.
    fn start(
        handle: &VmHandle,
        urgent: Link,
        to_come: DirtyPages,
        options: &SendOptions,
        main: &Channel,
    ) -> anyhow::Result<Server> {
        let (urgent_writer, urgent_reader) = urgent;
        let shared = Arc::new(Streaming {
            // The bitmap itself, not a walk over every page: this is inside the downtime.
            unsent: Mutex::new(to_come),
            hint: AtomicU64::new(NO_HINT),
            requests: AtomicU64::new(0),
            answered_pages: AtomicU64::new(0),
            answered_bytes: AtomicU64::new(0),
            progress: Some(Arc::clone(&options.progress)),
            streamed: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
        });
        let urgent = urgent_reader.get_ref().try_clone()?;
        let thread = {
            let handle = handle.clone();
            let shared = Arc::clone(&shared);
            let main = main.try_clone()?;
            let channel = urgent_reader.get_ref().try_clone()?;
            let holes_are_zero = options.holes_are_zero;
            std::thread::Builder::new()
                .name("postcopy-urgent".into())
                .spawn(move || {
                    let served = serve_requests(
                        &handle,
                        urgent_reader,
                        urgent_writer,
                        &shared,
                        holes_are_zero,
                    );
                    if served.is_err() {
                        // The destination learns at once that no answer will come on it.
                        channel.shutdown();
                        if !shared.streamed.load(Ordering::Acquire) {
                            main.shutdown_write();
                        }
                    }
                    served
                })?
        };
        Ok(Server {
            handle: handle.clone(),
            shared,
            thread,
            urgent,
        })
    }

    /// Stops answering (the migration did not get to its stream): the connection is shut
    /// down and the thread joined.
    fn stop(self) {
        self.shared.finishing.store(true, Ordering::Release);
        self.urgent.shutdown();
        let _ = self.thread.join();
    }
}

/// Streams the pages still to come on `main` while `server` answers page requests, until the
/// destination confirms it holds every page. Any failure shuts both connections down.
fn complete(
    options: &SendOptions,
    main: Link,
    server: Server,
    paused: &mut PausedMigration,
) -> anyhow::Result<()> {
    let (mut writer, mut reader) = main;
    let Server {
        handle,
        shared,
        thread,
        urgent: urgent_channel,
    } = server;
    let handle = &handle;
    if let Some(progress) = &paused.sent.progress {
        let left = lock(&shared.unsent).count();
        progress.phase("post-copy", left);
    }
    let main_channel = reader.get_ref().try_clone()?;
    let streamed =
        stream_pages(handle, options, &mut writer, &shared, &mut paused.sent).map_err(|e| {
            match super::send::abort_reason(&mut reader) {
                Some(reason) => anyhow::anyhow!("the destination gave up: {reason}"),
                None => e,
            }
        });
    let finished = streamed.and_then(|()| {
        shared.streamed.store(true, Ordering::Release);
        write_message(&mut writer, &Message::Done)?;
        writer.flush()?;
        // It confirms once every page is in: what the connection's buffers hold, and the pages
        // its faults asked for (answered by now). A silent one pauses the migration here, to
        // be resumed, never waited for without end.
        match read_within(&mut reader, build_timeout().max(CONFIRM_AT_LEAST))
            .context("the destination did not confirm the migration")?
        {
            Message::Done => Ok(()),
            Message::Abort(reason) => bail!("the destination gave up: {reason}"),
            other => bail!("the destination answered with {}", other.name()),
        }
    });
    shared.finishing.store(true, Ordering::Release);
    urgent_channel.shutdown();
    if finished.is_err() {
        main_channel.shutdown();
    }
    // A panic there is its failure like any other: a migration the destination confirmed
    // has completed all the same.
    let served = thread
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the page-request thread panicked")));
    paused.requests += shared.requests.load(Ordering::Relaxed);
    // Pages sent on request count as sent (the progress had them as they went).
    paused.sent.normal += shared.answered_pages.load(Ordering::Relaxed);
    paused.sent.bytes += shared.answered_bytes.load(Ordering::Relaxed);
    let finished = match (finished, served) {
        // Answering failed here (a page that cannot be read, a request that cannot be right)
        // and shut the stream down with it: that is the cause, not the stream's broken pipe.
        (Err(stream), Err(answering)) if !super::is_lost_connection(&answering) => {
            tracing::warn!("post-copy stream, stopped after the page requests failed: {stream:#}");
            Err(answering.context("answering the destination's page requests failed"))
        }
        (finished, served) => {
            if let Err(e) = served {
                tracing::warn!("post-copy page requests: {e:#}");
            }
            finished
        }
    };
    finished.context("post-copy failed")
}

const NO_HINT: u64 = u64::MAX;

/// The least time the source waits, once its stream has ended, for the destination to say
/// it holds every page: no less than the destination may wait itself for its last pages (an
/// answer to a fetch, 60 s, then any page still missing, 30 s), whatever
/// `FAULTLINE_PEER_TIMEOUT_S` says.
const CONFIRM_AT_LEAST: Duration = Duration::from_secs(120);

/// What the stream and the request server share on the source.
struct Streaming {
    /// By page index (regions back to back): the pages neither has sent yet.
    unsent: Mutex<DirtyPages>,
    /// The page index last asked for, where the stream goes on from.
    hint: AtomicU64,
    requests: AtomicU64,
    /// Pages answered on request, and the bytes their answers took on the wire.
    answered_pages: AtomicU64,
    answered_bytes: AtomicU64,
    progress: Option<Arc<Progress>>,
    /// The stream has sent every page: only the destination's answer is awaited.
    streamed: AtomicBool,
    /// The stream is done: the page-request connection is shut down on purpose.
    finishing: AtomicBool,
}

/// Sends every page not sent yet, in runs, moving to the last page asked for when there is one.
fn stream_pages(
    handle: &VmHandle,
    options: &SendOptions,
    writer: &mut BufWriter<Channel>,
    shared: &Streaming,
    sent: &mut Sent,
) -> anyhow::Result<()> {
    let ram = handle.ram();
    let mut pages_of = PageReader::new(ram, options.holes_are_zero);
    let mut next = 0u64;
    loop {
        let hint = shared.hint.swap(NO_HINT, Ordering::AcqRel);
        if hint != NO_HINT {
            next = hint;
        }
        let run = {
            let mut unsent = lock(&shared.unsent);
            let Some(run) = run_from(ram, &unsent, next, RUN_PAGES)
                .or_else(|| run_from(ram, &unsent, 0, RUN_PAGES))
            else {
                break;
            };
            unsent.unmark_range(run.first, run.count);
            next = run.first + run.count;
            run
        };
        pages_of.send_paused(writer, run.gpa, run.count, sent)?;
    }
    Ok(())
}

/// Answers page requests on the second connection until the stream side shuts it down.
fn serve_requests(
    handle: &VmHandle,
    mut reader: BufReader<Channel>,
    mut writer: BufWriter<Channel>,
    shared: &Streaming,
    holes_are_zero: bool,
) -> anyhow::Result<()> {
    let ram = handle.ram();
    let layout = layout_of(ram);
    let mut pages_of = PageReader::new(ram, holes_are_zero);
    loop {
        let message = match read_message(&mut reader) {
            Ok(message) => message,
            Err(_) if shared.finishing.load(Ordering::Acquire) => return Ok(()),
            // Kept in the chain: a connection lost, not a failure of this side's answering.
            Err(e @ ProtocolError::PeerClosed) => {
                return Err(e).context("the destination closed the page-request connection")
            }
            Err(e) => return Err(e).context("the page-request connection broke"),
        };
        message.check(&layout)?;
        if let Message::Abort(reason) = message {
            bail!("the destination refused the page-request connection: {reason}");
        }
        let Message::PageRequest { gpa, count } = message else {
            bail!(
                "unexpected {} on the page-request connection",
                message.name()
            );
        };
        let data = pages_of.read(gpa, u64::from(count))?;
        let bytes = migrate::write_pages(&mut writer, gpa, data)?;
        writer.flush()?;
        shared.requests.fetch_add(1, Ordering::Relaxed);
        shared
            .answered_pages
            .fetch_add(u64::from(count), Ordering::Relaxed);
        shared.answered_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(progress) = &shared.progress {
            progress.sent(u64::from(count), bytes);
        }
        if let Some(first) = ram.page_index(gpa) {
            lock(&shared.unsent).unmark_range(first, u64::from(count));
            shared
                .hint
                .store(first + u64::from(count), Ordering::Release);
        }
    }
}
