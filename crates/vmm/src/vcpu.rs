//! A vCPU: its entry state, its run loop, and the micro-guest test device it owns.

use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, Msrs, KVM_EXIT_DIRTY_RING_FULL,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::long_mode::{long_mode_sregs, protected_mode_sregs};
use crate::boot::VcpuEntry;
use crate::control::{RunControl, StopReason};
use crate::devices::LegacyDevices;
use crate::memmap::{GuestAccess, MemoryMap};
use crate::state::{self, VcpuState};

/// MSR_IA32_MISC_ENABLE and its "fast string operations" bit, which Linux expects set.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// LAPIC local vector table registers for LINT0 and LINT1 (offsets in the register page).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;
/// Ring-full exits in a row with nothing to harvest before the ring is taken as overflowed.
const MAX_EMPTY_RING_EXITS: u32 = 3;
/// Pieces of one split access `save_state` completes before it gives up (KVM splits an access
/// at most into a few).
const MAX_PENDING_PIECES: usize = 16;
/// Test-device reports kept per vCPU (512 KiB of them); later ones are dropped.
const MAX_REPORTS: usize = 1 << 16;

/// Errors of one vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on the vCPU failed.
    #[error("vCPU {vcpu}: {what} failed")]
    Kvm {
        vcpu: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM could not execute a guest instruction (on emulating hosts: an unsupported one).
    #[error("vCPU {vcpu}: KVM internal error (suberror {suberror}) at rip {rip:#x}; on an instruction-emulating host this is usually an instruction the emulator cannot run (SSE, cmpxchg16b, xrstor): try --cpuid-mask emulator")]
    InternalError { vcpu: u8, suberror: u32, rip: u64 },
    /// The guest ran code from a frame tracked in access mode, which has no memslot.
    #[error("vCPU {vcpu}: the guest executed code from {gpa:#x}, a frame tracked in access mode: KVM cannot run code from outside its memslots (track code pages in write mode)")]
    ExecutesAccessTracked { vcpu: u8, gpa: u64 },
    /// VM entry failed.
    #[error("vCPU {vcpu}: VM entry failed (hardware reason {reason:#x})")]
    FailEntry { vcpu: u8, reason: u64 },
    /// The guest accessed its own RAM and KVM could not (the page could not be provided: a
    /// failed page source poisoned it). Never answered with made-up data.
    #[error(
        "vCPU {vcpu}: guest RAM at {gpa:#x} could not be accessed (its page could not be provided)"
    )]
    RamUnavailable { vcpu: u8, gpa: u64 },
    /// The host reported a memory error (a poisoned page) for guest RAM this vCPU touched
    /// (SIGBUS with BUS_MCEERR_AR during KVM_RUN, on hardware-virtualisation hosts).
    #[error("vCPU {vcpu}: guest RAM at {gpa:#x} is poisoned (the host reported a memory error there, or its page could not be provided)")]
    MemoryPoisoned { vcpu: u8, gpa: u64 },
    /// The host reported a memory error outside guest RAM during KVM_RUN.
    #[error(
        "vCPU {vcpu}: the host reported a memory error at host address {hva:#x}, outside guest RAM"
    )]
    HostMemoryError { vcpu: u8, hva: u64 },
    /// The vCPU's thread panicked (a bug in faultline).
    #[error("vCPU {vcpu}: its thread panicked: {message}")]
    Panicked { vcpu: u8, message: String },
    /// An exit faultline does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit { vcpu: u8, exit: String },
    /// This vCPU's dirty ring was full and could not be harvested.
    #[error("vCPU {vcpu}: its dirty ring is full and could not be harvested")]
    DirtyRing {
        vcpu: u8,
        #[source]
        source: crate::dirty::DirtyError,
    },
    /// Saved state that cannot be put back as it is.
    #[error("vCPU {vcpu}: invalid saved state: {what}")]
    BadState { vcpu: u8, what: &'static str },
    /// KVM refused one of the saved MSRs.
    #[error("vCPU {vcpu}: KVM refused saved MSR {msr:#x}")]
    MsrRejected { vcpu: u8, msr: u32 },
}

/// How one vCPU's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VcpuStop {
    /// A micro-guest wrote its exit code to the test device.
    Exited(u32),
    /// The VM was stopped (reset, shutdown, request) while this vCPU ran.
    Stopped,
    /// This vCPU triple-faulted.
    TripleFault,
}

