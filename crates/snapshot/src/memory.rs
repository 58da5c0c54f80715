//! Guest RAM as a sparse raw image with chunk checksums.
//!
//! `memory.img` holds the guest's RAM regions back to back: byte `i` of the image is byte `i`
//! of the concatenated regions, and the file's length is the total RAM. Zero pages, and in a
//! diff layer the pages the layer does not hold, are holes, so the file takes only the space
//! of the data it carries.
//!
//! `memory.sums` is a [`container`] (magic `FLTMSUMS`, version 1) whose payload is, little
//! endian:
//!
//! ```text
//! page_size u32 | chunk_size u32 | size u64 | kind u8 (0 full, 1 diff) | 7 zero bytes
//! | chunk count u64 | crc32 u32 x count
//! | (diff only) word count u64 | u64 x words: bit p set = the layer holds page p
//! ```
//!
//! A chunk's CRC32 is that of its bytes as they read back from `memory.img` (holes read as
//! zero); the last chunk may be shorter than the others. A chunk is at most 1 MiB.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use crate::container::{self, Decoder};
use crate::{SnapshotError, MEMORY_FILE, SUMS_FILE};

/// The page size of images: the unit of holes, diffs and working sets.
pub const PAGE_SIZE: u64 = 4096;
/// Bytes covered by one checksum in images this build writes: one page, so that a page read
/// on demand is checked with the bytes of that read alone (4 bytes of checksum per page,
/// 1 MiB per GiB of guest). Images with larger chunks (64 KiB before) still read.
pub const DEFAULT_CHUNK_SIZE: u64 = PAGE_SIZE;
/// The chunk size of images written by earlier versions (tests of those images).
#[cfg(test)]
pub(crate) const OLD_CHUNK_SIZE: u64 = 64 * 1024;
/// The magic of `memory.sums`.
pub const SUMS_MAGIC: [u8; 8] = *b"FLTMSUMS";
/// The format version of `memory.sums` this build writes and reads.
pub const SUMS_VERSION: u32 = 1;

/// The most bytes handed to one write: long runs of data pages are split so that a write
/// never pins an unbounded amount of guest memory in one system call.
const MAX_WRITE: usize = 1 << 20;
/// Progress is reported about this often (in bytes of image).
const PROGRESS_STEP: u64 = 64 << 20;

/// Zeros to hash in place of holes and zero pages.
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Chunk verification states.
const UNCHECKED: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

/// A range of host memory to snapshot, such as one guest RAM region as the VMM maps it.
#[derive(Debug, Clone, Copy)]
pub struct MemorySpan {
    addr: usize,
    len: u64,
    /// Read page by page with system calls (see [`MemorySpan::read_checked`]).
    checked: bool,
}

impl MemorySpan {
    /// The `len` bytes at `addr`, read in place.
    ///
    /// # Safety
    ///
    /// The range must stay mapped and readable for as long as the span is used, and nothing
    /// may write to it meanwhile (the guest is stopped while it is snapshotted).
    pub unsafe fn new(addr: *const u8, len: u64) -> Self {
        MemorySpan {
            addr: addr as usize,
            len,
            checked: false,
        }
    }

    /// The `len` bytes at `addr`, read page by page with system calls: for memory that may
    /// hold pages whose reads fail (guest RAM behind a pager, where a page that could not be
    /// provided is poisoned). Such a page is an error, not a signal.
    pub fn read_checked(addr: u64, len: u64) -> Self {
        MemorySpan {
            addr: addr as usize,
            len,
            checked: true,
        }
    }

    /// The first byte.
    pub fn addr(&self) -> *const u8 {
        self.addr as *const u8
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the span has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The span's bytes.
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `new`'s contract: the range is mapped, readable and not written while the
        // span is in use; it is non-empty, so the address is not null.
        unsafe { std::slice::from_raw_parts(self.addr(), self.len as usize) }
    }
}

/// A range of host memory to restore into, such as one freshly created guest RAM region.
#[derive(Debug, Clone, Copy)]
pub struct MemorySpanMut {
    addr: usize,
    len: u64,
}

impl MemorySpanMut {
    /// The `len` bytes at `addr`.
    ///
    /// # Safety
    ///
    /// The range must stay mapped and writable for as long as the span is used, and nothing
    /// else may access it while a restore writes to it.
    pub unsafe fn new(addr: *mut u8, len: u64) -> Self {
        MemorySpanMut {
            addr: addr as usize,
            len,
        }
    }

    /// The first byte.
    pub fn addr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the span has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Whether an image holds every page (a full snapshot) or only some (a diff layer over older
/// layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LayerKind {
    /// Every page: holes are zero pages.
    Full,
    /// The pages of its bitmap: holes among them are zero pages, the other pages come from
    /// older layers.
    Diff,
}

/// What [`write_image`] wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WriteSummary {
    /// Pages the layer holds (all of them for a full layer).
    pub pages_included: u64,
    /// Held pages with data, written to the image.
    pub data_pages: u64,
    /// Held pages that are zero, left as holes.
    pub zero_pages: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
}

/// Reports progress about every [`PROGRESS_STEP`] bytes, and once at the end.
pub(crate) struct Progress<'a> {
    report: &'a mut dyn FnMut(u64, u64),
    total: u64,
    done: u64,
    next: u64,
}

impl<'a> Progress<'a> {
    /// Progress over `total` bytes, reported to `report(done, total)`.
    pub(crate) fn new(total: u64, report: &'a mut dyn FnMut(u64, u64)) -> Self {
        Progress {
            report,
            total,
            done: 0,
            next: PROGRESS_STEP,
        }
    }

    /// `bytes` more are done.
    pub(crate) fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.done >= self.next {
            (self.report)(self.done, self.total);
            self.next = self.done + PROGRESS_STEP;
        }
    }

    /// Everything is done.
    pub(crate) fn finish(self) {
        (self.report)(self.total, self.total);
    }
}

