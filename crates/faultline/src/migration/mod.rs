//! Live migration between two faultline processes over TCP (or mutually authenticated TLS),
//! on the `migrate` wire protocol: pre-copy (rounds from the dirty log, a throttle for a guest
//! that does not converge, a short pause), post-copy (the VM moves at once, its pages follow,
//! those it touches first on a connection of their own), hybrid (rounds, then post-copy), and
//! recovery when the network breaks. The source side is `send` and `postcopy_send`, the
//! destination `receive`, `postcopy_receive` and `incoming`. A failure before the destination
//! may run the VM leaves the source VM running as it was; after that the source VM stays
//! paused (it never runs in two places) until the migration is resumed, or cancelled by an
//! operator who knows the destination does not run it. The destination builds the VM through
//! the same path as a restore.

/// A connection's read buffer: small messages are gathered, a run of pages (up to 1 MiB) is
/// larger and is read into its own buffer straight, without a copy through this one.
const READ_BUFFER: usize = 64 << 10;

pub mod channel;
pub mod incoming;
pub mod pace;
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