/// What one vCPU did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VcpuOutcome {
    pub vcpu: u8,
    pub stop: VcpuStop,
    /// Values the micro-guest reported, in order.
    pub reports: Vec<u64>,
    /// Guest port accesses that no device claimed.
    pub unhandled_io: u64,
}

/// One vCPU.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// The MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST).
    msr_list: Arc<[u32]>,
    /// Whether KVM_RUN was ever entered (only then can I/O be pending).
    has_run: bool,
    /// Guest RAM as KVM maps it: accesses that exit inside RAM are completed through it.
    memory: Arc<MemoryMap>,
}

impl Vcpu {
    pub(crate) fn new(index: u8, fd: VcpuFd, msr_list: Arc<[u32]>, memory: Arc<MemoryMap>) -> Self {
        Vcpu {
            index,
            fd,
            msr_list,
            has_run: false,
            memory,
        }
    }

    /// Saves this vCPU's state. An I/O or MMIO exit is only complete once KVM_RUN is entered
    /// again, so a vCPU that has run first re-enters it with `immediate_exit` set: KVM finishes
    /// the pending operation and returns at once without running the guest. An access KVM
    /// split in pieces (one crossing into a second tracked page) exits again for the next
    /// piece, which is completed the same way until nothing is pending.
    pub fn save_state(&mut self) -> Result<VcpuState, VcpuError> {
        if self.has_run {
            let memory = Arc::clone(&self.memory);
            let index = self.index;
            for _ in 0..MAX_PENDING_PIECES {
                self.fd.set_kvm_immediate_exit(1);
                let fd = &mut self.fd;
                let result = crate::sigbus::in_kvm_run(|| {
                    fd.run().map(|exit| complete_mmio(&memory, index, exit))
                });
                self.fd.set_kvm_immediate_exit(0);
                if let Some(hva) = crate::sigbus::take_poisoned() {
                    return Err(VcpuError::HostMemoryError { vcpu: index, hva });
                }
                match result {
                    // Another piece was pending and is now done: see whether more are.
                    Ok(Some((_, true))) => continue,
                    Ok(Some((gpa, false))) => {
                        return Err(VcpuError::RamUnavailable { vcpu: index, gpa })
                    }
                    Ok(None) => break,
                    Err(e) if e.errno() == libc::EINTR => break,
                    Err(source) => {
                        return Err(VcpuError::Kvm {
                            vcpu: index,
                            what: "KVM_RUN (completing pending I/O)",
                            source,
                        })
                    }
                }
            }
        }
        state::save_vcpu(&self.fd, self.index, &self.msr_list)
    }

