//! Live migration between two faultline processes over TCP, on the `migrate` wire protocol.
//!
//! Built so far: pre-copy. The source sends every page while the guest runs, then rounds of
//! the pages the dirty log says were written since, until what is left would go within the
//! downtime limit at the bandwidth measured (or a round limit is reached); then it pauses the
//! VM, sends the last pages and the state (the snapshot state format), and waits for the
//! destination to say it has built the VM before it stops its own. Anything that fails before
//! that leaves the source VM running as it was (and its dirty log as if nothing was taken).
//! The destination builds the VM through the same path as a restore.

pub mod channel;
pub mod incoming;
mod postcopy_receive;
pub mod postcopy_send;
pub mod progress;
pub mod receive;
pub mod send;

use migrate::{Layout, VmIdentity};
use vmm::GuestRam;

/// The identity a VM with `ram` and `vcpus` vCPUs has on this host.
pub fn identity(ram: &GuestRam, vcpus: u8) -> anyhow::Result<VmIdentity> {
    let kvm = kvm_ioctls::Kvm::new()?;
    Ok(VmIdentity {
        vcpus,
        layout: layout_of(ram),
        cpuid_digest: vmm::cpuid::host_digest(&kvm)?,
    })
}

/// The RAM layout of `ram`, as the protocol says it.
pub fn layout_of(ram: &GuestRam) -> Layout {
    Layout::new(ram.regions().iter().map(|r| (r.gpa(), r.size())).collect())
}
