//! `faultline bench faults`: the cost of serving a missing page, faultline's pager against a
//! bare-minimum userfaultfd handler measured in the same run.
//!
//! The minimal handler is the floor: one thread that polls the userfaultfd, reads one event
//! and answers it with UFFDIO_COPY of a fixed page. faultline's pager does the real work:
//! region lookup, presence map, claim, a source fetch (zero page, or a read from a file), the
//! install with its EEXIST/EAGAIN handling, stats.
//!
//! Touchers are host threads (each touches its own slice of pages, timing every first write
//! with the monotonic clock) or a KVM micro-guest (`timedtouch`, which brackets every first
//! write with RDTSC and stores the ticks in the page; the host reads them back).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pager::{FileSource, PageSource, PagerBuilder, PagerConfig, ZeroSource};
use serde::Serialize;
use uffd::{CopyMode, Event, Features, RegisterMode, Uffd};
use vmm::devices::ConsoleSink;
use vmm::{GuestRam, PAGE_SIZE};

use super::ratio;
use crate::lazy::LazySpec;
use crate::micro::{MicroOptions, MicroVm};

/// What to run.
#[derive(Debug, Clone)]
pub struct FaultsOptions {
    /// Pages per host-thread case.
    pub thread_pages: usize,
    /// Guest RAM for the vCPU cases (its work range is touched).
    pub vcpu_mem: u64,
    /// Runs per side per case; samples are pooled.
    pub runs: usize,
    /// The pager's read-ahead (1 = off, the default).
    pub readahead: usize,
    /// Pin the whole process to CPU 0 (touchers and handlers share one CPU).
    pub pin_one_cpu: bool,
}

/// One side's figures.
#[derive(Debug, Serialize)]
pub struct Side {
    pub p50_us: f64,
    pub p99_us: f64,
    pub faults_per_s: f64,
}

/// One case.
#[derive(Debug, Serialize)]
pub struct Case {
    pub name: String,
    pub toucher: &'static str,
    pub threads: usize,
    pub source: &'static str,
    pub pages: u64,
    pub faultline: Side,
    pub minimal: Side,
    /// faultline p50 / minimal p50 (lower is better; 1.0 = the floor).
    pub ratio_p50: f64,
    /// faultline faults/s / minimal faults/s (higher is better).
    pub ratio_faults_per_s: f64,
}

/// The whole output.
#[derive(Debug, Serialize)]
pub struct FaultsBench {
    pub bench: &'static str,
    pub placement: &'static str,
    pub readahead_pages: usize,
    pub runs: usize,
    pub minimal: &'static str,
    pub cases: Vec<Case>,
}

/// Samples of one side: per-fault latencies and the pages/second of each run.
#[derive(Default)]
struct Samples {
    latencies_us: Vec<f64>,
    pages: u64,
    seconds: f64,
}

impl Samples {
    fn side(mut self) -> Side {
        self.latencies_us.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let n = self.latencies_us.len();
            if n == 0 {
                f64::NAN
            } else {
                self.latencies_us[((n - 1) as f64 * q) as usize]
            }
        };
        let round = |x: f64| (x * 100.0).round() / 100.0;
        Side {
            p50_us: round(at(0.5)),
            p99_us: round(at(0.99)),
            faults_per_s: (self.pages as f64 / self.seconds).round(),
        }
    }
}

