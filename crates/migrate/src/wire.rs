//! Frames: the header, reading and writing whole messages, and what can go wrong on the wire.

use std::io::{self, Read, Write};

use crate::message::Message;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FLMG";
/// The protocol version this build speaks (and the only one it accepts): 2 added the sync
/// message, 3 carries the state as snapshot state format 3 (postcard, not JSON), 4 has a
/// hybrid's source send the pages written since its first stale list before it pauses, 5
/// sends page sets (stale, received) as runs when that is shorter than their bitmap, 6 names
/// the migration at the switch-over and in a resume, 7 names it on each page-request
/// connection too.
pub const VERSION: u16 = 7;
/// The largest payload a reader accepts: a run of 1024 pages and its address, a state, or a
/// page set of up to [`crate::page_set::MAX_SET_PAGES`] pages as a bitmap.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 16;

/// What can go wrong reading or writing messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the peer closed the connection")]
    PeerClosed,
    #[error("the connection failed")]
    Io(#[from] io::Error),
    #[error("not a faultline migration stream: magic {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error("the peer speaks migration protocol version {found}; this faultline speaks {VERSION}")]
    Version { found: u16 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("a {kind} message of {length} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge { kind: &'static str, length: u32 },
    #[error("the stream ended inside a message: {got} of {wanted} bytes of its {part}")]
    Truncated {
        part: &'static str,
        got: usize,
        wanted: usize,
    },
    #[error("a {kind} message failed its checksum: it was damaged on the way")]
    Checksum { kind: &'static str },
    #[error("a {kind} message is malformed: {why}")]
    Malformed { kind: &'static str, why: String },
    #[error("a {kind} message names memory outside the VM: {count} pages at {gpa:#x}")]
    OutsideLayout {
        kind: &'static str,
        gpa: u64,
        count: u64,
    },
    #[error("the peer's VM does not match this one: {0}")]
    Mismatch(String),
}

impl ProtocolError {
    /// Whether the connection was lost (closed, failed, or cut inside a message), as opposed
    /// to the peer sending something wrong.
    pub fn is_connection_loss(&self) -> bool {
        matches!(
            self,
            ProtocolError::PeerClosed | ProtocolError::Io(_) | ProtocolError::Truncated { .. }
        )
    }

    /// Whether the bytes were damaged on the way, or the stream lost its place in them (a
    /// header or a checksum that fails): what a new connection mends, as opposed to a whole,
    /// checksummed message that says something wrong.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            ProtocolError::BadMagic { .. }
                | ProtocolError::Version { .. }
                | ProtocolError::UnknownKind(_)
                | ProtocolError::TooLarge { .. }
                | ProtocolError::Checksum { .. }
        )
    }

    /// Whether a read with a timeout (`SO_RCVTIMEO`) ran out of time before a whole message
    /// came: a silent peer, as opposed to a broken or a wrong one.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ProtocolError::Io(e)
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
        )
    }
}

/// The header's length field for a `kind` payload of `len` bytes, if it may be sent.
fn payload_length(kind: &str, len: usize) -> io::Result<u32> {
    u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {kind} message of {len} bytes is over the payload limit"),
            )
        })
}

/// Writes `message` as one frame.
pub fn write_message<W: Write>(writer: &mut W, message: &Message) -> io::Result<()> {
    if let Message::Pages { gpa, data } = message {
        return write_pages(writer, *gpa, data).map(|_| ());
    }
    let payload = message.encode();
    let length = payload_length(message.name(), payload.len())?;
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6] = message.kind();
    header[8..12].copy_from_slice(&length.to_le_bytes());
    let crc = checksum(&header[..12], &payload);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    writer.write_all(&header)?;
    writer.write_all(&payload)?;
    Ok(())
}

/// The bytes [`write_message`] writes for `message`: its whole frame.
pub fn frame(message: &Message) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    write_message(&mut out, message)?;
    Ok(out)
}

/// Writes a pages message for `data` (whole pages) at `gpa` as one frame, straight from the
/// caller's bytes: the same frame as `write_message(&Message::Pages { gpa, data })`, without
/// copying the pages into a message first (a migration's main cost is copying bytes). Returns
/// the bytes the frame took on the wire.
pub fn write_pages<W: Write>(writer: &mut W, gpa: u64, data: &[u8]) -> io::Result<u64> {
    let header = pages_header(gpa, data)?;
    writer.write_all(&header)?;
    writer.write_all(data)?;
    Ok((header.len() + data.len()) as u64)
}

