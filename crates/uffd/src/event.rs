//! Messages read from a userfaultfd, decoded into typed events.

use std::os::fd::{FromRawFd, OwnedFd};

use linux_raw_sys::general as uapi;

/// One userfaultfd event.
#[derive(Debug)]
pub enum Event {
    /// A thread touched a registered page that is missing (or write-protected, or, in minor
    /// mode, present in the page cache but not mapped). It sleeps until the range is woken.
    PageFault {
        /// The faulting address (page aligned unless EXACT_ADDRESS was negotiated).
        address: u64,
        /// The access was a write.
        write: bool,
        /// The fault is a write-protect fault.
        wp: bool,
        /// The fault is a minor fault (MINOR registration).
        minor: bool,
        /// The faulting thread's id (0 unless THREAD_ID was negotiated).
        thread_id: u32,
    },
    /// The process forked; the child's registrations are served through `uffd`.
    Fork { uffd: OwnedFd },
    /// `mremap` moved a registered range.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(MADV_DONTNEED / MADV_REMOVE)` (a balloon, say) drops `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `munmap` removed `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// An event this crate does not know.
    Unknown(u8),
}

impl Event {
    /// Decodes one message. Takes ownership of the file descriptor of a fork event.
    ///
    /// # Safety
    ///
    /// `msg` must have been read from a userfaultfd by this process and be decoded at most
    /// once: a fork event's descriptor number becomes an [`OwnedFd`] that closes it.
    pub(crate) unsafe fn from_msg(msg: &uapi::uffd_msg) -> Event {
        let event = msg.event;
        match u32::from(event) {
            uapi::UFFD_EVENT_PAGEFAULT => {
                // SAFETY: for a page-fault event the kernel fills `pagefault` (plain integers).
                let fault = unsafe { msg.arg.pagefault };
                let flags = fault.flags;
                Event::PageFault {
                    address: fault.address,
                    write: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                    wp: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WP) != 0,
                    minor: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_MINOR) != 0,
                    // SAFETY: `feat` has one member, a u32, valid for any bits.
                    thread_id: unsafe { fault.feat.ptid },
                }
            }
            uapi::UFFD_EVENT_FORK => {
                // SAFETY: for a fork event the kernel fills `fork` (a u32).
                let fork = unsafe { msg.arg.fork };
                // SAFETY: the kernel installed this descriptor in our table for us to own.
                Event::Fork {
                    uffd: unsafe { OwnedFd::from_raw_fd(fork.ufd as i32) },
                }
            }
            uapi::UFFD_EVENT_REMAP => {
                // SAFETY: for a remap event the kernel fills `remap` (plain integers).
                let remap = unsafe { msg.arg.remap };
                Event::Remap {
                    from: remap.from,
                    to: remap.to,
                    len: remap.len,
                }
            }
            uapi::UFFD_EVENT_REMOVE => {
                // SAFETY: for a remove event the kernel fills `remove` (plain integers).
                let remove = unsafe { msg.arg.remove };
                Event::Remove {
                    start: remove.start,
                    end: remove.end,
                }
            }
            uapi::UFFD_EVENT_UNMAP => {
                // SAFETY: an unmap event uses the same `remove` member (plain integers).
                let remove = unsafe { msg.arg.remove };
                Event::Unmap {
                    start: remove.start,
                    end: remove.end,
                }
            }
            _ => Event::Unknown(event),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(event: u32) -> uapi::uffd_msg {
        // SAFETY: uffd_msg is plain data; all-zero is a valid value.
        let mut msg: uapi::uffd_msg = unsafe { std::mem::zeroed() };
        msg.event = event as u8;
        msg
    }

    #[test]
    fn decodes_a_write_fault_with_thread_id() {
        let mut m = msg(uapi::UFFD_EVENT_PAGEFAULT);
        m.arg.pagefault = uapi::uffd_msg__bindgen_ty_1__bindgen_ty_1 {
            flags: u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE),
            address: 0x7000_1000,
            feat: uapi::uffd_msg__bindgen_ty_1__bindgen_ty_1__bindgen_ty_1 { ptid: 42 },
        };
        // SAFETY: a page-fault message carries no descriptor.
        match unsafe { Event::from_msg(&m) } {
            Event::PageFault {
                address,
                write,
                wp,
                minor,
                thread_id,
            } => {
                assert_eq!(
                    (address, write, wp, minor, thread_id),
                    (0x7000_1000, true, false, false, 42)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decodes_remove_and_unknown() {
        let mut m = msg(uapi::UFFD_EVENT_REMOVE);
        m.arg.remove = uapi::uffd_msg__bindgen_ty_1__bindgen_ty_4 {
            start: 0x1000,
            end: 0x3000,
        };
        assert!(matches!(
            // SAFETY: a remove message carries no descriptor.
            unsafe { Event::from_msg(&m) },
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        ));
        // SAFETY: an unknown message is not decoded as a fork.
        assert!(matches!(
            unsafe { Event::from_msg(&msg(0x7f)) },
            Event::Unknown(0x7f)
        ));
    }
}