/// Writes `memory.img` and `memory.sums` in `dir` from `spans`, laid back to back, as a layer
/// of kind `kind`. `include(p)` selects pages by index `p` across the concatenated spans:
///
/// - a diff layer holds exactly the pages `include` selects (all of them if it is `None`);
/// - a full layer holds every page, and `include`, if given, says which pages may hold data:
///   the others are taken as zero without being read (reading a page that was never touched
///   would allocate it).
///
/// Held zero pages and pages not held are holes. Both files are written under temporary names
/// and renamed into place once on disk. Every span must be a whole number of pages.
pub fn write_image(
    dir: &Path,
    spans: &[MemorySpan],
    kind: LayerKind,
    include: Option<&dyn Fn(u64) -> bool>,
) -> Result<WriteSummary, SnapshotError> {
    write_image_with_progress(dir, spans, kind, include, &mut |_, _| {})
}

/// [`write_image`], calling `progress(bytes done, total bytes)` every 64 MiB or so and at the
/// end.
pub fn write_image_with_progress(
    dir: &Path,
    spans: &[MemorySpan],
    kind: LayerKind,
    include: Option<&dyn Fn(u64) -> bool>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WriteSummary, SnapshotError> {
    write_image_chunked(dir, spans, kind, include, DEFAULT_CHUNK_SIZE, progress)
}

/// [`write_image_with_progress`] with `chunk_size` bytes to a checksum (a whole number of
/// pages): what earlier versions wrote with 64 KiB, for the tests of images they left.
pub(crate) fn write_image_chunked(
    dir: &Path,
    spans: &[MemorySpan],
    kind: LayerKind,
    include: Option<&dyn Fn(u64) -> bool>,
    chunk_size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WriteSummary, SnapshotError> {
    let image_path = dir.join(MEMORY_FILE);
    let mut size = 0u64;
    for (i, span) in spans.iter().enumerate() {
        if !span.len.is_multiple_of(PAGE_SIZE) {
            return Err(SnapshotError::malformed(
                &image_path,
                format!(
                    "memory span {i} is {:#x} bytes, not a whole number of {PAGE_SIZE}-byte pages",
                    span.len
                ),
            ));
        }
        size += span.len;
    }

    let tmp = container::tmp_path(&image_path);
    let mut progress = Progress::new(size, progress);
    let written = match write_data(&tmp, spans, size, kind, include, chunk_size, &mut progress) {
        Ok(written) => written,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &image_path).map_err(SnapshotError::io(&image_path))?;
    publish_sums(
        dir,
        &encode_sums(
            size,
            kind,
            chunk_size,
            &written.sums,
            written.bitmap.as_deref(),
        ),
    )?;
    tracing::debug!(
        "snapshot: wrote {} ({kind:?}): {:?}",
        image_path.display(),
        written.summary
    );
    progress.finish();
    Ok(written.summary)
}

/// The result of the pass over guest memory.
struct Written {
    summary: WriteSummary,
    sums: Vec<u32>,
    /// The held pages (a diff layer only).
    bitmap: Option<Vec<u64>>,
}

/// One pass over `spans`: writes the held data pages to a new sparse file at `tmp` and
/// computes the chunk checksums on the way.
fn write_data(
    tmp: &Path,
    spans: &[MemorySpan],
    size: u64,
    kind: LayerKind,
    include: Option<&dyn Fn(u64) -> bool>,
    chunk_size: u64,
    progress: &mut Progress<'_>,
) -> Result<Written, SnapshotError> {
    let file = File::create(tmp).map_err(SnapshotError::io(tmp))?;
    // Everything starts as a hole; only data is written.
    file.set_len(size).map_err(SnapshotError::io(tmp))?;
    let page_len = PAGE_SIZE as usize;
    let mut bitmap =
        (kind == LayerKind::Diff).then(|| vec![0u64; (size / PAGE_SIZE).div_ceil(64) as usize]);
    let mut sums = ChunkSums::new(chunk_size, size);
    let mut summary = WriteSummary::default();
    let mut page_index = 0u64;
    let mut span_base = 0u64;
    let mut copy = vec![0u8; page_len];
    for span in spans {
        // A checked span is copied a page at a time, and each data page written at once.
        let bytes = if span.checked { &[][..] } else { span.bytes() };
        // Start (in the span) of the data pages not written yet: consecutive data pages of a
        // span are contiguous in memory and in the image, so they go in one write.
        let mut run: Option<usize> = None;
        for i in 0..(span.len / PAGE_SIZE) as usize {
            let at = i * page_len;
            let included = include.is_none_or(|include| include(page_index));
            let held = included || kind == LayerKind::Full;
            let page: &[u8] = if !included {
                // A page left out is not read: a full layer takes it as zero.
                &ZERO_PAGE
            } else if span.checked {
                vmm::memory::read_host(span.addr as u64 + at as u64, &mut copy).map_err(
                    |source| SnapshotError::GuestMemory {
                        offset: page_index * PAGE_SIZE,
                        source,
                    },
                )?;
                &copy
            } else {
                &bytes[at..at + page_len]
            };
            let data = included && !is_zero_page(page);
            if held {
                summary.pages_included += 1;
                if data {
                    summary.data_pages += 1;
                } else {
                    summary.zero_pages += 1;
                }
                if let Some(bitmap) = &mut bitmap {
                    bitmap[(page_index / 64) as usize] |= 1u64 << (page_index % 64);
                }
            }
            sums.push(data.then_some(page));

            if data && span.checked {
                write_run(&file, tmp, page, span_base + at as u64)?;
            } else if data {
                let start = *run.get_or_insert(at);
                if at + page_len - start >= MAX_WRITE {
                    write_run(
                        &file,
                        tmp,
                        &bytes[start..at + page_len],
                        span_base + start as u64,
                    )?;
                    run = None;
                }
            } else if let Some(start) = run.take() {
                write_run(&file, tmp, &bytes[start..at], span_base + start as u64)?;
            }
            page_index += 1;
            progress.advance(PAGE_SIZE);
        }
        if let Some(start) = run {
            write_run(&file, tmp, &bytes[start..], span_base + start as u64)?;
        }
        span_base += span.len;
    }
    summary.bytes_written = summary.data_pages * PAGE_SIZE;
    file.sync_data().map_err(SnapshotError::io(tmp))?;
    Ok(Written {
        summary,
        sums: sums.finish(),
        bitmap,
    })
}

/// An image written page by page in any order, from several threads (a live snapshot: the
/// writer walks RAM while write faults save pages ahead of it). Each page is written once;
/// pages never written are zero (holes). One checksum per page.
pub struct PageImageWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: File,
    size: u64,
    kind: LayerKind,
    /// The held pages of a diff layer.
    bitmap: Option<Vec<u64>>,
    held: u64,
    sums: Vec<std::sync::atomic::AtomicU32>,
    data_pages: std::sync::atomic::AtomicU64,
}

impl PageImageWriter {
    /// A new image of `size` bytes in `dir` (under a temporary name until
    /// [`finish`](Self::finish)). A diff layer holds the pages whose bit is set in `held`;
    /// a full layer holds every page.
    pub fn create(
        dir: &Path,
        size: u64,
        kind: LayerKind,
        held: Option<Vec<u64>>,
    ) -> Result<Self, SnapshotError> {
        let image_path = dir.join(MEMORY_FILE);
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(SnapshotError::malformed(
                &image_path,
                format!("{size:#x} bytes is not a whole number of {PAGE_SIZE}-byte pages"),
            ));
        }
        let pages = size / PAGE_SIZE;
        let bitmap = match kind {
            LayerKind::Full => None,
            LayerKind::Diff => {
                let mut bitmap = held.unwrap_or_default();
                bitmap.resize(pages.div_ceil(64) as usize, 0);
                Some(bitmap)
            }
        };
        let held = match &bitmap {
            None => pages,
            Some(bitmap) => bitmap.iter().map(|w| u64::from(w.count_ones())).sum(),
        };
        let tmp = container::tmp_path(&image_path);
        let file = File::create(&tmp).map_err(SnapshotError::io(&tmp))?;
        if let Err(e) = file.set_len(size) {
            let _ = std::fs::remove_file(&tmp);
            return Err(SnapshotError::io(&tmp)(e));
        }
        let zero = crc32fast::hash(&ZERO_PAGE);
        Ok(PageImageWriter {
            dir: dir.to_path_buf(),
            tmp,
            file,
            size,
            kind,
            bitmap,
            held,
            sums: (0..pages)
                .map(|_| std::sync::atomic::AtomicU32::new(zero))
                .collect(),
            data_pages: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Writes page `index` (a zero page is left a hole). Safe to call from several threads,
    /// for different pages.
    pub fn write_page(&self, index: u64, bytes: &[u8]) -> Result<(), SnapshotError> {
        assert_eq!(bytes.len() as u64, PAGE_SIZE, "one page");
        if is_zero_page(bytes) {
            return Ok(());
        }
        write_run(&self.file, &self.tmp, bytes, index * PAGE_SIZE)?;
        self.sums[index as usize].store(crc32fast::hash(bytes), Ordering::Relaxed);
        self.data_pages.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Syncs the image and renames it into place, then writes its checksums.
    pub fn finish(&self) -> Result<WriteSummary, SnapshotError> {
        let image_path = self.dir.join(MEMORY_FILE);
        let result = self
            .file
            .sync_data()
            .map_err(SnapshotError::io(&self.tmp))
            .and_then(|()| {
                std::fs::rename(&self.tmp, &image_path).map_err(SnapshotError::io(&image_path))
            });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e);
        }
        let sums: Vec<u32> = self
            .sums
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        publish_sums(
            &self.dir,
            &encode_sums(
                self.size,
                self.kind,
                PAGE_SIZE,
                &sums,
                self.bitmap.as_deref(),
            ),
        )?;
        let data_pages = self.data_pages.load(Ordering::Relaxed);
        Ok(WriteSummary {
            pages_included: self.held,
            data_pages,
            zero_pages: self.held - data_pages,
            bytes_written: data_pages * PAGE_SIZE,
        })
    }

    /// Gives up: the temporary file is removed.
    pub fn abandon(&self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes `bytes` at `offset` of the image being written.
fn write_run(file: &File, path: &Path, bytes: &[u8], offset: u64) -> Result<(), SnapshotError> {
    file.write_all_at(bytes, offset)
        .map_err(SnapshotError::io(path))
}

/// Whether a page is all zero. Words are ORed together a 64-byte block at a time (which the
/// compiler vectorises), stopping at the first block that is not zero.
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    let zero_blocks = blocks.all(|block| {
        block
            .chunks_exact(8)
            .map(|word| u64::from_ne_bytes(word.try_into().expect("8-byte word")))
            .fold(0, |acc, word| acc | word)
            == 0
    });
    zero_blocks && blocks.remainder().iter().all(|&byte| byte == 0)
}

/// Hashes `len` zero bytes.
fn hash_zeros(hasher: &mut crc32fast::Hasher, mut len: u64) {
    while len > 0 {
        let n = len.min(PAGE_SIZE);
        hasher.update(&ZERO_PAGE[..n as usize]);
        len -= n;
    }
}

/// Chunk checksums computed a page at a time, in image order. Zero pages are hashed only when
/// needed: an all-zero chunk takes a checksum computed once.
struct ChunkSums {
    chunk_size: u64,
    hasher: crc32fast::Hasher,
    /// Bytes of the current chunk seen so far.
    filled: u64,
    /// Zero bytes of the current chunk not hashed yet.
    zeros: u64,
    has_data: bool,
    /// The checksum of a whole chunk of zeros.
    zero_chunk: u32,
    sums: Vec<u32>,
}

impl ChunkSums {
    /// For an image of `size` bytes in chunks of `chunk_size` (a whole number of pages).
    fn new(chunk_size: u64, size: u64) -> Self {
        let mut zero_chunk = crc32fast::Hasher::new();
        hash_zeros(&mut zero_chunk, chunk_size);
        ChunkSums {
            chunk_size,
            hasher: crc32fast::Hasher::new(),
            filled: 0,
            zeros: 0,
            has_data: false,
            zero_chunk: zero_chunk.finalize(),
            sums: Vec::with_capacity(size.div_ceil(chunk_size) as usize),
        }
    }

    /// The next page: its bytes, or `None` if it reads back as zero.
    fn push(&mut self, page: Option<&[u8]>) {
        match page {
            Some(bytes) => {
                hash_zeros(&mut self.hasher, self.zeros);
                self.zeros = 0;
                self.hasher.update(bytes);
                self.has_data = true;
            }
            None => self.zeros += PAGE_SIZE,
        }
        self.filled += PAGE_SIZE;
        if self.filled == self.chunk_size {
            self.end_chunk();
        }
    }

    fn end_chunk(&mut self) {
        let crc = if !self.has_data && self.filled == self.chunk_size {
            self.zero_chunk
        } else {
            hash_zeros(&mut self.hasher, self.zeros);
            std::mem::take(&mut self.hasher).finalize()
        };
        self.sums.push(crc);
        self.filled = 0;
        self.zeros = 0;
        self.has_data = false;
    }

    /// The checksums, the last (shorter) chunk included.
    fn finish(mut self) -> Vec<u32> {
        if self.filled > 0 {
            self.end_chunk();
        }
        self.sums
    }
}

/// The end of writing an image renamed into `dir`: the directory synced (the rename is
/// durable), then its checksums file written (`payload`, from `encode_sums`).
fn publish_sums(dir: &Path, payload: &[u8]) -> Result<(), SnapshotError> {
    container::sync_dir(dir)?;
    container::write(&dir.join(SUMS_FILE), &SUMS_MAGIC, SUMS_VERSION, payload)
}

/// The `memory.sums` payload.
fn encode_sums(
    size: u64,
    kind: LayerKind,
    chunk_size: u64,
    sums: &[u32],
    bitmap: Option<&[u64]>,
) -> Vec<u8> {
    let bitmap = bitmap.unwrap_or_default();
    let mut out: Vec<u8> = Vec::with_capacity(40 + 4 * sums.len() + 8 * bitmap.len());
    out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(chunk_size as u32).to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.push(match kind {
        LayerKind::Full => 0,
        LayerKind::Diff => 1,
    });
    out.extend_from_slice(&[0; 7]);
    out.extend_from_slice(&(sums.len() as u64).to_le_bytes());
    for sum in sums {
        out.extend_from_slice(&sum.to_le_bytes());
    }
    if kind == LayerKind::Diff {
        out.extend_from_slice(&(bitmap.len() as u64).to_le_bytes());
        for word in bitmap {
            out.extend_from_slice(&word.to_le_bytes());
        }
    }
    out
}

/// A decoded `memory.sums` payload.
struct Sums {
    size: u64,
    chunk_size: u64,
    kind: LayerKind,
    sums: SumTable,
    bitmap: Vec<u64>,
}

/// The chunk checksums, left where they were read (a GiB of guest has a MiB of them: copying
/// them into a table of their own would double the memory a restore touches before the
/// guest runs).
struct SumTable {
    payload: Vec<u8>,
    /// Where the first checksum is in `payload`.
    start: usize,
    count: usize,
}

impl SumTable {
    /// The checksum of chunk `chunk`, which must exist.
    fn get(&self, chunk: u64) -> u32 {
        assert!(chunk < self.count as u64, "chunk {chunk} of {}", self.count);
        let at = self.start + chunk as usize * 4;
        u32::from_le_bytes(self.payload[at..at + 4].try_into().expect("four bytes"))
    }

    fn len(&self) -> usize {
        self.count
    }
}

/// The largest chunk a checksums file may declare: more than faultline ever wrote (4 KiB, and
/// 64 KiB before), and little enough to read a chunk into memory whole.
const MAX_CHUNK_SIZE: u64 = 1 << 20;

fn decode_sums(path: &Path, payload: Vec<u8>) -> Result<Sums, SnapshotError> {
    let mut d = Decoder::new(path, &payload);
    d.page_size()?;
    let chunk_size = u64::from(d.u32("the chunk size")?);
    if chunk_size == 0 || !chunk_size.is_multiple_of(PAGE_SIZE) {
        return Err(d.malformed(format!(
            "the chunk size {chunk_size} is not a whole number of pages"
        )));
    }
    if chunk_size > MAX_CHUNK_SIZE {
        return Err(d.malformed(format!(
            "the chunk size {chunk_size} is over the most a chunk may be ({MAX_CHUNK_SIZE})"
        )));
    }
    let size = d.u64("the image size")?;
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(d.malformed(format!(
            "the image size {size:#x} is not a whole number of pages"
        )));
    }
    let kind = match d.u8("the layer kind")? {
        0 => LayerKind::Full,
        1 => LayerKind::Diff,
        other => return Err(d.malformed(format!("unknown layer kind {other}"))),
    };
    d.take(7, "the reserved bytes")?;
    let count = d.u64("the chunk count")?;
    let expected = size.div_ceil(chunk_size);
    if count != expected {
        return Err(d.malformed(format!(
            "{count} chunk checksums for {size} bytes in {chunk_size}-byte chunks, not {expected}"
        )));
    }
    let start = d.position();
    d.take_array(count, 4, "the chunk checksums")?;
    let bitmap = match kind {
        LayerKind::Full => Vec::new(),
        LayerKind::Diff => {
            let words = d.u64("the bitmap length")?;
            let expected = (size / PAGE_SIZE).div_ceil(64);
            if words != expected {
                return Err(d.malformed(format!(
                    "a bitmap of {words} words for {} pages (expected {expected})",
                    size / PAGE_SIZE
                )));
            }
            container::u64s(d.take_array(words, 8, "the page bitmap")?).collect()
        }
    };
    d.finish()?;
    Ok(Sums {
        size,
        chunk_size,
        kind,
        sums: SumTable {
            payload,
            start,
            count: count as usize,
        },
        bitmap,
    })
}

/// One layer of a snapshot's memory: `memory.img`, read with `pread`, with its checksums.
/// Chunks are verified on first use and the result is kept, so each is read for
/// verification at most once.
pub struct MemoryImage {
    dir: PathBuf,
    /// `memory.img`.
    path: PathBuf,
    size: u64,
    kind: LayerKind,
    chunk_size: u64,
    sums: SumTable,
    /// The held pages of a diff layer (empty for a full one).
    bitmap: Vec<u64>,
    /// Sorted, disjoint `[start, end)` ranges that hold data (the rest are holes).
    data: Vec<(u64, u64)>,
    /// Per chunk: `UNCHECKED`, `GOOD` or `BAD`.
    verified: Vec<AtomicU8>,
    /// The checksum of a whole chunk of zeros, once needed.
    zero_chunk: OnceLock<u32>,
    /// The image, read with system calls (`pread`): a file that shrinks or fails under a
    /// restore gives an error, never a signal.
    file: File,
}

impl fmt::Debug for MemoryImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("kind", &self.kind)
            .field("chunk_size", &self.chunk_size)
            .field("data_extents", &self.data.len())
            .finish_non_exhaustive()
    }
}

