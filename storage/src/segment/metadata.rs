//! The segment store's metadata as a shard holds it in memory: object nodes (size, per-block
//! extent map with each block's crc32c, xattrs, omap) and the segment inventory (live blocks
//! per segment, what the cleaner's cost-benefit choice reads).
//!
//! Metadata changes only by applying `Delta`s: the same function serves a running store (the
//! deltas it is about to journal) and replay (the deltas read back from the log), so what a
//! store knows after a restart is by construction what it knew before, up to the last durable
//! record.

use std::collections::{BTreeMap, HashMap};

use crate::segment::format::{Delta, Superblock, BLOCK_SIZE_BYTES, SEGMENTS_START_BYTES};

/// Where a logical block of an object lives, and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    /// Device offset of the 4 KiB block.
    pub physical: u64,
    pub crc: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Onode {
    pub size: u64,
    /// Operations that changed this object since it was created: every mutating op journals
    /// exactly one `ObjectSize` delta, and only that delta counts (Stat's generation).
    pub changes: u64,
    /// Logical block index -> block. Absent blocks read as zeros.
    pub blocks: BTreeMap<u64, BlockRef>,
    pub xattrs: BTreeMap<Box<[u8]>, Box<[u8]>>,
    pub omap: BTreeMap<Box<[u8]>, Box<[u8]>>,
}

/// A delta that contradicts the metadata: the log is corrupt (or the store has a bug).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyError {
    NoSuchObject { oid: Vec<u8>, delta: &'static str },
    ObjectExists { oid: Vec<u8> },
    OutsideDevice { physical: u64 },
    Misaligned { value: u64 },
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::NoSuchObject { oid, delta } => write!(
                f,
                "{delta} for missing object {}",
                String::from_utf8_lossy(oid)
            ),
            ApplyError::ObjectExists { oid } => {
                write!(f, "object {} created twice", String::from_utf8_lossy(oid))
            }
            ApplyError::OutsideDevice { physical } => {
                write!(f, "block at {physical} lies outside the shard's segments")
            }
            ApplyError::Misaligned { value } => write!(f, "{value} is not 4 KiB aligned"),
        }
    }
}

impl std::error::Error for ApplyError {}

pub struct Metadata {
    objects: HashMap<Box<[u8]>, Onode>,
    /// Live 4 KiB blocks per segment, indexed by segment number.
    live_blocks: Vec<u32>,
    sb: Superblock,
}

impl Metadata {
    pub fn new(sb: Superblock) -> Metadata {
        Metadata {
            objects: HashMap::new(),
            live_blocks: vec![0; sb.segment_count as usize],
            sb,
        }
    }

    pub fn object(&self, oid: &[u8]) -> Option<&Onode> {
        self.objects.get(oid)
    }

    pub fn object_count(&self) -> usize {
        self.objects.len()
    }

    pub fn objects(&self) -> impl Iterator<Item = (&[u8], &Onode)> {
        self.objects.iter().map(|(oid, onode)| (&oid[..], onode))
    }

    pub fn live_blocks(&self, segment: u32) -> u32 {
        self.live_blocks[segment as usize]
    }

    fn segment_of(&self, physical: u64) -> Result<usize, ApplyError> {
        if physical % BLOCK_SIZE_BYTES != 0 {
            return Err(ApplyError::Misaligned { value: physical });
        }
        let segment = physical
            .checked_sub(SEGMENTS_START_BYTES)
            .map(|relative| relative / self.sb.segment_size);
        match segment {
            Some(segment) if segment < u64::from(self.sb.segment_count) => Ok(segment as usize),
            _ => Err(ApplyError::OutsideDevice { physical }),
        }
    }

    fn onode(&mut self, oid: &[u8], delta: &'static str) -> Result<&mut Onode, ApplyError> {
        self.objects
            .get_mut(oid)
            .ok_or_else(|| ApplyError::NoSuchObject {
                oid: oid.to_vec(),
                delta,
            })
    }

    /// Applies one delta. On error nothing changed.
    pub fn apply(&mut self, delta: &Delta<'_>) -> Result<(), ApplyError> {
        match *delta {
            Delta::ObjectCreate { oid } => {
                if self.objects.contains_key(oid) {
                    return Err(ApplyError::ObjectExists { oid: oid.to_vec() });
                }
                self.objects.insert(oid.into(), Onode::default());
            }
            Delta::ObjectRemove { oid } => {
                let onode = self
                    .objects
                    .remove(oid)
                    .ok_or_else(|| ApplyError::NoSuchObject {
                        oid: oid.to_vec(),
                        delta: "remove",
                    })?;
                for block in onode.blocks.values() {
                    self.release(block.physical);
                }
            }
            Delta::ObjectSize { oid, size } => {
                let onode = self.onode(oid, "size")?;
                onode.size = size;
                onode.changes += 1;
            }
            Delta::ExtentMap {
                oid,
                offset,
                physical,
                blocks,
                crcs,
            } => self.map_extent(oid, offset, physical, blocks, crcs)?,
            Delta::ExtentUnmap {
                oid,
                offset,
                blocks,
            } => self.unmap_extent(oid, offset, blocks)?,
            Delta::XattrSet { oid, name, value } => {
                self.onode(oid, "xattr set")?
                    .xattrs
                    .insert(name.into(), value.into());
            }
            Delta::XattrRemove { oid, name } => {
                self.onode(oid, "xattr remove")?.xattrs.remove(name);
            }
            Delta::OmapSet { oid, key, value } => {
                self.onode(oid, "omap set")?
                    .omap
                    .insert(key.into(), value.into());
            }
            Delta::OmapRemove { oid, key } => {
                self.onode(oid, "omap remove")?.omap.remove(key);
            }
        }
        Ok(())
    }

