//! Putting a guest into memory and describing where each vCPU starts.

pub mod layout;
pub mod linux;
pub mod long_mode;
pub mod micro;
pub mod mptable;

/// How a vCPU enters the guest. Applied by [`crate::vcpu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEntry {
    /// 64-bit long mode with faultline's identity map: micro-guests and the Linux 64-bit boot
    /// protocol. The general registers are set as given; everything else is zero.
    LongMode {
        rip: u64,
        rsp: u64,
        rdi: u64,
        rsi: u64,
        rdx: u64,
        rcx: u64,
    },
    /// 32-bit protected mode without paging, `ebx` = start info: the PVH boot protocol.
    Pvh { rip: u64, rbx: u64 },
    /// An application processor that waits for INIT/SIPI from the boot processor (Linux SMP).
    WaitForSipi,
}

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    /// The guest does not fit.
    #[error("{what} needs {needed} bytes of guest RAM but the guest has {available}")]
    TooSmall {
        what: String,
        needed: u64,
        available: u64,
    },
    /// Too many vCPUs for the boot structures.
    #[error("{0} vCPUs requested; this boot path supports at most {1}")]
    TooManyVcpus(u8, u64),
    /// The kernel image could not be opened or read.
    #[error("cannot read {what} {path}")]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// linux-loader rejected the kernel image.
    #[error("{path} is not a bootable kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel {
        path: std::path::PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line is too long or has a bad character.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
}
