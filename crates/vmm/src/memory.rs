//! Guest RAM: memfd-backed `MAP_SHARED` regions, one KVM memslot each.
//!
//! RAM below 4 GiB stops at the 32-bit MMIO gap; the rest is placed above 4 GiB. Every region is
//! its own memfd so that another component can pass it to another process, hole-punch it, read
//! it back without the guest, or serve it with userfaultfd (missing or minor mode). The layout
//! exposes only plain facts (guest address, host address, size, memfd) so that crates that know
//! nothing of KVM, such as the pager and the snapshot format, can use it.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use rustix::fs::{memfd_create, MemfdFlags};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Size of a guest page as KVM and the micro-guests see it.
pub const PAGE_SIZE: u64 = 4096;
/// Where the 32-bit MMIO gap (IOAPIC, LAPIC, PCI holes) begins: RAM stops here below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Where the MMIO gap ends and high RAM begins.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The smallest guest we build: enough for boot structures, a micro-guest and its stacks.
pub const MIN_RAM: u64 = 2 * 1024 * 1024;

/// Errors building guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is not usable.
    #[error(
        "guest RAM size {0} bytes is invalid: it must be a multiple of 4 KiB and at least 2 MiB"
    )]
    InvalidSize(u64),
    /// memfd_create or ftruncate failed.
    #[error("cannot create the memfd backing guest RAM at {gpa:#x} ({size} bytes)")]
    Memfd {
        gpa: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    /// mmap of the memfd failed.
    #[error("cannot map guest RAM at {gpa:#x} ({size} bytes)")]
    Map {
        gpa: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the region list.
    #[error("guest RAM regions are inconsistent")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// One contiguous range of guest RAM.
#[derive(Debug, Clone)]
pub struct RamRegion {
    gpa: u64,
    size: u64,
    host_addr: usize,
    memfd: Arc<File>,
}

impl RamRegion {
    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Address of the first byte in this process.
    pub fn host_addr(&self) -> usize {
        self.host_addr
    }
    /// The memfd that backs the region (offset 0 is `gpa`).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }
    /// The memfd as a shared file handle.
    pub fn memfd_file(&self) -> Arc<File> {
        Arc::clone(&self.memfd)
    }
    /// Whether the guest-physical range `[gpa, gpa + len)` lies inside this region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.gpa + self.size)
    }
}

/// All of a guest's RAM.
#[derive(Debug, Clone)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
    memory: GuestMemoryMmap,
}

