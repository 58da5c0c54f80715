//! The peer of `bench restore`: Firecracker's default restore, rebuilt here. Guest RAM is the
//! snapshot's memory file mapped `MAP_PRIVATE` (its File memory backend): a page the guest
//! touches costs a page-cache mapping in the kernel, with no userfaultfd round trip, no
//! checksum and no copy until the guest writes. The VM is built from the snapshot's state by
//! the same path a faultline restore takes, so only the memory differs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{bail, Context};
use snapshot::state::SnapshotState;
use vmm::devices::ConsoleSink;
use vmm::{Vm, VmConfig};

use crate::restore::{ram_for_state, vm_from_state};

/// Page faults this process has taken so far (minor and major): the peer's faults are the
/// kernel's, not a pager's, so this is where they show.
pub fn process_faults() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    (usage.ru_minflt + usage.ru_majflt) as u64
}

/// Asks the kernel to drop the page cache of every file in `dir` (`POSIX_FADV_DONTNEED`):
/// the next read of them comes from the disk (or whatever is below it).
pub fn drop_cache(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: a plain advice call on a descriptor this function owns.
        let ret = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if ret != 0 {
            bail!(
                "cannot drop the page cache of {}: {}",
                path.display(),
                std::io::Error::from_raw_os_error(ret)
            );
        }
    }
    Ok(())
}

/// A VM built from `state`, the state of a full snapshot, its RAM mapped privately from
/// `image` (the snapshot's `memory.img`, or the same bytes served from elsewhere), for the
/// benchmark to run
/// and drop. Its RAM regions' memfds no longer back its memory, so it must never be
/// snapshotted (nothing serves an API for it); and `image` must stay whole, and its server
/// up, until it is dropped (a private file mapping whose file shrinks or fails is a SIGBUS).
pub fn restore_mapped(state: &SnapshotState, image: &Path) -> anyhow::Result<Vm> {
    if state.parent.is_some() {
        bail!("the mapped peer restores full snapshots only, not diffs");
    }
    let file = File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    let ram = ram_for_state(state)?;
    let found = file.metadata()?.len();
    if found != ram.size() {
        bail!(
            "{} holds {found} bytes, the snapshot's RAM is {}",
            image.display(),
            ram.size()
        );
    }
    let mut offset = 0u64;
    for region in ram.regions() {
        // SAFETY: MAP_FIXED replaces exactly the region's own mapping, which `ram` owns and
        // nothing uses yet (no VM exists); the replacement has the same size and protection,
        // and `ram` unmaps the range when it goes, as it would its own mapping. The file is
        // mapped privately: guest writes never reach it. Host code reads guest RAM with system
        // calls (`GuestRam::read_u64`), so a file that failed would be an error there; the
        // bench keeps the file and its server alive until the VM is dropped (see above).
        let addr = unsafe {
            libc::mmap(
                region.host_addr() as *mut libc::c_void,
                region.size() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED || addr as usize != region.host_addr() {
            bail!(
                "cannot map {} over guest RAM at {:#x}: {}",
                image.display(),
                region.gpa(),
                std::io::Error::last_os_error()
            );
        }
        offset += region.size();
    }
    let config = VmConfig {
        console: ConsoleSink::default(),
        ..VmConfig::default()
    };
    vm_from_state(state, ram, config)
}
