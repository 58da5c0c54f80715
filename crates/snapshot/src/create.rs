//! Taking a snapshot: check where it goes, pause the VM (if it runs), save its machine state
//! and memory into a new directory, and resume it. The directory appears whole or not at all:
//! everything is written into a staging directory beside it, which is renamed into place last
//! (and the rename synced). A snapshot that fails leaves nothing behind, and gives the dirty
//! log it took back to the VM, so that the next diff still holds every page written since the
//! last snapshot that was taken.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use vmm::{DirtyMode, DirtyPages, GuestRam, MachineState, MemoryMap, TrackedRange, VmHandle};

use crate::container;
use crate::memory::{self, LayerKind, MemorySpan, WriteSummary};
use crate::state::{self, GuestInfo, MemoryKind, ParentRef, RamRange, SnapshotRef, SnapshotState};
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
    /// The new snapshot's directory; it must not exist, and its parent must.
    pub dir: PathBuf,
    /// Take a diff snapshot layered on this one (the VM's previous snapshot, taken with dirty
    /// tracking on): only the pages written since then are saved. It is refused if the
    /// snapshot there now is not the one taken ([`SnapshotError::ParentReplaced`]).
    pub diff_parent: Option<SnapshotRef>,
    /// The micro-guest that runs, if any.
    pub guest: Option<GuestInfo>,
    pub backing: MemoryBacking,
    /// The pager that serves guest memory, if one does. A snapshot is not published once it
    /// has failed ([`SnapshotError::PagerFailed`]): a page it read may be wrong.
    pub pager: Option<pager::PagerHandle>,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct CreateSummary {
    pub dir: PathBuf,
    #[serde(rename = "type")]
    pub kind: MemoryKind,
    pub parent: Option<PathBuf>,
    /// Its [`state::identity`].
    pub identity: String,
    pub vcpus: usize,
    pub memory: WriteSummary,
    /// How long the VM was paused for the snapshot (0 if it was paused already).
    pub paused_ms: f64,
    /// A live snapshot's figures (the VM ran while its memory was written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<crate::live::LiveStats>,
}

/// What a snapshot's memory image holds: all of RAM, or the pages written since a parent.
enum Layer<'a> {
    Full,
    Diff {
        parent: ParentRef,
        dirty: &'a DirtyPages,
    },
}

/// Snapshots a VM through its handle. Everything that can be checked without the VM is checked
/// first (the directory, the diff parent, dirty tracking) and the staging directory is made;
/// only then is a running VM paused, for the duration, and resumed afterwards (also when the
/// snapshot fails); a paused VM stays paused. If the snapshot fails once the dirty log was
/// taken, the log is given back to the VM (see [`VmHandle::return_dirty_pages`]).
pub fn create(handle: &VmHandle, options: &CreateOptions) -> Result<CreateSummary, SnapshotError> {
    let staging = Staging::create(&options.dir)?;
    let parent = check_parent(handle, options)?;
    let was_paused = handle.control().is_paused();
    let started = Instant::now();
    if !was_paused {
        handle.pause().map_err(SnapshotError::Vm)?;
    }
    let result = take(handle, staging, parent, options);
    let paused_ms = started.elapsed().as_secs_f64() * 1e3;
    if !was_paused {
        if let Err(e) = handle.resume() {
            // What the snapshot did is the answer: one published took the dirty log, so
            // calling it failed would leave the next diff without those pages. A VM left
            // paused shows as paused.
            tracing::warn!("snapshot: the VM could not be resumed after it: {e}");
        }
    }
    let (memory, identity) = result?;
    Ok(CreateSummary {
        dir: options.dir.clone(),
        kind: if options.diff_parent.is_some() {
            MemoryKind::Diff
        } else {
            MemoryKind::Full
        },
        parent: options
            .diff_parent
            .as_ref()
            .map(|parent| parent.dir.clone()),
        identity,
        vcpus: usize::from(handle.vcpu_count()),
        memory,
        paused_ms: if was_paused { 0.0 } else { paused_ms },
        live: None,
    })
}

/// A diff's parent, checked (the VM logs dirty pages) and resolved; `None` for a full
/// snapshot.
pub(crate) fn check_parent(
    handle: &VmHandle,
    options: &CreateOptions,
) -> Result<Option<ParentRef>, SnapshotError> {
    match &options.diff_parent {
        None => Ok(None),
        Some(_) if !handle.tracks_dirty() => Err(no_dirty_tracking()),
        Some(parent) => Ok(Some(parent_ref(&options.dir, parent)?)),
    }
}

