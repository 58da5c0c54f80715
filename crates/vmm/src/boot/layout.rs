//! Where faultline puts boot structures in guest-physical memory (below 2 MiB).
//!
//! ```text
//! 0x0000_0500  GDT (5 entries), then an empty IDT
//! 0x0000_1000  PML4
//! 0x0000_2000  PDPT
//! 0x0000_3000  page directories, one per GiB mapped (2 MiB pages)
//! 0x0000_7000  Linux zero page (boot_params), 64-bit boot protocol
//! 0x0000_8000  PVH hvm_start_info + memory map + module list (PVH boot; no paging then)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (last KiB of base memory, where Linux scans for it)
//! 0x0010_0000  micro-guest code, or the Linux kernel
//! 0x0020_0000  micro-guest work range starts here and runs to the end of RAM
//! ```

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the (empty) IDT.
pub const IDT_ADDR: u64 = 0x540;
/// Level-4 page table.
pub const PML4_ADDR: u64 = 0x1000;
/// Level-3 page table.
pub const PDPT_ADDR: u64 = 0x2000;
/// First page directory.
pub const PD_ADDR: u64 = 0x3000;
/// Page directories a micro-guest may use: it can address up to this many GiB.
pub const MICRO_MAX_PDS: u64 = 64;
/// Page directories the Linux 64-bit boot maps: the first 4 GiB.
pub const LINUX_PDS: u64 = 4;
/// PVH start info.
pub const PVH_INFO_ADDR: u64 = 0x8000;
/// Linux zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line we accept (bytes, without the NUL).
pub const CMDLINE_MAX: usize = 0x1_0000 - 1;
/// MP floating pointer and configuration table.
pub const MPTABLE_ADDR: u64 = 0x9_fc00;
/// End of base memory (the EBDA/VGA hole starts here).
pub const BASE_MEMORY_END: u64 = 0xa_0000;
/// The legacy BIOS area that E820 reports as reserved.
pub const BIOS_AREA: (u64, u64) = (0xf_0000, 0x10_0000);
/// Where kernels and micro-guest code are loaded.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// First byte of a micro-guest's work range: everything below is its boot area.
pub const BOOT_AREA_END: u64 = 0x20_0000;
/// Top of vCPU 0's micro-guest stack; vCPU n's is `MICRO_STACK_SIZE * n` lower.
pub const MICRO_STACK_TOP: u64 = 0x9_f000;
/// Stack bytes per vCPU for micro-guests.
pub const MICRO_STACK_SIZE: u64 = 0x2000;
/// Page directories must end below the lowest micro-guest stack.
pub const MICRO_MAX_VCPUS: u64 = 16;

const _: () = assert!(
    PD_ADDR + MICRO_MAX_PDS * 0x1000 <= MICRO_STACK_TOP - MICRO_MAX_VCPUS * MICRO_STACK_SIZE
);
const _: () = assert!(
    PD_ADDR + LINUX_PDS * 0x1000 <= ZERO_PAGE_ADDR && ZERO_PAGE_ADDR + 0x1000 <= PVH_INFO_ADDR
);
