//! Everything KVM holds for a VM and its vCPUs, as plain serializable values: what a snapshot
//! saves and a restore puts back. Capturing and restoring live here, beside the types, so that
//! the order KVM requires is written down in one place.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::vcpu::VcpuError;

/// The async-PF MSRs a guest programs (saved like every other MSR KVM lists; named here because
/// losing them silently breaks a guest that uses async page faults).
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
/// kvmclock's system-time MSR.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// One vCPU's architectural state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy FPU image (`kvm_fpu` has no serde form; its bytes are stored as KVM lays them
    /// out). XSAVE below supersedes it where the host has XSAVE.
    pub fpu: Vec<u8>,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
    /// Set when the vCPU had finished its run (a micro-guest that exited) when the state was
    /// saved: how it ended. A restored VM does not run such a vCPU again (it would only halt
    /// with interrupts off), it reports this outcome for it. (`default`: for states of a
    /// self-describing format written before the field; postcard always writes it.)
    #[serde(default)]
    pub finished: Option<crate::vcpu::VcpuOutcome>,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            index: self.index,
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            regs: self.regs,
            sregs: self.sregs,
            fpu: self.fpu.clone(),
            // kvm_xsave is plain data without a Clone impl (a 4 KiB array of integers).
            xsave: self.xsave.as_ref().map(|x| kvm_xsave {
                region: x.region,
                extra: Default::default(),
            }),
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            mp_state: self.mp_state,
            events: self.events,
            tsc_khz: self.tsc_khz,
            finished: self.finished.clone(),
        }
    }
}

impl VcpuState {
    /// The value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

/// VM-wide state: the in-kernel interrupt controllers, the PIT and the clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The 16550's registers and pending input.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The devices' state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialState,
}

fn kvm_err(vcpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { vcpu, what, source }
}

fn fpu_bytes(fpu: &kvm_fpu) -> Vec<u8> {
    let size = std::mem::size_of::<kvm_fpu>();
    // SAFETY: kvm_fpu is a plain C struct of integers and byte arrays; viewing its `size`
    // bytes is always valid.
    unsafe { std::slice::from_raw_parts((fpu as *const kvm_fpu).cast::<u8>(), size) }.to_vec()
}

fn fpu_from_bytes(bytes: &[u8]) -> Option<kvm_fpu> {
    if bytes.len() != std::mem::size_of::<kvm_fpu>() {
        return None;
    }
    let mut fpu = kvm_fpu::default();
    // SAFETY: the lengths match and every bit pattern is a valid kvm_fpu (integers and byte
    // arrays only).
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut fpu as *mut kvm_fpu).cast::<u8>(),
            bytes.len(),
        )
    };
    Some(fpu)
}

