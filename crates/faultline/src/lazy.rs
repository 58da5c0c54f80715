//! Putting guest RAM behind the pager: which source serves it (`--lazy`), and the wiring
//! between the pager and the VM (vCPU thread ids, stopping the VM on a fatal source error).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use pager::{
    FileSource, OffsetSource, PageSource, Pager, PagerBuilder, PagerConfig, PagerHandle,
    SlowSource, ZeroSource,
};
use vmm::control::{RunControl, StopReason};
use vmm::vm::VcpuThreadHook;
use vmm::GuestRam;

/// Where lazily served guest RAM comes from.
#[derive(Clone)]
pub enum LazySpec {
    /// Every page starts as zero.
    Zero,
    /// A raw image of guest RAM: the regions, lowest address first, back to back.
    File(PathBuf),
    /// A source given by the program, laid out like `File` (tests; snapshot restore).
    Source(Arc<dyn PageSource>),
}

impl std::fmt::Debug for LazySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LazySpec::Zero => f.write_str("zero"),
            LazySpec::File(path) => write!(f, "file:{}", path.display()),
            LazySpec::Source(source) => write!(f, "source:{}", source.describe()),
        }
    }
}

impl std::str::FromStr for LazySpec {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            None if text == "zero" => Ok(LazySpec::Zero),
            Some(("file", path)) if !path.is_empty() => Ok(LazySpec::File(path.into())),
            _ => Err(format!(
                "{text:?} is not a page source: use \"zero\" or \"file:PATH\""
            )),
        }
    }
}

/// The vCPU-thread hook and the slot the pager handle goes into once the pager exists (the VM
/// is built before the pager, the threads start after it).
#[derive(Clone, Default)]
pub struct PagerLink(Arc<OnceLock<PagerHandle>>);

impl PagerLink {
    /// The hook to put in the VM config.
    pub fn vcpu_hook(&self) -> VcpuThreadHook {
        let slot = Arc::clone(&self.0);
        VcpuThreadHook(Arc::new(move |_, tid| {
            if let Some(handle) = slot.get() {
                handle.register_vcpu_thread(tid);
            }
        }))
    }
}

/// What guest RAM holds when the pager takes it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamState {
    /// The loader wrote some pages (the boot area): they are found and kept resident.
    Loaded,
    /// Nothing has written it (a restore): there is no residency to probe.
    Fresh,
}

/// Registers every RAM region with a new pager over `spec` and starts it. Pages already
/// written stay resident; the rest is served on first touch. A non-zero `source_latency` is
/// added to every read of the source (a stand-in for a remote store). Under
/// `FailurePolicy::Stop` a source failure stops the VM through `control`.
pub fn start_pager(
    ram: &GuestRam,
    ram_state: RamState,
    spec: &LazySpec,
    source_latency: Duration,
    config: PagerConfig,
    link: &PagerLink,
    control: Arc<RunControl>,
) -> anyhow::Result<Pager> {
    let image: Arc<dyn PageSource> = match spec {
        LazySpec::Zero => Arc::new(ZeroSource),
        LazySpec::File(path) => {
            Arc::new(FileSource::open(path).context("cannot open the memory image")?)
        }
        LazySpec::Source(source) => Arc::clone(source),
    };
    let image: Arc<dyn PageSource> = if source_latency.is_zero() {
        image
    } else {
        Arc::new(SlowSource {
            inner: image,
            delay: source_latency,
        })
    };
    let mut builder = PagerBuilder::new(config).context("cannot start the pager")?;
    let mut image_offset = 0;
    for region in ram.regions() {
        let source: Arc<dyn PageSource> = match spec {
            LazySpec::Zero => Arc::clone(&image),
            LazySpec::File(_) | LazySpec::Source(_) => Arc::new(OffsetSource {
                inner: Arc::clone(&image),
                base: image_offset,
            }),
        };
        let (start, len) = (region.host_addr() as u64, region.size());
        // SAFETY: guest RAM is raw memory that no Rust object owns; the caller keeps it mapped
        // until the pager has shut down (see `MicroVm` and `RestoredVm`, which drop the pager
        // before the VM and its RAM).
        let registered = unsafe {
            match ram_state {
                RamState::Fresh => builder.region_untouched(start, len, source),
                RamState::Loaded => builder.region(start, len, source),
            }
        };
        let index = registered.with_context(|| {
            format!(
                "cannot put guest RAM at {:#x} behind the pager",
                region.gpa()
            )
        })?;
        // Swap-out reads pages from the memfd and releases them there.
        builder.backing(index, region.memfd_file(), 0)?;
        image_offset += region.size();
    }
    builder.on_fatal(move |message| {
        tracing::error!("stopping the VM: {message}");
        control.request_stop(StopReason::MemoryUnavailable);
    });
    let pager = builder.start()?;
    let _ = link.0.set(pager.handle());
    Ok(pager)
}

/// Feeds the guest's writes, from the VM's dirty log, to the pager's eviction (a resident
/// limit swaps out the pages least recently faulted in *or written*): a thread reads the
/// dirty pages every [`RECENCY_PERIOD`] without taking them (diff snapshots and migrations
/// still get every one) and notes them. Stops when dropped.
pub struct RecencyFeed {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the dirty log is read for eviction.
const RECENCY_PERIOD: Duration = Duration::from_millis(20);

impl RecencyFeed {
    /// Starts the feed for the VM behind `handle`, which must log dirty pages.
    pub fn start(handle: vmm::VmHandle, pager: PagerHandle) -> anyhow::Result<RecencyFeed> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        // Pager regions are the RAM regions, in order: page `i` of RAM (regions back to back)
        // is page `i - base` of its region.
        let bases: Vec<(u64, u64)> = {
            let mut base = 0;
            handle
                .ram()
                .regions()
                .iter()
                .map(|r| {
                    let pages = r.size() / vmm::PAGE_SIZE;
                    base += pages;
                    (base - pages, pages)
                })
                .collect()
        };
        let thread = std::thread::Builder::new()
            .name("recency-feed".into())
            .spawn(move || {
                while !stopped.load(std::sync::atomic::Ordering::Acquire) {
                    std::thread::sleep(RECENCY_PERIOD);
                    let Ok(Some(dirty)) = handle.memory().peek_dirty_pages() else {
                        continue;
                    };
                    for page in dirty.iter() {
                        if let Some(region) = bases
                            .iter()
                            .position(|&(base, pages)| page >= base && page < base + pages)
                        {
                            pager.note_written(region, (page - bases[region].0) as usize);
                        }
                    }
                }
            })
            .context("cannot start the recency feed")?;
        Ok(RecencyFeed {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for RecencyFeed {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert!(matches!("zero".parse::<LazySpec>(), Ok(LazySpec::Zero)));
        assert!(
            matches!("file:/tmp/x".parse::<LazySpec>(), Ok(LazySpec::File(p)) if p == std::path::Path::new("/tmp/x"))
        );
        assert!("file:".parse::<LazySpec>().is_err());
        assert!("nfs:/x".parse::<LazySpec>().unwrap_err().contains("zero"));
    }
}
