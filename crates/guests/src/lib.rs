//! Micro-guests: tiny 64-bit x86 programs that faultline boots to test and measure itself.
//!
//! The CPU under KVM is emulated on our build machines, so a guest that does real work must do
//! it in a few instructions per page. Each program is an assembly file in `asm/` (the contract
//! with the VMM is documented in `asm/common.inc`), assembled at build time and embedded here.
//! This crate only knows the programs and the ports they use; loading them is the VMM's job.

/// Guest-physical address every micro-guest is linked and loaded at.
pub const CODE_BASE: u64 = 0x10_0000;

/// The VMM's test device: the I/O ports micro-guests write to. Must match `asm/common.inc`.
pub mod ports {
    /// Any write: the first guest instruction has run.
    pub const STARTED: u16 = 0x510;
    /// Low 32 bits of a report value.
    pub const REPORT_LO: u16 = 0x514;
    /// High 32 bits of a report value; completes the report.
    pub const REPORT_HI: u16 = 0x518;
    /// The vCPU's exit code: 0 is success.
    pub const EXIT: u16 = 0x51c;
    /// A hold point (the value names it): the VMM may keep the vCPU waiting there (tests use
    /// it to snapshot a guest at an exact point of its run).
    pub const HOLD: u16 = 0x520;
}

/// The `touch` guest's default seed.
pub const TOUCH_DEFAULT_SEED: u64 = 0x5eed_f00d;

/// What the `hello` guest reports: "faultln!" as a little-endian u64.
pub const HELLO_REPORT: u64 = u64::from_le_bytes(*b"faultln!");

/// One embedded micro-guest.
#[derive(Debug, Clone, Copy)]
pub struct MicroGuest {
    /// Name used on the command line (`faultline run --guest NAME`).
    pub name: &'static str,
    /// One line on what it does and what it reports.
    pub summary: &'static str,
    /// Whether it reads or writes the work range (so it needs RAM beyond the boot area).
    pub uses_work_range: bool,
    /// The argument (rdx) used when the command line gives none.
    pub default_arg: u64,
    /// Which of each vCPU's reports is the wrapping sum of the first word of every page of its
    /// slice of the work range, if any: summed over vCPUs, it must equal the host's sum.
    pub checksum_report: Option<usize>,
    /// Flat binary, to be loaded at [`CODE_BASE`].
    pub code: &'static [u8],
}

macro_rules! guest {
    ($name:literal, $uses_range:expr, $default_arg:expr, $checksum:expr, $summary:literal) => {
        MicroGuest {
            name: $name,
            summary: $summary,
            uses_work_range: $uses_range,
            default_arg: $default_arg,
            checksum_report: $checksum,
            code: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".bin")),
        }
    };
}

/// Every micro-guest, in the order `faultline guests` lists them.
pub const ALL: &[MicroGuest] = &[
    guest!(
        "hello",
        false,
        0,
        None,
        "reports the constant \"faultln!\" and exits 0"
    ),
    guest!(
        "touch",
        true,
        TOUCH_DEFAULT_SEED,
        Some(0),
        "writes (address ^ arg) into one word of every page of the work range; reports the sum"
    ),
    guest!(
        "timedtouch",
        true,
        TOUCH_DEFAULT_SEED,
        Some(0),
        "like touch, and stores each first write's TSC ticks in the page's second word"
    ),
    guest!(
        "checksum",
        true,
        0,
        Some(0),
        "reads one word of every page of the work range; reports the sum"
    ),
    guest!(
        "dirty",
        true,
        3,
        Some(1),
        "rewrites every page (address + pass) for arg passes (0 = forever); reports passes, sum"
    ),
    guest!(
        "mix",
        true,
        3,
        Some(1),
        "mixes each page's word with its address and the pass, arg passes (0 = forever); reports passes, sum"
    ),
    guest!(
        "counter",
        true,
        3,
        Some(1),
        "adds 1 to the first word of every page, arg passes (0 = forever), as QEMU's migration test guest; reports passes, sum"
    ),
    guest!(
        "scatter",
        true,
        0,
        None,
        "reads one word from each of arg pages spread over the work range; reports their sum"
    ),
    guest!(
        "stores",
        true,
        1,
        None,
        "writes known values with 1/2/4/8-byte and string stores into every arg-th page, two passes (hold points 1, 2); reports a sum"
    ),
    guest!(
        "straddle",
        true,
        0x1122_3344_5566_7788,
        None,
        "writes arg as one 8-byte store across the first two pages of the work range; reports it read back"
    ),
    guest!(
        "cpuid",
        false,
        0,
        None,
        "reports CPUID 0x40000000 ebx, 0x40000001 eax (KVM features) and leaf 1 ecx"
    ),
    guest!(
        "asyncpf",
        true,
        0,
        None,
        "enables KVM async page faults like Linux (MSRs 0x4b564d06, 0x4b564d02); reports both"
    ),
    guest!(
        "fault",
        false,
        0,
        None,
        "divides by zero with an empty IDT: a triple fault the VMM must report as a crash"
    ),
];

