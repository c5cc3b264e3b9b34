//! The on-disk node of the extent tree: one 4 KiB block, self-describing and checksummed.
//!
//! ```text
//! 0      magic "CBTN"
//! 4      crc32c of bytes 8..4096
//! 8      nonce of the filesystem (a node of another mkfs is foreign)
//! 16     address: the device offset the node was written to (a misdirected write reads
//!        as a node at the wrong place)
//! 24     generation: the journal record sequence number the node reflects
//! 32     level (u8): 0 for a leaf
//! 33     reserved, zero
//! 34     entry count (u16)
//! 36     reserved, zero (up to HEADER_BYTES)
//! 40     entries, sorted by key, strictly increasing:
//!          leaf:     key (object u64, block u64) | physical u64 | crc u32      (28 bytes)
//!          internal: key (object u64, block u64) | child address u64         (24 bytes)
//!        then zeros to the end of the block
//! ```
//!
//! All integers little-endian. In an internal node, entry `i`'s key is the smallest key its
//! child's subtree may hold; the first entry's key is a lower bound only. Decoding checks every
//! field a reader relies on and says what is wrong; it never trusts a count or an address.

use crate::segment::format::BLOCK_SIZE_BYTES;

pub const NODE_BYTES: usize = BLOCK_SIZE_BYTES as usize;
pub const NODE_MAGIC: [u8; 4] = *b"CBTN";
pub const HEADER_BYTES: usize = 40;
const KEY_BYTES: usize = 16;
pub const LEAF_ENTRY_BYTES: usize = KEY_BYTES + 8 + 4;
pub const INTERNAL_ENTRY_BYTES: usize = KEY_BYTES + 8;
/// Entries a leaf holds: 144.
pub const LEAF_CAPACITY: usize = (NODE_BYTES - HEADER_BYTES) / LEAF_ENTRY_BYTES;
/// Children an internal node holds: 169.
pub const INTERNAL_CAPACITY: usize = (NODE_BYTES - HEADER_BYTES) / INTERNAL_ENTRY_BYTES;
const _: () = assert!(HEADER_BYTES + LEAF_CAPACITY * LEAF_ENTRY_BYTES <= NODE_BYTES);
const _: () = assert!(HEADER_BYTES + INTERNAL_CAPACITY * INTERNAL_ENTRY_BYTES <= NODE_BYTES);
/// Levels above the leaves a tree may have: 169^7 leaves is far more than any device maps.
pub const LEVEL_MAX: u8 = 8;

/// A logical 4 KiB block of an object: the object's id in its shard and the block index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub object: u64,
    pub block: u64,
}

/// Where the block lives and its crc32c.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Value {
    pub physical: u64,
    pub crc: u32,
}

/// What a node holds, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entries {
    Leaf(Vec<(Key, Value)>),
    /// (lower bound of the child's keys, the child's device address).
    Internal(Vec<(Key, u64)>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedNode {
    pub generation: u64,
    pub level: u8,
    pub entries: Entries,
}

/// Why a block is not a valid node where it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeError {
    WrongSize(usize),
    BadMagic,
    BadCrc { stored: u32, computed: u32 },
    Foreign { nonce: u64 },
    Misplaced { stored: u64, read_at: u64 },
    BadLevel(u8),
    BadCount { count: u16, capacity: usize },
    Empty,
    KeysOutOfOrder { index: usize },
    BadAddress { index: usize, address: u64 },
    NonZeroPadding,
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::WrongSize(len) => write!(f, "node block of {len} bytes, not {NODE_BYTES}"),
            NodeError::BadMagic => write!(f, "not a tree node (magic)"),
            NodeError::BadCrc { stored, computed } => {
                write!(
                    f,
                    "node crc {stored:#010x} but contents give {computed:#010x}"
                )
            }
            NodeError::Foreign { nonce } => {
                write!(f, "node of another filesystem (nonce {nonce:#x})")
            }
            NodeError::Misplaced { stored, read_at } => {
                write!(f, "node written for offset {stored} read at {read_at}")
            }
            NodeError::BadLevel(level) => write!(f, "node level {level} above {LEVEL_MAX}"),
            NodeError::BadCount { count, capacity } => {
                write!(f, "{count} entries in a node that holds {capacity}")
            }
            NodeError::Empty => write!(f, "node with no entries"),
            NodeError::KeysOutOfOrder { index } => {
                write!(f, "key {index} not above the one before")
            }
            NodeError::BadAddress { index, address } => {
                write!(
                    f,
                    "entry {index} points at {address}, not a 4 KiB-aligned block"
                )
            }
            NodeError::NonZeroPadding => write!(f, "bytes past the entries are not zero"),
        }
    }
}

impl std::error::Error for NodeError {}

