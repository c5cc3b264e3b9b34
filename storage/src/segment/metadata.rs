//! The segment store's metadata as a shard holds it in memory: object nodes (size, per-block
//! extent map with each block's crc32c, xattrs, omap) and the segment inventory (live blocks
//! per segment, what the cleaner's cost-benefit choice reads).
//!
//! Metadata changes only by applying `Delta`s: the same function serves a running store (the
//! deltas it is about to journal) and replay (the deltas read back from the log), so what a
//! store knows after a restart is by construction what it knew before, up to the last durable
//! record.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use crate::segment::btree::{ExtentTree, Key};
use crate::segment::format::{Delta, Superblock, BLOCK_SIZE_BYTES, SEGMENTS_START_BYTES};

/// Where a logical block of an object lives, and its checksum: the extent tree's value.
pub use crate::segment::btree::Value as BlockRef;

mod nodes;
pub use nodes::MetadataNodes;

/// An object's own metadata; its blocks are in the shard's extent tree under its `id`.
#[derive(Clone, Debug, Default)]
pub struct Onode {
    /// The object's key prefix in the extent tree. `ObjectCreate` assigns the next id, in the
    /// order the shard applies them; a checkpoint's `ObjectState` restores the id the object
    /// had, and its `ObjectIdNext` the next id, so a replay numbers every object as the running
    /// store did (records apply in the same order in both). Never reused; below
    /// `OBJECT_ID_END`.
    pub id: u64,
    pub size: u64,
    /// Operations that changed this object since it was created: every mutating op journals
    /// exactly one `ObjectSize` delta, and only that delta counts (Stat's generation).
    pub changes: u64,
    /// Blocks the object has in the extent tree (kept so sizes are known without a walk).
    pub mapped_blocks: u64,
    pub xattrs: BTreeMap<Box<[u8]>, Box<[u8]>>,
    pub omap: BTreeMap<Box<[u8]>, Box<[u8]>>,
}

/// One object as a reader sees it: its onode (through `Deref`) and its block map.
#[derive(Clone, Copy)]
pub struct ObjectRef<'a> {
    pub onode: &'a Onode,
    pub blocks: BlockMap<'a>,
}

impl std::ops::Deref for ObjectRef<'_> {
    type Target = Onode;

    fn deref(&self) -> &Onode {
        self.onode
    }
}

/// Same object: id, size, changes, xattrs, omap and every block.
impl PartialEq for ObjectRef<'_> {
    fn eq(&self, other: &ObjectRef<'_>) -> bool {
        let (a, b) = (self.onode, other.onode);
        a.id == b.id
            && a.size == b.size
            && a.changes == b.changes
            && a.mapped_blocks == b.mapped_blocks
            && a.xattrs == b.xattrs
            && a.omap == b.omap
            && self.blocks.iter().eq(other.blocks.iter())
    }
}

impl std::fmt::Debug for ObjectRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("onode", self.onode)
            .field("blocks", &self.blocks.iter().collect::<Vec<_>>())
            .finish()
    }
}

/// One object's logical block -> `BlockRef` map: its key range in the extent tree. Absent
/// blocks read as zeros.
#[derive(Clone, Copy)]
pub struct BlockMap<'a> {
    tree: &'a ExtentTree,
    object: u64,
}

impl<'a> BlockMap<'a> {
    fn key(&self, index: u64) -> Key {
        Key {
            object: self.object,
            block: index,
        }
    }

    pub fn get(&self, index: u64) -> Option<BlockRef> {
        self.tree.get(self.key(index))
    }

    pub fn contains(&self, index: u64) -> bool {
        self.get(index).is_some()
    }

    /// Mapped blocks with index in `first..=last`, in index order (allocates nothing).
    pub fn range(&self, first: u64, last: u64) -> impl Iterator<Item = (u64, BlockRef)> + 'a {
        let to = match last.checked_add(1) {
            Some(end) => self.key(end),
            None => Key {
                object: self.object + 1,
                block: 0,
            },
        };
        self.tree
            .range(self.key(first), to)
            .map(|(key, block)| (key.block, block))
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, BlockRef)> + 'a {
        self.range(0, u64::MAX)
    }
}