/// The guest-physical ranges `(gpa, size)` that `size` bytes of RAM occupy.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM, laid out around the MMIO gap.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_RAM || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::InvalidSize(size));
        }
        let mut regions = Vec::new();
        let mut mmap_regions = Vec::new();
        for (gpa, len) in ram_ranges(size) {
            let memfd = create_memfd(gpa, len)?;
            let mapping = MmapRegion::<()>::from_file(
                FileOffset::new(
                    memfd.try_clone().map_err(|source| MemoryError::Memfd {
                        gpa,
                        size: len,
                        source,
                    })?,
                    0,
                ),
                len as usize,
            )
            .map_err(|source| MemoryError::Map {
                gpa,
                size: len,
                source,
            })?;
            regions.push(RamRegion {
                gpa,
                size: len,
                host_addr: mapping.as_ptr() as usize,
                memfd: Arc::new(memfd),
            });
            mmap_regions.push(
                GuestRegionMmap::new(mapping, GuestAddress(gpa))
                    .expect("a region below 2^64 built from a valid mapping"),
            );
        }
        let memory = GuestMemoryMmap::from_regions(mmap_regions).map_err(MemoryError::Layout)?;
        Ok(GuestRam { regions, memory })
    }

    /// The regions, lowest address first.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(RamRegion::size).sum()
    }

    /// One past the highest guest-physical address of RAM.
    pub fn end(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.gpa + r.size)
    }

    /// RAM below 4 GiB, in bytes.
    pub fn low_size(&self) -> u64 {
        self.regions[0].size
    }

    /// The vm-memory view, for loaders and `Bytes` access.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The region holding all of `[gpa, gpa + len)`, with its index, if one does.
    pub fn region_at(&self, gpa: u64, len: u64) -> Option<(usize, &RamRegion)> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains(gpa, len))
    }

    /// The region of `[gpa, gpa + len)`, if that is RAM within one region, and the index there
    /// of its first page: how the pager names pages.
    pub fn region_page(&self, gpa: u64, len: u64) -> Option<(usize, usize)> {
        self.region_at(gpa, len)
            .map(|(index, r)| (index, ((gpa - r.gpa) / PAGE_SIZE) as usize))
    }

    /// Host address of guest-physical `gpa` if `[gpa, gpa + len)` is RAM within one region.
    pub fn host_range(&self, gpa: u64, len: u64) -> Option<usize> {
        self.region_at(gpa, len)
            .map(|(_, r)| r.host_addr + (gpa - r.gpa) as usize)
    }

    /// Whether guest RAM `[gpa, gpa + len)` (within one region) is a hole of its memfd:
    /// never written, or punched out, so it reads as zeros without being read (a migration
    /// sends it as a zero range). False when unsure.
    pub fn is_hole(&self, gpa: u64, len: u64) -> bool {
        let Some((_, region)) = self.region_at(gpa, len) else {
            return false;
        };
        let offset = gpa - region.gpa();
        // Only the descriptor's file offset moves, which nothing uses (guest RAM is read
        // through its mapping, files with positioned reads).
        match rustix::fs::seek(region.memfd(), rustix::fs::SeekFrom::Data(offset)) {
            Ok(data) => data >= offset + len,
            // No data from `offset` to the end of the file.
            Err(rustix::io::Errno::NXIO) => true,
            Err(_) => false,
        }
    }

    /// Index of the page holding `gpa` in the memory-image layout (regions back to back), if
    /// it is RAM.
    pub fn page_index(&self, gpa: u64) -> Option<u64> {
        let mut first = 0;
        for region in &self.regions {
            if region.contains(gpa, 1) {
                return Some(first + (gpa - region.gpa) / PAGE_SIZE);
            }
            first += region.size / PAGE_SIZE;
        }
        None
    }

    /// Guest-physical address of page `index` in the memory-image layout (the inverse of
    /// [`page_index`](Self::page_index)), if RAM has that many pages.
    pub fn gpa_of_page(&self, index: u64) -> Option<u64> {
        let mut first = 0;
        for region in &self.regions {
            let pages = region.size / PAGE_SIZE;
            if index < first + pages {
                return Some(region.gpa + (index - first) * PAGE_SIZE);
            }
            first += pages;
        }
        None
    }

    /// Reads the little-endian u64 at `gpa`, with a system call: `None` if it is not RAM, or
    /// if its page cannot be read (poisoned: its contents could not be provided). A page still
    /// behind a userfaultfd is faulted in as for any access.
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        let addr = self.host_range(gpa, 8)?;
        let mut bytes = [0u8; 8];
        read_host(addr as u64, &mut bytes).ok()?;
        Some(u64::from_le_bytes(bytes))
    }
}

/// The bit of a `/proc/PID/pagemap` entry that says the page is userfaultfd write-protected
/// (PM_UFFD_WP, Linux 5.13+; set for a protected empty page of shared memory too).
const PAGEMAP_UFFD_WP: u64 = 1 << 57;

impl GuestRam {
    /// How many pages of RAM are userfaultfd write-protected now, from this process's
    /// pagemap: after a live snapshot, none may be.
    pub fn write_protected_pages(&self) -> std::io::Result<u64> {
        let pagemap = pagemap()?;
        let mut count = 0;
        let mut entries = Vec::new();
        for region in &self.regions {
            let pages = region.size() / crate::PAGE_SIZE;
            let mut done = 0;
            while done < pages {
                let n = (pages - done).min(4096);
                let addr = region.host_addr() as u64 + done * crate::PAGE_SIZE;
                count += pagemap_entries(pagemap, addr, n, &mut entries)?
                    .filter(|entry| entry & PAGEMAP_UFFD_WP != 0)
                    .count() as u64;
                done += n;
            }
        }
        Ok(count)
    }

