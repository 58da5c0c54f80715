//! The source side: pre-copy rounds, switch-over, and putting everything back if it fails.

use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use migrate::{write_message, Message, ProtocolError};
use serde::Serialize;
use snapshot::create::{state_of, Watch};
use snapshot::memory::is_zero_page;
use snapshot::state::{GuestInfo, MemoryKind};
use vmm::control::PauseError;
use vmm::throttle::Throttle;
use vmm::{DirtyMode, DirtyPages, VmError, VmHandle, PAGE_SIZE};

use super::channel::{build_timeout, read_within, Channel, REPLY_TIMEOUT};
use super::identity;
use super::pace::Pacer;
use super::progress::Progress;
use crate::locking::lock;

/// A round that sends `n` pages must leave at most `n * SHRINK_NUMERATOR / SHRINK_DENOMINATOR`
/// written again for the rounds to be worth going on unchanged: one that does not halve what
/// is left means the guest writes about as fast as the copy goes. Pre-copy then throttles the
/// guest (as QEMU's auto-converge); hybrid switches to post-copy.
const SHRINK_NUMERATOR: u64 = 1;
const SHRINK_DENOMINATOR: u64 = 2;
/// Pre-copy rounds that do not converge before the guest is throttled whether they shrink or
/// not (then a step more each round, as QEMU's auto-converge).
const THROTTLE_AFTER_ROUNDS: u32 = 2;
/// What a throttle aims at: a round leaving a quarter of what it sent.
const THROTTLE_AIM: f64 = 0.25;
/// The least a throttle takes, and the least it grows a round while rounds do not shrink.
const THROTTLE_INITIAL: u8 = 20;
const THROTTLE_STEP: u8 = 10;
/// Hybrid: the longest pause a pre-copy finish may take. A switch to post-copy pauses the
/// guest about a millisecond, so a longer pre-copy pause would only add downtime.
const HYBRID_PRE_COPY_FINISH: Duration = Duration::from_millis(2);

/// Pages read and sent as one message at most.
pub(super) const RUN_PAGES: u64 = 256;

/// Pre-copy (pages copied while the guest runs, then a short pause) or post-copy (the VM
/// moves at once, its pages follow, those it touches first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Pre,
    Post,
    /// Pre-copy rounds while each halves what is left, then post-copy for the rest (on its
    /// own, at the round limit, or when told).
    Hybrid,
}

impl Mode {
    /// As `--mode` names it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pre => "pre",
            Mode::Post => "post",
            Mode::Hybrid => "hybrid",
        }
    }
}

/// The longest pause a migration allows where it is not told (`SendOptions::downtime`).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Rounds after the first pass at most where it is not told (`SendOptions::max_rounds`).
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

/// How to migrate.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The destination, `HOST:PORT`.
    pub to: String,
    pub mode: Mode,
    /// The longest pause allowed: rounds go on until what is left would go within it.
    pub downtime: Duration,
    /// Rounds after the first full pass at most; then it switches over whatever is left.
    pub max_rounds: u32,
    /// Set to make a hybrid migration switch to post-copy at the next round's end.
    pub switch_now: Arc<AtomicBool>,
    /// Pre-copy: throttle the guest's vCPUs when rounds do not converge (else the round limit
    /// ends them, and the rest goes in a longer pause).
    pub throttle: bool,
    /// Where the migration tells what it is doing.
    pub progress: Arc<Progress>,
    /// Whether all of guest RAM is in memory, so that a hole of its memfd reads as zeros and
    /// is sent as such unread: not when a pager provides missing pages.
    pub holes_are_zero: bool,
    /// TLS with this side's certificate (`None`: plain TCP).
    pub tls: Option<super::channel::Tls>,
    /// Pre-copy: send pages at most this many bytes a second while the guest runs (`None`:
    /// as fast as the link takes them).
    pub max_bandwidth: Option<u64>,
    /// Asked to give the migration up before its switch-over.
    pub give_up: GiveUp,
}

/// A request to give a migration up while that is still safe: before its switch-over, when
/// the VM runs only here (an operator's cancel, or the VM shutting down). Looked at before
/// each run of pages the rounds send, and once more at the switch-over, which closes it.
#[derive(Debug, Clone, Default)]
pub struct GiveUp(Arc<Mutex<GiveUpState>>);

#[derive(Debug, Default)]
struct GiveUpState {
    /// Why it was asked.
    asked: Option<&'static str>,
    /// The switch-over began: too late.
    closed: bool,
}

impl GiveUpState {
    fn check(&self) -> anyhow::Result<()> {
        match self.asked {
            Some(why) => Err(GivenUp(why).into()),
            None => Ok(()),
        }
    }
}

/// The error of a migration that gave up because it was asked to (the reason it was given),
/// found in its error's chain by whoever must tell a give-up from a failure.
#[derive(Debug, thiserror::Error)]
#[error("the migration was given up: {0}")]
pub struct GivenUp(pub &'static str);

impl GivenUp {
    /// The reason `error` gave up for, if it ended in a give-up.
    pub fn reason_in(error: &anyhow::Error) -> Option<&'static str> {
        error
            .chain()
            .find_map(|cause| cause.downcast_ref::<GivenUp>())
            .map(|given_up| given_up.0)
    }
}

impl GiveUp {
    /// Asks the migration to give up (`why`, for its error); false when it is past its
    /// switch-over, too late for that.
    pub fn ask(&self, why: &'static str) -> bool {
        let mut state = lock(&self.0);
        if !state.closed {
            state.asked.get_or_insert(why);
        }
        !state.closed
    }

    /// Whether the migration is still before its switch-over.
    pub fn before_switch_over(&self) -> bool {
        !lock(&self.0).closed
    }

    /// An error if it was asked to give up.
    fn check(&self) -> anyhow::Result<()> {
        lock(&self.0).check()
    }

    /// The switch-over begins: from here the migration is not given up (an error if it was
    /// asked before).
    pub fn close(&self) -> anyhow::Result<()> {
        let mut state = lock(&self.0);
        state.closed = true;
        state.check()
    }
}

/// What a migration did, as QEMU's "info migrate" says it.
#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    pub status: &'static str,
    pub mode: &'static str,
    pub total_ms: f64,
    pub setup_ms: f64,
    pub downtime_ms: f64,
    /// The part of the downtime until this side had written the VM's state (pre-copy: with
    /// its last pages): what QEMU's `downtime` counts, which ends at the source.
    /// `downtime_ms` goes on until the destination said it runs the VM.
    pub downtime_until_state_sent_ms: f64,
    pub bytes: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    /// Pre-copy rounds after the first pass.
    pub dirty_rounds: u32,
    /// Pages the guest dirtied per second over the rounds.
    pub dirty_rate_pages_per_s: f64,
    pub pages_per_s: f64,
    pub throughput_mbit_per_s: f64,
    /// Whether the rounds shrank what was left under the downtime limit (or the round limit
    /// ended them).
    pub converged: bool,
    /// Post-copy: pages the destination asked for on the page-request connection.
    pub postcopy_requests: u64,
    /// Post-copy: how many times it was resumed after a broken connection.
    pub postcopy_recoveries: u32,
    /// Pre-copy: the most the guest's vCPUs were throttled, in percent of their time (0: not
    /// throttled).
    pub throttle_percent: u8,
    /// What ended the copy rounds: "converged" (what was left fitted the downtime limit),
    /// "round limit" (pre-copy: the last pages went in a longer pause), "not shrinking",
    /// "outpaced" (the guest wrote pages more than half as fast as the first pass sent them:
    /// it was cut short) or "told" (hybrid: post-copy took over), or "post-copy" (no rounds).
    pub ended_by: &'static str,
}

impl SendReport {
    /// The report of a completed migration.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mode: &'static str,
        ended_by: &'static str,
        started: Instant,
        setup: Duration,
        downtime: Downtime,
        sent: &Sent,
        rounds: u32,
        dirty_rate_pages_per_s: f64,
        postcopy_requests: u64,
    ) -> Self {
        let total = started.elapsed().as_secs_f64();
        SendReport {
            status: "completed",
            mode,
            total_ms: total * 1e3,
            setup_ms: setup.as_secs_f64() * 1e3,
            downtime_ms: downtime.whole.as_secs_f64() * 1e3,
            downtime_until_state_sent_ms: downtime.until_state_sent.as_secs_f64() * 1e3,
            bytes: sent.bytes,
            normal_pages: sent.normal,
            zero_pages: sent.zero,
            dirty_rounds: rounds,
            dirty_rate_pages_per_s,
            pages_per_s: (sent.normal + sent.zero) as f64 / total,
            throughput_mbit_per_s: sent.bytes as f64 * 8.0 / total / 1e6,
            converged: ended_by == "converged",
            postcopy_requests,
            postcopy_recoveries: 0,
            throttle_percent: 0,
            ended_by,
        }
    }
}

