//! The checksummed file container every snapshot file except the memory image uses.
//!
//! Layout, little endian:
//!
//! ```text
//! magic [u8; 8] | version u32 | reserved u32 (0) | payload length u64 | payload | crc32 u32
//! ```
//!
//! The CRC32 covers every byte before it (header and payload). Files are written to a
//! temporary name and renamed into place, so a reader sees the old file or the whole new one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::SnapshotError;

/// Bytes before the payload: magic, version, reserved word, payload length.
pub const HEADER_LEN: u64 = 24;
/// Bytes after the payload: the CRC32.
pub const TRAILER_LEN: u64 = 4;

/// Writes `payload` in a container at `path`, atomically: the bytes go to `<path>.tmp` in the
/// same directory, reach the disk, and only then replace `path`; the directory is synced after
/// the rename.
pub fn write(
    path: &Path,
    magic: &[u8; 8],
    version: u32,
    payload: &[u8],
) -> Result<(), SnapshotError> {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(magic);
    header[8..12].copy_from_slice(&version.to_le_bytes());
    // Bytes 12..16: the reserved word, zero.
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header);
    hasher.update(payload);
    let crc = hasher.finalize();

    let tmp = tmp_path(path);
    if let Err(source) = write_synced(&tmp, &[&header[..], payload, &crc.to_le_bytes()[..]]) {
        let _ = std::fs::remove_file(&tmp);
        return Err(SnapshotError::Io { path: tmp, source });
    }
    if let Err(source) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    sync_dir(parent_dir(path))
}

/// Waits until the entries of directory `dir` are on disk: after a rename into it, so that
/// the renamed file survives a crash under its new name.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(SnapshotError::io(dir))
}

/// The directory `path` lies in: `.` for a bare file name.
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Reads the container at `path` and returns its payload, after checking, in this order: the
/// header is all there, the magic, the version, the length, and the checksum.
pub fn read(path: &Path, magic: &[u8; 8], version: u32) -> Result<Vec<u8>, SnapshotError> {
    let mut bytes = std::fs::read(path).map_err(SnapshotError::io(path))?;
    let payload = check(path, &bytes, magic, version)?;
    bytes.truncate(payload.end);
    bytes.drain(..payload.start);
    Ok(bytes)
}

/// The format version a container's header says, if it is long enough to say one (nothing
/// else is checked: [`check`] does that).
pub fn version_of(bytes: &[u8]) -> Option<u32> {
    bytes.get(8..12).map(|v| u32::from_le_bytes(array(v)))
}

/// Checks a whole container held in memory (read, or mapped) the way [`read`] does, and
/// returns where its payload lies in `bytes`.
pub fn check(
    path: &Path,
    bytes: &[u8],
    magic: &[u8; 8],
    version: u32,
) -> Result<std::ops::Range<usize>, SnapshotError> {
    let expected = check_header(path, bytes, bytes.len() as u64, magic, version)?;
    let crc_at = (expected - TRAILER_LEN) as usize;
    let stored = u32::from_le_bytes(array(&bytes[crc_at..]));
    let computed = crc32fast::hash(&bytes[..crc_at]);
    if stored != computed {
        return Err(SnapshotError::ChecksumMismatch {
            path: path.into(),
            stored,
            computed,
        });
    }
    Ok(HEADER_LEN as usize..crc_at)
}

/// Opens the container at `path` to read its payload piece by piece (with `pread`, from
/// byte [`HEADER_LEN`]): checks the header and that the file is exactly as long as it says,
/// and returns the file and the payload's length. The checksum is *not* checked (that takes
/// the whole file): a reader that streams must check what it reads by other means.
pub fn open_payload(
    path: &Path,
    magic: &[u8; 8],
    version: u32,
) -> Result<(File, u64), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path).map_err(SnapshotError::io(path))?;
    let found = file.metadata().map_err(SnapshotError::io(path))?.len();
    let mut header = [0u8; HEADER_LEN as usize];
    let have = (found.min(HEADER_LEN)) as usize;
    file.read_exact_at(&mut header[..have], 0)
        .map_err(SnapshotError::io(path))?;
    let expected = check_header(path, &header[..have], found, magic, version)?;
    Ok((file, expected - HEADER_LEN - TRAILER_LEN))
}

