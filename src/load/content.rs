//! Block content: derived from (object, offset, counter), checked without storing anything.

use super::*;

/// FNV-1a of the object name, finished with a mixer: identifies the object in block headers
/// (names, unlike indices, stay unique across runs with different prefixes).
pub(crate) fn name_hash(name: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in name {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(hash)
}

/// splitmix64's finalizer: a cheap bijective mixer with good avalanche.
pub(super) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(super) const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

fn stream_seed(name_hash: u64, offset: u64, counter: u64) -> u64 {
    mix64(name_hash ^ mix64(offset ^ mix64(counter.wrapping_add(GOLDEN_GAMMA))))
}

/// Words of the stream pool: 256 KiB, so the pool stays in a core's L2 cache.
pub(super) const POOL_WORDS: usize = 32 * 1024;
/// Seed of the pool. Fixed forever: any process must be able to verify what any other wrote.
const POOL_SEED: u64 = u64::from_le_bytes(*b"CRMNPOOL");

/// Pseudo-random words shared by every stream. Streams are XORs of pool slices because XORing a
/// slice vectorizes to memory speed, while computing splitmix64 per word cost ~0.9 us per 4 KiB
/// block: a quarter of a write's CPU budget at 300k writes/s on one core.
pub(super) fn pool() -> &'static [u64] {
    static POOL: OnceLock<Box<[u64]>> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut rng = Rng(POOL_SEED);
        (0..POOL_WORDS).map(|_| rng.next_u64()).collect()
    })
}

/// The stream of `seed`, `words` long, as runs of (first stream word, first pool word, length,
/// key): it reads the pool from a seed-chosen start, wrapping around, and each pass over the pool
/// is XORed with its own seed-derived key, so streams of different seeds differ in every word and
/// long blocks do not repeat themselves.
pub(super) fn stream_runs(
    seed: u64,
    words: usize,
) -> impl Iterator<Item = (usize, usize, usize, u64)> {
    let mut word = 0;
    let mut pool_at = (mix64(seed) % POOL_WORDS as u64) as usize;
    let mut key = seed;
    std::iter::from_fn(move || {
        if word >= words {
            return None;
        }
        let len = (POOL_WORDS - pool_at).min(words - word);
        key = mix64(key.wrapping_add(GOLDEN_GAMMA));
        let run = (word, pool_at, len, key);
        word += len;
        pool_at = 0;
        Some(run)
    })
}

/// Fills `out` with the stream of `seed` (little-endian words; a partial last word is cut).
fn fill_stream(out: &mut [u8], seed: u64) {
    let pool = pool();
    let total = out.len();
    for (word, pool_at, len, key) in stream_runs(seed, total.div_ceil(8)) {
        let bytes = &mut out[word * 8..((word + len) * 8).min(total)];
        let source = &pool[pool_at..pool_at + len];
        let mut chunks = bytes.chunks_exact_mut(8);
        for (chunk, value) in (&mut chunks).zip(source) {
            chunk.copy_from_slice(&(value ^ key).to_le_bytes());
        }
        let tail = chunks.into_remainder();
        let tail_len = tail.len();
        if tail_len > 0 {
            tail.copy_from_slice(&(source[len - 1] ^ key).to_le_bytes()[..tail_len]);
        }
    }
}

/// Index of the first byte of `data` that differs from the stream of `seed`, if any.
fn stream_mismatch(data: &[u8], seed: u64) -> Option<usize> {
    let pool = pool();
    for (word, pool_at, len, key) in stream_runs(seed, data.len().div_ceil(8)) {
        let bytes = &data[word * 8..((word + len) * 8).min(data.len())];
        let source = &pool[pool_at..pool_at + len];
        // Fast path: OR together all differences (this vectorizes, an early exit would not);
        // find where they are only when there are some.
        let chunks = bytes.chunks_exact(8);
        let tail = chunks.remainder();
        let differences = chunks.zip(source).fold(0u64, |acc, (chunk, value)| {
            acc | (u64::from_le_bytes(chunk.try_into().expect("chunks_exact yields 8 bytes"))
                ^ value
                ^ key)
        });
        let tail_differs =
            !tail.is_empty() && tail != &(source[len - 1] ^ key).to_le_bytes()[..tail.len()];
        if differences != 0 || tail_differs {
            let within_run =
                bytes
                    .chunks(8)
                    .zip(source)
                    .enumerate()
                    .find_map(|(index, (chunk, value))| {
                        let expected = (value ^ key).to_le_bytes();
                        chunk
                            .iter()
                            .zip(expected)
                            .position(|(a, b)| *a != b)
                            .map(|at| index * 8 + at)
                    });
            return within_run.map(|at| word * 8 + at);
        }
    }
    None
}

/// Writes the content of block (object, offset) at write counter `counter` into `block`.
pub(crate) fn fill_block(block: &mut [u8], name_hash: u64, offset: u64, counter: u64) {
    let (header, body) = block.split_at_mut(BLOCK_HEADER_BYTES);
    for (at, value) in [BLOCK_MAGIC, name_hash, offset, counter]
        .into_iter()
        .enumerate()
    {
        header[at * 8..at * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
    fill_stream(body, stream_seed(name_hash, offset, counter));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mismatch {
    pub(crate) reason: &'static str,
    /// Counter found in the block header (0 when the header is unusable).
    pub(crate) got_counter: u64,
    /// First differing byte within the block.
    pub(crate) byte: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockCheck {
    /// Intact content of the write with this counter.
    Intact {
        counter: u64,
    },
    /// Empty, or zeros: nobody ever wrote this block.
    Unwritten,
    Mismatch(Mismatch),
}

fn u64_le(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// Checks a block read back. `expected` is the counter of this run's last acknowledged write to it
/// (0: not written in this run, so any self-consistent content written by anyone is accepted).
pub(crate) fn check_block(
    data: &[u8],
    bs: usize,
    name_hash: u64,
    offset: u64,
    expected: u32,
) -> BlockCheck {
    let bad = |reason, got_counter, byte| {
        BlockCheck::Mismatch(Mismatch {
            reason,
            got_counter,
            byte,
        })
    };
    let all_zero = || data.iter().all(|b| *b == 0);
    if data.is_empty() || (data.len() != bs || u64_le(data, 0) != BLOCK_MAGIC) && all_zero() {
        return BlockCheck::Unwritten;
    }
    if data.len() != bs {
        return bad(
            if data.len() < bs {
                "short read"
            } else {
                "long read"
            },
            0,
            data.len().min(bs),
        );
    }
    if u64_le(data, 0) != BLOCK_MAGIC {
        return bad("no block header (bad magic)", 0, 0);
    }
    let got = u64_le(data, 24);
    if u64_le(data, 8) != name_hash {
        return bad("block belongs to another object", got, 8);
    }
    if u64_le(data, 16) != offset {
        return bad("block belongs to another offset", got, 16);
    }
    if expected != 0 && got != u64::from(expected) {
        return bad("stale or wrong write counter", got, 24);
    }
    if got == 0 {
        return bad("write counter 0 is never written", got, 24);
    }
    match stream_mismatch(
        &data[BLOCK_HEADER_BYTES..],
        stream_seed(name_hash, offset, got),
    ) {
        Some(at) => bad(
            "data differs from the write's content",
            got,
            BLOCK_HEADER_BYTES + at,
        ),
        None => BlockCheck::Intact { counter: got },
    }
}