    /// Puts saved state back into this vCPU, which must not have run yet.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        if state.index != self.index {
            return Err(VcpuError::BadState {
                vcpu: self.index,
                what: "the state belongs to another vCPU",
            });
        }
        state::restore_vcpu(&self.fd, state)
    }

    /// This vCPU's index (and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU, for state queries.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let vcpu = self.index;
        move |source| VcpuError::Kvm { vcpu, what, source }
    }

    /// Sets the registers (and MP state) for `entry`.
    pub fn configure(&self, entry: &VcpuEntry) -> Result<(), VcpuError> {
        self.configure_lapic()?;
        let mut sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        let regs = match *entry {
            VcpuEntry::WaitForSipi => return Ok(()),
            VcpuEntry::LongMode {
                rip,
                rsp,
                rdi,
                rsi,
                rdx,
                rcx,
            } => {
                long_mode_sregs(&mut sregs);
                kvm_regs {
                    rip,
                    rsp,
                    rbp: rsp,
                    rdi,
                    rsi,
                    rdx,
                    rcx,
                    rflags: 0x2,
                    ..Default::default()
                }
            }
            VcpuEntry::Pvh { rip, rbx } => {
                protected_mode_sregs(&mut sregs);
                kvm_regs {
                    rip,
                    rbx,
                    rflags: 0x2,
                    ..Default::default()
                }
            }
        };
        self.fd
            .set_sregs(&sregs)
            .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs)
            .map_err(self.kvm_err("KVM_SET_REGS"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(self.kvm_err("KVM_SET_FPU"))?;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        }])
        .expect("one MSR fits");
        self.fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("KVM_SET_MSRS"))?;
        // Application processors start halted waiting for SIPI; ours start right away.
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(self.kvm_err("KVM_SET_MP_STATE"))
    }

    /// Routes LINT0 to ExtINT (the PIC) and LINT1 to NMI, as a PC BIOS leaves them.
    fn configure_lapic(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            // The register page is an array of C chars; each LVT entry is a little-endian u32
            // whose bits 8..11 are the delivery mode.
            let value = u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[offset + i] as u8));
            let value = (value & !0x700) | (mode << 8);
            for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
                lapic.regs[offset + i] = byte as _;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))
    }

    /// Reads MSRs; returns (index, value) for each one KVM returned.
    pub fn read_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("MSR list fits");
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.kvm_err("KVM_GET_MSRS"))?;
        Ok(msrs.as_slice()[..read]
            .iter()
            .map(|e| (e.index, e.data))
            .collect())
    }

    /// The CPUID table KVM holds for this vCPU.
    pub fn cpuid(&self) -> Result<kvm_bindings::CpuId, VcpuError> {
        self.fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kvm_err("KVM_GET_CPUID2"))
    }

    /// Runs until the guest exits through the test device, the VM is stopped, or an error.
    /// When the VM is paused, the vCPU saves its state, parks, and goes on when resumed.
    /// Accesses to guest RAM that exit (tracked frames) are completed through the memory map.
    pub fn run(
        &mut self,
        devices: &LegacyDevices,
        control: &RunControl,
    ) -> Result<VcpuOutcome, VcpuError> {
        let memory = Arc::clone(&self.memory);
        let ram = memory.ram();
        let gpa_of = |hva: u64| {
            ram.regions()
                .iter()
                .find(|r| hva >= r.host_addr() as u64 && hva - (r.host_addr() as u64) < r.size())
                .map(|r| r.gpa() + (hva - r.host_addr() as u64))
        };
        let mut outcome = VcpuOutcome {
            vcpu: self.index,
            stop: VcpuStop::Stopped,
            reports: Vec::new(),
            unhandled_io: 0,
        };
        let mut report_low: u32 = 0;
        let mut empty_ring_exits = 0;
        let index = self.index;
        loop {
            if control.should_stop() {
                return Ok(outcome);
            }
            if control.pause_requested() {
                let saved = self.save_state().map_err(|e| e.to_string());
                control.park(index, saved);
                continue;
            }
            self.has_run = true;
            let fd = &mut self.fd;
            let result = crate::sigbus::in_kvm_run(|| fd.run());
            if let Some(hva) = crate::sigbus::take_poisoned() {
                return Err(match gpa_of(hva) {
                    Some(gpa) => VcpuError::MemoryPoisoned { vcpu: index, gpa },
                    None => VcpuError::HostMemoryError { vcpu: index, hva },
                });
            }
            let exit = match result {
                Ok(exit) => exit,
                // A kick from the VMM (signal) or a transient condition: look at the stop flag
                // (and, under a throttle, sleep first).
                Err(e) if e.errno() == libc::EINTR => {
                    control.throttle_pause();
                    continue;
                }
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(source) => {
                    return Err(VcpuError::Kvm {
                        vcpu: index,
                        what: "KVM_RUN",
                        source,
                    })
                }
            };
            // Only ring-full exits in a row, with nothing harvested, mean an overflow.
            if !matches!(exit, VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) {
                empty_ring_exits = 0;
            }
            match exit {
                VcpuExit::IoOut(port, data) => match port {
                    guests::ports::STARTED => control.mark_started(),
                    guests::ports::REPORT_LO => report_low = le_u32(data),
                    // Kept up to a bound: a guest looping on the port cannot grow the VMM.
                    guests::ports::REPORT_HI if outcome.reports.len() < MAX_REPORTS => {
                        outcome
                            .reports
                            .push((u64::from(le_u32(data)) << 32) | u64::from(report_low));
                    }
                    guests::ports::REPORT_HI => {}
                    guests::ports::EXIT => {
                        outcome.stop = VcpuStop::Exited(le_u32(data));
                        control.mark_exit();
                        return Ok(outcome);
                    }
                    guests::ports::HOLD => {
                        let point = le_u32(data);
                        if control.holds_at(point) {
                            control.hold(index, point, || {
                                self.save_state().map_err(|e| e.to_string())
                            });
                        }
                    }
                    _ => {
                        if !devices.io_out(port, data) {
                            outcome.unhandled_io += 1;
                        }
                    }
                },
                VcpuExit::IoIn(port, data) => {
                    if !devices.io_in(port, data) {
                        data.fill(0xff);
                        outcome.unhandled_io += 1;
                    }
                }
                // See `complete_mmio`. An access inside RAM that cannot be completed could not
                // be for KVM either (its page could not be provided).
                exit @ (VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => {
                    if let Some((gpa, false)) = complete_mmio(&memory, index, exit) {
                        return Err(VcpuError::RamUnavailable { vcpu: index, gpa });
                    }
                }
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    let harvested =
                        memory
                            .harvest_rings()
                            .map_err(|source| VcpuError::DirtyRing {
                                vcpu: index,
                                source,
                            })?;
                    // Another thread may have harvested just before (then the next entry goes
                    // on); a ring that stays "full" with nothing in it has overflowed.
                    empty_ring_exits = if harvested == 0 {
                        empty_ring_exits + 1
                    } else {
                        0
                    };
                    if empty_ring_exits >= MAX_EMPTY_RING_EXITS {
                        return Err(VcpuError::DirtyRing {
                            vcpu: index,
                            source: crate::dirty::DirtyError::RingOverflow { vcpu: index },
                        });
                    }
                }
                VcpuExit::Intr => {}
                VcpuExit::Hlt => {
                    control.request_stop(StopReason::Requested);
                    return Ok(outcome);
                }
                VcpuExit::Shutdown => {
                    control.request_stop(StopReason::TripleFault { vcpu: index });
                    outcome.stop = VcpuStop::TripleFault;
                    return Ok(outcome);
                }
                VcpuExit::SystemEvent(kind, _) => {
                    control.request_stop(StopReason::SystemEvent(kind));
                    return Ok(outcome);
                }
                VcpuExit::InternalError => {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled
                    // the `internal` member of the union.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    // KVM cannot fetch instructions from outside memslots, and an access-tracked
                    // frame has none.
                    let code = self.fd.translate_gva(rip).ok().filter(|t| t.valid != 0);
                    if let Some(gpa) = code.map(|t| t.physical_address) {
                        if memory.tracked_mode(gpa) == Some(crate::tracking::TrackMode::Access) {
                            return Err(VcpuError::ExecutesAccessTracked { vcpu: index, gpa });
                        }
                    }
                    return Err(VcpuError::InternalError {
                        vcpu: index,
                        suberror,
                        rip,
                    });
                }
                VcpuExit::FailEntry(reason, _) => {
                    return Err(VcpuError::FailEntry {
                        vcpu: index,
                        reason,
                    })
                }
                other => {
                    return Err(VcpuError::UnexpectedExit {
                        vcpu: index,
                        exit: format!("{other:?}"),
                    })
                }
            }
        }
    }
}