/// The bytes of a pages frame for `data` at `gpa` that come before `data` itself (its
/// checksum included), for a writer that sends `data` from elsewhere: the frame is these
/// bytes, then exactly `data`.
pub fn pages_header(gpa: u64, data: &[u8]) -> io::Result<[u8; PAGES_HEADER_BYTES]> {
    let length = payload_length("pages", 8 + data.len())?;
    let mut header = [0u8; PAGES_HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6] = Message::PAGES_KIND;
    header[8..12].copy_from_slice(&length.to_le_bytes());
    header[HEADER_BYTES..].copy_from_slice(&gpa.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..12]);
    hasher.update(&header[HEADER_BYTES..]);
    hasher.update(data);
    header[12..16].copy_from_slice(&hasher.finalize().to_le_bytes());
    Ok(header)
}

/// How many bytes of a pages frame come before its pages: the frame header and the address.
pub const PAGES_HEADER_BYTES: usize = HEADER_BYTES + 8;

/// Reads one message. A clean end of the stream before a frame is [`ProtocolError::PeerClosed`];
/// anywhere else it is [`ProtocolError::Truncated`].
pub fn read_message<R: Read>(reader: &mut R) -> Result<Message, ProtocolError> {
    read_message_reusing(reader, &mut None)
}

/// [`read_message`], reading a `Pages` message's data into the buffer in `spare` (one of
/// pages already used, resized to fit), if there is one, rather than a new one: a stream of
/// megabyte runs then allocates no memory the kernel must zero for each. Any other message
/// leaves `spare` as it was.
pub fn read_message_reusing<R: Read>(
    reader: &mut R,
    spare: &mut Option<Vec<u8>>,
) -> Result<Message, ProtocolError> {
    let mut header = [0u8; HEADER_BYTES];
    // The magic is read and looked at before the rest of the header: a peer that speaks
    // something else is told by what it sent, even one that sends less than a header and
    // waits (a TLS alert is 7 bytes).
    let mut got = fill(reader, &mut header[..MAGIC.len()])?;
    if got == 0 {
        return Err(ProtocolError::PeerClosed);
    }
    let found: [u8; 4] = header[..MAGIC.len()].try_into().expect("4 bytes");
    // Fewer bytes than the magic, and already not its start: another protocol, not a cut
    // (the bytes that did not come show as zero).
    if header[..got] != MAGIC[..got] {
        return Err(ProtocolError::BadMagic { found });
    }
    if got == MAGIC.len() {
        got += fill(reader, &mut header[MAGIC.len()..])?;
    }
    if got < HEADER_BYTES {
        return Err(ProtocolError::Truncated {
            part: "header",
            got,
            wanted: HEADER_BYTES,
        });
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(ProtocolError::Version { found: version });
    }
    let kind = header[6];
    let name = Message::kind_name(kind).ok_or(ProtocolError::UnknownKind(kind))?;
    let length = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if length > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge { kind: name, length });
    }
    let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    if kind == Message::PAGES_KIND && length >= 8 {
        // Pages are the bulk of a migration: read straight into their own buffer.
        let mut gpa = [0u8; 8];
        let wanted = length as usize - 8;
        let got = fill(reader, &mut gpa)?;
        let data = if got < gpa.len() {
            Vec::new()
        } else {
            fill_growing(reader, wanted, spare.take().unwrap_or_default())?
        };
        let got = got + data.len();
        if got < length as usize {
            return Err(ProtocolError::Truncated {
                part: "payload",
                got,
                wanted: length as usize,
            });
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header[..12]);
        hasher.update(&gpa);
        hasher.update(&data);
        if crc != hasher.finalize() {
            return Err(ProtocolError::Checksum { kind: name });
        }
        reserved_is_clear(&header, name)?;
        return Message::pages(u64::from_le_bytes(gpa), data);
    }
    let payload = fill_growing(reader, length as usize, Vec::new())?;
    if payload.len() < length as usize {
        return Err(ProtocolError::Truncated {
            part: "payload",
            got: payload.len(),
            wanted: length as usize,
        });
    }
    if crc != checksum(&header[..12], &payload) {
        return Err(ProtocolError::Checksum { kind: name });
    }
    reserved_is_clear(&header, name)?;
    Message::decode(kind, &payload)
}

