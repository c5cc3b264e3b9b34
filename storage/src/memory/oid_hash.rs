//! The memory store's hash of object ids, for its object map.
//!
//! Why not std's `RandomState` (SipHash-1-3): a lookup of a 16-byte object id cost ~190
//! instructions of hashing, 8% of a 4 KiB read op's server instructions
//! (`scripts/callgrind-op.sh randread`); this hash costs ~40.
//!
//! Why keyed: object ids are chosen by clients. With an unkeyed hash (for instance the
//! placement crc32c, which every client can compute) a client could pick ids that all share
//! one probe sequence and make every lookup compare against all of them. The state starts
//! from, and every step multiplies by, seeds drawn once per store from the same OS-seeded
//! source std's `RandomState` uses; the seeds never leave the process, and the map never shows
//! a client hash values or its layout, so colliding ids cannot be computed offline.
//!
//! What it is not: a cryptographic MAC. Each 8-byte word is folded in with one 64x64->128-bit
//! multiply whose halves are xored ("folded multiply"), the construction of fast keyed hashes
//! such as foldhash; a step maps to zero only when the state equals the word (a 2^-64 chance
//! for seeds an attacker does not know). Collisions are as likely as for any 64-bit hash of
//! this quality; what the seed takes away is planning them.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// The seeds of one store's object map: the starting state and the multiplier.
#[derive(Clone, Copy, Debug)]
pub(super) struct OidHashSeed {
    start: u64,
    multiplier: u64,
}

impl OidHashSeed {
    /// Fresh seeds from std's per-process random keys (each `RandomState` differs).
    pub(super) fn random() -> OidHashSeed {
        let random = RandomState::new();
        OidHashSeed::from_parts(random.hash_one(0u64), random.hash_one(1u64))
    }

    /// Seeds as given (tests); an even or zero multiplier is made odd, so no step multiplies
    /// by zero.
    pub(super) fn from_parts(start: u64, multiplier: u64) -> OidHashSeed {
        OidHashSeed {
            start,
            multiplier: multiplier | 1,
        }
    }
}

impl BuildHasher for OidHashSeed {
    type Hasher = OidHasher;

    fn build_hasher(&self) -> OidHasher {
        OidHasher {
            state: self.start,
            multiplier: self.multiplier,
        }
    }
}

/// The product's high and low halves xored: every input bit reaches the middle of the result.
#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

fn word_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn half_at(bytes: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(
        bytes[at..at + 4].try_into().expect("4 bytes"),
    ))
}

pub(super) struct OidHasher {
    state: u64,
    multiplier: u64,
}

impl OidHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.state = folded_multiply(self.state ^ word, self.multiplier);
    }
}

impl Hasher for OidHasher {
    /// `Hash for [u8]` writes the length first (`write_usize`), so inputs that differ only in
    /// how the last word is padded or overlapped (below) still hash apart.
    fn write(&mut self, bytes: &[u8]) {
        let len = bytes.len();
        match len {
            0 => {}
            1..=3 => {
                // First, middle and last byte: all of them for 1 to 3 bytes.
                let word = u64::from(bytes[0])
                    | u64::from(bytes[len / 2]) << 8
                    | u64::from(bytes[len - 1]) << 16;
                self.mix(word);
            }
            4..=8 => self.mix(half_at(bytes, 0) | half_at(bytes, len - 4) << 32),
            _ => {
                let mut at = 0;
                while at + 8 < len {
                    self.mix(word_at(bytes, at));
                    at += 8;
                }
                // The last 8 bytes, overlapping the previous word when `len` is not a
                // multiple of 8: every byte is read, no partial word is assembled.
                self.mix(word_at(bytes, len - 8));
            }
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.mix(value as u64);
    }

    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }

    fn finish(&self) -> u64 {
        // One more multiply by a different constant: the map takes its bucket from the low
        // bits and its tag from the top 7, and both must depend on every word.
        folded_multiply(
            self.state,
            self.multiplier.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn hash(seed: OidHashSeed, bytes: &[u8]) -> u64 {
        seed.hash_one(bytes)
    }

    /// Every length from 0 to 40 (all branches of `write`), every single-byte change at
    /// every position of an id: each gives a distinct hash.
    #[test]
    fn single_byte_changes_change_the_hash() {
        let seed = OidHashSeed::from_parts(0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210);
        for len in 0..=40usize {
            let base: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let mut seen = HashSet::new();
            assert!(seen.insert(hash(seed, &base)));
            for at in 0..len {
                for delta in [1u8, 0x80] {
                    let mut changed = base.clone();
                    changed[at] ^= delta;
                    assert!(
                        seen.insert(hash(seed, &changed)),
                        "len {len}: flipping {delta:#x} at {at} collided"
                    );
                }
            }
        }
    }

    /// Ids that differ only in length (a zero byte appended, which the padding of a short
    /// tail would otherwise hide) hash apart.
    #[test]
    fn length_is_part_of_the_hash() {
        let seed = OidHashSeed::from_parts(7, 11);
        let mut seen = HashSet::new();
        for len in 0..=24 {
            assert!(
                seen.insert(hash(seed, &vec![0u8; len])),
                "zeros of len {len}"
            );
        }
    }

    /// The seed decides the hash: the same id under two stores' seeds differs, so knowing
    /// one store's layout says nothing about another's.
    #[test]
    fn seeds_change_the_hash() {
        let oid = b"load.12345";
        let a = OidHashSeed::random();
        let b = OidHashSeed::random();
        assert_ne!(hash(a, oid), hash(b, oid));
        assert_ne!(
            hash(OidHashSeed::from_parts(1, 3), oid),
            hash(OidHashSeed::from_parts(2, 3), oid)
        );
        assert_ne!(
            hash(OidHashSeed::from_parts(1, 3), oid),
            hash(OidHashSeed::from_parts(1, 5), oid)
        );
    }

    /// The map uses the low bits for the bucket and the top 7 for the tag: sequential
    /// names (as `carmine load` makes) spread over both.
    #[test]
    fn sequential_names_spread_over_low_and_top_bits() {
        let seed = OidHashSeed::random();
        let mut low = HashSet::new();
        let mut top = HashSet::new();
        for index in 0..4096 {
            let h = hash(seed, format!("load.{index}").as_bytes());
            low.insert(h & 0xFFF);
            top.insert(h >> 57);
        }
        // 4096 balls in 4096 bins fill ~63% of them; 128 tags are all hit.
        assert!(low.len() > 2200, "low 12 bits took {} values", low.len());
        assert_eq!(top.len(), 128);
    }
}