/// Completes an MMIO exit (in the run loop, and in `save_state` for the next piece of a split
/// access): `(gpa, whether it could be completed)`, or `None` for any other exit. An "MMIO"
/// access inside RAM is to a tracked frame (or one whose memslot is being replaced), which
/// faultline completes; elsewhere there are no MMIO devices yet: reads see all-ones, writes
/// are dropped.
fn complete_mmio(memory: &MemoryMap, vcpu: u8, exit: VcpuExit<'_>) -> Option<(u64, bool)> {
    let in_ram = |gpa: u64| memory.ram().host_range(gpa, 1).is_some();
    match exit {
        VcpuExit::MmioRead(gpa, data) if in_ram(gpa) => Some((
            gpa,
            memory.complete_access(vcpu, gpa, GuestAccess::Read(data)),
        )),
        VcpuExit::MmioWrite(gpa, data) if in_ram(gpa) => Some((
            gpa,
            memory.complete_access(vcpu, gpa, GuestAccess::Write(data)),
        )),
        VcpuExit::MmioRead(gpa, data) => {
            data.fill(0xff);
            Some((gpa, true))
        }
        VcpuExit::MmioWrite(gpa, _) => Some((gpa, true)),
        _ => None,
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::le_u32;

    #[test]
    fn port_data_is_little_endian() {
        assert_eq!(le_u32(&[0x78, 0x56, 0x34, 0x12]), 0x1234_5678);
        assert_eq!(le_u32(&[0xff]), 0xff);
    }
}
