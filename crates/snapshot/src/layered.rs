//! A chain of memory layers read as one memory: a full image at the bottom, diff layers over
//! it, each page coming from the newest layer that holds it.

use std::path::PathBuf;

use pager::{Content, PageSource, SourceError};

use crate::memory::{LayerKind, MemoryImage, MemorySpanMut, Progress, PAGE_SIZE};
use crate::SnapshotError;

/// What [`SnapshotMemory::load_into`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LoadSummary {
    /// Bytes copied from the images into guest memory.
    pub bytes_copied: u64,
    /// Pages zeroed because a newer layer holds them as zero over an older layer's data.
    pub pages_zeroed: u64,
}

/// A snapshot's memory: its layers, newest first, the last a full image.
#[derive(Debug)]
pub struct SnapshotMemory {
    layers: Vec<MemoryImage>,
}

impl SnapshotMemory {
    /// Opens the layers in `dirs`, newest first. All must have the same size, the last must
    /// be a full image and the others diff layers.
    pub fn open(dirs: &[PathBuf]) -> Result<SnapshotMemory, SnapshotError> {
        if dirs.is_empty() {
            return Err(SnapshotError::Layers("no snapshot layers given".into()));
        }
        let layers = dirs
            .iter()
            .map(|dir| MemoryImage::open(dir.as_path()))
            .collect::<Result<Vec<_>, _>>()?;
        let (base, diffs) = layers.split_last().expect("at least one layer");
        if base.kind() != LayerKind::Full {
            return Err(SnapshotError::Layers(format!(
                "the oldest layer, {}, is a diff: a chain must end in a full snapshot",
                base.dir().display()
            )));
        }
        if let Some(full) = diffs.iter().find(|layer| layer.kind() == LayerKind::Full) {
            return Err(SnapshotError::Layers(format!(
                "{} is a full snapshot but not the oldest layer: only the last layer may be full",
                full.dir().display()
            )));
        }
        if let Some(other) = diffs.iter().find(|layer| layer.size() != base.size()) {
            return Err(SnapshotError::Layers(format!(
                "{} holds {} bytes of memory but its base {} holds {}",
                other.dir().display(),
                other.size(),
                base.dir().display(),
                base.size()
            )));
        }
        Ok(SnapshotMemory { layers })
    }

    /// The memory's size in bytes.
    pub fn size(&self) -> u64 {
        self.base().size()
    }

    /// The layers, newest first.
    pub fn layers(&self) -> &[MemoryImage] {
        &self.layers
    }

    /// The layer page `page` comes from: the newest that holds it (the base for pages past
    /// the end).
    pub fn layer_of(&self, page: u64) -> &MemoryImage {
        self.layers
            .iter()
            .find(|layer| layer.contains(page))
            .unwrap_or_else(|| self.base())
    }