/// A delta that contradicts the metadata: the log is corrupt (or the store has a bug).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyError {
    NoSuchObject {
        oid: Vec<u8>,
        delta: &'static str,
    },
    ObjectExists {
        oid: Vec<u8>,
    },
    /// A checkpoint names an id below one already in use (its objects come in id order, so
    /// that is a reused or repeated id), or one at or past `OBJECT_ID_END`.
    ObjectIdTaken {
        oid: Vec<u8>,
        id: u64,
    },
    /// A checkpoint's next id is not above every id it named (or past `OBJECT_ID_END`).
    ObjectIdNextTooLow {
        next: u64,
        used_below: u64,
    },
    OutsideDevice {
        physical: u64,
    },
    Misaligned {
        value: u64,
    },
    /// A checkpoint's `TreeRoot` given to `apply`: the tree is loaded from the device
    /// (`load_tree`, which replay calls), not applied like a delta.
    TreeRootNotRead {
        root: u64,
    },
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
            ApplyError::ObjectIdTaken { oid, id } => write!(
                f,
                "object {} restored under id {id}, below an id already used or out of range",
                String::from_utf8_lossy(oid)
            ),
            ApplyError::ObjectIdNextTooLow { next, used_below } => write!(
                f,
                "checkpoint's next object id {next} is not above the ids in use (below {used_below}) or out of range"
            ),
            ApplyError::OutsideDevice { physical } => {
                write!(f, "block at {physical} lies outside the shard's segments")
            }
            ApplyError::Misaligned { value } => write!(f, "{value} is not 4 KiB aligned"),
            ApplyError::TreeRootNotRead { root } => write!(
                f,
                "checkpoint's tree root at {root} applied as a delta: the tree is loaded from the device (load_tree)"
            ),
        }
    }
}

impl std::error::Error for ApplyError {}

/// Object ids are below this: `u64::MAX` stays free so that an object's key range in the
/// extent tree always has an exclusive end (`BlockMap::range`, `all_extents`).
pub const OBJECT_ID_END: u64 = u64::MAX;

pub struct Metadata {
    /// Objects by id, keyed by `hash_oid`: a caller that looks an object up more than once
    /// (the store: its lane, then the object at submit and again when the op runs) hashes its
    /// id once.
    objects: HashTable<(Box<[u8]>, Onode)>,
    /// Keyed SipHash (random per process), as std's maps: ids come from clients.
    hasher: RandomState,
    /// Object id -> object name, for walks of the tree that must name what they find (the
    /// cleaner journals its moves by name).
    names: HashMap<u64, Box<[u8]>>,
    /// Every object's blocks, keyed (object id, logical block).
    extents: ExtentTree,
    next_object_id: u64,
    /// Live 4 KiB blocks per segment, indexed by segment number: data blocks and the extent
    /// tree's node blocks (`nodes.rs`).
    live_blocks: Vec<u32>,
    /// Of `live_blocks`, the node blocks: written by a checkpoint and not yet released.
    node_blocks: Vec<u32>,
    /// Node addresses obsoleted by the checkpoint with this generation (its first record's
    /// number), released once a durable header names it (`release_nodes_named`).
    unreleased_nodes: Vec<(u64, Vec<u64>)>,
    sb: Superblock,
    /// Entries an unmap or remove takes out, gathered then removed: kept between deltas so
    /// that applying them allocates nothing once it has grown.
    removed_scratch: Vec<(Key, BlockRef)>,
}

impl Metadata {
    pub fn new(sb: Superblock) -> Metadata {
        Metadata {
            objects: HashTable::new(),
            hasher: RandomState::new(),
            names: HashMap::new(),
            extents: ExtentTree::new(),
            next_object_id: 0,
            live_blocks: vec![0; sb.segment_count as usize],
            node_blocks: vec![0; sb.segment_count as usize],
            unreleased_nodes: Vec::new(),
            sb,
            removed_scratch: Vec::new(),
        }
    }

    fn object_ref<'a>(&'a self, onode: &'a Onode) -> ObjectRef<'a> {
        ObjectRef {
            onode,
            blocks: BlockMap {
                tree: &self.extents,
                object: onode.id,
            },
        }
    }

    /// The hash `object_hashed` takes for `oid`.
    pub fn hash_oid(&self, oid: &[u8]) -> u64 {
        self.hasher.hash_one(oid)
    }