    /// Whether every page of guest RAM `[gpa, gpa + len)` (within one region) is mapped in
    /// this process's page tables now, from its pagemap: a read of it right away takes no
    /// fault that could fail (no swap-in, no pager; a page a memory error took is
    /// unmapped), though a page reclaimed or poisoned after this answer can still fault.
    /// False when unsure.
    pub fn is_mapped(&self, gpa: u64, len: u64) -> bool {
        let (Some(addr), Ok(pagemap)) = (self.host_range(gpa, len), pagemap()) else {
            return false;
        };
        let first = addr as u64 / crate::PAGE_SIZE;
        let end = (addr as u64 + len).div_ceil(crate::PAGE_SIZE);
        let mut entries = Vec::new();
        pagemap_entries(pagemap, first * crate::PAGE_SIZE, end - first, &mut entries)
            .is_ok_and(|mut entries| entries.all(|entry| entry & PAGEMAP_PRESENT != 0))
    }
}

/// This process's `/proc/self/pagemap`, opened once.
fn pagemap() -> std::io::Result<&'static File> {
    static PAGEMAP: std::sync::OnceLock<Result<File, std::io::ErrorKind>> =
        std::sync::OnceLock::new();
    PAGEMAP
        .get_or_init(|| File::open("/proc/self/pagemap").map_err(|e| e.kind()))
        .as_ref()
        .map_err(|&kind| std::io::Error::new(kind, "cannot open /proc/self/pagemap"))
}

/// Bit 63 of a pagemap entry: the page is present in the page tables.
const PAGEMAP_PRESENT: u64 = 1 << 63;

/// This process's pagemap entries (`pagemap`: `/proc/self/pagemap`) for the `pages` pages
/// from address `addr`, read into `entries`.
fn pagemap_entries<'a>(
    pagemap: &File,
    addr: u64,
    pages: u64,
    entries: &'a mut Vec<u8>,
) -> std::io::Result<impl Iterator<Item = u64> + 'a> {
    entries.resize((pages * 8) as usize, 0);
    std::os::unix::fs::FileExt::read_exact_at(pagemap, entries, addr / crate::PAGE_SIZE * 8)?;
    Ok(entries
        .chunks_exact(8)
        .map(|entry| u64::from_le_bytes(entry.try_into().expect("8 bytes"))))
}

/// Reads `buf.len()` bytes at address `addr` of this process with process_vm_readv(2), so
/// that memory that cannot be read (a poisoned page, a file mapping past its end) is an error
/// (EFAULT), never a signal. Guest RAM that may hold such pages is read this way.
pub fn read_host(addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let (base, len) = (buf.as_mut_ptr(), buf.len());
    transfer(len, |done| {
        let (local, remote) = iovecs(base.wrapping_add(done), addr, done, len);
        // SAFETY: `local` describes the writable rest of `buf`; the kernel checks `remote`
        // itself and reports what it cannot read as an error.
        unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) }
    })
}

/// Writes `data` at address `addr` of this process with process_vm_writev(2): memory that
/// cannot be written (a poisoned page) is an error (EFAULT), never a signal.
pub fn write_host(addr: u64, data: &[u8]) -> std::io::Result<()> {
    let (base, len) = (data.as_ptr().cast_mut(), data.len());
    transfer(len, |done| {
        let (local, remote) = iovecs(base.wrapping_add(done), addr, done, len);
        // SAFETY: `local` describes the rest of `data`, which the kernel only reads; it checks
        // `remote` itself and reports what it cannot write as an error.
        unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) }
    })
}

/// The local and remote iovecs for the bytes from `done` to `len` of a transfer between
/// `local` (already advanced by `done`) and this process's address `addr`.
fn iovecs(local: *mut u8, addr: u64, done: usize, len: usize) -> (libc::iovec, libc::iovec) {
    (
        libc::iovec {
            iov_base: local.cast(),
            iov_len: len - done,
        },
        libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: len - done,
        },
    )
}