    fn map_extent(
        &mut self,
        oid: &[u8],
        offset: u64,
        physical: u64,
        blocks: u32,
        crcs: &[u8],
    ) -> Result<(), ApplyError> {
        if offset % BLOCK_SIZE_BYTES != 0 {
            return Err(ApplyError::Misaligned { value: offset });
        }
        // Check every block before changing anything, so an error leaves no half-applied delta.
        let last = physical + (u64::from(blocks) - 1) * BLOCK_SIZE_BYTES;
        let (first_segment, last_segment) = (self.segment_of(physical)?, self.segment_of(last)?);
        if first_segment != last_segment {
            return Err(ApplyError::OutsideDevice { physical: last });
        }
        self.onode(oid, "extent map")?;
        let mut released = Vec::new();
        let onode = self.objects.get_mut(oid).expect("checked above");
        for index in 0..u64::from(blocks) {
            let crc =
                u32::from_le_bytes(crcs[index as usize * 4..][..4].try_into().expect("4 bytes"));
            let block = BlockRef {
                physical: physical + index * BLOCK_SIZE_BYTES,
                crc,
            };
            if let Some(old) = onode
                .blocks
                .insert(offset / BLOCK_SIZE_BYTES + index, block)
            {
                released.push(old.physical);
            }
        }
        self.live_blocks[first_segment] += blocks;
        for physical in released {
            self.release(physical);
        }
        Ok(())
    }

    fn unmap_extent(&mut self, oid: &[u8], offset: u64, blocks: u32) -> Result<(), ApplyError> {
        if offset % BLOCK_SIZE_BYTES != 0 {
            return Err(ApplyError::Misaligned { value: offset });
        }
        let onode = self.onode(oid, "extent unmap")?;
        let first = offset / BLOCK_SIZE_BYTES;
        let removed: Vec<u64> = onode
            .blocks
            .range(first..first + u64::from(blocks))
            .map(|(&index, _)| index)
            .collect();
        let mut released = Vec::with_capacity(removed.len());
        for index in removed {
            released.push(onode.blocks.remove(&index).expect("listed").physical);
        }
        for physical in released {
            self.release(physical);
        }
        Ok(())
    }

    fn release(&mut self, physical: u64) {
        let segment = self
            .segment_of(physical)
            .expect("mapped blocks were checked when mapped");
        // A live count going negative means the inventory lost track: the cleaner would free
        // live data. Never continue past that.
        self.live_blocks[segment] = self.live_blocks[segment]
            .checked_sub(1)
            .expect("segment inventory underflow");
    }

