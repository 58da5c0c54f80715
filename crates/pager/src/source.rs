//! Where absent pages come from. Every source answers one question: the contents of a byte
//! range of its region, or "all zero" (so that the pager installs it without copying).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// What a fetch produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// The buffer holds the contents.
    Data,
    /// The whole range is zero; the buffer was not touched.
    Zero,
}

/// Why a source could not produce a page.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {len} bytes at offset {offset:#x} of {path} failed")]
    Io {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open page source {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the range at {offset:#x} (+{len:#x}) is beyond the source's {size:#x} bytes")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("the page at {offset:#x} is unavailable: {reason}")]
    Unavailable { offset: u64, reason: String },
}

/// A provider of page contents for one region. Must be callable from several threads.
pub trait PageSource: Send + Sync {
    /// A short description for logs and stats ("zero", "file:/path").
    fn describe(&self) -> String;

    /// Fills `buf` with the bytes at `offset` (page aligned, a whole number of pages), or
    /// returns [`Content::Zero`] when they are all zero.
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError>;

    /// A host address holding the `len` bytes at `offset`, if the source has them mapped
    /// (a file image): the pager then installs straight from it, with no fetch and no
    /// intermediate copy. `None` (the default) means "use `fetch`".
    fn mapped_addr(&self, _offset: u64, _len: u64) -> Option<u64> {
        None
    }

    /// The pager is stopping (its threads are about to be joined): a `fetch` that waits on
    /// something that may never come (a network peer that is gone) must give up now. The
    /// default does nothing: most sources never wait that way.
    fn stop(&self) {}
}

/// Every page is zero: answered with UFFDIO_ZEROPAGE, never a copy.
#[derive(Debug, Default, Clone, Copy)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn describe(&self) -> String {
        "zero".into()
    }
    fn fetch(&self, _offset: u64, _buf: &mut [u8]) -> Result<Content, SourceError> {
        Ok(Content::Zero)
    }
}

/// A raw memory image in a file: byte `i` of the region is byte `i` of the file. Holes of a
/// sparse file, and everything past its end, are zero pages. The file is also mapped
/// read-only so that data pages are installed straight from the page cache.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    file: File,
    size: u64,
    /// Sorted, disjoint `[start, end)` ranges that hold data (the rest are holes).
    data: Vec<(u64, u64)>,
    /// Address of a read-only shared mapping of the whole file (0 if the file is empty).
    map: u64,
}

impl Drop for FileSource {
    fn drop(&mut self) {
        if self.map != 0 {
            // SAFETY: unmapping exactly the mapping made in `open`; nothing else refers to it
            // (the pager's installs that used it have completed before the source is dropped).
            unsafe { libc::munmap(self.map as *mut libc::c_void, self.size as usize) };
        }
    }
}

// SAFETY: the mapping is read-only and only ever handed to the kernel as a copy source.
unsafe impl Send for FileSource {}
unsafe impl Sync for FileSource {}

impl FileSource {
    pub fn open(path: &Path) -> Result<FileSource, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.into(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        let data = data_extents(&file, size).map_err(open_err)?;
        let map = if size == 0 {
            0
        } else {
            use std::os::fd::AsRawFd;
            // SAFETY: a new read-only shared mapping of the whole file; checked below.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(open_err(std::io::Error::last_os_error()));
            }
            addr as u64
        };
        Ok(FileSource {
            path: path.into(),
            file,
            size,
            data,
            map,
        })
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether `[start, end)` touches any data extent.
    fn has_data(&self, start: u64, end: u64) -> bool {
        let i = self.data.partition_point(|&(_, e)| e <= start);
        self.data.get(i).is_some_and(|&(s, _)| s < end)
    }
}

/// The data extents of a file's first `size` bytes, found with SEEK_DATA / SEEK_HOLE: sorted,
/// disjoint `[start, end)` ranges; everything else is a hole.
pub fn data_extents(file: impl std::os::fd::AsFd, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let file = file.as_fd();
    use rustix::fs::{seek, SeekFrom};
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = seek(file, SeekFrom::Hole(start))?.min(size);
        extents.push((start, end));
        pos = end;
    }
    Ok(extents)
}

impl PageSource for FileSource {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn mapped_addr(&self, offset: u64, len: u64) -> Option<u64> {
        // Only ranges wholly inside the file and with data: holes are installed as zero pages,
        // and bytes past the end must not be read through the mapping.
        let end = offset.checked_add(len)?;
        (self.map != 0 && end <= self.size && self.has_data(offset, end)).then(|| self.map + offset)
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let end = offset + buf.len() as u64;
        if !self.has_data(offset, end) {
            return Ok(Content::Zero);
        }
        let readable = (self.size.saturating_sub(offset) as usize).min(buf.len());
        self.file
            .read_exact_at(&mut buf[..readable], offset)
            .map_err(|source| SourceError::Io {
                path: self.path.clone(),
                offset,
                len: readable,
                source,
            })?;
        buf[readable..].fill(0);
        Ok(Content::Data)
    }
}

/// A window of another source: byte `i` of the region is byte `base + i` of `inner` (one
/// memory image serving several RAM regions).
pub struct OffsetSource {
    pub inner: std::sync::Arc<dyn PageSource>,
    pub base: u64,
}

impl PageSource for OffsetSource {
    fn describe(&self) -> String {
        format!("{}@{:#x}", self.inner.describe(), self.base)
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        self.inner.fetch(self.base + offset, buf)
    }
    fn mapped_addr(&self, offset: u64, len: u64) -> Option<u64> {
        self.inner.mapped_addr(self.base + offset, len)
    }
    fn stop(&self) {
        self.inner.stop()
    }
}

