//! The userfaultfd itself: opening, the API handshake, registration and every install ioctl.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use linux_raw_sys::general as uapi;
use rustix::mm::UserfaultfdFlags;

use crate::event::Event;
use crate::features::Features;
use crate::sys;

/// The most events one [`Uffd::read_events`] call returns.
pub const MAX_EVENTS_PER_READ: usize = 64;

/// Errors from userfaultfd operations.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither /dev/userfaultfd nor the userfaultfd(2) system call gave us a descriptor.
    #[error("cannot create a userfaultfd: /dev/userfaultfd failed ({device}) and userfaultfd(2) failed ({syscall}); root (or vm.unprivileged_userfaultfd=1 / access to /dev/userfaultfd) is needed")]
    Open {
        device: std::io::Error,
        syscall: std::io::Error,
    },
    /// The kernel does not offer features that were asked for.
    #[error("the kernel's userfaultfd lacks {missing} (it offers {offered})")]
    MissingFeatures {
        missing: Features,
        offered: Features,
    },
    /// An ioctl failed with an errno that is not an expected outcome.
    #[error("{op} on [{start:#x}, +{len:#x}) failed")]
    Ioctl {
        op: &'static str,
        start: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    /// Reading events failed.
    #[error("reading userfaultfd events failed")]
    Read(#[source] std::io::Error),
}

/// How the descriptor was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenedThrough {
    /// `/dev/userfaultfd`: kernel-mode faults (KVM's own accesses) are delivered.
    Device,
    /// The userfaultfd(2) system call (without UFFD_USER_MODE_ONLY, so kernel faults too).
    Syscall,
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterMode(pub u64);

impl RegisterMode {
    pub const MISSING: RegisterMode = RegisterMode(uapi::UFFDIO_REGISTER_MODE_MISSING as u64);
    pub const WP: RegisterMode = RegisterMode(uapi::UFFDIO_REGISTER_MODE_WP as u64);
    pub const MINOR: RegisterMode = RegisterMode(uapi::UFFDIO_REGISTER_MODE_MINOR as u64);
}

impl std::ops::BitOr for RegisterMode {
    type Output = RegisterMode;
    fn bitor(self, rhs: RegisterMode) -> RegisterMode {
        RegisterMode(self.0 | rhs.0)
    }
}

/// The ioctls the kernel allows on a registered range (a bit per `_UFFDIO_*` number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeIoctls(pub u64);

impl RangeIoctls {
    fn has(self, number: u32) -> bool {
        self.0 & (1 << number) != 0
    }
    pub fn copy(self) -> bool {
        self.has(uapi::_UFFDIO_COPY)
    }
    pub fn zeropage(self) -> bool {
        self.has(uapi::_UFFDIO_ZEROPAGE)
    }
    pub fn continue_(self) -> bool {
        self.has(uapi::_UFFDIO_CONTINUE)
    }
    pub fn writeprotect(self) -> bool {
        self.has(uapi::_UFFDIO_WRITEPROTECT)
    }
    pub fn poison(self) -> bool {
        self.has(uapi::_UFFDIO_POISON)
    }
    pub fn move_(self) -> bool {
        self.has(uapi::_UFFDIO_MOVE)
    }
}

/// What an install-type ioctl did. EEXIST and EAGAIN are outcomes a page-fault handler must
/// act on, not failures, so they are values here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole range was handled.
    Done,
    /// A page in the range was already present (EEXIST); `done` bytes before it were handled.
    /// Nothing was overwritten.
    Exists { done: u64 },
    /// EAGAIN, in two cases the caller handles alike: the address space is changing (read
    /// the pending remove/unmap/remap events), or the ioctl stopped part way (the kernel
    /// reports a partial multi-page install this way, e.g. before a present page). `done`
    /// bytes were handled; retry the rest.
    Again { done: u64 },
}

/// Options for UFFDIO_COPY.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyMode {
    /// Install the page write-protected (UFFDIO_COPY_MODE_WP).
    pub write_protect: bool,
    /// Do not wake the faulting threads (UFFDIO_COPY_MODE_DONTWAKE); wake them later.
    pub dont_wake: bool,
}

/// A userfaultfd, after the API handshake.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    opened_through: OpenedThrough,
}

/// ORs together the bits whose flag is set.
fn mode_bits(flags: &[(bool, u64)]) -> u64 {
    flags
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |mode, (_, bit)| mode | bit)
}