/// Refuses a frame whose reserved header byte is set. Looked at once the checksum holds, so
/// that a byte damaged on the way is told as damage, and a set one as the peer's doing.
fn reserved_is_clear(header: &[u8; HEADER_BYTES], kind: &'static str) -> Result<(), ProtocolError> {
    match header[7] {
        0 => Ok(()),
        set => Err(ProtocolError::Malformed {
            kind,
            why: format!("reserved header byte is {set:#x}, not 0"),
        }),
    }
}

fn checksum(head: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(head);
    hasher.update(payload);
    hasher.finalize()
}

/// Reads `len` bytes (fewer only where the stream ends) into `buf` (one used before, or a new
/// one), which grows as they come: a peer that announces a long message and sends little of
/// it makes this side hold only what it sent, not what it announced (up to [`MAX_PAYLOAD`] a
/// message). A used buffer is read into as far as its capacity goes first: a run that fits
/// allocates nothing, and only what it adds to the buffer's length is zeroed.
fn fill_growing<R: Read>(reader: &mut R, len: usize, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
    const FIRST: usize = 128 << 10;
    let mut had = 0;
    while had < len {
        let next = buf.capacity().max(FIRST).max(had * 2).min(len);
        buf.resize(next, 0);
        had += fill(reader, &mut buf[had..])?;
        if had < next {
            break;
        }
    }
    buf.truncate(had);
    Ok(buf)
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn fill<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Layout, VmIdentity, PAGE_SIZE};

    fn every_message() -> Vec<Message> {
        let mut data = vec![0u8; 2 * PAGE_SIZE as usize];
        data[5] = 0xab;
        data[PAGE_SIZE as usize + 7] = 0xcd;
        vec![
            Message::Hello(VmIdentity {
                vcpus: 2,
                layout: Layout::new(vec![(0, 0xc000_0000), (1 << 32, 1 << 30)]),
                cpuid_digest: 0x1234_5678,
            }),
            Message::Pages {
                gpa: 0x20_0000,
                data,
            },
            Message::ZeroPages {
                gpa: 0x30_0000,
                count: 1 << 18,
            },
            Message::Round {
                round: 3,
                pages: 4242,
            },
            Message::State(b"{\"machine\": {}}".to_vec()),
            Message::SwitchOver {
                post_copy: false,
                migration: 0x0123_4567_89ab_cdef,
            },
            Message::SwitchOver {
                post_copy: true,
                migration: u64::MAX,
            },
            Message::PageRequest {
                gpa: 0x40_0000,
                count: 16,
            },
            Message::Received {
                pages: 130,
                bitmap: vec![u64::MAX, 0, 0b11],
            },
            Message::Done,
            Message::Abort("the source VM stopped".into()),
            Message::Stale {
                pages: 70,
                bitmap: vec![1, 1 << 5],
            },
            // Every page of 1 GiB: as one run.
            Message::Stale {
                pages: 1 << 18,
                bitmap: vec![u64::MAX; 4096],
            },
            Message::Built,
            Message::Resume { migration: 7 },
            Message::Sync,
            Message::Requests {
                migration: 0xfeed_f00d_dead_beef,
            },
        ]
    }

    fn frame(message: &Message) -> Vec<u8> {
        super::frame(message).unwrap()
    }

    /// A reader of `data` that notes the longest buffer it was asked to fill.
    struct Watched<'a> {
        data: &'a [u8],
        longest: usize,
    }

    impl Read for Watched<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.longest = self.longest.max(buf.len());
            self.data.read(buf)
        }
    }

    #[test]
    fn a_peer_that_sends_less_than_a_header_and_waits_is_told_by_its_first_bytes() {
        /// A peer that sent `0` and waits: a read past it would block for ever.
        struct Waits<'a>(&'a [u8]);
        impl Read for Waits<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                assert!(!self.0.is_empty(), "read on past what the peer sent");
                let n = buf.len().min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        // A TLS alert record (7 bytes), as a TLS server answers a plain hello.
        let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];
        assert!(matches!(
            read_message(&mut Waits(&alert)),
            Err(ProtocolError::BadMagic {
                found: [0x15, 0x03, 0x03, 0x00]
            })
        ));
        // Less than the magic, and not its start, then closed: the wrong protocol too, not
        // a cut connection (which a recovery would try to mend).
        assert!(matches!(
            read_message(&mut &b"GE"[..]),
            Err(ProtocolError::BadMagic {
                found: [b'G', b'E', 0, 0]
            })
        ));
    }

    #[test]
    fn a_message_announced_long_and_cut_short_holds_only_what_came() {
        // A header announcing the largest payload there may be, then 10 bytes of it.
        for kind in [Message::PAGES_KIND, Message::Done.kind()] {
            let mut stream = vec![0u8; HEADER_BYTES];
            stream[0..4].copy_from_slice(&MAGIC);
            stream[4..6].copy_from_slice(&VERSION.to_le_bytes());
            stream[6] = kind;
            stream[8..12].copy_from_slice(&MAX_PAYLOAD.to_le_bytes());
            stream.extend([7u8; 10]);
            let mut reader = Watched {
                data: &stream,
                longest: 0,
            };
            let error = read_message(&mut reader).unwrap_err();
            assert!(
                matches!(error, ProtocolError::Truncated { got: 10, .. }),
                "{error}"
            );
            assert!(
                reader.longest <= 128 << 10,
                "a buffer of {} bytes was made ready for 10",
                reader.longest
            );
        }
        // A whole long message still comes whole, in the buffer that grew for it.
        let data = vec![0x5au8; 3 << 20];
        let mut stream = Vec::new();
        write_pages(&mut stream, 1 << 20, &data).unwrap();
        let message = read_message(&mut stream.as_slice()).unwrap();
        assert_eq!(message, Message::Pages { gpa: 1 << 20, data });
    }

    #[test]
    fn a_pages_frame_from_a_slice_is_the_pages_message() {
        let data: Vec<u8> = (0..2 * PAGE_SIZE as usize).map(|i| (i * 7) as u8).collect();
        let mut direct = Vec::new();
        write_pages(&mut direct, 0x20_0000, &data).unwrap();
        let message = Message::Pages {
            gpa: 0x20_0000,
            data: data.clone(),
        };
        // The frame every other message gets: a header, then the encoded payload.
        let payload = message.encode();
        let mut framed = Vec::new();
        framed.extend_from_slice(&MAGIC);
        framed.extend_from_slice(&VERSION.to_le_bytes());
        framed.extend_from_slice(&[message.kind(), 0]);
        framed.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let crc = checksum(&framed, &payload);
        framed.extend_from_slice(&crc.to_le_bytes());
        framed.extend_from_slice(&payload);
        assert_eq!(direct, framed, "the same bytes on the wire");
        assert_eq!(message.wire_len(), framed.len() as u64);
        let mut written = Vec::new();
        write_message(&mut written, &message).unwrap();
        assert_eq!(written, framed);
        assert_eq!(read_message(&mut direct.as_slice()).unwrap(), message);
    }

    #[test]
    fn pages_read_into_a_used_buffer_are_exactly_the_pages_sent() {
        let data: Vec<u8> = (0..2 * PAGE_SIZE as usize)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut stream = Vec::new();
        write_pages(&mut stream, 0x20_0000, &data).unwrap();
        let sent = Message::Pages {
            gpa: 0x20_0000,
            data,
        };
        // Longer and shorter than the run, and full of another run's bytes.
        for spare_pages in [3, 2, 1, 0] {
            let mut spare = Some(vec![0xaa; spare_pages * PAGE_SIZE as usize]);
            let read = read_message_reusing(&mut stream.as_slice(), &mut spare).unwrap();
            assert_eq!(read, sent, "into a spare buffer of {spare_pages} pages");
            assert!(spare.is_none(), "the buffer went into the message");
        }
        // Another message leaves the buffer for the next pages.
        let mut stream = Vec::new();
        write_message(&mut stream, &Message::Sync).unwrap();
        let mut spare = Some(vec![0xaa; 10]);
        let read = read_message_reusing(&mut stream.as_slice(), &mut spare).unwrap();
        assert_eq!((read, spare), (Message::Sync, Some(vec![0xaa; 10])));
    }

    #[test]
    fn every_message_round_trips() {
        let mut stream = Vec::new();
        for message in every_message() {
            write_message(&mut stream, &message).unwrap();
        }
        let mut reader = &stream[..];
        for message in every_message() {
            assert_eq!(read_message(&mut reader).unwrap(), message);
        }
        assert!(matches!(
            read_message(&mut reader),
            Err(ProtocolError::PeerClosed)
        ));
    }

    #[test]
    fn a_frame_cut_anywhere_is_truncated_never_a_message() {
        for message in every_message() {
            let bytes = frame(&message);
            for cut in 1..bytes.len() {
                let error = read_message(&mut &bytes[..cut]).unwrap_err();
                assert!(
                    matches!(error, ProtocolError::Truncated { .. }),
                    "{} cut at {cut}: {error}",
                    message.name()
                );
            }
        }
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        for message in every_message() {
            let bytes = frame(&message);
            // Every bit of small frames; of the page run, every bit of its header and address
            // (read apart from its data) and a spread of the rest.
            let step = (bytes.len() / 512).max(1);
            let head = HEADER_BYTES + 8;
            let spread = (head..bytes.len()).step_by(step);
            for byte in (0..head.min(bytes.len())).chain(spread) {
                for bit in 0..8 {
                    let mut damaged = bytes.clone();
                    damaged[byte] ^= 1 << bit;
                    let result = read_message(&mut &damaged[..]);
                    // Seen as damage, or (a length grown past the frame) as a frame that
                    // did not all come: a new connection mends either.
                    assert!(
                        result.as_ref().is_err_and(
                            |e| e.is_damage() || matches!(e, ProtocolError::Truncated { .. })
                        ),
                        "{} with bit {bit} of byte {byte} flipped: {result:?}",
                        message.name()
                    );
                }
            }
        }
    }

    #[test]
    fn only_a_read_that_ran_out_of_time_is_a_timeout() {
        for kind in [io::ErrorKind::WouldBlock, io::ErrorKind::TimedOut] {
            assert!(ProtocolError::Io(io::Error::from(kind)).is_timeout());
        }
        assert!(!ProtocolError::Io(io::Error::from(io::ErrorKind::ConnectionReset)).is_timeout());
        assert!(!ProtocolError::PeerClosed.is_timeout());
        assert!(!ProtocolError::Checksum { kind: "pages" }.is_timeout());
    }

    #[test]
    fn damage_is_told_apart_from_a_message_that_says_something_wrong() {
        assert!(ProtocolError::Checksum { kind: "pages" }.is_damage());
        assert!(ProtocolError::BadMagic { found: *b"HTTP" }.is_damage());
        assert!(!ProtocolError::PeerClosed.is_damage());
        let wrong = ProtocolError::OutsideLayout {
            kind: "pages",
            gpa: 0,
            count: 1,
        };
        assert!(!wrong.is_damage());
        let malformed = ProtocolError::Malformed {
            kind: "pages",
            why: "a page count of 0".into(),
        };
        assert!(!malformed.is_damage());
    }

    #[test]
    fn header_errors_name_the_problem() {
        let good = frame(&Message::Done);
        let mut bad = good.clone();
        bad[0..4].copy_from_slice(b"HTTP");
        assert!(read_message(&mut &bad[..])
            .unwrap_err()
            .to_string()
            .contains("not a faultline migration stream"));
        let mut bad = good.clone();
        // An older peer: refused at its first frame, not somewhere in the migration.
        bad[4..6].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(
            read_message(&mut &bad[..]).unwrap_err().to_string(),
            "the peer speaks migration protocol version 3; this faultline speaks 7"
        );
        let mut bad = good.clone();
        bad[6] = 200;
        assert!(matches!(
            read_message(&mut &bad[..]),
            Err(ProtocolError::UnknownKind(200))
        ));
        // A reserved byte set by the peer (its checksum holds) is its doing, not damage.
        let mut bad = good.clone();
        bad[7] = 1;
        let crc = checksum(&bad[..12], &[]);
        bad[12..16].copy_from_slice(&crc.to_le_bytes());
        let error = read_message(&mut &bad[..]).unwrap_err();
        assert!(!error.is_damage() && error.to_string().contains("reserved header byte"));
        let mut bad = good;
        bad[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            read_message(&mut &bad[..]),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn an_oversized_message_is_not_written() {
        let huge = Message::State(vec![0; MAX_PAYLOAD as usize + 1]);
        let mut out = Vec::new();
        assert!(write_message(&mut out, &huge).is_err());
        assert!(out.is_empty(), "nothing half-written");
    }
}
