//! The extent tree's nodes on the device (format 6): checkpoints that write them, the
//! inventory that keeps their blocks live, and replay that loads the tree from them.
//!
//! A node block is live from the checkpoint that writes it until a later checkpoint that no
//! longer points at it (it was rewritten elsewhere, freed by a merge, or the later checkpoint
//! was a dump) is named by a durable segment header. Before that, a power cut replays from a
//! checkpoint that may still need the block. So a node counts live in its segment as soon as
//! it is written (`write_next_node`; its segment is a journal segment then, which nothing
//! frees anyway), and the addresses a checkpoint obsoletes wait in `unreleased_nodes` with the
//! checkpoint's generation (its first record's number) until the store sees a durable header
//! name that checkpoint or a later one (`release_nodes_named`).
//!
//! Replay of a checkpoint with a `TreeRoot` loads the tree (every node crc-checked) and counts
//! each node live, as the running store counts the nodes of the tree it wrote: so replay and
//! the running store agree on the inventory once the checkpoint is named (`same_as`).

use super::*;
use crate::segment::btree::WriteOut;
use crate::segment::checkpoint_nodes::CheckpointNodes;
use crate::segment::format::Delta;

impl Metadata {
    /// Node blocks of the tree in `segment` that the inventory counts (also in `live_blocks`):
    /// the cleaner cannot copy them, it asks for a checkpoint that rewrites them elsewhere.
    pub fn node_blocks(&self, segment: u32) -> u32 {
        self.node_blocks[segment as usize]
    }

    /// Encodes the next node of `write_out` at `address` (`ExtentTree::write_next_node`) and
    /// counts its block live.
    pub fn write_next_node(
        &mut self,
        write_out: &mut WriteOut,
        generation: u64,
        address: u64,
        block: &mut [u8],
    ) {
        let nonce = self.sb.nonce();
        let written = self
            .extents
            .write_next_node(write_out, nonce, generation, address, block);
        assert!(written, "write_next_node called with no node left");
        self.count_node(address);
    }

    fn count_node(&mut self, address: u64) {
        let segment = self
            .segment_of(address)
            .expect("the journal writes nodes inside the shard's segments");
        self.live_blocks[segment] += 1;
        self.node_blocks[segment] += 1;
    }

    /// After a checkpoint with this `generation` is written (tree or dump): the node addresses
    /// it no longer needs (`ExtentTree::take_obsolete`; after a dump, every address the tree
    /// had, `forget_addresses`) are released once a durable header names it.
    pub fn checkpoint_written(&mut self, generation: u64, dump: bool) {
        if dump {
            self.extents.forget_addresses();
        }
        let obsolete = self.extents.take_obsolete();
        if !obsolete.is_empty() {
            debug_assert!(self
                .unreleased_nodes
                .last()
                .is_none_or(|&(g, _)| g < generation));
            self.unreleased_nodes.push((generation, obsolete));
        }
    }

    /// A durable segment header names the checkpoint that starts at record `start_seq`: the
    /// node blocks obsoleted by it and by earlier checkpoints are dead. Returns whether any
    /// block was released (a segment may now be empty).
    pub fn release_nodes_named(&mut self, start_seq: u64) -> bool {
        let named = self
            .unreleased_nodes
            .iter()
            .take_while(|&&(generation, _)| generation <= start_seq)
            .count();
        let mut released = false;
        for (_, addresses) in self.unreleased_nodes.drain(..named).collect::<Vec<_>>() {
            for address in addresses {
                let segment = segment_of(&self.sb, address).expect("counted when written");
                self.node_blocks[segment] = self.node_blocks[segment]
                    .checked_sub(1)
                    .expect("node inventory underflow");
                release(&self.sb, &mut self.live_blocks, address);
                released = true;
            }
        }
        released
    }

    /// Marks dirty every node of the tree written in `segment` (and their paths to the root),
    /// so the next checkpoint that writes the tree rewrites them elsewhere: how the cleaner
    /// empties a segment of nodes. Returns how many were there.
    pub fn move_nodes_out_of(&mut self, segment: u32) -> usize {
        let start = self.sb.segment_offset(segment);
        self.extents
            .mark_dirty_in(start..start + self.sb.segment_size)
    }