    /// Reads `buf.len()` bytes at `offset` (inside the memory), each run of pages from the
    /// newest layer that holds it and checked against its checksums before it is returned.
    /// `Zero` when the range is all zero (`buf` is then left alone). An error comes with the
    /// offset of the piece that failed.
    pub(crate) fn read_checked(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Content, (u64, SnapshotError)> {
        let end = offset + buf.len() as u64;
        // Until a page with data turns up, `buf` is left alone (a `Zero` answer must not
        // touch it); after that, holes are filled with zeros.
        let mut any_data = false;
        let mut pos = offset;
        while pos < end {
            // The longest piece from `pos` that one layer serves.
            let layer = self.layer_of(pos / PAGE_SIZE);
            let mut piece_end = ((pos / PAGE_SIZE + 1) * PAGE_SIZE).min(end);
            while piece_end < end && std::ptr::eq(self.layer_of(piece_end / PAGE_SIZE), layer) {
                piece_end = (piece_end + PAGE_SIZE).min(end);
            }
            let at = (pos - offset) as usize;
            let piece = &mut buf[at..at + (piece_end - pos) as usize];
            let failed = |e: SnapshotError| (pos, e);
            // The whole chunks around the piece: the bytes installed are the bytes checked.
            let chunk = layer.chunk_size();
            let start = pos / chunk * chunk;
            let stop = piece_end
                .div_ceil(chunk)
                .saturating_mul(chunk)
                .min(layer.size());
            let data = if (start, stop) == (pos, piece_end) {
                layer.read_verified(pos, piece).map_err(failed)?
            } else {
                // Larger chunks than the piece (images written with 64 KiB chunks): they are
                // read and checked whole, and the piece is copied out of them (a second read
                // could find the file changed since).
                let mut around = vec![0u8; (stop - start) as usize];
                let data = layer.read_verified(start, &mut around).map_err(failed)?
                    && layer.has_data(pos, piece_end);
                if data {
                    let from = (pos - start) as usize;
                    piece.copy_from_slice(&around[from..from + piece.len()]);
                }
                data
            };
            if data && !any_data {
                buf[..at].fill(0);
                any_data = true;
            } else if !data && any_data {
                buf[at..at + (piece_end - pos) as usize].fill(0);
            }
            pos = piece_end;
        }
        Ok(if any_data {
            Content::Data
        } else {
            Content::Zero
        })
    }

    /// Whether every layer can check a page on its own (single-page chunks).
    pub fn pages_checkable(&self) -> bool {
        self.layers.iter().all(MemoryImage::pages_checkable)
    }

    /// Checks `bytes` against the checksum of page `page` in the layer it comes from.
    pub fn check_page(&self, page: u64, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.layer_of(page).check_page(page, bytes)
    }

    /// The full image at the bottom of the chain.
    fn base(&self) -> &MemoryImage {
        self.layers.last().expect("a chain has a base")
    }

    /// Restores the whole memory into `spans`, laid back to back like the image, which must
    /// be freshly zeroed memory: holes are not touched, so the destination stays sparse.
    /// Every chunk is verified before anything is copied from it, and the base's holes
    /// before anything is copied at all. `progress(done, total)` is
    /// called every 64 MiB or so and at the end.
    pub fn load_into(
        &self,
        spans: &[MemorySpanMut],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<LoadSummary, SnapshotError> {
        let dest = Destination::new(spans);
        if dest.size != self.size() {
            return Err(SnapshotError::Layers(format!(
                "the destination memory is {} bytes but the snapshot in {} holds {}",
                dest.size,
                self.layers[0].dir().display(),
                self.size()
            )));
        }
        let base = self.base();
        // The base's holes are left alone in the destination, so they are checked here, before
        // anything is copied: a chunk that had data and lost it must not read as zeros.
        base.verify_holes()?;
        let diffs = &self.layers[..self.layers.len() - 1];
        let total = base
            .data_extents()
            .iter()
            .map(|(start, end)| end - start)
            .sum::<u64>()
            + diffs
                .iter()
                .map(|layer| layer.held_page_count() * PAGE_SIZE)
                .sum::<u64>();
        let mut progress = Progress::new(total, progress);
        let mut summary = LoadSummary::default();
        // Chunks are read once into this buffer, checked, and copied from it: what reaches
        // guest memory is exactly what was checked.
        let mut chunk = ChunkBuffer::default();

        // The base: its data extents, a block of chunks at a time.
        for &(start, end) in base.data_extents() {
            let mut pos = start;
            while pos < end {
                let bytes = chunk.bytes(base, self.layers.len() - 1, pos, end)?;
                let len = bytes.len() as u64;
                dest.copy(pos, bytes);
                summary.bytes_copied += len;
                progress.advance(len);
                pos += len;
            }
        }

        // The diff layers, oldest first, each over what the older ones left.
        for (i, layer) in diffs.iter().enumerate().rev() {
            let older = &self.layers[i + 1..];
            for page in layer.held_pages() {
                let offset = page * PAGE_SIZE;
                let end = offset + PAGE_SIZE;
                let bytes = chunk.bytes(layer, i, offset, end)?;
                debug_assert_eq!(bytes.len() as u64, PAGE_SIZE, "a page lies in one block");
                if layer.has_data(offset, end) {
                    dest.copy(offset, bytes);
                    summary.bytes_copied += PAGE_SIZE;
                } else {
                    // A zero page: the destination already reads zero unless an older layer
                    // put data there.
                    let below = older
                        .iter()
                        .find(|layer| layer.contains(page))
                        .unwrap_or(base);
                    if below.has_data(offset, end) {
                        dest.zero(offset, PAGE_SIZE);
                        summary.pages_zeroed += 1;
                    }
                }
                progress.advance(PAGE_SIZE);
            }
        }
        progress.finish();
        Ok(summary)
    }
}

/// Bytes read (and checked) at once by [`SnapshotMemory::load_into`] where a layer has that
/// much data in a row: few system calls per GiB, and a buffer that stays in the cache.
const LOAD_BLOCK: u64 = 1 << 20;

/// The last block of whole chunks read (and checked) by [`SnapshotMemory::load_into`].
#[derive(Default)]
struct ChunkBuffer {
    /// (layer index, start, end) of what `buf` holds.
    holds: Option<(usize, u64, u64)>,
    buf: Vec<u8>,
}

impl ChunkBuffer {
    /// The checked bytes of `layer` (number `index` in the chain) from `start` on, up to
    /// `end` or the end of the block that holds `start`, whichever comes first (never
    /// empty when `start < end`). A new block reaches towards `end`, whole chunks of it.
    fn bytes(
        &mut self,
        layer: &MemoryImage,
        index: usize,
        start: u64,
        end: u64,
    ) -> Result<&[u8], SnapshotError> {
        let held = matches!(self.holds, Some((i, s, e)) if i == index && s <= start && start < e);
        if !held {
            self.holds = None;
            let chunk = layer.chunk_size();
            let block_start = start / chunk * chunk;
            // Whole chunks, however the chunk size divides the block.
            let block = (LOAD_BLOCK / chunk).max(1) * chunk;
            let block_end = (end.div_ceil(chunk) * chunk)
                .min(block_start + block)
                .min(layer.size());
            self.buf.clear();
            self.buf.resize((block_end - block_start) as usize, 0);
            // A block without data reads as the zeros the buffer already holds.
            layer.read_verified(block_start, &mut self.buf)?;
            self.holds = Some((index, block_start, block_end));
        }
        let (_, block_start, block_end) = self.holds.expect("a block is held");
        let from = (start - block_start) as usize;
        let to = (end.min(block_end) - block_start) as usize;
        Ok(&self.buf[from..to])
    }
}

/// Destination spans addressed as one range of bytes.
struct Destination<'a> {
    spans: &'a [MemorySpanMut],
    /// Where each span starts in the concatenation.
    starts: Vec<u64>,
    size: u64,
}

impl<'a> Destination<'a> {
    fn new(spans: &'a [MemorySpanMut]) -> Self {
        let mut starts = Vec::with_capacity(spans.len());
        let mut size = 0;
        for span in spans {
            starts.push(size);
            size += span.len();
        }
        Destination {
            spans,
            starts,
            size,
        }
    }