/// Runs `call(done)` (one process_vm_readv/writev for the bytes from `done` on) until `len`
/// bytes have moved; nothing moved is EFAULT, an interrupted call is retried.
fn transfer(len: usize, mut call: impl FnMut(usize) -> isize) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        match call(done) {
            n if n > 0 => done += n as usize,
            0 => return Err(std::io::Error::from_raw_os_error(libc::EFAULT)),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn create_memfd(gpa: u64, size: u64) -> Result<File, MemoryError> {
    let err = |source: std::io::Error| MemoryError::Memfd { gpa, size, source };
    let fd = memfd_create(format!("faultline-ram-{gpa:#x}"), MemfdFlags::CLOEXEC)
        .map_err(|e| err(e.into()))?;
    let file = File::from(fd);
    file.set_len(size).map_err(err)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn mapped_means_in_this_process_s_page_tables() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(4 << 20).unwrap();
        let page = crate::PAGE_SIZE;
        assert!(!ram.is_mapped(0, page), "fresh RAM maps nothing");
        // Written through the mapping: mapped. Written to the memfd only: in the file, but
        // a read of the mapping would still fault.
        ram.memory()
            .write_slice(&[1; 8192], GuestAddress(2 * page))
            .unwrap();
        ram.regions()[0]
            .memfd_file()
            .write_all_at(&[2; 4096], 4 * page)
            .unwrap();
        assert!(ram.is_mapped(2 * page, 2 * page));
        assert!(!ram.is_mapped(2 * page, 3 * page), "one page is not");
        assert!(!ram.is_mapped(4 * page, page));
        assert!(!ram.is_mapped(4 << 20, page), "not RAM");
    }

    #[test]
    fn holes_are_ram_never_written() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(4 << 20).unwrap();
        assert!(ram.is_hole(0, 4 << 20), "fresh RAM is all hole");
        ram.memory()
            .write_obj(7u64, GuestAddress(0x10_8008))
            .unwrap();
        assert!(
            !ram.is_hole(0x10_8000, PAGE_SIZE),
            "a written page has data"
        );
        assert!(
            !ram.is_hole(0x10_0000, 16 * PAGE_SIZE),
            "a run holding it has data"
        );
        assert!(
            ram.is_hole(0x10_0000, 8 * PAGE_SIZE),
            "the pages before it do not"
        );
        assert!(ram.is_hole(0x10_9000, PAGE_SIZE), "nor the page after it");
        assert!(
            !ram.is_hole(4 << 20, PAGE_SIZE),
            "outside RAM: not known to be a hole"
        );
    }

    #[test]
    fn small_ram_is_one_low_region() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_ram_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]);
        assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            GuestRam::new(4096),
            Err(MemoryError::InvalidSize(4096))
        ));
        assert!(matches!(
            GuestRam::new((8 << 20) + 1),
            Err(MemoryError::InvalidSize(_))
        ));
    }

    #[test]
    fn page_indices_and_addresses_are_inverses() {
        let ram = GuestRam::new(8 << 20).unwrap();
        assert_eq!(ram.page_index(0x3abc), Some(3));
        assert_eq!(ram.gpa_of_page(3), Some(0x3000));
        assert_eq!(ram.gpa_of_page((8 << 20) / PAGE_SIZE), None);
        assert_eq!(ram.page_index(8 << 20), None);
        // Pages as the pager names them: a region and the index there.
        let two = GuestRam::new(4 << 30).unwrap();
        let high = two.regions()[1].gpa();
        assert_eq!(two.region_page(0x3000, 2 * PAGE_SIZE), Some((0, 3)));
        assert_eq!(two.region_page(high + 0x5000, PAGE_SIZE), Some((1, 5)));
        let low_end = two.regions()[0].size();
        assert_eq!(two.region_page(low_end - PAGE_SIZE, 2 * PAGE_SIZE), None);
    }

    #[test]
    fn guest_writes_land_in_the_memfd() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u64, GuestAddress(0x3000))
            .unwrap();
        let mut buf = [0u8; 8];
        File::from(ram.regions()[0].memfd().try_clone_to_owned().unwrap())
            .read_exact_at(&mut buf, 0x3000)
            .unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.read_u64(0x3000), Some(0xdead_beef));
        assert_eq!(
            ram.host_range(0x3000, 8),
            Some(ram.regions()[0].host_addr() + 0x3000)
        );
        assert_eq!(ram.host_range(8 << 20, 1), None);
    }
}