/// A migration's report (`SendReport` as JSON, as the API gives it) in words: every figure
/// it has, on three lines.
pub fn report_text(report: &serde_json::Value) -> String {
    let ms = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
    let count = |key: &str| report[key].as_u64().unwrap_or(0);
    let throttled = match count("throttle_percent") {
        0 => String::new(),
        p => format!(" (the guest was throttled by {p}%)"),
    };
    format!(
        "migrated in {:.1} ms (setup {:.1} ms, downtime {:.1} ms, the state sent after {:.1} \
         ms), {} mode; the copy rounds ended: {}{throttled}\n\
         {} bytes: {} pages, {} zero pages, {:.0} pages/s, {:.0} Mbit/s\n\
         {} dirty rounds at {:.0} pages dirtied/s; {} post-copy page requests, {} recoveries",
        ms("total_ms"),
        ms("setup_ms"),
        ms("downtime_ms"),
        ms("downtime_until_state_sent_ms"),
        report["mode"].as_str().unwrap_or("?"),
        report["ended_by"].as_str().unwrap_or("?"),
        count("bytes"),
        count("normal_pages"),
        count("zero_pages"),
        ms("pages_per_s"),
        ms("throughput_mbit_per_s"),
        count("dirty_rounds"),
        ms("dirty_rate_pages_per_s"),
        count("postcopy_requests"),
        count("postcopy_recoveries"),
    )
}

/// How long a switch-over kept the VM paused.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Downtime {
    /// Until the destination said it runs the VM (pre-copy: it acknowledged the go-ahead;
    /// post-copy: it built the VM; that word lost to a cut: it answered the resume).
    pub whole: Duration,
    /// Until this side had written the VM's state (pre-copy: with its last pages).
    pub until_state_sent: Duration,
}

/// Counters of what went on the wire (also told to the migration's progress, if any).
#[derive(Debug, Clone, Default)]
pub(super) struct Sent {
    pub bytes: u64,
    pub normal: u64,
    pub zero: u64,
    pub progress: Option<Arc<Progress>>,
}

impl Sent {
    fn add(&mut self, normal: u64, zero: u64, bytes: u64) {
        self.normal += normal;
        self.zero += zero;
        self.bytes += bytes;
        if let Some(progress) = &self.progress {
            progress.sent(normal + zero, bytes);
        }
    }
}

/// A migration that did not complete, and where that leaves the VM.
#[derive(Debug)]
pub enum SendFailure {
    /// The VM is here as before: running (or paused, if it was). Nothing of it runs
    /// elsewhere.
    Here(anyhow::Error),
    /// The connection broke once the destination had taken the VM (or may have: it did not
    /// say): the VM stays paused here and must not run here again (`postcopy-paused`).
    /// `postcopy_send::resume` completes the migration; `cancel` gives up one the destination
    /// never confirmed.
    Paused(anyhow::Error, Box<PausedMigration>),
}

impl SendFailure {
    pub fn error(&self) -> &anyhow::Error {
        match self {
            SendFailure::Here(e) | SendFailure::Paused(e, _) => e,
        }
    }

    /// The same failure, its error said to be the connection lost where it is one.
    pub(super) fn naming_a_lost_connection(self) -> Self {
        let name = |e| super::naming_a_lost_connection(e, "the destination");
        match self {
            SendFailure::Here(e) => SendFailure::Here(name(e)),
            SendFailure::Paused(e, paused) => SendFailure::Paused(name(e), paused),
        }
    }
}

impl From<anyhow::Error> for SendFailure {
    fn from(error: anyhow::Error) -> Self {
        SendFailure::Here(error)
    }
}

impl From<std::io::Error> for SendFailure {
    fn from(error: std::io::Error) -> Self {
        SendFailure::Here(error.into())
    }
}

/// A migration paused by a broken connection after the state left: what its report needs when
/// it completes.
#[derive(Debug)]
pub struct PausedMigration {
    pub mode: &'static str,
    pub(super) ended_by: &'static str,
    pub(super) started: Instant,
    pub(super) setup: Duration,
    /// When the VM was paused for the switch-over.
    pub(super) paused_at: Instant,
    pub(super) downtime: Downtime,
    pub(super) sent: Sent,
    pub(super) rounds: u32,
    /// Pages the guest dirtied per second over the rounds (0 without rounds).
    pub(super) dirty_rate_pages_per_s: f64,
    /// The most the rounds throttled the guest, in percent.
    pub(super) throttle_percent: u8,
    pub(super) requests: u64,
    /// Whether the destination said it runs the VM (if not, it may not: a cut came between
    /// the state and its answer).
    pub confirmed: bool,
    pub(super) recoveries: u32,
    /// The pages taken from the dirty log, and whether it was on before.
    pub(super) taken: Option<(DirtyPages, bool)>,
    /// Whether the migration paused the VM (a cancel resumes it only then).
    pub(super) paused_by_it: bool,
    /// The migration's name, which a resume gives the destination.
    pub(super) migration: u64,
}

/// Where a paused migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseKind {
    /// A pre-copy whose destination did not say whether it runs the VM.
    SwitchOverUnconfirmed,
    /// A pre-copy whose destination said it runs the VM (answering a resume), its end cut.
    EndCut,
    /// A post-copy (or a hybrid gone post-copy) paused by a break.
    PostCopy,
}

impl PauseKind {
    /// Its name in `GET /migration` (`status`).
    pub fn status(self) -> &'static str {
        match self {
            PauseKind::SwitchOverUnconfirmed => "switchover-unconfirmed",
            PauseKind::EndCut => "switchover-paused",
            PauseKind::PostCopy => "postcopy-paused",
        }
    }

    /// The same in words.
    pub fn describe(self) -> &'static str {
        match self {
            PauseKind::SwitchOverUnconfirmed => "the switch-over is unconfirmed",
            PauseKind::EndCut => "the switch-over is confirmed, but the migration's end was cut",
            PauseKind::PostCopy => "post-copy is paused",
        }
    }
}

impl PausedMigration {
    /// Where this paused migration stands.
    pub fn kind(&self) -> PauseKind {
        match (self.mode, self.confirmed) {
            ("pre", false) => PauseKind::SwitchOverUnconfirmed,
            ("pre", true) => PauseKind::EndCut,
            _ => PauseKind::PostCopy,
        }
    }

    /// The report of the migration, completed now.
    pub(super) fn report(&self) -> SendReport {
        let mut report = SendReport::new(
            self.mode,
            self.ended_by,
            self.started,
            self.setup,
            self.downtime,
            &self.sent,
            self.rounds,
            self.dirty_rate_pages_per_s,
            self.requests,
        );
        report.postcopy_recoveries = self.recoveries;
        report.throttle_percent = self.throttle_percent;
        report
    }
}

/// Migrates the VM behind `handle` to `options.to`. On success the VM now lives at the
/// destination and stays paused here: the caller stops it (after noting why, so that its run
/// is not taken for a failure). On failure the error says why, and where the VM is.
pub fn send(
    handle: &VmHandle,
    guest: Option<GuestInfo>,
    options: &SendOptions,
) -> Result<SendReport, SendFailure> {
    let started = Instant::now();
    let memory = handle.memory();
    let logging_before = memory.dirty_mode() != DirtyMode::Off;
    let mut taken = DirtyPages::new(handle.ram().size() / PAGE_SIZE);
    let mut paused_here = false;
    let mut result = run(
        handle,
        guest,
        options,
        started,
        &mut taken,
        &mut paused_here,
    )
    .map_err(SendFailure::naming_a_lost_connection);
    match &mut result {
        Err(SendFailure::Here(error)) => {
            // Put the VM back as it was: running if it ran, its dirty log as if nothing was
            // taken.
            put_back(handle, taken, logging_before);
            if paused_here {
                if let Err(e) = handle.resume() {
                    tracing::error!("cannot resume the VM after a failed migration: {e}");
                    // Said with the failure: the VM stays paused, and this is why.
                    let failed = std::mem::replace(error, anyhow::anyhow!("taken"));
                    *error = failed.context(format!(
                        "the VM could not be resumed after the failure ({e})"
                    ));
                }
            }
        }
        // Kept for a cancel, which puts the VM back as it was.
        Err(SendFailure::Paused(_, paused)) => paused.taken = Some((taken, logging_before)),
        Ok(_) => {}
    }
    result
}