/// A 16-bit real-mode program (not a micro-guest) that writes STARTED, then exit code 0:
/// what the boot benchmark runs on a bare KVM VM as its baseline.
pub const BASELINE_REAL_MODE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/baseline16.bin"));

/// Finds a micro-guest by name.
pub fn find(name: &str) -> Option<&'static MicroGuest> {
    ALL.iter().find(|guest| guest.name == name)
}

/// The checksum the `touch` guest reports for pages at `start + i * 4096`, `i < pages`.
pub fn touch_checksum(start: u64, pages: u64, seed: u64) -> u64 {
    (0..pages).fold(0u64, |sum, i| sum.wrapping_add((start + i * 4096) ^ seed))
}

/// The multiplier of the `mix` guest (must match `asm/mix.S`).
pub const MIX_MULTIPLIER: u64 = 0x5851_f42d_4c95_7f2d;

/// The word the `mix` guest leaves at `address` after `passes` passes from `initial`.
pub fn mix_word(address: u64, initial: u64, passes: u64) -> u64 {
    (1..=passes).fold(initial, |v, pass| {
        v.wrapping_mul(MIX_MULTIPLIER).wrapping_add(address ^ pass)
    })
}

/// The checksum the `mix` guest reports after `passes` passes over a range that started zero.
pub fn mix_checksum(start: u64, pages: u64, passes: u64) -> u64 {
    (0..pages).fold(0u64, |sum, i| {
        sum.wrapping_add(mix_word(start + i * 4096, 0, passes))
    })
}

/// The register the `counter` guest keeps its pass in (must match `asm/counter.S`): the pass
/// under way, counted from 1, or the last pass once it is done.
pub fn counter_pass(regs_r13: u64) -> u64 {
    regs_r13
}

/// Checks the first words of one vCPU's slice of the `counter` guest's range, in address
/// order, taken while it ran or stopped anywhere: they must all be equal, or hold a value up to
/// one edge and that value less one after it; with the vCPU's `pass` (see [`counter_pass`]),
/// every value must also be that pass or the one before. Returns the passes the slice shows
/// as complete. A page that missed a write (say, one a migration copied before the guest wrote
/// it again, and never copied again) breaks the pattern, and the error names it by index.
pub fn counter_check(words: &[u64], pass: Option<u64>) -> Result<u64, String> {
    let Some(&last) = words.last() else {
        return Ok(0);
    };
    if let Some(pass) = pass {
        if let Some((index, value)) = words
            .iter()
            .enumerate()
            .find(|&(_, &v)| v != pass && v.wrapping_add(1) != pass)
        {
            return Err(format!(
                "page {index} holds {value}, but its vCPU is in pass {pass}"
            ));
        }
    }
    let mut edge: Option<usize> = None;
    for (index, pair) in words.windows(2).enumerate() {
        let (before, after) = (pair[0], pair[1]);
        if before == after {
            continue;
        }
        if before == after.wrapping_add(1) && edge.is_none() {
            edge = Some(index + 1);
            continue;
        }
        return Err(format!(
            "page {} holds {after} after page {} holding {before}{}",
            index + 1,
            index,
            match edge {
                Some(at) => format!(" (the pass edge was already at page {at})"),
                None => String::new(),
            }
        ));
    }
    // The last page holds the passes done over the whole slice.
    Ok(last)
}

/// The pages the `scatter` guest reads: `(first page address, stride in bytes, count)`.
pub fn scatter_pages(start: u64, pages: u64, arg: u64) -> (u64, u64, u64) {
    let count = if arg == 0 || arg > pages { pages } else { arg };
    let stride = pages.checked_div(count).unwrap_or(0) * 4096;
    (start, stride, count)
}