/// The one userfaultfd handed to `ioctl`, with its result checked.
fn ioctl<T>(fd: RawFd, request: u32, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `request` is a userfaultfd ioctl whose argument type is `T` (the caller pairs
    // them from `sys`), and `arg` is a live, exclusive reference for the call's duration.
    let ret = unsafe { libc::ioctl(fd, request as libc::c_ulong, arg as *mut T) };
    if ret == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_raw() -> Result<(OwnedFd, OpenedThrough), UffdError> {
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
        .and_then(|dev| {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
            let fd = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    sys::USERFAULTFD_IOC_NEW as libc::c_ulong,
                    libc::O_CLOEXEC | libc::O_NONBLOCK,
                )
            };
            if fd < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                // SAFETY: the kernel just returned this descriptor to us.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        });
    let device_err = match device {
        Ok(fd) => return Ok((fd, OpenedThrough::Device)),
        Err(e) => e,
    };
    // SAFETY: creating a userfaultfd has no memory-safety preconditions; what it can do to
    // this process's memory is done later through the unsafe methods of `Uffd`, whose
    // callers answer for it.
    match unsafe { rustix::mm::userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK) }
    {
        Ok(fd) => Ok((fd, OpenedThrough::Syscall)),
        Err(e) => Err(UffdError::Open {
            device: device_err,
            syscall: e.into(),
        }),
    }
}

/// What the kernel offers: every feature bit it knows (a handshake asking for none).
pub fn supported_features() -> Result<Features, UffdError> {
    let (fd, _) = open_raw()?;
    let mut api = uapi::uffdio_api {
        api: u64::from(uapi::UFFD_API),
        features: 0,
        ioctls: 0,
    };
    ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut api).map_err(|source| UffdError::Ioctl {
        op: "UFFDIO_API",
        start: 0,
        len: 0,
        source,
    })?;
    Ok(Features(api.features))
}

