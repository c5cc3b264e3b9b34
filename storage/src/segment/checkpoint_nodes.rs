//! Where a checkpoint's extent-tree nodes come from when the journal places them (format 6).
//!
//! A checkpoint that writes the tree (rather than dumping its extents) puts the nodes changed
//! since the last write-out into its records as data blocks. A node's encoding holds its own
//! device address and its children's, so it can only be encoded once the journal knows where
//! the record goes: the journal asks for one node at a time when it seals a record
//! (`Journal::advance_with`), and the store answers from its tree (`TreeNodes`). The tree does
//! not change meanwhile: no client record is sealed while a checkpoint is written, and none
//! was in flight when it started (`ExtentTree::write_next_node` asserts it).

use crate::segment::btree::{ExtentTree, WriteOut};
use crate::segment::format::Delta;

/// The nodes of a checkpoint in progress, children before parents.
pub trait CheckpointNodes {
    /// Nodes left to write.
    fn remaining(&self) -> usize;
    /// Encodes the next node into `block` (one 4 KiB block) as written at `address`, with the
    /// checkpoint's `generation`. Called only while `remaining() > 0`.
    fn write_next(&mut self, address: u64, generation: u64, block: &mut [u8]);
    /// The tree as written, once `remaining() == 0`: the `TreeRoot` delta of the
    /// checkpoint's last record.
    fn root(&self, generation: u64) -> Delta<'static>;
}

/// No nodes: a checkpoint that dumps the extents as deltas, or none in progress.
pub struct NoNodes;

impl CheckpointNodes for NoNodes {
    fn remaining(&self) -> usize {
        0
    }

    fn write_next(&mut self, _: u64, _: u64, _: &mut [u8]) {
        unreachable!("NoNodes has no node to write")
    }

    fn root(&self, _: u64) -> Delta<'static> {
        unreachable!("a dump names no tree root")
    }
}

/// The nodes of `tree` that `write_out` lists (`ExtentTree::begin_write_out`).
pub struct TreeNodes<'a> {
    pub tree: &'a mut ExtentTree,
    pub write_out: &'a mut WriteOut,
    /// The filesystem's nonce (`Superblock::nonce`): a node of another filesystem is refused.
    pub nonce: u64,
}

impl CheckpointNodes for TreeNodes<'_> {
    fn remaining(&self) -> usize {
        self.write_out.remaining()
    }

    fn write_next(&mut self, address: u64, generation: u64, block: &mut [u8]) {
        let written =
            self.tree
                .write_next_node(self.write_out, self.nonce, generation, address, block);
        assert!(written, "write_next called with no node left");
    }

    fn root(&self, generation: u64) -> Delta<'static> {
        assert_eq!(self.write_out.remaining(), 0, "every node is written first");
        Delta::TreeRoot {
            root: self.tree.root_address(),
            height: self.tree.height(),
            entries: self.tree.len() as u64,
            generation,
        }
    }
}

#[cfg(test)]
mod tests;