/// Puts the dirty log back as if the migration had not taken `taken` from it (and switches
/// it off if it was off before).
fn put_back(handle: &VmHandle, taken: DirtyPages, logging_before: bool) {
    if logging_before {
        handle.return_dirty_pages(taken);
    } else if let Err(e) = handle.memory().set_dirty_logging(false) {
        tracing::warn!("cannot switch dirty logging off again: {e}");
    }
}

/// Gives up a migration that `paused` before the destination confirmed it runs the VM: the
/// operator says it does not. The VM runs here again, its dirty log as before.
pub fn cancel(handle: &VmHandle, paused: PausedMigration) -> anyhow::Result<()> {
    if paused.confirmed {
        bail!(
            "the destination confirmed that it runs the VM: it must not run here too (resume \
             the migration instead)"
        );
    }
    handle.control().set_runs_elsewhere(false);
    if let Some((taken, logging_before)) = paused.taken {
        put_back(handle, taken, logging_before);
    }
    if !paused.paused_by_it {
        // It was paused before the migration began: it stays so.
        return Ok(());
    }
    handle
        .resume()
        .context("cannot resume the VM after cancelling the migration")
}

/// Why the destination gave up, if it said so on `reader` (looked for briefly, after a write
/// to it failed).
pub(super) fn abort_reason(reader: &mut BufReader<Channel>) -> Option<String> {
    match read_within(reader, Duration::from_secs(1)) {
        Ok(Message::Abort(reason)) => Some(reason),
        _ => None,
    }
}

fn run(
    handle: &VmHandle,
    guest: Option<GuestInfo>,
    options: &SendOptions,
    started: Instant,
    taken: &mut DirtyPages,
    paused_here: &mut bool,
) -> Result<SendReport, SendFailure> {
    let (mut writer, mut reader) = connect(handle, &options.to, options.tls.as_ref())?;
    let setup = started.elapsed();
    let migration = super::new_migration_id();
    let copied = match options.mode {
        Mode::Post => None,
        Mode::Pre | Mode::Hybrid => Some(
            copy_rounds((&mut writer, &mut reader), handle, options, taken)
                .map_err(|e| with_destination_reason(e, &mut reader))?,
        ),
    };
    let goes_post = copied
        .as_ref()
        .is_none_or(|c| options.mode == Mode::Hybrid && c.ended_by != "converged");
    if goes_post {
        let (stale, ended_by, before, rounds, dirty_rate_pages_per_s) = match copied {
            None => (
                None,
                "post-copy",
                Sent {
                    progress: Some(Arc::clone(&options.progress)),
                    ..Sent::default()
                },
                0,
                0.0,
            ),
            Some(c) => (
                Some(c.pending),
                c.ended_by,
                c.sent,
                c.rounds,
                dirty_rate(c.dirtied, c.took),
            ),
        };
        return super::postcopy_send::send(super::postcopy_send::Switch {
            handle,
            guest,
            options,
            started,
            setup,
            writer,
            reader,
            paused_here,
            stale,
            taken,
            ended_by,
            before,
            rounds,
            dirty_rate_pages_per_s,
            migration,
        });
    }
    let rounds = copied.expect("pre-copy rounds ran");
    switch_over(
        handle,
        guest,
        options,
        (writer, reader),
        rounds,
        (started, setup, migration),
        taken,
        paused_here,
    )
}

/// Pre-copy's end: pause, the last pages, the state, and the destination's word that it runs
/// the VM.
#[allow(clippy::too_many_arguments)]
fn switch_over(
    handle: &VmHandle,
    guest: Option<GuestInfo>,
    options: &SendOptions,
    (mut writer, mut reader): (BufWriter<Channel>, BufReader<Channel>),
    rounds: Rounds,
    (started, setup, migration): (Instant, Duration, u64),
    taken: &mut DirtyPages,
    paused_here: &mut bool,
) -> Result<SendReport, SendFailure> {
    let Rounds {
        mut pending,
        mut sent,
        rounds,
        dirtied,
        took,
        ended_by,
        throttling,
        mut pages_of,
    } = rounds;

    // Switch-over: pause, the last pages, the state; the destination answers once it has
    // built the VM. A give-up asked before is taken now; from here it is not.
    options.give_up.close()?;
    pages_of.give_up = None;
    let paused_at = Instant::now();
    pause_for_switch(handle, paused_here)?;
    // Paused: the throttle has nothing left to slow (and must not outlive a failure).
    let throttle_percent = throttling.percent();
    drop(throttling);
    pending.merge(&take(handle, taken)?);
    options.progress.phase("switch-over", pending.count());
    // The rounds' reader (its buffer in memory already), without their cap: the guest waits.
    // It still looks at the destination before each run: it says nothing until it has built
    // the VM, unless it gives up.
    pages_of.pacer = None;
    let last = || -> anyhow::Result<()> {
        let switch_over = Message::SwitchOver {
            post_copy: false,
            migration,
        };
        write_message(&mut writer, &switch_over)?;
        send_pages(&mut writer, &mut pages_of, &pending, &mut sent)?;
        write_message(&mut writer, &state_message(handle, guest)?)?;
        write_message(&mut writer, &Message::Done)?;
        Ok(writer.flush()?)
    };
    if let Err(e) = last() {
        let e = with_destination_reason(e, &mut reader);
        // Not flushed again when dropped: that could wait as long again, the VM paused.
        Channel::discard_unsent(writer);
        return Err(e.into());
    }
    let until_state_sent = paused_at.elapsed();
    // The destination builds the VM and waits for the go-ahead before it runs it: until this
    // side gives it, a failure leaves the VM here only, and a destination that says nothing
    // (stalled, or hostile) must not keep it paused here.
    match awaited(&mut reader, "say it built the VM")? {
        Message::Built => {}
        Message::Abort(reason) => {
            return Err(anyhow::anyhow!("the destination could not take the VM: {reason}").into())
        }
        other => {
            return Err(anyhow::anyhow!(
                "the destination answered the switch-over with {}",
                other.name()
            )
            .into())
        }
    }
    // From the go-ahead on, the destination may run the VM: it must not run here again
    // unless the destination says it does not.
    handle.control().set_runs_elsewhere(true);
    let go = write_message(&mut writer, &Message::Done).and_then(|()| writer.flush());
    let mut paused = Box::new(PausedMigration {
        mode: "pre",
        ended_by,
        started,
        setup,
        paused_at,
        downtime: Downtime::default(),
        sent,
        rounds,
        dirty_rate_pages_per_s: dirty_rate(dirtied, took),
        throttle_percent,
        requests: 0,
        confirmed: false,
        recoveries: 0,
        taken: None,
        paused_by_it: *paused_here,
        migration,
    });
    let answer = match go {
        // Its answer settles where the VM runs; a silent destination leaves that open (paused
        // here), for a cancel or a resume to settle, not for ever.
        Ok(()) => read_within(&mut reader, REPLY_TIMEOUT),
        // A write that fails queued none of what it was left to send: the destination never
        // has the whole go-ahead, so it never runs the VM (it refuses without one), and the VM
        // runs on here.
        Err(e) => {
            let e = anyhow::Error::from(e).context(
                "the go-ahead could not be sent to the destination, which therefore does not run \
                 the VM",
            );
            let e = match abort_reason(&mut reader) {
                Some(reason) => e.context(format!("the destination gave up: {reason}")),
                None => e,
            };
            // Nothing more of it may go out, ever: a BufWriter dropped flushes what it holds
            // again, and a second try could complete it. Its rest is thrown away and the
            // connection's sending side shut before the VM may run here again.
            Channel::discard_unsent(writer);
            handle.control().set_runs_elsewhere(false);
            return Err(e.into());
        }
    };
    paused.downtime = Downtime {
        whole: paused_at.elapsed(),
        until_state_sent,
    };
    let unconfirmed = match answer {
        Ok(Message::Done) => None,
        Ok(Message::Abort(reason)) => {
            handle.control().set_runs_elsewhere(false);
            return Err(anyhow::anyhow!("the destination could not take the VM: {reason}").into());
        }
        Ok(other) => Some(anyhow::anyhow!(
            "the destination answered the switch-over with {}",
            other.name()
        )),
        Err(e) => {
            Some(anyhow::Error::from(e).context("the destination did not confirm the migration"))
        }
    };
    if let Some(e) = unconfirmed {
        *paused_here = false;
        return Err(SendFailure::Paused(e, paused));
    }
    Ok(paused.report())
}