/// The error for a diff of a VM that does not log dirty pages.
pub(crate) fn no_dirty_tracking() -> SnapshotError {
    SnapshotError::Usage(
        "a diff snapshot needs dirty tracking (start the VM with --track-dirty)".into(),
    )
}

/// Saves the paused VM into `staging` and publishes it; returns what was written and the
/// snapshot's identity. The dirty log is read (and reset) at every snapshot, so that a diff
/// holds exactly the pages written since the snapshot before it; if anything fails after that,
/// the pages are given back before the staging directory is removed.
fn take(
    handle: &VmHandle,
    mut staging: Staging,
    parent: Option<ParentRef>,
    options: &CreateOptions,
) -> Result<(WriteSummary, String), SnapshotError> {
    let machine = handle.paused_state().map_err(SnapshotError::Vm)?;
    let dirty = if handle.tracks_dirty() {
        Some(handle.take_dirty_pages().map_err(SnapshotError::Vm)?)
    } else {
        None
    };
    let layer = match (parent, &dirty) {
        (None, _) => Ok(Layer::Full),
        (Some(parent), Some(dirty)) => Ok(Layer::Diff { parent, dirty }),
        // `create` checked this before pausing.
        (Some(_), None) => Err(no_dirty_tracking()),
    };
    let result = layer
        .and_then(|layer| {
            fill(
                staging.path(),
                machine,
                handle.ram(),
                layer,
                options.guest.clone(),
                Watch::of(handle.memory()),
                options.backing,
            )
        })
        .and_then(|summary| Ok((summary, state::identity(staging.path())?)))
        .and_then(|written| staging.publish(options.pager.as_ref()).map(|()| written));
    if result.is_err() {
        if let Some(dirty) = dirty {
            handle.return_dirty_pages(dirty);
        }
    }
    // Removes the staging directory, unless it was published.
    drop(staging);
    result
}

/// The directory a new snapshot is written into: `.NAME.partial-PID` beside its final place
/// `dir`. It is removed when dropped, unless it was published.
pub(crate) struct Staging {
    dir: PathBuf,
    path: PathBuf,
    published: bool,
}