    /// Calls `f(address, offset in the range, length)` for each non-empty piece of
    /// `[offset, offset + len)` that lies in one span.
    fn pieces(&self, offset: u64, len: u64, mut f: impl FnMut(*mut u8, usize, usize)) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.size),
            "[{offset:#x}, +{len:#x}) is outside the destination's {:#x} bytes",
            self.size
        );
        if len == 0 {
            return;
        }
        // The last span that starts at or before `offset` (empty spans share their start
        // with the next one, so this is the span that holds `offset`).
        let mut i = self.starts.partition_point(|&start| start <= offset) - 1;
        let mut done = 0;
        while done < len {
            let span = &self.spans[i];
            let within = offset + done - self.starts[i];
            let n = (span.len() - within).min(len - done);
            if n > 0 {
                f(
                    span.addr().wrapping_add(within as usize),
                    done as usize,
                    n as usize,
                );
            }
            done += n;
            i += 1;
        }
    }

    /// Copies `bytes` to `offset`.
    fn copy(&self, offset: u64, bytes: &[u8]) {
        self.pieces(offset, bytes.len() as u64, |dst, at, n| {
            let src = &bytes[at..at + n];
            // SAFETY: `dst` and the `n` bytes after it lie in one destination span, which
            // `MemorySpanMut::new`'s contract makes writable and ours alone; `src` is a
            // snapshot mapping or a buffer, never guest memory, so they do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n) };
        });
    }

    /// Zeroes `len` bytes at `offset`.
    fn zero(&self, offset: u64, len: u64) {
        self.pieces(offset, len, |dst, _, n| {
            // SAFETY: `dst` and the `n` bytes after it lie in one destination span, which
            // `MemorySpanMut::new`'s contract makes writable and ours alone.
            unsafe { std::ptr::write_bytes(dst, 0, n) };
        });
    }
}