/// Pages dirtied per second: `dirtied` over rounds that `took` so long.
fn dirty_rate(dirtied: u64, took: Duration) -> f64 {
    dirtied as f64 / took.as_secs_f64().max(1e-6)
}

/// The destination's answer to what this side just sent, after which it must first take what
/// the connection's buffers hold (megabytes): waited for `build_timeout()`; an error names
/// what the destination did not do (`did`), and the bound when it was silent.
fn awaited(reader: &mut BufReader<Channel>, did: &str) -> anyhow::Result<Message> {
    let patience = build_timeout();
    read_within(reader, patience).map_err(|e| {
        if e.is_timeout() {
            anyhow::anyhow!(
                "the destination did not {did} within {} s",
                patience.as_secs()
            )
        } else {
            anyhow::Error::from(e).context(format!("the destination did not {did}"))
        }
    })
}

/// Waits until the destination has taken everything sent so far (it answers a sync once it
/// has): as long as for `Built`, since what the connection's buffers hold comes first
/// (`build_timeout`; `FAULTLINE_PEER_TIMEOUT_S` for a slow link).
fn sync(writer: &mut BufWriter<Channel>, reader: &mut BufReader<Channel>) -> anyhow::Result<()> {
    write_message(writer, &Message::Sync)?;
    writer.flush()?;
    match awaited(reader, "take the pre-copy rounds")? {
        // Anything it sent after its answer is already in the buffer, where the look before
        // each run of the next round (at the socket) would not see it: it is heard now.
        Message::Sync if reader.buffer().is_empty() => Ok(()),
        Message::Sync => Err(with_destination_reason(DestinationSpoke.into(), reader)),
        Message::Abort(reason) => bail!("the destination gave up the migration: {reason}"),
        other => bail!("the destination answered a sync with {}", other.name()),
    }
}

/// What the pre-copy rounds did.
struct Rounds<'a> {
    /// Pages written since the last round took them: still to send.
    pending: DirtyPages,
    sent: Sent,
    /// Rounds after the first pass.
    rounds: u32,
    /// Pages the guest dirtied over the rounds.
    dirtied: u64,
    took: Duration,
    ended_by: &'static str,
    /// The throttle in force when the rounds ended (the most the guest was throttled): it
    /// stays until the VM is paused.
    throttling: Throttling,
    /// The reader the rounds sent with, for the last pages.
    pages_of: PageReader<'a>,
}

/// Sends every page, then rounds of those written since, until what is left fits the downtime
/// limit at the bandwidth measured, or the rounds end otherwise (`ended_by` says how).
fn copy_rounds<'a>(
    (writer, reader): (&mut BufWriter<Channel>, &mut BufReader<Channel>),
    handle: &'a VmHandle,
    options: &SendOptions,
    taken: &mut DirtyPages,
) -> anyhow::Result<Rounds<'a>> {
    handle.memory().set_dirty_logging(true)?;
    let began = Instant::now();
    let mut sent = Sent {
        progress: Some(Arc::clone(&options.progress)),
        ..Sent::default()
    };
    let mut rounds = 0u32;
    let mut dirtied = 0u64;
    let mut throttling = Throttling::default();
    // The first pass is every page, whatever the log held (it may have been on before, for
    // diff snapshots); the take starts the log's next interval.
    let mut pending = DirtyPages::all(handle.ram().size() / PAGE_SIZE);
    pending.merge(&take(handle, taken)?);
    options.progress.phase("pre-copy", pending.count());
    let mut pages_of = PageReader::new(handle.ram(), options.holes_are_zero);
    pages_of.pacer = Pacer::new(options.max_bandwidth);
    pages_of.give_up = Some(options.give_up.clone());
    pages_of.peer = Some(reader.get_ref().try_clone()?);
    let policy = RoundPolicy {
        mode: options.mode,
        downtime: options.downtime,
        max_rounds: options.max_rounds,
        throttle: options.throttle,
    };
    let ended_by = loop {
        let sent_now = pending.count();
        options.progress.round(rounds, sent_now);
        // Pages the first pass sent and the guest wrote since (later rounds have none: the
        // take after them has everything).
        let written = if rounds == 0 {
            match first_pass(
                writer,
                handle,
                options,
                &policy,
                &pending,
                &mut pages_of,
                &mut sent,
                taken,
                &mut throttling,
            )
            .context("cannot send the first pass to the destination")?
            {
                FirstPass::Whole {
                    written,
                    dirtied: during,
                } => {
                    dirtied += during;
                    Some(written)
                }
                FirstPass::Cut {
                    why,
                    left,
                    dirtied: during,
                } => {
                    dirtied += during;
                    pending = left;
                    break why;
                }
            }
        } else {
            send_pages(writer, &mut pages_of, &pending, &mut sent).with_context(|| {
                format!("cannot send pre-copy round {rounds} to the destination")
            })?;
            None
        };
        // The round ends when the destination has taken it: megabytes may still wait in the
        // sockets' buffers, and neither the bandwidth nor what is left would be true before
        // (nor would the pause hold only the last pages).
        sync(writer, reader)?;
        // Over every round so far.
        let bandwidth = sent.bytes.max(1) as f64 / began.elapsed().as_secs_f64().max(1e-6);
        pending = take(handle, taken)?;
        dirtied += pending.count();
        if let Some(written) = &written {
            pending.merge(written);
        }
        let left = pending.count();
        let round = RoundEnd {
            sent: sent_now,
            left,
            left_takes: Duration::from_secs_f64(left as f64 * PAGE_SIZE as f64 / bandwidth),
        };
        let told = options.switch_now.load(Ordering::Acquire);
        match policy.after(rounds, &round, told, throttling.percent()) {
            Next::End(why) => break why,
            Next::Round => {}
            Next::Throttle(percent) => throttling.set(handle, options, percent)?,
        }
        rounds += 1;
        write_message(
            writer,
            &Message::Round {
                round: rounds,
                pages: left,
            },
        )?;
    };
    Ok(Rounds {
        pending,
        sent,
        rounds,
        dirtied,
        took: began.elapsed(),
        ended_by,
        throttling,
        pages_of,
    })
}

/// The destination sent something in the middle of a round, or ended the connection.
#[derive(Debug, thiserror::Error)]
#[error("the destination spoke in the middle of a round, or ended the connection")]
struct DestinationSpoke;

/// `error`, which ended the sending of pages before the switch-over's answer, as what the
/// destination did, if it did something (looked for when it spoke, or a write to it failed):
/// its reason, if it gave up; the end of the connection, if it closed it (named then as a
/// connection lost).
fn with_destination_reason(error: anyhow::Error, reader: &mut BufReader<Channel>) -> anyhow::Error {
    let spoke = error.chain().any(|e| e.is::<DestinationSpoke>());
    if !spoke && !error.chain().any(|e| e.is::<std::io::Error>()) {
        return error;
    }
    match read_within(reader, Duration::from_secs(1)) {
        Ok(Message::Abort(reason)) => {
            anyhow::anyhow!("the destination gave up the migration: {reason}")
        }
        Ok(other) if spoke => anyhow::anyhow!(
            "the destination sent {} while this side sent pages",
            other.name()
        ),
        Err(end) if spoke && !end.is_timeout() => anyhow::Error::from(end)
            .context("the destination's connection ended while this side sent pages"),
        _ => error,
    }
}

/// Pages of the first pass sent between two looks at what the guest writes meanwhile: 64 MiB,
/// or a 64th of RAM when that is more (each look reads bitmaps of all of RAM).
const FIRST_PASS_PART: u64 = 16384;
const FIRST_PASS_LOOKS: u64 = 64;

/// How the first pass went.
enum FirstPass {
    /// Every page went; `written` are the pages sent and written since (more may be in the
    /// dirty log), `dirtied` the pages the guest wrote meanwhile.
    Whole { written: DirtyPages, dirtied: u64 },
    /// The policy ended the rounds part way, saying why: `left` is every page still to send
    /// (those not sent yet, and those sent and written since).
    Cut {
        why: &'static str,
        left: DirtyPages,
        dirtied: u64,
    },
}

