//! The in-memory bits of one dirty bitmap: shared by every writer thread,
//! set with atomic operations, allocated in chunks on first use so that an
//! unwritten disk costs no memory.
//!
//! Bit `i` covers guest bytes `[i << granularity_bits, (i + 1) << granularity_bits)`.
//! On disk, bit `i` is bit `i % 8` (least significant first) of byte `i / 8`
//! of the bitmap data, so a 64-bit word serializes as its little-endian bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Words per chunk (32 KiB of memory, 2^18 bits).
const CHUNK_WORDS: usize = 4096;
/// Bits per chunk.
const CHUNK_BITS: u64 = CHUNK_WORDS as u64 * 64;

/// A growable set of bits, safe to set from many threads at once.
#[derive(Debug, Default)]
pub(crate) struct DirtyBits {
    /// Number of bits.
    nbits: u64,
    /// Chunks of `CHUNK_WORDS` words; unset means all zero.
    chunks: Vec<OnceLock<Box<[AtomicU64]>>>,
    /// Chunks allocated so far.
    allocated: AtomicU64,
}

fn new_chunk() -> Box<[AtomicU64]> {
    (0..CHUNK_WORDS).map(|_| AtomicU64::new(0)).collect()
}

impl DirtyBits {
    /// `nbits` clear bits.
    pub(crate) fn new(nbits: u64) -> DirtyBits {
        let n = nbits.div_ceil(CHUNK_BITS) as usize;
        DirtyBits { nbits, chunks: (0..n).map(|_| OnceLock::new()).collect(), allocated: AtomicU64::new(0) }
    }

    #[cfg(test)]
    /// Number of bits.
    pub(crate) fn len(&self) -> u64 {
        self.nbits
    }

    /// Bytes of memory the bits take: the chunk index and the chunks
    /// allocated (O(1)).
    pub(crate) fn memory(&self) -> u64 {
        Self::index_bytes(self.nbits) + self.allocated.load(Ordering::Relaxed) * CHUNK_WORDS as u64 * 8
    }

    /// Bytes the chunk index of `nbits` bits takes, allocated up front.
    pub(crate) fn index_bytes(nbits: u64) -> u64 {
        nbits.div_ceil(CHUNK_BITS) * std::mem::size_of::<OnceLock<Box<[AtomicU64]>>>() as u64
    }

    fn word(&self, w: u64) -> &AtomicU64 {
        let c = &self.chunks[(w / CHUNK_WORDS as u64) as usize];
        let chunk = c.get_or_init(|| {
            self.allocated.fetch_add(1, Ordering::Relaxed);
            new_chunk()
        });
        &chunk[(w % CHUNK_WORDS as u64) as usize]
    }

    fn peek_word(&self, w: u64) -> u64 {
        match self.chunks[(w / CHUNK_WORDS as u64) as usize].get() {
            Some(c) => c[(w % CHUNK_WORDS as u64) as usize].load(Ordering::Relaxed),
            None => 0,
        }
    }