impl MemoryImage {
    /// Opens the layer in `dir`: reads and checks `memory.sums`, checks that `memory.img` has
    /// the size it records, and finds its data extents. The image's chunks
    /// are verified later, as they are used.
    pub fn open(dir: &Path) -> Result<MemoryImage, SnapshotError> {
        let sums_path = dir.join(SUMS_FILE);
        let payload = container::read(&sums_path, &SUMS_MAGIC, SUMS_VERSION)?;
        let sums = decode_sums(&sums_path, payload)?;

        let path = dir.join(MEMORY_FILE);
        let file = File::open(&path).map_err(SnapshotError::io(&path))?;
        let found = file.metadata().map_err(SnapshotError::io(&path))?.len();
        if found != sums.size {
            return Err(SnapshotError::ImageSize {
                path,
                expected: sums.size,
                found,
            });
        }
        let data = pager::data_extents(&file, sums.size).map_err(SnapshotError::io(&path))?;
        Ok(MemoryImage {
            dir: dir.to_path_buf(),
            path,
            size: sums.size,
            kind: sums.kind,
            chunk_size: sums.chunk_size,
            verified: (0..sums.sums.len())
                .map(|_| AtomicU8::new(UNCHECKED))
                .collect(),
            zero_chunk: OnceLock::new(),
            sums: sums.sums,
            bitmap: sums.bitmap,
            data,
            file,
        })
    }