/// The first pass over `pending` (every page), in parts of [`FIRST_PASS_PART`] pages: after
/// each, what the guest wrote meanwhile against what was sent says early what the rounds
/// will do (`RoundPolicy::during_first_pass`): a hybrid migration whose guest writes as fast
/// as the pass sends goes post-copy without finishing it, and a pre-copy throttles the guest
/// without waiting for the pass to end.
#[allow(clippy::too_many_arguments)]
fn first_pass<W: Write>(
    writer: &mut W,
    handle: &VmHandle,
    options: &SendOptions,
    policy: &RoundPolicy,
    pending: &DirtyPages,
    pages_of: &mut PageReader<'_>,
    sent: &mut Sent,
    taken: &mut DirtyPages,
    throttling: &mut Throttling,
) -> anyhow::Result<FirstPass> {
    let total = pending.pages();
    let part_pages = FIRST_PASS_PART.max(total / FIRST_PASS_LOOKS);
    let mut written = DirtyPages::new(total);
    // What the guest wrote during the part before: pages it writes again and again (its
    // working set) are not what makes a pass fall behind, pages it has not written lately are.
    let mut before: Option<DirtyPages> = None;
    let mut dirtied = 0;
    let mut from = 0;
    while from < total {
        let to = from.saturating_add(part_pages).min(total);
        let part = pending.within(from..to);
        send_pages(writer, pages_of, &part, sent)?;
        if to == total {
            break;
        }
        // Pages written meanwhile that were sent already must go again; the others are sent
        // later in this pass, as they are then.
        let now = take(handle, taken)?;
        dirtied += now.count();
        written.merge(&now.within(0..to));
        let told = options.switch_now.load(Ordering::Acquire);
        let fresh = before.as_ref().map(|b| now.count_outside(b));
        before = Some(now);
        match policy.during_first_pass(part.count(), fresh, told, throttling.percent()) {
            Next::End(why) => {
                let mut left = written;
                left.merge(&pending.within(to..total));
                return Ok(FirstPass::Cut { why, left, dirtied });
            }
            Next::Round => {}
            Next::Throttle(percent) => throttling.set(handle, options, percent)?,
        }
        from = to;
    }
    Ok(FirstPass::Whole { written, dirtied })
}

/// The throttle a pre-copy put on the guest, if any (it only ever grows: its percent is the
/// most it took).
#[derive(Default)]
struct Throttling {
    throttle: Option<Throttle>,
}

impl Throttling {
    fn percent(&self) -> u8 {
        self.throttle.as_ref().map_or(0, Throttle::percent)
    }

    /// Throttles the guest behind `handle` by `percent` (starting the throttle if need be).
    fn set(&mut self, handle: &VmHandle, options: &SendOptions, percent: u8) -> anyhow::Result<()> {
        match &self.throttle {
            None => {
                self.throttle = Some(
                    Throttle::start(Arc::clone(handle.control()), percent)
                        .context("cannot start throttling the guest")?,
                )
            }
            Some(t) => t.set(percent),
        }
        let now = self.percent();
        options.progress.throttled(now);
        tracing::info!("pre-copy: not converging, the guest is throttled by {now}%");
        Ok(())
    }
}

/// How a pre-copy round ended.
#[derive(Debug, Clone, Copy)]
struct RoundEnd {
    /// Pages it sent.
    sent: u64,
    /// Pages written since it began: what is left to send.
    left: u64,
    /// How long sending those would take, at the bandwidth measured.
    left_takes: Duration,
}

/// What comes after a pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The rounds end, and why ("converged": what is left goes in the pause).
    End(&'static str),
    /// Another round.
    Round,
    /// Another round, the guest throttled by this many percent first.
    Throttle(u8),
}

/// When the rounds of a pre-copy or hybrid migration end.
struct RoundPolicy {
    mode: Mode,
    downtime: Duration,
    max_rounds: u32,
    throttle: bool,
}

impl RoundPolicy {
    /// What follows a part of the first pass that sent `sent` pages while the guest wrote
    /// `fresh` pages it had not written during the part before (`None` for the first part:
    /// nothing to tell them from yet), with the guest throttled by `throttled` percent;
    /// `told` when a hybrid migration was told to switch. A guest that keeps writing new
    /// pages more than half as fast as the pass sends them will not let the rounds halve
    /// what is left; one that rewrites the same pages only leaves those.
    fn during_first_pass(&self, sent: u64, fresh: Option<u64>, told: bool, throttled: u8) -> Next {
        let hybrid = self.mode == Mode::Hybrid;
        if hybrid && told {
            return Next::End("told");
        }
        let Some(written) = fresh else {
            return Next::Round;
        };
        let keeping_up = written * SHRINK_DENOMINATOR > sent * SHRINK_NUMERATOR;
        if !keeping_up {
            return Next::Round;
        }
        if hybrid {
            return Next::End("outpaced");
        }
        if self.throttle {
            return Next::Throttle(throttle_for(throttled, written as f64 / sent.max(1) as f64));
        }
        Next::Round
    }

    /// What follows round `round` (0: the first pass), which ended as `end`, with the guest
    /// throttled by `throttled` percent; `told` when a hybrid migration was told to switch.
    fn after(&self, round: u32, end: &RoundEnd, told: bool, throttled: u8) -> Next {
        let hybrid = self.mode == Mode::Hybrid;
        // Hybrid finishes in pre-copy only if that pauses no longer than a switch to
        // post-copy would.
        let finish_within = if hybrid {
            self.downtime.min(HYBRID_PRE_COPY_FINISH)
        } else {
            self.downtime
        };
        if end.left_takes <= finish_within {
            return Next::End("converged");
        }
        if hybrid && told {
            return Next::End("told");
        }
        let shrinking = end.left * SHRINK_DENOMINATOR <= end.sent * SHRINK_NUMERATOR;
        if hybrid && !shrinking {
            return Next::End("not shrinking");
        }
        if round >= self.max_rounds {
            return Next::End("round limit");
        }
        if !hybrid && self.throttle && (!shrinking || round + 1 >= THROTTLE_AFTER_ROUNDS) {
            let left_share = end.left as f64 / end.sent.max(1) as f64;
            return Next::Throttle(throttle_for(throttled, left_share));
        }
        Next::Round
    }
}

/// The throttle (percent of the vCPUs' time taken) for a guest throttled by `percent` whose
/// last round left `left_share` of the pages it sent written again: the share of time the
/// guest runs is cut in proportion, so that the next round leaves about [`THROTTLE_AIM`]; and
/// it grows by [`THROTTLE_STEP`] at least.
fn throttle_for(percent: u8, left_share: f64) -> u8 {
    let runs = f64::from(100 - percent.min(100));
    let aimed = 100.0 - runs * (THROTTLE_AIM / left_share.max(THROTTLE_AIM));
    let stepped = percent.saturating_add(THROTTLE_STEP).max(THROTTLE_INITIAL);
    (aimed.ceil() as u8)
        .max(stepped)
        .min(vmm::throttle::MAX_THROTTLE_PERCENT)
}

/// Pauses the VM for the switch-over (one paused already stays so, and is not resumed if the
/// migration fails).
pub(super) fn pause_for_switch(handle: &VmHandle, paused_here: &mut bool) -> anyhow::Result<()> {
    match handle.pause() {
        Ok(_) => *paused_here = true,
        Err(VmError::Pause(PauseError::AlreadyPaused)) => {}
        Err(e) => return Err(e).context("cannot pause the VM for the switch-over"),
    }
    Ok(())
}

/// The paused VM's state, as the message that carries it.
pub(super) fn state_message(
    handle: &VmHandle,
    guest: Option<GuestInfo>,
) -> anyhow::Result<Message> {
    let machine = handle
        .paused_state()
        .context("cannot read the paused VM's state")?;
    let state = state_of(
        machine,
        handle.ram(),
        guest,
        Watch::of(handle.memory()),
        MemoryKind::Full,
        None,
    );
    let payload = snapshot::state::encode(Path::new("the migration stream"), &state)?;
    Ok(Message::State(payload))
}

/// How long connecting to a destination may take (an address nothing answers at would
/// otherwise take the kernel's SYN retries, about two minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection to `to` (`HOST:PORT`), trying each address it names for `timeout`.
fn connect_within(to: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for addr in to.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the name has no address")))
}

/// What went wrong in the hello exchange: a silence is named as such, and so is a
/// destination that speaks TLS to a plain source (it answers the hello with an alert record,
/// whose first bytes are a record type and 0x03).
fn hello_failure(error: anyhow::Error) -> anyhow::Error {
    match error.downcast_ref::<ProtocolError>() {
        Some(e) if e.is_timeout() => error.context(format!(
            "the destination did not answer the hello within {} s",
            REPLY_TIMEOUT.as_secs()
        )),
        Some(ProtocolError::BadMagic {
            found: [0x15 | 0x16, 0x03, ..],
        }) => error.context("the destination speaks TLS: give this side --tls-dir too"),
        Some(_) => error.context("the hello exchange with the destination failed"),
        None => error,
    }
}

