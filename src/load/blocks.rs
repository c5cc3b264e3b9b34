//! Block selection: the generator's random numbers and each thread's table of blocks.

use super::*;

/// splitmix64: one add and a mix per number, any seed is good, and adjacent seeds (seed + thread)
/// give unrelated streams.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix64(self.0)
    }

    /// Uniform in 0..n (multiply-shift: no division, bias below 2^-32 for any n we use).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A thread's blocks: object names, per-block counters and in-flight marks.
pub(super) struct BlockTable {
    pub(super) names: Vec<Box<[u8]>>,
    pub(super) name_hashes: Vec<u64>,
    pub(super) blocks_per_object: u64,
    pub(super) bs: u64,
    /// Counter of the last acknowledged write per block; 0: not written in this run.
    pub(super) counters: Vec<u32>,
    /// In-flight bit per block; maintained only when `exclusive`.
    pub(super) busy: Vec<u64>,
    pub(super) exclusive: bool,
}

impl BlockTable {
    pub(super) fn new(
        names: Vec<String>,
        blocks_per_object: u64,
        bs: u64,
        exclusive: bool,
    ) -> BlockTable {
        let blocks = names.len() * blocks_per_object as usize;
        BlockTable {
            name_hashes: names.iter().map(|n| name_hash(n.as_bytes())).collect(),
            names: names
                .into_iter()
                .map(|n| n.into_bytes().into_boxed_slice())
                .collect(),
            blocks_per_object,
            bs,
            counters: vec![0; blocks],
            busy: vec![0; blocks.div_ceil(64)],
            exclusive,
        }
    }

    pub(super) fn len(&self) -> u32 {
        self.counters.len() as u32
    }

    /// (local object index, byte offset) of a block.
    pub(super) fn locate(&self, block: u32) -> (usize, u64) {
        let block = u64::from(block);
        (
            (block / self.blocks_per_object) as usize,
            (block % self.blocks_per_object) * self.bs,
        )
    }

    pub(super) fn is_busy(&self, block: u32) -> bool {
        self.busy[block as usize / 64] & (1 << (block % 64)) != 0
    }

    pub(super) fn set_busy(&mut self, block: u32, busy: bool) {
        if self.exclusive {
            let word = &mut self.busy[block as usize / 64];
            let bit = 1u64 << (block % 64);
            *word = if busy { *word | bit } else { *word & !bit };
        }
    }

    /// The first free block at or after `start`, wrapping around; None when all are in flight.
    fn free_from(&self, start: u32) -> Option<u32> {
        let words = self.busy.len();
        let first_word = start as usize / 64;
        for step in 0..=words {
            let word_index = (first_word + step) % words;
            let mut free = !self.busy[word_index];
            if step == 0 {
                free &= !0u64 << (start % 64); // the scan starts at `start`, not at its word
            }
            while free != 0 {
                let block = word_index * 64 + free.trailing_zeros() as usize;
                if block < self.counters.len() {
                    return Some(block as u32);
                }
                free &= free - 1;
            }
        }
        None
    }

    /// Reorders the objects so that those of each core are contiguous (`core_of` gives an
    /// object name's core) and returns each core's blocks. Only before the first request:
    /// blocks are renumbered.
    pub(super) fn group_by_core(
        &mut self,
        cores: usize,
        core_of: impl Fn(&[u8]) -> usize,
    ) -> Vec<Range<u32>> {
        assert!(
            self.counters.iter().all(|c| *c == 0) && self.busy.iter().all(|w| *w == 0),
            "objects are regrouped before any request"
        );
        let mut order: Vec<(usize, usize)> = (0..self.names.len())
            .map(|object| (core_of(&self.names[object]), object))
            .collect();
        order.sort_unstable();
        let names = order.iter().map(|(_, o)| self.names[*o].clone()).collect();
        let hashes = order.iter().map(|(_, o)| self.name_hashes[*o]).collect();
        (self.names, self.name_hashes) = (names, hashes);
        let per_object = self.blocks_per_object as u32;
        (0..cores)
            .map(|core| {
                let first = order.partition_point(|(c, _)| *c < core) as u32;
                let end = order.partition_point(|(c, _)| *c <= core) as u32;
                first * per_object..end * per_object
            })
            .collect()
    }

    /// The first block of `range` at or after `start` (wrapping inside the range) that is not
    /// in flight.
    fn free_in(&self, range: &Range<u32>, start: u32) -> Option<u32> {
        let len = range.end - range.start;
        (0..len)
            .map(|step| range.start + (start - range.start + step) % len)
            .find(|block| !self.is_busy(*block))
    }

    /// A uniformly random block of `range` that is not in flight.
    pub(super) fn pick_random_in(&self, rng: &mut Rng, range: &Range<u32>) -> Option<u32> {
        let len = u64::from(range.end - range.start);
        if len == 0 {
            return None;
        }
        for _ in 0..RANDOM_TRIES {
            let block = range.start + rng.below(len) as u32;
            if !self.is_busy(block) {
                return Some(block);
            }
        }
        self.free_in(range, range.start + rng.below(len) as u32)
    }

    /// The next block of `range` at or after `*cursor` that is not in flight; advances the
    /// cursor past it, wrapping inside the range.
    pub(super) fn pick_sequential_in(&self, cursor: &mut u32, range: &Range<u32>) -> Option<u32> {
        if range.is_empty() {
            return None;
        }
        let start = if range.contains(cursor) {
            *cursor
        } else {
            range.start
        };
        let block = self.free_in(range, start)?;
        *cursor = if block + 1 == range.end {
            range.start
        } else {
            block + 1
        };
        Some(block)
    }

    /// A uniformly random block that is not in flight.
    pub(super) fn pick_random(&self, rng: &mut Rng) -> Option<u32> {
        let n = u64::from(self.len());
        for _ in 0..RANDOM_TRIES {
            let block = rng.below(n) as u32;
            if !self.is_busy(block) {
                return Some(block);
            }
        }
        self.free_from(rng.below(n) as u32)
    }

    /// The next block at or after `*cursor` that is not in flight; advances the cursor past it.
    pub(super) fn pick_sequential(&self, cursor: &mut u32) -> Option<u32> {
        let block = self.free_from(*cursor)?;
        *cursor = if block + 1 == self.len() {
            0
        } else {
            block + 1
        };
        Some(block)
    }
}
