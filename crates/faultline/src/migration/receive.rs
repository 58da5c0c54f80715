//! The destination side: take the pages into fresh guest RAM, then build the VM from the state
//! through the restore path, and say so.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use migrate::{read_message, read_message_reusing, write_message, Message};
use serde::Serialize;
use snapshot::state::SnapshotState;
use vmm::{DirtyPages, GuestRam, Vm, VmConfig, PAGE_SIZE};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use pager::{FailurePolicy, Pager, PagerConfig};

use super::channel::{open, read_within, stream_silence, Channel, Tls, REPLY_TIMEOUT};
use super::incoming::{Incoming, Phase};
use super::postcopy_receive::{accept_requests, mark_zeros, take_stream, NetworkSource, Stream};
use super::turns::{take_pages_in_turns, Failure};
use super::{identity, page_runs, READ_BUFFER};
use crate::lazy::{start_pager, LazySpec, PagerLink, RamState};
use crate::locking::lock;
use crate::restore::{state_into, vm_for};

/// What the destination received.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiveReport {
    pub peer: String,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub dirty_rounds: u32,
    /// From the source's switch-over message to the VM built here.
    pub switch_over_ms: f64,
    pub total_ms: f64,
}

/// A VM that arrived, built and not yet run, with its state and what was received.
pub struct Arrived {
    pub vm: Vm,
    pub state: SnapshotState,
    pub report: ReceiveReport,
    /// Post-copy: the pager serving guest RAM from the source while the VM runs.
    pub pager: Option<Pager>,
    /// The migration's status here (for `GET /migration`, and recovery).
    pub incoming: Arc<Incoming>,
    /// Post-copy: the thread taking the page stream.
    stream: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Arrived {
    /// A post-copy arrival let go before `finish` (the source never heard `Built`, an error
    /// after the VM arrived, a library user that drops it): its page stream stops and is
    /// joined, rather than running on, or waiting for a recovery, with nobody to finish it.
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            self.incoming.abandon();
            self.incoming.shut_links();
            if stream.join().is_err() {
                tracing::warn!("the page stream thread panicked");
            }
        }
        // The pager's threads go before the VM and its RAM.
        if let Some(pager) = self.pager.take() {
            pager.shutdown();
        }
    }
}

impl Arrived {
    /// Post-copy: waits until every page has arrived and the source was told (the run may
    /// end before; a paused migration waits for its recovery, or for the VM's shutdown), then
    /// stops the pager. Returns the post-copy's figures as `GET /migration` gives them here
    /// (pages and bytes streamed, page requests and their answer times), or `None` if the VM
    /// came by pre-copy alone.
    pub fn finish(&mut self) -> anyhow::Result<Option<serde_json::Value>> {
        let mut figures = None;
        if let Some(stream) = self.stream.take() {
            let taken = stream
                .join()
                .map_err(|_| anyhow::anyhow!("the page stream thread panicked"))?;
            taken?;
            figures = Some(self.incoming.status());
        }
        if let Some(pager) = self.pager.take() {
            pager.shutdown();
        }
        Ok(figures)
    }
}

/// Takes one migration from a connection `listener` accepts, and builds its VM with `config`
/// (its vCPU count comes from the state). Refuses (and tells the source why) a VM this host
/// cannot take (one with more than `max_ram` bytes of RAM among them: the source says how
/// much); any error leaves nothing behind. With `recoverable`, a post-copy whose connection
/// breaks waits to be recovered (through the API) rather than failing.
pub fn receive(
    listener: &TcpListener,
    tls: Option<&Tls>,
    config: VmConfig,
    max_ram: u64,
    recoverable: bool,
) -> anyhow::Result<Arrived> {
    let (stream, peer) = listener
        .accept()
        .context("cannot accept the migration connection")?;
    let started = Instant::now();
    let stream =
        open(stream, tls, "").with_context(|| format!("cannot open a channel with {peer}"))?;
    let mut writer = BufWriter::new(stream.try_clone()?);
    let mut reader = BufReader::with_capacity(READ_BUFFER, stream);
    let incoming = Arc::new(Incoming::new(peer.to_string(), tls.cloned(), recoverable));
    let result = take(
        listener,
        tls,
        (&mut reader, &mut writer),
        config,
        max_ram,
        started,
        incoming,
    );
    if let Err(e) = &result {
        // Tell the source why, if it still listens: it then keeps its VM running.
        let _ = write_message(&mut writer, &Message::Abort(format!("{e:#}")));
        let _ = writer.flush();
        writer.get_ref().shutdown_write();
        drain(&mut reader);
    }
    result
}