/// Connects to the destination at `to` and exchanges hellos: the connection's two halves.
pub(super) fn connect(
    handle: &VmHandle,
    to: &str,
    tls: Option<&super::channel::Tls>,
) -> anyhow::Result<(BufWriter<Channel>, BufReader<Channel>)> {
    let tcp = connect_within(to, CONNECT_TIMEOUT)
        .with_context(|| format!("cannot connect to the destination {to}"))?;
    let host = to
        .rsplit_once(':')
        .map_or(to, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let channel = super::channel::open(tcp, tls, host)
        .with_context(|| format!("cannot open a channel to {to}"))?;
    // Small messages are gathered; a run of pages (up to 1 MiB) is larger than the buffer, so
    // it goes to the socket straight, without a copy into the buffer first.
    let mut writer = BufWriter::with_capacity(64 << 10, channel.try_clone()?);
    let mut reader = BufReader::new(channel);
    let ours = identity(handle.ram(), handle.vcpu_count())?;
    let mut exchange = || -> anyhow::Result<Message> {
        write_message(&mut writer, &Message::Hello(ours.clone()))?;
        writer.flush()?;
        // A destination that does not answer must not hold the VM (or the API) forever.
        Ok(read_within(&mut reader, REPLY_TIMEOUT)?)
    };
    // A TLS session that failed says why better than the end of the channel it leaves.
    let answer = exchange().map_err(|e| match reader.get_ref().failure() {
        Some(why) => anyhow::anyhow!(why),
        None => hello_failure(e),
    });
    match answer? {
        Message::Hello(theirs) => ours
            .check_matches(&theirs)
            .context("the destination cannot take this VM")?,
        Message::Abort(reason) => bail!("the destination refused the migration: {reason}"),
        other => bail!("the destination answered the hello with {}", other.name()),
    }
    Ok((writer, reader))
}

/// The dirty pages since the last take (also kept in `taken`, to give back on failure).
pub(super) fn take(handle: &VmHandle, taken: &mut DirtyPages) -> anyhow::Result<DirtyPages> {
    let pages = handle.take_dirty_pages()?;
    taken.merge(&pages);
    Ok(pages)
}

/// Sends the pages of `pages`: runs of contiguous pages with data as page messages, zero pages
/// as ranges.
pub(super) fn send_pages<W: Write>(
    writer: &mut W,
    pages_of: &mut PageReader<'_>,
    pages: &DirtyPages,
    sent: &mut Sent,
) -> anyhow::Result<()> {
    for (gpa, count) in super::page_runs(pages_of.ram, pages, RUN_PAGES) {
        pages_of.send(writer, gpa, count, sent)?;
    }
    Ok(())
}

/// Reads runs of guest pages and sends them.
pub(super) struct PageReader<'a> {
    ram: &'a vmm::GuestRam,
    buffer: Vec<u8>,
    /// Whether a hole of RAM's memfd reads as zeros: not when a pager provides missing pages
    /// (a lazily restored VM's are in its snapshot).
    holes_are_zero: bool,
    /// Holds the pages sent through this reader to a cap (`--max-bandwidth`).
    pacer: Option<Pacer>,
    /// Looked at before each run (the rounds' reader: a give-up is still safe while it sends).
    give_up: Option<GiveUp>,
    /// The connection from the destination, looked at before each run of the rounds: in the
    /// middle of a round a destination speaks only to give up (or it has gone), and the
    /// source stops at once to hear why, instead of sending the rest of the round to no one.
    peer: Option<Channel>,
    /// Each region's memfd data extents, found by the first [`send_paused`](Self::send_paused)
    /// run in it.
    data_extents: std::collections::HashMap<usize, Vec<(u64, u64)>>,
    /// Pages `send_paused` read in place, not copied (for the tests to tell the two apart).
    #[cfg(test)]
    read_in_place: u64,
}

impl<'a> PageReader<'a> {
    pub(super) fn new(ram: &'a vmm::GuestRam, holes_are_zero: bool) -> Self {
        PageReader {
            ram,
            buffer: vec![0u8; (RUN_PAGES * PAGE_SIZE) as usize],
            holes_are_zero,
            pacer: None,
            give_up: None,
            peer: None,
            data_extents: std::collections::HashMap::new(),
            #[cfg(test)]
            read_in_place: 0,
        }
    }

    /// The `count` pages of guest RAM from `gpa`, read with a system call: a page that
    /// cannot be had (a poisoned one) is an error, not a signal. With every page in the memfd
    /// (no pager) they are read from it, which costs a third less than reading the guest's
    /// mapping through `process_vm_readv` (no pinning of each page); behind a pager a missing
    /// page must be faulted in through the mapping.
    pub(super) fn read(&mut self, gpa: u64, count: u64) -> anyhow::Result<&[u8]> {
        use std::os::unix::fs::FileExt;
        let len = count * PAGE_SIZE;
        let (_, region) = self
            .ram
            .region_at(gpa, len)
            .context("a page to send is not RAM")?;
        if self.buffer.len() < len as usize {
            self.buffer.resize(len as usize, 0);
        }
        let data = &mut self.buffer[..len as usize];
        let read = if self.holes_are_zero {
            region.memfd_file().read_exact_at(data, gpa - region.gpa())
        } else {
            vmm::memory::read_host((region.host_addr() as u64) + (gpa - region.gpa()), data)
        };
        read.with_context(|| format!("cannot read guest RAM at {gpa:#x}"))?;
        Ok(data)
    }

    /// Reads `count` pages of guest RAM from `gpa` and sends them.
    pub(super) fn send<W: Write>(
        &mut self,
        writer: &mut W,
        gpa: u64,
        count: u64,
        sent: &mut Sent,
    ) -> anyhow::Result<()> {
        if let Some(give_up) = &self.give_up {
            give_up.check()?;
        }
        if self.peer.as_ref().is_some_and(Channel::has_news) {
            return Err(DestinationSpoke.into());
        }
        if self.holes_are_zero && self.ram.is_hole(gpa, count * PAGE_SIZE) {
            // Never written (or punched out): zeros, without reading a byte.
            return send_zeros(writer, sent, gpa, count);
        }
        if let Some(pacer) = &mut self.pacer {
            pacer.take(count * PAGE_SIZE);
        }
        let data = self.read(gpa, count)?;
        send_run(writer, sent, gpa, data)
    }
}