/// Checks a container's header (`header`, its first bytes) against a file of `found` bytes:
/// all there, the magic, the version, and a payload length that fills the file exactly.
/// Returns the file's expected length.
fn check_header(
    path: &Path,
    header: &[u8],
    found: u64,
    magic: &[u8; 8],
    version: u32,
) -> Result<u64, SnapshotError> {
    if (header.len() as u64) < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            path: path.into(),
            expected: HEADER_LEN,
            found,
        });
    }
    let found_magic = array::<8>(&header[..8]);
    if found_magic != *magic {
        return Err(SnapshotError::BadMagic {
            path: path.into(),
            found: found_magic,
        });
    }
    let found_version = u32::from_le_bytes(array(&header[8..12]));
    if found_version != version {
        return Err(SnapshotError::UnsupportedVersion {
            path: path.into(),
            found: found_version,
            supported: version,
        });
    }
    // The reserved word (bytes 12..16) is not checked: a later version may use it for
    // something an older reader can ignore.
    let payload_len = u64::from_le_bytes(array(&header[16..24]));
    let expected = HEADER_LEN
        .saturating_add(payload_len)
        .saturating_add(TRAILER_LEN);
    if found < expected {
        return Err(SnapshotError::Truncated {
            path: path.into(),
            expected,
            found,
        });
    }
    if found > expected {
        return Err(SnapshotError::TrailingData {
            path: path.into(),
            extra: found - expected,
        });
    }
    Ok(expected)
}

/// Creates `path` (which must not exist: a link there is not followed), writes `parts` one
/// after the other, and waits until the data is on disk.
fn write_synced(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut file = File::create_new(path)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_data()
}

/// `<path>.tmp-<pid>-<n>`: beside `path`, so that the rename stays within one file system,
/// and this writer's own, so that two processes (or threads) writing the same file never
/// write into one temporary file.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    PathBuf::from(name)
}

/// The first `N` bytes of `bytes` as an array (callers have checked the length).
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// Reads the little-endian fields of a container's payload in order; anything missing or left
/// over is a [`SnapshotError::Malformed`] naming the file.
pub(crate) struct Decoder<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// Starts at the beginning of `bytes`, the payload of `path`.
    pub(crate) fn new(path: &'a Path, bytes: &'a [u8]) -> Self {
        Decoder {
            path,
            bytes,
            pos: 0,
        }
    }

    /// How many bytes of the payload have been taken.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// The next `len` bytes, which hold `what`.
    pub(crate) fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], SnapshotError> {
        let bytes: &'a [u8] = self.bytes;
        let rest = &bytes[self.pos..];
        if rest.len() < len {
            return Err(self.malformed(format!(
                "the payload ends inside {what}: {len} bytes needed, {} left",
                rest.len()
            )));
        }
        self.pos += len;
        Ok(&rest[..len])
    }

    /// `count` items of `size` bytes each (a length read from the file, so checked for
    /// overflow before anything is allocated for it).
    pub(crate) fn take_array(
        &mut self,
        count: u64,
        size: usize,
        what: &str,
    ) -> Result<&'a [u8], SnapshotError> {
        let len = usize::try_from(count)
            .ok()
            .and_then(|count| count.checked_mul(size))
            .ok_or_else(|| self.malformed(format!("{what}: a count of {count} is impossible")))?;
        self.take(len, what)
    }

    /// The page size field, which must be the only page size faultline knows.
    pub(crate) fn page_size(&mut self) -> Result<(), SnapshotError> {
        let page_size = u64::from(self.u32("the page size")?);
        if page_size == crate::PAGE_SIZE {
            Ok(())
        } else {
            Err(self.malformed(format!(
                "the page size is {page_size}; only {} is supported",
                crate::PAGE_SIZE
            )))
        }
    }

    /// The next byte.
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, SnapshotError> {
        Ok(self.take(1, what)?[0])
    }

    /// The next little-endian u32.
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(array(self.take(4, what)?)))
    }

    /// The next little-endian u64.
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(array(self.take(8, what)?)))
    }

    /// Succeeds if every byte was read.
    pub(crate) fn finish(self) -> Result<(), SnapshotError> {
        let left = self.bytes.len() - self.pos;
        if left == 0 {
            Ok(())
        } else {
            Err(self.malformed(format!("{left} unexpected bytes at the end of the payload")))
        }
    }

    /// A [`SnapshotError::Malformed`] for this payload's file.
    pub(crate) fn malformed(&self, reason: String) -> SnapshotError {
        SnapshotError::malformed(self.path, reason)
    }
}