    /// The snapshot directory this layer is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image file (`memory.img`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's size in bytes: the guest's RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pages in the image.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// A full image or a diff layer.
    pub fn kind(&self) -> LayerKind {
        self.kind
    }

    /// Bytes covered by one checksum.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks (the last may be shorter).
    pub fn chunks(&self) -> u64 {
        self.sums.len() as u64
    }

    /// Whether this layer holds page `page` (every page of a full image; the pages of its
    /// bitmap for a diff layer). Pages past the end are never held.
    pub fn contains(&self, page: u64) -> bool {
        if page >= self.pages() {
            return false;
        }
        match self.kind {
            LayerKind::Full => true,
            LayerKind::Diff => (self.bitmap[(page / 64) as usize] >> (page % 64)) & 1 == 1,
        }
    }

    /// The pages this layer holds, in increasing order.
    pub fn held_pages(&self) -> impl Iterator<Item = u64> + '_ {
        let pages = self.pages();
        let full = if self.kind == LayerKind::Full {
            pages
        } else {
            0
        };
        let diff = self.bitmap.iter().enumerate().flat_map(|(i, &word)| Bits {
            word,
            base: i as u64 * 64,
        });
        (0..full).chain(diff.filter(move |&page| page < pages))
    }

    /// How many pages this layer holds.
    pub fn held_page_count(&self) -> u64 {
        match self.kind {
            LayerKind::Full => self.pages(),
            LayerKind::Diff => self.held_pages().count() as u64,
        }
    }

    /// The verification state of chunk `chunk`, which must exist.
    fn chunk_state(&self, chunk: u64) -> Result<&AtomicU8, SnapshotError> {
        usize::try_from(chunk)
            .ok()
            .and_then(|i| self.verified.get(i))
            .ok_or_else(|| {
                SnapshotError::malformed(
                    &self.path,
                    format!(
                        "chunk {chunk} is past the end of the image ({} chunks)",
                        self.chunks()
                    ),
                )
            })
    }

    /// Checks chunk `chunk` against its checksum, once: later calls return the first
    /// answer. A damaged chunk is a [`SnapshotError::ChunkChecksum`] naming `memory.img`.
    pub fn verify_chunk(&self, chunk: u64) -> Result<(), SnapshotError> {
        let state = self.chunk_state(chunk)?;
        match state.load(Ordering::Acquire) {
            GOOD => Ok(()),
            BAD => Err(self.chunk_error(chunk)),
            // Two threads may both get here for one chunk: they compute the same answer.
            _ => self.check_chunk(chunk),
        }
    }

    /// Verifies every chunk that overlaps `[offset, offset + len)` (the part of it inside the
    /// image).
    pub fn verify_range(&self, offset: u64, len: u64) -> Result<(), SnapshotError> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        for chunk in offset / self.chunk_size..=(end - 1) / self.chunk_size {
            self.verify_chunk(chunk)?;
        }
        Ok(())
    }

    /// Verifies the whole image, stopping at the first damaged chunk. `progress(done, total)`
    /// is called every 64 MiB or so and at the end.
    pub fn verify_all(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), SnapshotError> {
        let mut progress = Progress::new(self.size, progress);
        for chunk in 0..self.chunks() {
            self.verify_chunk(chunk)?;
            let start = chunk * self.chunk_size;
            progress.advance((start + self.chunk_size).min(self.size) - start);
        }
        progress.finish();
        Ok(())
    }

    /// Whether any data extent overlaps `[start, end)` (if none does, the range reads as
    /// zero).
    pub fn has_data(&self, start: u64, end: u64) -> bool {
        let i = self.data.partition_point(|&(_, e)| e <= start);
        self.data.get(i).is_some_and(|&(s, _)| s < end)
    }

    /// Reads `buf.len()` bytes at `offset` (not verified: see
    /// [`verify_range`](Self::verify_range)). A file that has become shorter than the image
    /// it held is [`SnapshotError::Truncated`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.file.read_exact_at(buf, offset).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                SnapshotError::Truncated {
                    path: self.path.clone(),
                    expected: self.size,
                    found: self.file.metadata().map_or(0, |m| m.len()),
                }
            } else {
                SnapshotError::Io {
                    path: self.path.clone(),
                    source,
                }
            }
        })
    }

    /// Reads `buf.len()` bytes at `offset` and checks them against their chunks' checksums
    /// (remembering the answers), so that a caller copies exactly the bytes that were
    /// checked. The range must be whole chunks; ranges without data are read as zeros without
    /// a read. Returns whether the range holds data (`false`: `buf` was left alone, every
    /// byte is zero).
    pub fn read_verified(&self, offset: u64, buf: &mut [u8]) -> Result<bool, SnapshotError> {
        let len = buf.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.size && offset.is_multiple_of(self.chunk_size))
            .filter(|&end| end.is_multiple_of(self.chunk_size) || end == self.size)
            .ok_or_else(|| {
                SnapshotError::malformed(
                    &self.path,
                    format!("[{offset:#x}, +{len:#x}) is not whole chunks of the image"),
                )
            })?;
        if !self.has_data(offset, end) {
            self.verify_range(offset, len)?;
            return Ok(false);
        }
        self.read_at(offset, buf)?;
        for (i, bytes) in buf.chunks(self.chunk_size as usize).enumerate() {
            self.settle(offset / self.chunk_size + i as u64, bytes)?;
        }
        Ok(true)
    }

    /// Checks the bytes read of chunk `chunk` against its checksum and remembers the answer;
    /// a damaged chunk is a [`SnapshotError::ChunkChecksum`] naming `memory.img`.
    fn settle(&self, chunk: u64, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.settle_sum(chunk, crc32fast::hash(bytes))
    }

    /// [`settle`](Self::settle) for chunk `chunk` whose bytes have the checksum `sum`.
    fn settle_sum(&self, chunk: u64, sum: u32) -> Result<(), SnapshotError> {
        let state = self.chunk_state(chunk)?;
        let good = sum == self.sums.get(chunk);
        state.store(if good { GOOD } else { BAD }, Ordering::Release);
        if good {
            Ok(())
        } else {
            tracing::warn!(
                "snapshot: chunk {chunk} of {} does not match its checksum",
                self.path.display()
            );
            Err(self.chunk_error(chunk))
        }
    }

    /// Whether a page can be checked on its own: the image's chunks are single pages.
    pub fn pages_checkable(&self) -> bool {
        self.chunk_size == PAGE_SIZE
    }

    /// Checks `bytes`, read from elsewhere (a working set), against the checksum of page
    /// `page`: they must be the page's contents in this image. Needs single-page chunks
    /// ([`pages_checkable`](Self::pages_checkable)).
    pub fn check_page(&self, page: u64, bytes: &[u8]) -> Result<(), SnapshotError> {
        if !self.pages_checkable() || bytes.len() as u64 != PAGE_SIZE {
            return Err(SnapshotError::malformed(
                &self.path,
                format!(
                    "page {page} cannot be checked alone ({} bytes against {}-byte chunks)",
                    bytes.len(),
                    self.chunk_size
                ),
            ));
        }
        let sum = self.chunk_state(page).map(|_| self.sums.get(page))?;
        if crc32fast::hash(bytes) == sum {
            Ok(())
        } else {
            Err(self.chunk_error(page))
        }
    }

    /// Reads chunk `chunk` (data extents with `pread`, holes as zeros without reading them)
    /// and checks it, remembering the answer. A read error is returned as it is and not
    /// remembered (it says nothing of the contents).
    fn check_chunk(&self, chunk: u64) -> Result<(), SnapshotError> {
        self.chunk_state(chunk)?;
        let start = chunk * self.chunk_size;
        let end = (start + self.chunk_size).min(self.size);
        if !self.has_data(start, end) {
            // All zeros: the checksum of zeros is known without reading or hashing them.
            return self.settle_sum(chunk, self.zero_sum(end - start));
        }
        let mut buf = vec![0u8; (end - start) as usize];
        let first = self.data.partition_point(|&(_, e)| e <= start);
        for &(s, e) in &self.data[first..] {
            if s >= end {
                break;
            }
            let (s, e) = (s.max(start), e.min(end));
            self.read_at(s, &mut buf[(s - start) as usize..(e - start) as usize])?;
        }
        self.settle(chunk, &buf)
    }

    /// Checks every chunk that holds no data (it reads as zeros) against its checksum,
    /// without reading the file: a chunk written with data that is now a hole (a copy that
    /// never reached the disk, a range punched out) is a [`SnapshotError::ChunkChecksum`].
    pub fn verify_holes(&self) -> Result<(), SnapshotError> {
        let mut hole_start = 0u64;
        for (start, end) in self.data.iter().copied().chain([(self.size, self.size)]) {
            // The chunks wholly inside the hole `[hole_start, start)` (the last chunk, maybe
            // shorter, ends with the image).
            let first = hole_start.div_ceil(self.chunk_size);
            let last = if start == self.size {
                self.chunks()
            } else {
                start / self.chunk_size
            };
            for chunk in first..last {
                self.verify_chunk(chunk)?;
            }
            hole_start = end;
        }
        Ok(())
    }

    /// The checksum of `len` zero bytes (a whole chunk's is computed once).
    fn zero_sum(&self, len: u64) -> u32 {
        let zeros = |len| {
            let mut hasher = crc32fast::Hasher::new();
            hash_zeros(&mut hasher, len);
            hasher.finalize()
        };
        if len == self.chunk_size {
            *self.zero_chunk.get_or_init(|| zeros(len))
        } else {
            zeros(len)
        }
    }

    /// Sorted, disjoint `[start, end)` byte ranges of the image that hold data; everything
    /// else is a hole.
    pub fn data_extents(&self) -> &[(u64, u64)] {
        &self.data
    }

    fn chunk_error(&self, chunk: u64) -> SnapshotError {
        SnapshotError::ChunkChecksum {
            path: self.path.clone(),
            chunk,
            offset: chunk * self.chunk_size,
        }
    }
}