/// How long a destination that gave up takes what the source still sends, at most.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads and drops what the source still sends until it closes the connection (for
/// [`DRAIN_TIME`] at most): a socket closed with bytes unread resets the connection, and a
/// reset can throw away the abort just sent before the source reads it. (A source in the
/// middle of a round stops at its next run of pages once the abort is there.)
fn drain(reader: &mut BufReader<Channel>) {
    let until = Instant::now() + DRAIN_TIME;
    let mut scratch = vec![0u8; 64 << 10];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if left.is_zero() || reader.get_ref().set_read_timeout(Some(left)).is_err() {
            return;
        }
        match reader.read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn take(
    listener: &TcpListener,
    tls: Option<&Tls>,
    (reader, writer): (&mut BufReader<Channel>, &mut BufWriter<Channel>),
    config: VmConfig,
    max_ram: u64,
    started: Instant,
    incoming: Arc<Incoming>,
) -> anyhow::Result<Arrived> {
    // A peer that connects and says nothing must not hold the destination forever.
    let theirs = match read_within(reader, REPLY_TIMEOUT) {
        Ok(Message::Hello(identity)) => identity,
        Ok(other) => bail!("the source began with {}, not a hello", other.name()),
        Err(e) if e.is_timeout() => {
            bail!(
                "no hello from the source within {} s",
                REPLY_TIMEOUT.as_secs()
            )
        }
        Err(e) => return Err(anyhow::Error::from(e).context("the source's hello was refused")),
    };
    let size = theirs.layout.pages() * PAGE_SIZE;
    if size > max_ram {
        let said = |bytes: u64| {
            if bytes.is_multiple_of(1 << 20) {
                format!("{} MiB", bytes >> 20)
            } else {
                format!("{bytes} bytes")
            }
        };
        bail!(
            "the source's VM has {} of RAM, more than the {} this destination takes (--max-mem)",
            said(size),
            said(max_ram)
        );
    }
    let ram = GuestRam::new(size).context("cannot create guest RAM for the arriving VM")?;
    let ours = identity(&ram, theirs.vcpus)?;
    ours.check_matches(&theirs)
        .context("this host cannot take the VM")?;
    write_message(writer, &Message::Hello(ours.clone()))?;
    writer.flush()?;
    // From here the source streams without a break: a silent one has stalled.
    reader.get_ref().set_read_timeout(Some(stream_silence()))?;
    // The VM is built now, while the pages come, not in the downtime; its state goes in when
    // it arrives. (Its vCPU threads tell a pager, if post-copy starts one, who they are.)
    let link = PagerLink::default();
    let config = VmConfig {
        on_vcpu_thread: Some(link.vcpu_hook()),
        ..config
    };
    let mut vm = vm_for(theirs.vcpus, ram, config)?;
    let ram = vm.ram().clone();

    let layout = ours.layout.clone();
    let mut report = ReceiveReport {
        peer: incoming.peer().to_string(),
        ..ReceiveReport::default()
    };
    let mut switched_at = None;
    let mut state: Option<SnapshotState> = None;
    // Pages received as zero (their memfd blocks punched out) and not rewritten since.
    let mut zeroed = DirtyPages::new(layout.pages());
    // Pages received at all: every one must have come before the VM may run here.
    let mut received = DirtyPages::new(layout.pages());
    // The first pass, on threads taking turns; the first message after it is handled below.
    let mut after_first_pass = Some(first_pass(
        reader,
        &ram,
        &layout,
        &mut report,
        (&mut zeroed, &mut received),
    )?);
    // The last run's buffer, read into again.
    let mut spare = None;
    loop {
        let message = match after_first_pass.take() {
            Some(message) => message,
            None => {
                read_message_reusing(reader, &mut spare).context("the migration stream failed")?
            }
        };
        message.check(&layout)?;
        match message {
            Message::Pages { gpa, data } => {
                let count = data.len() as u64 / PAGE_SIZE;
                report.normal_pages += count;
                report.bytes += data.len() as u64;
                write_pages(&ram, gpa, &data)?;
                mark(&ram, &mut zeroed, gpa, count, false);
                mark(&ram, &mut received, gpa, count, true);
                spare = Some(data);
            }
            Message::ZeroPages { gpa, count } => {
                report.zero_pages += count;
                zero(&ram, gpa, count)?;
                mark(&ram, &mut zeroed, gpa, count, true);
                mark(&ram, &mut received, gpa, count, true);
            }
            Message::Round { round, .. } => report.dirty_rounds = round,
            // Everything before it is in guest RAM: say so.
            Message::Sync => {
                write_message(writer, &Message::Sync)?;
                writer.flush()?;
            }
            Message::SwitchOver {
                post_copy: goes_post,
                migration,
            } => {
                incoming.set_migration(migration);
                if goes_post {
                    return post_copy(
                        listener, tls, reader, writer, vm, &ours, link, report, &zeroed, incoming,
                    );
                }
                switched_at = Some(Instant::now());
            }
            Message::State(bytes) => {
                state = Some(decode_state(&bytes)?);
            }
            Message::Done => break,
            Message::Abort(reason) => bail!("the source gave up the migration: {reason}"),
            other => bail!("unexpected {} message from the source", other.name()),
        }
    }
    if switched_at.is_none() {
        bail!("the source finished without a switch-over");
    }
    // A page never sent would run as zeros here: the VM must not run on it. (Counted first:
    // this is inside the downtime, and the pages are looked for only when one is missing.)
    if received.count() != layout.pages() {
        let mut never_came = DirtyPages::all(layout.pages());
        never_came.remove(&received);
        let first = never_came.first_from(0).unwrap_or(0);
        bail!(
            "the source finished without sending every page of RAM: {} never came, the first at {:#x}",
            never_came.count(),
            ram.gpa_of_page(first).unwrap_or(u64::MAX)
        );
    }
    let state = state.context("the source finished without sending the VM's state")?;
    // The state's layout must be the one the pages came in.
    state_into(&mut vm, &state).context("the state does not fit the VM the hello described")?;
    // Built, not run: the VM runs here only once the source knows, so that a connection that
    // breaks before leaves it running there and nowhere else.
    write_message(writer, &Message::Built)?;
    writer.flush()?;
    let go = read_within(reader, REPLY_TIMEOUT);
    match go.context("the source did not say to run the VM here; it does not")? {
        Message::Done => {}
        other => bail!(
            "the source sent {} where its go-ahead belongs",
            other.name()
        ),
    }
    // If this last word is lost, the source learns it by resuming (`migrate recover`).
    let acknowledged = write_message(writer, &Message::Done).and_then(|()| writer.flush());
    if let Err(e) = acknowledged {
        tracing::warn!("the VM runs here, but the source was not told: {e}");
    }
    report.switch_over_ms = switched_at.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    incoming
        .normal_pages
        .store(report.normal_pages, Ordering::Relaxed);
    incoming
        .zero_pages
        .store(report.zero_pages, Ordering::Relaxed);
    incoming.bytes.store(report.bytes, Ordering::Relaxed);
    incoming.set_identity(ours.clone());
    incoming.finish(Phase::Completed, None);
    Ok(Arrived {
        vm,
        state,
        report,
        pager: None,
        incoming,
        stream: None,
    })
}

/// Takes the first pass of a migration (every page, the bulk of a pre-copy) on threads taking
/// turns at the stream (`turns`), and returns the first message after its pages.
///
/// Its pages go in by UFFDIO_COPY, while the pages of fresh RAM are missing: it allocates a
/// page and copies into it without clearing it first, as a store through the mapping would,
/// and without the memfd's inode lock, which makes two threads' `pwrite`s wait for each other.
/// Nothing runs on guest RAM yet (the VM's state comes at the switch-over), and the
/// userfaultfd is closed before anything does; a touch meanwhile would fail (SIGBUS for a
/// thread of this process, EFAULT for a system call), never wait for an answer that does not
/// come. Without a userfaultfd to be had, pages are written with `pwrite` (`write_pages`).
///
/// The threads install side by side, so a page must come once in the pass: a source
/// that sends one twice (a later copy could lose to an earlier one) is refused.
fn first_pass<R: std::io::Read + Send>(
    reader: &mut R,
    ram: &GuestRam,
    layout: &migrate::Layout,
    report: &mut ReceiveReport,
    (zeroed, received): (&mut DirtyPages, &mut DirtyPages),
) -> anyhow::Result<Message> {
    // A post-copy has no first pass: its switch-over comes first, and goes on at once.
    let first = read_message(reader).map_err(<anyhow::Error as Failure>::from_read)?;
    if !matches!(first, Message::Pages { .. } | Message::ZeroPages { .. }) {
        return Ok(first);
    }
    let uffd = register_fresh_ram(ram)
        .inspect_err(|e| tracing::debug!("the first pass goes in by pwrite: {e:#}"))
        .ok();
    let pass = Mutex::new(FirstPass {
        report,
        zeroed,
        seen: received,
    });
    let install = |message: &Message| -> anyhow::Result<()> {
        message.check(layout)?;
        match message {
            Message::Pages { gpa, data } => {
                lock(&pass).take_pages(ram, *gpa, data.len() as u64)?;
                match &uffd {
                    Some(uffd) => copy_pages(uffd, ram, *gpa, data)?,
                    None => write_pages(ram, *gpa, data)?,
                }
            }
            // Fresh RAM, and none of it came before: these pages read as zero already.
            Message::ZeroPages { gpa, count } => lock(&pass).take_zeros(ram, *gpa, *count)?,
            _ => unreachable!("only page messages are installed"),
        }
        Ok(())
    };
    let after =
        install(&first).and_then(|()| take_pages_in_turns(reader, "precopy-install", &install));
    // Closed, and its ranges with it, before anything may touch guest RAM.
    drop(uffd);
    after
}

/// What a first pass brought so far.
struct FirstPass<'a> {
    /// Its pages and bytes are counted in the migration's report.
    report: &'a mut ReceiveReport,
    /// Pages received as zero.
    zeroed: &'a mut DirtyPages,
    /// Pages received (none was before the pass).
    seen: &'a mut DirtyPages,
}