impl PageSource for SnapshotMemory {
    fn describe(&self) -> String {
        format!("snapshot:{}", self.layers[0].dir().display())
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let size = self.size();
        offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= size)
            .ok_or(SourceError::OutOfRange {
                offset,
                len: buf.len(),
                size,
            })?;
        self.read_checked(offset, buf)
            .map_err(|(offset, e)| SourceError::Unavailable {
                offset,
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{write_image_chunked, OLD_CHUNK_SIZE};
    use crate::testutil::{fill_page, spans, spans_mut, TempDir};
    use crate::MEMORY_FILE;
    use std::os::unix::fs::FileExt;

    const PAGE: usize = PAGE_SIZE as usize;
    const PAGES: u64 = 64;

    fn write(dir: &std::path::Path, buf: &[u8], dirty: Option<&[u64]>) {
        write_chunked(dir, buf, dirty, crate::DEFAULT_CHUNK_SIZE);
    }

    fn write_chunked(dir: &std::path::Path, buf: &[u8], dirty: Option<&[u64]>, chunk: u64) {
        let held = dirty.map(|dirty| move |page: u64| dirty.contains(&page));
        let held = held.as_ref().map(|f| f as &dyn Fn(u64) -> bool);
        let kind = if dirty.is_some() {
            LayerKind::Diff
        } else {
            LayerKind::Full
        };
        // Two spans, cut in the middle.
        let half = buf.len() as u64 / PAGE_SIZE / 2;
        write_image_chunked(dir, &spans(buf, &[half]), kind, held, chunk, &mut |_, _| {}).unwrap();
    }

    /// Three generations of a 64-page memory: a full base, then two diff layers.
    struct Chain {
        dir: TempDir,
        generations: Vec<Vec<u8>>,
    }

    fn chain() -> Chain {
        chain_chunked(crate::DEFAULT_CHUNK_SIZE)
    }

    /// [`chain`] written with `chunk` bytes to a checksum.
    fn chain_chunked(chunk: u64) -> Chain {
        let write =
            |dir: &std::path::Path, buf: &[u8], dirty| write_chunked(dir, buf, dirty, chunk);
        let dir = TempDir::new("layered");
        let mut memory = vec![0u8; PAGES as usize * PAGE];
        for page in [0, 1, 2, 3, 10, 11, 30, 63] {
            fill_page(&mut memory, page, 1);
        }
        write(&dir.subdir("base"), &memory, None);
        let mut generations = vec![memory.clone()];

        // Page 3 changes, 10 becomes zero, 20 gains data, 40 changes from zero to data, 50
        // is written but stays zero.
        fill_page(&mut memory, 3, 2);
        memory[10 * PAGE..11 * PAGE].fill(0);
        fill_page(&mut memory, 20, 2);
        fill_page(&mut memory, 40, 2);
        write(
            &dir.subdir("diff1"),
            &memory,
            Some(&[3, 10, 20, 40, 50][..]),
        );
        generations.push(memory.clone());

        // Page 3 changes again, 10 gains data again, 11 becomes zero.
        fill_page(&mut memory, 3, 3);
        fill_page(&mut memory, 10, 3);
        memory[11 * PAGE..12 * PAGE].fill(0);
        write(&dir.subdir("diff2"), &memory, Some(&[3, 10, 11][..]));
        generations.push(memory);
        Chain { dir, generations }
    }

    impl Chain {
        fn dirs(&self, names: &[&str]) -> Vec<PathBuf> {
            names
                .iter()
                .map(|name| self.dir.path().join(name))
                .collect()
        }
    }

    #[test]
    fn a_chain_reads_like_a_full_image_of_its_newest_state() {
        let chain = chain();
        let newest = chain.generations.last().unwrap();
        write(&chain.dir.subdir("full"), newest, None);
        let full = SnapshotMemory::open(&chain.dirs(&["full"])).unwrap();
        let layered = SnapshotMemory::open(&chain.dirs(&["diff2", "diff1", "base"])).unwrap();
        assert_eq!(layered.size(), PAGES * PAGE_SIZE);
        assert_eq!(layered.layers().len(), 3);
        assert!(layered.describe().ends_with("diff2"));
        assert_eq!(layered.layer_of(3).dir(), chain.dir.path().join("diff2"));
        assert_eq!(layered.layer_of(40).dir(), chain.dir.path().join("diff1"));
        assert_eq!(layered.layer_of(30).dir(), chain.dir.path().join("base"));

        // Eagerly, into destination spans cut inside a page.
        let mut restored = vec![0u8; newest.len()];
        let dest = spans_mut(&mut restored, &[5 * PAGE + 100, 30 * PAGE]);
        let mut reports = Vec::new();
        let summary = layered
            .load_into(&dest, &mut |done, total| reports.push((done, total)))
            .unwrap();
        assert!(restored == *newest, "load_into restores the newest state");
        // Page 11: base data under a zero page of diff2. Page 10 is zeroed by diff1 and
        // rewritten by diff2; page 50 has no data anywhere, so it is left alone.
        assert_eq!(summary.pages_zeroed, 2);
        let (done, total) = *reports.last().unwrap();
        assert_eq!(done, total);

        let mut other = vec![0u8; newest.len()];
        let dest = spans_mut(&mut other, &[]);
        full.load_into(&dest, &mut |_, _| {}).unwrap();
        assert!(other == *newest);

        // On demand, a page at a time and in longer ranges.
        let mut a = vec![0x55u8; PAGE];
        let mut b = vec![0x55u8; PAGE];
        for page in 0..PAGES {
            let offset = page * PAGE_SIZE;
            let content = layered.fetch(offset, &mut a).unwrap();
            assert_eq!(full.fetch(offset, &mut b).unwrap(), content, "page {page}");
            let expected = &newest[offset as usize..offset as usize + PAGE];
            if content == Content::Data {
                assert_eq!(a, expected, "page {page}");
            } else {
                assert!(expected.iter().all(|&byte| byte == 0), "page {page}");
            }
        }
        let mut long = vec![0x55u8; 16 * PAGE];
        assert_eq!(layered.fetch(0, &mut long).unwrap(), Content::Data);
        assert!(long == newest[..16 * PAGE]);
        // Pages 44-59: holes in the base, and page 50, a zero page of diff1.
        long.fill(0x55);
        assert_eq!(
            layered.fetch(44 * PAGE_SIZE, &mut long).unwrap(),
            Content::Zero
        );
        assert!(
            long.iter().all(|&byte| byte == 0x55),
            "a zero answer leaves the buffer"
        );
        assert!(matches!(
            layered.fetch(60 * PAGE_SIZE, &mut long),
            Err(SourceError::OutOfRange { .. })
        ));
    }

    #[test]
    fn images_with_larger_chunks_read_the_same() {
        // What earlier versions wrote: 64 KiB to a checksum.
        let chain = chain_chunked(OLD_CHUNK_SIZE);
        let newest = chain.generations.last().unwrap();
        let layered = SnapshotMemory::open(&chain.dirs(&["diff2", "diff1", "base"])).unwrap();
        assert!(!layered.pages_checkable());
        assert_eq!(layered.layers()[0].chunk_size(), OLD_CHUNK_SIZE);
        let mut restored = vec![0u8; newest.len()];
        let dest = spans_mut(&mut restored, &[5 * PAGE + 100, 30 * PAGE]);
        layered.load_into(&dest, &mut |_, _| {}).unwrap();
        assert!(restored == *newest, "load_into restores the newest state");
        let mut page = vec![0x55u8; PAGE];
        for p in 0..PAGES {
            let content = layered.fetch(p * PAGE_SIZE, &mut page).unwrap();
            let expected = &newest[p as usize * PAGE..(p as usize + 1) * PAGE];
            match content {
                Content::Data => assert_eq!(page, expected, "page {p}"),
                Content::Zero => assert!(expected.iter().all(|&b| b == 0), "page {p}"),
            }
        }
        let mut long = vec![0u8; 16 * PAGE];
        assert_eq!(layered.fetch(0, &mut long).unwrap(), Content::Data);
        assert!(long == newest[..16 * PAGE]);
        assert!(
            layered.check_page(3, &newest[3 * PAGE..4 * PAGE]).is_err(),
            "not alone"
        );
    }

    #[test]
    fn every_fetch_checks_the_bytes_it_returns() {
        // Page-sized chunks, and the 64 KiB chunks of older images (larger than a page).
        for chunk in [PAGE_SIZE, OLD_CHUNK_SIZE] {
            let chain = chain_chunked(chunk);
            let layered = SnapshotMemory::open(&chain.dirs(&["diff2", "diff1", "base"])).unwrap();
            let mut buf = vec![0u8; PAGE];
            assert_eq!(
                layered.fetch(30 * PAGE_SIZE, &mut buf).unwrap(),
                Content::Data
            );
            // The image changes under the restore after its chunk was checked once: the next
            // fetch reads the new bytes, and refuses them.
            let image = chain.dir.path().join("base").join(MEMORY_FILE);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap();
            file.write_all_at(&[buf[9] ^ 1], 30 * PAGE_SIZE + 9)
                .unwrap();
            drop(file);
            let refused = layered.fetch(30 * PAGE_SIZE, &mut buf);
            assert!(
                matches!(
                    refused,
                    Err(SourceError::Unavailable { offset, .. }) if offset == 30 * PAGE_SIZE
                ),
                "chunks of {chunk} bytes: {refused:?}"
            );
        }
    }

    #[test]
    fn chains_must_end_in_one_full_image_of_the_same_size() {
        let chain = chain();
        let layers_error = |names: &[&str]| match SnapshotMemory::open(&chain.dirs(names)) {
            Err(SnapshotError::Layers(reason)) => reason,
            other => panic!("{names:?}: {other:?}"),
        };
        layers_error(&[]);
        assert!(layers_error(&["diff1"]).contains("diff1"));
        assert!(layers_error(&["base", "diff1"]).contains("diff1"));
        assert!(layers_error(&["diff1", "base", "base"]).contains("base"));

        let small = vec![0u8; 8 * PAGE];
        write(&chain.dir.subdir("small"), &small, Some(&[1][..]));
        assert!(layers_error(&["small", "base"]).contains("small"));

        let base = SnapshotMemory::open(&chain.dirs(&["base"])).unwrap();
        let mut wrong = vec![0u8; 8 * PAGE];
        let dest = spans_mut(&mut wrong, &[]);
        assert!(matches!(
            base.load_into(&dest, &mut |_, _| {}),
            Err(SnapshotError::Layers(_))
        ));
    }

    #[test]
    fn a_damaged_diff_chunk_is_unavailable() {
        let chain = chain();
        let image = chain.dir.path().join("diff1").join(MEMORY_FILE);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        let at = 20 * PAGE_SIZE + 7;
        let byte = chain.generations[1][at as usize];
        file.write_all_at(&[byte ^ 0x80], at).unwrap();
        drop(file);

        let layered = SnapshotMemory::open(&chain.dirs(&["diff2", "diff1", "base"])).unwrap();
        let mut buf = vec![0u8; PAGE];
        match layered.fetch(20 * PAGE_SIZE, &mut buf) {
            Err(SourceError::Unavailable { offset, reason }) => {
                assert_eq!(offset, 20 * PAGE_SIZE);
                assert!(reason.contains(image.to_str().unwrap()), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Pages from other chunks, or served by other layers, are unaffected.
        layered.fetch(30 * PAGE_SIZE, &mut buf).unwrap();
        layered.fetch(3 * PAGE_SIZE, &mut buf).unwrap();

        let mut restored = vec![0u8; PAGES as usize * PAGE];
        let dest = spans_mut(&mut restored, &[]);
        assert!(matches!(
            layered.load_into(&dest, &mut |_, _| {}),
            Err(SnapshotError::ChunkChecksum { .. })
        ));
    }

    #[test]
    fn a_base_chunk_that_lost_its_data_is_refused_eagerly_and_on_demand() {
        for chunk_size in [PAGE_SIZE, OLD_CHUNK_SIZE] {
            let chain = chain_chunked(chunk_size);
            // What a copy that never reached the disk leaves: the file keeps its length, and
            // a chunk that held data reads as a hole.
            let image = chain.dir.path().join("base").join(MEMORY_FILE);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap();
            // The chunk of page 30, which holds data.
            let lost = 30 * PAGE_SIZE / chunk_size * chunk_size;
            rustix::fs::fallocate(
                &file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                lost,
                chunk_size,
            )
            .unwrap();
            drop(file);

            let base = SnapshotMemory::open(&chain.dirs(&["base"])).unwrap();
            assert!(!base.base().has_data(lost, lost + chunk_size));
            let mut restored = vec![0u8; PAGES as usize * PAGE];
            let dest = spans_mut(&mut restored, &[]);
            assert!(base.base().has_data(0, PAGE_SIZE));
            match base.load_into(&dest, &mut |_, _| {}) {
                Err(SnapshotError::ChunkChecksum { offset, .. }) => assert_eq!(offset, lost),
                other => panic!("{chunk_size}-byte chunks: {other:?}"),
            }
            assert!(
                restored.iter().all(|&byte| byte == 0),
                "nothing is copied before the holes are checked"
            );
            let mut page = vec![0u8; PAGE];
            assert!(matches!(
                base.fetch(lost, &mut page),
                Err(SourceError::Unavailable { offset, .. }) if offset == lost
            ));
        }
    }
}