/// The set bits of one bitmap word, as page indices.
struct Bits {
    word: u64,
    base: u64,
}

impl Iterator for Bits {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.word == 0 {
            return None;
        }
        let bit = u64::from(self.word.trailing_zeros());
        // Clear the lowest set bit.
        self.word &= self.word - 1;
        Some(self.base + bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fill_page, spans, TempDir};

    const PAGE: usize = PAGE_SIZE as usize;

    fn write_full(dir: &Path, buf: &[u8], cuts: &[u64]) -> WriteSummary {
        write_image(dir, &spans(buf, cuts), LayerKind::Full, None).unwrap()
    }

    #[test]
    fn pages_written_out_of_order_read_back_checked_like_a_sequential_image() {
        let dir = TempDir::new("memory-page-writer");
        let pages = 96u64;
        let mut buf = vec![0u8; pages as usize * PAGE];
        for page in [3, 4, 50, 95] {
            fill_page(&mut buf, page, 7);
        }
        // A diff holding pages 0-63: page 95 has data but is not held, 10 is held and zero.
        let held = vec![u64::MAX, 0];
        let writer =
            PageImageWriter::create(dir.path(), pages * PAGE_SIZE, LayerKind::Diff, Some(held))
                .unwrap();
        for page in [50u64, 10, 4, 3] {
            let at = page as usize * PAGE;
            writer.write_page(page, &buf[at..at + PAGE]).unwrap();
        }
        let summary = writer.finish().unwrap();
        assert_eq!(summary.pages_included, 64);
        assert_eq!(summary.data_pages, 3);
        assert_eq!(summary.zero_pages, 61);
        let image = MemoryImage::open(dir.path()).unwrap();
        assert_eq!(image.kind(), LayerKind::Diff);
        assert!(image.contains(10) && !image.contains(95));
        image.verify_all(&mut |_, _| {}).unwrap();
        let mut read = vec![0u8; 64 * PAGE];
        image.read_at(0, &mut read).unwrap();
        assert_eq!(read, buf[..64 * PAGE]);
    }