impl FirstPass<'_> {
    /// `len` bytes of pages from `gpa` came, unless one of them came already.
    fn take_pages(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> anyhow::Result<()> {
        self.first_time(ram, gpa, len / PAGE_SIZE)?;
        self.report.normal_pages += len / PAGE_SIZE;
        self.report.bytes += len;
        Ok(())
    }

    /// `count` zero pages from `gpa` came, unless one of them came already.
    fn take_zeros(&mut self, ram: &GuestRam, gpa: u64, count: u64) -> anyhow::Result<()> {
        let first = self.first_time(ram, gpa, count)?;
        self.zeroed.mark_range(first, count);
        self.report.zero_pages += count;
        Ok(())
    }

    /// The index of the page at `gpa`, if none of the `count` from it came before (they have
    /// now).
    fn first_time(&mut self, ram: &GuestRam, gpa: u64, count: u64) -> anyhow::Result<u64> {
        let first = ram.page_index(gpa).context("arriving pages outside RAM")?;
        // Only the words of these pages are looked at: the pass comes in address order, so a
        // look on to the next page seen would cross the rest of RAM for every message.
        if self.seen.any_in(first, first.saturating_add(count)) {
            bail!("the source sent a page of {count} at {gpa:#x} twice in its first pass");
        }
        self.seen.mark_range(first, count);
        Ok(first)
    }
}

