//! faultline's KVM layer: guest RAM as memfd-backed memslots, vCPUs on threads, CPUID with the
//! KVM paravirtual leaves, legacy devices, and the micro-guest and Linux boot paths.
//!
//! It knows nothing of where guest pages come from: demand paging registers the same RAM
//! regions (see [`memory::RamRegion`]) with the pager before the VM runs.

pub mod boot;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod memmap;
pub mod memory;
mod memslots;
pub mod sigbus;
pub mod state;
pub mod throttle;
pub mod tracking;
pub mod vcpu;
pub mod vm;

pub use dirty::{DirtyMode, DirtyPages};
pub use memmap::MemoryMap;
pub use memory::{GuestRam, RamRegion, PAGE_SIZE};
pub use memslots::MemslotError;
pub use tracking::{TrackEvent, TrackMode, TrackNotifier, TrackedRange};
pub use vm::{MachineState, RunOutcome, Vm, VmConfig, VmError, VmHandle};