    #[test]
    fn full_image_round_trip_with_holes_for_zero_pages() {
        let dir = TempDir::new("memory-full");
        let pages = 320u64;
        let mut buf = vec![0u8; pages as usize * PAGE];
        // A run of 260 data pages (more than one 1 MiB write) that crosses the boundary
        // between the two spans, and a few lone ones.
        let data: Vec<u64> = [0, 1, 5, 17]
            .into_iter()
            .chain(40..300)
            .chain([319])
            .collect();
        for &page in &data {
            fill_page(&mut buf, page, 1);
        }
        let mut reports = Vec::new();
        let summary = write_image_with_progress(
            dir.path(),
            &spans(&buf, &[100]),
            LayerKind::Full,
            None,
            &mut |done, total| reports.push((done, total)),
        )
        .unwrap();
        let size = pages * PAGE_SIZE;
        assert_eq!(summary.pages_included, pages);
        assert_eq!(summary.data_pages, data.len() as u64);
        assert_eq!(summary.zero_pages, pages - data.len() as u64);
        assert_eq!(summary.bytes_written, data.len() as u64 * PAGE_SIZE);
        assert_eq!(reports.last(), Some(&(size, size)));
        // Nothing else is left in the directory (no temporary file).
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [MEMORY_FILE, SUMS_FILE]);