fn put_key(out: &mut [u8], key: Key) {
    out[..8].copy_from_slice(&key.object.to_le_bytes());
    out[8..16].copy_from_slice(&key.block.to_le_bytes());
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn key_at(bytes: &[u8], at: usize) -> Key {
    Key {
        object: u64_at(bytes, at),
        block: u64_at(bytes, at + 8),
    }
}

fn address_ok(address: u64) -> bool {
    address != 0 && address.is_multiple_of(BLOCK_SIZE_BYTES)
}

/// Writes a node into `out` (exactly `NODE_BYTES`).
///
/// # Panics
/// If the entries are empty, over capacity or not strictly increasing, or `level` is over
/// `LEVEL_MAX`: the tree never builds such a node.
pub fn encode(
    out: &mut [u8],
    nonce: u64,
    address: u64,
    generation: u64,
    level: u8,
    entries: &Entries,
) {
    assert_eq!(out.len(), NODE_BYTES);
    assert!(level <= LEVEL_MAX);
    out.fill(0);
    out[..4].copy_from_slice(&NODE_MAGIC);
    out[8..16].copy_from_slice(&nonce.to_le_bytes());
    out[16..24].copy_from_slice(&address.to_le_bytes());
    out[24..32].copy_from_slice(&generation.to_le_bytes());
    out[32] = level;
    let count = match entries {
        Entries::Leaf(entries) => {
            assert_eq!(level, 0, "leaf entries at level 0");
            assert!(!entries.is_empty() && entries.len() <= LEAF_CAPACITY);
            for (i, &(key, value)) in entries.iter().enumerate() {
                assert!(i == 0 || entries[i - 1].0 < key, "leaf keys increase");
                let at = HEADER_BYTES + i * LEAF_ENTRY_BYTES;
                put_key(&mut out[at..], key);
                out[at + 16..at + 24].copy_from_slice(&value.physical.to_le_bytes());
                out[at + 24..at + 28].copy_from_slice(&value.crc.to_le_bytes());
            }
            entries.len()
        }
        Entries::Internal(entries) => {
            assert!(level > 0, "internal entries above level 0");
            assert!(!entries.is_empty() && entries.len() <= INTERNAL_CAPACITY);
            for (i, &(key, child)) in entries.iter().enumerate() {
                assert!(i == 0 || entries[i - 1].0 < key, "internal keys increase");
                assert!(address_ok(child), "child address {child}");
                let at = HEADER_BYTES + i * INTERNAL_ENTRY_BYTES;
                put_key(&mut out[at..], key);
                out[at + 16..at + 24].copy_from_slice(&child.to_le_bytes());
            }
            entries.len()
        }
    };
    out[34..36].copy_from_slice(&(count as u16).to_le_bytes());
    let crc = carmine_crc::crc32c(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads a node written by `encode` for `nonce` at device offset `read_at`.
pub fn decode(bytes: &[u8], nonce: u64, read_at: u64) -> Result<DecodedNode, NodeError> {
    if bytes.len() != NODE_BYTES {
        return Err(NodeError::WrongSize(bytes.len()));
    }
    if bytes[..4] != NODE_MAGIC {
        return Err(NodeError::BadMagic);
    }
    let stored = u32_at(bytes, 4);
    let computed = carmine_crc::crc32c(&bytes[8..]);
    if stored != computed {
        return Err(NodeError::BadCrc { stored, computed });
    }
    let node_nonce = u64_at(bytes, 8);
    if node_nonce != nonce {
        return Err(NodeError::Foreign { nonce: node_nonce });
    }
    let address = u64_at(bytes, 16);
    if address != read_at {
        return Err(NodeError::Misplaced {
            stored: address,
            read_at,
        });
    }
    let generation = u64_at(bytes, 24);
    let level = bytes[32];
    if level > LEVEL_MAX {
        return Err(NodeError::BadLevel(level));
    }
    let count = u16::from_le_bytes([bytes[34], bytes[35]]);
    let (capacity, entry_bytes) = if level == 0 {
        (LEAF_CAPACITY, LEAF_ENTRY_BYTES)
    } else {
        (INTERNAL_CAPACITY, INTERNAL_ENTRY_BYTES)
    };
    if usize::from(count) > capacity {
        return Err(NodeError::BadCount { count, capacity });
    }
    if count == 0 {
        return Err(NodeError::Empty);
    }
    let count = usize::from(count);
    let end = HEADER_BYTES + count * entry_bytes;
    if bytes[33] != 0 || bytes[36..HEADER_BYTES].iter().any(|&b| b != 0) {
        return Err(NodeError::NonZeroPadding);
    }
    if bytes[end..].iter().any(|&b| b != 0) {
        return Err(NodeError::NonZeroPadding);
    }
    let keys_increase = |i: usize, key: Key, previous: Option<Key>| {
        if previous.is_some_and(|p| p >= key) {
            Err(NodeError::KeysOutOfOrder { index: i })
        } else {
            Ok(())
        }
    };
    let entries = if level == 0 {
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = HEADER_BYTES + i * LEAF_ENTRY_BYTES;
            let key = key_at(bytes, at);
            keys_increase(i, key, entries.last().map(|&(k, _)| k))?;
            let physical = u64_at(bytes, at + 16);
            if !address_ok(physical) {
                return Err(NodeError::BadAddress {
                    index: i,
                    address: physical,
                });
            }
            let crc = u32_at(bytes, at + 24);
            entries.push((key, Value { physical, crc }));
        }
        Entries::Leaf(entries)
    } else {
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = HEADER_BYTES + i * INTERNAL_ENTRY_BYTES;
            let key = key_at(bytes, at);
            keys_increase(i, key, entries.last().map(|&(k, _)| k))?;
            let child = u64_at(bytes, at + 16);
            if !address_ok(child) {
                return Err(NodeError::BadAddress {
                    index: i,
                    address: child,
                });
            }
            entries.push((key, child));
        }
        Entries::Internal(entries)
    };
    Ok(DecodedNode {
        generation,
        level,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(n: u64) -> Entries {
        Entries::Leaf(
            (0..n)
                .map(|i| {
                    (
                        Key {
                            object: i / 7,
                            block: i * 3,
                        },
                        Value {
                            physical: (i + 1) * 4096,
                            crc: (i as u32).wrapping_mul(0x9e37_79b9),
                        },
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn capacities_fill_the_block() {
        assert_eq!(LEAF_CAPACITY, 144);
        assert_eq!(INTERNAL_CAPACITY, 169);
    }

    #[test]
    fn leaf_and_internal_nodes_round_trip() {
        let mut block = vec![0u8; NODE_BYTES];
        let entries = leaf(LEAF_CAPACITY as u64);
        encode(&mut block, 0xfeed, 8192, 77, 0, &entries);
        let node = decode(&block, 0xfeed, 8192).unwrap();
        assert_eq!((node.generation, node.level), (77, 0));
        assert_eq!(node.entries, entries);

        let internal = Entries::Internal(
            (0..INTERNAL_CAPACITY as u64)
                .map(|i| {
                    (
                        Key {
                            object: i,
                            block: 0,
                        },
                        (i + 2) * 4096,
                    )
                })
                .collect(),
        );
        encode(&mut block, 0xfeed, 4096 * 9, 78, 3, &internal);
        let node = decode(&block, 0xfeed, 4096 * 9).unwrap();
        assert_eq!((node.generation, node.level), (78, 3));
        assert_eq!(node.entries, internal);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut block = vec![0u8; NODE_BYTES];
        encode(&mut block, 1, 4096, 5, 0, &leaf(40));
        for bit in 0..NODE_BYTES * 8 {
            let mut flipped = block.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode(&flipped, 1, 4096).is_err(),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn foreign_and_misplaced_nodes_are_refused() {
        let mut block = vec![0u8; NODE_BYTES];
        encode(&mut block, 1, 4096, 5, 0, &leaf(3));
        assert_eq!(
            decode(&block, 2, 4096),
            Err(NodeError::Foreign { nonce: 1 })
        );
        assert_eq!(
            decode(&block, 1, 8192),
            Err(NodeError::Misplaced {
                stored: 4096,
                read_at: 8192
            })
        );
        assert_eq!(
            decode(&block[..100], 1, 4096),
            Err(NodeError::WrongSize(100))
        );
    }

    /// A node whose crc is right but whose contents are not (a bug, or a forged block) is
    /// still refused with a reason: the reader never trusts count, order or addresses.
    #[test]
    fn well_checksummed_nonsense_is_refused() {
        let reseal = |block: &mut Vec<u8>| {
            let crc = carmine_crc::crc32c(&block[8..]);
            block[4..8].copy_from_slice(&crc.to_le_bytes());
        };
        let mut good = vec![0u8; NODE_BYTES];
        encode(&mut good, 1, 4096, 5, 0, &leaf(3));

        let mut block = good.clone();
        block[34..36].copy_from_slice(&200u16.to_le_bytes());
        reseal(&mut block);
        assert!(matches!(
            decode(&block, 1, 4096),
            Err(NodeError::BadCount { .. })
        ));

        let mut block = good.clone();
        block[34..36].copy_from_slice(&0u16.to_le_bytes());
        block[HEADER_BYTES..].fill(0);
        reseal(&mut block);
        assert_eq!(decode(&block, 1, 4096), Err(NodeError::Empty));

        let mut block = good.clone();
        let second = HEADER_BYTES + LEAF_ENTRY_BYTES;
        block[second..second + 16].fill(0);
        reseal(&mut block);
        assert_eq!(
            decode(&block, 1, 4096),
            Err(NodeError::KeysOutOfOrder { index: 1 })
        );

        let mut block = good.clone();
        block[HEADER_BYTES + 16..HEADER_BYTES + 24].copy_from_slice(&4095u64.to_le_bytes());
        reseal(&mut block);
        assert!(matches!(
            decode(&block, 1, 4096),
            Err(NodeError::BadAddress { index: 0, .. })
        ));

        let mut block = good.clone();
        block[32] = LEVEL_MAX + 1;
        reseal(&mut block);
        assert_eq!(
            decode(&block, 1, 4096),
            Err(NodeError::BadLevel(LEVEL_MAX + 1))
        );

        let mut block = good;
        block[NODE_BYTES - 1] = 1;
        reseal(&mut block);
        assert_eq!(decode(&block, 1, 4096), Err(NodeError::NonZeroPadding));
    }
}