    pub fn object(&self, oid: &[u8]) -> Option<ObjectRef<'_>> {
        self.object_hashed(oid, self.hash_oid(oid))
    }

    /// `object`, for a caller that has `hash_oid(oid)` already.
    pub fn object_hashed(&self, oid: &[u8], hash: u64) -> Option<ObjectRef<'_>> {
        debug_assert_eq!(hash, self.hash_oid(oid));
        self.get(oid, hash).map(|onode| self.object_ref(onode))
    }

    fn get(&self, oid: &[u8], hash: u64) -> Option<&Onode> {
        self.objects
            .find(hash, |(key, _)| **key == *oid)
            .map(|(_, onode)| onode)
    }

    fn get_mut(&mut self, oid: &[u8]) -> Option<&mut Onode> {
        let hash = self.hash_oid(oid);
        self.objects
            .find_mut(hash, |(key, _)| **key == *oid)
            .map(|(_, onode)| onode)
    }

    pub fn object_count(&self) -> usize {
        self.objects.len()
    }

    pub fn objects(&self) -> impl Iterator<Item = (&[u8], ObjectRef<'_>)> {
        self.objects
            .iter()
            .map(|(oid, onode)| (&oid[..], self.object_ref(onode)))
    }

    /// The shard's extent tree (fsck and tests look at its shape).
    pub fn extent_tree(&self) -> &ExtentTree {
        &self.extents
    }

    /// The extent tree, for a checkpoint's write-out of its nodes (`begin_write_out`,
    /// `write_next_node`): that changes where nodes live, never an entry. Every change to the
    /// entries goes through `apply`, so that replay rebuilds them.
    pub fn extent_tree_for_write_out(&mut self) -> &mut ExtentTree {
        &mut self.extents
    }

    pub fn live_blocks(&self, segment: u32) -> u32 {
        self.live_blocks[segment as usize]
    }

    fn segment_of(&self, physical: u64) -> Result<usize, ApplyError> {
        segment_of(&self.sb, physical)
    }

    fn onode(&mut self, oid: &[u8], delta: &'static str) -> Result<&mut Onode, ApplyError> {
        self.get_mut(oid).ok_or_else(|| ApplyError::NoSuchObject {
            oid: oid.to_vec(),
            delta,
        })
    }

    /// Adds an object under `id` (`None`: the next id, which then advances; `Some`: a
    /// checkpoint's, which only raises the next id past it).
    fn create(
        &mut self,
        oid: &[u8],
        id: Option<u64>,
        size: u64,
        changes: u64,
    ) -> Result<(), ApplyError> {
        let hash = self.hash_oid(oid);
        if self.get(oid, hash).is_some() {
            return Err(ApplyError::ObjectExists { oid: oid.to_vec() });
        }
        let id = match id {
            None => self.next_object_id,
            // A checkpoint lists objects in id order, so each id is at least the next one:
            // never one a removed object had, never one twice.
            Some(id) if (self.next_object_id..OBJECT_ID_END).contains(&id) => id,
            Some(id) => {
                return Err(ApplyError::ObjectIdTaken {
                    oid: oid.to_vec(),
                    id,
                })
            }
        };
        // One id per create, from 0: a store would need 2^64 creates to run out.
        assert!(id < OBJECT_ID_END, "object ids exhausted");
        self.next_object_id = self.next_object_id.max(id + 1);
        let onode = Onode {
            id,
            size,
            changes,
            ..Onode::default()
        };
        let hasher = &self.hasher;
        self.objects
            .insert_unique(hash, (oid.into(), onode), |(key, _)| hasher.hash_one(key));
        let previous = self.names.insert(id, oid.into());
        assert!(previous.is_none(), "object ids are never reused");
        Ok(())
    }

    /// Applies one delta. On error nothing changed.
    pub fn apply(&mut self, delta: &Delta<'_>) -> Result<(), ApplyError> {
        match *delta {
            Delta::ObjectCreate { oid } => self.create(oid, None, 0, 0)?,
            Delta::ObjectRemove { oid } => {
                let hash = self.hash_oid(oid);
                let Ok(entry) = self.objects.find_entry(hash, |(key, _)| **key == *oid) else {
                    return Err(ApplyError::NoSuchObject {
                        oid: oid.to_vec(),
                        delta: "remove",
                    });
                };
                let ((_, onode), _) = entry.remove();
                self.names.remove(&onode.id);
                self.unmap_range(onode.id, 0, u64::MAX);
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
            Delta::ObjectState {
                oid,
                id,
                size,
                changes,
            } => self.create(oid, Some(id), size, changes)?,
            Delta::TreeRoot { root, .. } => return Err(ApplyError::TreeRootNotRead { root }),
            Delta::ObjectIdNext { next } => {
                if next < self.next_object_id || next > OBJECT_ID_END {
                    return Err(ApplyError::ObjectIdNextTooLow {
                        next,
                        used_below: self.next_object_id,
                    });
                }
                self.next_object_id = next;
            }
            Delta::ExtentMove {
                oid,
                offset,
                from,
                physical,
                blocks,
            } => self.move_extent(oid, offset, from, physical, blocks)?,
        }
        Ok(())
    }

    /// The cleaner's copy: each block moves only if it still lives where the copy was read
    /// from. A block overwritten, unmapped or removed since is left alone (the copy is dead).
    fn move_extent(
        &mut self,
        oid: &[u8],
        offset: u64,
        from: u64,
        physical: u64,
        blocks: u32,
    ) -> Result<(), ApplyError> {
        if offset % BLOCK_SIZE_BYTES != 0 {
            return Err(ApplyError::Misaligned { value: offset });
        }
        let span = (u64::from(blocks) - 1) * BLOCK_SIZE_BYTES;
        let to_segment = self.segment_of(physical)?;
        if self.segment_of(physical + span)? != to_segment {
            return Err(ApplyError::OutsideDevice {
                physical: physical + span,
            });
        }
        let from_segment = self.segment_of(from)?;
        if self.segment_of(from + span)? != from_segment {
            return Err(ApplyError::OutsideDevice {
                physical: from + span,
            });
        }
        let Some(onode) = self.get(oid, self.hash_oid(oid)) else {
            return Ok(());
        };
        let object = onode.id;
        let mut moved = 0;
        for index in 0..u64::from(blocks) {
            let key = Key {
                object,
                block: offset / BLOCK_SIZE_BYTES + index,
            };
            if let Some(block) = self.extents.get(key) {
                if block.physical == from + index * BLOCK_SIZE_BYTES {
                    self.extents.insert(
                        key,
                        BlockRef {
                            physical: physical + index * BLOCK_SIZE_BYTES,
                            crc: block.crc,
                        },
                    );
                    moved += 1;
                }
            }
        }
        self.live_blocks[to_segment] += moved;
        self.live_blocks[from_segment] = self.live_blocks[from_segment]
            .checked_sub(moved)
            .expect("segment inventory underflow");
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
        // Field by field, so the onode stays borrowed while the tree changes: one hash lookup
        // per delta, not one before and one after.
        let hash = self.hash_oid(oid);
        let Metadata {
            objects,
            extents,
            live_blocks,
            sb,
            ..
        } = self;
        let onode = objects
            .find_mut(hash, |(key, _)| **key == *oid)
            .map(|(_, onode)| onode)
            .ok_or_else(|| ApplyError::NoSuchObject {
                oid: oid.to_vec(),
                delta: "extent map",
            })?;
        for index in 0..u64::from(blocks) {
            let crc =
                u32::from_le_bytes(crcs[index as usize * 4..][..4].try_into().expect("4 bytes"));
            let block = BlockRef {
                physical: physical + index * BLOCK_SIZE_BYTES,
                crc,
            };
            let key = Key {
                object: onode.id,
                block: offset / BLOCK_SIZE_BYTES + index,
            };
            match extents.insert(key, block) {
                Some(old) => release(sb, live_blocks, old.physical),
                None => onode.mapped_blocks += 1,
            }
        }
        live_blocks[first_segment] += blocks;
        Ok(())
    }

    fn unmap_extent(&mut self, oid: &[u8], offset: u64, blocks: u32) -> Result<(), ApplyError> {
        if offset % BLOCK_SIZE_BYTES != 0 {
            return Err(ApplyError::Misaligned { value: offset });
        }
        let object = self.onode(oid, "extent unmap")?.id;
        let first = offset / BLOCK_SIZE_BYTES;
        let removed = self.unmap_range(object, first, first.saturating_add(u64::from(blocks)));
        self.onode(oid, "extent unmap")?.mapped_blocks -= removed;
        Ok(())
    }

    /// Removes `object`'s blocks in `first..end` from the tree and the inventory; returns how
    /// many there were.
    fn unmap_range(&mut self, object: u64, first: u64, end: u64) -> u64 {
        let mut removed = std::mem::take(&mut self.removed_scratch);
        removed.clear();
        removed.extend(self.extents.range(
            Key {
                object,
                block: first,
            },
            Key { object, block: end },
        ));
        if end == u64::MAX {
            // The range's end is exclusive: the very last index is asked for separately.
            let last = Key { object, block: end };
            removed.extend(self.extents.get(last).map(|block| (last, block)));
        }
        for &(key, block) in &removed {
            self.extents.remove(key).expect("listed from the tree");
            self.release(block.physical);
        }
        let count = removed.len() as u64;
        self.removed_scratch = removed;
        count
    }

    fn release(&mut self, physical: u64) {
        release(&self.sb, &mut self.live_blocks, physical);
    }

    /// Recounts the inventory from the extent tree, its entries and its nodes on the device
    /// (fsck compares it with the running count).
    pub fn recount_live_blocks(&self) -> Vec<u32> {
        let mut counts = self.recount_node_blocks();
        for (_, block) in self.all_extents() {
            counts[self
                .segment_of(block.physical)
                .expect("mapped blocks are inside")] += 1;
        }
        counts
    }

    fn all_extents(&self) -> impl Iterator<Item = (Key, BlockRef)> + '_ {
        let end = Key {
            object: u64::MAX,
            block: u64::MAX,
        };
        // Object ids stay below OBJECT_ID_END (u64::MAX), so the exclusive end misses none.
        self.extents.range(Key::default(), end)
    }

    /// Live data blocks in all segments (the inventory less the tree's node blocks).
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks_per_segment().map(u64::from).sum()
    }

    /// Live data blocks per segment (the inventory less the tree's node blocks).
    fn data_blocks_per_segment(&self) -> impl Iterator<Item = u32> + '_ {
        self.live_blocks
            .iter()
            .zip(&self.node_blocks)
            .map(|(live, nodes)| live - nodes)
    }

    pub fn live_block_counts(&self) -> &[u32] {
        &self.live_blocks
    }

    /// Every live block in `segment`: (object, logical block index, block), sorted by device
    /// offset, in one walk of the whole extent tree. Tests only: the cleaner walks in steps
    /// (`live_in_segment_step`, driven by `SegmentStore::walk_victim`).
    #[cfg(test)]
    pub fn live_in_segment(&self, segment: u32, out: &mut Vec<(Box<[u8]>, u64, BlockRef)>) {
        out.clear();
        let end = self.live_in_segment_step(segment, Key::default(), usize::MAX, out);
        debug_assert!(end.is_none());
        out.sort_unstable_by_key(|(_, _, block)| block.physical);
    }

    /// One step of a walk for the segment's live blocks: visits at most `budget` extents from
    /// `from` on and appends those in the segment to `out` (in key order, not device order).
    /// Returns where the next step resumes, or None when the walk is complete. A walk in
    /// steps finds every block that stays in the segment while it runs; a block that moves
    /// out meanwhile may be listed anyway (the cleaner's copy of it then does not apply).
    pub fn live_in_segment_step(
        &self,
        segment: u32,
        from: Key,
        budget: usize,
        out: &mut Vec<(Box<[u8]>, u64, BlockRef)>,
    ) -> Option<Key> {
        let start = self.sb.segment_offset(segment);
        let end = start + self.sb.segment_size;
        // The tree's visitor, not its iterator: this walks every entry, and a visit per run of
        // a leaf costs a fraction of the iterator's instructions per entry.
        self.extents.for_each_from(from, budget, &mut |run| {
            for &(key, block) in run {
                if (start..end).contains(&block.physical) {
                    let oid = self.names.get(&key.object).expect("every id has a name");
                    out.push((oid.clone(), key.block, block));
                }
            }
        })
    }

    /// An upper bound of the bytes `checkpoint` encodes (each block its own extent).
    pub fn checkpoint_bytes_estimate(&self) -> u64 {
        /// `ObjectIdNext`: kind and next id.
        const OBJECT_ID_NEXT_BYTES: u64 = 9;
        let objects: u64 = self
            .objects
            .iter()
            .map(|(oid, onode)| {
                let oid_bytes = oid.len() as u64 + 5;
                let extents = onode.mapped_blocks * (oid_bytes + 24);
                let pairs: u64 = onode
                    .xattrs
                    .iter()
                    .chain(onode.omap.iter())
                    .map(|(k, v)| oid_bytes + 8 + (k.len() + v.len()) as u64)
                    .sum();
                // ObjectState: id, size, changes.
                oid_bytes + 24 + extents + pairs
            })
            .sum();
        objects + OBJECT_ID_NEXT_BYTES
    }

    /// Encodes the whole metadata as deltas that rebuild it from nothing (`ObjectState`, then
    /// each object's extents, xattrs and omap, objects in id order; last `ObjectIdNext`),
    /// split into chunks of at most `chunk_max` bytes
    /// (each chunk becomes one journal record). Returns the bytes of its `ExtentMap` deltas:
    /// the part of the dump a write-out of the extent tree's nodes would replace (the rest is
    /// the onode table).
    pub fn checkpoint(&self, chunk_max: usize, chunks: &mut Vec<Vec<u8>>) -> u64 {
        self.encode_checkpoint(chunk_max, true, chunks)
    }

    /// The onode table alone: `checkpoint` without the `ExtentMap` deltas, for a checkpoint
    /// that writes the extent tree's nodes instead (its last record then adds `TreeRoot`).
    pub fn checkpoint_onodes(&self, chunk_max: usize, chunks: &mut Vec<Vec<u8>>) {
        let extent_bytes = self.encode_checkpoint(chunk_max, false, chunks);
        debug_assert_eq!(extent_bytes, 0);
    }

    fn encode_checkpoint(&self, chunk_max: usize, extents: bool, chunks: &mut Vec<Vec<u8>>) -> u64 {
        /// Blocks per extent delta: bounds one delta well below any chunk.
        const EXTENT_BLOCKS_MAX: usize = 256;
        let mut current = Vec::with_capacity(chunk_max);
        let mut delta_bytes = Vec::new();
        let mut crcs = Vec::with_capacity(EXTENT_BLOCKS_MAX * 4);
        let mut extent_bytes = 0u64;
        let mut push = |delta: &Delta<'_>, current: &mut Vec<u8>, chunks: &mut Vec<Vec<u8>>| {
            delta_bytes.clear();
            delta.encode(&mut delta_bytes);
            if let Delta::ExtentMap { .. } = delta {
                extent_bytes += delta_bytes.len() as u64;
            }
            assert!(
                delta_bytes.len() <= chunk_max,
                "one delta exceeds a checkpoint chunk"
            );
            if current.len() + delta_bytes.len() > chunk_max {
                chunks.push(std::mem::replace(current, Vec::with_capacity(chunk_max)));
            }
            current.extend_from_slice(&delta_bytes);
        };
        // In object id order, not the hash map's (which differs per process): the same
        // metadata then always encodes to the same records, so a seeded simulation replays
        // exactly, and replay can check that no id repeats (`create`). One pointer pair per
        // object, next to chunks that hold the whole metadata.
        let mut objects: Vec<(&Box<[u8]>, &Onode)> = self
            .objects
            .iter()
            .map(|(oid, onode)| (oid, onode))
            .collect();
        objects.sort_unstable_by_key(|(_, onode)| onode.id);
        for (oid, onode) in objects {
            push(
                &Delta::ObjectState {
                    oid,
                    id: onode.id,
                    size: onode.size,
                    changes: onode.changes,
                },
                &mut current,
                chunks,
            );
            let mut blocks = self.object_ref(onode).blocks.iter().peekable();
            while let Some((first, block)) = blocks.next().filter(|_| extents) {
                crcs.clear();
                crcs.extend_from_slice(&block.crc.to_le_bytes());
                let mut count = 1u64;
                while let Some(&(next, next_block)) = blocks.peek() {
                    if count as usize == EXTENT_BLOCKS_MAX
                        || next != first + count
                        || next_block.physical != block.physical + count * BLOCK_SIZE_BYTES
                    {
                        break;
                    }
                    crcs.extend_from_slice(&next_block.crc.to_le_bytes());
                    count += 1;
                    blocks.next();
                }
                push(
                    &Delta::ExtentMap {
                        oid,
                        offset: first * BLOCK_SIZE_BYTES,
                        physical: block.physical,
                        blocks: count as u32,
                        crcs: &crcs,
                    },
                    &mut current,
                    chunks,
                );
            }
            for (name, value) in &onode.xattrs {
                push(&Delta::XattrSet { oid, name, value }, &mut current, chunks);
            }
            for (key, value) in &onode.omap {
                push(&Delta::OmapSet { oid, key, value }, &mut current, chunks);
            }
        }
        // Last, so that replay knows every id the checkpoint used before it checks this one.
        push(
            &Delta::ObjectIdNext {
                next: self.next_object_id,
            },
            &mut current,
            chunks,
        );
        chunks.push(current);
        extent_bytes
    }

    /// Extent-tree nodes changed since the last call (or since mount): what a checkpoint that
    /// wrote only changed nodes would write of the tree, with every node on disk before. Starts
    /// the next interval. (The store calls it at each checkpoint and reports the estimate
    /// beside the dump's bytes; ARCHITECTURE.md, "the plan", step 3.)
    pub fn take_changed_tree_nodes(&mut self) -> usize {
        let changed = self.extents.changed_count();
        self.extents.clear_changed();
        changed
    }

    /// The id the next `ObjectCreate` gets.
    pub fn next_object_id(&self) -> u64 {
        self.next_object_id
    }

    /// Same objects (under the same ids), same contents, same inventory, same next id (tests
    /// and fsck compare a replayed copy).
    /// The inventory compared is of data blocks: node blocks legitimately differ between the
    /// running store and a replay until the newest checkpoint is named (the running store
    /// counts the nodes it wrote and those a replay from the checkpoint before would need).
    pub fn same_as(&self, other: &Metadata) -> bool {
        self.data_blocks_per_segment()
            .eq(other.data_blocks_per_segment())
            && self.next_object_id == other.next_object_id
            && self.objects.len() == other.objects.len()
            && self
                .objects()
                .all(|(oid, object)| other.object(oid) == Some(object))
    }
}

