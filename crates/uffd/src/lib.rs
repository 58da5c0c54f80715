//! A safe wrapper over the Linux userfaultfd UAPI (no bindgen: the structures come from
//! linux-raw-sys, the ioctl numbers are computed like the kernel's macros).
//!
//! Mechanism only: open and handshake ([`Uffd::open`], [`supported_features`]), register and
//! unregister in missing / write-protect / minor modes, the install ioctls (COPY, ZEROPAGE,
//! CONTINUE, POISON, MOVE), WRITEPROTECT and WAKE, and typed [`Event`]s. EEXIST and EAGAIN
//! come back as [`Outcome`] values because a fault handler must act on them. What to install,
//! when, and from where is the pager's business.

mod event;
mod features;
mod sys;
mod uffd;

pub use event::Event;
pub use features::Features;
pub use uffd::{
    supported_features, CopyMode, OpenedThrough, Outcome, RangeIoctls, RegisterMode, Uffd,
    UffdError,
};

/// The base page size these operations work in.
pub const PAGE_SIZE: u64 = 4096;

#[cfg(test)]
mod tests;