/// A userfaultfd with every region of (fresh) guest RAM registered for missing pages, on
/// which a touch fails instead of waiting: for [`copy_pages`], while nothing else touches RAM.
pub(crate) fn register_fresh_ram(ram: &GuestRam) -> anyhow::Result<uffd::Uffd> {
    let uffd = uffd::Uffd::open(uffd::Features::MISSING_SHMEM | uffd::Features::SIGBUS)?;
    for region in ram.regions() {
        // SAFETY: guest RAM is memory this VMM manages as raw pages (the `GuestRam` mappings,
        // which outlive the userfaultfd: `ram` is borrowed for as long as it lives), never a
        // Rust object's; with UFFD_FEATURE_SIGBUS a touch of a missing page fails rather than
        // waits, so no one need serve faults.
        let allowed = unsafe {
            uffd.register(
                region.host_addr() as u64,
                region.size(),
                uffd::RegisterMode::MISSING,
            )?
        };
        if !allowed.copy() {
            bail!("UFFDIO_COPY is not allowed on guest RAM here");
        }
    }
    Ok(uffd)
}

/// Puts arriving pages into guest RAM registered with `uffd` ([`register_fresh_ram`]): missing
/// pages by UFFDIO_COPY, and from a page that is there already on, with `pwrite` (none is in a
/// first pass, but a partial copy must end somewhere right).
pub(crate) fn copy_pages(
    uffd: &uffd::Uffd,
    ram: &GuestRam,
    gpa: u64,
    data: &[u8],
) -> anyhow::Result<()> {
    let host = ram
        .host_range(gpa, data.len() as u64)
        .context("arriving pages outside RAM")? as u64;
    let mut done = 0;
    while done < data.len() {
        // SAFETY: the destination is guest RAM registered with `uffd`, which no Rust reference
        // covers; `data[done..]` is a live slice.
        let outcome =
            unsafe { uffd.copy(host + done as u64, &data[done..], uffd::CopyMode::default()) }
                .with_context(|| format!("cannot put arriving pages into guest RAM at {gpa:#x}"))?;
        match outcome {
            uffd::Outcome::Done => return Ok(()),
            uffd::Outcome::Again { done: more } if more > 0 => done += more as usize,
            uffd::Outcome::Again { done: more } | uffd::Outcome::Exists { done: more } => {
                done += more as usize;
                let at = gpa + done as u64;
                return write_pages(ram, at, &data[done..]);
            }
        }
    }
    Ok(())
}