impl Uffd {
    /// Opens a non-blocking userfaultfd (through /dev/userfaultfd when possible, so that KVM's
    /// kernel-mode faults are delivered) and enables `features`. Fails naming the features the
    /// kernel lacks.
    pub fn open(features: Features) -> Result<Uffd, UffdError> {
        let (fd, opened_through) = open_raw()?;
        let mut api = uapi::uffdio_api {
            api: u64::from(uapi::UFFD_API),
            features: features.0,
            ioctls: 0,
        };
        match ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut api) {
            Ok(()) => Ok(Uffd {
                fd,
                features: Features(api.features),
                opened_through,
            }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let offered = supported_features()?;
                let missing = features.without(offered);
                if missing == Features::NONE {
                    Err(UffdError::Ioctl {
                        op: "UFFDIO_API",
                        start: 0,
                        len: 0,
                        source: e,
                    })
                } else {
                    Err(UffdError::MissingFeatures { missing, offered })
                }
            }
            Err(source) => Err(UffdError::Ioctl {
                op: "UFFDIO_API",
                start: 0,
                len: 0,
                source,
            }),
        }
    }

    /// The features in force.
    pub fn features(&self) -> Features {
        self.features
    }

    /// How the descriptor was obtained.
    pub fn opened_through(&self) -> OpenedThrough {
        self.opened_through
    }

    fn err(op: &'static str, start: u64, len: u64) -> impl FnOnce(std::io::Error) -> UffdError {
        move |source| UffdError::Ioctl {
            op,
            start,
            len,
            source,
        }
    }

    /// Registers `[start, start + len)` (page aligned, mapped) in `mode`; returns the ioctls
    /// the kernel allows there.
    ///
    /// # Safety
    ///
    /// From now on a touch of a missing (or, in WP mode, write-protected) page of the range
    /// blocks the toucher until this userfaultfd answers, and the install ioctls can change the
    /// range's contents. The range must be memory the caller manages as raw pages (guest RAM,
    /// a test mapping), never memory that Rust code owns as an ordinary object (a `Vec`, a
    /// stack), and someone must serve its faults for as long as it is registered (unless the
    /// userfaultfd has UFFD_FEATURE_SIGBUS: a touch then fails instead of waiting).
    pub unsafe fn register(
        &self,
        start: u64,
        len: u64,
        mode: RegisterMode,
    ) -> Result<RangeIoctls, UffdError> {
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range { start, len },
            mode: mode.0,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_REGISTER, &mut reg).map_err(Self::err(
            "UFFDIO_REGISTER",
            start,
            len,
        ))?;
        Ok(RangeIoctls(reg.ioctls))
    }

    /// Unregisters a range (waking any thread still waiting on it).
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = uapi::uffdio_range { start, len };
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_UNREGISTER, &mut range).map_err(Self::err(
            "UFFDIO_UNREGISTER",
            start,
            len,
        ))
    }

    /// Maps an ioctl's result and its "bytes done" field to an [`Outcome`].
    fn outcome(
        result: std::io::Result<()>,
        done: i64,
        op: &'static str,
        start: u64,
        len: u64,
    ) -> Result<Outcome, UffdError> {
        let done = done.max(0) as u64;
        match result {
            Ok(()) => Ok(Outcome::Done),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Outcome::Exists { done }),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(Outcome::Again { done }),
            Err(e) => Err(UffdError::Ioctl {
                op,
                start,
                len,
                source: e,
            }),
        }
    }

    /// UFFDIO_COPY: atomically fills the missing pages at `dst` with `src` and wakes the
    /// threads waiting on them. Never overwrites a present page (that is [`Outcome::Exists`]).
    ///
    /// # Safety
    ///
    /// The destination must be a registered range (see [`register`](Self::register)) whose
    /// missing pages the caller may fill: the kernel writes them behind the back of any Rust
    /// reference, so none may exist into them.
    pub unsafe fn copy(&self, dst: u64, src: &[u8], mode: CopyMode) -> Result<Outcome, UffdError> {
        // SAFETY: the caller's contract for `dst`; `src` is a live slice of `src.len()` bytes.
        unsafe { self.copy_from_addr(dst, src.as_ptr() as u64, src.len() as u64, mode) }
    }

    /// UFFDIO_COPY from a raw source address (`len` bytes at `src`), e.g. a mapping of a file:
    /// the kernel reads the source itself (copy_from_user), so a bad address is an EFAULT
    /// error, not undefined behaviour, and no intermediate buffer is needed.
    ///
    /// # Safety
    ///
    /// The destination must be a registered range (see [`register`](Self::register)) whose
    /// missing pages the caller may fill: the kernel writes them behind the back of any Rust
    /// reference, so none may exist into them.
    pub unsafe fn copy_from_addr(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        mode: CopyMode,
    ) -> Result<Outcome, UffdError> {
        let bits = mode_bits(&[
            (mode.write_protect, u64::from(uapi::UFFDIO_COPY_MODE_WP)),
            (mode.dont_wake, u64::from(uapi::UFFDIO_COPY_MODE_DONTWAKE)),
        ]);
        let mut arg = uapi::uffdio_copy {
            dst,
            src,
            len,
            mode: bits,
            copy: 0,
        };
        let result = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_COPY, &mut arg);
        Self::outcome(result, arg.copy, "UFFDIO_COPY", dst, len)
    }

    /// UFFDIO_ZEROPAGE: fills missing pages with zeros without copying anything.
    ///
    /// # Safety
    ///
    /// The destination must be a registered range (see [`register`](Self::register)) whose
    /// missing pages the caller may fill: the kernel writes them behind the back of any Rust
    /// reference, so none may exist into them.
    pub unsafe fn zeropage(
        &self,
        start: u64,
        len: u64,
        dont_wake: bool,
    ) -> Result<Outcome, UffdError> {
        let mode = mode_bits(&[(dont_wake, u64::from(uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE))]);
        let mut arg = uapi::uffdio_zeropage {
            range: uapi::uffdio_range { start, len },
            mode,
            zeropage: 0,
        };
        let result = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_ZEROPAGE, &mut arg);
        Self::outcome(result, arg.zeropage, "UFFDIO_ZEROPAGE", start, len)
    }

    /// UFFDIO_CONTINUE: maps pages that are already in the page cache (minor faults).
    ///
    /// # Safety
    ///
    /// The destination must be a registered range (see [`register`](Self::register)) whose
    /// missing pages the caller may fill: the kernel writes them behind the back of any Rust
    /// reference, so none may exist into them.
    pub unsafe fn continue_(
        &self,
        start: u64,
        len: u64,
        write_protect: bool,
        dont_wake: bool,
    ) -> Result<Outcome, UffdError> {
        let mode = mode_bits(&[
            (write_protect, sys::UFFDIO_CONTINUE_MODE_WP),
            (dont_wake, sys::UFFDIO_CONTINUE_MODE_DONTWAKE),
        ]);
        let mut arg = uapi::uffdio_continue {
            range: uapi::uffdio_range { start, len },
            mode,
            mapped: 0,
        };
        let result = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_CONTINUE, &mut arg);
        Self::outcome(result, arg.mapped, "UFFDIO_CONTINUE", start, len)
    }

    /// UFFDIO_POISON: marks missing pages poisoned; touching them raises SIGBUS (a kernel
    /// access gets EFAULT). The explicit answer to a page whose contents cannot be had.
    ///
    /// # Safety
    ///
    /// The destination must be a registered range (see [`register`](Self::register)) whose
    /// missing pages the caller may fill: the kernel writes them behind the back of any Rust
    /// reference, so none may exist into them.
    /// A poisoned page raises SIGBUS in whoever touches it from user space.
    pub unsafe fn poison(
        &self,
        start: u64,
        len: u64,
        dont_wake: bool,
    ) -> Result<Outcome, UffdError> {
        let mode = mode_bits(&[(dont_wake, sys::UFFDIO_POISON_MODE_DONTWAKE)]);
        let mut arg = uapi::uffdio_poison {
            range: uapi::uffdio_range { start, len },
            mode,
            updated: 0,
        };
        let result = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_POISON, &mut arg);
        Self::outcome(result, arg.updated, "UFFDIO_POISON", start, len)
    }

    /// UFFDIO_WRITEPROTECT: sets (`protect`) or clears write protection on a range registered
    /// in WP mode. Clearing it wakes threads blocked on it unless `dont_wake`.
    pub fn writeprotect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        dont_wake: bool,
    ) -> Result<(), UffdError> {
        let mode = mode_bits(&[
            (protect, sys::UFFDIO_WRITEPROTECT_MODE_WP),
            (dont_wake, sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE),
        ]);
        let mut arg = uapi::uffdio_writeprotect {
            range: uapi::uffdio_range { start, len },
            mode,
        };
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_WRITEPROTECT, &mut arg).map_err(Self::err(
            "UFFDIO_WRITEPROTECT",
            start,
            len,
        ))
    }

    /// UFFDIO_WAKE: wakes threads waiting on a range (after DONTWAKE installs).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = uapi::uffdio_range { start, len };
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_WAKE, &mut range).map_err(Self::err(
            "UFFDIO_WAKE",
            start,
            len,
        ))
    }

    /// UFFDIO_MOVE: moves the pages at `src` (anonymous, private) to the missing range at `dst`
    /// without copying. `allow_src_holes` lets holes in `src` through as holes.
    ///
    /// # Safety
    ///
    /// The pages leave `src`: afterwards it reads as missing (or zero). No live Rust reference
    /// may point into `[src, src + len)`.
    pub unsafe fn move_pages(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        allow_src_holes: bool,
        dont_wake: bool,
    ) -> Result<Outcome, UffdError> {
        let mode = mode_bits(&[
            (allow_src_holes, sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES),
            (dont_wake, sys::UFFDIO_MOVE_MODE_DONTWAKE),
        ]);
        let mut arg = uapi::uffdio_move {
            dst,
            src,
            len,
            mode,
            move_: 0,
        };
        let result = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_MOVE, &mut arg);
        Self::outcome(result, arg.move_, "UFFDIO_MOVE", dst, len)
    }

    /// Reads the pending events into `out` (at most `max`, at most [`MAX_EVENTS_PER_READ`]),
    /// without blocking. Returns how many were read: 0 when none are pending. Does not
    /// allocate beyond `out`'s growth: it sits on the fault path.
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> Result<usize, UffdError> {
        const MSG_SIZE: usize = std::mem::size_of::<uapi::uffd_msg>();
        let mut buf = [0u8; MSG_SIZE * MAX_EVENTS_PER_READ];
        let want = max.clamp(1, MAX_EVENTS_PER_READ) * MSG_SIZE;
        let n = match rustix::io::read(&self.fd, &mut buf[..want]) {
            Ok(n) => n,
            Err(rustix::io::Errno::AGAIN) => return Ok(0),
            Err(e) => return Err(UffdError::Read(e.into())),
        };
        for chunk in buf[..n].chunks_exact(MSG_SIZE) {
            // SAFETY: the kernel wrote whole uffd_msg structures; read_unaligned copes with the
            // byte buffer's alignment, and uffd_msg is plain data valid for any bits.
            let msg = unsafe { std::ptr::read_unaligned(chunk.as_ptr() as *const uapi::uffd_msg) };
            // SAFETY: the message was just read from this userfaultfd, and is decoded once (a
            // fork event's descriptor is owned by the returned event alone).
            out.push(unsafe { Event::from_msg(&msg) });
        }
        Ok(n / MSG_SIZE)
    }

    /// Waits until events are pending or `timeout_ms` passes (-1: forever). True if readable.
    pub fn wait(&self, timeout_ms: i32) -> Result<bool, UffdError> {
        let mut fds = [libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
        match ret {
            -1 => {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    Ok(false)
                } else {
                    Err(UffdError::Read(e))
                }
            }
            0 => Ok(false),
            _ => Ok(true),
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
