//! A read-only shared mapping of a whole file, handed to the kernel as the source of zero-copy
//! installs (UFFDIO_COPY from the page cache). faultline never reads it itself.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::SnapshotError;

/// `len` bytes of a file, mapped read-only (nothing is mapped for an empty file).
#[derive(Debug)]
pub(crate) struct ReadOnlyMap {
    addr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value (unmapped only in `drop`), so
// sharing or sending it shares nothing mutable.
unsafe impl Send for ReadOnlyMap {}
// SAFETY: as for `Send`: every method takes `&self` and only reads.
unsafe impl Sync for ReadOnlyMap {}

impl ReadOnlyMap {
    /// Maps the first `len` bytes of `file` (at `path`, for errors).
    pub(crate) fn new(file: &File, len: u64, path: &Path) -> Result<Self, SnapshotError> {
        if len == 0 {
            return Ok(ReadOnlyMap {
                addr: std::ptr::null(),
                len: 0,
            });
        }
        // SAFETY: a new read-only shared mapping of an open file; the result is checked below.
        // The mapping outlives the descriptor, as mappings do.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(SnapshotError::Io {
                path: path.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(ReadOnlyMap {
            addr: addr as *const u8,
            len: len as usize,
        })
    }

    /// The first mapped byte (null for an empty file). Deliberately no slice: a file that
    /// shrinks under the mapping would turn a read of it into SIGBUS, so only the kernel reads
    /// it (as a copy source, where such a page is an EFAULT error).
    pub(crate) fn bytes_ptr(&self) -> *const u8 {
        self.addr
    }
}

impl Drop for ReadOnlyMap {
    fn drop(&mut self) {
        if !self.addr.is_null() {
            // SAFETY: unmapping exactly the mapping made in `new`; slices of it borrow `self`,
            // and raw addresses handed to the pager are used only while the owner lives.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}
