//! The state file: everything but memory that a restore needs, in a checksummed container
//! with a postcard payload (KVM structures appear as their raw bytes), and the chain of parent
//! snapshots a diff snapshot is layered on.
//!
//! A diff names its parent by a path relative to its own directory (so that a chain moved as
//! a whole still resolves) and by the parent's [`identity`] when the diff was taken (so that a
//! parent directory replaced by another snapshot, or changed, is refused rather than used).

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm::memory::{ram_ranges, MIN_RAM};
use vmm::state::VcpuState;
use vmm::vm::MAX_VCPUS;
use vmm::{MachineState, TrackedRange, PAGE_SIZE};

use crate::{container, SnapshotError, STATE_FILE, SUMS_FILE};

/// The state file's magic.
pub const STATE_MAGIC: [u8; 8] = *b"FLTSTATE";
/// The state format this build writes (2: parents are relative paths with an identity; 3: the
/// payload is postcard, not JSON). Postcard writes every field and names none, so a field
/// added or changed means a new version.
pub const STATE_VERSION: u32 = 3;
/// The last format with a JSON payload, still read (snapshots taken before version 3).
pub const JSON_STATE_VERSION: u32 = 2;
/// The longest diff chain a restore follows (a guard against loops and runaway chains).
pub const MAX_CHAIN: usize = 64;
/// The most guest RAM a state file may describe: 1 TiB.
pub const MAX_RAM: u64 = 1 << 40;

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

/// The snapshot a diff is layered on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's directory, relative to the diff's own directory (such as `../base`).
    pub path: PathBuf,
    /// The parent's [`identity`] when the diff was taken.
    pub identity: String,
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
    /// For a diff: the snapshot it is layered on.
    pub parent: Option<ParentRef>,
    /// Whether the VM logged dirty pages (a restore keeps doing so).
    pub track_dirty: bool,
    /// The pages the VM tracked, with their users (a restore tracks them again if asked).
    /// (`default`: for state files of the JSON format written before there was tracking.)
    #[serde(default)]
    pub tracking: Vec<TrackedRange>,
    pub guest: Option<GuestInfo>,
    pub machine: MachineState,
}

impl SnapshotState {
    /// Total RAM in bytes (saturating: [`read`] refuses layouts past [`MAX_RAM`]).
    pub fn ram_size(&self) -> u64 {
        self.layout
            .iter()
            .fold(0u64, |total, r| total.saturating_add(r.size))
    }
}

/// Writes `dir/state`.
pub fn write(dir: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let payload = encode(&path, state)?;
    container::write(&path, &STATE_MAGIC, STATE_VERSION, &payload)
}

/// Reads and checks `dir/state`: the container, then the contents (see [`decode`]). A state
/// file of [`JSON_STATE_VERSION`] is read as the JSON it holds.
pub fn read(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(SnapshotError::io(&path))?;
    // Read once, checked as the version it says if that is the JSON one, else as this one.
    let json = container::version_of(&bytes) == Some(JSON_STATE_VERSION);
    let version = if json {
        JSON_STATE_VERSION
    } else {
        STATE_VERSION
    };
    let payload = &bytes[container::check(&path, &bytes, &STATE_MAGIC, version)?];
    if !json {
        return decode(&path, payload);
    }
    let state = serde_json::from_slice(payload)
        .map_err(|e| SnapshotError::malformed(&path, format!("the state does not decode: {e}")))?;
    validate(&path, &state)?;
    Ok(state)
}

/// The state's payload, as a state file holds it and a migration stream carries it: postcard
/// (a compact binary serde form; KVM structures are their raw bytes, copied, not parsed
/// number by number as JSON made them, which mattered inside a migration's downtime). Errors
/// name `path`, where the state was going.
pub fn encode(path: &Path, state: &SnapshotState) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_stdvec(state)
        .map_err(|e| SnapshotError::malformed(path, format!("cannot encode the state: {e}")))
}

/// Decodes a payload [`encode`] made and checks it (see [`validate`]); errors name `path`,
/// where it came from. Bytes after the state are refused.
pub fn decode(path: &Path, payload: &[u8]) -> Result<SnapshotState, SnapshotError> {
    let (state, rest): (SnapshotState, _) = postcard::take_from_bytes(payload)
        .map_err(|e| SnapshotError::malformed(path, format!("the state does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(SnapshotError::malformed(
            path,
            format!("{} bytes follow the state", rest.len()),
        ));
    }
    validate(path, &state)?;
    Ok(state)
}

