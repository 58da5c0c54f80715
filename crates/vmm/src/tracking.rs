//! Guest page tracking: which frames are tracked, in which mode and by how many users, and who
//! is told of the guest's accesses to them.
//!
//! A frame is tracked in a mode while at least one user has added it and not removed it (a
//! count per frame and mode, as in KVM's in-kernel page-track pool). `write` mode reports the
//! guest's writes with their bytes; `access` mode reports reads too. How the guest is made to
//! exit on those accesses (read-only memslots, holes) is [`crate::memmap`]'s business.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::memory::GuestRam;
use crate::memslots::{Backing, MemslotError};
use crate::PAGE_SIZE;

/// What a tracked frame reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackMode {
    /// The guest's writes, with their bytes (the writes still take effect).
    Write,
    /// The guest's reads and writes.
    Access,
}

impl TrackMode {
    fn index(self) -> usize {
        match self {
            TrackMode::Write => 0,
            TrackMode::Access => 1,
        }
    }
}

impl std::fmt::Display for TrackMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrackMode::Write => "write",
            TrackMode::Access => "access",
        })
    }
}

/// A run of adjacent frames tracked in one mode by the same number of users.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrackedRange {
    pub gpa: u64,
    pub len: u64,
    pub mode: TrackMode,
    /// How many users track these frames in this mode.
    pub count: u32,
}

/// The bytes of one guest access (at most 8: KVM reports one MMIO access at a time).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AccessBytes {
    len: u8,
    bytes: [u8; 8],
}

impl AccessBytes {
    /// The first `data.len()` (at most 8) bytes of `data`.
    pub fn new(data: &[u8]) -> Self {
        let len = data.len().min(8);
        let mut bytes = [0; 8];
        bytes[..len].copy_from_slice(&data[..len]);
        AccessBytes {
            len: len as u8,
            bytes,
        }
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for AccessBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x?}", self.as_slice())
    }
}

/// What a notifier is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackEvent {
    /// vCPU `vcpu` wrote `data` at `gpa`, a tracked frame (the write took effect).
    Write {
        vcpu: u8,
        gpa: u64,
        data: AccessBytes,
    },
    /// vCPU `vcpu` read `len` bytes at `gpa`, a frame tracked in access mode.
    Read { vcpu: u8, gpa: u64, len: u8 },
    /// The memory at `[gpa, gpa + len)`, which held tracked frames, went away (the VM ended):
    /// those frames are no longer tracked.
    RegionRemoved { gpa: u64, len: u64 },
}

/// Told of every event on tracked frames. Called on the vCPU thread that made the access,
/// before the guest goes on, so a notifier must be quick (queue the event, do not wait).
pub trait TrackNotifier: Send + Sync {
    fn notify(&self, event: &TrackEvent);
}

/// Names a registered notifier, to unregister it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifierId(u64);

