//! faultline's KVM layer: guest RAM as memfd-backed memslots, vCPUs on threads, CPUID with the
//! KVM paravirtual leaves, legacy devices, and the micro-guest and Linux boot paths.
//!
//! It knows nothing of where guest pages come from: demand paging registers the same RAM
//! regions (see [`memory::RamRegion`]) with the pager before the VM runs.

pub mod boot;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod memory;
pub mod sigbus;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use memory::{GuestRam, RamRegion, PAGE_SIZE};
pub use vm::{DirtyPages, MachineState, RunOutcome, Vm, VmConfig, VmError, VmHandle};
