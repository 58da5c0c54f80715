//! `faultline bench migrate`: live migration between two processes on loopback, faultline
//! against QEMU in the same run.
//!
//! faultline moves the `counter` micro-guest between two faultline processes (this binary);
//! QEMU moves its peer guest (`bench/peers/qemu_migration_guest.S`, a boot sector in the
//! manner of QEMU's own migration test guest) between two `qemu-system-x86_64` processes,
//! driven over QMP, its figures read from `query-migrate`. Both guests add 1 to the first
//! bytes of every page pass after pass. Cases:
//! - every page holds data, the guest idle after writing it: pre-copy and post-copy;
//! - the same RAM mostly zero (only the first 1 MiB written): pre-copy and post-copy;
//! - a guest that keeps writing every page: pre-copy and hybrid, with the rounds, whether it
//!   converged and how (faultline throttles; QEMU, without auto-converge, may not converge:
//!   it is cancelled after `DIRTIER_PATIENCE`);
//! - post-copy page requests, answered while the stream runs: p50 and p99 (from the dirtier's
//!   post-copy).
//!
//! faultline's runs are verified: the destination checks the guest's memory as it arrives
//! (`--verify-arrival`) and, for the idle guests, runs it to its end and checks its result.
//! Each case runs `--runs` times on each side, the two sides taking turns to go first; the
//! report gives every run and the medians, and the ratios of the medians.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use super::{ratio, wait_for, Process, TempDir};

/// One API call to a faultline process, answered within [`STEP_LIMIT`].
fn api(sock: &Path, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    super::api(sock, method, path, body, STEP_LIMIT)
}
use crate::api::http;

/// The QEMU peer's guest (assembled at run time with the system's binutils).
const QEMU_GUEST_SOURCE: &str = include_str!("../../../../bench/peers/qemu_migration_guest.S");
/// Where its three configuration words are in the boot sector.
const QEMU_GUEST_CONFIG: usize = 0x1f0;
/// How long a migration of a guest that never stops writing may go on before it counts as
/// not converging (and is cancelled).
const DIRTIER_PATIENCE: Duration = Duration::from_secs(120);
/// The passes of the dirtier moved in post-copy or hybrid (the last ones at the destination).
const DIRTIER_PASSES: u64 = 30;
/// The pause before each run. Machines like these give memory their processes freed back to
/// their own host a couple of seconds later (virtio-balloon free page reporting), and a run
/// that overlaps that is slowed by it (a 1 GiB post-copy right after another took 0.7-1.6 s,
/// 0.5-0.8 s after a pause like this): each run, on either side, starts once it is over.
/// A page given back costs a host fault when next used: see [`warm_host`].
const SETTLE: Duration = Duration::from_secs(5);
/// How long any one step (a boot, a first pass, an idle migration) may take.
const STEP_LIMIT: Duration = Duration::from_secs(600);

/// What one migration did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub status: String,
    pub total_ms: f64,
    pub downtime_ms: f64,
    /// faultline: the downtime until the source had written the VM's state, as QEMU counts
    /// its own (QEMU's `downtime` ends there, at the source, while faultline's `downtime_ms`
    /// goes on until the destination said it runs the VM). QEMU: not given (`downtime_ms` is
    /// that already).
    pub downtime_until_state_sent_ms: Option<f64>,
    pub bytes: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub dirty_rounds: u64,
    pub postcopy_requests: u64,
    /// faultline: how far the guest was throttled; QEMU: not used (auto-converge off).
    pub throttle_percent: Option<u64>,
    pub urgent_page_p50_us: Option<u64>,
    pub urgent_page_p99_us: Option<u64>,
    /// faultline: the destination checked the guest's memory (and, for an idle guest, its
    /// result) and found it right. QEMU: not checked (`None`).
    pub verified: Option<bool>,
    /// CPU time the source's and the destination's processes used from the migration's
    /// start to its end, every thread's, user and system (the guest's vCPUs' too: idle but
    /// for the dirtier's); `None` where it could not be read.
    pub source_cpu_ms: Option<f64>,
    pub destination_cpu_ms: Option<f64>,
}

impl Outcome {
    /// Both sides' CPU time, if both were measured.
    fn cpu_ms(&self) -> Option<f64> {
        Some(self.source_cpu_ms? + self.destination_cpu_ms?)
    }
}

/// The least CPU time both sides must have used for their ratio to be given: it is counted in
/// 10 ms ticks, so below ten of them a ratio says more about the ticks than the work.
const CPU_RATIO_FLOOR_MS: f64 = 100.0;

