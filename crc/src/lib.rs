//! crc32c (Castagnoli, the iSCSI crc), as the wire format and the segment store use it.
//!
//! Same values as the `crc32c` crate (`crc32c`, `crc32c_append`), computed faster on x86-64:
//!
//! - inputs of 64 bytes and more are folded with carry-less multiplication, four 128-bit lanes
//!   at a time (PCLMULQDQ), or sixteen with VPCLMULQDQ on AVX-512 CPUs, and the last 128 bits
//!   are reduced with the SSE 4.2 crc32 instruction;
//! - shorter inputs go through the crc32 instruction directly, 8 bytes at a time, without the
//!   `crc32c` crate's table set-up (a frame header, an object id).
//!
//! Why: a 4 KiB read or write hashes its 4 KiB once on the OSD (the frame crc) and the segment
//! store once more (the block crc); with the crc32 instruction alone that is ~0.6 instructions
//! and 1/8 cycle per byte on one dependency-limited unit. Folding needs ~0.35 instructions per
//! byte with 128-bit lanes, and a quarter of the cycles with 512-bit lanes.
//!
//! CPUs without SSE 4.2 and PCLMULQDQ (and other architectures) use the `crc32c` crate.
//! The CPU is asked once (`is_x86_feature_detected!` caches its answer).
//!
//! The math (reflected crc): a 128-bit lane loaded little-endian holds polynomial
//! A = Alo·x^64 + Ahi, where each 64-bit half has its first bit as the highest coefficient.
//! Carrying A forward by D bits is A·x^D = Alo·x·x^(D+63) + Ahi·x·x^(D-1); with
//! K = x^n mod P bit-reversed into 64 bits, the carry-less product of a half and K lands in the
//! lane's representation with the extra factor x for free. So a lane folds into the lane D bits
//! later as clmul(lo, rev(x^(D+63) mod P)) ^ clmul(hi, rev(x^(D-1) mod P)) ^ that lane.
//! The crc register is xored into the first 32 bits of the message first (the same for any
//! message of at least 4 bytes), and the final lane's crc from a zero register is the register
//! for everything folded.

/// The crc32c of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// The crc32c of the concatenation of the bytes `crc` is the crc32c of, then `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        match x86::level() {
            x86::Level::Avx512 => {
                // SAFETY: the CPU has every feature the function enables (checked by `level`).
                return unsafe { x86::append_avx512(crc, data) };
            }
            x86::Level::Pclmul => {
                // SAFETY: the CPU has every feature the function enables (checked by `level`).
                return unsafe { x86::append_pclmul(crc, data) };
            }
            x86::Level::None => {}
        }
    }
    crc32c::crc32c_append(crc, data)
}

/// The crc32c of the bytes `crc` is the crc32c of, then `first`, then `second`: for a frame
/// whose hashed bytes are not contiguous (its header's first 28 bytes, then what follows the
/// crc field). `first` has a size fixed at compile time (shorter than 64 bytes), so its words
/// are hashed without a loop; when `second` is short too (an object id and a sub-op table, a
/// result table) the whole is one pass of the crc32 instruction: one feature dispatch and one
/// call instead of two, and no staging copy to make the pieces contiguous.
pub fn crc32c_append_pair<const N: usize>(crc: u32, first: &[u8; N], second: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        const { assert!(N < x86::FOLD_MIN_BYTES, "the fixed piece is a short one") };
        if second.len() < x86::FOLD_MIN_BYTES && x86::level() != x86::Level::None {
            // SAFETY: the CPU has SSE 4.2 (every level but None has it, checked by `level`).
            return unsafe { x86::append_short_pair(crc, first, second) };
        }
    }
    crc32c_append(crc32c_append(crc, first), second)
}

