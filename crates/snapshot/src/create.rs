//! Taking a snapshot: pause the VM (if it runs), save its machine state and memory into a new
//! directory, and resume it. The directory appears whole or not at all: everything is written
//! into a staging directory beside it, which is renamed into place last.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use vmm::{DirtyPages, GuestRam, MachineState, VmHandle};

use crate::memory::{self, LayerKind, MemorySpan, WriteSummary};
use crate::state::{self, GuestInfo, MemoryKind, RamRange, SnapshotState};
use crate::SnapshotError;

/// Whether guest RAM is all in place, or partly still behind the pager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Every page lives in the memfd: pages that are holes there are zero and are skipped
    /// without being read (reading them would allocate them).
    Resident,
    /// Pages may still be in a page source: every page is read through the mapping, which
    /// makes the pager install what is missing.
    Lazy,
}

/// What to take.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The new snapshot's directory; it must not exist.
    pub dir: PathBuf,
    /// Take a diff snapshot layered on this one (the VM's previous snapshot, taken with dirty
    /// tracking on): only the pages written since then are saved.
    pub diff_parent: Option<PathBuf>,
    /// The micro-guest that runs, if any.
    pub guest: Option<GuestInfo>,
    pub backing: MemoryBacking,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct CreateSummary {
    pub dir: PathBuf,
    #[serde(rename = "type")]
    pub kind: MemoryKind,
    pub parent: Option<PathBuf>,
    pub vcpus: usize,
    pub memory: WriteSummary,
    /// How long the VM was paused for the snapshot (0 if it was paused already).
    pub paused_ms: f64,
}

/// Which pages a snapshot's memory image holds.
pub enum Pages<'a> {
    /// All of RAM.
    Full,
    /// The pages written since `parent`.
    Diff {
        parent: &'a Path,
        dirty: &'a DirtyPages,
    },
}

/// Snapshots a VM through its handle. A running VM is paused for the duration and resumed
/// afterwards (also when the snapshot fails); a paused VM stays paused.
pub fn create(handle: &VmHandle, options: &CreateOptions) -> Result<CreateSummary, SnapshotError> {
    let was_paused = handle.control().is_paused();
    let started = Instant::now();
    if !was_paused {
        handle.pause().map_err(SnapshotError::Vm)?;
    }
    let result = (|| {
        let machine = handle.paused_state().map_err(SnapshotError::Vm)?;
        // The dirty log is read (and reset) at every snapshot, so that a diff holds exactly the
        // pages written since the snapshot before it.
        let dirty = if handle.tracks_dirty() {
            Some(handle.take_dirty_pages().map_err(SnapshotError::Vm)?)
        } else {
            None
        };
        let pages = match (&options.diff_parent, &dirty) {
            (None, _) => Pages::Full,
            (Some(parent), Some(dirty)) => Pages::Diff { parent, dirty },
            (Some(_), None) => {
                return Err(SnapshotError::Usage(
                    "a diff snapshot needs dirty tracking (start the VM with --track-dirty)".into(),
                ))
            }
        };
        write(
            &options.dir,
            machine,
            handle.ram(),
            pages,
            options.guest.clone(),
            handle.tracks_dirty(),
            options.backing,
        )
    })();
    let paused_ms = started.elapsed().as_secs_f64() * 1e3;
    if !was_paused {
        handle.resume().map_err(SnapshotError::Vm)?;
    }
    let memory = result?;
    Ok(CreateSummary {
        dir: options.dir.clone(),
        kind: if options.diff_parent.is_some() {
            MemoryKind::Diff
        } else {
            MemoryKind::Full
        },
        parent: options.diff_parent.clone(),
        vcpus: usize::from(handle.vcpu_count()),
        memory,
        paused_ms: if was_paused { 0.0 } else { paused_ms },
    })
}

/// Per page of RAM (regions back to back): whether its memfd holds data there. Holes are zero
/// pages that were never written.
fn resident_pages(ram: &GuestRam) -> Result<Vec<bool>, SnapshotError> {
    let page = vmm::PAGE_SIZE;
    let mut data = vec![false; (ram.size() / page) as usize];
    let mut base = 0usize;
    for region in ram.regions() {
        let extents = pager::data_extents(region.memfd(), region.size()).map_err(|source| {
            SnapshotError::Io {
                path: PathBuf::from(format!("memfd of RAM at {:#x}", region.gpa())),
                source,
            }
        })?;
        for (start, end) in extents {
            for p in start / page..end.div_ceil(page) {
                data[base + p as usize] = true;
            }
        }
        base += (region.size() / page) as usize;
    }
    Ok(data)
}

/// Writes a snapshot of a VM that is not running (paused, or never started) from its machine
/// state and RAM into the new directory `dir`.
pub fn write(
    dir: &Path,
    machine: MachineState,
    ram: &GuestRam,
    pages: Pages<'_>,
    guest: Option<GuestInfo>,
    track_dirty: bool,
    backing: MemoryBacking,
) -> Result<WriteSummary, SnapshotError> {
    if dir.exists() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    let name = dir.file_name().ok_or_else(|| {
        SnapshotError::Usage(format!("{} is not a directory name", dir.display()))
    })?;
    let staging = dir.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(SnapshotError::io(&staging))?;
    let result = (|| {
        let spans: Vec<MemorySpan> = ram
            .regions()
            .iter()
            // SAFETY: the regions are mappings owned by `ram`, which outlives this call; the
            // VM is paused or stopped, so nothing writes them meanwhile.
            .map(|r| unsafe { MemorySpan::new(r.host_addr() as *const u8, r.size()) })
            .collect();
        let (kind, parent, summary) = match pages {
            Pages::Full => {
                let summary = match backing {
                    MemoryBacking::Resident => {
                        let data = resident_pages(ram)?;
                        let include = |page: u64| data[page as usize];
                        memory::write_image(&staging, &spans, LayerKind::Full, Some(&include))?
                    }
                    MemoryBacking::Lazy => {
                        memory::write_image(&staging, &spans, LayerKind::Full, None)?
                    }
                };
                (MemoryKind::Full, None, summary)
            }
            Pages::Diff { parent, dirty } => {
                let include = |page: u64| dirty.contains(page);
                let summary =
                    memory::write_image(&staging, &spans, LayerKind::Diff, Some(&include))?;
                let parent = std::fs::canonicalize(parent).map_err(SnapshotError::io(parent))?;
                (MemoryKind::Diff, Some(parent), summary)
            }
        };
        let state = SnapshotState {
            faultline_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix_ms: state::now_unix_ms(),
            layout: ram
                .regions()
                .iter()
                .map(|r| RamRange {
                    gpa: r.gpa(),
                    size: r.size(),
                })
                .collect(),
            memory: kind,
            parent,
            track_dirty,
            guest,
            machine,
        };
        state::write(&staging, &state)?;
        std::fs::rename(&staging, dir).map_err(SnapshotError::io(dir))?;
        Ok(summary)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}
