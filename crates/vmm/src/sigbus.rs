//! Memory errors reported to vCPU threads as SIGBUS.
//!
//! On a hardware-virtualisation host, when a guest access hits a page the host has poisoned
//! (a memory error, or a page that userfaultfd answered with UFFDIO_POISON), KVM sends SIGBUS
//! with `si_code` BUS_MCEERR_AR and the host address to the vCPU thread and leaves KVM_RUN
//! with EINTR. Without a handler the default action kills the whole VMM. The handler here
//! records the address for the vCPU loop, which stops the VM with an error naming the guest
//! address. (On instruction-emulating hosts the same access comes back as an MMIO exit inside
//! RAM instead; see `vcpu.rs`.)
//!
//! A SIGBUS that is not KVM's report during KVM_RUN is a real crash of the VMM's own code
//! (a memory error, a file mapping that shrank, or a touch of guest RAM that a userfaultfd
//! registered with UFFD_FEATURE_SIGBUS does not have yet, as during a migration's first pass):
//! it is reported on stderr and the process exits with status 1 rather than by the signal.

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    /// Set while this thread is inside KVM_RUN.
    static IN_KVM_RUN: Cell<bool> = const { Cell::new(false) };
    /// The host address of the last memory error reported to this thread during KVM_RUN
    /// (0: none).
    static POISONED: Cell<u64> = const { Cell::new(0) };
}

/// Installs the process-wide SIGBUS handler (once; a failure is reported to every caller).
pub fn install() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler below only touches
        // thread-local cells with constant initialisers and async-signal-safe calls.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

/// Runs `f` (a KVM_RUN) with this thread marked as inside KVM_RUN.
pub(crate) fn in_kvm_run<T>(f: impl FnOnce() -> T) -> T {
    IN_KVM_RUN.with(|flag| flag.set(true));
    let result = f();
    IN_KVM_RUN.with(|flag| flag.set(false));
    result
}

/// The host address of a memory error reported to this thread since the last call.
pub(crate) fn take_poisoned() -> Option<u64> {
    let address = POISONED.with(|cell| cell.replace(0));
    (address != 0).then_some(address)
}

extern "C" fn handler(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; `si_addr` is
    // meaningful for SIGBUS.
    let (code, address) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
    let ours = code == libc::BUS_MCEERR_AR && IN_KVM_RUN.with(Cell::get);
    if ours {
        // KVM_RUN returns EINTR once this handler returns; the vCPU loop reads the address.
        POISONED.with(|cell| cell.set(address.max(1)));
        return;
    }
    let message = b"faultline: fatal: SIGBUS outside guest execution (a memory error, a file mapping that shrank, or a page a userfaultfd does not have yet); exiting\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is a static string.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends this thread SIGBUS with `code` and `address`, as the kernel would report a memory
    /// error (a thread may send itself a kernel-style si_code; no other thread may, which is
    /// why KVM's own report cannot be forged for a vCPU from outside it).
    fn raise_sigbus(code: libc::c_int, address: u64) {
        // SAFETY: a zeroed siginfo is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        info.si_signo = libc::SIGBUS;
        info.si_code = code;
        // SAFETY: `info` is a live siginfo_t, and on x86-64 a SIGBUS siginfo's si_addr is
        // the 8 bytes at offset 16.
        unsafe { *((&mut info as *mut libc::siginfo_t as *mut u8).add(16) as *mut u64) = address };
        // SAFETY: sends a signal to this very thread with a valid siginfo.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_rt_tgsigqueueinfo,
                libc::getpid(),
                libc::gettid(),
                libc::SIGBUS,
                &info as *const libc::siginfo_t,
            )
        };
        assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_memory_error_during_kvm_run_is_recorded_for_the_vcpu_loop() {
        install().unwrap();
        std::thread::spawn(|| {
            assert_eq!(take_poisoned(), None);
            // Delivered before the system call returns: inside "KVM_RUN" as far as the
            // handler can tell, which is where KVM's report arrives.
            in_kvm_run(|| raise_sigbus(libc::BUS_MCEERR_AR, 0x7f00_1234_5000));
            assert_eq!(take_poisoned(), Some(0x7f00_1234_5000));
            assert_eq!(take_poisoned(), None, "taken once");
        })
        .join()
        .unwrap();
    }
}
