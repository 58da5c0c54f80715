//! The recorded working set: the pages a restored guest touched first, in the order it
//! touched them, with their contents, so that a later restore can install them all before
//! the guest runs instead of serving each as a fault (as REAP does).
//!
//! `working-set` is a [`container`] (magic `FLTWSET\0`, version 1) whose payload is, little
//! endian:
//!
//! ```text
//! page_size u32 | reserved u32 | count u64 | page index u64 x count | count x page contents
//! ```

use std::fmt;
use std::path::Path;

use pager::{Content, PageSource};

use crate::container::{self, Decoder};
use crate::mapping::ReadOnlyMap;
use crate::memory::PAGE_SIZE;
use crate::{SnapshotError, SnapshotMemory, WORKING_SET_FILE};

/// The magic of `working-set`.
pub const WORKING_SET_MAGIC: [u8; 8] = *b"FLTWSET\0";
/// The format version of `working-set` this build writes and reads.
pub const WORKING_SET_VERSION: u32 = 1;

/// Writes `working-set` in `dir`: the pages `pages` (indices into the snapshot's memory, in
/// the order the guest touched them) with their contents as `memory` holds them: the
/// snapshot, not the running guest, which may have changed them since. Repeated pages keep
/// their first place; pages past the end of the memory are dropped. Returns the number of
/// pages written.
pub fn write(dir: &Path, pages: &[u64], memory: &SnapshotMemory) -> Result<u64, SnapshotError> {
    let total_pages = memory.size() / PAGE_SIZE;
    let mut seen = vec![0u64; total_pages.div_ceil(64) as usize];
    let mut order = Vec::new();
    for &page in pages.iter().filter(|&&page| page < total_pages) {
        let (word, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        if seen[word] & bit == 0 {
            seen[word] |= bit;
            order.push(page);
        }
    }

    let page_len = PAGE_SIZE as usize;
    let count = order.len();
    let mut payload: Vec<u8> = Vec::with_capacity(16 + count * (8 + page_len));
    payload.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&(count as u64).to_le_bytes());
    for page in &order {
        payload.extend_from_slice(&page.to_le_bytes());
    }
    let contents_at = payload.len();
    payload.resize(contents_at + count * page_len, 0);
    for (i, &page) in order.iter().enumerate() {
        // Verified here for a typed error (`fetch` can only describe it in words).
        memory.verify_page(page)?;
        let buf = &mut payload[contents_at + i * page_len..][..page_len];
        match memory.fetch(page * PAGE_SIZE, buf) {
            Ok(Content::Data) => {}
            // `buf` was not touched, and already holds zeros.
            Ok(Content::Zero) => {}
            Err(e) => {
                return Err(SnapshotError::Layers(format!(
                    "cannot read page {page} of the snapshot: {e}"
                )))
            }
        }
    }
    container::write(
        &dir.join(WORKING_SET_FILE),
        &WORKING_SET_MAGIC,
        WORKING_SET_VERSION,
        &payload,
    )?;
    Ok(count as u64)
}

/// A working set read back: page indices in the order they were touched, with contents.
pub struct WorkingSet {
    /// Page indices into the snapshot's memory, in the order the guest touched them, each
    /// once.
    pub pages: Vec<u64>,
    /// The file, mapped: the pages' contents, a page each in the same order, start at
    /// `contents_at`.
    map: ReadOnlyMap,
    contents_at: usize,
}

impl fmt::Debug for WorkingSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkingSet")
            .field("pages", &self.pages.len())
            .finish_non_exhaustive()
    }
}

impl WorkingSet {
    /// Reads and checks `working-set` in `dir`.
    pub fn read(dir: &Path) -> Result<WorkingSet, SnapshotError> {
        let path = dir.join(WORKING_SET_FILE);
        let file = std::fs::File::open(&path).map_err(SnapshotError::io(&path))?;
        let len = file.metadata().map_err(SnapshotError::io(&path))?.len();
        // Mapped, not read: the contents go from the page cache straight into guest memory.
        let map = ReadOnlyMap::new(&file, len, &path)?;
        let payload =
            container::check(&path, map.bytes(), &WORKING_SET_MAGIC, WORKING_SET_VERSION)?;
        let mut d = Decoder::new(&path, &map.bytes()[payload.clone()]);
        let page_size = u64::from(d.u32("the page size")?);
        if page_size != PAGE_SIZE {
            return Err(d.malformed(format!(
                "the page size is {page_size}; only {PAGE_SIZE} is supported"
            )));
        }
        d.u32("the reserved word")?;
        let count = d.u64("the page count")?;
        let pages = container::u64s(d.take_array(count, 8, "the page indices")?).collect();
        let contents = d
            .take_array(count, PAGE_SIZE as usize, "the page contents")?
            .len();
        d.finish()?;
        // The contents are the payload's tail.
        let contents_at = payload.end - contents;
        Ok(WorkingSet {
            pages,
            map,
            contents_at,
        })
    }