/// The segment holding `physical`, which must be a 4 KiB-aligned address inside the segments.
fn segment_of(sb: &Superblock, physical: u64) -> Result<usize, ApplyError> {
    if physical % BLOCK_SIZE_BYTES != 0 {
        return Err(ApplyError::Misaligned { value: physical });
    }
    let segment = physical
        .checked_sub(SEGMENTS_START_BYTES)
        .map(|relative| relative / sb.segment_size);
    match segment {
        Some(segment) if segment < u64::from(sb.segment_count) => Ok(segment as usize),
        _ => Err(ApplyError::OutsideDevice { physical }),
    }
}

/// Takes a block that stopped being live out of its segment's count.
fn release(sb: &Superblock, live_blocks: &mut [u32], physical: u64) {
    let segment = segment_of(sb, physical).expect("mapped blocks were checked when mapped");
    // A live count going negative means the inventory lost track: the cleaner would free
    // live data. Never continue past that.
    live_blocks[segment] = live_blocks[segment]
        .checked_sub(1)
        .expect("segment inventory underflow");
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
            onode.blocks.get(1).unwrap(),
            BlockRef {
                physical: segment1 + 4096,
                crc: 200
            }
        );
        assert_eq!(onode.blocks.get(3).unwrap().crc, 103);
        assert_eq!(onode.mapped_blocks, 4);
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
    fn objects_share_one_extent_tree_under_their_own_ids() {
        let sb = sb();
        let mut md = Metadata::new(sb);
        let segment0 = sb.segment_offset(0);
        for (n, oid) in [&b"b"[..], b"a", b"c"].into_iter().enumerate() {
            md.apply(&Delta::ObjectCreate { oid }).unwrap();
            assert_eq!(md.object(oid).unwrap().id, n as u64, "ids in apply order");
            let c = crcs(3, 10 * n as u32);
            md.apply(&Delta::ExtentMap {
                oid,
                offset: 4096,
                physical: segment0 + 3 * 4096 * n as u64,
                blocks: 3,
                crcs: &c,
            })
            .unwrap();
        }
        assert_eq!(md.extent_tree().len(), 9);
        md.extent_tree().check().unwrap();
        let a = md.object(b"a").unwrap();
        assert_eq!(
            a.blocks.iter().collect::<Vec<_>>(),
            (0..3)
                .map(|i| (
                    1 + i,
                    BlockRef {
                        physical: segment0 + (3 + i) * 4096,
                        crc: 10 + i as u32
                    }
                ))
                .collect::<Vec<_>>(),
            "an object sees only its own keys"
        );
        assert_eq!(a.blocks.range(2, 2).count(), 1);
        assert_eq!(a.blocks.range(4, u64::MAX).count(), 0);
        assert!(!a.blocks.contains(0));

        // A removed object's keys leave the tree; the same name created again starts empty
        // under a fresh id.
        md.apply(&Delta::ObjectRemove { oid: b"a" }).unwrap();
        assert_eq!(md.extent_tree().len(), 6);
        md.apply(&Delta::ObjectCreate { oid: b"a" }).unwrap();
        let a = md.object(b"a").unwrap();
        assert_eq!(a.id, 3, "ids are never reused");
        assert_eq!(a.blocks.iter().count(), 0);
        assert_eq!(md.object(b"c").unwrap().blocks.iter().count(), 3);
        assert_eq!(md.live_blocks(0), 6);
        assert_eq!(md.recount_live_blocks(), md.live_block_counts());

        // The cleaner's walk names each block's object.
        let mut live = Vec::new();
        md.live_in_segment(0, &mut live);
        let names: Vec<&[u8]> = live.iter().map(|(oid, _, _)| &oid[..]).collect();
        assert_eq!(names, [&b"b"[..], b"b", b"b", b"c", b"c", b"c"]);
    }

    /// Encodes `md`'s checkpoint and applies it to fresh metadata, as replay does.
    fn rebuilt_from_checkpoint(md: &Metadata) -> Metadata {
        let mut chunks = Vec::new();
        md.checkpoint(256, &mut chunks);
        let mut rebuilt = Metadata::new(md.sb);
        for chunk in &chunks {
            for delta in DeltaReader::new(chunk) {
                rebuilt.apply(&delta.unwrap()).unwrap();
            }
        }
        rebuilt
    }

    #[test]
    fn a_checkpoint_carries_ids_so_replay_numbers_later_objects_alike() {
        let sb = sb();
        let mut md = Metadata::new(sb);
        for oid in [&b"z"[..], b"a", b"m", b"q"] {
            md.apply(&Delta::ObjectCreate { oid }).unwrap();
        }
        // The newest object goes: without the checkpoint's next id a replay would hand its
        // id (3) to the next object created, where the running store hands out 4.
        md.apply(&Delta::ObjectRemove { oid: b"q" }).unwrap();
        md.apply(&Delta::ObjectRemove { oid: b"a" }).unwrap();
        let mut rebuilt = rebuilt_from_checkpoint(&md);
        assert!(rebuilt.same_as(&md));
        assert_eq!(
            rebuilt.object(b"m").unwrap().id,
            2,
            "ids survive, gaps and all"
        );
        assert_eq!(rebuilt.next_object_id(), 4);
        for md in [&mut md, &mut rebuilt] {
            md.apply(&Delta::ObjectCreate { oid: b"new" }).unwrap();
            assert_eq!(md.object(b"new").unwrap().id, 4);
        }
        assert!(rebuilt.same_as(&md));

        // An empty store's checkpoint still carries the next id.
        let mut empty = Metadata::new(sb);
        for oid in [&b"x"[..], b"y"] {
            empty.apply(&Delta::ObjectCreate { oid }).unwrap();
            empty.apply(&Delta::ObjectRemove { oid }).unwrap();
        }
        assert_eq!(rebuilt_from_checkpoint(&empty).next_object_id(), 2);
    }

    #[test]
    fn checkpoint_ids_out_of_order_repeated_or_exhausted_are_errors() {
        let sb = sb();
        let mut md = Metadata::new(sb);
        let state = |oid, id| Delta::ObjectState {
            oid,
            id,
            size: 0,
            changes: 0,
        };
        md.apply(&state(b"a", 5)).unwrap();
        assert_eq!(md.next_object_id(), 6);
        for (oid, id) in [(&b"b"[..], 5), (b"c", 2), (b"d", OBJECT_ID_END)] {
            let error = md.apply(&state(oid, id)).unwrap_err();
            assert_eq!(
                error,
                ApplyError::ObjectIdTaken {
                    oid: oid.to_vec(),
                    id
                }
            );
            assert!(error.to_string().contains(&format!("id {id}")));
            assert!(md.object(oid).is_none(), "nothing applied");
        }
        assert_eq!(
            md.apply(&Delta::ObjectIdNext { next: 5 }),
            Err(ApplyError::ObjectIdNextTooLow {
                next: 5,
                used_below: 6
            })
        );
        assert_eq!(md.next_object_id(), 6, "nothing applied");
        md.apply(&Delta::ObjectIdNext { next: 9 }).unwrap();
        md.apply(&Delta::ObjectCreate { oid: b"e" }).unwrap();
        assert_eq!(md.object(b"e").unwrap().id, 9);
        md.apply(&Delta::ObjectIdNext {
            next: OBJECT_ID_END,
        })
        .unwrap();
        assert!(
            md.apply(&state(b"f", OBJECT_ID_END - 1)).is_err(),
            "at the next id's limit no id is left for a checkpoint to name"
        );
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
        assert!(md.object(b"x").unwrap().blocks.iter().next().is_none());
        assert_eq!(md.live_block_counts().iter().sum::<u32>(), 0);
    }

    proptest! {
        /// Replaying the encoded deltas into fresh metadata gives the same state: what a
        /// restart recovers is what the running store had.
        #[test]
        fn replay_of_encoded_deltas_reproduces_the_state(steps in proptest::collection::vec((0u8..8, 0u8..3, 0u64..16, 1u32..4, 0u32..6), 1..80), chunk_max in 64usize..400) {
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
                    5 => Delta::XattrSet { oid: &oid, name: b"n", value: &crc_bytes },
                    6 => Delta::ExtentMove {
                        oid: &oid,
                        offset: block * 4096,
                        from: physical,
                        physical: sb.segment_offset(segment + 1) + 4096 * (1 + block),
                        blocks,
                    },
                    _ => Delta::OmapSet { oid: &oid, key: &crc_bytes[..4], value: b"v" },
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

            // A checkpoint rebuilds the same state from nothing, whatever its chunking.
            let mut chunks = Vec::new();
            live.checkpoint(chunk_max, &mut chunks);
            let mut rebuilt = Metadata::new(sb);
            let mut total = 0;
            for chunk in &chunks {
                prop_assert!(chunk.len() <= chunk_max);
                total += chunk.len() as u64;
                for delta in DeltaReader::new(chunk) {
                    rebuilt.apply(&delta.unwrap()).unwrap();
                }
            }
            prop_assert!(rebuilt.same_as(&live));
            prop_assert!(total <= live.checkpoint_bytes_estimate(), "{} > estimate", total);
        }
    }
}
