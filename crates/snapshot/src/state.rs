//! The state file: everything but memory that a restore needs, in a checksummed container
//! with a JSON payload (KVM structures appear as their raw bytes), and the chain of parent
//! snapshots a diff snapshot is layered on.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm::MachineState;

use crate::{container, SnapshotError, STATE_FILE};

/// The state file's magic.
pub const STATE_MAGIC: [u8; 8] = *b"FLTSTATE";
/// The state format this build writes and reads.
pub const STATE_VERSION: u32 = 1;
/// The longest diff chain a restore follows (a guard against loops and runaway chains).
pub const MAX_CHAIN: usize = 64;

/// One guest-physical RAM range; the memory image holds the ranges back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    pub gpa: u64,
    pub size: u64,
}

/// The micro-guest that was running, so that a restore can report and check its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    pub name: String,
    pub range_start: u64,
    pub range_pages: u64,
    pub arg: u64,
}

/// Whether the memory image holds all of RAM or the pages written since its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryKind {
    Full,
    Diff,
}

/// The contents of a state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The faultline version that wrote it.
    pub faultline_version: String,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Guest RAM, lowest address first.
    pub layout: Vec<RamRange>,
    pub memory: MemoryKind,
    /// For a diff: the snapshot it is layered on (a path relative to this snapshot's directory,
    /// or absolute).
    pub parent: Option<PathBuf>,
    /// Whether the VM logged dirty pages (a restore keeps doing so).
    pub track_dirty: bool,
    pub guest: Option<GuestInfo>,
    pub machine: MachineState,
}

impl SnapshotState {
    /// Total RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.layout.iter().map(|r| r.size).sum()
    }
}

/// Writes `dir/state`.
pub fn write(dir: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let payload = serde_json::to_vec(state)
        .map_err(|e| SnapshotError::malformed(&path, format!("cannot encode: {e}")))?;
    container::write(&path, &STATE_MAGIC, STATE_VERSION, &payload)
}

/// Reads and checks `dir/state`.
pub fn read(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let payload = container::read(&path, &STATE_MAGIC, STATE_VERSION)?;
    let state: SnapshotState = serde_json::from_slice(&payload)
        .map_err(|e| SnapshotError::malformed(&path, e.to_string()))?;
    if state.machine.vcpus.is_empty() {
        return Err(SnapshotError::malformed(&path, "no vCPUs"));
    }
    if state.layout.is_empty() || state.ram_size() == 0 {
        return Err(SnapshotError::malformed(&path, "no RAM"));
    }
    if state.memory == MemoryKind::Diff && state.parent.is_none() {
        return Err(SnapshotError::malformed(
            &path,
            "a diff snapshot without a parent",
        ));
    }
    Ok(state)
}

/// The directories of the snapshot at `dir`, whose state `first` the caller has read, and of
/// the parents it is layered on, newest first, ending with a full snapshot. Every layer must
/// describe the same RAM layout.
pub fn chain(dir: &Path, first: &SnapshotState) -> Result<Vec<PathBuf>, SnapshotError> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut parent = first
        .parent
        .clone()
        .filter(|_| first.memory == MemoryKind::Diff);
    while let Some(relative) = parent {
        if dirs.len() >= MAX_CHAIN {
            return Err(SnapshotError::Layers(format!(
                "the chain from {} is longer than {MAX_CHAIN} snapshots (a loop?)",
                dir.display()
            )));
        }
        let child = dirs.last().expect("the chain starts with `dir`");
        let parent_dir = child.join(relative);
        let parent_state = read(&parent_dir)?;
        if parent_state.layout != first.layout {
            return Err(SnapshotError::Layers(format!(
                "{} and its parent {} describe different RAM",
                child.display(),
                parent_dir.display()
            )));
        }
        parent = parent_state
            .parent
            .filter(|_| parent_state.memory == MemoryKind::Diff);
        dirs.push(parent_dir);
    }
    Ok(dirs)
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
