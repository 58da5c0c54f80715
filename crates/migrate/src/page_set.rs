//! How a set of pages (one bit per page of RAM, regions back to back) travels: as whichever
//! of two forms is shorter. A bitmap costs a bit per page of RAM (32 KiB for 1 GiB) whatever
//! the set holds; runs of consecutive pages cost 16 bytes each. A post-copy's list of the
//! pages to come is every page, and it is sent inside the downtime: as one run it is 17 bytes
//! instead of 32 KiB.
//!
//! The payload is a form byte, then either the bitmap's words ([`BITMAP`]) or the runs
//! ([`RUNS`]: first page and count, ascending, not overlapping, none empty).

use crate::wire::MAX_PAYLOAD;

/// The bitmap's 64-bit words follow, as many as the pages need.
const BITMAP: u8 = 0;
/// Runs follow: first page and count, 8 bytes each.
const RUNS: u8 = 1;

/// Appends the set `bitmap` in its shorter form.
pub(crate) fn encode(out: &mut Vec<u8>, bitmap: &[u64]) {
    // A run costs two words: runs win while there are fewer than half as many as words.
    match runs_of(bitmap, bitmap.len().div_ceil(2).saturating_sub(1)) {
        Some(runs) => {
            out.push(RUNS);
            for (first, count) in runs {
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
        }
        None => {
            out.push(BITMAP);
            for word in bitmap {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
    }
}

/// The runs `(first, count)` of set bits in `bitmap`, or `None` when there are more than
/// `most`.
fn runs_of(bitmap: &[u64], most: usize) -> Option<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (index, &word) in bitmap.iter().enumerate() {
        let base = index as u64 * 64;
        let mut bits = word;
        while bits != 0 {
            let start = u64::from(bits.trailing_zeros());
            let len = u64::from((bits >> start).trailing_ones());
            match runs.last_mut() {
                Some((first, count)) if *first + *count == base + start => *count += len,
                _ => {
                    if runs.len() == most {
                        return None;
                    }
                    runs.push((base + start, len));
                }
            }
            if start + len == 64 {
                break;
            }
            bits &= !(((1u64 << len) - 1) << start);
        }
    }
    Some(runs)
}

/// The bitmap of the set of `pages` pages that `payload` holds (after the page count), or
/// why it is malformed. `pages` must be at most what a bitmap payload could carry, so that a
/// hostile count cannot make the bitmap huge.
pub(crate) fn decode(pages: u64, payload: &[u8]) -> Result<Vec<u64>, String> {
    let words = pages.div_ceil(64);
    if words * 8 > u64::from(MAX_PAYLOAD) {
        return Err(format!("a set of {pages} pages, more than any VM's"));
    }
    let (&form, rest) = payload
        .split_first()
        .ok_or_else(|| "no form byte".to_string())?;
    let le = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    match form {
        BITMAP => {
            if rest.len() as u64 != words * 8 {
                return Err(format!(
                    "a bitmap of {} bytes for {pages} pages",
                    rest.len()
                ));
            }
            Ok(rest.chunks_exact(8).map(le).collect())
        }
        RUNS => {
            if rest.len() % 16 != 0 {
                return Err(format!("runs of {} bytes, not 16 each", rest.len()));
            }
            let mut bitmap = vec![0u64; words as usize];
            let mut end = 0;
            for run in rest.chunks_exact(16) {
                let (first, count) = (le(&run[..8]), le(&run[8..]));
                let last = first
                    .checked_add(count)
                    .filter(|&last| count > 0 && first >= end && last <= pages)
                    .ok_or_else(|| {
                        format!(
                            "a run of {count} pages from page {first} (after page {end}, of \
                             {pages})"
                        )
                    })?;
                set_range(&mut bitmap, first, count);
                end = last;
            }
            Ok(bitmap)
        }
        other => Err(format!("page set form {other}")),
    }
}

/// Sets bits `first..first + count` of `bitmap`, a word at a time.
fn set_range(bitmap: &mut [u64], first: u64, count: u64) {
    let (mut page, end) = (first, first + count);
    while page < end {
        let bit = page % 64;
        let len = (64 - bit).min(end - page);
        let mask = if len == 64 {
            u64::MAX
        } else {
            ((1u64 << len) - 1) << bit
        };
        bitmap[(page / 64) as usize] |= mask;
        page += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(pages: u64, bitmap: &[u64]) -> (u8, usize) {
        let mut out = Vec::new();
        encode(&mut out, bitmap);
        assert_eq!(decode(pages, &out).unwrap(), bitmap);
        (out[0], out.len())
    }

    #[test]
    fn every_set_comes_back_in_its_shorter_form() {
        // 1 GiB of pages, all of them: one run.
        let all = vec![u64::MAX; 4096];
        assert_eq!(round_trip(4096 * 64, &all), (RUNS, 17));
        // None: no runs at all.
        assert_eq!(round_trip(4096 * 64, &vec![0; 4096]), (RUNS, 1));
        // Every other page: runs would be 32 times the bitmap.
        let scattered = vec![0x5555_5555_5555_5555u64; 64];
        assert_eq!(round_trip(64 * 64, &scattered), (BITMAP, 1 + 64 * 8));
        // Runs across words, at word edges, a last partial word.
        let mut edges = vec![0u64; 16];
        edges[0] = 1 << 63;
        edges[1] = u64::MAX;
        edges[2] = 1;
        edges[5] = 0b1011 << 60;
        edges[15] = 0b11;
        assert_eq!(round_trip(15 * 64 + 2, &edges), (RUNS, 1 + 4 * 16));
        // Exactly as many runs as a bitmap is long: the bitmap (it is no longer).
        let mut even = vec![0u64; 4];
        even[0] = 1;
        even[2] = 1;
        assert_eq!(round_trip(256, &even).0, BITMAP);
    }

    #[test]
    fn runs_that_do_not_make_a_set_are_refused() {
        let runs = |list: &[(u64, u64)]| {
            let mut out = vec![RUNS];
            for &(first, count) in list {
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            out
        };
        let cases: [(u64, Vec<u8>, &str); 7] = [
            (100, runs(&[(90, 11)]), "a run of 11 pages from page 90"),
            (100, runs(&[(5, 0)]), "a run of 0 pages"),
            (
                100,
                runs(&[(10, 5), (12, 3)]),
                "from page 12 (after page 15",
            ),
            (100, runs(&[(u64::MAX, 2)]), "a run of 2 pages"),
            (100, vec![RUNS, 0, 0, 0], "runs of 3 bytes"),
            (100, vec![7], "page set form 7"),
            (1 << 40, runs(&[]), "more than any VM's"),
        ];
        for (pages, payload, says) in cases {
            let error = decode(pages, &payload).unwrap_err();
            assert!(error.contains(says), "{error:?} should say {says:?}");
        }
        assert!(decode(100, &[]).unwrap_err().contains("no form byte"));
    }
}
