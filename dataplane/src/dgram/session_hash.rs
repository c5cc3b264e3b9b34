//! The hash of the server's session table (peer address, client session id -> session).
//!
//! Why not the std `HashMap`'s SipHash: it ran once per received packet and cost about 500
//! instructions per 4 KiB op over DPDK (callgrind, `scripts/dpdk-callgrind.sh`; an `Endpoint`
//! key is four `write`s: MAC, IPv4, port, session id), a twentieth of the whole server path.
//! This is a multiply-rotate hash over the key's words, seeded per table from the process's
//! random keys, in a few instructions per word.
//!
//! It is not a keyed PRF, so a peer that knew the seed could aim its keys at one bucket; the
//! seed is random per table and the table never holds more than `sessions_max` (256) entries,
//! so the worst a flood of forged keys can do is a probe of at most that many entries per
//! packet, not the unbounded chains that SipHash guards an unbounded table against.

use std::hash::{BuildHasher, Hasher};

/// An odd constant with well-spread bits (2^64 / phi), as in Fibonacci hashing.
const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// Builds [`SessionHasher`]s that share one random seed.
#[derive(Debug, Clone, Copy)]
pub struct SessionHashBuilder {
    seed: u64,
}

impl SessionHashBuilder {
    /// A builder with a fresh random seed (from std's per-process random keys; no allocation).
    pub fn random() -> Self {
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5e55_1017_u64);
        SessionHashBuilder { seed }
    }

    /// A builder with a given seed (tests).
    #[cfg(test)]
    pub fn with_seed(seed: u64) -> Self {
        SessionHashBuilder { seed }
    }
}

impl BuildHasher for SessionHashBuilder {
    type Hasher = SessionHasher;

    fn build_hasher(&self) -> SessionHasher {
        SessionHasher { state: self.seed }
    }
}

/// Folds each word of the key into the state with a multiply and a rotate.
#[derive(Debug, Clone, Copy)]
pub struct SessionHasher {
    state: u64,
}

impl SessionHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.state = (self.state ^ word).wrapping_mul(MULTIPLIER).rotate_left(26);
    }
}

impl Hasher for SessionHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let (words, tail) = bytes.as_chunks::<8>();
        for word in words {
            self.mix(u64::from_le_bytes(*word));
        }
        if !tail.is_empty() {
            let mut last = [0u8; 8];
            last[..tail.len()].copy_from_slice(tail);
            // The length goes in too, so that trailing zero bytes still change the hash.
            self.mix(u64::from_le_bytes(last) ^ ((tail.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.mix(u64::from(n));
    }

    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.mix(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // The last multiply's high bits are the best mixed; hashbrown takes its control
        // byte from the top 7 bits and the bucket from the low ones, so fold high into low.
        self.state ^ (self.state >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dgram::ipv4::Endpoint;
    use std::collections::HashSet;
    use std::net::Ipv4Addr;

    fn hash_of(builder: &SessionHashBuilder, key: &(Endpoint, u32)) -> u64 {
        builder.hash_one(key)
    }

    fn endpoint(last: u8, port: u16) -> Endpoint {
        Endpoint {
            mac: [2, 0, 0, 0, 0, last],
            ip: Ipv4Addr::new(10, 77, 0, last),
            port,
        }
    }

    #[test]
    fn each_part_of_the_key_changes_the_hash() {
        let b = SessionHashBuilder::with_seed(7);
        let base = hash_of(&b, &(endpoint(2, 40000), 1));
        assert_ne!(base, hash_of(&b, &(endpoint(2, 40000), 2)), "session id");
        assert_ne!(base, hash_of(&b, &(endpoint(2, 40001), 1)), "port");
        let mut other_mac = endpoint(2, 40000);
        other_mac.mac[0] = 6;
        assert_ne!(base, hash_of(&b, &(other_mac, 1)), "mac");
        let mut other_ip = endpoint(2, 40000);
        other_ip.ip = Ipv4Addr::new(10, 77, 1, 2);
        assert_ne!(base, hash_of(&b, &(other_ip, 1)), "ip");
    }

    #[test]
    fn the_seed_changes_the_hash() {
        let key = (endpoint(2, 40000), 1);
        assert_ne!(
            hash_of(&SessionHashBuilder::with_seed(1), &key),
            hash_of(&SessionHashBuilder::with_seed(2), &key)
        );
        // Two random builders almost surely differ (a 2^-64 chance to fail).
        assert_ne!(
            hash_of(&SessionHashBuilder::random(), &key),
            hash_of(&SessionHashBuilder::random(), &key)
        );
    }

    #[test]
    fn trailing_zero_bytes_are_not_lost() {
        let b = SessionHashBuilder::with_seed(3);
        assert_ne!(b.hash_one([1u8, 0]), b.hash_one([1u8]));
        let mut h1 = b.build_hasher();
        h1.write(&[1, 0]);
        let mut h2 = b.build_hasher();
        h2.write(&[1]);
        assert_ne!(h1.finish(), h2.finish());
    }

    /// The keys a server sees (consecutive ports and session ids of a few hosts) spread over
    /// the low bits hashbrown picks buckets with: no bucket of 256 gets more than a handful.
    #[test]
    fn typical_keys_spread_over_buckets() {
        let b = SessionHashBuilder::with_seed(0x1234);
        let mut per_bucket = [0u32; 256];
        let mut distinct = HashSet::new();
        for host in 0..4u8 {
            for port in 40000..40016u16 {
                for session in 0..4u32 {
                    let h = hash_of(&b, &(endpoint(host, port), session));
                    distinct.insert(h);
                    per_bucket[(h & 255) as usize] += 1;
                }
            }
        }
        assert_eq!(distinct.len(), 256, "no two of 256 keys collide");
        let worst = *per_bucket.iter().max().unwrap();
        assert!(worst <= 6, "a bucket of 256 got {worst} of 256 keys");
    }
}