/// Checks what decoding cannot: the vCPU count and order, the RAM layout (page aligned,
/// [`MIN_RAM`] to [`MAX_RAM`], and the layout faultline builds for its size), the guest's
/// range (inside one RAM range) and the parent (relative, present for a diff). A failure is a
/// [`SnapshotError::Malformed`] for `path` whose reason starts with the field.
pub fn validate(path: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    check_vcpus(&state.machine.vcpus)
        .and_then(|()| check_layout(&state.layout))
        .and_then(|()| match &state.guest {
            Some(guest) => check_guest(guest, &state.layout),
            None => Ok(()),
        })
        .and_then(|()| check_parent(state.memory, state.parent.as_ref()))
        .map_err(|reason| SnapshotError::malformed(path, reason))
}

/// 1 to [`MAX_VCPUS`] vCPUs, vCPU `i` at position `i`.
fn check_vcpus(vcpus: &[VcpuState]) -> Result<(), String> {
    let max = usize::from(MAX_VCPUS);
    if vcpus.is_empty() || vcpus.len() > max {
        return Err(format!(
            "machine.vcpus: {} vCPUs (faultline supports 1 to {max})",
            vcpus.len()
        ));
    }
    match vcpus
        .iter()
        .enumerate()
        .find(|(i, vcpu)| usize::from(vcpu.index) != *i)
    {
        Some((i, vcpu)) => Err(format!(
            "machine.vcpus[{i}].index: {}, but the vCPU at position {i} must be vCPU {i}",
            vcpu.index
        )),
        None => Ok(()),
    }
}

/// Page-aligned ranges, [`MIN_RAM`] to [`MAX_RAM`] in all, laid out as faultline lays out
/// that much RAM.
fn check_layout(layout: &[RamRange]) -> Result<(), String> {
    if layout.is_empty() {
        return Err("layout: no RAM ranges".into());
    }
    let mut total = 0u64;
    for (i, range) in layout.iter().enumerate() {
        if !range.gpa.is_multiple_of(PAGE_SIZE) || !range.size.is_multiple_of(PAGE_SIZE) {
            return Err(format!(
                "layout[{i}]: {:#x} bytes at {:#x} is not page aligned",
                range.size, range.gpa
            ));
        }
        total = total
            .checked_add(range.size)
            .ok_or_else(|| "layout: the ranges' sizes add up past 2^64 bytes".to_string())?;
    }
    // Every size is a whole number of pages, so the total is too.
    if !(MIN_RAM..=MAX_RAM).contains(&total) {
        return Err(format!(
            "layout: {total} bytes of RAM (faultline supports {} MiB to {} TiB)",
            MIN_RAM >> 20,
            MAX_RAM >> 40
        ));
    }
    let expected: Vec<RamRange> = ram_ranges(total)
        .into_iter()
        .map(|(gpa, size)| RamRange { gpa, size })
        .collect();
    if layout != expected.as_slice() {
        return Err(format!(
            "layout: {} is not the layout faultline builds for {total} bytes of RAM ({})",
            describe(layout),
            describe(&expected)
        ));
    }
    Ok(())
}

/// `size@gpa` for each range, for messages.
fn describe(layout: &[RamRange]) -> String {
    let ranges: Vec<String> = layout
        .iter()
        .map(|r| format!("{:#x}@{:#x}", r.size, r.gpa))
        .collect();
    format!("[{}]", ranges.join(", "))
}

/// A page-aligned range inside one RAM range (an empty range touches no RAM, and only needs
/// to be aligned).
fn check_guest(guest: &GuestInfo, layout: &[RamRange]) -> Result<(), String> {
    let start = guest.range_start;
    if !start.is_multiple_of(PAGE_SIZE) {
        return Err(format!("guest.range_start: {start:#x} is not page aligned"));
    }
    if guest.range_pages == 0 {
        return Ok(());
    }
    let end = guest
        .range_pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| start.checked_add(len))
        .ok_or_else(|| {
            format!(
                "guest.range_pages: {} pages from {start:#x} go past the end of the address space",
                guest.range_pages
            )
        })?;
    let inside = layout.iter().any(|r| {
        r.gpa <= start
            && r.gpa
                .checked_add(r.size)
                .is_some_and(|range_end| end <= range_end)
    });
    if inside {
        Ok(())
    } else {
        Err(format!(
            "guest.range_pages: [{start:#x}, {end:#x}) ({} pages from guest.range_start) is not \
             inside one RAM range of {}",
            guest.range_pages,
            describe(layout)
        ))
    }
}