/// Splits `bytes` (a multiple of 8 long) into little-endian u64s.
pub(crate) fn u64s(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|b| u64::from_le_bytes(array(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    const MAGIC: &[u8; 8] = b"FLTTEST\0";

    fn written(dir: &TempDir, payload: &[u8]) -> PathBuf {
        let path = dir.path().join("file");
        write(&path, MAGIC, 1, payload).unwrap();
        path
    }

    #[test]
    fn round_trip() {
        let dir = TempDir::new("container-round-trip");
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let path = written(&dir, &payload);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            HEADER_LEN + payload.len() as u64 + TRAILER_LEN
        );
        assert_eq!(read(&path, MAGIC, 1).unwrap(), payload);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["file"], "the temporary file was renamed");
        // An empty payload, written over the first file.
        write(&path, MAGIC, 1, &[]).unwrap();
        assert_eq!(read(&path, MAGIC, 1).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn truncation_is_caught_wherever_it_cuts() {
        let dir = TempDir::new("container-truncated");
        let payload = vec![0x5a; 100];
        let path = written(&dir, &payload);
        let full = HEADER_LEN + 100 + TRAILER_LEN;
        // Inside the header, inside the payload, the checksum missing, half the checksum.
        for (len, expected) in [
            (0, HEADER_LEN),
            (10, HEADER_LEN),
            (HEADER_LEN, full),
            (HEADER_LEN + 50, full),
            (full - TRAILER_LEN, full),
            (full - 2, full),
        ] {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(len).unwrap();
            match read(&path, MAGIC, 1) {
                Err(SnapshotError::Truncated {
                    expected: e, found, ..
                }) => {
                    assert_eq!((e, found), (expected, len), "cut at {len}");
                }
                other => panic!("cut at {len}: {other:?}"),
            }
            write(&path, MAGIC, 1, &payload).unwrap();
        }
    }

    #[test]
    fn a_flipped_payload_byte_fails_the_checksum() {
        let dir = TempDir::new("container-flipped");
        let path = written(&dir, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN as usize + 3] ^= 0x10;
        std::fs::write(&path, bytes).unwrap();
        let err = read(&path, MAGIC, 1).unwrap_err();
        assert!(
            matches!(err, SnapshotError::ChecksumMismatch { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(path.to_str().unwrap()));
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        let dir = TempDir::new("container-magic");
        let path = written(&dir, b"payload");
        match read(&path, b"FLTOTHER", 1) {
            Err(SnapshotError::BadMagic { found, .. }) => assert_eq!(&found, MAGIC),
            other => panic!("{other:?}"),
        }
        write(&path, MAGIC, 99, b"payload").unwrap();
        match read(&path, MAGIC, 1) {
            Err(SnapshotError::UnsupportedVersion {
                found, supported, ..
            }) => assert_eq!((found, supported), (99, 1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn extra_bytes_are_trailing_data() {
        let dir = TempDir::new("container-trailing");
        let path = written(&dir, b"payload");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"junk").unwrap();
        match read(&path, MAGIC, 1) {
            Err(SnapshotError::TrailingData { extra, .. }) => assert_eq!(extra, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn directories_sync_and_bare_names_lie_in_the_current_directory() {
        let dir = TempDir::new("container-sync");
        sync_dir(dir.path()).unwrap();
        let missing = dir.path().join("missing");
        match sync_dir(&missing) {
            Err(SnapshotError::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("{other:?}"),
        }
        assert_eq!(parent_dir(Path::new("state")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/b/state")), Path::new("a/b"));
        assert_eq!(parent_dir(Path::new("/state")), Path::new("/"));
    }

    #[test]
    fn decoder_reports_short_and_long_payloads() {
        let path = Path::new("/snap/x");
        let bytes = [1, 0, 0, 0, 2];
        let mut decoder = Decoder::new(path, &bytes);
        assert_eq!(decoder.u32("a").unwrap(), 1);
        assert!(matches!(
            decoder.u64("b"),
            Err(SnapshotError::Malformed { .. })
        ));
        let mut decoder = Decoder::new(path, &bytes);
        decoder.u32("a").unwrap();
        assert!(matches!(
            decoder.finish(),
            Err(SnapshotError::Malformed { .. })
        ));
        let mut decoder = Decoder::new(path, &bytes);
        assert!(decoder.take_array(u64::MAX, 8, "c").is_err());
    }
}