/// Writes arriving pages into guest RAM through its memfd: a write of whole pages into a new
/// page of the file need not clear it first, as a store through the mapping would (page
/// clearing was a third of a pre-copy destination's time).
fn write_pages(ram: &GuestRam, gpa: u64, data: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let (_, region) = ram
        .region_at(gpa, data.len() as u64)
        .context("arriving pages outside RAM")?;
    region
        .memfd_file()
        .write_all_at(data, gpa - region.gpa())
        .with_context(|| format!("cannot write arriving pages into guest RAM at {gpa:#x}"))
}

/// Marks `count` pages from `gpa` in `pages` (or unmarks them).
fn mark(ram: &GuestRam, pages: &mut DirtyPages, gpa: u64, count: u64, marked: bool) {
    if let Some(first) = ram.page_index(gpa) {
        if marked {
            pages.mark_range(first, count);
        } else {
            pages.unmark_range(first, count);
        }
    }
}

/// Post-copy, after the switch-over: the state, which pages are still to come, the
/// page-request connection, a VM whose RAM the pager serves from the source (pages the
/// pre-copy rounds brought stay), and the page stream taken in the background.
#[allow(clippy::too_many_arguments)]
fn post_copy(
    listener: &TcpListener,
    tls: Option<&Tls>,
    reader: &mut BufReader<Channel>,
    writer: &mut BufWriter<Channel>,
    mut vm: Vm,
    ours: &migrate::VmIdentity,
    link: PagerLink,
    report: ReceiveReport,
    zeroed: &DirtyPages,
    incoming: Arc<Incoming>,
) -> anyhow::Result<Arrived> {
    let switched_at = Instant::now();
    incoming.set_identity(ours.clone());
    // The pages the rounds sent that will come again, known before the source pauses: they
    // are punched out now, while the VM still runs there, not in the downtime.
    let early = read_stale(reader, ours).context("no list of the pages to come again")?;
    let ram = vm.ram().clone();
    for (gpa, count) in page_runs(&ram, &early, u64::MAX) {
        zero(&ram, gpa, count)?;
    }
    // The pager next, over a source whose page-request connection is not up yet (the source
    // pauses the VM only once it is): all of this is before the downtime.
    let source = Arc::new(NetworkSource::new(
        ours.layout.clone(),
        Arc::clone(&incoming),
    ));
    let pager = start_pager(
        vm.ram(),
        // Pages the rounds wrote stay resident; the rest (never written, or punched out) is
        // missing. With no rounds nothing was written: no residency to look for.
        if report.normal_pages == 0 {
            RamState::Fresh
        } else {
            RamState::Loaded
        },
        &LazySpec::Source(source.clone()),
        std::time::Duration::ZERO,
        PagerConfig {
            failure_policy: FailurePolicy::Stop,
            // Faults ask the source for their own pages only: the stream brings the rest.
            predict: false,
            // A fault thread waits for the source's answer: one for each vCPU and one for
            // the VMM's own threads, each reading one fault at a time, so that a page asked
            // for never holds up another fault's request (a fault waits only when more
            // threads fault at once than that, and then for whichever answer comes first).
            fault_threads: vm.vcpus().len() + 1,
            events_per_read: 1,
            ..PagerConfig::default()
        },
        &link,
        vm.control(),
    )?;
    let migration = incoming
        .migration()
        .context("a post-copy whose switch-over named no migration")?;
    accept_requests(listener, tls, ours, migration, &source)?;
    // A hybrid's source sends the pages written since the first list before it pauses: they
    // are dropped now, outside the downtime (1600 pages took a millisecond).
    let mut dropped_early = early;
    let mut message = read_message(reader)
        .context("no state, nor the pages written since, after the switch-over")?;
    if let Message::Stale { .. } = message {
        let since = stale_pages(message, ours).context("a list of pages written since")?;
        release(&ram, &pager.handle(), &since)
            .context("cannot drop the pages written since the switch-over")?;
        dropped_early.merge(&since);
        write_message(writer, &Message::Sync)?;
        writer.flush()?;
        message = read_message(reader).context("no state after the switch-over")?;
    }
    let state = match message {
        Message::State(bytes) => decode_state(&bytes)?,
        other => bail!("the source sent {} where the state belongs", other.name()),
    };
    let to_come = read_stale(reader, ours).context("no list of the pages to come")?;
    // Pages to come must be missing, so that a touch asks for them (those dropped early
    // are; with no rounds nothing was ever written).
    if report.normal_pages > 0 {
        let mut dropped = to_come.clone();
        dropped.remove(&dropped_early);
        release(&ram, &pager.handle(), &dropped).context("cannot drop the pages still to come")?;
    }
    state_into(&mut vm, &state).context("the state does not fit the VM the hello described")?;
    // Zero pages the rounds sent and that stay zero are holes too: mark them zero now, so that
    // nothing is left to ask the source for once it is gone.
    // (No zero pages came before the switch-over in a plain post-copy: nothing to look for.)
    if report.zero_pages > 0 {
        let mut known_zero = zeroed.clone();
        // (`to_come` holds the pages dropped before the pause too; removed all the same.)
        known_zero.remove(&to_come);
        known_zero.remove(&dropped_early);
        for (gpa, count) in page_runs(vm.ram(), &known_zero, u64::MAX) {
            mark_zeros(vm.ram(), &pager.handle(), gpa, count)?;
        }
    }
    // Everything that can fail before the VM is ours, so that nothing fails after.
    let stream = Stream {
        reader: BufReader::with_capacity(READ_BUFFER, reader.get_ref().try_clone()?),
        writer: BufWriter::new(writer.get_ref().try_clone()?),
        ram: vm.ram().clone(),
        pager: pager.handle(),
        source,
        incoming: Arc::clone(&incoming),
        ours: ours.clone(),
    };
    // Shut down with the others when one breaks, or when the arrival is dropped.
    incoming.add_link(stream.reader.get_ref().try_clone()?);
    let stream = std::thread::Builder::new()
        .name("postcopy-stream".into())
        .spawn(move || take_stream(stream))?;
    // From here a failure drops the arrival, which stops the stream.
    let mut arrived = Arrived {
        vm,
        state,
        report,
        pager: Some(pager),
        incoming,
        stream: Some(stream),
    };
    // The VM is built: from now on it runs here, never at the source. (The stream thread
    // reads nothing before the source has this.)
    write_message(writer, &Message::Built)?;
    writer.flush()?;
    arrived.report.switch_over_ms = switched_at.elapsed().as_secs_f64() * 1e3;
    Ok(arrived)
}

