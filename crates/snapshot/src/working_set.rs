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

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use crate::container::{self, Decoder};
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
        let buf = &mut payload[contents_at + i * page_len..][..page_len];
        // Data, or zero: then `buf` was not touched, and already holds zeros.
        memory
            .read_checked(page * PAGE_SIZE, buf)
            .map_err(|(_, e)| e)?;
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
    /// The whole file: the pages' contents, a page each in the same order, start at
    /// `contents_at`.
    bytes: Vec<u8>,
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
    /// Reads and checks `working-set` in `dir`, for a snapshot whose memory holds
    /// `memory_pages` pages: every page index must be below it, and appear once.
    ///
    /// The file is read into memory with system calls, not mapped: a file truncated or
    /// damaged after the check then cannot fault the process when a page is used.
    pub fn read(dir: &Path, memory_pages: u64) -> Result<WorkingSet, SnapshotError> {
        let path = dir.join(WORKING_SET_FILE);
        let bytes = std::fs::read(&path).map_err(SnapshotError::io(&path))?;
        let payload = container::check(&path, &bytes, &WORKING_SET_MAGIC, WORKING_SET_VERSION)?;
        let mut d = Decoder::new(&path, &bytes[payload.clone()]);
        let count = decode_head(&mut d)?;
        let indices = d.take_array(count, 8, "the page indices")?;
        let contents = d
            .take_array(count, PAGE_SIZE as usize, "the page contents")?
            .len();
        d.finish()?;
        let pages = check_pages(&path, indices, memory_pages)?;
        // The contents are the payload's tail.
        let contents_at = payload.end - contents;
        Ok(WorkingSet {
            pages,
            bytes,
            contents_at,
        })
    }

    /// The contents of every entry, a page each, back to back in the set's order (a run from
    /// [`runs`] is installed from its slice in one call).
    pub fn contents(&self) -> &[u8] {
        &self.bytes[self.contents_at..self.contents_at + self.pages.len() * PAGE_SIZE as usize]
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the set has no pages.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

/// Runs of consecutive entries of `pages` whose pages are consecutive too:
/// `(first page, index of its entry, number of pages)`.
pub fn runs(pages: &[u64]) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *pages.get(i)?;
        let start = i;
        i += 1;
        while let Some(&page) = pages.get(i) {
            if first.checked_add((i - start) as u64) != Some(page) {
                break;
            }
            i += 1;
        }
        Some((first, start, i - start))
    })
}

/// A working set read piece by piece, so that its pages can be installed while the rest is
/// still being read: the header and page indices when opened, the contents on demand, each
/// page checked against the snapshot's own checksum of that page (which needs single-page
/// chunks: [`SnapshotMemory::pages_checkable`]). The file's own checksum, which takes the
/// whole file, is not used: the per-page check is the stronger one (it proves each page is
/// the snapshot's page at that index).
pub struct WorkingSetStream {
    path: std::path::PathBuf,
    file: std::fs::File,
    pages: Vec<u64>,
    /// Where the contents start in the file.
    contents_at: u64,
}

impl fmt::Debug for WorkingSetStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkingSetStream")
            .field("path", &self.path)
            .field("pages", &self.pages.len())
            .finish_non_exhaustive()
    }
}

impl WorkingSetStream {
    /// Opens `working-set` in `dir` for `memory`: reads and checks the header and the page
    /// indices (each below the memory's page count, each once, and a file as long as they
    /// say).
    pub fn open(dir: &Path, memory: &SnapshotMemory) -> Result<WorkingSetStream, SnapshotError> {
        use std::os::unix::fs::FileExt;
        let path = dir.join(WORKING_SET_FILE);
        if !memory.pages_checkable() {
            return Err(SnapshotError::malformed(
                &path,
                "the snapshot's checksums cover more than a page: read the set whole",
            ));
        }
        let (file, payload_len) =
            container::open_payload(&path, &WORKING_SET_MAGIC, WORKING_SET_VERSION)?;
        let read = |at: u64, buf: &mut [u8]| {
            file.read_exact_at(buf, container::HEADER_LEN + at)
                .map_err(SnapshotError::io(&path))
        };
        let mut head = [0u8; 16];
        if payload_len < head.len() as u64 {
            return Err(SnapshotError::malformed(
                &path,
                "the payload ends before its header",
            ));
        }
        read(0, &mut head)?;
        let mut d = Decoder::new(&path, &head);
        let count = decode_head(&mut d)?;
        let expected = count
            .checked_mul(8 + PAGE_SIZE)
            .and_then(|n| n.checked_add(16))
            .filter(|&n| n == payload_len)
            .ok_or_else(|| {
                SnapshotError::malformed(
                    &path,
                    format!("{count} pages do not fill a payload of {payload_len} bytes"),
                )
            })?;
        let mut indices = vec![0u8; (count * 8) as usize];
        read(16, &mut indices)?;
        let pages = check_pages(&path, &indices, memory.size() / PAGE_SIZE)?;
        Ok(WorkingSetStream {
            contents_at: container::HEADER_LEN + expected - count * PAGE_SIZE,
            path,
            file,
            pages,
        })
    }