/// The multiplier of the `stores` guest (must match `asm/stores.S`).
pub const STORES_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// One store of the `stores` guest: `bytes` written at `gpa`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    pub gpa: u64,
    pub bytes: Vec<u8>,
}

/// Whether the `stores` guest's pass `pass` (1 or 2) writes page `index` of its range.
pub fn stores_writes_page(index: u64, stride: u64, pass: u64) -> bool {
    let stride = stride.max(1);
    index % stride == (pass - 1) % stride
}

/// The stores of one pass of the `stores` guest over `pages` pages from `start`, in the
/// order the guest makes them (the string store is one store per byte).
pub fn stores_pass(start: u64, pages: u64, stride: u64, pass: u64) -> Vec<Store> {
    let mut out = Vec::new();
    for index in (0..pages).filter(|&i| stores_writes_page(i, stride, pass)) {
        let a = start + index * 4096;
        let v = a
            .wrapping_mul(STORES_MULTIPLIER)
            .wrapping_add(pass)
            .to_le_bytes();
        for (offset, width) in [(0, 1), (8, 2), (16, 4), (24, 8)] {
            out.push(Store {
                gpa: a + offset,
                bytes: v[..width].to_vec(),
            });
        }
        for byte in 0..3 {
            out.push(Store {
                gpa: a + 48 + byte,
                bytes: vec![v[1]],
            });
        }
    }
    out
}

/// What the `stores` guest reports for its range: the sum of the qwords at A + 24.
pub fn stores_checksum(start: u64, pages: u64, stride: u64) -> u64 {
    (0..pages).fold(0u64, |sum, index| {
        let last = (1..=2)
            .rev()
            .find(|&p| stores_writes_page(index, stride, p));
        let a = start + index * 4096;
        sum.wrapping_add(last.map_or(0, |p| a.wrapping_mul(STORES_MULTIPLIER).wrapping_add(p)))
    })
}