/// The floor: one thread, poll + read + UFFDIO_COPY of a fixed page.
struct MinimalHandler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl MinimalHandler {
    /// # Safety
    ///
    /// `ranges` must be raw memory (guest RAM made for this case) that stays mapped until the
    /// handler stops, with no Rust references into it.
    unsafe fn start(ranges: &[(u64, u64)]) -> anyhow::Result<Self> {
        let uffd = Uffd::open(Features::MISSING_SHMEM)
            .context("the minimal handler cannot open a userfaultfd")?;
        for &(start, len) in ranges {
            // SAFETY: the caller's contract for `ranges`.
            unsafe { uffd.register(start, len, RegisterMode::MISSING) }?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("minimal-handler".into())
            .spawn(move || {
                let page = vec![0x5au8; PAGE_SIZE as usize];
                let mut events = Vec::with_capacity(1);
                while !flag.load(Ordering::Relaxed) {
                    if !uffd.wait(20)? {
                        continue;
                    }
                    events.clear();
                    uffd.read_events(&mut events, 1)?;
                    for event in events.drain(..) {
                        if let Event::PageFault { address, .. } = event {
                            let page_addr = address & !(PAGE_SIZE - 1);
                            // SAFETY: a missing page of a range registered above; COPY never
                            // overwrites a present page.
                            unsafe { uffd.copy(page_addr, &page, CopyMode::default()) }?;
                        }
                    }
                }
                Ok(())
            })?;
        Ok(MinimalHandler {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("started")
            .join()
            .map_err(|_| anyhow::anyhow!("the minimal handler panicked"))?
    }
}

/// `threads` host threads touch their slices of `[base, base + pages * 4K)`, one write per
/// page, timing each.
fn touch_with_threads(base: u64, pages: usize, threads: usize, samples: &mut Samples) {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let per_thread = pages / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = Arc::clone(&barrier);
            let first = base + (t * per_thread) as u64 * PAGE_SIZE;
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(per_thread);
                barrier.wait();
                for i in 0..per_thread as u64 {
                    let addr = first + i * PAGE_SIZE;
                    let start = Instant::now();
                    // SAFETY: `addr` is inside the benchmark's own live mapping.
                    unsafe { std::ptr::write_volatile(addr as *mut u64, addr) };
                    latencies.push(start.elapsed().as_secs_f64() * 1e6);
                }
                latencies
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for handle in handles {
        samples
            .latencies_us
            .extend(handle.join().expect("toucher thread"));
    }
    samples.seconds += start.elapsed().as_secs_f64();
    samples.pages += (per_thread * threads) as u64;
}

fn source_for(
    source: &'static str,
    image: &std::path::Path,
) -> anyhow::Result<Arc<dyn PageSource>> {
    Ok(match source {
        "zero" => Arc::new(ZeroSource),
        _ => Arc::new(FileSource::open(image)?),
    })
}

fn thread_case(
    opts: &FaultsOptions,
    threads: usize,
    source: &'static str,
    image: &std::path::Path,
) -> anyhow::Result<Case> {
    let pages = opts.thread_pages;
    let bytes = pages as u64 * PAGE_SIZE;
    let (mut ours, mut floor) = (Samples::default(), Samples::default());
    for _ in 0..opts.runs {
        let ram = GuestRam::new(bytes)?;
        let region = &ram.regions()[0];
        // Fault service against fault service: no pages installed ahead of the toucher (the
        // minimal handler has no such thing, and the touchers here walk in a line).
        let mut builder = PagerBuilder::new(PagerConfig {
            readahead_pages: opts.readahead,
            predict: false,
            ..Default::default()
        })?;
        // SAFETY: guest RAM made for this run, mapped until `ram` drops after the pager's
        // shutdown below.
        unsafe {
            builder.region(
                region.host_addr() as u64,
                region.size(),
                source_for(source, image)?,
            )
        }?;
        let pager = builder.start()?;
        touch_with_threads(region.host_addr() as u64, pages, threads, &mut ours);
        let stats = pager.shutdown();
        if stats.source_errors != 0 {
            bail!("the pager reported source errors: {stats:?}");
        }

        let ram = GuestRam::new(bytes)?;
        let region = &ram.regions()[0];
        // SAFETY: guest RAM made for this run; the handler stops before `ram` drops.
        let minimal =
            unsafe { MinimalHandler::start(&[(region.host_addr() as u64, region.size())]) }?;
        touch_with_threads(region.host_addr() as u64, pages, threads, &mut floor);
        minimal.stop()?;
    }
    Ok(make_case(
        format!("thread-{threads}-{source}"),
        "thread",
        threads,
        source,
        pages as u64,
        ours,
        floor,
    ))
}

/// TSC ticks per microsecond, measured against the monotonic clock.
fn tsc_ticks_per_us() -> f64 {
    // SAFETY: RDTSC has no preconditions on x86-64.
    let read = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), read());
    std::thread::sleep(Duration::from_millis(100));
    let (t1, c1) = (Instant::now(), read());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64() / 1e6
}

/// Runs `timedtouch` once and adds its per-page latencies (from guest memory) and rate.
fn run_timed_guest(
    mut vm: MicroVm,
    ticks_per_us: f64,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let report = vm.run()?;
    report.check()?;
    let expected = guests::touch_checksum(vm.range.start, vm.range.pages, vm.arg);
    if report.summed_report(0) != Some(expected) {
        bail!("timedtouch reported a wrong checksum");
    }
    for i in 0..vm.range.pages {
        let ticks = vm
            .vm
            .ram()
            .read_u64(vm.range.start + i * PAGE_SIZE + 8)
            .context("work range is RAM")?;
        samples.latencies_us.push(ticks as f64 / ticks_per_us);
    }
    let first = report
        .to_first_instruction
        .context("the guest never started")?;
    let done = report.to_completion.context("the guest never finished")?;
    samples.seconds += (done - first).as_secs_f64();
    samples.pages += vm.range.pages;
    Ok(())
}

fn vcpu_case(
    opts: &FaultsOptions,
    vcpus: u8,
    source: &'static str,
    image: &std::path::Path,
    ticks_per_us: f64,
) -> anyhow::Result<Case> {
    let guest = guests::find("timedtouch").expect("built in");
    let base = MicroOptions {
        mem: opts.vcpu_mem,
        vcpus,
        console: ConsoleSink::default(),
        ..MicroOptions::new(guest)
    };
    let (mut ours, mut floor) = (Samples::default(), Samples::default());
    let mut pages = 0;
    for _ in 0..opts.runs {
        let lazy = match source {
            "zero" => LazySpec::Zero,
            _ => LazySpec::File(image.into()),
        };
        let options = MicroOptions {
            lazy: Some(lazy),
            pager: PagerConfig {
                readahead_pages: opts.readahead,
                predict: false,
                ..Default::default()
            },
            ..base.clone()
        };
        let vm = MicroVm::new(&options)?;
        pages = vm.range.pages;
        run_timed_guest(vm, ticks_per_us, &mut ours)?;

        let vm = MicroVm::new(&base)?;
        let ranges: Vec<_> = vm
            .vm
            .ram()
            .regions()
            .iter()
            .map(|r| (r.host_addr() as u64, r.size()))
            .collect();
        // SAFETY: the VM's guest RAM, raw memory that nothing in Rust refers to; the handler
        // only fills missing pages, and the kernel drops the registration if the RAM is
        // unmapped before the handler stops.
        let minimal = unsafe { MinimalHandler::start(&ranges) }?;
        run_timed_guest(vm, ticks_per_us, &mut floor)?;
        minimal.stop()?;
    }
    Ok(make_case(
        format!("vcpu-{vcpus}-{source}"),
        "vcpu",
        usize::from(vcpus),
        source,
        pages,
        ours,
        floor,
    ))
}

fn make_case(
    name: String,
    toucher: &'static str,
    threads: usize,
    source: &'static str,
    pages: u64,
    ours: Samples,
    floor: Samples,
) -> Case {
    let (faultline, minimal) = (ours.side(), floor.side());
    Case {
        name,
        toucher,
        threads,
        source,
        pages,
        ratio_p50: ratio(faultline.p50_us, minimal.p50_us),
        ratio_faults_per_s: ratio(faultline.faults_per_s, minimal.faults_per_s),
        faultline,
        minimal,
    }
}

/// Pins this process (and the threads it creates from now on) to CPU 0.
fn pin_to_cpu0() -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(0);
    rustix::thread::sched_setaffinity(None, &set).context("cannot pin the benchmark to CPU 0")
}

