//! How a set of pages (one bit per page of RAM, regions back to back) travels: as whichever
//! of two forms is shorter. A bitmap costs a bit per page of RAM (32 KiB for 1 GiB) whatever
//! the set holds; runs of consecutive pages cost 16 bytes each. A post-copy's list of the
//! pages to come is every page, and it is sent inside the downtime: as one run it is 17 bytes
//! instead of 32 KiB.
//!
//! The payload is a form byte, then either the bitmap's words ([`BITMAP`]) or the runs
//! ([`RUNS`]: first page and count, ascending, not overlapping, none empty).

use std::borrow::Cow;

use crate::wire::MAX_PAYLOAD;

/// The bitmap's 64-bit words follow, as many as the pages need; bits past the last page are
/// clear.
const BITMAP: u8 = 0;
/// Runs follow: first page and count, 8 bytes each (16 a run).
const RUNS: u8 = 1;

/// The most pages a set may have: as many as a bitmap in one frame can hold (after the page
/// count and the form byte): 134,217,600 pages, 512 GiB of RAM less 512 KiB.
pub(crate) const MAX_SET_PAGES: u64 = (MAX_PAYLOAD as u64 - 9) / 8 * 64;

/// Appends the set of `pages` pages `bitmap` (a word per 64 pages) in its shorter form. Bits
/// past the last page are not part of the set, and do not travel.
pub(crate) fn encode(out: &mut Vec<u8>, pages: u64, bitmap: &[u64]) {
    debug_assert_eq!(
        bitmap.len() as u64,
        pages.div_ceil(64),
        "a bitmap for {pages} pages"
    );
    let bitmap = without_bits_past(pages, bitmap);
    // A run costs two words: runs win while there are fewer than half as many as words.
    match runs_of(&bitmap, bitmap.len().div_ceil(2).saturating_sub(1)) {
        Some(runs) => {
            out.push(RUNS);
            for (first, count) in runs {
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
        }
        None => {
            out.push(BITMAP);
            for word in bitmap.iter() {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
    }
}

/// The bits of the last word of `bitmap` that stand for pages, for a set of `pages` pages.
fn last_word_mask(pages: u64) -> u64 {
    match pages % 64 {
        0 => u64::MAX,
        used => (1u64 << used) - 1,
    }
}

/// `bitmap` with any bit past page `pages` cleared (copied only if there is one).
fn without_bits_past(pages: u64, bitmap: &[u64]) -> Cow<'_, [u64]> {
    let mask = last_word_mask(pages);
    match bitmap.last() {
        Some(&last) if last & !mask != 0 => {
            let mut clean = bitmap.to_vec();
            *clean.last_mut().expect("not empty") &= mask;
            Cow::Owned(clean)
        }
        _ => Cow::Borrowed(bitmap),
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
/// why it is malformed. `pages` must be at most [`MAX_SET_PAGES`], so that a hostile count
/// cannot make the bitmap larger than a frame could have carried.
pub(crate) fn decode(pages: u64, payload: &[u8]) -> Result<Vec<u64>, String> {
    if pages > MAX_SET_PAGES {
        return Err(format!(
            "a set of {pages} pages, more than a set may have ({MAX_SET_PAGES})"
        ));
    }
    let words = pages.div_ceil(64);
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
            let bitmap: Vec<u64> = rest.chunks_exact(8).map(le).collect();
            if bitmap
                .last()
                .is_some_and(|&last| last & !last_word_mask(pages) != 0)
            {
                return Err(format!("a bitmap with bits past its last page, {pages}"));
            }
            Ok(bitmap)
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
        encode(&mut out, pages, bitmap);
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
        // One fewer than that: runs.
        let mut two = vec![0u64; 6];
        two[0] = 1;
        two[4] = 1;
        assert_eq!(round_trip(384, &two), (RUNS, 1 + 2 * 16));
    }

    #[test]
    fn bits_past_the_last_page_neither_travel_nor_come() {
        // 70 pages: bits 6 to 63 of the second word are no pages.
        for stray in [vec![1, (1 << 5) | (1 << 63)], vec![0x5555, 0xffff_0015]] {
            let mut out = Vec::new();
            encode(&mut out, 70, &stray);
            let mut clean = stray.clone();
            clean[1] &= (1 << 6) - 1;
            assert_eq!(decode(70, &out).unwrap(), clean);
        }
        let mut bitmap = vec![BITMAP];
        bitmap.extend_from_slice(&1u64.to_le_bytes());
        bitmap.extend_from_slice(&(1u64 << 6).to_le_bytes());
        assert!(decode(70, &bitmap)
            .unwrap_err()
            .contains("bits past its last page"));
    }

    #[test]
    fn random_sets_come_back_bit_for_bit() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..500 {
            let pages = next() % 5000;
            let words = pages.div_ceil(64) as usize;
            // Runs of set pages and gaps, each from 1 to 1, 3, 8 or 300 pages long (long runs
            // with holes of a page or two as well as scattered pages).
            let lengths = [1, 3, 8, 300];
            let longest_run = lengths[(next() % 4) as usize];
            let longest_gap = lengths[(next() % 4) as usize];
            let mut bits = Vec::new();
            let mut set = next() % 2 == 0;
            while (bits.len() as u64) < pages {
                let longest = if set { longest_run } else { longest_gap };
                bits.extend(std::iter::repeat_n(set, 1 + (next() % longest) as usize));
                set = !set;
            }
            bits.truncate(pages as usize);
            let mut bitmap = vec![0u64; words];
            for (page, _) in bits.iter().enumerate().filter(|(_, &set)| set) {
                bitmap[page / 64] |= 1 << (page % 64);
            }
            let mut out = Vec::new();
            encode(&mut out, pages, &bitmap);
            let back = decode(pages, &out).unwrap();
            for (page, &set) in bits.iter().enumerate() {
                assert_eq!(
                    back[page / 64] >> (page % 64) & 1 == 1,
                    set,
                    "page {page} of {pages}"
                );
            }
            assert_eq!(back, bitmap);
        }
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
            (MAX_SET_PAGES + 1, runs(&[]), "more than a set may have"),
        ];
        for (pages, payload, says) in cases {
            let error = decode(pages, &payload).unwrap_err();
            assert!(error.contains(says), "{error:?} should say {says:?}");
        }
        assert!(decode(100, &[]).unwrap_err().contains("no form byte"));
    }
}
