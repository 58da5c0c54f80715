//! The messages and their payloads.

use crate::page_set;
use crate::wire::ProtocolError;

/// Bytes of a guest page as the protocol counts them.
pub const PAGE_SIZE: u64 = 4096;
/// Most RAM regions a layout may have (faultline builds at most two).
const MAX_REGIONS: usize = 64;
/// Most pages one page request may ask for (its answer must fit in one message).
pub const MAX_REQUEST_PAGES: u32 = 1024;

/// Guest RAM as `(gpa, size)` regions, lowest first: the pages a migration may move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    regions: Vec<(u64, u64)>,
}

impl Layout {
    /// A layout of `regions` (page aligned, ascending, not overlapping).
    pub fn new(regions: Vec<(u64, u64)>) -> Self {
        Layout { regions }
    }

    /// The regions.
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    /// Pages of RAM in all.
    pub fn pages(&self) -> u64 {
        self.regions.iter().map(|&(_, size)| size / PAGE_SIZE).sum()
    }

    /// Whether `count` pages from `gpa` lie within one region.
    pub fn contains(&self, gpa: u64, count: u64) -> bool {
        let Some(len) = count.checked_mul(PAGE_SIZE) else {
            return false;
        };
        gpa.is_multiple_of(PAGE_SIZE)
            && self.regions.iter().any(|&(start, size)| {
                gpa >= start && gpa.checked_add(len).is_some_and(|end| end <= start + size)
            })
    }

    /// Why the layout cannot be a VM's, if it cannot.
    fn problem(&self) -> Option<String> {
        if self.regions.is_empty() || self.regions.len() > MAX_REGIONS {
            return Some(format!("{} RAM regions", self.regions.len()));
        }
        let mut end = 0u64;
        for (i, &(gpa, size)) in self.regions.iter().enumerate() {
            let aligned = gpa.is_multiple_of(PAGE_SIZE) && size.is_multiple_of(PAGE_SIZE);
            if !aligned || size == 0 || (i > 0 && gpa < end) || gpa.checked_add(size).is_none() {
                return Some(format!("RAM region {i} ({gpa:#x}, {size:#x} bytes)"));
            }
            end = gpa + size;
        }
        let pages = self.pages();
        if pages > page_set::MAX_SET_PAGES {
            return Some(format!(
                "{pages} pages of RAM, more than a migration can move ({})",
                page_set::MAX_SET_PAGES
            ));
        }
        None
    }
}

/// What both ends must agree on before any page moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmIdentity {
    pub vcpus: u8,
    pub layout: Layout,
    /// A digest of the vCPUs' CPUID, so a VM never lands on a host that would show it other CPU
    /// features.
    pub cpuid_digest: u32,
}

impl VmIdentity {
    /// Checks that `peer` describes the same VM as `self`.
    pub fn check_matches(&self, peer: &VmIdentity) -> Result<(), ProtocolError> {
        if self.vcpus != peer.vcpus {
            return Err(ProtocolError::Mismatch(format!(
                "{} vCPUs here, {} there",
                self.vcpus, peer.vcpus
            )));
        }
        if self.layout != peer.layout {
            return Err(ProtocolError::Mismatch(format!(
                "RAM {:x?} here, {:x?} there",
                self.layout.regions, peer.layout.regions
            )));
        }
        if self.cpuid_digest != peer.cpuid_digest {
            return Err(ProtocolError::Mismatch(format!(
                "CPUID digest {:#x} here, {:#x} there",
                self.cpuid_digest, peer.cpuid_digest
            )));
        }
        Ok(())
    }
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Who is migrating: sent by each side first.
    Hello(VmIdentity),
    /// Contiguous pages from `gpa`, with their contents (a whole number of pages).
    Pages { gpa: u64, data: Vec<u8> },
    /// `count` zero pages from `gpa`.
    ZeroPages { gpa: u64, count: u64 },
    /// A pre-copy round begins, sending `pages` pages.
    Round { round: u32, pages: u64 },
    /// The VM's state (vCPUs, VM, devices), in the snapshot state format.
    State(Vec<u8>),
    /// The source has paused the VM: what follows finishes the migration. In post-copy, the
    /// state comes next and the destination runs the VM at once, fetching what it lacks.
    /// `migration` names this migration (a random number the source drew), for a resume.
    SwitchOver { post_copy: bool, migration: u64 },
    /// Post-copy: the destination needs `count` pages from `gpa` now.
    PageRequest { gpa: u64, count: u32 },
    /// Recovery: the pages the destination holds, one bit each, regions back to back.
    Received { pages: u64, bitmap: Vec<u64> },
    /// Post-copy after pre-copy rounds: the pages (one bit each) sent before that changed
    /// since, and will come again; the others the destination has.
    Stale { pages: u64, bitmap: Vec<u64> },
    /// Post-copy: the destination has built the VM and runs it; the source must never run it
    /// again.
    Built,
    /// Everything was sent (source) or received (destination).
    Done,
    /// Recovery: the source reconnects to a post-copy broken by a network failure (first
    /// after the hello); the destination answers with what it holds (`Received`), if
    /// `migration` is the one its switch-over named.
    Resume { migration: u64 },
    /// Post-copy: the first message after the hello on a page-request connection, naming the
    /// migration whose page requests it answers (the one its switch-over named): a connection
    /// that names another is refused, so that only the source that began this post-copy can
    /// answer its page faults.
    Requests { migration: u64 },
    /// Pre-copy, before the pause: the source asks the destination to answer (with the same)
    /// once it has taken everything sent before, so that no backlog is left for the pause.
    Sync,
    /// The sender gives up, and says why. Decoded, the reason keeps at most
    /// [`MAX_REASON_CHARS`] of its characters, its control and direction-changing characters
    /// escaped: it is shown in errors, logs and the API, and a peer's words must not run on or
    /// steer a terminal.
    Abort(String),
}

