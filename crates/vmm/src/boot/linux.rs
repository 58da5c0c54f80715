//! Booting Linux: an uncompressed ELF `vmlinux` through its PVH entry (or its 64-bit entry when
//! it has none), or a `bzImage` through the 64-bit boot protocol; an optional initramfs; the
//! command line; an E820 map; an MP table for SMP (no ACPI).
//!
//! References: Documentation/arch/x86/boot.rst (zero page, 64-bit entry) and Xen's PVH
//! description (hvm_start_info, 32-bit entry with ebx pointing at it).

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use super::long_mode::{write_gdt, write_identity_map};
use super::{mptable, BootError, VcpuEntry};
use crate::memory::{GuestRam, MMIO_GAP_END, PAGE_SIZE};

/// E820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type: reserved.
pub const E820_RESERVED: u32 = 2;
/// Smallest guest we try to boot Linux in.
pub const MIN_LINUX_RAM: u64 = 32 << 20;
/// The boot protocol's "loader type": undefined loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// "HdrS": the setup header's magic.
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// hvm_start_info magic ("xEn3" with the top bit cleared).
const PVH_MAGIC: u32 = 0x336e_c578;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// loadflags bit: the kernel is loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 1;
/// loadflags bit: the loader can use the heap.
const CAN_USE_HEAP: u8 = 0x80;

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxBootConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Which protocol the kernel was booted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH entry of an ELF vmlinux.
    Pvh,
    /// 64-bit boot protocol (bzImage, or an ELF without a PVH note).
    Linux64,
}

/// The result of loading: the protocol and each vCPU's entry.
#[derive(Debug, Clone)]
pub struct LoadedLinux {
    pub protocol: BootProtocol,
    pub entries: Vec<VcpuEntry>,
}

/// The E820 map of `ram`: base memory up to the MP table, the kernel area and everything above
/// 1 MiB below the MMIO gap, and high RAM.
pub fn e820_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, MPTABLE_ADDR, E820_RAM),
        (MPTABLE_ADDR, BASE_MEMORY_END - MPTABLE_ADDR, E820_RESERVED),
        (BIOS_AREA.0, BIOS_AREA.1 - BIOS_AREA.0, E820_RESERVED),
        (
            HIGH_MEMORY_START,
            ram.low_size() - HIGH_MEMORY_START,
            E820_RAM,
        ),
    ];
    if let Some(high) = ram.regions().get(1) {
        debug_assert_eq!(high.gpa(), MMIO_GAP_END);
        map.push((high.gpa(), high.size(), E820_RAM));
    }
    map
}

fn read_file(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::ReadFile {
        what,
        path: path.into(),
        source,
    })
}

/// Loads the kernel image, trying ELF first and bzImage second.
fn load_kernel(ram: &GuestRam, path: &Path) -> Result<KernelLoaderResult, BootError> {
    let mut file = read_file("kernel", path)?;
    let start = Some(GuestAddress(HIGH_MEMORY_START));
    match Elf::load(ram.memory(), None, &mut file, start) {
        Ok(result) => Ok(result),
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => BzImage::load(ram.memory(), None, &mut file, start).map_err(|source| {
            BootError::NotAKernel {
                path: path.into(),
                source,
            }
        }),
        Err(source) => Err(BootError::NotAKernel {
            path: path.into(),
            source,
        }),
    }
}

/// Loads the initramfs as high as it may go below `limit`, above `kernel_end`.
fn load_initrd(
    ram: &GuestRam,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadFile {
        what: "initramfs",
        path: path.into(),
        source,
    })?;
    let size = data.len() as u64;
    let top = ram.low_size().min(limit);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel_end);
    let addr = addr.ok_or_else(|| BootError::TooSmall {
        what: format!(
            "the initramfs {} ({size} bytes) above the kernel",
            path.display()
        ),
        needed: kernel_end + size,
        available: top,
    })?;
    ram.memory()
        .write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::Write("initramfs", e))?;
    Ok((addr, size))
}

fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline(format!(
            "it must be at most {CMDLINE_MAX} bytes without NUL characters"
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    ram.memory()
        .write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::Write("command line", e))
}

/// The zero page for the 64-bit boot protocol.
pub fn build_boot_params(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    e820: &[(u64, u64, u32)],
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(header) = header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = SETUP_HEADER_MAGIC;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x100_0000;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    params
}

/// Writes the PVH start info, its memory map and its module list at [`PVH_INFO_ADDR`].
fn write_pvh_info(
    ram: &GuestRam,
    initrd: Option<(u64, u64)>,
    e820: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let mem = ram.memory();
    let info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr = PVH_INFO_ADDR + info_size;
    let memmap_addr = modlist_addr + std::mem::size_of::<hvm_modlist_entry>() as u64;
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: memmap_addr,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(|e| BootError::Write("PVH module list", e))?;
    }
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        };
        let at = memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|e| BootError::Write("PVH memory map", e))?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(|e| BootError::Write("PVH start info", e))
}

/// Loads a Linux kernel (and initramfs) into `ram` for `vcpus` vCPUs.
pub fn load(ram: &GuestRam, config: &LinuxBootConfig, vcpus: u8) -> Result<LoadedLinux, BootError> {
    if ram.size() < MIN_LINUX_RAM {
        return Err(BootError::TooSmall {
            what: "a Linux guest".into(),
            needed: MIN_LINUX_RAM,
            available: ram.size(),
        });
    }
    const MAX_CPUS: u64 = 32;
    if u64::from(vcpus) > MAX_CPUS {
        return Err(BootError::TooManyVcpus(vcpus, MAX_CPUS));
    }
    let kernel = load_kernel(ram, &config.kernel)?;
    write_cmdline(ram, &config.cmdline)?;
    let mem = ram.memory();
    let mp = mptable::build(MPTABLE_ADDR as u32, vcpus);
    mem.write_slice(&mp, GuestAddress(MPTABLE_ADDR))
        .map_err(|e| BootError::Write("MP table", e))?;
    write_gdt(mem)?;

    let initrd_limit = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .filter(|limit| *limit > 1)
        .unwrap_or(0x8000_0000);
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| load_initrd(ram, path, kernel.kernel_end, initrd_limit))
        .transpose()?;
    let e820 = e820_map(ram);
    let aps = (1..vcpus).map(|_| VcpuEntry::WaitForSipi);

    if let PvhBootCapability::PvhEntryPresent(entry) = kernel.pvh_boot_cap {
        write_pvh_info(ram, initrd, &e820)?;
        let bsp = VcpuEntry::Pvh {
            rip: entry.0,
            rbx: PVH_INFO_ADDR,
        };
        return Ok(LoadedLinux {
            protocol: BootProtocol::Pvh,
            entries: std::iter::once(bsp).chain(aps).collect(),
        });
    }

    write_identity_map(mem, LINUX_PDS)?;
    let params = build_boot_params(kernel.setup_header, config.cmdline.len(), initrd, &e820);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| BootError::Write("zero page", e))?;
    let rip = match kernel.setup_header {
        Some(_) => kernel.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        None => kernel.kernel_load.0,
    };
    let bsp = VcpuEntry::LongMode {
        rip,
        rsp: 0,
        rdi: 0,
        rsi: ZERO_PAGE_ADDR,
        rdx: 0,
        rcx: 0,
    };
    Ok(LoadedLinux {
        protocol: BootProtocol::Linux64,
        entries: std::iter::once(bsp).chain(aps).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_firmware_areas() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let map = e820_map(&ram);
        let usable: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(usable, MPTABLE_ADDR + (64 << 20) - HIGH_MEMORY_START);
        assert!(map.contains(&(MPTABLE_ADDR, BASE_MEMORY_END - MPTABLE_ADDR, E820_RESERVED)));
        // Sorted and non-overlapping.
        for pair in map.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0);
        }
    }

    #[test]
    fn e820_includes_high_ram() {
        let ram = GuestRam::new((3 << 30) + (16 << 20)).unwrap();
        let map = e820_map(&ram);
        assert_eq!(*map.last().unwrap(), (MMIO_GAP_END, 16 << 20, E820_RAM));
    }

    #[test]
    fn zero_page_follows_the_boot_protocol() {
        let e820 = [(0, 0x9fc00, E820_RAM), (0x10_0000, 0x100_0000, E820_RAM)];
        let params = build_boot_params(None, 42, Some((0x200_0000, 0x1234)), &e820);
        // Copy the packed fields out before comparing them.
        let (flag, header, loader) = (
            params.hdr.boot_flag,
            params.hdr.header,
            params.hdr.type_of_loader,
        );
        assert_eq!((flag, header, loader), (0xaa55, 0x5372_6448, 0xff));
        let (cmdline, cmdline_size) = (params.hdr.cmd_line_ptr, params.hdr.cmdline_size);
        assert_eq!((cmdline, cmdline_size), (CMDLINE_ADDR as u32, 42));
        let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
        assert_eq!((image, size), (0x200_0000, 0x1234));
        assert_eq!(params.e820_entries, 2);
        let second = params.e820_table[1];
        let (addr, len, kind) = (second.addr, second.size, second.r#type);
        assert_eq!((addr, len, kind), (0x10_0000, 0x100_0000, E820_RAM));
        assert_ne!(params.hdr.loadflags & LOADED_HIGH, 0);
    }

    #[test]
    fn zero_page_is_at_the_documented_offsets() {
        // boot.rst: setup header at 0x1f1, e820_entries at 0x1e8, e820_table at 0x2d0.
        let params = boot_params::default();
        let base = &params as *const _ as usize;
        assert_eq!(&params.hdr as *const _ as usize - base, 0x1f1);
        assert_eq!(&params.e820_entries as *const _ as usize - base, 0x1e8);
        assert_eq!(&params.e820_table as *const _ as usize - base, 0x2d0);
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
    }

    #[test]
    fn pvh_start_info_and_memory_map() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let e820 = e820_map(&ram);
        write_pvh_info(&ram, Some((0x300_0000, 0x5000)), &e820).unwrap();
        let info: hvm_start_info = ram.memory().read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, PVH_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(info.memmap_entries as usize, e820.len());
        let module: hvm_modlist_entry = ram
            .memory()
            .read_obj(GuestAddress(info.modlist_paddr))
            .unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x5000));
        let last: hvm_memmap_table_entry = ram
            .memory()
            .read_obj(GuestAddress(
                info.memmap_paddr + 24 * (e820.len() as u64 - 1),
            ))
            .unwrap();
        assert_eq!((last.addr, last.type_), (HIGH_MEMORY_START, E820_RAM));
    }

    #[test]
    fn rejects_missing_and_bogus_kernels() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let missing = LinuxBootConfig {
            kernel: "/nonexistent/vmlinux".into(),
            initrd: None,
            cmdline: String::new(),
        };
        assert!(matches!(
            load(&ram, &missing, 1),
            Err(BootError::ReadFile { .. })
        ));
        let dir =
            std::env::temp_dir().join(format!("faultline-bogus-kernel-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5a; 8192]).unwrap();
        let bogus = LinuxBootConfig {
            kernel: dir.clone(),
            initrd: None,
            cmdline: String::new(),
        };
        let err = load(&ram, &bogus, 1).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
    }

    #[test]
    fn rejects_an_oversized_command_line() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert!(matches!(
            write_cmdline(&ram, &"x".repeat(CMDLINE_MAX + 1)),
            Err(BootError::Cmdline(_))
        ));
        write_cmdline(&ram, "console=ttyS0").unwrap();
    }
}
