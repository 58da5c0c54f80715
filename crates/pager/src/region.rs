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

    /// The bytes the file holds (in memory or swapped out), if it is a tmpfs file (a memfd),
    /// whose `SEEK_DATA` tells those pages; `None` for another file system, whose `SEEK_DATA`
    /// may call the whole file data (hugetlbfs does).
    fn tmpfs_allocated(&self) -> std::io::Result<Option<u64>> {
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        if rustix::fs::fstatfs(&*self.file)?.f_type as i64 != TMPFS_MAGIC {
            return Ok(None);
        }
        Ok(Some(rustix::fs::fstat(&*self.file)?.st_blocks as u64 * 512))
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

    /// Marks as present the pages the region's file holds that are not marked yet: a shmem
    /// page swapped out is not resident for `mincore`, yet it is there (a touch swaps it
    /// back in, with no userfaultfd fault), and must never be taken for missing. Returns how
    /// many it marked.
    pub(crate) fn mark_file_data(&self, backing: &Backing) -> std::io::Result<usize> {
        let page_size = self.page_size;
        // The file holds no more than what is marked (the rest of it is not in this region,
        // nothing is swapped out): nothing to look for, in one system call or two.
        match backing.tmpfs_allocated()? {
            Some(allocated) if allocated > self.present.count() as u64 * page_size => {}
            _ => return Ok(0),
        }
        let (first, end) = (backing.offset, backing.offset + self.len);
        let mut marked = 0;
        for (start, stop) in crate::source::data_extents(&*backing.file, end)? {
            let (start, stop) = (start.max(first) - first, stop.saturating_sub(first));
            if stop <= start {
                continue;
            }
            for page in (start / page_size) as usize..stop.div_ceil(page_size) as usize {
                if !self.present.get(page) {
                    self.present.set(page);
                    marked += 1;
                }
            }
        }
        Ok(marked)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A source never asked here.
    struct Unused;

    impl PageSource for Unused {
        fn describe(&self) -> String {
            "unused".into()
        }
        fn fetch(
            &self,
            _offset: u64,
            _buf: &mut [u8],
        ) -> Result<crate::source::Content, crate::source::SourceError> {
            unreachable!("nothing is fetched")
        }
    }

    #[test]
    fn the_pages_the_file_holds_are_marked_present_and_only_those() {
        const PAGE: u64 = 4096;
        let fd = rustix::fs::memfd_create("region-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(40 * PAGE).unwrap();
        // Data at file pages 0 (before the region), 3-4, 9, 15 and 30 (past it); the region
        // covers file pages 2 to 17, so its pages 1-2, 7 and 13 are held.
        for page in [0u64, 3, 4, 9, 15, 30] {
            file.write_all_at(&[1u8; 4096], page * PAGE).unwrap();
        }
        let region = Region::new(0x1000_0000, 16 * PAGE, PAGE, Arc::new(Unused));
        // Already present (resident when it was added): left as it is, not counted.
        region.present.set(2);
        region.present.set(5);
        let backing = Backing {
            file: Arc::new(file),
            offset: 2 * PAGE,
        };
        assert_eq!(region.mark_file_data(&backing).unwrap(), 3);
        let present: Vec<usize> = (0..16).filter(|&p| region.present.get(p)).collect();
        assert_eq!(present, [1, 2, 5, 7, 13]);
    }
}
