//! What can go wrong writing or reading a snapshot. Every message names the file involved.

use std::path::{Path, PathBuf};

/// Why a snapshot file could not be written, read back, or trusted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O operation on the file failed.
    #[error("cannot read/write {path}")]
    Io {
        /// The file (or directory) being read or written.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than its header or its own length field says.
    #[error("{path} is truncated: it should hold at least {expected} bytes but holds {found}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the file should hold at least.
        expected: u64,
        /// Bytes it holds.
        found: u64,
    },
    /// The file does not start with the magic of the kind of file expected.
    #[error(
        "{path} is not a faultline {} file (it begins with \"{}\")",
        file_kind(.path),
        .found.escape_ascii()
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The file was written in a format version this build cannot read.
    #[error("{path} has format version {found}, but this build reads version {supported}")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The file's checksum does not match its contents: it was damaged after it was written.
    #[error("{path} is corrupt: stored checksum {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// The checksum stored in the file.
        stored: u32,
        /// The checksum of the bytes read.
        computed: u32,
    },
    /// Bytes follow the end of the file's contents.
    #[error("{path} has {extra} unexpected bytes after its checksum")]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// How many bytes follow the checksum.
        extra: u64,
    },
    /// The file's checksum is right but its contents do not decode.
    #[error("{path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What does not decode, or does not fit together.
        reason: String,
    },
    /// A memory image's length differs from the size its checksums describe.
    #[error("{path} holds {found} bytes, but its checksums describe {expected}")]
    ImageSize {
        /// The memory image.
        path: PathBuf,
        /// The size recorded with the checksums.
        expected: u64,
        /// The image's length.
        found: u64,
    },
    /// A chunk of a memory image does not match its checksum.
    #[error(
        "{path} is corrupt: chunk {chunk} (at offset {offset:#x}) does not match its checksum"
    )]
    ChunkChecksum {
        /// The memory image.
        path: PathBuf,
        /// The chunk's index.
        chunk: u64,
        /// The chunk's first byte in the image.
        offset: u64,
    },
    /// The layers given do not form one snapshot (order, kinds or sizes disagree).
    #[error("inconsistent snapshot layers: {0}")]
    Layers(String),
    /// The VM could not be paused, resumed or read.
    #[error("cannot take the VM's state")]
    Vm(#[source] vmm::VmError),
    /// The request cannot be met as asked.
    #[error("{0}")]
    Usage(String),
    /// The snapshot directory exists already (snapshots are never overwritten).
    #[error("{0} exists already: a snapshot goes into a new directory")]
    Exists(PathBuf),
    /// A diff's parent directory holds another snapshot than the one the diff was taken on.
    #[error(
        "{parent} is not the snapshot that the diff {child} was taken on (it was replaced or \
         changed since: its identity is {found}, the diff expects {expected}), so the chain \
         cannot be restored"
    )]
    ParentChanged {
        /// The diff snapshot's directory.
        child: PathBuf,
        /// Its parent's directory, as resolved from the diff.
        parent: PathBuf,
        /// The parent's identity recorded in the diff.
        expected: String,
        /// The identity of what is there now.
        found: String,
    },
    /// The snapshot a new diff would be taken on is no longer the one this VM took there.
    #[error(
        "{parent} is no longer the snapshot this VM took there (it was replaced or changed \
         since: its identity is {found}, the snapshot taken was {expected}), so no diff can be \
         layered on it: take a full snapshot"
    )]
    ParentReplaced {
        /// The directory of the snapshot the diff would be taken on.
        parent: PathBuf,
        /// Its identity when this VM wrote it.
        expected: String,
        /// The identity of what is there now.
        found: String,
    },
    /// A diff's parent directory cannot be found (or opened).
    #[error(
        "{parent}, the parent of the diff {child}, cannot be opened, so the chain cannot be \
         restored"
    )]
    ParentMissing {
        /// The diff snapshot's directory.
        child: PathBuf,
        /// Its parent's directory, as resolved from the diff.
        parent: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A page of guest memory could not be read for the snapshot (it could not be provided:
    /// its page source failed and the page was poisoned).
    #[error(
        "cannot read guest memory at image offset {offset:#x} (its page could not be provided)"
    )]
    GuestMemory {
        /// The page's offset in the memory image (the RAM regions back to back).
        offset: u64,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// A live snapshot could not write-protect guest memory, or let it go again.
    #[error("live snapshot: write protection of guest memory failed")]
    Protect(#[source] pager::PagerError),
    /// A page still in a lazily restored VM's source could not be read from it.
    #[error(
        "cannot read the page at image offset {offset:#x} from the VM's page source: {reason}"
    )]
    Source {
        /// The page's offset in the memory image.
        offset: u64,
        /// What the source said.
        reason: String,
    },
    /// The pager that serves guest memory failed before the snapshot was published: what it
    /// read may be wrong, so it is not kept.
    #[error("guest memory cannot be trusted, so no snapshot is taken: {0}")]
    PagerFailed(String),
}

impl SnapshotError {
    /// Whether the caller asked for something that cannot be done (rather than a failure).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            SnapshotError::Usage(_)
                | SnapshotError::Exists(_)
                | SnapshotError::ParentReplaced { .. }
        ) || matches!(self, SnapshotError::Vm(vmm::VmError::DirtyTrackingOff))
    }

    /// Wraps an I/O error with the file it concerns (`.map_err(SnapshotError::io(path))`).
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
        move |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A [`SnapshotError::Malformed`] for `path`.
    pub(crate) fn malformed(path: &Path, reason: impl Into<String>) -> SnapshotError {
        SnapshotError::Malformed {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// The kind of file a snapshot file name stands for, for "not a faultline ... file".
fn file_kind(path: &Path) -> &'static str {
    match path.file_name().and_then(|name| name.to_str()) {
        Some(crate::STATE_FILE) => "snapshot state",
        Some(crate::SUMS_FILE) => "memory checksum",
        Some(crate::WORKING_SET_FILE) => "working set",
        Some(crate::MEMORY_FILE) => "memory image",
        _ => "snapshot",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_file_and_the_kind() {
        let err = SnapshotError::BadMagic {
            path: PathBuf::from("/snap/memory.sums"),
            found: *b"\x7fELF\x02\x01\x01\0",
        };
        let message = err.to_string();
        assert!(message.contains("/snap/memory.sums"), "{message}");
        assert!(message.contains("memory checksum"), "{message}");
        let err = SnapshotError::ChunkChecksum {
            path: PathBuf::from("/snap/memory.img"),
            chunk: 3,
            offset: 0x30000,
        };
        assert!(err.to_string().contains("chunk 3 (at offset 0x30000)"));
    }

    #[test]
    fn parent_errors_name_the_parent_and_the_diff() {
        let err = SnapshotError::ParentChanged {
            child: PathBuf::from("/snaps/diff"),
            parent: PathBuf::from("/snaps/base"),
            expected: "1-2-3-4".into(),
            found: "5-6-7-8".into(),
        };
        let message = err.to_string();
        for part in [
            "/snaps/base is not the snapshot that the diff /snaps/diff was taken on",
            "replaced or changed",
            "5-6-7-8",
            "1-2-3-4",
            "cannot be restored",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        let err = SnapshotError::ParentMissing {
            child: PathBuf::from("/snaps/diff"),
            parent: PathBuf::from("/snaps/diff/../base"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(err
            .to_string()
            .starts_with("/snaps/diff/../base, the parent of the diff"));
    }
}