/// The crc32c of `a || b`, given the crc32c of `a`, the crc32c of `b` and the length of `b`,
/// without reading either: the crc of bytes already hashed (a stored block's, kept since it was
/// written) joins a reply's crc for the cost of one polynomial product per set bit of `len_b`
/// (one for a 4 KiB block).
///
/// Why it holds: with the initial register and the final xor both all ones, crc(a || b) is
/// (crc(a) · x^(8·|b|) mod P) xor crc(b); the two conditionings cancel. Values are in the
/// reflected representation the crc uses (bit 31 is the coefficient of x^0).
///
/// A `len_b` of 4 KiB (a block) takes four table lookups; other lengths walk the bits.
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    if len_b == BLOCK_BYTES {
        return BLOCK_SHIFT.shift(crc_a) ^ crc_b;
    }
    mul_mod_reflected(x_pow_8n_reflected(len_b), crc_a) ^ crc_b
}

/// The length `crc32c_combine` has tables for: the block of stores' kept crcs.
const BLOCK_BYTES: u64 = 4096;

static BLOCK_SHIFT: Shift = Shift::by_bytes(BLOCK_BYTES);

/// Multiplication of a crc by the constant x^(8·n) mod P, as four tables of 256 entries (one
/// per byte of the crc): the product is linear in the crc, so it is the xor of the products of
/// its four bytes. 4 KiB of tables instead of a 32-step loop per product.
struct Shift {
    tables: [[u32; 256]; 4],
}

impl Shift {
    const fn by_bytes(n: u64) -> Shift {
        let factor = x_pow_8n_reflected(n);
        let mut tables = [[0u32; 256]; 4];
        let mut byte = 0;
        while byte < 4 {
            let mut value = 0;
            while value < 256 {
                tables[byte][value] = mul_mod_reflected(factor, (value as u32) << (8 * byte));
                value += 1;
            }
            byte += 1;
        }
        Shift { tables }
    }

    fn shift(&self, crc: u32) -> u32 {
        let [b0, b1, b2, b3] = crc.to_le_bytes();
        self.tables[0][usize::from(b0)]
            ^ self.tables[1][usize::from(b1)]
            ^ self.tables[2][usize::from(b2)]
            ^ self.tables[3][usize::from(b3)]
    }
}

/// The crc32c polynomial, reflected (bit 31 is x^0, bit 0 is x^31; x^32 implied).
const POLY_REFLECTED: u32 = 0x82F6_3B78;

/// a·b mod P, both reflected. Walks a's coefficients from x^0 up while b is multiplied by x
/// (a right shift, reduced by P when x^31's coefficient moves past the end).
const fn mul_mod_reflected(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = 31;
    loop {
        if a & (1 << bit) != 0 {
            product ^= b;
        }
        if bit == 0 || a & ((1 << bit) - 1) == 0 {
            return product;
        }
        b = if b & 1 != 0 {
            (b >> 1) ^ POLY_REFLECTED
        } else {
            b >> 1
        };
        bit -= 1;
    }
}