impl Staging {
    /// Checks that `dir` can be created (it does not exist, it has a name, its parent is a
    /// directory) and creates the staging directory, which proves the parent writable.
    pub(crate) fn create(dir: &Path) -> Result<Staging, SnapshotError> {
        if std::fs::symlink_metadata(dir).is_ok() {
            return Err(SnapshotError::Exists(dir.to_path_buf()));
        }
        let name = dir.file_name().ok_or_else(|| {
            SnapshotError::Usage(format!("{} is not a directory name", dir.display()))
        })?;
        let parent = container::parent_dir(dir);
        match std::fs::metadata(parent) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(SnapshotError::Usage(format!(
                    "cannot create {}: {} is not a directory",
                    dir.display(),
                    parent.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::Usage(format!(
                    "cannot create {}: {} does not exist",
                    dir.display(),
                    parent.display()
                )))
            }
            Err(source) => {
                return Err(SnapshotError::Io {
                    path: parent.to_path_buf(),
                    source,
                })
            }
        }
        let path = dir.with_file_name(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        // A leftover of an earlier snapshot by a process with the same id.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(SnapshotError::io(&path))?;
        Ok(Staging {
            dir: dir.to_path_buf(),
            path,
            published: false,
        })
    }

    /// The staging directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the staging directory into place and syncs the directory that holds it, unless
    /// `pager` (the one serving guest memory, if any) has failed: a page it read may be wrong
    /// ([`SnapshotError::PagerFailed`]). Looked at after the last page was read, so a failure
    /// after the rename cannot concern it. If the sync fails, the snapshot is removed again:
    /// it might not survive a crash.
    pub(crate) fn publish(
        &mut self,
        pager: Option<&pager::PagerHandle>,
    ) -> Result<(), SnapshotError> {
        if let Some(fatal) = pager.and_then(pager::PagerHandle::fatal_error) {
            return Err(SnapshotError::PagerFailed(fatal));
        }
        std::fs::rename(&self.path, &self.dir).map_err(SnapshotError::io(&self.dir))?;
        if let Err(e) = container::sync_dir(container::parent_dir(&self.dir)) {
            let _ = std::fs::remove_dir_all(&self.dir);
            return Err(e);
        }
        self.published = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// How the diff to be written at `dir` (which does not exist yet) refers to `parent`: the
/// path from `dir` to `parent`, both canonical, and the parent's identity, which must still
/// be the one it was written with.
fn parent_ref(dir: &Path, parent: &SnapshotRef) -> Result<ParentRef, SnapshotError> {
    let name = dir.file_name().ok_or_else(|| {
        SnapshotError::Usage(format!("{} is not a directory name", dir.display()))
    })?;
    let holder = container::parent_dir(dir);
    let from = std::fs::canonicalize(holder)
        .map_err(SnapshotError::io(holder))?
        .join(name);
    let to = std::fs::canonicalize(&parent.dir).map_err(SnapshotError::io(&parent.dir))?;
    let found = state::identity(&to)?;
    if found != parent.identity {
        return Err(SnapshotError::ParentReplaced {
            parent: parent.dir.clone(),
            expected: parent.identity.clone(),
            found,
        });
    }
    Ok(ParentRef {
        path: state::relative_path(&from, &to),
        identity: found,
    })
}

/// Per page of RAM (regions back to back): whether its memfd holds data there. Holes are zero
/// pages that were never written.
pub(crate) fn resident_pages(ram: &GuestRam) -> Result<Vec<bool>, SnapshotError> {
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

/// Writes a full snapshot of a VM that is not running (paused, or never started) from its
/// machine state and RAM into the new directory `dir`: checks `dir` and makes its staging
/// directory, then fills and publishes it, unless `pager` (the one serving its RAM, if any)
/// failed meanwhile ([`SnapshotError::PagerFailed`]). Nothing is left behind if it fails.
pub fn write(
    dir: &Path,
    machine: MachineState,
    ram: &GuestRam,
    guest: Option<GuestInfo>,
    watch: Watch,
    backing: MemoryBacking,
    pager: Option<pager::PagerHandle>,
) -> Result<WriteSummary, SnapshotError> {
    let mut staging = Staging::create(dir)?;
    let summary = fill(
        staging.path(),
        machine,
        ram,
        Layer::Full,
        guest,
        watch,
        backing,
    )?;
    staging.publish(pager.as_ref())?;
    Ok(summary)
}

/// What the VM watched of its memory, recorded in its snapshots.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    /// Whether it logged dirty pages.
    pub track_dirty: bool,
    /// The pages it tracked.
    pub tracking: Vec<TrackedRange>,
}

impl Watch {
    /// What `memory` watches now.
    pub fn of(memory: &MemoryMap) -> Self {
        Watch {
            track_dirty: memory.dirty_mode() != DirtyMode::Off,
            tracking: memory.tracked(),
        }
    }
}

/// The state of a VM with `ram`, as a snapshot (or a migration) records it.
pub fn state_of(
    machine: MachineState,
    ram: &GuestRam,
    guest: Option<GuestInfo>,
    watch: Watch,
    memory: MemoryKind,
    parent: Option<ParentRef>,
) -> SnapshotState {
    SnapshotState {
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
        memory,
        parent,
        track_dirty: watch.track_dirty,
        tracking: watch.tracking,
        guest,
        machine,
    }
}

/// Writes the memory image and the state file of a snapshot into `staging`.
fn fill(
    staging: &Path,
    machine: MachineState,
    ram: &GuestRam,
    layer: Layer<'_>,
    guest: Option<GuestInfo>,
    watch: Watch,
    backing: MemoryBacking,
) -> Result<WriteSummary, SnapshotError> {
    let spans: Vec<MemorySpan> = ram
        .regions()
        .iter()
        .map(|r| match backing {
            // SAFETY: the regions are mappings owned by `ram`, which outlives this call; the
            // VM is paused or stopped, so nothing writes them meanwhile; every page is
            // resident memory that reads cannot fail on.
            MemoryBacking::Resident => unsafe {
                MemorySpan::new(r.host_addr() as *const u8, r.size())
            },
            // Pages behind the pager may be poisoned: read them with system calls.
            MemoryBacking::Lazy => MemorySpan::read_checked(r.host_addr() as u64, r.size()),
        })
        .collect();
    let (kind, parent, summary) = match layer {
        Layer::Full => {
            let summary = match backing {
                MemoryBacking::Resident => {
                    let data = resident_pages(ram)?;
                    let include = |page: u64| data[page as usize];
                    memory::write_image(staging, &spans, LayerKind::Full, Some(&include))?
                }
                MemoryBacking::Lazy => memory::write_image(staging, &spans, LayerKind::Full, None)?,
            };
            (MemoryKind::Full, None, summary)
        }
        Layer::Diff { parent, dirty } => {
            let include = |page: u64| dirty.contains(page);
            let summary = memory::write_image(staging, &spans, LayerKind::Diff, Some(&include))?;
            (MemoryKind::Diff, Some(parent), summary)
        }
    };
    let state = state_of(machine, ram, guest, watch, kind, parent);
    state::write(staging, &state)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{machine, TempDir};

    fn ram() -> GuestRam {
        GuestRam::new(vmm::memory::MIN_RAM).unwrap()
    }

    /// Writes a full snapshot of a fresh 2 MiB VM with one vCPU into `dir`.
    fn write_full(dir: &Path) -> Result<WriteSummary, SnapshotError> {
        let watch = Watch {
            track_dirty: true,
            tracking: Vec::new(),
        };
        write(
            dir,
            machine(1),
            &ram(),
            None,
            watch,
            MemoryBacking::Resident,
            None,
        )
    }

    /// The names in `dir`, sorted.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_full_snapshot_is_written_whole_and_reads_back() {
        let tmp = TempDir::new("create-full");
        let dir = tmp.path().join("full");
        let summary = write_full(&dir).unwrap();
        assert_eq!(
            summary.pages_included,
            vmm::memory::MIN_RAM / vmm::PAGE_SIZE
        );
        assert_eq!(
            entries(tmp.path()),
            ["full"],
            "no staging directory is left"
        );
        assert_eq!(
            entries(&dir),
            [crate::MEMORY_FILE, crate::SUMS_FILE, crate::STATE_FILE]
        );
        let state = state::read(&dir).unwrap();
        assert_eq!(state.memory, MemoryKind::Full);
        assert_eq!(state.parent, None);
        assert_eq!(state.ram_size(), vmm::memory::MIN_RAM);
        assert_eq!(
            state::chain(&dir, &state).unwrap(),
            std::slice::from_ref(&dir)
        );
    }

    #[test]
    fn a_bad_directory_fails_before_anything_is_written() {
        let tmp = TempDir::new("create-bad-dir");
        let existing = tmp.subdir("existing");
        match write_full(&existing) {
            Err(SnapshotError::Exists(path)) => assert_eq!(path, existing),
            other => panic!("{other:?}"),
        }
        assert!(entries(&existing).is_empty());

        let file = tmp.path().join("file");
        std::fs::write(&file, b"not a directory").unwrap();
        match write_full(&file.join("snap")) {
            Err(SnapshotError::Usage(message)) => {
                assert!(message.contains("is not a directory"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        match write_full(&tmp.path().join("missing").join("snap")) {
            Err(SnapshotError::Usage(message)) => {
                assert!(message.contains("does not exist"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            write_full(&tmp.path().join("full").join("..")),
            Err(SnapshotError::Usage(_))
        ));
        assert_eq!(entries(tmp.path()), ["existing", "file"]);
        assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
    }

    #[test]
    fn staging_is_removed_unless_published() {
        let tmp = TempDir::new("create-staging");
        let dir = tmp.path().join("snap");
        let staging = Staging::create(&dir).unwrap();
        let name = format!(".snap.partial-{}", std::process::id());
        assert_eq!(staging.path(), tmp.path().join(&name));
        assert!(staging.path().is_dir());
        drop(staging);
        assert!(entries(tmp.path()).is_empty());

        let mut staging = Staging::create(&dir).unwrap();
        std::fs::write(staging.path().join("x"), b"x").unwrap();
        staging.publish(None).unwrap();
        drop(staging);
        assert_eq!(entries(tmp.path()), ["snap"]);
        assert_eq!(std::fs::read(dir.join("x")).unwrap(), b"x");
    }

    #[test]
    fn a_diff_refers_to_its_parent_by_relative_path_and_identity() {
        let tmp = TempDir::new("create-parent-ref");
        let base = tmp.path().join("base");
        write_full(&base).unwrap();
        let diffs = tmp.subdir("diffs");
        let taken = |dir: PathBuf| SnapshotRef {
            identity: state::identity(&base).unwrap(),
            dir,
        };
        let parent = parent_ref(&diffs.join("d1"), &taken(base.clone())).unwrap();
        assert_eq!(parent.path, Path::new("../../base"));
        assert_eq!(parent.identity, state::identity(&base).unwrap());
        let sibling = parent_ref(
            &tmp.path().join("d1"),
            &taken(diffs.join("..").join("base")),
        )
        .unwrap();
        assert_eq!(sibling.path, Path::new("../base"));
        match parent_ref(&tmp.path().join("d2"), &taken(tmp.path().join("gone"))) {
            Err(SnapshotError::Io { path, .. }) => assert_eq!(path, tmp.path().join("gone")),
            other => panic!("{other:?}"),
        }
        // Another snapshot put where the one taken was: no diff is layered on it.
        let replaced = SnapshotRef {
            identity: "0-0-0-0".into(),
            dir: base.clone(),
        };
        match parent_ref(&diffs.join("d3"), &replaced) {
            Err(SnapshotError::ParentReplaced { parent, found, .. }) => {
                assert_eq!(
                    (parent, found),
                    (base.clone(), state::identity(&base).unwrap())
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