/// The most characters of a peer's reason kept (see [`Message::Abort`]).
pub const MAX_REASON_CHARS: usize = 1024;

/// `reason` as a peer's words are shown: its first [`MAX_REASON_CHARS`] characters, control
/// characters, line and paragraph separators, bidirectional marks and overrides, zero-width
/// and invisible characters (soft hyphen, word joiner, tags) escaped (`\u{1b}`, `\n`,
/// `\u{202e}`, `\u{200b}`, `\u{e0041}`), saying how much was left out.
fn peer_words(reason: &str) -> String {
    let mut shown = String::new();
    let mut chars = reason.chars();
    for c in chars.by_ref().take(MAX_REASON_CHARS) {
        // Marks that reorder or hide what follows: bidirectional marks, overrides and
        // isolates, and zero-width characters.
        let steers = matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{e0000}'..='\u{e007f}'
        );
        if c.is_control() || steers {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    let left = chars.as_str().len();
    if left > 0 {
        shown.push_str(&format!("... ({left} more bytes left out)"));
    }
    shown
}

const KINDS: [&str; 15] = [
    "hello",
    "pages",
    "zero-pages",
    "round",
    "state",
    "switch-over",
    "page-request",
    "received",
    "done",
    "abort",
    "stale",
    "built",
    "resume",
    "sync",
    "requests",
];

impl Message {
    /// The kind byte of a pages message.
    pub(crate) const PAGES_KIND: u8 = 2;

    /// A pages message, if `data` is a whole number of pages.
    pub(crate) fn pages(gpa: u64, data: Vec<u8>) -> Result<Message, ProtocolError> {
        if data.is_empty() || !(data.len() as u64).is_multiple_of(PAGE_SIZE) {
            return Err(ProtocolError::Malformed {
                kind: "pages",
                why: format!(
                    "{} bytes of page data, not a whole number of pages",
                    data.len()
                ),
            });
        }
        Ok(Message::Pages { gpa, data })
    }

    /// The bytes this message takes on the wire, its frame header included.
    pub fn wire_len(&self) -> u64 {
        let payload = match self {
            Message::Pages { data, .. } => 8 + data.len(),
            other => other.encode().len(),
        };
        (crate::wire::HEADER_BYTES + payload) as u64
    }

    /// The kind byte on the wire.
    pub(crate) fn kind(&self) -> u8 {
        1 + match self {
            Message::Hello(_) => 0,
            Message::Pages { .. } => 1,
            Message::ZeroPages { .. } => 2,
            Message::Round { .. } => 3,
            Message::State(_) => 4,
            Message::SwitchOver { .. } => 5,
            Message::PageRequest { .. } => 6,
            Message::Received { .. } => 7,
            Message::Done => 8,
            Message::Abort(_) => 9,
            Message::Stale { .. } => 10,
            Message::Built => 11,
            Message::Resume { .. } => 12,
            Message::Sync => 13,
            Message::Requests { .. } => 14,
        }
    }

    /// The name of kind byte `kind`, if it is one.
    pub(crate) fn kind_name(kind: u8) -> Option<&'static str> {
        KINDS.get(usize::from(kind).checked_sub(1)?).copied()
    }

    /// This message's name, as errors say it.
    pub fn name(&self) -> &'static str {
        KINDS[usize::from(self.kind() - 1)]
    }

    /// Checks the memory a message names against the VM's `layout`: pages inside it, a
    /// received bitmap of its size.
    pub fn check(&self, layout: &Layout) -> Result<(), ProtocolError> {
        let outside = |gpa, count| ProtocolError::OutsideLayout {
            kind: self.name(),
            gpa,
            count,
        };
        match *self {
            Message::Pages { gpa, ref data } => {
                let count = data.len() as u64 / PAGE_SIZE;
                if !layout.contains(gpa, count) {
                    return Err(outside(gpa, count));
                }
            }
            Message::ZeroPages { gpa, count } if !layout.contains(gpa, count) => {
                return Err(outside(gpa, count))
            }
            Message::PageRequest { count, .. } if count > MAX_REQUEST_PAGES => {
                return Err(ProtocolError::Malformed {
                    kind: self.name(),
                    why: format!("{count} pages asked at once, more than {MAX_REQUEST_PAGES}"),
                })
            }
            Message::PageRequest { gpa, count } if !layout.contains(gpa, u64::from(count)) => {
                return Err(outside(gpa, u64::from(count)))
            }
            Message::Received { pages, .. } | Message::Stale { pages, .. }
                if pages != layout.pages() =>
            {
                return Err(ProtocolError::Malformed {
                    kind: self.name(),
                    why: format!("{pages} pages, the VM has {}", layout.pages()),
                })
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Message::Hello(identity) => {
                out.push(identity.vcpus);
                put_u32(&mut out, identity.cpuid_digest);
                put_u32(&mut out, identity.layout.regions.len() as u32);
                for &(gpa, size) in &identity.layout.regions {
                    put_u64(&mut out, gpa);
                    put_u64(&mut out, size);
                }
            }
            Message::Pages { gpa, data } => {
                put_u64(&mut out, *gpa);
                out.extend_from_slice(data);
            }
            Message::ZeroPages { gpa, count } => {
                put_u64(&mut out, *gpa);
                put_u64(&mut out, *count);
            }
            Message::Round { round, pages } => {
                put_u32(&mut out, *round);
                put_u64(&mut out, *pages);
            }
            Message::State(state) => out.extend_from_slice(state),
            Message::SwitchOver {
                post_copy,
                migration,
            } => {
                out.push(u8::from(*post_copy));
                put_u64(&mut out, *migration);
            }
            Message::Resume { migration } | Message::Requests { migration } => {
                put_u64(&mut out, *migration)
            }
            Message::Done | Message::Built | Message::Sync => {}
            Message::PageRequest { gpa, count } => {
                put_u64(&mut out, *gpa);
                put_u32(&mut out, *count);
            }
            Message::Received { pages, bitmap } | Message::Stale { pages, bitmap } => {
                put_u64(&mut out, *pages);
                page_set::encode(&mut out, *pages, bitmap);
            }
            Message::Abort(reason) => out.extend_from_slice(reason.as_bytes()),
        }
        out
    }

    /// Parses the payload of a message of kind byte `kind` (a known one).
    pub(crate) fn decode(kind: u8, payload: &[u8]) -> Result<Message, ProtocolError> {
        let name = Message::kind_name(kind).ok_or(ProtocolError::UnknownKind(kind))?;
        let malformed = |why: String| ProtocolError::Malformed { kind: name, why };
        let mut p = Parser {
            bytes: payload,
            kind: name,
        };
        let message = match kind {
            1 => {
                let vcpus = p.u8()?;
                let cpuid_digest = p.u32()?;
                let regions = p.u32()? as usize;
                if regions > MAX_REGIONS {
                    return Err(malformed(format!("{regions} RAM regions")));
                }
                let layout = Layout::new(
                    (0..regions)
                        .map(|_| Ok((p.u64()?, p.u64()?)))
                        .collect::<Result<_, ProtocolError>>()?,
                );
                if let Some(problem) = layout.problem() {
                    return Err(malformed(problem));
                }
                if vcpus == 0 {
                    return Err(malformed("0 vCPUs".into()));
                }
                Message::Hello(VmIdentity {
                    vcpus,
                    layout,
                    cpuid_digest,
                })
            }
            2 => {
                let gpa = p.u64()?;
                return Message::pages(gpa, p.rest().to_vec());
            }
            3 => Message::ZeroPages {
                gpa: p.u64()?,
                count: p.u64()?,
            },
            4 => Message::Round {
                round: p.u32()?,
                pages: p.u64()?,
            },
            5 => Message::State(p.rest().to_vec()),
            6 => Message::SwitchOver {
                post_copy: match p.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(malformed(format!("post-copy flag {other}"))),
                },
                migration: p.u64()?,
            },
            7 => Message::PageRequest {
                gpa: p.u64()?,
                count: p.u32()?,
            },
            8 | 11 => {
                let pages = p.u64()?;
                let bitmap = page_set::decode(pages, p.rest()).map_err(malformed)?;
                if kind == 8 {
                    Message::Received { pages, bitmap }
                } else {
                    Message::Stale { pages, bitmap }
                }
            }
            9 => Message::Done,
            12 => Message::Built,
            13 => Message::Resume {
                migration: p.u64()?,
            },
            14 => Message::Sync,
            15 => Message::Requests {
                migration: p.u64()?,
            },
            10 => Message::Abort(peer_words(
                std::str::from_utf8(p.rest())
                    .map_err(|_| malformed("the reason is not UTF-8".into()))?,
            )),
            _ => unreachable!("kind_name knows kinds 1 to 15"),
        };
        if !p.bytes.is_empty() {
            return Err(malformed(format!("{} bytes left over", p.bytes.len())));
        }
        if let Message::PageRequest { count: 0, .. } | Message::ZeroPages { count: 0, .. } = message
        {
            return Err(malformed("a count of 0 pages".into()));
        }
        Ok(message)
    }
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// Reads a payload front to back.
struct Parser<'a> {
    bytes: &'a [u8],
    kind: &'static str,
}