/// Runs every case.
pub fn run(opts: &FaultsOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<FaultsBench> {
    if opts.pin_one_cpu {
        pin_to_cpu0()?;
    }
    let image_bytes = (opts.thread_pages as u64 * PAGE_SIZE).max(opts.vcpu_mem);
    let image = std::env::temp_dir().join(format!("faultline-bench-image-{}", std::process::id()));
    write_image(&image, image_bytes)?;
    let ticks_per_us = tsc_ticks_per_us();
    let mut cases = Vec::new();
    let result = (|| {
        for source in ["zero", "file"] {
            for threads in [1, 2] {
                progress(&format!("faults: host threads x{threads}, source {source}"));
                cases.push(thread_case(opts, threads, source, &image)?);
            }
        }
        for source in ["zero", "file"] {
            for vcpus in [1, 2] {
                progress(&format!("faults: vCPUs x{vcpus}, source {source}"));
                cases.push(vcpu_case(opts, vcpus, source, &image, ticks_per_us)?);
            }
        }
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_file(&image);
    result?;
    Ok(FaultsBench {
        bench: "faults",
        placement: if opts.pin_one_cpu {
            "one-cpu"
        } else {
            "unpinned"
        },
        readahead_pages: opts.readahead,
        runs: opts.runs,
        minimal: "one thread: poll, read one event, UFFDIO_COPY of a fixed page",
        cases,
    })
}

/// A fully populated image (no holes): every page holds its own offset.
fn write_image(path: &std::path::Path, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for page in 0..bytes / PAGE_SIZE {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        buf[..8].copy_from_slice(&(page * PAGE_SIZE).to_le_bytes());
        buf[8..16].fill(0xa5);
        file.write_all(&buf)?;
    }
    file.flush()?;
    Ok(())
}
