//! A fixed-size bitmap of atomics: one bit per page, shared by the fault and background
//! threads without a lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// `len` bits, all clear at first.
#[derive(Debug)]
#[allow(clippy::len_without_is_empty)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    len: usize,
}

impl AtomicBitmap {
    pub fn new(len: usize) -> Self {
        AtomicBitmap {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn locate(&self, bit: usize) -> (&AtomicU64, u64) {
        assert!(bit < self.len, "bit {bit} out of {}", self.len);
        (&self.words[bit / 64], 1 << (bit % 64))
    }

    pub fn get(&self, bit: usize) -> bool {
        let (word, mask) = self.locate(bit);
        word.load(Ordering::Acquire) & mask != 0
    }

    pub fn set(&self, bit: usize) {
        let (word, mask) = self.locate(bit);
        word.fetch_or(mask, Ordering::AcqRel);
    }

    pub fn clear(&self, bit: usize) {
        let (word, mask) = self.locate(bit);
        word.fetch_and(!mask, Ordering::AcqRel);
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        for (i, word) in self.words.iter().enumerate() {
            let bits = (self.len - i * 64).min(64);
            let mask = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            word.store(mask, Ordering::Release);
        }
    }

    /// Sets the bit; true if this call changed it (it was clear).
    pub fn test_and_set(&self, bit: usize) -> bool {
        let (word, mask) = self.locate(bit);
        word.fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    /// Number of set bits.
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }

    /// Bytes of memory the bits take.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear_count() {
        let map = AtomicBitmap::new(130);
        assert!(!map.get(129));
        map.set(129);
        map.set(0);
        assert!(map.get(129) && map.get(0));
        assert_eq!(map.count(), 2);
        map.clear(0);
        assert_eq!(map.count(), 1);
        assert_eq!(map.bytes(), 24);
    }

    #[test]
    fn test_and_set_claims_once() {
        let map = AtomicBitmap::new(8);
        assert!(map.test_and_set(3));
        assert!(!map.test_and_set(3));
    }

    #[test]
    fn concurrent_claims_have_one_winner_per_bit() {
        let map = std::sync::Arc::new(AtomicBitmap::new(4096));
        let wins: usize = (0..4)
            .map(|_| {
                let map = std::sync::Arc::clone(&map);
                std::thread::spawn(move || (0..4096).filter(|bit| map.test_and_set(*bit)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(wins, 4096);
    }

    #[test]
    #[should_panic(expected = "out of")]
    fn out_of_range_panics() {
        AtomicBitmap::new(10).get(10);
    }
}