/// X_POW_2K[k] = x^(2^k) mod P, reflected.
const X_POW_2K: [u32; 64] = {
    let mut table = [0u32; 64];
    table[0] = 1 << 30; // x^1
    let mut k = 1;
    while k < 64 {
        table[k] = mul_mod_reflected(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
};

/// x^(8·n) mod P, reflected: the factor that carries a crc over n more bytes.
const fn x_pow_8n_reflected(n: u64) -> u32 {
    let mut power = 1u32 << 31; // x^0
    let mut rest = n;
    let mut k = 3; // 8·n = n·2^3
    while rest != 0 {
        if rest & 1 != 0 {
            power = mul_mod_reflected(X_POW_2K[k % 64], power);
        }
        rest >>= 1;
        k += 1;
    }
    power
}

/// x^n mod P (P the crc32c polynomial, not reflected), bit d the coefficient of x^d.
const fn xpow_mod(n: u32) -> u32 {
    let mut r: u64 = 1;
    let mut i = 0;
    while i < n {
        r <<= 1;
        if r & (1 << 32) != 0 {
            r ^= 0x1_1EDC_6F41;
        }
        i += 1;
    }
    r as u32
}

/// The fold constants for a distance of `bits`: (for the low half, for the high half).
const fn fold_constants(bits: u32) -> (u64, u64) {
    (
        (xpow_mod(bits + 63) as u64).reverse_bits(),
        (xpow_mod(bits - 1) as u64).reverse_bits(),
    )
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::fold_constants;
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Level {
        None,
        Pclmul,
        Avx512,
    }

    static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);

    #[inline]
    pub fn level() -> Level {
        match LEVEL.load(Ordering::Relaxed) {
            0 => Level::None,
            1 => Level::Pclmul,
            2 => Level::Avx512,
            _ => detect(),
        }
    }

    #[cold]
    fn detect() -> Level {
        let level = if !(is_x86_feature_detected!("sse4.2")
            && is_x86_feature_detected!("pclmulqdq")
            && is_x86_feature_detected!("sse4.1"))
        {
            Level::None
        } else if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("vpclmulqdq")
            && std::env::var_os("CARMINE_CRC_NO_AVX512").is_none()
        {
            Level::Avx512
        } else {
            Level::Pclmul
        };
        LEVEL.store(level as u8, Ordering::Relaxed);
        level
    }

    /// Test hook: forces a level (only down from what the CPU has).
    #[cfg(test)]
    pub fn force(level: Level) {
        let _ = detect();
        LEVEL.store(level as u8, Ordering::Relaxed);
    }

    /// Test hook: back to what the CPU has.
    #[cfg(test)]
    pub fn unforce() {
        LEVEL.store(u8::MAX, Ordering::Relaxed);
    }

    const K512: (u64, u64) = fold_constants(512);
    const K128: (u64, u64) = fold_constants(128);
    const K2048: (u64, u64) = fold_constants(2048);

    #[inline]
    #[target_feature(enable = "sse4.2")]
    fn crc_bytes(mut reg: u32, data: &[u8]) -> u32 {
        let (words, bytes) = data.as_chunks::<8>();
        let mut reg64 = u64::from(reg);
        for word in words {
            reg64 = _mm_crc32_u64(reg64, u64::from_le_bytes(*word));
        }
        reg = reg64 as u32;
        // The 0-7 bytes left in at most three steps (4, 2, 1) rather than one per byte: the
        // wire's headers hash 28 bytes (three words and four bytes) several times per op.
        let mut rest = bytes;
        if let Some((word, tail)) = rest.split_first_chunk::<4>() {
            reg = _mm_crc32_u32(reg, u32::from_le_bytes(*word));
            rest = tail;
        }
        if let Some((half, tail)) = rest.split_first_chunk::<2>() {
            reg = _mm_crc32_u16(reg, u16::from_le_bytes(*half));
            rest = tail;
        }
        if let Some(&byte) = rest.first() {
            reg = _mm_crc32_u8(reg, byte);
        }
        reg
    }

    #[inline]
    #[target_feature(enable = "sse4.2,pclmulqdq,sse4.1")]
    fn load(bytes: &[u8; 16]) -> __m128i {
        // SAFETY: reads 16 bytes from a reference to 16 bytes; no alignment needed (loadu).
        unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
    }

    /// The four 16-byte lanes of a 64-byte block.
    #[inline]
    fn lanes(block: &[u8; 64]) -> &[[u8; 16]; 4] {
        let (lanes, _) = block.as_chunks::<16>();
        lanes.try_into().expect("4 lanes")
    }

    #[inline]
    #[target_feature(enable = "sse4.2,pclmulqdq,sse4.1")]
    fn constants(k: (u64, u64)) -> __m128i {
        _mm_set_epi64x(k.1 as i64, k.0 as i64)
    }

    #[inline]
    #[target_feature(enable = "sse4.2,pclmulqdq,sse4.1")]
    fn fold(x: __m128i, k: __m128i, next: __m128i) -> __m128i {
        let lo = _mm_clmulepi64_si128(x, k, 0x00);
        let hi = _mm_clmulepi64_si128(x, k, 0x11);
        _mm_xor_si128(_mm_xor_si128(lo, hi), next)
    }

    /// The crc register after the 128-bit lane `x` (all folding done), from a zero register.
    #[inline]
    #[target_feature(enable = "sse4.2,pclmulqdq,sse4.1")]
    fn reduce(x: __m128i) -> u32 {
        let lo = _mm_extract_epi64(x, 0) as u64;
        let hi = _mm_extract_epi64(x, 1) as u64;
        _mm_crc32_u64(_mm_crc32_u64(0, lo), hi) as u32
    }

    /// Folds `blocks` (at least one) into one lane, register `reg` first.
    #[inline]
    #[target_feature(enable = "sse4.2,pclmulqdq,sse4.1")]
    fn fold_blocks(reg: u32, blocks: &[[u8; 64]]) -> __m128i {
        let [first, rest @ ..] = blocks else {
            unreachable!("at least one block")
        };
        let [l0, l1, l2, l3] = lanes(first);
        let mut x0 = _mm_xor_si128(load(l0), _mm_cvtsi32_si128(reg as i32));
        let mut x1 = load(l1);
        let mut x2 = load(l2);
        let mut x3 = load(l3);
        let k512 = constants(K512);
        for block in rest {
            let [l0, l1, l2, l3] = lanes(block);
            x0 = fold(x0, k512, load(l0));
            x1 = fold(x1, k512, load(l1));
            x2 = fold(x2, k512, load(l2));
            x3 = fold(x3, k512, load(l3));
        }
        let k128 = constants(K128);
        let x1 = fold(x0, k128, x1);
        let x2 = fold(x1, k128, x2);
        fold(x2, k128, x3)
    }

    /// Inputs shorter than this go through the crc32 instruction alone (one 64-byte block
    /// is the least that folds).
    pub const FOLD_MIN_BYTES: usize = 64;

    /// `append_pclmul` of `first` then `second`, both shorter than `FOLD_MIN_BYTES`; `first`'s
    /// length is a constant, so its crc32 steps unroll (4 instructions for a 28-byte header
    /// instead of a loop and its tail tests, ~20).
    #[target_feature(enable = "sse4.2")]
    pub fn append_short_pair<const N: usize>(crc: u32, first: &[u8; N], second: &[u8]) -> u32 {
        debug_assert!(N < FOLD_MIN_BYTES && second.len() < FOLD_MIN_BYTES);
        !crc_bytes(crc_bytes(!crc, first), second)
    }

    #[target_feature(enable = "sse4.2,pclmulqdq,sse4.1")]
    pub fn append_pclmul(crc: u32, data: &[u8]) -> u32 {
        let reg = !crc;
        if data.len() < FOLD_MIN_BYTES {
            return !crc_bytes(reg, data);
        }
        let (blocks, tail) = data.as_chunks::<64>();
        let x = fold_blocks(reg, blocks);
        !crc_bytes(reduce(x), tail)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,vpclmulqdq,sse4.2,pclmulqdq,sse4.1")]
    fn load512(bytes: &[u8]) -> __m512i {
        let bytes: &[u8; 64] = bytes[..64].try_into().expect("64 bytes");
        // SAFETY: reads 64 bytes from a reference to 64 bytes; no alignment needed (loadu).
        unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,vpclmulqdq,sse4.2,pclmulqdq,sse4.1")]
    fn fold512(x: __m512i, k: __m512i, next: __m512i) -> __m512i {
        let lo = _mm512_clmulepi64_epi128(x, k, 0x00);
        let hi = _mm512_clmulepi64_epi128(x, k, 0x11);
        // lo ^ hi ^ next in one instruction (truth table 0x96: three-way xor).
        _mm512_ternarylogic_epi64(lo, hi, next, 0x96)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,vpclmulqdq,sse4.2,pclmulqdq,sse4.1")]
    fn broadcast(k: (u64, u64)) -> __m512i {
        _mm512_set_epi64(
            k.1 as i64, k.0 as i64, k.1 as i64, k.0 as i64, k.1 as i64, k.0 as i64, k.1 as i64,
            k.0 as i64,
        )
    }

    /// 256 bytes per iteration in four 512-bit registers (sixteen 128-bit lanes); inputs
    /// shorter than 512 bytes take the 128-bit path.
    #[target_feature(enable = "avx512f,avx512vl,vpclmulqdq,sse4.2,pclmulqdq,sse4.1")]
    pub fn append_avx512(crc: u32, data: &[u8]) -> u32 {
        if data.len() < 512 {
            return append_pclmul(crc, data);
        }
        let reg = !crc;
        let folded = data.len() / 256 * 256;
        let first = _mm512_xor_si512(
            load512(&data[0..]),
            _mm512_castsi128_si512(_mm_cvtsi32_si128(reg as i32)),
        );
        // The cast leaves the upper lanes undefined: clear them (only the first 32 bits
        // of the message take the register).
        let first = _mm512_mask_mov_epi64(load512(&data[0..]), 0b0000_0011, first);
        let mut z0 = first;
        let mut z1 = load512(&data[64..]);
        let mut z2 = load512(&data[128..]);
        let mut z3 = load512(&data[192..]);
        let k2048 = broadcast(K2048);
        for block in data[256..folded].chunks_exact(256) {
            z0 = fold512(z0, k2048, load512(&block[0..]));
            z1 = fold512(z1, k2048, load512(&block[64..]));
            z2 = fold512(z2, k2048, load512(&block[128..]));
            z3 = fold512(z3, k2048, load512(&block[192..]));
        }
        // Four registers into one (each 512 bits before the next), then its four lanes into
        // one, lane by lane (each 128 bits before the next).
        let k512 = broadcast(K512);
        let z1 = fold512(z0, k512, z1);
        let z2 = fold512(z1, k512, z2);
        let z = fold512(z2, k512, z3);
        let k128 = constants(K128);
        let l0 = _mm512_extracti32x4_epi32(z, 0);
        let l1 = _mm512_extracti32x4_epi32(z, 1);
        let l2 = _mm512_extracti32x4_epi32(z, 2);
        let l3 = _mm512_extracti32x4_epi32(z, 3);
        let x = fold(fold(fold(l0, k128, l1), k128, l2), k128, l3);
        // What is left (less than 256 bytes): its 64-byte blocks fold on in 128-bit lanes
        // from the register this part leaves, then the bytes.
        let rest = &data[folded..];
        let reg = reduce(x);
        let (blocks, tail) = rest.as_chunks::<64>();
        if blocks.is_empty() {
            return !crc_bytes(reg, tail);
        }
        let x = fold_blocks(reg, blocks);
        !crc_bytes(reduce(x), tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn check_all_levels(crc: u32, data: &[u8]) {
        let want = crc32c::crc32c_append(crc, data);
        assert_eq!(crc32c_append(crc, data), want, "len {}", data.len());
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("sse4.2")
                && is_x86_feature_detected!("pclmulqdq")
                && is_x86_feature_detected!("sse4.1")
            {
                // SAFETY: features checked just above.
                assert_eq!(unsafe { x86::append_pclmul(crc, data) }, want);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("vpclmulqdq")
                && is_x86_feature_detected!("sse4.2")
                && is_x86_feature_detected!("pclmulqdq")
                && is_x86_feature_detected!("sse4.1")
            {
                // SAFETY: features checked just above.
                assert_eq!(unsafe { x86::append_avx512(crc, data) }, want);
            }
        }
    }

    /// Says which folding levels this CPU lets the tests check: a level the CPU lacks is not
    /// tested here (CI machines differ), and the log must say so rather than pass in silence.
    #[test]
    fn levels_checked_on_this_cpu() {
        #[cfg(target_arch = "x86_64")]
        {
            let pclmul = is_x86_feature_detected!("sse4.2")
                && is_x86_feature_detected!("pclmulqdq")
                && is_x86_feature_detected!("sse4.1");
            let avx512 = pclmul
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("vpclmulqdq");
            eprintln!(
                "carmine-crc: checking the PCLMULQDQ level: {}; the AVX-512 level: {}",
                if pclmul { "yes" } else { "NO (CPU lacks it)" },
                if avx512 { "yes" } else { "NO (CPU lacks it)" }
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        eprintln!("carmine-crc: not x86_64: only the crc32c-crate fallback is checked");
    }

    #[test]
    fn combine_equals_the_crc_of_the_concatenation() {
        let data = bytes(9000, 11);
        for split in [0, 1, 3, 4, 7, 8, 31, 32, 100, 4096, 4097] {
            for len_b in [0usize, 1, 2, 5, 64, 511, 4096, 4100] {
                let (a, b) = (&data[..split], &data[split..split + len_b]);
                assert_eq!(
                    crc32c_combine(crc32c(a), crc32c(b), len_b as u64),
                    crc32c(&data[..split + len_b]),
                    "split {split} len_b {len_b}"
                );
            }
        }
        // The block tables and the bit walk agree.
        let factor = x_pow_8n_reflected(BLOCK_BYTES);
        for crc in [0, 1, 0x8000_0000, 0xFFFF_FFFF, 0xDEAD_BEEF, 0x1234_5678] {
            assert_eq!(BLOCK_SHIFT.shift(crc), mul_mod_reflected(factor, crc));
        }
        // A wrong length gives a wrong crc: the length is part of the math.
        let (a, b) = (&data[..40], &data[40..4136]);
        assert_ne!(
            crc32c_combine(crc32c(a), crc32c(b), 4095),
            crc32c(&data[..4136])
        );
    }

    proptest! {
        #[test]
        fn combine_matches_the_crate(a in proptest::collection::vec(any::<u8>(), 0..300),
                                     b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let mut joined = a.clone();
            joined.extend_from_slice(&b);
            prop_assert_eq!(crc32c_combine(crc32c(&a), crc32c(&b), b.len() as u64),
                            crc32c::crc32c(&joined));
        }
    }

    /// A fixed piece of every length the wire uses or could (0, 1, 8, 28, 63), then a second
    /// piece of every length around the short path's bound (short, not short).
    #[test]
    fn append_pair_at_every_second_length_to_200() {
        fn check<const N: usize>(data: &[u8]) {
            let first: &[u8; N] = data[..N].try_into().unwrap();
            for second in 0..200 {
                assert_eq!(
                    crc32c_append_pair(0xDEAD_BEEF, first, &data[N..N + second]),
                    crc32c::crc32c_append(0xDEAD_BEEF, &data[..N + second]),
                    "first {N} second {second}"
                );
            }
        }
        let data = bytes(300, 5);
        check::<0>(&data);
        check::<1>(&data);
        check::<8>(&data);
        check::<28>(&data);
        check::<63>(&data);
    }

    #[test]
    fn known_values() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn every_length_to_2_kib_and_around_4_kib() {
        let data = bytes(5000, 7);
        for len in (0..2100).chain(4000..4200) {
            check_all_levels(0, &data[..len]);
            check_all_levels(0xDEAD_BEEF, &data[3..3 + len.min(4990)]);
        }
    }

    #[test]
    fn constants_match_a_bitwise_shift() {
        // x^32 mod P is the polynomial without its top bit.
        assert_eq!(xpow_mod(32), 0x1EDC_6F41);
        assert_eq!(xpow_mod(0), 1);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn forced_levels_agree() {
        let data = bytes(9000, 3);
        for level in [x86::Level::None, x86::Level::Pclmul] {
            x86::force(level);
            for len in [0, 1, 63, 64, 65, 511, 512, 4096, 4128, 9000] {
                assert_eq!(
                    crc32c_append(5, &data[..len]),
                    crc32c::crc32c_append(5, &data[..len])
                );
            }
        }
        x86::unforce();
    }

    proptest! {
        #[test]
        fn matches_the_crc32c_crate(data in proptest::collection::vec(any::<u8>(), 0..9000), crc in any::<u32>(), skip in 0usize..16) {
            let skip = skip.min(data.len());
            check_all_levels(crc, &data[skip..]);
        }

        #[test]
        fn append_pair_is_concatenation(a in proptest::collection::vec(any::<u8>(), 28..=28), b in proptest::collection::vec(any::<u8>(), 0..200), crc in any::<u32>()) {
            let mut ab = a.clone();
            ab.extend_from_slice(&b);
            let first: [u8; 28] = a[..].try_into().unwrap();
            prop_assert_eq!(crc32c_append_pair(crc, &first, &b), crc32c::crc32c_append(crc, &ab));
        }

        #[test]
        fn append_is_concatenation(a in proptest::collection::vec(any::<u8>(), 0..3000), b in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut ab = a.clone();
            ab.extend_from_slice(&b);
            prop_assert_eq!(crc32c_append(crc32c(&a), &b), crc32c(&ab));
        }
    }
}