impl PageReader<'_> {
    /// [`send`](Self::send) for a VM paused until the migration ends (a post-copy's stream):
    /// on a plain TCP channel with every page in the memfd, pages are sent from the memfd's
    /// page cache (sendfile), after a zero check and a checksum where they lie if they are
    /// mapped (else of a copy read with pread), so that this side copies none of them;
    /// otherwise as `send`. (A running guest could change a page between its checksum and
    /// its sending: the rounds never come here.)
    pub(super) fn send_paused(
        &mut self,
        writer: &mut BufWriter<Channel>,
        gpa: u64,
        count: u64,
        sent: &mut Sent,
    ) -> anyhow::Result<()> {
        if !self.holes_are_zero || !writer.get_ref().can_send_file() {
            return self.send(writer, gpa, count, sent);
        }
        // (A post-copy's stream has neither a give-up to look at nor a cap: its VM waits.)
        let len = count * PAGE_SIZE;
        let (index, region) = self
            .ram
            .region_at(gpa, len)
            .context("a page to send is not RAM")?;
        let memfd = region.memfd_file();
        let data_extents = match self.data_extents.entry(index) {
            std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
            // Once per region: the VM is paused, so its memfd's holes stay where they are.
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert(
                pager::data_extents(&*memfd, region.size())
                    .context("cannot find guest RAM's data")?,
            ),
        };
        for (at, extent, data) in extents_within(data_extents, gpa - region.gpa(), len) {
            let extent_gpa = region.gpa() + at;
            if !data {
                // A hole: zeros, without reading a byte (nor allocating one, as a read of
                // the mapping would).
                send_zeros(writer, sent, extent_gpa, extent / PAGE_SIZE)?;
                continue;
            }
            let mapped = self.ram.is_mapped(extent_gpa, extent);
            let bytes: &[u8] = if mapped {
                // Every page is in this process's page tables, so a read of them now takes
                // no fault (no swap-in that could fail; a page a memory error took is
                // unmapped). Reading them in place saves copying the extent before its zero
                // check and checksums (the pages themselves go from the page cache): a third
                // of a 1 GiB post-copy source's CPU. A page reclaimed (or newly poisoned)
                // between the check and the read could still fault, so every read of them
                // follows the check at once, before anything is sent. Such a fault is a
                // SIGBUS, whose handler ends the process: after the switch-over, the VM's
                // pages not yet at the destination are then lost with it.
                // SAFETY: `[at, at + extent)` of the region is mapped at `host_addr() + at`
                // for as long as `self.ram` lives, and the VM is paused until the migration
                // ends (this method's contract), so nothing writes these pages while the
                // slice is read (a userfaultfd still registered on RAM, as a VM that arrived
                // by post-copy keeps, only ever fills missing pages, never these mapped ones).
                unsafe {
                    std::slice::from_raw_parts(
                        (region.host_addr() + at as usize) as *const u8,
                        extent as usize,
                    )
                }
            } else {
                // Read with a system call, as every other page reader here does: a page that
                // cannot be had is an error, not a signal.
                self.read(extent_gpa, extent / PAGE_SIZE)?
            };
            // The zero runs and each data run's header (its checksum), all read now.
            let runs = zero_runs(bytes)
                .map(|(first, pages, zero)| {
                    let run = &bytes
                        [(first * PAGE_SIZE) as usize..((first + pages) * PAGE_SIZE) as usize];
                    let header = (!zero)
                        .then(|| migrate::pages_header(extent_gpa + first * PAGE_SIZE, run))
                        .transpose()?;
                    Ok((first, pages, header))
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            #[cfg(test)]
            if mapped {
                self.read_in_place += extent / PAGE_SIZE;
            }
            for (first, pages, header) in runs {
                let run_gpa = extent_gpa + first * PAGE_SIZE;
                let Some(header) = header else {
                    send_zeros(writer, sent, run_gpa, pages)?;
                    continue;
                };
                writer.write_all(&header)?;
                writer.flush()?;
                writer
                    .get_ref()
                    .send_file(&memfd, at + first * PAGE_SIZE, pages * PAGE_SIZE)?;
                sent.add(pages, 0, header.len() as u64 + pages * PAGE_SIZE);
            }
        }
        Ok(())
    }
}

/// The runs of zero and of other pages in `data` (whole pages): (first page, pages, zero).
fn zero_runs(data: &[u8]) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
    let page = PAGE_SIZE as usize;
    let pages = data.len() / page;
    let is_zero = move |i: usize| is_zero_page(&data[i * page..(i + 1) * page]);
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= pages {
            return None;
        }
        let zero = is_zero(i);
        let first = i;
        i += 1;
        while i < pages && is_zero(i) == zero {
            i += 1;
        }
        Some((first as u64, (i - first) as u64, zero))
    })
}

/// The data extents and holes of `[offset, offset + len)` (page aligned), in order, given
/// the file's data extents `data` (sorted `[start, end)`): (offset, length, whether data).
fn extents_within(data: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let mut extents = Vec::new();
    let mut at = offset;
    // The first data extent that ends past `offset`.
    let first = data.partition_point(|&(_, data_end)| data_end <= offset);
    for &(start, data_end) in &data[first..] {
        if at >= end {
            break;
        }
        // Data is found a page at a time at least: a partial page reads as data.
        let start = (start - start % PAGE_SIZE).clamp(at, end);
        let data_end = data_end.next_multiple_of(PAGE_SIZE).min(end);
        if start > at {
            extents.push((at, start - at, false));
        }
        if data_end > start {
            extents.push((start, data_end - start, true));
        }
        at = at.max(data_end);
    }
    if at < end {
        extents.push((at, end - at, false));
    }
    extents
}

/// Sends the pages of `data` (read from `gpa` on): zero pages as ranges, the others as runs.
fn send_run<W: Write>(
    writer: &mut W,
    sent: &mut Sent,
    gpa: u64,
    data: &[u8],
) -> anyhow::Result<()> {
    for (first, pages, zero) in zero_runs(data) {
        let at = gpa + first * PAGE_SIZE;
        if zero {
            send_zeros(writer, sent, at, pages)?;
        } else {
            // Straight from the buffer the pages were read into: no copy of their own.
            let run = &data[(first * PAGE_SIZE) as usize..((first + pages) * PAGE_SIZE) as usize];
            let bytes = migrate::write_pages(writer, at, run)?;
            sent.add(pages, 0, bytes);
        }
    }
    Ok(())
}