/// Reads every MSR of `list` that KVM will give. KVM_GET_MSRS stops at the first MSR it cannot
/// read; that one is skipped and the read goes on from the next.
fn read_msrs(fd: &VcpuFd, index: u8, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let entries: Vec<_> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("the MSR index list fits");
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err(index, "KVM_GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(saved)
}

/// Captures a vCPU's state. The caller makes sure the vCPU is not in KVM_RUN and has completed
/// any pending I/O (see [`crate::vcpu::Vcpu::save_state`]).
pub(crate) fn save_vcpu(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState, VcpuError> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(index, "KVM_GET_CPUID2"))?;
    Ok(VcpuState {
        index,
        cpuid: cpuid.as_slice().to_vec(),
        msrs: read_msrs(fd, index, msr_list)?,
        regs: fd.get_regs().map_err(kvm_err(index, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm_err(index, "KVM_GET_SREGS"))?,
        fpu: fpu_bytes(&fd.get_fpu().map_err(kvm_err(index, "KVM_GET_FPU"))?),
        xsave: fd.get_xsave().ok(),
        xcrs: fd.get_xcrs().ok(),
        debugregs: fd
            .get_debug_regs()
            .map_err(kvm_err(index, "KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?,
        mp_state: fd
            .get_mp_state()
            .map_err(kvm_err(index, "KVM_GET_MP_STATE"))?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm_err(index, "KVM_GET_VCPU_EVENTS"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
        finished: None,
    })
}

/// Puts `state` into a vCPU that has not run since it was created, in the order KVM needs:
/// CPUID first (MSR checks look at it), then the TSC frequency (KVM turns a written TSC into
/// an offset at the frequency in force, and does not redo it when the frequency changes), the
/// LAPIC before the MSRs (the TSC deadline MSR is only taken in TSC-deadline mode), vCPU
/// events last.
pub(crate) fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuError> {
    let index = state.index;
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::BadState {
        vcpu: index,
        what: "CPUID table too large",
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(kvm_err(index, "KVM_SET_CPUID2"))?;
    if let (Some(khz), Ok(current)) = (state.tsc_khz, fd.get_tsc_khz()) {
        if khz != current {
            fd.set_tsc_khz(khz)
                .map_err(kvm_err(index, "KVM_SET_TSC_KHZ"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm_err(index, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(kvm_err(index, "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm_err(index, "KVM_SET_SREGS"))?;
    let fpu = fpu_from_bytes(&state.fpu).ok_or(VcpuError::BadState {
        vcpu: index,
        what: "FPU image of the wrong size",
    })?;
    fd.set_fpu(&fpu).map_err(kvm_err(index, "KVM_SET_FPU"))?;
    if let Some(xsave) = &state.xsave {
        // SAFETY: a 4 KiB kvm_xsave from KVM_GET_XSAVE; faultline enables no dynamically sized
        // XSAVE features (AMX), so KVM expects no larger KVM_SET_XSAVE2 buffer.
        unsafe { fd.set_xsave(xsave) }.map_err(kvm_err(index, "KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(kvm_err(index, "KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm_err(index, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm_err(index, "KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::BadState {
        vcpu: index,
        what: "MSR list too large",
    })?;
    let written = fd.set_msrs(&msrs).map_err(kvm_err(index, "KVM_SET_MSRS"))?;
    if written != state.msrs.len() {
        return Err(VcpuError::MsrRejected {
            vcpu: index,
            msr: state.msrs[written].index,
        });
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm_err(index, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, kvm_ioctls::Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)?;
    Ok(chip)
}

/// Captures the VM-wide state (vCPUs should be paused, so the irqchips do not move under it).
pub(crate) fn save_vm(fd: &VmFd) -> Result<VmState, (&'static str, kvm_ioctls::Error)> {
    Ok(VmState {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER).map_err(|e| ("KVM_GET_IRQCHIP", e))?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE).map_err(|e| ("KVM_GET_IRQCHIP", e))?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC).map_err(|e| ("KVM_GET_IRQCHIP", e))?,
        pit: fd.get_pit2().map_err(|e| ("KVM_GET_PIT2", e))?,
        clock: fd.get_clock().map_err(|e| ("KVM_GET_CLOCK", e))?,
    })
}

/// Restores the VM-wide state into a VM whose vCPUs have not run.
pub(crate) fn restore_vm(
    fd: &VmFd,
    state: &VmState,
) -> Result<(), (&'static str, kvm_ioctls::Error)> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        fd.set_irqchip(chip).map_err(|e| ("KVM_SET_IRQCHIP", e))?;
    }
    fd.set_pit2(&state.pit).map_err(|e| ("KVM_SET_PIT2", e))?;
    // The guest clock resumes where it was saved: the flags describe the old host's clock.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(|e| ("KVM_SET_CLOCK", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_bytes_round_trip() {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0x1234_5678,
            ..Default::default()
        };
        let bytes = fpu_bytes(&fpu);
        let back = fpu_from_bytes(&bytes).unwrap();
        assert_eq!(
            (back.fcw, back.mxcsr, back.last_ip),
            (0x37f, 0x1f80, 0x1234_5678)
        );
        assert!(fpu_from_bytes(&bytes[1..]).is_none());
    }
}
