//! A read-only shared mapping of a whole file: snapshot data is read straight from the page
//! cache, and the pager can install pages from it without an intermediate copy.

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

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.addr.is_null() {
            return &[];
        }
        // SAFETY: `len` readable bytes are mapped at `addr` for as long as `self` lives, and
        // the returned slice borrows `self`. (A file truncated under the mapping would fault:
        // snapshot files are never modified in place; they are replaced by rename.)
        unsafe { std::slice::from_raw_parts(self.addr, self.len) }
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