/// Sends `count` zero pages from `gpa` as one range.
fn send_zeros<W: Write>(
    writer: &mut W,
    sent: &mut Sent,
    gpa: u64,
    count: u64,
) -> anyhow::Result<()> {
    let message = Message::ZeroPages { gpa, count };
    write_message(writer, &message)?;
    sent.add(0, count, message.wire_len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_named_by_its_mode_and_whether_the_destination_confirmed() {
        let paused = |mode, confirmed| PausedMigration {
            mode,
            ended_by: "converged",
            started: Instant::now(),
            setup: Duration::ZERO,
            paused_at: Instant::now(),
            downtime: Downtime::default(),
            sent: Sent::default(),
            rounds: 0,
            dirty_rate_pages_per_s: 0.0,
            throttle_percent: 0,
            requests: 0,
            confirmed,
            recoveries: 0,
            taken: None,
            paused_by_it: true,
            migration: 1,
        };
        assert_eq!(
            paused("pre", false).kind().status(),
            "switchover-unconfirmed"
        );
        // Confirmed by the answer to a resume, then cut again: not unconfirmed any more.
        assert_eq!(paused("pre", true).kind().status(), "switchover-paused");
        for mode in ["post", "hybrid"] {
            for confirmed in [false, true] {
                assert_eq!(paused(mode, confirmed).kind().status(), "postcopy-paused");
            }
        }
    }

    #[test]
    fn the_report_in_words_has_every_figure() {
        let report = SendReport {
            status: "completed",
            mode: "hybrid",
            total_ms: 1234.5,
            setup_ms: 2.5,
            downtime_ms: 1.5,
            downtime_until_state_sent_ms: 0.5,
            bytes: 4_321_000,
            normal_pages: 1001,
            zero_pages: 2002,
            dirty_rounds: 3,
            dirty_rate_pages_per_s: 4004.0,
            pages_per_s: 5005.0,
            throughput_mbit_per_s: 606.0,
            converged: false,
            postcopy_requests: 77,
            postcopy_recoveries: 2,
            throttle_percent: 40,
            ended_by: "not shrinking",
        };
        let text = report_text(&serde_json::json!(report));
        for figure in [
            "1234.5 ms",
            "setup 2.5 ms",
            "downtime 1.5 ms",
            "after 0.5 ms",
            "hybrid mode",
            "ended: not shrinking",
            "throttled by 40%",
            "4321000 bytes",
            "1001 pages",
            "2002 zero pages",
            "5005 pages/s",
            "606 Mbit/s",
            "3 dirty rounds",
            "4004 pages dirtied/s",
            "77 post-copy page requests",
            "2 recoveries",
        ] {
            assert!(text.contains(figure), "{figure:?} missing from {text:?}");
        }
    }

    fn policy(mode: Mode) -> RoundPolicy {
        RoundPolicy {
            mode,
            downtime: Duration::from_millis(300),
            max_rounds: 30,
            throttle: true,
        }
    }

    fn end(sent: u64, left: u64, left_ms: u64) -> RoundEnd {
        RoundEnd {
            sent,
            left,
            left_takes: Duration::from_millis(left_ms),
        }
    }

    #[test]
    fn pre_copy_converges_once_what_is_left_fits_the_downtime() {
        let pre = policy(Mode::Pre);
        assert_eq!(
            pre.after(3, &end(1000, 900, 300), false, 0),
            Next::End("converged")
        );
        assert_eq!(pre.after(0, &end(1000, 400, 301), false, 0), Next::Round);
    }

    #[test]
    fn pre_copy_throttles_after_a_round_that_does_not_halve_what_is_left() {
        let pre = policy(Mode::Pre);
        // The first pass already: the guest wrote nearly everything it sent again.
        assert!(matches!(
            pre.after(0, &end(1000, 990, 900), false, 0),
            Next::Throttle(p) if p >= 75
        ));
        // A first pass that halved it needs none yet; after two rounds that do not
        // converge, each round adds a step at least.
        assert_eq!(pre.after(0, &end(1000, 500, 400), false, 0), Next::Round);
        assert_eq!(
            pre.after(1, &end(1000, 500, 400), false, 0),
            Next::Throttle(50)
        );
        assert_eq!(
            pre.after(2, &end(1000, 100, 400), false, 75),
            Next::Throttle(85)
        );
        // Without the throttle, only the round limit ends it.
        let unthrottled = RoundPolicy {
            throttle: false,
            ..policy(Mode::Pre)
        };
        assert_eq!(
            unthrottled.after(2, &end(1000, 990, 900), false, 0),
            Next::Round
        );
        assert_eq!(
            unthrottled.after(30, &end(1000, 990, 900), false, 0),
            Next::End("round limit")
        );
    }

    #[test]
    fn hybrid_goes_post_copy_rather_than_pause_long() {
        let hybrid = policy(Mode::Hybrid);
        // What is left fits the 300 ms limit, but a pre-copy pause would last 250 ms: a
        // switch to post-copy pauses about a millisecond.
        assert_eq!(
            hybrid.after(1, &end(1000, 900, 250), false, 0),
            Next::End("not shrinking")
        );
        assert_eq!(hybrid.after(1, &end(1000, 400, 250), false, 0), Next::Round);
        assert_eq!(
            hybrid.after(1, &end(1000, 400, 250), true, 0),
            Next::End("told")
        );
        // Nothing, or next to nothing, left: it finishes in pre-copy.
        assert_eq!(
            hybrid.after(0, &end(1000, 0, 0), false, 0),
            Next::End("converged")
        );
        assert_eq!(
            hybrid.after(0, &end(1000, 3, 1), false, 0),
            Next::End("converged")
        );
        // Hybrid never throttles.
        assert_eq!(hybrid.after(2, &end(1000, 400, 250), false, 0), Next::Round);
    }

    #[test]
    fn the_first_pass_tells_early_a_guest_that_writes_as_fast_as_it_sends() {
        let (pre, hybrid) = (policy(Mode::Pre), policy(Mode::Hybrid));
        // A guest that writes fewer new pages than half of those sent meanwhile: go on.
        assert_eq!(
            pre.during_first_pass(1000, Some(500), false, 0),
            Next::Round
        );
        assert_eq!(
            hybrid.during_first_pass(1000, Some(500), false, 0),
            Next::Round
        );
        // One that writes as many: hybrid goes post-copy, pre-copy throttles it now.
        assert_eq!(
            hybrid.during_first_pass(1000, Some(1000), false, 0),
            Next::End("outpaced")
        );
        assert_eq!(
            pre.during_first_pass(1000, Some(1000), false, 0),
            Next::Throttle(75)
        );
        let unthrottled = RoundPolicy {
            throttle: false,
            ..policy(Mode::Pre)
        };
        assert_eq!(
            unthrottled.during_first_pass(1000, Some(1000), false, 0),
            Next::Round
        );
        // The first part has nothing to tell new pages from: go on.
        assert_eq!(hybrid.during_first_pass(1000, None, false, 0), Next::Round);
        // Told to switch: a hybrid one does so at once.
        assert_eq!(
            hybrid.during_first_pass(1000, None, true, 0),
            Next::End("told")
        );
        assert_eq!(pre.during_first_pass(1000, Some(0), true, 0), Next::Round);
    }

    #[test]
    fn extents_within_a_range_are_cut_to_it_and_to_whole_pages() {
        let page = PAGE_SIZE;
        let data = [
            (2 * page, 4 * page),
            (6 * page + 100, 8 * page),
            (20 * page, 30 * page),
        ];
        // Holes, data, a hole, data from a partial page on, to the end of the range.
        assert_eq!(
            extents_within(&data, 0, 10 * page),
            vec![
                (0, 2 * page, false),
                (2 * page, 2 * page, true),
                (4 * page, 2 * page, false),
                (6 * page, 2 * page, true),
                (8 * page, 2 * page, false),
            ]
        );
        // Inside one extent; inside one hole; one that starts in data and ends in a hole.
        assert_eq!(
            extents_within(&data, 21 * page, 3 * page),
            vec![(21 * page, 3 * page, true)]
        );
        assert_eq!(
            extents_within(&data, 10 * page, 4 * page),
            vec![(10 * page, 4 * page, false)]
        );
        assert_eq!(
            extents_within(&data, 3 * page, 2 * page),
            vec![(3 * page, page, true), (4 * page, page, false)]
        );
        assert_eq!(extents_within(&[], 0, page), vec![(0, page, false)]);
    }

    #[test]
    fn a_paused_vm_s_pages_go_from_the_page_cache_each_as_it_is() {
        use std::net::{TcpListener, TcpStream};
        use std::os::unix::fs::FileExt;
        let size = 4 << 20;
        let ram = vmm::GuestRam::new(size).unwrap();
        let memfd = ram.regions()[0].memfd_file();
        let page = PAGE_SIZE;
        // Data, a page written as zeros (data to the file, zero to the wire), holes; runs
        // of 256 pages that mix them, and a data extent across two runs.
        // Pages written through the mapping are read in place, the others (only in the
        // memfd: a read of the mapping would fault) with pread: a data extent is read in
        // place only if every page of it is mapped (256..270 and 300, not 249..256).
        let mut data_pages = 0;
        for index in (1..4).chain(250..270).chain([300, 1023]) {
            let bytes = [index as u8 | 1; 4096];
            if (250..270).contains(&index) || index == 300 {
                vm_memory::Bytes::write_slice(
                    ram.memory(),
                    &bytes,
                    vm_memory::GuestAddress(index * page),
                )
                .unwrap();
            } else {
                memfd.write_all_at(&bytes, index * page).unwrap();
            }
            data_pages += 1;
        }
        // Zeros after data, and before it in the same extent.
        memfd.write_all_at(&[0; 4096], 4 * page).unwrap();
        memfd.write_all_at(&[0; 4096], 249 * page).unwrap();
        memfd.write_all_at(&[7], 600 * page + 4095).unwrap();
        data_pages += 1;

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let arrived = std::thread::spawn(move || {
            let mut image = vec![0xeeu8; size as usize];
            let mut reader = std::io::BufReader::new(server);
            loop {
                match migrate::read_message(&mut reader) {
                    Ok(Message::Pages { gpa, data }) => {
                        image[gpa as usize..gpa as usize + data.len()].copy_from_slice(&data)
                    }
                    Ok(Message::ZeroPages { gpa, count }) => {
                        image[gpa as usize..(gpa + count * PAGE_SIZE) as usize].fill(0)
                    }
                    Ok(other) => panic!("{} in a page stream", other.name()),
                    Err(ProtocolError::PeerClosed) => return image,
                    Err(e) => panic!("{e}"),
                }
            }
        });
        let mut writer = BufWriter::new(Channel::Tcp(client));
        let mut pages_of = PageReader::new(&ram, true);
        let mut sent = Sent::default();
        for first in (0..size / page).step_by(RUN_PAGES as usize) {
            pages_of
                .send_paused(&mut writer, first * page, RUN_PAGES, &mut sent)
                .unwrap();
        }
        writer.flush().unwrap();
        drop(writer);
        let image = arrived.join().unwrap();
        let mut expected = vec![0u8; size as usize];
        memfd.read_exact_at(&mut expected, 0).unwrap();
        assert!(image == expected, "the pages that came differ from RAM's");
        assert_eq!(sent.normal, data_pages);
        assert_eq!(pages_of.read_in_place, 14 + 1, "the extents read in place");
        assert_eq!(sent.zero, size / page - data_pages);
        // Nothing was allocated for the holes.
        assert_eq!(
            pager::data_extents(&*memfd, size).unwrap().len(),
            5,
            "the holes were read"
        );
    }

    #[test]
    fn the_throttle_grows_with_what_rounds_leave() {
        // Everything written again: the guest keeps a quarter of its time.
        assert_eq!(throttle_for(0, 1.0), 75);
        // Half written again, already throttled by 50: half of the half it runs is taken.
        assert_eq!(throttle_for(50, 0.5), 75);
        // Little left: at least the initial throttle, then a step more each time.
        assert_eq!(throttle_for(0, 0.3), THROTTLE_INITIAL);
        assert_eq!(throttle_for(40, 0.26), 50);
        // Never all of the guest's time.
        assert_eq!(throttle_for(95, 1.0), vmm::throttle::MAX_THROTTLE_PERCENT);
        assert_eq!(throttle_for(99, 1.0), vmm::throttle::MAX_THROTTLE_PERCENT);
    }
}