/// The checksum the `dirty` guest reports after `passes` passes over the range.
pub fn dirty_checksum(start: u64, pages: u64, passes: u64) -> u64 {
    (0..pages).fold(0u64, |sum, i| sum.wrapping_add(start + i * 4096 + passes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn counter_memory_is_one_value_or_two_at_one_edge() {
        assert_eq!(counter_check(&[], None), Ok(0));
        assert_eq!(counter_check(&[5, 5, 5], None), Ok(5));
        assert_eq!(counter_check(&[6, 6, 5, 5], None), Ok(5));
        assert_eq!(counter_check(&[6, 5, 5, 5], Some(6)), Ok(5));
        assert_eq!(counter_check(&[5, 5, 5], Some(6)), Ok(5));
        // A page that missed a write, before or after the edge.
        let missed = counter_check(&[6, 5, 6, 5], None).unwrap_err();
        assert!(missed.contains("page 2"), "{missed}");
        let missed = counter_check(&[6, 6, 4, 4], None).unwrap_err();
        assert!(missed.contains("page 2 holds 4"), "{missed}");
        assert!(
            counter_check(&[5, 5, 6], None).is_err(),
            "a later page ahead"
        );
        assert!(counter_check(&[7, 6, 5], None).is_err(), "two edges");
        // Consistent, but behind the vCPU: the memory is older than its registers.
        let stale = counter_check(&[4, 4, 4], Some(6)).unwrap_err();
        assert!(stale.contains("vCPU is in pass 6"), "{stale}");
    }
    use super::*;

    fn inc_value(name: &str) -> u64 {
        let inc = include_str!("../asm/common.inc");
        let line = inc
            .lines()
            .find(|line| line.starts_with(&format!(".set {name},")))
            .unwrap_or_else(|| panic!("{name} missing from common.inc"));
        let value = line
            .split(',')
            .nth(1)
            .unwrap()
            .split('#')
            .next()
            .unwrap()
            .trim();
        u64::from_str_radix(value.trim_start_matches("0x"), 16).unwrap()
    }

    #[test]
    fn ports_match_the_assembly_contract() {
        assert_eq!(inc_value("PORT_STARTED"), u64::from(ports::STARTED));
        assert_eq!(inc_value("PORT_REPORT_LO"), u64::from(ports::REPORT_LO));
        assert_eq!(inc_value("PORT_REPORT_HI"), u64::from(ports::REPORT_HI));
        assert_eq!(inc_value("PORT_EXIT"), u64::from(ports::EXIT));
        assert_eq!(inc_value("PORT_HOLD"), u64::from(ports::HOLD));
    }

    #[test]
    fn mix_multiplier_matches_the_assembly() {
        let source = include_str!("../asm/mix.S");
        assert!(source.contains(&format!(".set MIX_MULTIPLIER, {MIX_MULTIPLIER:#x}")));
    }

    #[test]
    fn stores_multiplier_matches_the_assembly() {
        let source = include_str!("../asm/stores.S");
        assert!(source.contains(&format!(".set STORES_MULTIPLIER, {STORES_MULTIPLIER:#x}")));
    }

    #[test]
    fn stores_passes_split_the_pages_by_stride() {
        assert_eq!(stores_pass(0x1000, 3, 1, 1).len(), 3 * 7);
        let pass1: Vec<u64> = stores_pass(0, 4, 2, 1)
            .iter()
            .map(|s| s.gpa / 4096)
            .collect();
        let pass2: Vec<u64> = stores_pass(0, 4, 2, 2)
            .iter()
            .map(|s| s.gpa / 4096)
            .collect();
        assert!(pass1.iter().all(|p| p % 2 == 0) && pass2.iter().all(|p| p % 2 == 1));
        let first = &stores_pass(0x2000, 1, 1, 2)[..5];
        let v = 0x2000u64.wrapping_mul(STORES_MULTIPLIER) + 2;
        assert_eq!(first[0].bytes, [v as u8]);
        assert_eq!(first[3].bytes, v.to_le_bytes());
        assert_eq!(
            first[4],
            Store {
                gpa: 0x2000 + 48,
                bytes: vec![(v >> 8) as u8]
            }
        );
        assert_eq!(stores_checksum(0x2000, 1, 1), v);
    }

    #[test]
    fn code_base_matches_the_linker_address() {
        let build = include_str!("../build.rs");
        assert!(build.contains(&format!("CODE_BASE: &str = \"{CODE_BASE:#x}\"")));
    }

    #[test]
    fn every_guest_is_assembled_and_small() {
        for guest in ALL {
            assert!(!guest.code.is_empty(), "{} is empty", guest.name);
            assert!(
                guest.code.len() < 4096,
                "{} is larger than a page",
                guest.name
            );
        }
        let names: std::collections::HashSet<_> = ALL.iter().map(|g| g.name).collect();
        assert_eq!(names.len(), ALL.len(), "guest names are unique");
    }

    #[test]
    fn checksum_reports_are_declared_for_the_page_summing_guests() {
        let summing: Vec<_> = ALL
            .iter()
            .filter(|g| g.checksum_report.is_some())
            .map(|g| g.name)
            .collect();
        assert_eq!(
            summing,
            ["touch", "timedtouch", "checksum", "dirty", "mix", "counter"]
        );
        assert!(ALL
            .iter()
            .all(|g| g.checksum_report.is_none() || g.uses_work_range));
    }

    #[test]
    fn hello_report_spells_its_name() {
        assert_eq!(&HELLO_REPORT.to_le_bytes(), b"faultln!");
        assert!(find("hello").is_some());
        assert!(find("nope").is_none());
    }

    #[test]
    fn checksums_of_known_ranges() {
        assert_eq!(touch_checksum(0x20_0000, 0, 7), 0);
        assert_eq!(touch_checksum(0x20_0000, 2, 0), 0x20_0000 + 0x20_1000);
        assert_eq!(dirty_checksum(0x1000, 2, 3), 0x1003 + 0x2003);
        // One pass from zero leaves A ^ 1; two passes mix that again.
        assert_eq!(mix_word(0x1000, 0, 1), 0x1001);
        assert_eq!(
            mix_word(0x1000, 0, 2),
            0x1001u64.wrapping_mul(MIX_MULTIPLIER).wrapping_add(0x1002)
        );
        assert_eq!(mix_checksum(0x1000, 2, 1), 0x1001 + 0x2001);
        assert_eq!(scatter_pages(0x1000, 100, 10), (0x1000, 10 * 4096, 10));
        assert_eq!(scatter_pages(0x1000, 5, 0), (0x1000, 4096, 5));
    }
}