    /// Sets bits `[first, end)` (clamped to the length).
    pub(crate) fn set_range(&self, first: u64, end: u64) {
        let end = end.min(self.nbits);
        let mut b = first;
        while b < end {
            let w = b / 64;
            let lo = b % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            let word = self.word(w);
            // A load first: rewriting a dirty area leaves the cache line shared.
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::Relaxed);
            }
            b = w * 64 + hi;
        }
    }

    #[cfg(test)]
    /// Whether bit `i` is set.
    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.nbits && self.peek_word(i / 64) & (1 << (i % 64)) != 0
    }

    /// Clears every bit (and gives the memory back).
    pub(crate) fn clear(&mut self) {
        for c in &mut self.chunks {
            *c = OnceLock::new();
        }
        self.allocated.store(0, Ordering::Relaxed);
    }

    #[cfg(test)]
    /// Sets every bit that is set in `other` (whose length may differ: the
    /// common part is merged).
    pub(crate) fn or_from(&self, other: &DirtyBits) {
        let words = self.nbits.min(other.nbits).div_ceil(64);
        let last_bits = self.nbits.min(other.nbits) % 64;
        for w in 0..words {
            let mut v = other.peek_word(w);
            if w + 1 == words && last_bits != 0 {
                v &= (1u64 << last_bits) - 1;
            }
            if v != 0 {
                self.word(w).fetch_or(v, Ordering::Relaxed);
            }
        }
    }

    /// Changes the length to `nbits`: new bits are clear, bits past the new
    /// end are dropped.
    pub(crate) fn resize(&mut self, nbits: u64) {
        let n = nbits.div_ceil(CHUNK_BITS) as usize;
        if n < self.chunks.len() {
            let dropped = self.chunks[n..].iter().filter(|c| c.get().is_some()).count() as u64;
            self.allocated.fetch_sub(dropped, Ordering::Relaxed);
        }
        self.chunks.resize_with(n, OnceLock::new);
        if nbits < self.nbits && !nbits.is_multiple_of(64) {
            let w = nbits / 64;
            if self.peek_word(w) != 0 {
                self.word(w).fetch_and((1u64 << (nbits % 64)) - 1, Ordering::Relaxed);
            }
        }
        if nbits < self.nbits {
            // Whole words past the end inside the last chunk.
            let first_dead = nbits.div_ceil(64);
            let chunk_end = (n as u64) * CHUNK_WORDS as u64;
            for w in first_dead..chunk_end.min(self.nbits.div_ceil(64)) {
                if self.peek_word(w) != 0 {
                    self.word(w).store(0, Ordering::Relaxed);
                }
            }
        }
        self.nbits = nbits;
    }

    /// Whether any bit of words `[w0, w1)` is set.
    pub(crate) fn any_in_words(&self, w0: u64, w1: u64) -> bool {
        let mut w = w0;
        while w < w1 {
            let ci = (w / CHUNK_WORDS as u64) as usize;
            let chunk_end = ((ci as u64 + 1) * CHUNK_WORDS as u64).min(w1);
            match self.chunks.get(ci).and_then(|c| c.get()) {
                None => {}
                Some(c) => {
                    for x in w..chunk_end {
                        if c[(x % CHUNK_WORDS as u64) as usize].load(Ordering::Relaxed) != 0 {
                            return true;
                        }
                    }
                }
            }
            w = chunk_end;
        }
        false
    }

    /// Serializes the bits starting at word `w0` into `out` (little-endian
    /// words, bytes past the end zero).
    pub(crate) fn serialize(&self, w0: u64, out: &mut [u8]) {
        let total_words = self.nbits.div_ceil(64);
        for (k, chunk) in out.chunks_mut(8).enumerate() {
            let w = w0 + k as u64;
            let v = if w < total_words { self.peek_word(w) } else { 0 };
            let bytes = v.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Sets the bits that `data` (serialized as [`serialize`](Self::serialize)
    /// writes it, starting at word `w0`) has set; bits past the end are ignored.
    pub(crate) fn deserialize_or(&self, w0: u64, data: &[u8]) {
        let total_words = self.nbits.div_ceil(64);
        let last_bits = self.nbits % 64;
        for (k, chunk) in data.chunks(8).enumerate() {
            let w = w0 + k as u64;
            if w >= total_words {
                break;
            }
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let mut v = u64::from_le_bytes(b);
            if w + 1 == total_words && last_bits != 0 {
                v &= (1u64 << last_bits) - 1;
            }
            if v != 0 {
                self.word(w).fetch_or(v, Ordering::Relaxed);
            }
        }
    }

    /// Sets every bit of words `[w0, w1)` (an all-ones bitmap cluster).
    pub(crate) fn set_words(&self, w0: u64, w1: u64) {
        self.set_range(w0.saturating_mul(64), w1.saturating_mul(64));
    }

    /// The runs of set bits that intersect bits `[first, end)`, as
    /// `(first_bit, end_bit)` clamped to the range; at most `max` runs.
    pub(crate) fn runs(&self, first: u64, end: u64, max: usize) -> Vec<(u64, u64)> {
        let end = end.min(self.nbits);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut b = first;
        while b < end {
            let ci = (b / CHUNK_BITS) as usize;
            let chunk_end = ((ci as u64 + 1) * CHUNK_BITS).min(end);
            let Some(c) = self.chunks[ci].get() else {
                b = chunk_end;
                continue;
            };
            while b < chunk_end {
                let w = c[((b / 64) % CHUNK_WORDS as u64) as usize].load(Ordering::Relaxed) >> (b % 64);
                if w == 0 {
                    b = (b / 64 + 1) * 64;
                    continue;
                }
                let skip = u64::from(w.trailing_zeros());
                let start = b + skip;
                if start >= chunk_end {
                    b = chunk_end;
                    break;
                }
                let ones = u64::from((w >> skip).trailing_ones());
                let stop = (start + ones).min(chunk_end);
                match out.last_mut() {
                    Some(last) if last.1 == start => last.1 = stop,
                    _ => {
                        if out.len() == max {
                            return out;
                        }
                        out.push((start, stop));
                    }
                }
                b = stop;
            }
        }
        out
    }

    #[cfg(test)]
    /// Number of set bits.
    pub(crate) fn count(&self) -> u64 {
        let mut n = 0u64;
        for c in self.chunks.iter().filter_map(|c| c.get()) {
            n += c.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum::<u64>();
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model_runs(m: &[bool], first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in first..end.min(m.len() as u64) {
            if m[i as usize] {
                match out.last_mut() {
                    Some(l) if l.1 == i => l.1 = i + 1,
                    _ => out.push((i, i + 1)),
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn behaves_like_a_vector_of_bools(
            nbits in 1u64..600_000,
            ops in proptest::collection::vec((0u8..4, 0u64..600_000, 0u64..70_000), 1..40),
        ) {
            let mut b = DirtyBits::new(nbits);
            let mut m = vec![false; nbits as usize];
            for (op, x, len) in ops {
                match op {
                    0 | 1 => {
                        let end = x.saturating_add(len);
                        b.set_range(x, end);
                        for i in x..end.min(m.len() as u64) { m[i as usize] = true; }
                    }
                    2 => {
                        let n = x.max(1);
                        b.resize(n);
                        m.resize(n as usize, false);
                    }
                    _ => {
                        let mut bytes = vec![0u8; 4096];
                        b.serialize(x / 64, &mut bytes);
                        let c = DirtyBits::new(b.len());
                        c.deserialize_or(x / 64, &bytes);
                        let lo = (x / 64) * 64;
                        let hi = (lo + 4096 * 8).min(m.len() as u64);
                        for i in lo..hi { prop_assert_eq!(c.get(i), m[i as usize]); }
                    }
                }
            }
            prop_assert_eq!(b.len(), m.len() as u64);
            prop_assert_eq!(b.runs(0, u64::MAX, usize::MAX), model_runs(&m, 0, u64::MAX));
            let mid = m.len() as u64 / 3;
            prop_assert_eq!(b.runs(mid, mid * 2, usize::MAX), model_runs(&m, mid, mid * 2));
            prop_assert_eq!(b.count(), m.iter().filter(|&&x| x).count() as u64);
            let c = DirtyBits::new(m.len() as u64 + 7);
            c.or_from(&b);
            prop_assert_eq!(c.runs(0, u64::MAX, usize::MAX), model_runs(&m, 0, u64::MAX));
        }
    }

    #[test]
    fn many_threads_lose_no_bit() {
        let b = std::sync::Arc::new(DirtyBits::new(1 << 20));
        let hs: Vec<_> = (0..32u64)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut i = t;
                    while i < (1 << 20) {
                        b.set_range(i, i + 1);
                        i += 32;
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(b.count(), 1 << 20);
    }
}
