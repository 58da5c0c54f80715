//! A slow source for the Firecracker peer of `bench restore`: a tiny read-only FUSE file system
//! that serves one file (a snapshot's memory file) and sleeps a fixed delay before answering
//! every READ, as a remote store with that latency per request would. The page cache,
//! read-ahead and the fault path of a `MAP_PRIVATE` mapping work as for any file; each READ the
//! kernel sends pays the delay.
//!
//! The protocol is spoken directly on `/dev/fuse`: the little-endian structs of
//! `include/uapi/linux/fuse.h`, encoded and decoded by hand, for the few requests a read-only
//! file needs.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use rustix::event::{EventfdFlags, PollFd, PollFlags};

use crate::locking::lock;

/// The protocol major version; INIT is answered with this one only.
const MAJOR: u32 = 7;
/// The highest protocol minor version answered (or the kernel's, if lower): every struct used
/// here has had its present layout since 7.23.
const MAX_MINOR: u32 = 31;
/// `FUSE_ASYNC_READ`: read-ahead goes out in the background, as on a network file system.
const FUSE_ASYNC_READ: u32 = 1 << 0;
/// The largest WRITE the kernel may send (none come: the mount is read-only).
const MAX_WRITE: u32 = 128 * 1024;
/// The largest READ answered (the kernel asks for at most `max_pages` pages at once, 32 by
/// default, and never more than 256).
const MAX_READ: u32 = 1 << 20;
/// Each request is read into a buffer this large: the kernel requires room for a WRITE of
/// `MAX_WRITE` bytes and its headers (this is more than enough).
const REQUEST_BUF_LEN: usize = (1 << 20) + 4096;
/// `struct fuse_in_header`: len u32, opcode u32, unique u64, nodeid u64, uid u32, gid u32,
/// pid u32, total_extlen u16, padding u16.
const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`: len u32, error i32 (a negative errno), unique u64.
const OUT_HEADER_LEN: usize = 16;
/// The root directory's node id.
const ROOT_ID: u64 = 1;
/// The file's node id.
const FILE_ID: u64 = 2;
/// How long the kernel may cache names and attributes (they never change), in seconds.
const VALID_SECS: u64 = 3600;
/// The block size reported in attributes and by STATFS.
const BLOCK_SIZE: u32 = 4096;
/// `DT_REG`, the type of a regular file in a directory entry.
const DT_REG: u32 = 8;

/// Request opcodes (`enum fuse_opcode`).
mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

/// The mountpoints of the file systems mounted and not dropped yet, for [`detach_all`].
static MOUNTED: Mutex<Vec<CString>> = Mutex::new(Vec::new());

/// Detaches every file system still mounted (each goes once nothing uses it any more): for a
/// process about to end without dropping them, which would leave them mounted with no server.
pub fn detach_all() {
    for target in lock(&MOUNTED).iter() {
        // SAFETY: `target` is a NUL-terminated string that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A mounted read-only FUSE file system with one regular file.
pub struct SlowFs {
    mountpoint: PathBuf,
    /// `mountpoint` as the C string `umount2` takes.
    target: CString,
    file_path: PathBuf,
    server: Arc<Server>,
    threads: Vec<JoinHandle<()>>,
}

impl SlowFs {
    /// Mounts at `mountpoint` (an existing, empty directory) a read-only file system that shows
    /// one regular file named `name` (mode 0444, size = backing's length) whose bytes are read
    /// from `backing` with pread, each READ request answered only after sleeping `delay`.
    /// Served by `threads` (>= 1) threads reading the same /dev/fuse descriptor.
    pub fn mount(
        mountpoint: &Path,
        name: &str,
        backing: File,
        delay: Duration,
        threads: usize,
    ) -> anyhow::Result<SlowFs> {
        if threads == 0 {
            bail!(
                "a FUSE file system at {} needs at least one thread",
                mountpoint.display()
            );
        }
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            bail!(
                "{name:?} cannot be a file name (for {})",
                mountpoint.display()
            );
        }
        let size = backing
            .metadata()
            .with_context(|| format!("cannot stat the file to serve at {}", mountpoint.display()))?
            .len();
        // Non-blocking, so that a thread woken for a request another one took waits again.
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/fuse")
            .with_context(|| format!("cannot open /dev/fuse to mount {}", mountpoint.display()))?;
        let stop = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(io::Error::from)
            .with_context(|| format!("cannot create an eventfd for {}", mountpoint.display()))?;
        let target = CString::new(mountpoint.as_os_str().as_bytes())
            .with_context(|| format!("{} cannot be a mountpoint", mountpoint.display()))?;
        let options = CString::new(format!(
            "fd={},rootmode=40000,user_id={},group_id={},allow_other,default_permissions",
            dev.as_raw_fd(),
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        ))?;
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
        // SAFETY: every pointer is to a NUL-terminated string that outlives the call; the
        // kernel only reads them.
        let ret = unsafe {
            libc::mount(
                c"slowfs".as_ptr(),
                target.as_ptr(),
                c"fuse.slowfs".as_ptr(),
                flags,
                options.as_ptr().cast(),
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!(
                    "cannot mount a FUSE file system at {}",
                    mountpoint.display()
                )
            });
        }
        lock(&MOUNTED).push(target.clone());
        // From here on, dropping `fs` unmounts, whatever fails.
        let mut fs = SlowFs {
            mountpoint: mountpoint.to_path_buf(),
            target,
            file_path: mountpoint.join(name),
            server: Arc::new(Server {
                dev,
                stop,
                backing,
                size,
                name: name.as_bytes().to_vec(),
                delay,
                reads: AtomicU64::new(0),
            }),
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let server = Arc::clone(&fs.server);
            let thread = std::thread::Builder::new()
                .name(format!("slowfs-{i}"))
                .spawn(move || server.serve())
                .with_context(|| {
                    format!("cannot start a thread to serve {}", mountpoint.display())
                })?;
            fs.threads.push(thread);
        }
        Ok(fs)
    }

    /// The path of the file (mountpoint/name).
    pub fn file_path(&self) -> PathBuf {
        self.file_path.clone()
    }

    /// READ requests answered so far (each is counted as its answer is sent).
    pub fn reads(&self) -> u64 {
        self.server.reads.load(Ordering::Relaxed)
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        lock(&MOUNTED).retain(|target| *target != self.target);
        // SAFETY: `target` is a NUL-terminated string that outlives the call.
        if unsafe { libc::umount2(self.target.as_ptr(), libc::MNT_DETACH) } != 0 {
            tracing::warn!(
                "slowfs: cannot unmount {}: {}",
                self.mountpoint.display(),
                io::Error::last_os_error()
            );
        }
        // The device reports the unmount only once nothing uses the file system any more (a
        // file still open or mapped keeps it), so the threads are told to stop as well.
        if let Err(e) = rustix::io::write(&self.server.stop, &1u64.to_ne_bytes()) {
            tracing::warn!(
                "slowfs: cannot stop the threads of {}: {e}",
                self.mountpoint.display()
            );
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::warn!("slowfs: a thread of {} panicked", self.mountpoint.display());
            }
        }
        // Dropping the server closes the device, its last reference: that aborts the
        // connection, so whatever still uses the file gets errors instead of waiting.
    }
}

/// What the threads share.
struct Server {
    /// The `/dev/fuse` descriptor of the mount.
    dev: File,
    /// An eventfd made readable when the threads are to stop.
    stop: OwnedFd,
    /// The file served.
    backing: File,
    /// Its length, fixed at mount time.
    size: u64,
    /// The served file's name.
    name: Vec<u8>,
    /// The sleep before each READ is answered.
    delay: Duration,
    /// READ requests answered.
    reads: AtomicU64,
}

/// The fields of `struct fuse_in_header` a reply needs.
struct InHeader {
    opcode: u32,
    unique: u64,
    nodeid: u64,
}

impl InHeader {
    /// The header of `request`, if `request` is one whole request.
    fn parse(request: &[u8]) -> Option<InHeader> {
        let len = u32_at(request, 0)?;
        if len as usize != request.len() || request.len() < IN_HEADER_LEN {
            return None;
        }
        Some(InHeader {
            opcode: u32_at(request, 4)?,
            unique: u64_at(request, 8)?,
            nodeid: u64_at(request, 16)?,
        })
    }
}

/// How a request is answered.
enum Answer {
    /// Success, with this reply.
    Ok(Reply),
    /// This errno.
    Err(i32),
    /// Not at all (FORGET, BATCH_FORGET, INTERRUPT).
    NoReply,
}

/// A reply: room for the out header (filled in when sent), then the body's little-endian
/// fields in order.
struct Reply(Vec<u8>);

impl Reply {
    /// A reply with an empty body.
    fn new() -> Reply {
        Reply(vec![0; OUT_HEADER_LEN])
    }

    /// A reply whose body is `len` zero bytes, to be filled in through [`Reply::body_mut`].
    fn zeroed(len: usize) -> Reply {
        Reply(vec![0; OUT_HEADER_LEN + len])
    }

    fn body_mut(&mut self) -> &mut [u8] {
        &mut self.0[OUT_HEADER_LEN..]
    }

    fn u16(mut self, value: u16) -> Reply {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    fn u32(mut self, value: u32) -> Reply {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    fn u64(mut self, value: u64) -> Reply {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    fn bytes(mut self, bytes: &[u8]) -> Reply {
        self.0.extend_from_slice(bytes);
        self
    }

    /// Zero bytes up to the next multiple of 8 of the body's length.
    fn pad8(mut self) -> Reply {
        let body = self.0.len() - OUT_HEADER_LEN;
        self.0.resize(self.0.len() + (8 - body % 8) % 8, 0);
        self
    }

    fn zeros(mut self, len: usize) -> Reply {
        self.0.resize(self.0.len() + len, 0);
        self
    }

    /// `struct fuse_attr` (88 bytes) of node `nodeid`, a file of `size` bytes or the root.
    fn attr(self, nodeid: u64, size: u64) -> Reply {
        let (mode, nlink) = if nodeid == ROOT_ID {
            (libc::S_IFDIR | 0o555, 2)
        } else {
            (libc::S_IFREG | 0o444, 1)
        };
        self.u64(nodeid)
            .u64(size)
            .u64(size.div_ceil(512))
            .u64(0) // atime
            .u64(0) // mtime
            .u64(0) // ctime
            .u32(0) // atimensec
            .u32(0) // mtimensec
            .u32(0) // ctimensec
            .u32(mode)
            .u32(nlink)
            .u32(0) // uid
            .u32(0) // gid
            .u32(0) // rdev
            .u32(BLOCK_SIZE)
            .u32(0) // flags
    }
}

impl Server {
    /// A thread's loop: wait for a request, read it, answer it; until the device reports the
    /// unmount or `stop` is signalled.
    fn serve(&self) {
        let mut buf = vec![0; REQUEST_BUF_LEN];
        loop {
            match self.wait() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!("slowfs: cannot wait for a FUSE request: {e}");
                    return;
                }
            }
            let len = match (&self.dev).read(&mut buf) {
                Ok(len) => len,
                Err(e) => match e.raw_os_error() {
                    // Another thread took the request, or a signal came.
                    Some(libc::EAGAIN | libc::EINTR) => continue,
                    // Unmounted.
                    Some(libc::ENODEV) => return,
                    _ => {
                        tracing::warn!("slowfs: cannot read a FUSE request: {e}");
                        return;
                    }
                },
            };
            self.handle(&buf[..len]);
        }
    }

    /// Waits until a request may be there to read (`true`) or the threads are to stop.
    fn wait(&self) -> io::Result<bool> {
        loop {
            let mut fds = [
                PollFd::new(&self.dev, PollFlags::IN),
                PollFd::new(&self.stop, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => {
                    let gone = PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL;
                    return Ok(fds[1].revents().is_empty() && !fds[0].revents().intersects(gone));
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Answers one request.
    fn handle(&self, request: &[u8]) {
        let Some(header) = InHeader::parse(request) else {
            tracing::warn!(
                "slowfs: ignoring a malformed request of {} bytes",
                request.len()
            );
            return;
        };
        let body = &request[IN_HEADER_LEN..];
        let answer = match header.opcode {
            opcode::INIT => init(body),
            opcode::LOOKUP => self.lookup(header.nodeid, body),
            opcode::GETATTR => self.getattr(header.nodeid),
            // fh 0, open_flags 0 (no direct I/O: reads go through the page cache, which is
            // dropped at each open), backing_id 0.
            opcode::OPEN | opcode::OPENDIR => Answer::Ok(Reply::new().u64(0).u32(0).u32(0)),
            opcode::READ => self.read(body),
            opcode::READDIR => self.readdir(header.nodeid, body),
            opcode::STATFS => Answer::Ok(self.statfs()),
            opcode::RELEASE
            | opcode::RELEASEDIR
            | opcode::FLUSH
            | opcode::ACCESS
            | opcode::DESTROY => Answer::Ok(Reply::new()),
            // An INTERRUPT may go unanswered: the request it names is answered anyway.
            opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT => Answer::NoReply,
            _ => Answer::Err(libc::ENOSYS),
        };
        self.send(header.unique, answer);
    }

    /// LOOKUP: `fuse_entry_out` for the file's name in the root, ENOENT for anything else.
    fn lookup(&self, parent: u64, body: &[u8]) -> Answer {
        let name = body.split(|&b| b == 0).next().unwrap_or_default();
        if parent != ROOT_ID || name != self.name.as_slice() {
            return Answer::Err(libc::ENOENT);
        }
        let reply = Reply::new()
            .u64(FILE_ID)
            .u64(0) // generation
            .u64(VALID_SECS) // entry_valid
            .u64(VALID_SECS) // attr_valid
            .u32(0) // entry_valid_nsec
            .u32(0) // attr_valid_nsec
            .attr(FILE_ID, self.size);
        Answer::Ok(reply)
    }

    /// GETATTR: `fuse_attr_out` of the root or the file.
    fn getattr(&self, nodeid: u64) -> Answer {
        let size = match nodeid {
            ROOT_ID => 0,
            FILE_ID => self.size,
            _ => return Answer::Err(libc::ENOENT),
        };
        let reply = Reply::new()
            .u64(VALID_SECS) // attr_valid
            .u32(0) // attr_valid_nsec
            .u32(0) // dummy
            .attr(nodeid, size);
        Answer::Ok(reply)
    }

    /// READ (`fuse_read_in`: fh u64, offset u64, size u32, ...): after the delay, up to `size`
    /// bytes from `offset`, fewer at the end of the file.
    fn read(&self, body: &[u8]) -> Answer {
        let (Some(offset), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
            return Answer::Err(libc::EINVAL);
        };
        if size > MAX_READ {
            return Answer::Err(libc::EINVAL);
        }
        std::thread::sleep(self.delay);
        // At most MAX_READ, so it fits a usize.
        let len = u64::from(size).min(self.size.saturating_sub(offset)) as usize;
        let mut reply = Reply::zeroed(len);
        if let Err(e) = self.backing.read_exact_at(reply.body_mut(), offset) {
            tracing::warn!("slowfs: cannot read {len} bytes at {offset} of the backing file: {e}");
            return Answer::Err(libc::EIO);
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        Answer::Ok(reply)
    }

    /// READDIR (`fuse_read_in`): the file's entry at offset 0, then the end.
    fn readdir(&self, nodeid: u64, body: &[u8]) -> Answer {
        let (Some(offset), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
            return Answer::Err(libc::EINVAL);
        };
        if nodeid != ROOT_ID {
            return Answer::Err(libc::ENOTDIR);
        }
        // `struct fuse_dirent`: ino, off (of the next entry), namelen, type, name, padding.
        let entry = Reply::new()
            .u64(FILE_ID)
            .u64(1)
            .u32(self.name.len() as u32)
            .u32(DT_REG)
            .bytes(&self.name)
            .pad8();
        if offset == 0 && entry.0.len() - OUT_HEADER_LEN <= size as usize {
            Answer::Ok(entry)
        } else {
            Answer::Ok(Reply::new())
        }
    }

    /// STATFS: `fuse_statfs_out` (`struct fuse_kstatfs`, 80 bytes) of a full, read-only file
    /// system.
    fn statfs(&self) -> Reply {
        Reply::new()
            .u64(self.size.div_ceil(u64::from(BLOCK_SIZE))) // blocks
            .u64(0) // bfree
            .u64(0) // bavail
            .u64(2) // files
            .u64(0) // ffree
            .u32(BLOCK_SIZE) // bsize
            .u32(255) // namelen
            .u32(BLOCK_SIZE) // frsize
            .u32(0) // padding
            .zeros(24) // spare
    }

    /// Sends the answer to request `unique`, if it takes one, with a single write.
    fn send(&self, unique: u64, answer: Answer) {
        let (error, Reply(mut message)) = match answer {
            Answer::Ok(reply) => (0, reply),
            Answer::Err(errno) => (-errno, Reply::new()),
            Answer::NoReply => return,
        };
        // At most the out header and MAX_READ bytes.
        let len = message.len() as u32;
        message[0..4].copy_from_slice(&len.to_le_bytes());
        message[4..8].copy_from_slice(&error.to_le_bytes());
        message[8..16].copy_from_slice(&unique.to_le_bytes());
        match (&self.dev).write(&message) {
            Ok(written) if written == message.len() => {}
            Ok(written) => {
                tracing::warn!("slowfs: a reply of {len} bytes was cut to {written}");
            }
            // The request was interrupted and is gone.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::warn!("slowfs: cannot answer a FUSE request: {e}"),
        }
    }
}

/// INIT (`fuse_init_in`: major u32, minor u32, max_readahead u32, flags u32, ...): answered
/// with `fuse_init_out` (64 bytes), the kernel's read-ahead and asynchronous reads.
fn init(body: &[u8]) -> Answer {
    let (Some(major), Some(minor), Some(max_readahead), Some(flags)) = (
        u32_at(body, 0),
        u32_at(body, 4),
        u32_at(body, 8),
        u32_at(body, 12),
    ) else {
        return Answer::Err(libc::EINVAL);
    };
    if major != MAJOR {
        tracing::warn!("slowfs: the kernel speaks FUSE {major}.{minor}, not {MAJOR}.x");
        return Answer::Err(libc::EPROTO);
    }
    let reply = Reply::new()
        .u32(MAJOR)
        .u32(minor.min(MAX_MINOR))
        .u32(max_readahead)
        .u32(flags & FUSE_ASYNC_READ)
        .u16(0) // max_background: the kernel's default
        .u16(0) // congestion_threshold: the kernel's default
        .u32(MAX_WRITE)
        .u32(1) // time_gran
        .u16(0) // max_pages: the kernel's default
        .u16(0) // map_alignment
        .u32(0) // flags2
        .u32(0) // max_stack_depth
        .u16(0) // request_timeout
        .zeros(22); // unused
    Answer::Ok(reply)
}

/// The little-endian u32 at `at` in `buf`, if it is all there.
fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// The little-endian u64 at `at` in `buf`, if it is all there.
fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// Why FUSE cannot be tested here, if it cannot.
    fn unavailable(error: &anyhow::Error) -> Option<String> {
        let io = error.root_cause().downcast_ref::<io::Error>()?;
        (io.raw_os_error() == Some(libc::EPERM)).then(|| format!("{error:#}"))
    }

    #[test]
    fn serves_reads_and_private_mappings() {
        if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/fuse") {
            eprintln!("SKIPPED: cannot open /dev/fuse: {e}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("faultline-slowfs-{}", std::process::id()));
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint).unwrap();
        // 64 pages and a bit: more than one read-ahead window (32 pages), so READs come at
        // several offsets, and the file ends inside a page, so the last READ is short.
        let bytes: Vec<u8> = (0..64 * PAGE + 100)
            .map(|i| (i % 251 + i / PAGE) as u8)
            .collect();
        let backing_path = dir.join("backing");
        std::fs::write(&backing_path, &bytes).unwrap();
        let backing = File::open(&backing_path).unwrap();
        let delay = Duration::from_millis(2);
        let fs = match SlowFs::mount(&mountpoint, "memory.img", backing, delay, 2) {
            Ok(fs) => fs,
            Err(e) => {
                std::fs::remove_dir_all(&dir).unwrap();
                let reason = unavailable(&e).unwrap_or_else(|| panic!("{e:#}"));
                eprintln!("SKIPPED: {reason}");
                return;
            }
        };
        let path = fs.file_path();
        assert_eq!(path, mountpoint.join("memory.img"));

        // Through a private, writable mapping (as Firecracker maps guest RAM), page by page.
        let file = File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), bytes.len() as u64);
        // SAFETY: a new mapping at an address the kernel picks; it overlaps nothing.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        // SAFETY: the mapping is `bytes.len()` readable and writable bytes, only reached
        // through this slice, and unmapped after its last use.
        let mapped = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), bytes.len()) };
        for (page, expected) in mapped.chunks(PAGE).zip(bytes.chunks(PAGE)) {
            assert_eq!(page, expected);
        }
        mapped[0] ^= 0xff;
        // SAFETY: the range was mapped above and `mapped` is not used again.
        assert_eq!(unsafe { libc::munmap(addr, bytes.len()) }, 0);
        drop(file);
        assert!(fs.reads() >= 1);

        // Through read(2): the write to the private mapping did not reach the file.
        let reads = fs.reads();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert!(
            fs.reads() > reads,
            "each open starts from an empty page cache"
        );

        drop(fs);
        assert!(!path.exists(), "{} is still mounted", mountpoint.display());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