    /// Page indices into the snapshot's memory, in the order the guest touched them.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Reads the contents of entries `i..i + count` into `buf` (resized to them) with one
    /// read, and checks each page against `memory`'s checksum of it: a page that does not
    /// match is a [`SnapshotError::Malformed`] naming the working-set file and the entry.
    pub fn read(
        &self,
        i: usize,
        count: usize,
        buf: &mut Vec<u8>,
        memory: &SnapshotMemory,
    ) -> Result<(), SnapshotError> {
        use std::os::unix::fs::FileExt;
        let page_len = PAGE_SIZE as usize;
        let pages = i
            .checked_add(count)
            .and_then(|end| self.pages.get(i..end))
            .ok_or_else(|| {
                SnapshotError::malformed(&self.path, format!("no {count} entries from {i}"))
            })?;
        buf.resize(count * page_len, 0);
        self.file
            .read_exact_at(buf, self.contents_at + (i * page_len) as u64)
            .map_err(SnapshotError::io(&self.path))?;
        for (k, (&page, bytes)) in pages.iter().zip(buf.chunks(page_len)).enumerate() {
            memory.check_page(page, bytes).map_err(|e| match e {
                // The snapshot's checksum is the reference: the set's copy is what is wrong.
                SnapshotError::ChunkChecksum { .. } => SnapshotError::malformed(
                    &self.path,
                    format!(
                        "entry {} holds other bytes than page {page} of the snapshot (its \
                         checksum does not match)",
                        i + k
                    ),
                ),
                other => other,
            })?;
        }
        Ok(())
    }
}

/// The payload's head: the page size (which must be [`PAGE_SIZE`]), the reserved word, and
/// the page count, which it returns.
fn decode_head(d: &mut Decoder<'_>) -> Result<u64, SnapshotError> {
    d.page_size()?;
    d.u32("the reserved word")?;
    d.u64("the page count")
}