/// Drops `pages` from guest RAM through the pager: they are missing from now on, and a touch
/// asks the source for them.
fn release(ram: &GuestRam, pager: &pager::PagerHandle, pages: &DirtyPages) -> anyhow::Result<()> {
    for (gpa, count) in page_runs(ram, pages, u64::MAX) {
        let (index, first) = ram
            .region_page(gpa, count * PAGE_SIZE)
            .context("pages outside RAM")?;
        pager
            .release(index, first, count as usize)
            .with_context(|| format!("cannot drop {count} pages at {gpa:#x}"))?;
    }
    Ok(())
}

/// A list of pages to come (a stale message), checked against the VM's layout.
fn read_stale(
    reader: &mut BufReader<Channel>,
    ours: &migrate::VmIdentity,
) -> anyhow::Result<DirtyPages> {
    stale_pages(read_message(reader)?, ours)
}

/// The pages of a `Stale` message, checked against the VM's layout.
fn stale_pages(message: Message, ours: &migrate::VmIdentity) -> anyhow::Result<DirtyPages> {
    message.check(&ours.layout)?;
    let Message::Stale { pages, bitmap } = message else {
        bail!(
            "the source sent {} where stale pages belong",
            message.name()
        )
    };
    DirtyPages::from_words(pages, bitmap).context("a stale list of the wrong size")
}