/// A diff has a parent; a parent path is relative to the snapshot's directory.
fn check_parent(memory: MemoryKind, parent: Option<&ParentRef>) -> Result<(), String> {
    match parent {
        None if memory == MemoryKind::Diff => {
            Err("parent: a diff snapshot without a parent".into())
        }
        Some(parent) if parent.path.as_os_str().is_empty() => {
            Err("parent.path: empty (a diff's parent cannot be the diff itself)".into())
        }
        Some(parent) if parent.path.is_absolute() => Err(format!(
            "parent.path: {} is absolute, but a diff records its parent relative to its own \
             directory",
            parent.path.display()
        )),
        _ => Ok(()),
    }
}

/// The parent a snapshot is layered on: its `parent` if it is a diff (a full snapshot's
/// `parent`, if any, is not followed).
fn diff_parent(state: &SnapshotState) -> Option<&ParentRef> {
    state
        .parent
        .as_ref()
        .filter(|_| state.memory == MemoryKind::Diff)
}

/// The directories of the snapshot at `dir`, whose state `first` the caller has read, and of
/// the parents it is layered on, newest first, ending with a full snapshot. Each parent is
/// found relative to its child's directory (and given as its canonical path) and must be the
/// snapshot the child was taken on (its [`identity`] unchanged); every layer must describe
/// the same RAM layout.
pub fn chain(dir: &Path, first: &SnapshotState) -> Result<Vec<PathBuf>, SnapshotError> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut next = diff_parent(first).cloned();
    while let Some(parent) = next {
        if dirs.len() >= MAX_CHAIN {
            return Err(SnapshotError::Layers(format!(
                "the chain from {} is longer than {MAX_CHAIN} snapshots (a loop?)",
                dir.display()
            )));
        }
        let child = dirs.last().expect("the chain starts with `dir`");
        let parent_dir = resolve_parent(child, &parent)?;
        let parent_state = read(&parent_dir)?;
        if parent_state.layout != first.layout {
            return Err(SnapshotError::Layers(format!(
                "{} and its parent {} describe different RAM",
                child.display(),
                parent_dir.display()
            )));
        }
        next = diff_parent(&parent_state).cloned();
        dirs.push(parent_dir);
    }
    Ok(dirs)
}

/// The canonical directory of `child`'s parent, checked to be the snapshot `child` was taken
/// on.
fn resolve_parent(child: &Path, parent: &ParentRef) -> Result<PathBuf, SnapshotError> {
    let joined = child.join(&parent.path);
    let dir = std::fs::canonicalize(&joined).map_err(|source| SnapshotError::ParentMissing {
        child: child.to_path_buf(),
        parent: joined.clone(),
        source,
    })?;
    let found = identity(&dir)?;
    if found != parent.identity {
        return Err(SnapshotError::ParentChanged {
            child: child.to_path_buf(),
            parent: dir,
            expected: parent.identity.clone(),
            found,
        });
    }
    Ok(dir)
}

/// A snapshot this process took: its directory, and its [`identity`] when it was written, so
/// that a diff taken on it later is layered on that snapshot, never on another that took its
/// place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub dir: PathBuf,
    pub identity: String,
}

/// The identity of the snapshot in `dir`: what a diff records of its parent, so that a
/// restore can tell that the parent is still the snapshot the diff was taken on. It digests
/// the two files that describe the snapshot and never change after it is written, `state`
/// and `memory.sums` (the sums cover the memory image): for each, in hex, a 64-bit digest of
/// its bytes and its length (`state digest-len`, `-`, `memory.sums digest-len`).
pub fn identity(dir: &Path) -> Result<String, SnapshotError> {
    let (state_digest, state_len) = file_digest(&dir.join(STATE_FILE))?;
    let (sums_digest, sums_len) = file_digest(&dir.join(SUMS_FILE))?;
    Ok(format!(
        "{state_digest:016x}-{state_len:x}-{sums_digest:016x}-{sums_len:x}"
    ))
}

/// A 64-bit FNV-1a digest and the length of the file at `path`, read a piece at a time.
/// (Not a CRC32: a container ends with the CRC32 of what precedes it, and the CRC32 of data
/// followed by its own CRC32 is the same constant for every file.)
fn file_digest(path: &Path) -> Result<(u64, u64), SnapshotError> {
    let mut file = File::open(path).map_err(SnapshotError::io(path))?;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SnapshotError::io(path)(e)),
        };
        for &byte in &buf[..n] {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        len = len.saturating_add(n as u64);
    }
    Ok((hash, len))
}