/// Errors of tracking requests. Nothing is changed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("a tracked range cannot be empty (len 0)")]
    ZeroLength,
    #[error(
        "gpa {gpa:#x} and len {len:#x} must both be multiples of 4 KiB (tracking is per page)"
    )]
    Unaligned { gpa: u64, len: u64 },
    #[error("[{gpa:#x}, {gpa:#x} + {len:#x}) is not guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
    #[error("the frame at {gpa:#x} is not tracked in {mode} mode: nothing was removed")]
    NotTracked { gpa: u64, mode: TrackMode },
    #[error(transparent)]
    Memslots(#[from] MemslotError),
    #[error(transparent)]
    Dirty(#[from] crate::dirty::DirtyError),
    #[error("cannot pause the VM to change its memslots")]
    Pause(#[from] crate::control::PauseError),
}

/// Checks that `[gpa, gpa + len)` is whole pages of guest RAM.
pub fn check_range(ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TrackError> {
    if len == 0 {
        return Err(TrackError::ZeroLength);
    }
    if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(TrackError::Unaligned { gpa, len });
    }
    if ram.host_range(gpa, len).is_none() {
        return Err(TrackError::OutsideRam { gpa, len });
    }
    Ok(())
}

/// Users per mode of every tracked frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackTable {
    frames: BTreeMap<u64, [u32; 2]>,
}

impl TrackTable {
    fn frames(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
        (gpa..gpa + len).step_by(PAGE_SIZE as usize)
    }

    /// `users` more users track the frames of `[gpa, gpa + len)` in `mode`.
    pub fn add(&mut self, gpa: u64, len: u64, mode: TrackMode, users: u32) {
        if users == 0 {
            return;
        }
        for frame in Self::frames(gpa, len) {
            let counts = self.frames.entry(frame).or_default();
            counts[mode.index()] = counts[mode.index()].saturating_add(users);
        }
    }

    /// One user stops tracking the frames of `[gpa, gpa + len)` in `mode`; refused whole if
    /// any of them is not tracked in that mode.
    pub fn remove(&mut self, gpa: u64, len: u64, mode: TrackMode) -> Result<(), TrackError> {
        if let Some(frame) = Self::frames(gpa, len)
            .find(|frame| self.frames.get(frame).is_none_or(|c| c[mode.index()] == 0))
        {
            return Err(TrackError::NotTracked { gpa: frame, mode });
        }
        for frame in Self::frames(gpa, len) {
            let counts = self.frames.get_mut(&frame).expect("checked above");
            counts[mode.index()] -= 1;
            if *counts == [0, 0] {
                self.frames.remove(&frame);
            }
        }
        Ok(())
    }

    /// The mode that decides what the frame holding `gpa` reports (access beats write).
    pub fn mode_of(&self, gpa: u64) -> Option<TrackMode> {
        let counts = self.frames.get(&(gpa & !(PAGE_SIZE - 1)))?;
        if counts[TrackMode::Access.index()] > 0 {
            Some(TrackMode::Access)
        } else if counts[TrackMode::Write.index()] > 0 {
            Some(TrackMode::Write)
        } else {
            None
        }
    }

    /// How each tracked frame must be backed, lowest first.
    pub(crate) fn backings(&self) -> impl Iterator<Item = (u64, Backing)> + '_ {
        self.frames.keys().filter_map(|&frame| {
            Some((
                frame,
                match self.mode_of(frame)? {
                    TrackMode::Access => Backing::Hole,
                    TrackMode::Write => Backing::ReadOnly,
                },
            ))
        })
    }

    /// The table as runs of adjacent frames with the same mode and count.
    pub fn ranges(&self) -> Vec<TrackedRange> {
        let mut out: Vec<TrackedRange> = Vec::new();
        for mode in [TrackMode::Write, TrackMode::Access] {
            for (&frame, counts) in &self.frames {
                let count = counts[mode.index()];
                if count == 0 {
                    continue;
                }
                match out.last_mut() {
                    Some(last)
                        if last.mode == mode
                            && last.count == count
                            && last.gpa + last.len == frame =>
                    {
                        last.len += PAGE_SIZE
                    }
                    _ => out.push(TrackedRange {
                        gpa: frame,
                        len: PAGE_SIZE,
                        mode,
                        count,
                    }),
                }
            }
        }
        out.sort_by_key(|r| (r.gpa, r.mode.index()));
        out
    }

    /// Runs of adjacent tracked frames, whatever their mode: `(gpa, len)`.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &frame in self.frames.keys() {
            match out.last_mut() {
                Some((gpa, len)) if *gpa + *len == frame => *len += PAGE_SIZE,
                _ => out.push((frame, PAGE_SIZE)),
            }
        }
        out
    }

    /// Whether no frame is tracked.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// The registered notifiers.
#[derive(Default)]
pub(crate) struct Notifiers {
    list: RwLock<Vec<(u64, Arc<dyn TrackNotifier>)>>,
    next: AtomicU64,
}

impl Notifiers {
    pub fn register(&self, notifier: Arc<dyn TrackNotifier>) -> NotifierId {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.list
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, notifier));
        NotifierId(id)
    }

    /// Whether `id` was registered (and now is not).
    pub fn unregister(&self, id: NotifierId) -> bool {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        let before = list.len();
        list.retain(|(n, _)| *n != id.0);
        list.len() != before
    }

    pub fn notify(&self, event: &TrackEvent) {
        for (_, notifier) in self.list.read().unwrap_or_else(|e| e.into_inner()).iter() {
            notifier.notify(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn counts_per_frame_and_mode() {
        let mut t = TrackTable::default();
        t.add(0x1000, 2 * P, TrackMode::Write, 1);
        t.add(0x1000, P, TrackMode::Write, 1);
        assert_eq!(
            t.ranges(),
            [
                TrackedRange {
                    gpa: 0x1000,
                    len: P,
                    mode: TrackMode::Write,
                    count: 2
                },
                TrackedRange {
                    gpa: 0x2000,
                    len: P,
                    mode: TrackMode::Write,
                    count: 1
                },
            ]
        );
        t.remove(0x1000, 2 * P, TrackMode::Write).unwrap();
        assert_eq!(t.mode_of(0x1abc), Some(TrackMode::Write), "one user left");
        assert_eq!(t.mode_of(0x2000), None);
        t.remove(0x1000, P, TrackMode::Write).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn removing_what_is_not_tracked_changes_nothing() {
        let mut t = TrackTable::default();
        t.add(0x1000, P, TrackMode::Write, 1);
        let before = t.clone();
        assert!(matches!(
            t.remove(0x1000, 2 * P, TrackMode::Write),
            Err(TrackError::NotTracked { gpa: 0x2000, .. })
        ));
        assert!(t.remove(0x1000, P, TrackMode::Access).is_err());
        assert_eq!(t, before);
    }

    #[test]
    fn access_beats_write_and_extents_merge() {
        let mut t = TrackTable::default();
        t.add(0x1000, 2 * P, TrackMode::Write, 1);
        t.add(0x2000, P, TrackMode::Access, 1);
        assert_eq!(
            t.backings().collect::<Vec<_>>(),
            [(0x1000, Backing::ReadOnly), (0x2000, Backing::Hole)]
        );
        assert_eq!(t.extents(), [(0x1000, 2 * P)]);
    }
}
