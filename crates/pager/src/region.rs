//! A registered range of memory, its page source, and the state of each of its pages.
//!
//! Per page, three bits: `present` (installed, or resident when the region was added),
//! `inflight` (a thread has claimed it and is fetching it: the single-install guarantee), and
//! `discarded` (removed by madvise/balloon since: its true contents are now zero).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::bitmap::AtomicBitmap;
use crate::source::PageSource;
use crate::stats::RegionStats;

/// A page-aligned range of mapped memory served by one source.
pub struct Region {
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) page_size: u64,
    pub(crate) source: Arc<dyn PageSource>,
    pub(crate) present: AtomicBitmap,
    pub(crate) inflight: AtomicBitmap,
    pub(crate) discarded: AtomicBitmap,
    /// Registered in write-protect mode (a live snapshot has protected it, or the region
    /// serves write protection only).
    pub(crate) write_protect_registered: AtomicBool,
    /// Swapped out: not present, the contents in this page's slot of the swap file.
    pub(crate) swapped: AtomicBitmap,
    /// Faulted in or written since the eviction CLOCK's hand last passed (with a resident
    /// limit; empty otherwise).
    pub(crate) referenced: AtomicBitmap,
    /// This region's first slot in the swap file.
    pub(crate) swap_base: u64,
    /// The file behind the mapping (guest RAM's memfd), for swap-out to read pages from and
    /// release them in.
    pub(crate) backing: Option<Backing>,
}

/// The file behind a region's mapping: byte 0 of the region is byte `offset` of `file`.
pub(crate) struct Backing {
    pub file: Arc<std::fs::File>,
    pub offset: u64,
}

impl Backing {
    /// Releases `len` bytes from `at` (region offsets): the pages go from the file and from
    /// every mapping of it, with no userfaultfd event.
    pub(crate) fn punch(&self, at: u64, len: u64) -> std::io::Result<()> {
        rustix::fs::fallocate(
            &*self.file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            self.offset + at,
            len,
        )
        .map_err(std::io::Error::from)
    }
}

impl Region {
    pub(crate) fn new(start: u64, len: u64, page_size: u64, source: Arc<dyn PageSource>) -> Region {
        let pages = (len / page_size) as usize;
        Region {
            start,
            len,
            page_size,
            source,
            present: AtomicBitmap::new(pages),
            inflight: AtomicBitmap::new(pages),
            discarded: AtomicBitmap::new(pages),
            write_protect_registered: AtomicBool::new(false),
            swapped: AtomicBitmap::new(pages),
            referenced: AtomicBitmap::new(0),
            swap_base: 0,
            backing: None,
        }
    }

    pub fn pages(&self) -> usize {
        self.present.len()
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.start + self.len
    }

    pub fn page_of(&self, addr: u64) -> usize {
        ((addr - self.start) / self.page_size) as usize
    }

    pub fn addr_of(&self, page: usize) -> u64 {
        self.start + page as u64 * self.page_size
    }

    /// Marks the pages the kernel already has (written before registration) as present, so
    /// that they are never fetched: `mincore` reports page-cache residency for shared file
    /// mappings and populated pages for anonymous ones.
    pub(crate) fn mark_resident(&self) -> std::io::Result<usize> {
        let mut resident = 0;
        for (page, byte) in self.residency(0, self.pages())?.iter().enumerate() {
            if byte & 1 != 0 {
                self.present.set(page);
                resident += 1;
            }
        }
        Ok(resident)
    }

    /// Whether the kernel has page `page` (as [`mark_resident`](Self::mark_resident) reads
    /// it): a missing fault for it is then over already. `false` if that cannot be told.
    pub(crate) fn is_resident(&self, page: usize) -> bool {
        page < self.pages() && self.residency(page, 1).is_ok_and(|vec| vec[0] & 1 != 0)
    }

    /// `mincore`'s answer for `count` pages from `first`, which must lie in the region.
    fn residency(&self, first: usize, count: usize) -> std::io::Result<Vec<u8>> {
        let mut vec = vec![0u8; count];
        // SAFETY: the range lies in the live mapping the caller registered; `vec` has one
        // byte per page of it, as mincore requires.
        let ret = unsafe {
            libc::mincore(
                self.addr_of(first) as *mut libc::c_void,
                count * self.page_size as usize,
                vec.as_mut_ptr(),
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(vec)
    }

    pub(crate) fn stats(&self) -> RegionStats {
        RegionStats {
            start: self.start,
            bytes: self.len,
            source: self.source.describe(),
            pages: self.pages() as u64,
            pages_present: self.present.count() as u64,
            presence_map_bytes: (self.present.bytes()
                + self.inflight.bytes()
                + self.discarded.bytes()) as u64,
        }
    }
}
