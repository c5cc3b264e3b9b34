//! A shard's checkpoints: the snapshot the journal asks for, and the choice between a dump of
//! every extent and a write of the extent tree's changed nodes (format 6).
//!
//! The choice (ARCHITECTURE.md, "Step 3", item 5): the nodes changed in the last interval
//! (`take_changed_tree_nodes`) predict what the tree write costs in the next, so the tree is
//! written when those nodes plus the onode table are fewer bytes than the dump. Under uniform
//! overwrites nearly every leaf changes and the dump wins (never worse than before); for a hot
//! set over cold data the tree write is a fraction of it. A tree write must also fit the room
//! the reserve keeps for a checkpoint (`checkpoint_bytes`, sized from the dump's upper bound):
//! after a dump no node has an address, so the first tree write writes every node (~1.8x a
//! dump) and waits until that fits.

use super::*;
use crate::segment::btree::NODE_BYTES;
use crate::segment::checkpoint_nodes::{CheckpointNodes, NoNodes};
use crate::segment::journal::CHECKPOINT_NODE_BLOCKS_MAX;
use crate::segment::metadata::MetadataNodes;

impl<Q: QueuePair> SegmentStore<Q> {
    /// Nothing is in flight: the metadata is the state after every record written. Hands the
    /// journal a dump, or the onode table and the tree's nodes.
    pub(super) fn take_snapshot(&mut self) {
        debug_assert!(self.write_out.is_none(), "one checkpoint at a time");
        let mut chunks = Vec::new();
        let extent_bytes = self
            .metadata
            .checkpoint(CHECKPOINT_CHUNK_MAX_BYTES, &mut chunks);
        let dump_bytes: u64 = chunks.iter().map(|chunk| chunk.len() as u64).sum();
        let onode_bytes = dump_bytes - extent_bytes;
        let changed_nodes = self.metadata.take_changed_tree_nodes();
        let incremental_bytes = changed_nodes as u64 * NODE_BYTES as u64 + onode_bytes;
        self.extra.checkpoint_incremental_estimate_bytes += incremental_bytes;
        // The cleaner's victims whose data is gone but whose nodes are not: those nodes move
        // with this write (copy-on-write), or die with a dump.
        let waiting = self.cleaner.nodes_waiting.len();
        let mut relocated = 0;
        let wanted = match self.checkpoint_writes {
            CheckpointWrites::Dump => false,
            CheckpointWrites::Cheaper => incremental_bytes < dump_bytes,
            CheckpointWrites::Tree => true,
        };
        let tree_write = if wanted {
            for &segment in &self.cleaner.nodes_waiting {
                relocated += self.metadata.move_nodes_out_of(segment);
            }
            let dirty = self.metadata.extent_tree().dirty_count() as u64;
            self.tree_write_fits(dirty, onode_bytes, dump_bytes)
        } else {
            false
        };
        let tree = self.metadata.extent_tree();
        log::debug!(
            "shard {}: checkpoint of {} objects ({dump_bytes} bytes as a dump, {incremental_bytes} predicted for the {changed_nodes} tree nodes changed since the last); writes the {}; extent tree: {} blocks in {} nodes, height {}; {relocated} nodes moved out of {waiting} cleaned segments",
            self.shard,
            self.metadata.object_count(),
            if tree_write { "tree's dirty nodes" } else { "dump" },
            tree.len(),
            tree.node_count(),
            tree.height()
        );
        if tree_write {
            chunks.clear();
            self.metadata
                .checkpoint_onodes(CHECKPOINT_CHUNK_MAX_BYTES, &mut chunks);
            self.write_out = Some(self.metadata.extent_tree_for_write_out().begin_write_out());
            self.extra.checkpoints_incremental += 1;
        }
        self.checkpoint_generation = self.journal.begin_checkpoint(chunks, tree_write);
        if !tree_write {
            // A dump: replay from it reads no node, so every node address dies once a header
            // names it (and the next tree write writes the whole tree).
            self.metadata
                .checkpoint_written(self.checkpoint_generation, true);
        }
    }

    /// Whether a tree write of `dirty` nodes and the onode table has room: within half the
    /// bytes of the segments the reserve keeps for a checkpoint (sized from the dump's upper
    /// bound, `size_reserve`; half leaves room for record heads and tails records do not
    /// fill), or within the free segments, leaving the one that publishes it and one more
    /// (no client record goes while a checkpoint is written, so nothing else takes them;
    /// the first tree write after a dump writes every node, ~1.8x the dump, and needs this).
    fn tree_write_fits(&self, dirty: u64, onode_bytes: u64, dump_bytes: u64) -> bool {
        let node_bytes = dirty * NODE_BYTES as u64;
        // A head per record of nodes, and per chunk of the onode table.
        let heads = (dirty.div_ceil(CHECKPOINT_NODE_BLOCKS_MAX as u64)
            + onode_bytes.div_ceil(CHECKPOINT_CHUNK_MAX_BYTES as u64))
            * BLOCK_SIZE_BYTES;
        let bytes = node_bytes + heads + onode_bytes;
        let segment_bytes = self.sb.segment_size - BLOCK_SIZE_BYTES;
        let reserved = self.checkpoint_segments as u64 * segment_bytes / 2;
        if bytes <= reserved.max(self.checkpoint_bytes).max(dump_bytes) {
            return true;
        }
        let tail = self.journal.open_tail_blocks() * BLOCK_SIZE_BYTES;
        let fresh = bytes.saturating_sub(tail).div_ceil(segment_bytes) as usize + 1;
        self.journal.free_segment_count() > fresh + 1
    }

    /// `Journal::advance`, giving it the tree's nodes while a checkpoint writes them; then
    /// the bookkeeping of node blocks: those a finished tree write obsoleted wait for a
    /// header to name it, those a durable header's checkpoint obsoleted are released.
    pub(super) fn advance_journal(&mut self, done: &mut Vec<(u64, Result<(), JournalError>)>) {
        let mut no_nodes = NoNodes;
        let mut tree_nodes;
        let nodes: &mut dyn CheckpointNodes = match &mut self.write_out {
            Some(write_out) if self.journal.writing_tree() => {
                tree_nodes = MetadataNodes {
                    metadata: &mut self.metadata,
                    write_out,
                };
                &mut tree_nodes
            }
            _ => &mut no_nodes,
        };
        self.journal
            .advance_with(&mut self.qp, nodes, &mut |tag, result| {
                done.push((tag, result))
            });
        if self.write_out.is_some() && !self.journal.writing_tree() {
            // Written (or abandoned on a failed journal, which writes nothing more).
            self.write_out = None;
            self.metadata
                .checkpoint_written(self.checkpoint_generation, false);
        }
        let named = self.journal.replay_start_durable().0;
        if self.metadata.release_nodes_named(named) {
            self.sweep_needed = true;
        }
    }
}