        assert_eq!(std::fs::read(dir.path().join(MEMORY_FILE)).unwrap(), buf);
        let image = MemoryImage::open(dir.path()).unwrap();
        assert_eq!(image.size(), size);
        assert_eq!(image.kind(), LayerKind::Full);
        assert_eq!(image.chunk_size(), DEFAULT_CHUNK_SIZE);
        assert_eq!(image.chunks(), size / DEFAULT_CHUNK_SIZE);
        assert!(image.contains(0) && image.contains(319) && !image.contains(320));
        assert_eq!(image.held_page_count(), pages);
        image.verify_all(&mut |_, _| {}).unwrap();

        // Zero pages are holes (SEEK_DATA does not find them), data pages are not.
        assert!(!image.has_data(2 * PAGE_SIZE, 5 * PAGE_SIZE));
        assert!(!image.has_data(300 * PAGE_SIZE, 319 * PAGE_SIZE));
        assert!(image.has_data(5 * PAGE_SIZE, 6 * PAGE_SIZE));
        assert!(image.has_data(40 * PAGE_SIZE, 41 * PAGE_SIZE));
        let data_bytes: u64 = image.data_extents().iter().map(|(s, e)| e - s).sum();
        assert!(data_bytes < size, "the image is sparse");

        let mut page = vec![0u8; PAGE];
        image.read_at(17 * PAGE_SIZE, &mut page).unwrap();
        assert_eq!(page, &buf[17 * PAGE..18 * PAGE]);
    }

    #[test]
    fn diff_layer_holds_only_the_chosen_pages() {
        let dir = TempDir::new("memory-diff");
        let mut buf = vec![0u8; 64 * PAGE];
        for page in [3, 4, 10, 63] {
            fill_page(&mut buf, page, 2);
        }
        // Page 20 is chosen and zero; page 10 has data but is not chosen.
        let chosen = [3u64, 4, 20, 63];
        let held: &dyn Fn(u64) -> bool = &|page| chosen.contains(&page);
        let summary =
            write_image(dir.path(), &spans(&buf, &[]), LayerKind::Diff, Some(held)).unwrap();
        assert_eq!(summary.pages_included, 4);
        assert_eq!(summary.data_pages, 3);
        assert_eq!(summary.zero_pages, 1);
        assert_eq!(summary.bytes_written, 3 * PAGE_SIZE);

        let image = MemoryImage::open(dir.path()).unwrap();
        assert_eq!(image.kind(), LayerKind::Diff);
        assert!(image.contains(20), "a chosen zero page is held");
        assert!(!image.contains(10) && !image.contains(0) && !image.contains(64));
        assert_eq!(image.held_pages().collect::<Vec<_>>(), chosen);
        assert_eq!(image.held_page_count(), 4);
        assert!(!image.has_data(10 * PAGE_SIZE, 11 * PAGE_SIZE));
        assert!(!image.has_data(20 * PAGE_SIZE, 21 * PAGE_SIZE));
        image.verify_all(&mut |_, _| {}).unwrap();

        let mut expected = vec![0u8; 64 * PAGE];
        for page in [3, 4, 63] {
            fill_page(&mut expected, page, 2);
        }
        assert_eq!(
            std::fs::read(dir.path().join(MEMORY_FILE)).unwrap(),
            expected
        );
    }

    #[test]
    fn a_full_layer_takes_pages_left_out_as_zero() {
        let dir = TempDir::new("memory-resident");
        let mut buf = vec![0u8; 20 * PAGE];
        fill_page(&mut buf, 2, 6);
        fill_page(&mut buf, 5, 6);
        // Page 2 is left out (as if its memfd had a hole there): it is not read.
        let resident: &dyn Fn(u64) -> bool = &|page| page == 5;
        let summary = write_image(
            dir.path(),
            &spans(&buf, &[]),
            LayerKind::Full,
            Some(resident),
        )
        .unwrap();
        assert_eq!(summary.pages_included, 20);
        assert_eq!((summary.data_pages, summary.zero_pages), (1, 19));
        let image = MemoryImage::open(dir.path()).unwrap();
        assert_eq!(image.kind(), LayerKind::Full);
        assert!(image.contains(2) && !image.has_data(2 * PAGE_SIZE, 3 * PAGE_SIZE));
        image.verify_all(&mut |_, _| {}).unwrap();
        let mut expected = vec![0u8; 20 * PAGE];
        fill_page(&mut expected, 5, 6);
        assert_eq!(
            std::fs::read(dir.path().join(MEMORY_FILE)).unwrap(),
            expected
        );
    }

    #[test]
    fn a_flipped_byte_fails_exactly_its_chunk() {
        let dir = TempDir::new("memory-flipped");
        let mut buf = vec![0u8; 48 * PAGE];
        for page in 0..48 {
            fill_page(&mut buf, page, 3);
        }
        write_full(dir.path(), &buf, &[]);
        let image_path = dir.path().join(MEMORY_FILE);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image_path)
            .unwrap();
        let at = DEFAULT_CHUNK_SIZE + 100;
        file.write_all_at(&[buf[at as usize] ^ 0x40], at).unwrap();
        drop(file);

        let image = MemoryImage::open(dir.path()).unwrap();
        image.verify_chunk(0).unwrap();
        for _ in 0..2 {
            match image.verify_chunk(1) {
                Err(SnapshotError::ChunkChecksum {
                    path,
                    chunk,
                    offset,
                }) => {
                    assert_eq!(path, image_path);
                    assert_eq!((chunk, offset), (1, DEFAULT_CHUNK_SIZE));
                }
                other => panic!("{other:?}"),
            }
        }
        image.verify_chunk(2).unwrap();
        image.verify_range(0, PAGE_SIZE).unwrap();
        assert!(image.verify_range(DEFAULT_CHUNK_SIZE - 1000, 2000).is_err());
        assert!(image.verify_all(&mut |_, _| {}).is_err());
        assert!(image.verify_chunk(image.chunks()).is_err(), "past the end");

        // Reads checked with their own bytes: the damaged chunk is refused, its neighbours
        // read; only whole chunks can be checked.
        let chunk = DEFAULT_CHUNK_SIZE as usize;
        let mut two = vec![0u8; 2 * chunk];
        assert!(matches!(
            image.read_verified(0, &mut two),
            Err(SnapshotError::ChunkChecksum { chunk: 1, .. })
        ));
        assert!(image
            .read_verified(2 * DEFAULT_CHUNK_SIZE, &mut two)
            .unwrap());
        assert!(two[..] == buf[2 * chunk..4 * chunk]);
        assert!(matches!(
            image.read_verified(100, &mut two),
            Err(SnapshotError::Malformed { .. })
        ));
    }

    #[test]
    fn a_truncated_image_is_caught_at_open() {
        let dir = TempDir::new("memory-truncated");
        let mut buf = vec![0u8; 16 * PAGE];
        fill_page(&mut buf, 0, 4);
        write_full(dir.path(), &buf, &[]);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(MEMORY_FILE))
            .unwrap();
        file.set_len(15 * PAGE_SIZE).unwrap();
        match MemoryImage::open(dir.path()) {
            Err(SnapshotError::ImageSize {
                expected, found, ..
            }) => assert_eq!((expected, found), (16 * PAGE_SIZE, 15 * PAGE_SIZE)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupt_sums_are_caught_at_open() {
        let dir = TempDir::new("memory-sums");
        let mut buf = vec![0u8; 16 * PAGE];
        fill_page(&mut buf, 7, 5);
        write_full(dir.path(), &buf, &[]);
        let sums_path = dir.path().join(SUMS_FILE);
        let mut bytes = std::fs::read(&sums_path).unwrap();
        bytes[container::HEADER_LEN as usize + 30] ^= 1;
        std::fs::write(sums_path, bytes).unwrap();
        assert!(matches!(
            MemoryImage::open(dir.path()),
            Err(SnapshotError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn a_chunk_size_too_large_to_read_whole_is_refused_at_open() {
        let dir = TempDir::new("memory-chunk-size");
        let mut buf = vec![0u8; 16 * PAGE];
        fill_page(&mut buf, 7, 5);
        write_full(dir.path(), &buf, &[]);
        // A well-formed file that says its single checksum covers 2 MiB.
        let sums_path = dir.path().join(SUMS_FILE);
        let mut payload = container::read(&sums_path, &SUMS_MAGIC, SUMS_VERSION).unwrap();
        payload[4..8].copy_from_slice(&(2u32 << 20).to_le_bytes());
        payload[24..32].copy_from_slice(&1u64.to_le_bytes());
        payload.truncate(32 + 4);
        container::write(&sums_path, &SUMS_MAGIC, SUMS_VERSION, &payload).unwrap();
        match MemoryImage::open(dir.path()) {
            Err(SnapshotError::Malformed { reason, .. }) => {
                assert!(reason.contains("chunk size 2097152"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn spans_must_be_whole_pages() {
        let dir = TempDir::new("memory-span");
        let buf = vec![0u8; 2 * PAGE];
        // SAFETY: `buf` outlives the span and is not written while it is used.
        let span = unsafe { MemorySpan::new(buf.as_ptr(), PAGE_SIZE + 1) };
        assert!(matches!(
            write_image(dir.path(), &[span], LayerKind::Full, None),
            Err(SnapshotError::Malformed { .. })
        ));
    }

    #[test]
    fn an_empty_memory_round_trips() {
        let dir = TempDir::new("memory-empty");
        let summary = write_image(dir.path(), &[], LayerKind::Full, None).unwrap();
        assert_eq!(summary.pages_included, 0);
        let image = MemoryImage::open(dir.path()).unwrap();
        assert_eq!((image.size(), image.chunks()), (0, 0));
    }

    #[test]
    fn zero_detection_and_chunk_sums_agree_with_plain_hashing() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero_page(&page));
        page[PAGE - 1] = 1;
        assert!(!is_zero_page(&page));
        page[PAGE - 1] = 0;
        page[9] = 1;
        assert!(!is_zero_page(&page));

        // Three pages of chunk 0 (zero, data, zero), then one zero page in a short chunk.
        let mut sums = ChunkSums::new(3 * PAGE_SIZE, 4 * PAGE_SIZE);
        sums.push(None);
        sums.push(Some(&page[..]));
        sums.push(None);
        sums.push(None);
        let mut chunk0 = vec![0u8; 3 * PAGE];
        chunk0[PAGE..2 * PAGE].copy_from_slice(&page);
        assert_eq!(
            sums.finish(),
            [crc32fast::hash(&chunk0), crc32fast::hash(&[0; PAGE])]
        );
    }
}
