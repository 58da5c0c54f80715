//! Helpers for the crate's tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::{MemorySpan, MemorySpanMut, PAGE_SIZE};

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
