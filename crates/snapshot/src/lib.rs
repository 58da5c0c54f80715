//! faultline's snapshot files.
//!
//! A snapshot is a directory:
//!
//! - [`STATE_FILE`] (`state`): the VM's device and vCPU state, in a checksummed
//!   [`container`].
//! - [`MEMORY_FILE`] (`memory.img`): guest RAM as a sparse raw image, the RAM regions laid
//!   back to back; zero pages are holes, so the file takes only the space of the data.
//! - [`SUMS_FILE`] (`memory.sums`): a CRC32 per chunk of the image (so that a damaged image is
//!   caught before a page of it reaches the guest) and, for a diff layer, the bitmap of the
//!   pages the layer holds.
//! - [`WORKING_SET_FILE`] (`working-set`, optional): the pages a restored guest touched first,
//!   in order, with their contents, to be installed before the guest runs.
//!
//! A diff snapshot holds only the pages written since its parent, which its state names by a
//! path relative to the diff's directory and by the parent's [`state::identity`] (so that a
//! chain can be moved as a whole, and a parent replaced by another snapshot is refused);
//! [`state::chain`] follows the parents, and [`SnapshotMemory`] reads a chain of layers
//! (newest first, a full image last) as one memory, eagerly ([`SnapshotMemory::load_into`])
//! or on demand as a [`pager::PageSource`].
//!
//! Every file is written under a temporary name, synced, renamed into place, and its directory
//! synced; a snapshot directory is published the same way, from a staging directory beside it.

pub mod container;
pub mod create;
mod error;
pub mod layered;
pub mod live;
pub mod memory;
pub mod state;
pub mod working_set;

#[cfg(test)]
mod testutil;

pub use error::SnapshotError;
pub use layered::{LoadSummary, SnapshotMemory};
pub use memory::{
    LayerKind, MemoryImage, MemorySpan, MemorySpanMut, WriteSummary, DEFAULT_CHUNK_SIZE, PAGE_SIZE,
};
pub use working_set::{WorkingSet, WorkingSetStream};

/// The VM state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The sparse guest memory image in a snapshot directory.
pub const MEMORY_FILE: &str = "memory.img";
/// The memory image's chunk checksums (and diff bitmap) in a snapshot directory.
pub const SUMS_FILE: &str = "memory.sums";
/// The recorded working set in a snapshot directory.
pub const WORKING_SET_FILE: &str = "working-set";