/// The CPU time `process` has used since it had used `before`, in milliseconds.
fn cpu_ms_since(process: &Process, before: Option<Duration>) -> Option<f64> {
    let now = process.cpu_time()?;
    Some(now.checked_sub(before?)?.as_secs_f64() * 1e3)
}

/// One case, both sides, over all its runs.
#[derive(Debug, Serialize)]
pub struct Case {
    pub case: &'static str,
    pub mode: &'static str,
    /// faultline's run of median total time, with the median downtime (and `verified`
    /// only if every run was).
    pub faultline: Outcome,
    /// QEMU's, the same way, or why there is none.
    pub qemu: Result<Outcome, String>,
    /// Each run's total and downtime, in the order they ran.
    pub faultline_runs: Vec<(f64, f64)>,
    pub qemu_runs: Vec<(f64, f64)>,
    /// faultline / QEMU median total time.
    pub total_ratio: Option<f64>,
    /// faultline / QEMU median downtime (faultline's to the destination's word, QEMU's to
    /// its state sent).
    pub downtime_ratio: Option<f64>,
    /// faultline / QEMU median downtime, both counted as QEMU counts it: until the source had
    /// written the state.
    pub downtime_as_qemu_counts_ratio: Option<f64>,
    /// faultline / QEMU CPU time of both sides together, in the runs of median total time:
    /// how much work each did, whatever the two cores made of it (none where either used
    /// less than [`CPU_RATIO_FLOOR_MS`]).
    pub cpu_ratio: Option<f64>,
}

/// The whole benchmark.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mem_bytes: u64,
    /// Runs of each case on each side.
    pub runs: u32,
    /// Bytes of fresh memory asked for before each migration on either side (`--warm-host`;
    /// no more than half of what is available is used), or none.
    pub warm_host_bytes: Option<u64>,
    pub qemu: String,
    pub cases: Vec<Case>,
    /// What the destination's kernel alone needs for a data post-copy, measured before each
    /// of faultline's runs of it: RAM's worth of pages put into fresh guest RAM by
    /// UFFDIO_COPY in 1 MiB runs, on as many threads as a destination installs on, no network, no
    /// guest (ms, each run).
    pub install_floor_runs: Vec<f64>,
    /// Their median, and its ratio to QEMU's median data post-copy total: a faultline total
    /// can be no lower (the destination's installing is on its path).
    pub install_floor_ms: Option<f64>,
    pub install_floor_ratio: Option<f64>,
}

/// The guest workload of a case.
#[derive(Debug, Clone, Copy)]
enum Workload {
    /// Every page written once, then idle.
    Data,
    /// Only the first MiB written, then idle.
    MostlyZero,
    /// Every page written again and again.
    Dirtier,
}

/// The cases: name, case, workload and mode, in the order they run.
const CASES: [(&str, &str, Workload, &str); 7] = [
    ("data-pre", "data", Workload::Data, "pre"),
    ("data-post", "data", Workload::Data, "post"),
    (
        "mostly-zero-pre",
        "mostly-zero",
        Workload::MostlyZero,
        "pre",
    ),
    (
        "mostly-zero-post",
        "mostly-zero",
        Workload::MostlyZero,
        "post",
    ),
    ("dirtier-pre", "dirtier", Workload::Dirtier, "pre"),
    ("dirtier-hybrid", "dirtier", Workload::Dirtier, "hybrid"),
    ("dirtier-post", "dirtier", Workload::Dirtier, "post"),
];

/// The cases' names, as `--cases` takes them.
pub fn case_names() -> impl Iterator<Item = &'static str> {
    CASES.iter().map(|&(name, ..)| name)
}

/// What `bench migrate` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Guest RAM on both sides.
    pub mem: u64,
    /// Runs of each case on each side.
    pub runs: u32,
    /// The cases to run, by name ([`case_names`]); empty: all of them.
    pub cases: Vec<String>,
    /// Before each migration and each install floor, on either side alike, use and free
    /// twice the guest RAM of fresh memory (`warm_host`).
    pub warm_host: bool,
}