    /// Recounts the inventory from the extent maps (fsck compares it with the running count).
    pub fn recount_live_blocks(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.live_blocks.len()];
        for onode in self.objects.values() {
            for block in onode.blocks.values() {
                counts[self
                    .segment_of(block.physical)
                    .expect("mapped blocks are inside")] += 1;
            }
        }
        counts
    }

    pub fn live_block_counts(&self) -> &[u32] {
        &self.live_blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::format::DeltaReader;
    use proptest::prelude::*;

    fn sb() -> Superblock {
        Superblock::for_device(SEGMENTS_START_BYTES + 8 * (1 << 20), 1 << 20, 1, [7; 16]).unwrap()
    }

    fn crcs(blocks: u32, seed: u32) -> Vec<u8> {
        (0..blocks).flat_map(|i| (seed + i).to_le_bytes()).collect()
    }

    #[test]
    fn extents_map_overwrite_and_unmap_with_inventory() {
        let sb = sb();
        let mut md = Metadata::new(sb);
        let segment0 = sb.segment_offset(0);
        let segment1 = sb.segment_offset(1);
        md.apply(&Delta::ObjectCreate { oid: b"a" }).unwrap();
        let c = crcs(4, 100);
        md.apply(&Delta::ExtentMap {
            oid: b"a",
            offset: 0,
            physical: segment0 + 4096,
            blocks: 4,
            crcs: &c,
        })
        .unwrap();
        assert_eq!(md.live_blocks(0), 4);
        let c2 = crcs(2, 200);
        md.apply(&Delta::ExtentMap {
            oid: b"a",
            offset: 4096,
            physical: segment1 + 4096,
            blocks: 2,
            crcs: &c2,
        })
        .unwrap();
        assert_eq!(
            (md.live_blocks(0), md.live_blocks(1)),
            (2, 2),
            "overwritten blocks leave their old segment"
        );
        let onode = md.object(b"a").unwrap();
        assert_eq!(
            onode.blocks[&1],
            BlockRef {
                physical: segment1 + 4096,
                crc: 200
            }
        );
        assert_eq!(onode.blocks[&3].crc, 103);
        md.apply(&Delta::ExtentUnmap {
            oid: b"a",
            offset: 0,
            blocks: 2,
        })
        .unwrap();
        assert_eq!((md.live_blocks(0), md.live_blocks(1)), (1, 1));
        assert_eq!(md.recount_live_blocks(), md.live_block_counts());
        md.apply(&Delta::ObjectRemove { oid: b"a" }).unwrap();
        assert_eq!(md.live_block_counts().iter().sum::<u32>(), 0);
        assert_eq!(md.object_count(), 0);
    }

    #[test]
    fn contradictory_deltas_are_errors_and_change_nothing() {
        let sb = sb();
        let mut md = Metadata::new(sb);
        assert!(matches!(
            md.apply(&Delta::ObjectSize { oid: b"x", size: 1 }),
            Err(ApplyError::NoSuchObject { .. })
        ));
        md.apply(&Delta::ObjectCreate { oid: b"x" }).unwrap();
        assert!(matches!(
            md.apply(&Delta::ObjectCreate { oid: b"x" }),
            Err(ApplyError::ObjectExists { .. })
        ));
        let c = crcs(2, 0);
        let outside = Delta::ExtentMap {
            oid: b"x",
            offset: 0,
            physical: 4096,
            blocks: 2,
            crcs: &c,
        };
        assert!(
            matches!(md.apply(&outside), Err(ApplyError::OutsideDevice { .. })),
            "superblock area is not data"
        );
        let straddle = Delta::ExtentMap {
            oid: b"x",
            offset: 0,
            physical: sb.segment_offset(1) - 4096,
            blocks: 2,
            crcs: &c,
        };
        assert!(
            md.apply(&straddle).is_err(),
            "an extent never crosses a segment boundary"
        );
        let misaligned = Delta::ExtentMap {
            oid: b"x",
            offset: 100,
            physical: sb.segment_offset(0),
            blocks: 2,
            crcs: &c,
        };
        assert!(matches!(
            md.apply(&misaligned),
            Err(ApplyError::Misaligned { value: 100 })
        ));
        assert!(md.object(b"x").unwrap().blocks.is_empty());
        assert_eq!(md.live_block_counts().iter().sum::<u32>(), 0);
    }

    proptest! {
        /// Replaying the encoded deltas into fresh metadata gives the same state: what a
        /// restart recovers is what the running store had.
        #[test]
        fn replay_of_encoded_deltas_reproduces_the_state(steps in proptest::collection::vec((0u8..6, 0u8..3, 0u64..16, 1u32..4, 0u32..6), 1..80)) {
            let sb = sb();
            let mut live = Metadata::new(sb);
            let mut log = Vec::new();
            for (kind, object, block, blocks, segment) in steps {
                let oid = [b'o', b'0' + object];
                let crc_bytes = crcs(blocks, u32::from(kind) * 1000 + block as u32);
                let physical = sb.segment_offset(segment) + 4096 * (1 + block);
                let delta = match kind {
                    0 => Delta::ObjectCreate { oid: &oid },
                    1 => Delta::ObjectRemove { oid: &oid },
                    2 => Delta::ExtentMap { oid: &oid, offset: block * 4096, physical, blocks, crcs: &crc_bytes },
                    3 => Delta::ExtentUnmap { oid: &oid, offset: block * 4096, blocks },
                    4 => Delta::ObjectSize { oid: &oid, size: block * 1000 },
                    _ => Delta::XattrSet { oid: &oid, name: b"n", value: &crc_bytes },
                };
                // The running store journals only deltas that apply.
                if live.apply(&delta).is_ok() {
                    delta.encode(&mut log);
                }
            }
            let mut replayed = Metadata::new(sb);
            for delta in DeltaReader::new(&log) {
                replayed.apply(&delta.unwrap()).unwrap();
            }
            prop_assert_eq!(replayed.live_block_counts(), live.live_block_counts());
            prop_assert_eq!(live.recount_live_blocks(), live.live_block_counts());
            prop_assert_eq!(replayed.object_count(), live.object_count());
            for (oid, onode) in live.objects() {
                prop_assert_eq!(Some(onode), replayed.object(oid));
            }
        }
    }
}