/// Another source behind a fixed delay per read: a stand-in for a remote snapshot store (a
/// network round trip per request), for benchmarks and tests. Every `fetch` sleeps `delay`
/// and then reads, whatever its length, so a source read covering many pages costs what one
/// page does. Nothing is mapped: every read goes through `fetch` and pays.
pub struct SlowSource {
    pub inner: std::sync::Arc<dyn PageSource>,
    pub delay: std::time::Duration,
}

impl PageSource for SlowSource {
    fn describe(&self) -> String {
        format!("{} (+{:?} per read)", self.inner.describe(), self.delay)
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        std::thread::sleep(self.delay);
        self.inner.fetch(offset, buf)
    }
    fn stop(&self) {
        self.inner.stop()
    }
}

/// Page contents held in memory (tests, and small images).
#[derive(Debug, Clone)]
pub struct MemorySource {
    data: Vec<u8>,
}

impl MemorySource {
    pub fn new(data: Vec<u8>) -> Self {
        MemorySource { data }
    }
}

impl PageSource for MemorySource {
    fn describe(&self) -> String {
        format!("memory:{} bytes", self.data.len())
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let start = offset as usize;
        let bytes = self
            .data
            .get(start..start + buf.len())
            .ok_or(SourceError::OutOfRange {
                offset,
                len: buf.len(),
                size: self.data.len() as u64,
            })?;
        buf.copy_from_slice(bytes);
        Ok(Content::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn sparse_file(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("faultline-source-{name}-{}", std::process::id()));
        let mut file = File::create(&path).unwrap();
        // Data at page 0, a hole over pages 1..=255, data at page 256; size: 258 pages.
        file.write_all(&[0xaa; 4096]).unwrap();
        file.seek(SeekFrom::Start(256 * 4096)).unwrap();
        file.write_all(&[0xbb; 4096]).unwrap();
        file.set_len(258 * 4096).unwrap();
        path
    }

    #[test]
    fn a_slow_source_delays_every_read_and_maps_nothing() {
        let path = sparse_file("slow");
        let file: std::sync::Arc<dyn PageSource> =
            std::sync::Arc::new(FileSource::open(&path).unwrap());
        assert!(file.mapped_addr(0, 4096).is_some());
        let delay = std::time::Duration::from_millis(20);
        let slow = SlowSource { inner: file, delay };
        assert_eq!(
            slow.mapped_addr(0, 4096),
            None,
            "a mapped install would skip the delay"
        );
        let mut buf = vec![0x11u8; 2 * 4096];
        for (offset, content) in [(0, Content::Data), (8 * 4096, Content::Zero)] {
            let began = std::time::Instant::now();
            assert_eq!(slow.fetch(offset, &mut buf).unwrap(), content);
            // A lower bound that the sleep guarantees (not a speed): the delay was applied.
            assert!(
                began.elapsed() >= delay,
                "each read waits at least the delay"
            );
            // The data page filled the buffer; the zero answer left it alone.
            assert!(buf[..4096].iter().all(|b| *b == 0xaa));
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn file_holes_are_zero_pages_and_data_is_read() {
        let path = sparse_file("holes");
        let source = FileSource::open(&path).unwrap();
        let mut buf = vec![0x11u8; 4096];
        assert_eq!(source.fetch(0, &mut buf).unwrap(), Content::Data);
        assert!(buf.iter().all(|b| *b == 0xaa));
        assert_eq!(source.fetch(8 * 4096, &mut buf).unwrap(), Content::Zero);
        assert_eq!(source.fetch(256 * 4096, &mut buf).unwrap(), Content::Data);
        assert!(buf.iter().all(|b| *b == 0xbb));
        // Past the end of the file: zero.
        assert_eq!(source.fetch(1000 * 4096, &mut buf).unwrap(), Content::Zero);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_range_straddling_data_and_the_end_is_zero_filled() {
        let path = sparse_file("tail");
        let source = FileSource::open(&path).unwrap();
        let mut buf = vec![0x11u8; 4 * 4096];
        // Pages 255..259: hole, data, hole, beyond EOF.
        assert_eq!(source.fetch(255 * 4096, &mut buf).unwrap(), Content::Data);
        assert!(buf[..4096].iter().all(|b| *b == 0));
        assert!(buf[4096..8192].iter().all(|b| *b == 0xbb));
        assert!(buf[8192..].iter().all(|b| *b == 0));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn data_ranges_are_mapped_and_holes_are_not() {
        let path = sparse_file("mapped");
        let source = FileSource::open(&path).unwrap();
        let addr = source
            .mapped_addr(256 * 4096, 4096)
            .expect("data is mapped");
        // SAFETY: the mapping covers the file, which has 258 pages.
        assert_eq!(unsafe { std::ptr::read_volatile(addr as *const u8) }, 0xbb);
        assert_eq!(source.mapped_addr(8 * 4096, 4096), None, "a hole");
        assert_eq!(
            source.mapped_addr(257 * 4096, 2 * 4096),
            None,
            "past the end"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn missing_file_is_named() {
        let err = FileSource::open(Path::new("/nonexistent/image")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/image"));
    }

    #[test]
    fn memory_source_bounds() {
        let source = MemorySource::new(vec![7; 8192]);
        let mut buf = vec![0; 4096];
        assert_eq!(source.fetch(4096, &mut buf).unwrap(), Content::Data);
        assert_eq!(buf[0], 7);
        assert!(matches!(
            source.fetch(8192, &mut buf),
            Err(SourceError::OutOfRange { .. })
        ));
        assert_eq!(ZeroSource.fetch(0, &mut buf).unwrap(), Content::Zero);
    }
}