/// Runs each chosen case `runs` times on `mem` bytes of guest RAM, faultline and QEMU in
/// turns; `step` is told what runs.
pub fn run(options: &Options, step: impl Fn(&str)) -> anyhow::Result<Report> {
    let Options {
        mem,
        runs,
        ref cases,
        warm_host: warm,
    } = *options;
    if !(64 << 20..=3 << 30).contains(&mem) {
        bail!("--mem must be between 64M and 3G (the QEMU guest addresses 32-bit memory)");
    }
    if let Some(unknown) = cases.iter().find(|c| !case_names().any(|name| name == *c)) {
        bail!(
            "--cases: no case is called {unknown:?}; the cases are {}",
            case_names().collect::<Vec<_>>().join(", ")
        );
    }
    // Twice the guest RAM: the destination's fresh pages, and what its kernel takes besides.
    let warm_bytes = warm.then_some(2 * mem);
    let tmp = TempDir::new("migrate")?;
    let qemu = Qemu::find(tmp.path());
    let qemu_name = match &qemu {
        Ok(q) => q.describe(),
        Err(e) => format!("unavailable: {e:#}"),
    };
    let mut out = Vec::new();
    let mut install_floor_runs = Vec::new();
    let chosen = CASES
        .iter()
        .enumerate()
        .filter(|(_, (name, ..))| cases.is_empty() || cases.iter().any(|c| c == name));
    for (index, &(_, case, workload, mode)) in chosen {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for attempt in 1..=runs {
            let of = format!("{case} {mode}, run {attempt} of {runs}");
            let dir = tmp.path().join(format!("case-{index}-{attempt}"));
            std::fs::create_dir_all(&dir)?;
            let trial = Trial {
                dir: &dir,
                mem,
                workload,
                mode,
                warm_bytes,
            };
            // Each side goes first every other run: what one leaves behind (memory the host
            // must give back, caches) weighs on both alike.
            let qemu_first = attempt % 2 == 0;
            if qemu_first {
                step(&format!("migrate: {of}: QEMU"));
                std::thread::sleep(SETTLE);
                theirs.push(qemu_case(&qemu, trial));
            }
            if matches!(workload, Workload::Data) && mode == "post" {
                step(&format!("migrate: {of}: installing {mem} bytes alone"));
                std::thread::sleep(SETTLE);
                warm_host(warm_bytes)?;
                install_floor_runs.push(install_floor_ms(mem)?);
            }
            step(&format!("migrate: {of}: faultline"));
            std::thread::sleep(SETTLE);
            ours.push(faultline_case(trial).with_context(|| format!("faultline, {of}"))?);
            if !qemu_first {
                step(&format!("migrate: {of}: QEMU"));
                std::thread::sleep(SETTLE);
                theirs.push(qemu_case(&qemu, trial));
            }
        }
        let faultline_runs = ours.iter().map(|o| (o.total_ms, o.downtime_ms)).collect();
        let ours = median(ours);
        // QEMU's figures count only if every run completed: otherwise its first failure.
        let qemu_runs = theirs
            .iter()
            .flatten()
            .map(|o| (o.total_ms, o.downtime_ms))
            .collect();
        let theirs = match theirs
            .iter()
            .find(|t| !matches!(t, Ok(o) if o.status == "completed"))
        {
            Some(failed) => failed.clone(),
            None => Ok(median(theirs.into_iter().flatten().collect())),
        };
        let (total_ratio, downtime_ratio, downtime_as_qemu_counts_ratio, cpu_ratio) = match &theirs
        {
            Ok(q) if q.status == "completed" => (
                Some(ratio(ours.total_ms, q.total_ms)),
                Some(ratio(ours.downtime_ms, q.downtime_ms)),
                ours.downtime_until_state_sent_ms
                    .map(|d| ratio(d, q.downtime_ms)),
                ours.cpu_ms()
                    .zip(q.cpu_ms())
                    .filter(|&(a, b)| a.min(b) >= CPU_RATIO_FLOOR_MS)
                    .map(|(a, b)| ratio(a, b)),
            ),
            _ => (None, None, None, None),
        };
        out.push(Case {
            case,
            mode,
            faultline: ours,
            qemu: theirs,
            faultline_runs,
            qemu_runs,
            total_ratio,
            downtime_ratio,
            downtime_as_qemu_counts_ratio,
            cpu_ratio,
        });
    }
    let install_floor_ms = {
        let mut sorted = install_floor_runs.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    };
    let qemu_data_post = out
        .iter()
        .find(|c| c.case == "data" && c.mode == "post")
        .and_then(|c| c.qemu.as_ref().ok())
        .filter(|q| q.status == "completed")
        .map(|q| q.total_ms);
    Ok(Report {
        mem_bytes: mem,
        runs,
        warm_host_bytes: warm_bytes,
        qemu: qemu_name,
        cases: out,
        install_floor_runs,
        install_floor_ms,
        install_floor_ratio: install_floor_ms
            .zip(qemu_data_post)
            .map(|(f, q)| ratio(f, q)),
    })
}

