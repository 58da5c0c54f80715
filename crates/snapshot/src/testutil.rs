//! Helpers for the crate's tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vmm::state::{DeviceState, VcpuState, VmState};
use vmm::MachineState;

use crate::memory::{self, LayerKind, MemorySpan, MemorySpanMut, PAGE_SIZE};
use crate::state::{self, GuestInfo, MemoryKind, ParentRef, RamRange, SnapshotState};

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `faultline-snapshot-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "faultline-snapshot-{name}-{}-{n}",
            std::process::id()
        ));
        // A leftover from an earlier run with the same pid would make the test lie.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A subdirectory, created.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Spans covering `buf` back to back, cut at the given page indices. The caller keeps `buf`
/// alive, and does not write it, while the spans are used.
pub fn spans(buf: &[u8], cuts: &[u64]) -> Vec<MemorySpan> {
    bounds(buf.len(), cuts)
        .windows(2)
        .map(|w| {
            // SAFETY: `[w[0], w[1])` lies inside `buf`, which the caller keeps alive and
            // unwritten while the span is used.
            unsafe { MemorySpan::new(buf.as_ptr().wrapping_add(w[0]), (w[1] - w[0]) as u64) }
        })
        .collect()
}

/// Writable spans covering `buf` back to back, cut at the given byte offsets (which need not
/// be page aligned). The caller keeps `buf` alive, and does not touch it, while the spans are
/// used.
pub fn spans_mut(buf: &mut [u8], cuts: &[usize]) -> Vec<MemorySpanMut> {
    let base = buf.as_mut_ptr();
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(buf.len());
    assert!(
        bounds.windows(2).all(|w| w[0] <= w[1]),
        "cuts {cuts:?} outside the buffer"
    );
    bounds
        .windows(2)
        .map(|w| {
            // SAFETY: `[w[0], w[1])` lies inside `buf`, which the caller keeps alive and
            // otherwise untouched while the span is used.
            unsafe { MemorySpanMut::new(base.wrapping_add(w[0]), (w[1] - w[0]) as u64) }
        })
        .collect()
}

/// Byte bounds of the pieces of a `len`-byte buffer cut at page indices.
fn bounds(len: usize, cut_pages: &[u64]) -> Vec<usize> {
    let mut bounds = vec![0];
    bounds.extend(
        cut_pages
            .iter()
            .map(|&page| page as usize * PAGE_SIZE as usize),
    );
    bounds.push(len);
    assert!(
        bounds.windows(2).all(|w| w[0] <= w[1]),
        "cuts {cut_pages:?} outside the buffer"
    );
    bounds
}

/// Fills page `page` of `buf` with a pattern of non-zero bytes that depends on the page and
/// on `seed`.
pub fn fill_page(buf: &mut [u8], page: u64, seed: u8) {
    let start = page as usize * PAGE_SIZE as usize;
    for (i, byte) in buf[start..start + PAGE_SIZE as usize]
        .iter_mut()
        .enumerate()
    {
        *byte = ((i as u8) ^ seed.wrapping_mul(31) ^ (page as u8)) | 1;
    }
}

/// A machine state with `vcpus` vCPUs (listed in order) and every KVM structure zero: enough
/// for the state file, which does not look inside.
pub fn machine(vcpus: u8) -> MachineState {
    MachineState {
        vcpus: (0..vcpus).map(vcpu).collect(),
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: DeviceState::default(),
    }
}

/// vCPU `index` with every register zero.
fn vcpu(index: u8) -> VcpuState {
    VcpuState {
        index,
        cpuid: Vec::new(),
        msrs: Vec::new(),
        regs: Default::default(),
        sregs: Default::default(),
        fpu: Vec::new(),
        xsave: None,
        xcrs: None,
        debugregs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        events: Default::default(),
        tsc_khz: None,
        finished: None,
    }
}

/// A valid state of the smallest guest faultline builds ([`vmm::memory::MIN_RAM`], one
/// vCPU, a micro-guest working on 16 pages): a diff layered on `parent` if one is given, a
/// full snapshot otherwise.
pub fn snapshot_state(parent: Option<ParentRef>) -> SnapshotState {
    SnapshotState {
        faultline_version: "test".into(),
        created_unix_ms: 1,
        layout: vmm::memory::ram_ranges(vmm::memory::MIN_RAM)
            .into_iter()
            .map(|(gpa, size)| RamRange { gpa, size })
            .collect(),
        memory: if parent.is_some() {
            MemoryKind::Diff
        } else {
            MemoryKind::Full
        },
        parent,
        track_dirty: true,
        tracking: Vec::new(),
        guest: Some(GuestInfo {
            name: "touch".into(),
            range_start: 0x10_0000,
            range_pages: 16,
            arg: 0,
        }),
        machine: machine(1),
    }
}

/// Writes a snapshot directory `dir` (created) with `state` and an all-zero memory image of
/// its size (a diff holding every page, for a diff).
pub fn write_snapshot(dir: &Path, state: &SnapshotState) {
    std::fs::create_dir_all(dir).unwrap();
    let buf = vec![0u8; state.ram_size() as usize];
    let kind = match state.memory {
        MemoryKind::Full => LayerKind::Full,
        MemoryKind::Diff => LayerKind::Diff,
    };
    memory::write_image(dir, &spans(&buf, &[]), kind, None).unwrap();
    state::write(dir, state).unwrap();
}
