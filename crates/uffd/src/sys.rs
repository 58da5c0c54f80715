//! The userfaultfd ioctl numbers and the mode bits that linux-raw-sys does not carry.
//! Numbers are computed the way the kernel's `_IOWR` / `_IOR` / `_IO` macros compute them.

use linux_raw_sys::general as uapi;
use rustix::ioctl::opcode;

const UFFDIO: u8 = uapi::UFFDIO as u8;

pub const UFFDIO_API: u32 =
    opcode::read_write::<uapi::uffdio_api>(UFFDIO, uapi::_UFFDIO_API as u8) as u32;
pub const UFFDIO_REGISTER: u32 =
    opcode::read_write::<uapi::uffdio_register>(UFFDIO, uapi::_UFFDIO_REGISTER as u8) as u32;
pub const UFFDIO_UNREGISTER: u32 =
    opcode::read::<uapi::uffdio_range>(UFFDIO, uapi::_UFFDIO_UNREGISTER as u8) as u32;
pub const UFFDIO_WAKE: u32 =
    opcode::read::<uapi::uffdio_range>(UFFDIO, uapi::_UFFDIO_WAKE as u8) as u32;
pub const UFFDIO_COPY: u32 =
    opcode::read_write::<uapi::uffdio_copy>(UFFDIO, uapi::_UFFDIO_COPY as u8) as u32;
pub const UFFDIO_ZEROPAGE: u32 =
    opcode::read_write::<uapi::uffdio_zeropage>(UFFDIO, uapi::_UFFDIO_ZEROPAGE as u8) as u32;
pub const UFFDIO_MOVE: u32 =
    opcode::read_write::<uapi::uffdio_move>(UFFDIO, uapi::_UFFDIO_MOVE as u8) as u32;
pub const UFFDIO_WRITEPROTECT: u32 =
    opcode::read_write::<uapi::uffdio_writeprotect>(UFFDIO, uapi::_UFFDIO_WRITEPROTECT as u8)
        as u32;
pub const UFFDIO_CONTINUE: u32 =
    opcode::read_write::<uapi::uffdio_continue>(UFFDIO, uapi::_UFFDIO_CONTINUE as u8) as u32;
pub const UFFDIO_POISON: u32 =
    opcode::read_write::<uapi::uffdio_poison>(UFFDIO, uapi::_UFFDIO_POISON as u8) as u32;
/// `/dev/userfaultfd`'s only ioctl: make a new userfaultfd (argument: O_CLOEXEC | O_NONBLOCK).
pub const USERFAULTFD_IOC_NEW: u32 = opcode::none(uapi::USERFAULTFD_IOC as u8, 0) as u32;

// Mode bits (include/uapi/linux/userfaultfd.h) missing from linux-raw-sys.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::ioctl as known;

    #[test]
    fn computed_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, known::UFFDIO_API);
        assert_eq!(UFFDIO_REGISTER, known::UFFDIO_REGISTER);
        assert_eq!(UFFDIO_UNREGISTER, known::UFFDIO_UNREGISTER);
        assert_eq!(UFFDIO_WAKE, known::UFFDIO_WAKE);
        assert_eq!(UFFDIO_COPY, known::UFFDIO_COPY);
        assert_eq!(UFFDIO_ZEROPAGE, known::UFFDIO_ZEROPAGE);
        assert_eq!(UFFDIO_WRITEPROTECT, known::UFFDIO_WRITEPROTECT);
        assert_eq!(UFFDIO_CONTINUE, known::UFFDIO_CONTINUE);
        // From include/uapi/linux/userfaultfd.h on x86-64.
        assert_eq!(UFFDIO_MOVE, 0xc028_aa05);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }
}