/// Milliseconds to put `mem` bytes of pages into fresh guest RAM through UFFDIO_COPY, in
/// runs of 1 MiB on [`FLOOR_THREADS`] threads: the kernel's share of a destination's work
/// (allocating each page of the memfd, copying into it, mapping it), with nothing else.
fn install_floor_ms(mem: u64) -> anyhow::Result<f64> {
    let ram = vmm::GuestRam::new(mem).context("cannot make guest RAM to install into")?;
    Ok(fill_by_copy(&ram)?.as_secs_f64() * 1e3)
}

/// The threads the floor installs on: as many as take turns at a destination's stream
/// (`migration::turns`), each taking every n-th run.
const FLOOR_THREADS: usize = crate::migration::turns::THREADS;

/// Fills every page of `ram` (fresh, nothing touched yet) with [`FILL`] by UFFDIO_COPY in
/// runs of 1 MiB, on [`FLOOR_THREADS`] threads, through the destination's own first-pass
/// install (`migration::receive::copy_pages`): how long the copies took.
fn fill_by_copy(ram: &vmm::GuestRam) -> anyhow::Result<Duration> {
    const RUN: u64 = 1 << 20;
    let uffd = crate::migration::receive::register_fresh_ram(ram)
        .context("cannot open a userfaultfd to install with")?;
    // Every run, as (guest address, length).
    let runs: Vec<(u64, usize)> = ram
        .regions()
        .iter()
        .flat_map(|region| {
            (0..region.size()).step_by(RUN as usize).map(|offset| {
                let len = (region.size() - offset).min(RUN) as usize;
                (region.gpa() + offset, len)
            })
        })
        .collect();
    let fill = |first: usize| -> anyhow::Result<()> {
        let run = vec![FILL; RUN as usize];
        for &(gpa, len) in runs.iter().skip(first).step_by(FLOOR_THREADS) {
            crate::migration::receive::copy_pages(&uffd, ram, gpa, &run[..len])?;
        }
        Ok(())
    };
    let started = Instant::now();
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..FLOOR_THREADS)
            .map(|first| scope.spawn(move || fill(first)))
            .collect();
        threads.into_iter().try_for_each(|thread| {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("an install floor thread panicked"))?
        })
    })?;
    Ok(started.elapsed())
}

/// Uses up to `bytes` of fresh anonymous memory (no more than half of what the kernel says
/// is available), a byte written in each page, and frees it; nothing if `None`.
///
/// Machines like these are guests of their own host, and give it back the memory their
/// processes freed a couple of seconds after (virtio-balloon free page reporting). Such a page
/// costs a host fault when it is next used, and every page a destination installs is a first
/// use (README, "Migration figures"). Freed right before a migration, these pages are the next
/// ones the kernel hands out, and they are still backed.
fn warm_host(bytes: Option<u64>) -> anyhow::Result<()> {
    use rustix::mm::{mmap_anonymous, munmap, MapFlags, ProtFlags};
    let Some(bytes) = bytes else {
        return Ok(());
    };
    let len = bytes.min(mem_available()? / 2) as usize;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a new private anonymous mapping at an address the kernel picks: it replaces
    // nothing.
    let base = unsafe {
        mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }
    .context("cannot map the memory to warm the host with")?;
    for at in (0..len).step_by(vmm::PAGE_SIZE as usize) {
        // SAFETY: `at` is within the writable mapping made above. Volatile, so that the
        // stores are made although the memory is freed unread.
        unsafe { base.cast::<u8>().add(at).write_volatile(1) };
    }
    // SAFETY: the mapping made above, unmapped once; nothing points into it any more.
    unsafe { munmap(base, len) }.context("cannot unmap the memory that warmed the host")?;
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib << 10)
        .context("/proc/meminfo gives no MemAvailable in kB")
}

/// The byte [`fill_by_copy`] fills pages with.
const FILL: u8 = 0x5a;

/// One run of one case, on either side.
#[derive(Clone, Copy)]
struct Trial<'a> {
    /// Where the run keeps its sockets and files.
    dir: &'a Path,
    mem: u64,
    workload: Workload,
    mode: &'a str,
    /// What [`warm_host`] uses before the migration.
    warm_bytes: Option<u64>,
}