/// The path that leads from the directory `from_dir` to `to`, both absolute and canonical (no
/// `.`, `..` or symbolic links in them): a `..` for each component of `from_dir` past the
/// prefix the two share, then the rest of `to`; `.` if they are the same.
pub fn relative_path(from_dir: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from_dir.components().collect();
    let to: Vec<Component<'_>> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path: PathBuf = from[common..].iter().map(|_| Path::new("..")).collect();
    path.extend(&to[common..]);
    if path.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        path
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{machine, snapshot_state, write_snapshot, TempDir};

    /// Asserts that `state` fails validation with a reason that starts with `field`.
    fn refused(state: &SnapshotState, field: &str) {
        let path = Path::new("/snap/state");
        match validate(path, state) {
            Err(SnapshotError::Malformed { path: p, reason }) => {
                assert_eq!(p, path);
                assert!(reason.starts_with(field), "{field}: {reason}");
            }
            other => panic!("{field}: {other:?}"),
        }
    }

    /// A diff of `parent` (a path relative to the diff's directory) whose identity is that of
    /// `parent_dir` now.
    fn diff_on(parent: &str, parent_dir: &Path) -> SnapshotState {
        snapshot_state(Some(ParentRef {
            path: parent.into(),
            identity: identity(parent_dir).unwrap(),
        }))
    }

    #[test]
    fn relative_paths_over_components() {
        let cases = [
            ("/s/diff", "/s/base", "../base"),
            ("/s/diffs/d1", "/s/base", "../../base"),
            ("/s/d", "/s/old/full/base", "../old/full/base"),
            ("/s/a/b", "/s", "../.."),
            ("/d", "/base", "../base"),
            ("/s/d", "/s/d/inner", "inner"),
            ("/s/d", "/s/d", "."),
        ];
        for (from, to, expected) in cases {
            assert_eq!(
                relative_path(Path::new(from), Path::new(to)),
                Path::new(expected),
                "from {from} to {to}"
            );
            // Followed from `from`, the path leads to `to`.
            let mut reached = PathBuf::new();
            for component in Path::new(from).join(expected).components() {
                match component {
                    Component::ParentDir => {
                        reached.pop();
                    }
                    other => reached.push(other),
                }
            }
            assert_eq!(reached, Path::new(to), "{from} + {expected}");
        }
    }

    #[test]
    fn identity_follows_the_state_and_sums_files() {
        let dir = TempDir::new("state-identity");
        let snap = dir.path().join("snap");
        let mut state = snapshot_state(None);
        write_snapshot(&snap, &state);
        let first = identity(&snap).unwrap();
        assert_eq!(
            identity(&snap).unwrap(),
            first,
            "the same files, the same identity"
        );
        state.created_unix_ms += 1;
        write(&snap, &state).unwrap();
        let second = identity(&snap).unwrap();
        assert_ne!(second, first, "a changed state file");
        let sums = snap.join(SUMS_FILE);
        let mut bytes = std::fs::read(&sums).unwrap();
        bytes.push(0);
        std::fs::write(&sums, bytes).unwrap();
        assert_ne!(identity(&snap).unwrap(), second, "a changed sums file");
        std::fs::remove_file(&sums).unwrap();
        match identity(&snap) {
            Err(SnapshotError::Io { path, .. }) => assert_eq!(path, sums),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_moved_chain_resolves_through_relative_parents() {
        let dir = TempDir::new("state-chain-moved");
        let chain_dir = dir.subdir("chain");
        let base = chain_dir.join("base");
        write_snapshot(&base, &snapshot_state(None));
        let diff1 = chain_dir.join("diff1");
        write_snapshot(&diff1, &diff_on("../base", &base));
        let diff2 = chain_dir.join("later").join("diff2");
        std::fs::create_dir_all(diff2.parent().unwrap()).unwrap();
        write_snapshot(&diff2, &diff_on("../../diff1", &diff1));

        let moved = dir.path().join("moved");
        std::fs::rename(&chain_dir, &moved).unwrap();
        let newest = moved.join("later").join("diff2");
        let state = read(&newest).unwrap();
        let dirs = chain(&newest, &state).unwrap();
        let canonical = |p: PathBuf| std::fs::canonicalize(p).unwrap();
        assert_eq!(
            dirs,
            [
                newest.clone(),
                canonical(moved.join("diff1")),
                canonical(moved.join("base"))
            ]
        );
    }

    #[test]
    fn a_replaced_parent_is_refused_and_named() {
        let dir = TempDir::new("state-chain-replaced");
        let base = dir.path().join("base");
        let mut base_state = snapshot_state(None);
        write_snapshot(&base, &base_state);
        let diff = dir.path().join("diff");
        write_snapshot(&diff, &diff_on("../base", &base));
        let state = read(&diff).unwrap();
        assert_eq!(chain(&diff, &state).unwrap().len(), 2);

        // Another snapshot taken into the same directory.
        std::fs::remove_dir_all(&base).unwrap();
        base_state.created_unix_ms += 1;
        write_snapshot(&base, &base_state);
        let err = chain(&diff, &state).unwrap_err();
        match &err {
            SnapshotError::ParentChanged {
                child,
                parent,
                expected,
                found,
            } => {
                assert_eq!(child, &diff);
                assert_eq!(parent, &std::fs::canonicalize(&base).unwrap());
                assert_eq!(expected, &state.parent.as_ref().unwrap().identity);
                assert_eq!(found, &identity(&base).unwrap());
            }
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        let named = std::fs::canonicalize(&base).unwrap();
        assert!(message.contains(named.to_str().unwrap()), "{message}");
        assert!(message.contains("not the snapshot"), "{message}");

        std::fs::remove_dir_all(&base).unwrap();
        let err = chain(&diff, &state).unwrap_err();
        match &err {
            SnapshotError::ParentMissing { child, parent, .. } => {
                assert_eq!(child, &diff);
                assert_eq!(parent, &diff.join("../base"));
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("../base"), "{err}");
    }

    #[test]
    fn a_state_round_trips_and_read_checks_it() {
        let dir = TempDir::new("state-round-trip");
        let state = snapshot_state(None);
        write(dir.path(), &state).unwrap();
        let back = read(dir.path()).unwrap();
        assert_eq!(back.layout, state.layout);
        assert_eq!(back.guest, state.guest);
        assert_eq!(back.machine.vcpus.len(), 1);

        let mut bad = state.clone();
        bad.machine = machine(0);
        write(dir.path(), &bad).unwrap();
        match read(dir.path()) {
            Err(SnapshotError::Malformed { path, reason }) => {
                assert_eq!(path, dir.path().join(STATE_FILE));
                assert!(reason.starts_with("machine.vcpus: 0 vCPUs"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_payload_decodes_to_what_was_encoded_and_nothing_else_decodes() {
        let from = Path::new("the stream");
        let mut state = snapshot_state(None);
        state.machine.vcpus[0].regs.rip = 0x1234_5678;
        state.machine.vcpus[0].fpu = (0..=255).collect();
        let payload = encode(from, &state).unwrap();
        let back = decode(from, &payload).unwrap();
        // KVM's structures have no equality: the same bytes again say every field came back.
        assert_eq!(encode(from, &back).unwrap(), payload);
        assert_eq!(back.machine.vcpus[0].regs.rip, 0x1234_5678);

        let mut longer = payload.clone();
        longer.push(0);
        let err = decode(from, &longer).unwrap_err().to_string();
        assert!(err.contains("1 bytes follow the state"), "{err}");
        for cut in [0, 1, payload.len() / 2, payload.len() - 1] {
            let err = decode(from, &payload[..cut]).unwrap_err().to_string();
            assert!(
                err.contains("the state does not decode"),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn a_state_file_of_the_json_format_still_reads() {
        let dir = TempDir::new("state-json");
        let mut state = snapshot_state(None);
        state.machine.vcpus[0].regs.rip = 0xfeed;
        let path = dir.path().join(STATE_FILE);
        let json = serde_json::to_vec(&state).unwrap();
        container::write(&path, &STATE_MAGIC, JSON_STATE_VERSION, &json).unwrap();
        let back = read(dir.path()).unwrap();
        let from = Path::new("state");
        assert_eq!(encode(from, &back).unwrap(), encode(from, &state).unwrap());
        // Other versions are refused, naming both.
        container::write(&path, &STATE_MAGIC, 1, &json).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("format version 1, but this build reads version 3"),
            "{err}"
        );
    }

    #[test]
    fn vcpu_counts_and_order_are_checked() {
        let mut state = snapshot_state(None);
        validate(Path::new("state"), &state).unwrap();
        state.machine = machine(MAX_VCPUS);
        validate(Path::new("state"), &state).unwrap();
        state.machine = machine(0);
        refused(
            &state,
            "machine.vcpus: 0 vCPUs (faultline supports 1 to 32)",
        );
        state.machine = machine(MAX_VCPUS);
        let extra = state.machine.vcpus[0].clone();
        state.machine.vcpus.push(extra);
        refused(&state, "machine.vcpus: 33 vCPUs");
        state.machine = machine(3);
        state.machine.vcpus[1].index = 2;
        refused(&state, "machine.vcpus[1].index: 2");
    }

    #[test]
    fn layouts_are_checked() {
        let mut state = snapshot_state(None);
        let range = |gpa: u64, size: u64| RamRange { gpa, size };
        state.layout = vec![];
        refused(&state, "layout: no RAM ranges");
        state.layout = vec![range(0, MIN_RAM + 1)];
        refused(&state, "layout[0]:");
        state.layout = vec![range(0, MIN_RAM), range(0x1_0000_0800, PAGE_SIZE)];
        refused(&state, "layout[1]:");
        state.layout = vec![range(0, MIN_RAM - PAGE_SIZE)];
        refused(&state, "layout: 2093056 bytes of RAM");
        state.layout = vec![range(0, 0xc000_0000), range(0x1_0000_0000, MAX_RAM)];
        refused(
            &state,
            "layout: 1102732853248 bytes of RAM (faultline supports 2 MiB to 1 TiB)",
        );
        state.layout = vec![range(0, u64::MAX - 4095), range(0, 4096 * 2)];
        refused(&state, "layout: the ranges' sizes add up");
        // The right total, but not laid out around the MMIO gap as faultline does.
        state.layout = vec![range(0, 0x1_0000_0000)];
        refused(&state, "layout: [0x100000000@0x0] is not the layout");
        state.layout = vec![range(0x1000, MIN_RAM)];
        refused(&state, "layout: [0x200000@0x1000]");
        state.layout = ram_ranges(0x1_0000_0000)
            .into_iter()
            .map(|(gpa, size)| range(gpa, size))
            .collect();
        validate(Path::new("state"), &state).unwrap();
        state.layout = vec![range(0, MAX_RAM)];
        refused(&state, "layout: [0x10000000000@0x0] is not the layout");
    }

    #[test]
    fn guest_ranges_are_checked() {
        let mut state = snapshot_state(None);
        state.layout = ram_ranges(0x1_0000_0000)
            .into_iter()
            .map(|(gpa, size)| RamRange { gpa, size })
            .collect();
        let set = |state: &mut SnapshotState, start: u64, pages: u64| {
            let guest = state.guest.as_mut().unwrap();
            guest.range_start = start;
            guest.range_pages = pages;
        };
        // The end of low RAM, the whole of high RAM, and an empty range.
        set(&mut state, 0xc000_0000 - PAGE_SIZE, 1);
        validate(Path::new("state"), &state).unwrap();
        set(&mut state, 0x1_0000_0000, 0x4_0000);
        validate(Path::new("state"), &state).unwrap();
        set(&mut state, 0x2_0000_0000, 0);
        validate(Path::new("state"), &state).unwrap();

        set(&mut state, 0x20_0800, 1);
        refused(&state, "guest.range_start: 0x200800 is not page aligned");
        set(&mut state, 0xc000_0000 - PAGE_SIZE, 2);
        refused(&state, "guest.range_pages: [0xbffff000, 0xc0001000)");
        set(&mut state, 0x1_0000_0000, 0x4_0001);
        refused(&state, "guest.range_pages:");
        set(&mut state, 0x2_0000_0000, 1);
        refused(&state, "guest.range_pages:");
        set(&mut state, 0x1000, u64::MAX / PAGE_SIZE);
        refused(&state, "guest.range_pages:");
        set(&mut state, u64::MAX - 4095, 1);
        refused(&state, "guest.range_pages:");
    }

    #[test]
    fn parents_must_be_relative_and_diffs_have_one() {
        let parent = |path: &str| ParentRef {
            path: path.into(),
            identity: "0-0-0-0".into(),
        };
        let mut state = snapshot_state(Some(parent("../base")));
        validate(Path::new("state"), &state).unwrap();
        state.parent = Some(parent("/snaps/base"));
        refused(&state, "parent.path: /snaps/base is absolute");
        state.parent = Some(parent(""));
        refused(&state, "parent.path: empty");
        state.parent = None;
        refused(&state, "parent: a diff snapshot without a parent");
        state.memory = MemoryKind::Full;
        validate(Path::new("state"), &state).unwrap();
    }
}