    /// Replays a checkpoint's `TreeRoot`: loads the tree from `root` through `read` (every
    /// node checked: crc, nonce, place, level, key bounds), checks it against the delta and the
    /// onodes the checkpoint restored (every entry's object exists, every block and node lies
    /// inside the shard's segments), then counts its blocks and nodes live and each object's
    /// mapped blocks. On error nothing changed.
    pub fn load_tree(
        &mut self,
        root: &Delta<'_>,
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<(), String> {
        let Delta::TreeRoot {
            root,
            height,
            entries,
            generation,
        } = *root
        else {
            unreachable!("load_tree takes a TreeRoot");
        };
        if !self.extents.is_empty() || self.node_blocks.iter().any(|&n| n > 0) {
            return Err("a checkpoint names a tree root after extents were restored".into());
        }
        let tree = ExtentTree::load_written_by(root, self.sb.nonce(), generation, read)
            .map_err(|e| e.to_string())?;
        if tree.len() as u64 != entries || (entries > 0 && tree.height() != height) {
            return Err(format!(
                "tree at {root} holds {} entries at height {}, its checkpoint says {entries} at height {height}",
                tree.len(),
                tree.height()
            ));
        }
        let mut problem = None;
        let mut mapped: HashMap<u64, u64> = HashMap::new();
        let mut live = vec![0u32; self.live_blocks.len()];
        let all = (
            Key::default(),
            Key {
                object: OBJECT_ID_END,
                block: 0,
            },
        );
        tree.for_each_in(all.0, all.1, &mut |key, block| {
            if problem.is_some() {
                return;
            }
            if !self.names.contains_key(&key.object) {
                problem = Some(format!("tree entry {key:?} names no object"));
                return;
            }
            match segment_of(&self.sb, block.physical) {
                Ok(segment) => live[segment] += 1,
                Err(error) => problem = Some(format!("tree entry {key:?}: {error}")),
            }
            *mapped.entry(key.object).or_default() += 1;
        });
        let mut nodes = Vec::new();
        tree.for_each_node_address(&mut |address| nodes.push(address));
        for &address in &nodes {
            if let Err(error) = segment_of(&self.sb, address) {
                problem.get_or_insert(format!("tree node: {error}"));
            }
        }
        if let Some(problem) = problem {
            return Err(problem);
        }
        for (id, count) in mapped {
            let oid = self.names.get(&id).expect("checked above").clone();
            self.get_mut(&oid)
                .expect("named objects exist")
                .mapped_blocks = count;
        }
        for (segment, count) in live.into_iter().enumerate() {
            self.live_blocks[segment] += count;
        }
        self.extents = tree;
        for address in nodes {
            self.count_node(address);
        }
        Ok(())
    }

    /// Node blocks per segment recounted from the tree and the addresses waiting for release
    /// (fsck and tests compare it with the running count; part of `recount_live_blocks`).
    pub fn recount_node_blocks(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.node_blocks.len()];
        let mut count = |address: u64| {
            counts[segment_of(&self.sb, address).expect("counted when written")] += 1;
        };
        self.extents.for_each_node_address(&mut count);
        for (_, addresses) in &self.unreleased_nodes {
            addresses.iter().for_each(|&a| count(a));
        }
        counts
    }
}

/// The store's `CheckpointNodes`: the shard's tree, written out through `Metadata` so that
/// every node block written counts live.
pub struct MetadataNodes<'a> {
    pub metadata: &'a mut Metadata,
    pub write_out: &'a mut WriteOut,
}

impl CheckpointNodes for MetadataNodes<'_> {
    fn remaining(&self) -> usize {
        self.write_out.remaining()
    }

    fn write_next(&mut self, address: u64, generation: u64, block: &mut [u8]) {
        self.metadata
            .write_next_node(self.write_out, generation, address, block);
    }

    fn root(&self, generation: u64) -> Delta<'static> {
        assert_eq!(self.write_out.remaining(), 0, "every node is written first");
        let tree = &self.metadata.extents;
        Delta::TreeRoot {
            root: tree.root_address(),
            height: tree.height(),
            entries: tree.len() as u64,
            generation,
        }
    }
}