/// QEMU's side of a case, or why there is none.
fn qemu_case(qemu: &anyhow::Result<Qemu>, trial: Trial) -> Result<Outcome, String> {
    match qemu {
        Ok(q) => q.case(trial).map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// The run of median total time among `outcomes` (the lower of the two middle ones for an
/// even count), with the median downtimes, verified only if every run was.
fn median(mut outcomes: Vec<Outcome>) -> Outcome {
    let middle = (outcomes.len() - 1) / 2;
    let median_of = |figure: fn(&Outcome) -> Option<f64>| {
        let mut all: Vec<f64> = outcomes.iter().filter_map(figure).collect();
        all.sort_by(f64::total_cmp);
        (all.len() == outcomes.len()).then(|| all[middle])
    };
    let downtime = median_of(|o| Some(o.downtime_ms));
    let until_state_sent = median_of(|o| o.downtime_until_state_sent_ms);
    let verified = outcomes
        .iter()
        .map(|o| o.verified)
        .try_fold(true, |all, v| v.map(|v| all && v));
    outcomes.sort_by(|a, b| a.total_ms.total_cmp(&b.total_ms));
    let mut chosen = outcomes.swap_remove(middle);
    chosen.downtime_ms = downtime.unwrap_or(f64::NAN);
    chosen.downtime_until_state_sent_ms = until_state_sent;
    chosen.verified = verified;
    chosen
}

/// faultline's side of a case: a `run` source and a `migrate receive` destination.
fn faultline_case(trial: Trial) -> anyhow::Result<Outcome> {
    let Trial {
        dir,
        mem,
        workload,
        mode,
        warm_bytes,
    } = trial;
    let exe = std::env::current_exe().context("cannot find the faultline executable")?;
    let (ssock, dsock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let ram_pages = mem / vmm::PAGE_SIZE;
    let boot_pages = vmm::boot::layout::BOOT_AREA_END / vmm::PAGE_SIZE;
    let range_pages = match workload {
        Workload::MostlyZero => 256,
        Workload::Data | Workload::Dirtier => ram_pages - boot_pages,
    };
    // Idle guests: one pass, held there, then a second on the destination, which checks the
    // result. The dirtier in pre-copy counts until it is shut down (its memory is checked as
    // it arrives); in post-copy and hybrid it counts DIRTIER_PASSES passes, the last ones at
    // the destination, which checks the result (a check on arrival would ask the source for
    // every page at once, and the guest would not run while the pages come).
    let checked_on_arrival = matches!(workload, Workload::Dirtier) && mode == "pre";
    let passes = match workload {
        Workload::Dirtier if checked_on_arrival => 0,
        Workload::Dirtier => DIRTIER_PASSES,
        Workload::Data | Workload::MostlyZero => 2,
    };
    let mut receive = Command::new(&exe);
    receive
        .args(["migrate", "receive", "--listen", "127.0.0.1:0", "--json"])
        .arg("--api-sock")
        .arg(&dsock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match workload {
        // Idle like QEMU's halted guest until the migration is done.
        Workload::Data | Workload::MostlyZero => {
            receive.arg("--paused");
        }
        Workload::Dirtier if checked_on_arrival => {
            receive.arg("--verify-arrival");
        }
        Workload::Dirtier => {}
    }
    let mut destination = Process(receive.spawn().context("cannot start the destination")?);
    let mut said = BufReader::new(destination.0.stderr.take().expect("piped"));
    let mut line = String::new();
    said.read_line(&mut line)?;
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .with_context(|| format!("the destination did not say where it listens: {line:?}"))?
        .to_string();
    std::thread::spawn(move || std::io::copy(&mut said, &mut std::io::sink()));
    let stdout = {
        let mut out = destination.0.stdout.take().expect("piped");
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut text);
            text
        })
    };

    let source = Process(
        Command::new(&exe)
            .args(["run", "--guest", "counter", "--mem", &mem.to_string()])
            .args(["--range-pages", &range_pages.to_string()])
            .args(["--arg", &passes.to_string()])
            .args(["--hold-at", "1", "--json", "--api-sock"])
            .arg(&ssock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the source")?,
    );
    super::wait_held(&ssock, "the source's first pass", STEP_LIMIT)?;
    // Before the dirtier is let go: it counts its passes from there.
    warm_host(warm_bytes)?;
    if let Workload::Dirtier = workload {
        api(&ssock, "PUT", "/vm/hold", Some(json!({ "at": null })))?;
    }
    let cpu_before = (source.cpu_time(), destination.cpu_time());
    let report = api(
        &ssock,
        "PUT",
        "/migration/send",
        Some(json!({ "to": addr, "mode": mode })),
    )?;
    // The destination's end: every page in (it may finish its run soon after; it is not
    // waited for here, so that its CPU can still be read).
    let arrived = wait_for("the destination's end of the migration", STEP_LIMIT, || {
        if destination.has_exited()? {
            return Ok(Some(Value::Null));
        }
        Ok(http::call(
            &dsock,
            "GET",
            "/migration",
            None,
            Some(Duration::from_secs(5)),
        )
        .ok()
        .and_then(|(_, status)| status)
        .filter(|s| s["status"] == "completed" || s["status"] == "failed"))
    })?;
    let source_cpu_ms = cpu_ms_since(&source, cpu_before.0);
    let destination_cpu_ms = cpu_ms_since(&destination, cpu_before.1);
    drop(source);
    if arrived != Value::Null {
        match workload {
            Workload::Dirtier if checked_on_arrival => {
                api(&dsock, "PUT", "/vm/shutdown", None)?;
            }
            Workload::Dirtier => {}
            Workload::Data | Workload::MostlyZero => {
                api(&dsock, "PUT", "/vm/resume", None)?;
            }
        }
    }
    let finished = wait_for("the destination's exit", STEP_LIMIT, || {
        Ok(destination.0.try_wait()?)
    })?;
    let stdout = stdout
        .join()
        .map_err(|_| anyhow::anyhow!("the destination's output reader panicked"))?;
    let verified = if checked_on_arrival {
        stdout.contains("\"arrival_check\"")
    } else {
        finished.success()
    };
    // After a post-copy the destination prints its figures (GET /migration's) once every page
    // is in, its page requests' answer times among them.
    let figures = stdout
        .find("\"urgent_page_p50_us\"")
        .and_then(|at| stdout[..at].rfind('{'))
        .and_then(|start| {
            serde_json::Deserializer::from_str(&stdout[start..])
                .into_iter::<Value>()
                .next()?
                .ok()
        })
        .unwrap_or(Value::Null);
    let number = |v: &Value| v.as_u64().unwrap_or(0);
    Ok(Outcome {
        status: report["status"].as_str().unwrap_or("?").to_string(),
        total_ms: report["total_ms"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: report["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        downtime_until_state_sent_ms: report["downtime_until_state_sent_ms"].as_f64(),
        bytes: number(&report["bytes"]),
        normal_pages: number(&report["normal_pages"]),
        zero_pages: number(&report["zero_pages"]),
        dirty_rounds: number(&report["dirty_rounds"]),
        postcopy_requests: number(&report["postcopy_requests"]),
        throttle_percent: report["throttle_percent"].as_u64(),
        urgent_page_p50_us: figures["urgent_page_p50_us"].as_u64(),
        urgent_page_p99_us: figures["urgent_page_p99_us"].as_u64(),
        verified: Some(verified),
        source_cpu_ms,
        destination_cpu_ms,
    })
}

/// The QEMU peer: its executable, its guest image, and the accelerator it uses.
struct Qemu {
    exe: PathBuf,
    image: PathBuf,
    accel: &'static str,
    version: String,
}

impl Qemu {
    /// Finds `qemu-system-x86_64` and assembles the peer guest into `dir`.
    fn find(dir: &Path) -> anyhow::Result<Qemu> {
        let exe = PathBuf::from("qemu-system-x86_64");
        let version = Command::new(&exe).arg("--version").output().context(
            "qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)",
        )?;
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("qemu")
            .to_string();
        let source = dir.join("qemu_migration_guest.S");
        std::fs::write(&source, QEMU_GUEST_SOURCE)?;
        let object = dir.join("qemu_migration_guest.o");
        let image = dir.join("qemu_migration_guest.bin");
        let assembled = Command::new("as")
            .arg("--32")
            .arg("-o")
            .arg(&object)
            .arg(&source)
            .status()
            .context("cannot run `as` (binutils)")?;
        let linked = Command::new("ld")
            .args([
                "-m",
                "elf_i386",
                "-Ttext",
                "0x7c00",
                "--oformat",
                "binary",
                "-o",
            ])
            .arg(&image)
            .arg(&object)
            .status()
            .context("cannot run `ld` (binutils)")?;
        if !assembled.success() || !linked.success() {
            bail!("cannot assemble the QEMU peer's guest");
        }
        // KVM like faultline where it can be had, so that the guests run alike.
        let accel = if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        {
            "kvm"
        } else {
            "tcg"
        };
        Ok(Qemu {
            exe,
            image,
            accel,
            version,
        })
    }

    fn describe(&self) -> String {
        format!("{} (accel {})", self.version, self.accel)
    }

    /// The guest image for `workload` on `mem` bytes.
    fn image_for(&self, dir: &Path, mem: u64, workload: Workload) -> anyhow::Result<PathBuf> {
        let mut sector = std::fs::read(&self.image)?;
        if sector.len() != 512 {
            bail!(
                "the QEMU peer's guest is {} bytes, not one sector",
                sector.len()
            );
        }
        let (last, forever) = match workload {
            Workload::Data => (mem, 0u32),
            Workload::MostlyZero => (0x20_0000, 0),
            Workload::Dirtier => (mem, 1),
        };
        let words = [0x10_0000u32, u32::try_from(last)?, forever];
        for (i, word) in words.iter().enumerate() {
            let at = QEMU_GUEST_CONFIG + 4 * i;
            sector[at..at + 4].copy_from_slice(&word.to_le_bytes());
        }
        let path = dir.join("qemu-guest.img");
        std::fs::write(&path, sector)?;
        Ok(path)
    }

    fn spawn(
        &self,
        dir: &Path,
        name: &str,
        image: &Path,
        mem: u64,
        incoming: bool,
    ) -> anyhow::Result<(Process, Qmp)> {
        let qmp = dir.join(format!("{name}.qmp"));
        let serial = dir.join(format!("{name}.serial"));
        let mut command = Command::new(&self.exe);
        command
            .args([
                "-accel",
                self.accel,
                "-display",
                "none",
                "-monitor",
                "none",
                "-nodefaults",
            ])
            .args(["-m", &format!("{}M", mem >> 20)])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=ide", image.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if incoming {
            command.args(["-incoming", "defer"]);
        }
        let process = Process(command.spawn().context("cannot start qemu-system-x86_64")?);
        let stream = wait_for("QEMU's QMP socket", Duration::from_secs(30), || {
            Ok(UnixStream::connect(&qmp).ok())
        })?;
        Ok((process, Qmp::new(stream)?))
    }

    /// QEMU's side of a case.
    fn case(&self, trial: Trial) -> anyhow::Result<Outcome> {
        let Trial {
            dir,
            mem,
            workload,
            mode,
            ..
        } = trial;
        let image = self.image_for(dir, mem, workload)?;
        let (source_process, mut source) = self.spawn(dir, "qemu-src", &image, mem, false)?;
        let (destination_process, mut destination) =
            self.spawn(dir, "qemu-dst", &image, mem, true)?;
        let serial = dir.join("qemu-src.serial");
        wait_for("the QEMU guest's first pass", STEP_LIMIT, || {
            Ok(std::fs::read(&serial)
                .ok()
                .filter(|s| s.contains(&b'B'))
                .map(|_| ()))
        })?;
        let post = mode != "pre";
        if post {
            let capability =
                json!({ "capabilities": [{ "capability": "postcopy-ram", "state": true }] });
            source.execute("migrate-set-capabilities", capability.clone())?;
            destination.execute("migrate-set-capabilities", capability)?;
        }
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.local_addr()?.port()
        };
        let uri = format!("tcp:127.0.0.1:{port}");
        // QEMU caps a migration at 128 MiB/s unless told otherwise; faultline has no cap. The
        // downtime limit is faultline's default.
        source.execute(
            "migrate-set-parameters",
            json!({
                "max-bandwidth": 1u64 << 40,
                "downtime-limit": crate::migration::send::DEFAULT_DOWNTIME_MS,
            }),
        )?;
        destination.execute("migrate-incoming", json!({ "uri": uri }))?;
        warm_host(trial.warm_bytes)?;
        let cpu_before = (source_process.cpu_time(), destination_process.cpu_time());
        source.execute("migrate", json!({ "uri": uri }))?;
        if mode == "post" {
            source.execute("migrate-start-postcopy", json!({}))?;
        }
        let started = Instant::now();
        let mut switched = mode != "hybrid";
        let limit = match workload {
            Workload::Dirtier => DIRTIER_PATIENCE,
            Workload::Data | Workload::MostlyZero => STEP_LIMIT,
        };
        // Until it ends, or runs out of time.
        let (info, out_of_time) = loop {
            let info = source.execute("query-migrate", json!({}))?;
            let status = info["status"].as_str().unwrap_or("");
            if matches!(status, "completed" | "failed" | "cancelled") {
                break (info, false);
            }
            // Hybrid: post-copy once the first full pass is done (QEMU's postcopy-after-precopy).
            if !switched && info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
                source.execute("migrate-start-postcopy", json!({}))?;
                switched = true;
            }
            if started.elapsed() > limit {
                break (info, true);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Both sides' CPU, read the moment it ends (before a cancel, or more queries).
        let source_cpu_ms = cpu_ms_since(&source_process, cpu_before.0);
        let destination_cpu_ms = cpu_ms_since(&destination_process, cpu_before.1);
        let info = if out_of_time {
            source.execute("migrate_cancel", json!({}))?;
            let mut info = info;
            info["status"] = json!(format!(
                "not converged within {} s (cancelled)",
                limit.as_secs()
            ));
            info
        } else if info["status"] == "completed" {
            completed_figures(&mut source, info)?
        } else {
            info
        };
        let ram = &info["ram"];
        let number = |v: &Value| v.as_u64().unwrap_or(0);
        Ok(Outcome {
            status: info["status"].as_str().unwrap_or("?").to_string(),
            total_ms: info["total-time"]
                .as_f64()
                .unwrap_or(started.elapsed().as_secs_f64() * 1e3),
            downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
            downtime_until_state_sent_ms: None,
            bytes: number(&ram["transferred"]),
            normal_pages: number(&ram["normal"]),
            zero_pages: number(&ram["duplicate"]),
            dirty_rounds: number(&ram["dirty-sync-count"]).saturating_sub(1),
            postcopy_requests: number(&ram["postcopy-requests"]),
            throttle_percent: None,
            urgent_page_p50_us: None,
            urgent_page_p99_us: None,
            verified: None,
            source_cpu_ms,
            destination_cpu_ms,
        })
    }
}

/// QEMU's figures for a migration `info` says completed. QEMU can say "completed" a moment
/// before they are in (a total and a downtime of 0 were seen once): they are asked again for
/// a second at most, and a run whose total never comes counts as not completed.
fn completed_figures(source: &mut Qmp, info: Value) -> anyhow::Result<Value> {
    let has_total = |info: &Value| info["total-time"].as_f64().is_some_and(|ms| ms > 0.0);
    if has_total(&info) {
        return Ok(info);
    }
    // A failed query ends the wait with its error; only the wait's own time limit is "no
    // total".
    let asked = wait_for("QEMU's figures", Duration::from_secs(1), || {
        Ok(match source.execute("query-migrate", json!({})) {
            Ok(info) => has_total(&info).then_some(Ok(info)),
            Err(e) => Some(Err(e)),
        })
    });
    match asked {
        Ok(figures) => figures,
        Err(_) => {
            let mut info = info;
            info["status"] = json!("completed, but QEMU gave no total time");
            Ok(info)
        }
    }
}

/// A QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn new(stream: UnixStream) -> anyhow::Result<Qmp> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting)?;
        if !greeting.contains("QMP") {
            bail!("not a QMP greeting: {greeting:?}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments`: its return value (events are skipped).
    fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}")?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("QEMU closed its QMP socket during {command}");
            }
            let answer: Value =
                serde_json::from_str(&line).with_context(|| format!("QMP answered {line:?}"))?;
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = answer.get("error") {
                bail!("QMP {command}: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_that_does_not_exist_is_refused_before_anything_runs() {
        let options = Options {
            mem: 64 << 20,
            runs: 1,
            cases: vec!["data-post".into(), "data-hybrid".into()],
            warm_host: false,
        };
        let error = run(&options, |step| panic!("{step} ran")).unwrap_err();
        let said = format!("{error:#}");
        assert!(said.contains("\"data-hybrid\""), "{said}");
        for name in ["data-pre", "mostly-zero-post", "dirtier-hybrid"] {
            assert!(said.contains(name), "{said}");
        }
    }

    #[test]
    fn the_median_run_keeps_the_median_downtimes_and_a_figure_only_every_run_has() {
        let run = |total_ms, downtime_ms, until: Option<f64>| Outcome {
            total_ms,
            downtime_ms,
            downtime_until_state_sent_ms: until,
            verified: Some(true),
            ..Outcome::default()
        };
        let chosen = median(vec![
            run(30.0, 1.0, Some(0.5)),
            run(10.0, 3.0, Some(0.1)),
            run(20.0, 2.0, Some(0.9)),
        ]);
        assert_eq!(
            (chosen.total_ms, chosen.downtime_ms),
            (20.0, 2.0),
            "the run of median total, with the median downtime"
        );
        assert_eq!(chosen.downtime_until_state_sent_ms, Some(0.5));
        assert_eq!(chosen.verified, Some(true));
        let chosen = median(vec![run(1.0, 1.0, Some(0.5)), run(2.0, 1.0, None)]);
        assert_eq!(chosen.downtime_until_state_sent_ms, None);
    }

    #[test]
    fn the_install_floor_fills_every_page_of_ram() {
        let ram = vmm::GuestRam::new(8 << 20).unwrap();
        fill_by_copy(&ram).unwrap();
        let mut page = vec![0u8; vmm::PAGE_SIZE as usize];
        for region in ram.regions() {
            for offset in (0..region.size()).step_by(page.len()) {
                let gpa = region.gpa() + offset;
                vm_memory::Bytes::read_slice(ram.memory(), &mut page, vm_memory::GuestAddress(gpa))
                    .unwrap();
                assert!(page.iter().all(|&b| b == FILL), "page at {gpa:#x}");
            }
        }
    }
}