/// Makes `count` pages from `gpa` zero (a page sent in an earlier round may hold data): the
/// memfd's blocks are punched out, so they take no memory either.
fn zero(ram: &GuestRam, gpa: u64, count: u64) -> anyhow::Result<()> {
    let len = count * PAGE_SIZE;
    let (_, region) = ram.region_at(gpa, len).context("zero pages outside RAM")?;
    rustix::fs::fallocate(
        region.memfd(),
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        gpa - region.gpa(),
        len,
    )
    .map_err(std::io::Error::from)
    .with_context(|| format!("cannot zero {count} pages at {gpa:#x}"))?;
    Ok(())
}

/// The VM state a `State` message carries, decoded and checked as a state file's is.
fn decode_state(payload: &[u8]) -> anyhow::Result<SnapshotState> {
    snapshot::state::decode(Path::new("the migration stream"), payload)
        .context("the VM state from the source was refused")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::layout_of;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    /// A userfaultfd over `ram` for the first pass, or `None` (said loudly) where none can be
    /// opened and FAULTLINE_REQUIRE_UFFD is unset.
    fn uffd_or_skip(ram: &GuestRam) -> Option<uffd::Uffd> {
        match register_fresh_ram(ram) {
            Ok(uffd) => Some(uffd),
            Err(e) if std::env::var_os("FAULTLINE_REQUIRE_UFFD").is_none() => {
                eprintln!("SKIPPED: no userfaultfd for the first pass here: {e:#}");
                None
            }
            Err(e) => panic!("{e:#}"),
        }
    }

    fn frame(message: &Message) -> Vec<u8> {
        migrate::frame(message).unwrap()
    }

    #[test]
    fn copied_pages_go_in_and_a_copy_that_meets_a_page_there_writes_it_over() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let Some(uffd) = uffd_or_skip(&ram) else {
            return;
        };
        let run = |byte: u8, pages: usize| vec![byte; pages * 4096];
        copy_pages(&uffd, &ram, 0x10000, &run(1, 4)).unwrap();
        // Into missing pages, then over the first two of those: the kernel copies the missing
        // ones, stops at the page there, and the rest is written over.
        copy_pages(&uffd, &ram, 0xe000, &run(2, 4)).unwrap();
        // Over the last one, and on into missing ones.
        copy_pages(&uffd, &ram, 0x13000, &run(3, 2)).unwrap();
        assert!(
            copy_pages(&uffd, &ram, 4 << 20, &run(4, 1)).is_err(),
            "outside RAM"
        );
        drop(uffd);
        let ones = 0x0101_0101_0101_0101;
        for (gpa, value) in [
            (0xd000, 0),
            (0xe000, ones * 2),
            (0x10ff8, ones * 2),
            (0x12000, ones),
            (0x13000, ones * 3),
            (0x14ff8, ones * 3),
            (0x15000, 0),
        ] {
            assert_eq!(ram.read_u64(gpa), Some(value), "at {gpa:#x}");
        }
    }

    #[test]
    fn a_first_pass_puts_every_page_in_and_returns_the_message_after_it() {
        let ram = GuestRam::new(8 << 20).unwrap();
        if uffd_or_skip(&ram).is_none() {
            return;
        }
        let layout = layout_of(&ram);
        let mut stream = Vec::new();
        // Runs of one to three pages with data, every third page a zero range, so that both
        // threads install both.
        let mut expected = vec![0u8; 8 << 20];
        let mut page = 0u64;
        let (mut zero_pages, mut normal_pages, mut first_zero) = (0, 0, None);
        while page < 2000 {
            let gpa = page * PAGE_SIZE;
            if page % 3 == 2 {
                stream.extend(frame(&Message::ZeroPages { gpa, count: 1 }));
                first_zero = first_zero.or(Some(page));
                zero_pages += 1;
                page += 1;
                continue;
            }
            let count = 1 + page % 2;
            let data: Vec<u8> = (0..count * PAGE_SIZE)
                .map(|i| (page + i) as u8 | 1)
                .collect();
            expected[gpa as usize..(gpa + data.len() as u64) as usize].copy_from_slice(&data);
            stream.extend(frame(&Message::Pages { gpa, data }));
            page += count;
            normal_pages += count;
        }
        stream.extend(frame(&Message::Sync));
        let mut report = ReceiveReport::default();
        let mut zeroed = DirtyPages::new(layout.pages());
        let mut received = DirtyPages::new(layout.pages());
        let mut reader = stream.as_slice();
        let after = first_pass(
            &mut reader,
            &ram,
            &layout,
            &mut report,
            (&mut zeroed, &mut received),
        )
        .unwrap();
        assert_eq!(after, Message::Sync);
        assert!(reader.is_empty());
        let mut image = vec![0u8; 8 << 20];
        ram.regions()[0]
            .memfd_file()
            .read_exact_at(&mut image, 0)
            .unwrap();
        assert!(image == expected, "every page as sent");
        assert_eq!(report.zero_pages, zero_pages);
        assert_eq!(report.normal_pages, normal_pages);
        assert_eq!(zeroed.count(), zero_pages);
        assert_eq!(zeroed.first_from(0), first_zero);
        assert_eq!(
            received.count(),
            normal_pages + zero_pages,
            "every page sent"
        );
        // The userfaultfd is gone: a page never sent reads (as zero) through the mapping.
        assert_eq!(ram.read_u64(0x7f_f000), Some(0));
    }

    #[test]
    fn a_page_sent_twice_in_a_first_pass_is_refused() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let layout = layout_of(&ram);
        for again in [
            Message::Pages {
                gpa: 0x11000,
                data: vec![2; 4096],
            },
            Message::ZeroPages {
                gpa: 0x13000,
                count: 1,
            },
        ] {
            let mut stream = frame(&Message::Pages {
                gpa: 0x10000,
                data: vec![1; 4 * 4096],
            });
            stream.extend(frame(&again));
            stream.extend(frame(&Message::Sync));
            let (mut zeroed, mut received) = (
                DirtyPages::new(layout.pages()),
                DirtyPages::new(layout.pages()),
            );
            let result = first_pass(
                &mut stream.as_slice(),
                &ram,
                &layout,
                &mut ReceiveReport::default(),
                (&mut zeroed, &mut received),
            );
            let error = format!("{:#}", result.unwrap_err());
            assert!(error.contains("twice in its first pass"), "{error}");
        }
    }

    #[test]
    fn a_stale_list_must_be_one_and_of_the_vms_size() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let ours = identity(&ram, 1).unwrap();
        let pages = ours.layout.pages();
        let mut stale = DirtyPages::new(pages);
        stale.mark_range(3, 5);
        let message = Message::Stale {
            pages,
            bitmap: stale.words().to_vec(),
        };
        assert_eq!(
            stale_pages(message, &ours)
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            [3, 4, 5, 6, 7]
        );
        let short = Message::Stale {
            pages: 10,
            bitmap: vec![0],
        };
        let error = format!("{:#}", stale_pages(short, &ours).unwrap_err());
        assert!(
            error.contains(&format!("10 pages, the VM has {pages}")),
            "{error}"
        );
        let error = format!("{:#}", stale_pages(Message::Sync, &ours).unwrap_err());
        assert!(error.contains("sync where stale pages belong"), "{error}");
    }

    #[test]
    fn zero_pages_replace_what_an_earlier_round_sent() {
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.memory()
            .write_slice(&[0xab; 3 * 4096], GuestAddress(0x10000))
            .unwrap();
        zero(&ram, 0x11000, 1).unwrap();
        assert_eq!(ram.read_u64(0x10000), Some(0xabab_abab_abab_abab));
        assert_eq!(ram.read_u64(0x11000), Some(0));
        assert_eq!(ram.read_u64(0x11ff8), Some(0));
        assert_eq!(ram.read_u64(0x12000), Some(0xabab_abab_abab_abab));
        assert!(zero(&ram, 4 << 20, 1).is_err(), "outside RAM");
    }
}