    pub fn page(&self, i: usize) -> &[u8] {
        self.contents(i, 1)
    }

    /// The contents of `count` consecutive entries of the set from the `i`th, back to back
    /// (a run from [`runs`](Self::runs) is installed from this in one call).
    ///
    /// # Panics
    ///
    /// If the entries go past the end of the set.
    pub fn contents(&self, i: usize, count: usize) -> &[u8] {
        let page_len = PAGE_SIZE as usize;
        &self.map.bytes()
            [self.contents_at + i * page_len..self.contents_at + (i + count) * page_len]
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the set has no pages.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Runs of consecutive entries whose pages are consecutive too, in the set's order:
    /// `(first page, index of its entry, number of pages)`. Each run can be installed with
    /// one call, from [`contents`](Self::contents).
    pub fn runs(&self) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
        let mut i = 0;
        std::iter::from_fn(move || {
            let first = *self.pages.get(i)?;
            let start = i;
            i += 1;
            while let Some(&page) = self.pages.get(i) {
                if first.checked_add((i - start) as u64) != Some(page) {
                    break;
                }
                i += 1;
            }
            Some((first, start, i - start))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{write_image, LayerKind};
    use crate::testutil::{fill_page, spans, TempDir};

    const PAGE: usize = PAGE_SIZE as usize;

    /// A 32-page full snapshot in `dir` whose odd pages hold data.
    fn snapshot(dir: &TempDir) -> (SnapshotMemory, Vec<u8>) {
        let mut buf = vec![0u8; 32 * PAGE];
        for page in (1..32).step_by(2) {
            fill_page(&mut buf, page, 9);
        }
        write_image(dir.path(), &spans(&buf, &[]), LayerKind::Full, None).unwrap();
        let memory = SnapshotMemory::open(&[dir.path().to_path_buf()]).unwrap();
        (memory, buf)
    }

    #[test]
    fn round_trip_keeps_the_order_and_drops_repeats() {
        let dir = TempDir::new("working-set");
        let (memory, buf) = snapshot(&dir);
        let touched = [5, 6, 7, 3, 5, 100, 4, 9, 10, 3, 31];
        assert_eq!(write(dir.path(), &touched, &memory).unwrap(), 8);
        let set = WorkingSet::read(dir.path()).unwrap();
        assert_eq!(set.pages, [5, 6, 7, 3, 4, 9, 10, 31]);
        assert_eq!(set.len(), 8);
        assert!(!set.is_empty());
        for (i, &page) in set.pages.iter().enumerate() {
            let page = page as usize;
            assert_eq!(
                set.page(i),
                &buf[page * PAGE..(page + 1) * PAGE],
                "entry {i}"
            );
        }
        assert_eq!(
            set.runs().collect::<Vec<_>>(),
            [(5, 0, 3), (3, 3, 2), (9, 5, 2), (31, 7, 1)]
        );
        assert_eq!(set.contents(0, 3), &buf[5 * PAGE..8 * PAGE]);

        write(dir.path(), &[], &memory).unwrap();
        let set = WorkingSet::read(dir.path()).unwrap();
        assert!(set.is_empty());
        assert_eq!(set.runs().count(), 0);
    }

    #[test]
    fn a_corrupt_file_fails_its_checksum() {
        let dir = TempDir::new("working-set-corrupt");
        let (memory, _) = snapshot(&dir);
        write(dir.path(), &[1, 2, 3], &memory).unwrap();
        let path = dir.path().join(WORKING_SET_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 1;
        std::fs::write(path, bytes).unwrap();
        assert!(matches!(
            WorkingSet::read(dir.path()),
            Err(SnapshotError::ChecksumMismatch { .. })
        ));
    }
}