/// The page indices of `path` (little-endian u64s), each checked to be below `memory_pages`
/// and not repeated.
fn check_pages(path: &Path, indices: &[u8], memory_pages: u64) -> Result<Vec<u64>, SnapshotError> {
    let mut pages = Vec::with_capacity(indices.len() / 8);
    let mut first_entry: HashMap<u64, usize> = HashMap::with_capacity(indices.len() / 8);
    for (i, page) in container::u64s(indices).enumerate() {
        if page >= memory_pages {
            return Err(SnapshotError::malformed(
                path,
                format!(
                    "working-set page index {page} at entry {i} is past the end of the \
                     snapshot's memory ({memory_pages} pages)"
                ),
            ));
        }
        if let Some(first) = first_entry.insert(page, i) {
            return Err(SnapshotError::malformed(
                path,
                format!("working-set page index {page} at entry {i} repeats entry {first}"),
            ));
        }
        pages.push(page);
    }
    Ok(pages)
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
        let set = WorkingSet::read(dir.path(), 32).unwrap();
        assert_eq!(set.pages, [5, 6, 7, 3, 4, 9, 10, 31]);
        assert_eq!(set.len(), 8);
        assert!(!set.is_empty());
        for (i, &page) in set.pages.iter().enumerate() {
            let page = page as usize;
            assert_eq!(
                &set.contents()[i * PAGE..(i + 1) * PAGE],
                &buf[page * PAGE..(page + 1) * PAGE],
                "entry {i}"
            );
        }
        assert_eq!(
            runs(&set.pages).collect::<Vec<_>>(),
            [(5, 0, 3), (3, 3, 2), (9, 5, 2), (31, 7, 1)]
        );
        assert_eq!(&set.contents()[..3 * PAGE], &buf[5 * PAGE..8 * PAGE]);

        // Streamed: the same pages and contents, in pieces, each page checked.
        let stream = WorkingSetStream::open(dir.path(), &memory).unwrap();
        assert_eq!(stream.pages(), &set.pages[..]);
        let mut piece = Vec::new();
        stream.read(2, 5, &mut piece, &memory).unwrap();
        assert_eq!(piece, &set.contents()[2 * PAGE..7 * PAGE]);
        assert!(
            stream.read(6, 3, &mut piece, &memory).is_err(),
            "past the end"
        );

        write(dir.path(), &[], &memory).unwrap();
        let set = WorkingSet::read(dir.path(), 32).unwrap();
        assert!(set.is_empty());
        assert_eq!(runs(&set.pages).count(), 0);
    }

    /// Writes a working set of `pages` (any indices, repeats kept) whose contents are zero.
    fn write_raw(dir: &Path, pages: &[u64]) {
        let mut payload = Vec::new();
        payload.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        for page in pages {
            payload.extend_from_slice(&page.to_le_bytes());
        }
        payload.resize(payload.len() + pages.len() * PAGE, 0);
        container::write(
            &dir.join(WORKING_SET_FILE),
            &WORKING_SET_MAGIC,
            WORKING_SET_VERSION,
            &payload,
        )
        .unwrap();
    }

    fn malformed_reason(result: Result<WorkingSet, SnapshotError>) -> String {
        match result {
            Err(SnapshotError::Malformed { reason, .. }) => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn indices_past_the_memory_are_refused() {
        let dir = TempDir::new("working-set-past-end");
        write_raw(dir.path(), &[0, 7, 31]);
        assert_eq!(WorkingSet::read(dir.path(), 32).unwrap().pages, [0, 7, 31]);
        assert_eq!(
            malformed_reason(WorkingSet::read(dir.path(), 31)),
            "working-set page index 31 at entry 2 is past the end of the snapshot's memory \
             (31 pages)"
        );
        write_raw(dir.path(), &[u64::MAX]);
        let reason = malformed_reason(WorkingSet::read(dir.path(), 32));
        assert!(reason.contains("at entry 0 is past the end"), "{reason}");
    }

    #[test]
    fn repeated_indices_are_refused() {
        let dir = TempDir::new("working-set-repeat");
        write_raw(dir.path(), &[4, 5, 6, 5]);
        assert_eq!(
            malformed_reason(WorkingSet::read(dir.path(), 32)),
            "working-set page index 5 at entry 3 repeats entry 1"
        );
    }

    #[test]
    fn a_truncated_file_is_an_error() {
        let dir = TempDir::new("working-set-truncated");
        let (memory, _) = snapshot(&dir);
        write(dir.path(), &[1, 2, 3], &memory).unwrap();
        let path = dir.path().join(WORKING_SET_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - PAGE_SIZE).unwrap();
        assert!(matches!(
            WorkingSet::read(dir.path(), 32),
            Err(SnapshotError::Truncated { .. })
        ));
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
            WorkingSet::read(dir.path(), 32),
            Err(SnapshotError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn a_streamed_set_checks_each_page_against_the_snapshot() {
        let dir = TempDir::new("working-set-stream");
        let (memory, _) = snapshot(&dir);
        write(dir.path(), &[1, 2, 3], &memory).unwrap();
        let path = dir.path().join(WORKING_SET_FILE);
        // Entry 1 (page 2) gets another page's contents: the file's own checksum is fixed up,
        // so only the check against the snapshot can tell.
        let payload = container::read(&path, &WORKING_SET_MAGIC, WORKING_SET_VERSION).unwrap();
        let mut changed = payload.clone();
        let contents_at = 16 + 3 * 8;
        changed[contents_at + PAGE..contents_at + 2 * PAGE]
            .copy_from_slice(&payload[contents_at..contents_at + PAGE]);
        container::write(&path, &WORKING_SET_MAGIC, WORKING_SET_VERSION, &changed).unwrap();
        let stream = WorkingSetStream::open(dir.path(), &memory).unwrap();
        let mut buf = Vec::new();
        stream.read(0, 1, &mut buf, &memory).unwrap();
        match stream.read(0, 3, &mut buf, &memory) {
            Err(SnapshotError::Malformed {
                path: named,
                reason,
            }) => {
                assert_eq!(named, path, "the working set is named, not the image");
                assert!(
                    reason.starts_with("entry 1 holds other bytes than page 2"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        stream.read(2, 1, &mut buf, &memory).unwrap();

        // A snapshot whose checksums cover 64 KiB cannot check a page alone: no stream (its
        // set is read whole).
        let old = TempDir::new("working-set-stream-64k");
        let buf = vec![7u8; 32 * PAGE];
        crate::memory::write_image_chunked(
            old.path(),
            &spans(&buf, &[]),
            LayerKind::Full,
            None,
            crate::memory::OLD_CHUNK_SIZE,
            &mut |_, _| {},
        )
        .unwrap();
        let old_memory = SnapshotMemory::open(&[old.path().to_path_buf()]).unwrap();
        write(old.path(), &[1, 2], &old_memory).unwrap();
        assert!(matches!(
            WorkingSetStream::open(old.path(), &old_memory),
            Err(SnapshotError::Malformed { .. })
        ));
        assert_eq!(WorkingSet::read(old.path(), 32).unwrap().pages, [1, 2]);

        // Indices are checked when the stream opens; a file of the wrong length is refused.
        write_raw(dir.path(), &[4, 5, 6, 5]);
        assert!(matches!(
            WorkingSetStream::open(dir.path(), &memory),
            Err(SnapshotError::Malformed { .. })
        ));
        write_raw(dir.path(), &[4, 5]);
        let len = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 1).unwrap();
        assert!(matches!(
            WorkingSetStream::open(dir.path(), &memory),
            Err(SnapshotError::Truncated { .. })
        ));
    }
}