impl<'a> Parser<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        if self.bytes.len() < N {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                why: format!("ends {} bytes early", N - self.bytes.len()),
            });
        }
        let (head, rest) = self.bytes.split_at(N);
        self.bytes = rest;
        Ok(head.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_reason_is_cut_short_and_cannot_steer_a_terminal() {
        let decoded = |reason: &str| match Message::decode(10, reason.as_bytes()).unwrap() {
            Message::Abort(shown) => shown,
            other => panic!("{other:?}"),
        };
        assert_eq!(decoded("out of memory"), "out of memory");
        let hostile = "\u{1b}[2J\u{1b}]0;owned\u{7}gone\r\n\u{202e}txt.exe";
        let shown = decoded(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(
            shown,
            "\\u{1b}[2J\\u{1b}]0;owned\\u{7}gone\\r\\n\\u{202e}txt.exe"
        );
        assert_eq!(
            decoded("a\u{61c}b\u{200b}c\u{feff}d"),
            "a\\u{61c}b\\u{200b}c\\u{feff}d"
        );
        // Invisible ones: a soft hyphen, a word joiner, and a tag letter (tags can spell out
        // hidden text).
        assert_eq!(
            decoded("a\u{ad}b\u{2060}c\u{e0041}d"),
            "a\\u{ad}b\\u{2060}c\\u{e0041}d"
        );
        let long = "x".repeat(1 << 20);
        let shown = decoded(&long);
        assert!(
            shown.starts_with(&"x".repeat(MAX_REASON_CHARS)),
            "{}",
            shown.len()
        );
        assert!(
            shown.ends_with("... (1047552 more bytes left out)"),
            "{}",
            &shown[1000..]
        );
    }

    fn layout() -> Layout {
        Layout::new(vec![(0, 0xc000_0000), (1 << 32, 1 << 30)])
    }

    #[test]
    fn pages_outside_the_layout_are_refused() {
        let l = layout();
        let ok = Message::ZeroPages { gpa: 0, count: 16 };
        assert!(ok.check(&l).is_ok());
        for (gpa, count) in [
            (0xc000_0000, 1),           // the MMIO gap
            (0xbfff_f000, 2),           // runs into it
            (0x1000 + 1, 1),            // unaligned
            ((1 << 32) + (1 << 30), 1), // past the end
            (0, u64::MAX),              // overflows
        ] {
            let message = Message::ZeroPages { gpa, count };
            let error = message.check(&l).unwrap_err();
            assert!(
                error.to_string().contains("outside the VM"),
                "{gpa:#x} x {count}: {error}"
            );
        }
        let request = Message::PageRequest {
            gpa: 0xc000_0000,
            count: 1,
        };
        assert!(request.check(&l).is_err());
        let greedy = Message::PageRequest {
            gpa: 0,
            count: MAX_REQUEST_PAGES + 1,
        };
        assert!(greedy
            .check(&l)
            .unwrap_err()
            .to_string()
            .contains("more than"));
        let received = Message::Received {
            pages: 10,
            bitmap: vec![0],
        };
        assert!(received
            .check(&l)
            .unwrap_err()
            .to_string()
            .contains("10 pages"));
    }

    #[test]
    fn payloads_that_do_not_parse_are_refused() {
        let cases: [(u8, Vec<u8>, &str); 8] = [
            (
                2,
                0x1000u64.to_le_bytes().to_vec(),
                "not a whole number of pages",
            ),
            (3, vec![0; 15], "ends 1 bytes early"),
            (3, vec![0; 17], "1 bytes left over"),
            (
                3,
                [0x1000u64.to_le_bytes(), 0u64.to_le_bytes()].concat(),
                "count of 0",
            ),
            (
                8,
                [130u64.to_le_bytes().as_slice(), &[0], &0u64.to_le_bytes()].concat(),
                "a bitmap of 8 bytes",
            ),
            (10, vec![0xff, 0xfe], "not UTF-8"),
            (
                1,
                [
                    vec![0u8],
                    0u32.to_le_bytes().to_vec(),
                    0u32.to_le_bytes().to_vec(),
                ]
                .concat(),
                "0 RAM regions",
            ),
            (
                1,
                [
                    vec![1u8],
                    0u32.to_le_bytes().to_vec(),
                    1u32.to_le_bytes().to_vec(),
                    0u64.to_le_bytes().to_vec(),
                    (1u64 << 40).to_le_bytes().to_vec(),
                ]
                .concat(),
                "more than a migration can move",
            ),
        ];
        for (kind, payload, says) in cases {
            let error = Message::decode(kind, &payload).unwrap_err().to_string();
            assert!(
                error.contains(says),
                "kind {kind}: {error:?} should say {says:?}"
            );
        }
    }

    #[test]
    fn a_hello_whose_vm_cannot_be_is_refused_by_name() {
        let hello = |vcpus: u8, regions: &[(u64, u64)]| {
            let mut payload = vec![vcpus];
            payload.extend(0u32.to_le_bytes());
            payload.extend((regions.len() as u32).to_le_bytes());
            for &(gpa, size) in regions {
                payload.extend(gpa.to_le_bytes());
                payload.extend(size.to_le_bytes());
            }
            Message::decode(1, &payload)
        };
        assert!(hello(1, &[(0, 1 << 20), (1 << 32, 1 << 20)]).is_ok());
        let too_many: Vec<_> = (0..=MAX_REGIONS as u64)
            .map(|i| (i << 20, 1 << 12))
            .collect();
        for (vcpus, regions, says) in [
            (0, &[(0, 1 << 20)][..], "0 vCPUs"),
            (1, &[(0, 0x2000), (0x1000, 0x1000)], "RAM region 1 (0x1000"),
            (1, &[(0x800, 0x1000)], "RAM region 0 (0x800"),
            (1, &[(0, 0x1800)], "RAM region 0 (0x0, 0x1800"),
            (1, &[(0, 0)], "RAM region 0 (0x0, 0x0"),
            (1, &[(u64::MAX - 0xfff, 0x2000)], "RAM region 0"),
            (1, &too_many, "65 RAM regions"),
        ] {
            let error = hello(vcpus, regions).unwrap_err().to_string();
            assert!(error.contains(says), "{error:?} should say {says:?}");
        }
        // A page set must be the VM's size whichever list it is.
        let stale = Message::Stale {
            pages: 10,
            bitmap: vec![0],
        };
        assert!(stale
            .check(&layout())
            .unwrap_err()
            .to_string()
            .contains("10 pages"));
        let pages = Message::Pages {
            gpa: 0xbfff_f000,
            data: vec![0; 2 * 4096],
        };
        assert!(pages
            .check(&layout())
            .unwrap_err()
            .to_string()
            .contains("outside the VM"));
    }

    #[test]
    fn a_peer_vm_that_differs_is_named() {
        let here = VmIdentity {
            vcpus: 2,
            layout: layout(),
            cpuid_digest: 1,
        };
        assert!(here.check_matches(&here.clone()).is_ok());
        let mut other = here.clone();
        other.vcpus = 4;
        assert!(here
            .check_matches(&other)
            .unwrap_err()
            .to_string()
            .contains("2 vCPUs here, 4 there"));
        let mut other = here.clone();
        other.cpuid_digest = 2;
        assert!(here
            .check_matches(&other)
            .unwrap_err()
            .to_string()
            .contains("CPUID"));
        let mut other = here.clone();
        other.layout = Layout::new(vec![(0, 1 << 30)]);
        assert!(here
            .check_matches(&other)
            .unwrap_err()
            .to_string()
            .contains("RAM"));
    }
}
