//! The extent tree: a B+tree from (object, logical block) to (physical address, crc32c) whose
//! nodes are 4 KiB blocks (`node.rs`), SeaStore's LBA tree role.
//!
//! Step 1 of the plan in ARCHITECTURE.md ("Where the metadata departs from SeaStore"): the tree
//! and its node format, with dirty tracking and copy-on-write write-out (`write_out`, or one
//! node at a time at caller-chosen addresses with `begin_write_out` / `write_next_node`: every
//! node changed since the last write-out goes to a fresh address, parents after children, and
//! the old addresses are reported obsolete), and loading from a root address with every node
//! checked (`load`). Since step 2 it holds every object's blocks in `metadata.rs`; since step 3
//! a checkpoint may write its dirty nodes through the journal (`checkpoint_nodes.rs`) and
//! replay `load`s it from the root the checkpoint names, or dump its entries as deltas when
//! that is cheaper (`changed_count` predicts the tree write's cost). `for_each_node_address`,
//! `mark_dirty_in` and `forget_addresses` serve the inventory, the cleaner and the dump.
//!
//! Invariants (`check` verifies them all; tests run it after every operation):
//! - every leaf is at level 0 and every path from the root has the same length;
//! - keys in a node increase strictly; an internal entry's key is a lower bound of every key in
//!   its child's subtree, and the next entry's key an upper bound (exclusive);
//! - every node but the root holds at least a quarter of its capacity; an internal root has
//!   at least two children.

pub mod node;

pub use node::{Entries, Key, NodeError, Value, INTERNAL_CAPACITY, LEAF_CAPACITY, NODE_BYTES};
use std::ops::ControlFlow;

/// Index of a node in the tree's arena.
type NodeId = u32;

#[derive(Clone, Debug)]
enum Body {
    Leaf(Vec<(Key, Value)>),
    Internal(Vec<(Key, NodeId)>),
}

#[derive(Clone, Debug)]
struct Node {
    level: u8,
    body: Body,
    /// Device address of the node's last write-out; 0 if never written.
    address: u64,
    /// Changed since its last write-out (or never written).
    dirty: bool,
    /// Changed since the last `clear_changed` (the store calls it at each checkpoint): what a
    /// checkpoint writing only changed nodes would write, once every node has an address.
    /// Unlike `dirty`, a checkpoint that does not write the tree out (the full dump) clears it.
    changed: bool,
}

impl Node {
    fn len(&self) -> usize {
        match &self.body {
            Body::Leaf(entries) => entries.len(),
            Body::Internal(entries) => entries.len(),
        }
    }

    fn capacity(&self) -> usize {
        match self.body {
            Body::Leaf(_) => LEAF_CAPACITY,
            Body::Internal(_) => INTERNAL_CAPACITY,
        }
    }

    /// The node changed: it must be written out, and counts as changed in this interval.
    fn touch(&mut self) {
        self.dirty = true;
        self.changed = true;
    }

    fn first_key(&self) -> Key {
        match &self.body {
            Body::Leaf(entries) => entries[0].0,
            Body::Internal(entries) => entries[0].0,
        }
    }
}

/// The child of an internal node whose subtree holds `key`.
fn child_index(entries: &[(Key, NodeId)], key: Key) -> usize {
    entries.partition_point(|&(k, _)| k <= key).max(1) - 1
}

/// Why a tree could not be loaded from the device.
#[derive(Debug)]
pub enum LoadError {
    Read {
        address: u64,
        error: std::io::Error,
    },
    Node {
        address: u64,
        error: NodeError,
    },
    /// The node decoded, but does not fit where its parent points it.
    Shape {
        address: u64,
        reason: String,
    },
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Read { address, error } => {
                write!(f, "reading tree node at {address}: {error}")
            }
            LoadError::Node { address, error } => write!(f, "tree node at {address}: {error}"),
            LoadError::Shape { address, reason } => write!(f, "tree node at {address}: {reason}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// Where a node being loaded must fit: the level and key range its parent gives it, and the
/// newest generation it may have.
#[derive(Clone, Copy)]
struct Place {
    level: Option<u8>,
    lower: Option<Key>,
    upper: Option<Key>,
    generation_max: u64,
}

/// A write-out in progress (`ExtentTree::begin_write_out`): the dirty nodes left to write.
pub struct WriteOut {
    /// Children before parents; the root, if dirty, last.
    order: Vec<NodeId>,
    next: usize,
    last_address: u64,
    /// A node's entries as encoded, reused from node to node (one allocation per write-out,
    /// not one per node).
    leaf: Vec<(Key, Value)>,
    internal: Vec<(Key, u64)>,
}

impl WriteOut {
    /// Nodes the write-out writes in all.
    pub fn nodes(&self) -> usize {
        self.order.len()
    }

    /// Nodes not written yet.
    pub fn remaining(&self) -> usize {
        self.order.len() - self.next
    }

    /// The address the last `write_next_node` wrote at.
    pub fn written_at(&self) -> u64 {
        self.last_address
    }
}

pub struct ExtentTree {
    nodes: Vec<Node>,
    /// Arena slots of freed nodes.
    free: Vec<NodeId>,
    root: NodeId,
    len: usize,
    /// Addresses of written nodes that a later write-out replaced or that were freed: space
    /// that is dead once the write-out that replaced them is durable.
    obsolete: Vec<u64>,
    /// Emptied bodies of released nodes, kept with their capacity for the next split.
    spare_leaves: Vec<Vec<(Key, Value)>>,
    spare_internals: Vec<Vec<(Key, NodeId)>>,
}

impl Default for ExtentTree {
    fn default() -> ExtentTree {
        ExtentTree::new()
    }
}

impl ExtentTree {
    pub fn new() -> ExtentTree {
        ExtentTree {
            nodes: vec![Node {
                level: 0,
                body: Body::Leaf(Vec::with_capacity(LEAF_CAPACITY + 1)),
                address: 0,
                dirty: true,
                changed: true,
            }],
            free: Vec::new(),
            root: 0,
            len: 0,
            obsolete: Vec::new(),
            spare_leaves: Vec::new(),
            spare_internals: Vec::new(),
        }
    }

    /// An empty leaf body with room for `LEAF_CAPACITY + 1` entries (reused when possible).
    fn leaf_body(&mut self) -> Vec<(Key, Value)> {
        self.spare_leaves
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(LEAF_CAPACITY + 1))
    }

    fn internal_body(&mut self) -> Vec<(Key, NodeId)> {
        self.spare_internals
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(INTERNAL_CAPACITY + 1))
    }

    /// The entries with `from <= key < to`, in key order. Allocates nothing: the path from the
    /// root is a fixed array (the height is bounded by `node::LEVEL_MAX`).
    pub fn range(&self, from: Key, to: Key) -> Range<'_> {
        let mut range = Range {
            tree: self,
            path: [(0, 0); node::LEVEL_MAX as usize + 1],
            depth: 0,
            to,
        };
        let mut id = self.root;
        loop {
            match &self.nodes[id as usize].body {
                Body::Internal(entries) => {
                    let i = child_index(entries, from);
                    range.push(id, i);
                    id = entries[i].1;
                }
                Body::Leaf(entries) => {
                    range.push(id, entries.partition_point(|&(k, _)| k < from));
                    return range;
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Levels above the leaves (0: the root is a leaf).
    pub fn height(&self) -> u8 {
        self.nodes[self.root as usize].level
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    pub fn dirty_count(&self) -> usize {
        self.live_ids()
            .filter(|&id| self.nodes[id as usize].dirty)
            .count()
    }

    /// Nodes changed since the last `clear_changed`.
    pub fn changed_count(&self) -> usize {
        self.live_ids()
            .filter(|&id| self.nodes[id as usize].changed)
            .count()
    }

    /// Starts a new interval for `changed_count` (a checkpoint was taken).
    pub fn clear_changed(&mut self) {
        for node in &mut self.nodes {
            node.changed = false;
        }
    }

    fn live_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        let mut stack = vec![self.root];
        std::iter::from_fn(move || {
            let id = stack.pop()?;
            if let Body::Internal(entries) = &self.nodes[id as usize].body {
                stack.extend(entries.iter().map(|&(_, child)| child));
            }
            Some(id)
        })
    }

    pub fn get(&self, key: Key) -> Option<Value> {
        let mut id = self.root;
        loop {
            match &self.nodes[id as usize].body {
                Body::Internal(entries) => id = entries[child_index(entries, key)].1,
                Body::Leaf(entries) => {
                    return entries
                        .binary_search_by_key(&key, |&(k, _)| k)
                        .ok()
                        .map(|i| entries[i].1)
                }
            }
        }
    }

    /// Calls `visit` for every entry with `from <= key < to`, in key order.
    pub fn for_each_in(&self, from: Key, to: Key, visit: &mut dyn FnMut(Key, Value)) {
        self.visit_range(self.root, from, to, visit);
    }

    /// Calls `visit` with runs of entries (pieces of leaves) with `key >= from`, in key order,
    /// at most `budget` entries in all. Returns the first key not visited (where a later call
    /// resumes), or None when the walk reached the last entry. Resuming from a key, not a
    /// node, stays right when the tree changes between calls: entries inserted behind the key
    /// are not seen, removed ones are not visited. Runs, not single entries: the caller's
    /// loop over a run is inlined, where a call per entry cost most of a full walk.
    pub fn for_each_from(
        &self,
        from: Key,
        budget: usize,
        visit: &mut dyn FnMut(&[(Key, Value)]),
    ) -> Option<Key> {
        let mut left = budget;
        match self.visit_from(self.root, from, &mut left, visit) {
            ControlFlow::Break(next) => Some(next),
            ControlFlow::Continue(()) => None,
        }
    }

    fn visit_from(
        &self,
        id: NodeId,
        from: Key,
        left: &mut usize,
        visit: &mut dyn FnMut(&[(Key, Value)]),
    ) -> ControlFlow<Key> {
        match &self.nodes[id as usize].body {
            Body::Leaf(entries) => {
                let start = entries.partition_point(|&(k, _)| k < from);
                let run = &entries[start..];
                if run.len() > *left {
                    if *left > 0 {
                        visit(&run[..*left]);
                    }
                    let next = run[*left].0;
                    *left = 0;
                    return ControlFlow::Break(next);
                }
                *left -= run.len();
                if !run.is_empty() {
                    visit(run);
                }
            }
            Body::Internal(entries) => {
                let start = child_index(entries, from);
                for &(_, child) in &entries[start..] {
                    self.visit_from(child, from, left, visit)?;
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn visit_range(&self, id: NodeId, from: Key, to: Key, visit: &mut dyn FnMut(Key, Value)) {
        match &self.nodes[id as usize].body {
            Body::Leaf(entries) => {
                let start = entries.partition_point(|&(k, _)| k < from);
                for &(key, value) in entries[start..].iter().take_while(|&&(k, _)| k < to) {
                    visit(key, value);
                }
            }
            Body::Internal(entries) => {
                let start = child_index(entries, from);
                for &(key, child) in &entries[start..] {
                    if key >= to {
                        break;
                    }
                    self.visit_range(child, from, to, visit);
                }
            }
        }
    }

    fn alloc(&mut self, node: Node) -> NodeId {
        match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                NodeId::try_from(self.nodes.len() - 1).expect("node arena fits u32 ids")
            }
        }
    }

    fn release(&mut self, id: NodeId) {
        let node = &mut self.nodes[id as usize];
        if node.address != 0 {
            self.obsolete.push(node.address);
        }
        let body = std::mem::replace(&mut node.body, Body::Leaf(Vec::new()));
        node.address = 0;
        node.dirty = false;
        node.changed = false;
        self.free.push(id);
        self.keep_spare(body);
    }

    /// Keeps an unused body's allocation for the next node (a placeholder with none is dropped).
    fn keep_spare(&mut self, body: Body) {
        match body {
            Body::Leaf(mut entries) if entries.capacity() > LEAF_CAPACITY => {
                entries.clear();
                self.spare_leaves.push(entries);
            }
            Body::Internal(mut entries) if entries.capacity() > INTERNAL_CAPACITY => {
                entries.clear();
                self.spare_internals.push(entries);
            }
            _ => {}
        }
    }

    /// Maps `key` to `value`; returns the value it replaced.
    pub fn insert(&mut self, key: Key, value: Value) -> Option<Value> {
        let (old, split) = self.insert_into(self.root, key, value);
        if let Some((split_key, right)) = split {
            let left = self.root;
            let level = self.nodes[left as usize].level + 1;
            assert!(level <= node::LEVEL_MAX, "tree height limit");
            let first = self.nodes[left as usize].first_key().min(key);
            let mut entries = self.internal_body();
            entries.extend([(first, left), (split_key, right)]);
            self.root = self.alloc(Node {
                level,
                body: Body::Internal(entries),
                address: 0,
                dirty: true,
                changed: true,
            });
        }
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Returns the replaced value and, when the node split, the new right node and its key.
    fn insert_into(
        &mut self,
        id: NodeId,
        key: Key,
        value: Value,
    ) -> (Option<Value>, Option<(Key, NodeId)>) {
        let node = &mut self.nodes[id as usize];
        node.touch();
        // The new entry went to the node's end: keys are arriving in order (a replay from a
        // checkpoint, a sequential fill), and an even split would leave every node half full.
        let mut at_end = false;
        let old = match &mut node.body {
            Body::Leaf(entries) => match entries.binary_search_by_key(&key, |&(k, _)| k) {
                Ok(i) => Some(std::mem::replace(&mut entries[i].1, value)),
                Err(i) => {
                    at_end = i == entries.len();
                    entries.insert(i, (key, value));
                    None
                }
            },
            Body::Internal(entries) => {
                let i = child_index(entries, key);
                // Keep the first key a lower bound of its subtree.
                if key < entries[i].0 {
                    entries[i].0 = key;
                }
                let child = entries[i].1;
                let (old, split) = self.insert_into(child, key, value);
                if let Some((split_key, right)) = split {
                    let Body::Internal(entries) = &mut self.nodes[id as usize].body else {
                        unreachable!("an internal node stays internal")
                    };
                    at_end = i + 1 == entries.len();
                    entries.insert(i + 1, (split_key, right));
                }
                old
            }
        };
        let node = &self.nodes[id as usize];
        if node.len() <= node.capacity() {
            return (old, None);
        }
        (old, Some(self.split(id, at_end)))
    }

    /// Moves the upper part of an overfull node into a new right sibling: half of it, or
    /// when the last insert went to the end (`at_end`), only the minimum a node must hold
    /// (a quarter of capacity, plus one), so in-order inserts leave nodes three quarters
    /// full instead of half.
    fn split(&mut self, id: NodeId, at_end: bool) -> (Key, NodeId) {
        let (mut leaf, mut internal) = match self.nodes[id as usize].body {
            Body::Leaf(_) => (self.leaf_body(), Vec::new()),
            Body::Internal(_) => (Vec::new(), self.internal_body()),
        };
        let node = &mut self.nodes[id as usize];
        let level = node.level;
        let (len, capacity) = (node.len(), node.capacity());
        assert_eq!(len, capacity + 1, "a node splits on its first overflow");
        let at = if at_end {
            len - (capacity / 4 + 1)
        } else {
            len / 2
        };
        let body = match &mut node.body {
            Body::Leaf(entries) => {
                leaf.extend(entries.drain(at..));
                Body::Leaf(leaf)
            }
            Body::Internal(entries) => {
                internal.extend(entries.drain(at..));
                Body::Internal(internal)
            }
        };
        let right = Node {
            level,
            body,
            address: 0,
            dirty: true,
            changed: true,
        };
        let key = right.first_key();
        (key, self.alloc(right))
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: Key) -> Option<Value> {
        let old = self.remove_from(self.root, key)?;
        self.len -= 1;
        // An internal root left with one child hands the root to it.
        while let Body::Internal(entries) = &self.nodes[self.root as usize].body {
            if entries.len() > 1 {
                break;
            }
            let child = entries[0].1;
            self.release(self.root);
            self.root = child;
        }
        Some(old)
    }

    fn remove_from(&mut self, id: NodeId, key: Key) -> Option<Value> {
        match &mut self.nodes[id as usize].body {
            Body::Leaf(entries) => {
                let i = entries.binary_search_by_key(&key, |&(k, _)| k).ok()?;
                let (_, old) = entries.remove(i);
                self.nodes[id as usize].touch();
                Some(old)
            }
            Body::Internal(entries) => {
                let i = child_index(entries, key);
                let child = entries[i].1;
                let old = self.remove_from(child, key)?;
                self.nodes[id as usize].touch();
                let child_node = &self.nodes[child as usize];
                if child_node.len() < child_node.capacity() / 4 {
                    self.rebalance(id, i);
                }
                Some(old)
            }
        }
    }

    /// Child `i` of `parent` is underfull: merges it with a sibling, or evens the two out.
    fn rebalance(&mut self, parent: NodeId, i: usize) {
        let Body::Internal(entries) = &self.nodes[parent as usize].body else {
            unreachable!("rebalance is asked of internal nodes")
        };
        if entries.len() < 2 {
            return; // A root with one child; `remove` collapses it.
        }
        let (l, r) = if i + 1 < entries.len() {
            (i, i + 1)
        } else {
            (i - 1, i)
        };
        let (left, right) = (entries[l].1, entries[r].1);
        let mut right_body =
            std::mem::replace(&mut self.nodes[right as usize].body, Body::Leaf(Vec::new()));
        let left_node = &mut self.nodes[left as usize];
        left_node.touch();
        let capacity = left_node.capacity();
        let merged = match (&mut left_node.body, &mut right_body) {
            (Body::Leaf(a), Body::Leaf(b)) => rebalance_pair(a, b, capacity),
            (Body::Internal(a), Body::Internal(b)) => rebalance_pair(a, b, capacity),
            _ => unreachable!("siblings are at one level"),
        };
        let Body::Internal(entries) = &mut self.nodes[parent as usize].body else {
            unreachable!()
        };
        if merged {
            entries.remove(r);
            self.release(right);
            self.keep_spare(right_body);
        } else {
            let right_node = &mut self.nodes[right as usize];
            right_node.body = right_body;
            right_node.touch();
            let first = right_node.first_key();
            let Body::Internal(entries) = &mut self.nodes[parent as usize].body else {
                unreachable!()
            };
            entries[r].0 = first;
        }
    }

    /// Addresses of written nodes no longer part of the tree (since the last call).
    pub fn take_obsolete(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.obsolete)
    }

    /// Writes every dirty node to a fresh address (`alloc`), children before parents, through
    /// `write(address, block)`; returns the root's address (0 for an empty tree, which writes
    /// nothing). Replaced addresses go to `take_obsolete`. `begin_write_out` and
    /// `write_next_node` in one go.
    pub fn write_out(
        &mut self,
        nonce: u64,
        generation: u64,
        alloc: &mut dyn FnMut() -> u64,
        write: &mut dyn FnMut(u64, &[u8]),
    ) -> u64 {
        let mut write_out = self.begin_write_out();
        let mut block = vec![0u8; NODE_BYTES];
        while self.write_next_node(&mut write_out, nonce, generation, alloc(), &mut block) {
            write(write_out.written_at(), &block);
        }
        self.root_address()
    }

    /// Starts a write-out done one node at a time at addresses the caller picks (a
    /// checkpoint's node blocks go to the device record by record, where the journal places
    /// each record): lists the dirty nodes, children before parents. The tree must not change
    /// until `write_next_node` has written them all (`write_next_node` asserts it).
    pub fn begin_write_out(&mut self) -> WriteOut {
        let mut order = Vec::new();
        if self.len == 0 {
            // An empty tree is root address 0, not an empty node on disk.
            let root = &mut self.nodes[self.root as usize];
            if root.address != 0 {
                self.obsolete.push(root.address);
                root.address = 0;
            }
            root.dirty = false;
        } else {
            self.dirty_post_order(self.root, &mut order);
        }
        WriteOut {
            order,
            next: 0,
            last_address: 0,
            leaf: Vec::with_capacity(LEAF_CAPACITY),
            internal: Vec::with_capacity(INTERNAL_CAPACITY),
        }
    }

    fn dirty_post_order(&self, id: NodeId, order: &mut Vec<NodeId>) {
        let node = &self.nodes[id as usize];
        if !node.dirty {
            // A clean node's subtree is clean: a change marks its whole path from the root.
            return;
        }
        if let Body::Internal(children) = &node.body {
            for &(_, child) in children {
                self.dirty_post_order(child, order);
            }
        }
        order.push(id);
    }

    /// Encodes the next node of `write_out` into `block` as written at `address` (its
    /// children already have theirs) and marks it clean; its old address goes to
    /// `take_obsolete`. False, and nothing encoded, once every node is written.
    pub fn write_next_node(
        &mut self,
        write_out: &mut WriteOut,
        nonce: u64,
        generation: u64,
        address: u64,
        block: &mut [u8],
    ) -> bool {
        let Some(&id) = write_out.order.get(write_out.next) else {
            return false;
        };
        write_out.next += 1;
        let node = &self.nodes[id as usize];
        assert!(node.dirty, "the tree changed during a write-out");
        let entries = match &node.body {
            Body::Leaf(entries) => {
                let mut leaf = std::mem::take(&mut write_out.leaf);
                leaf.clear();
                leaf.extend_from_slice(entries);
                Entries::Leaf(leaf)
            }
            Body::Internal(children) => {
                let mut internal = std::mem::take(&mut write_out.internal);
                internal.clear();
                internal.extend(children.iter().map(|&(key, child)| {
                    let child = &self.nodes[child as usize];
                    assert!(
                        !child.dirty && child.address != 0,
                        "children are written before their parent"
                    );
                    (key, child.address)
                }));
                Entries::Internal(internal)
            }
        };
        node::encode(block, nonce, address, generation, node.level, &entries);
        match entries {
            Entries::Leaf(leaf) => write_out.leaf = leaf,
            Entries::Internal(internal) => write_out.internal = internal,
        }
        let node = &mut self.nodes[id as usize];
        if node.address != 0 {
            self.obsolete.push(node.address);
        }
        node.address = address;
        node.dirty = false;
        write_out.last_address = address;
        true
    }

    /// Calls `visit` with the address of every node of the tree that has one (written and
    /// not changed since, or changed and not yet written out again): the blocks the tree
    /// keeps live on the device.
    pub fn for_each_node_address(&self, visit: &mut dyn FnMut(u64)) {
        for id in self.live_ids() {
            let address = self.nodes[id as usize].address;
            if address != 0 {
                visit(address);
            }
        }
    }

    /// Marks dirty every node written inside `addresses`, and the path from the root to it
    /// (a moved child changes its parent's pointer), so the next write-out puts them
    /// elsewhere: how the cleaner empties a segment of nodes (copy-on-write moves them).
    /// Returns how many nodes were inside. Does not count as a change for `changed_count`
    /// (that predicts what clients change between checkpoints).
    pub fn mark_dirty_in(&mut self, addresses: std::ops::Range<u64>) -> usize {
        let mut inside = 0;
        self.mark_dirty_below(self.root, &addresses, &mut inside);
        inside
    }

    /// `mark_dirty_in` for the subtree at `id`; true if anything in it became dirty.
    fn mark_dirty_below(
        &mut self,
        id: NodeId,
        addresses: &std::ops::Range<u64>,
        inside: &mut usize,
    ) -> bool {
        let mut below = false;
        let children = match &self.nodes[id as usize].body {
            Body::Internal(children) => children.len(),
            Body::Leaf(_) => 0,
        };
        // By index, not a borrow of the body, while the children are marked.
        for i in 0..children {
            let Body::Internal(entries) = &self.nodes[id as usize].body else {
                unreachable!("an internal node stays internal")
            };
            let child = entries[i].1;
            below |= self.mark_dirty_below(child, addresses, inside);
        }
        let node = &mut self.nodes[id as usize];
        let here = node.address != 0 && addresses.contains(&node.address);
        *inside += usize::from(here);
        if here || below {
            node.dirty = true;
        }
        here || below
    }

    /// Forgets where every node was written (after a checkpoint that did not write the tree
    /// out, a full dump: replay from it does not read them): their addresses go to
    /// `take_obsolete` and every node becomes dirty, so the next write-out writes the whole
    /// tree.
    pub fn forget_addresses(&mut self) {
        let ids: Vec<NodeId> = self.live_ids().collect();
        for id in ids {
            let node = &mut self.nodes[id as usize];
            if node.address != 0 {
                self.obsolete.push(node.address);
                node.address = 0;
            }
            node.dirty = true;
        }
    }

    /// The root's address as last written (0: an empty tree, or never written).
    pub fn root_address(&self) -> u64 {
        self.nodes[self.root as usize].address
    }

    /// Loads the tree written with root `root` (0: empty), reading nodes through `read` and
    /// checking each: checksum, nonce, place, level, key bounds. Fill is not required (a
    /// tree is loaded as it was written).
    pub fn load(
        root: u64,
        nonce: u64,
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<ExtentTree, LoadError> {
        ExtentTree::load_written_by(root, nonce, u64::MAX, read)
    }

    /// `load`, for a tree a checkpoint of `generation` named: no node may be newer than that,
    /// nor newer than its parent (a write-out writes children before parents, in one
    /// generation): a node of a later write-out that failed to be named, or a stale block
    /// that happens to sit at the address, is refused rather than loaded.
    pub fn load_written_by(
        root: u64,
        nonce: u64,
        generation: u64,
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<ExtentTree, LoadError> {
        let mut tree = ExtentTree::new();
        if root == 0 {
            return Ok(tree);
        }
        tree.nodes.clear();
        let mut block = vec![0u8; NODE_BYTES];
        let mut len = 0;
        let place = Place {
            level: None,
            lower: None,
            upper: None,
            generation_max: generation,
        };
        tree.root = tree.load_node(root, nonce, place, read, &mut block, &mut len)?;
        tree.len = len;
        Ok(tree)
    }

    fn load_node(
        &mut self,
        address: u64,
        nonce: u64,
        place: Place,
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
        block: &mut [u8],
        len: &mut usize,
    ) -> Result<NodeId, LoadError> {
        let Place {
            level,
            lower,
            upper,
            generation_max,
        } = place;
        read(address, block).map_err(|error| LoadError::Read { address, error })?;
        let decoded = node::decode(block, nonce, address)
            .map_err(|error| LoadError::Node { address, error })?;
        let shape = |reason: String| LoadError::Shape { address, reason };
        if decoded.generation > generation_max {
            return Err(shape(format!(
                "generation {} is newer than its checkpoint or parent ({generation_max})",
                decoded.generation
            )));
        }
        if level.is_some_and(|l| l != decoded.level) {
            return Err(shape(format!(
                "level {} where the parent expects {}",
                decoded.level,
                level.expect("checked")
            )));
        }
        let keys: Vec<Key> = match &decoded.entries {
            Entries::Leaf(entries) => entries.iter().map(|&(k, _)| k).collect(),
            Entries::Internal(entries) => entries.iter().map(|&(k, _)| k).collect(),
        };
        if lower.is_some_and(|l| keys[0] < l) || upper.is_some_and(|u| keys[keys.len() - 1] >= u) {
            return Err(shape(format!(
                "keys {:?}..={:?} outside the parent's range {lower:?}..{upper:?}",
                keys[0],
                keys[keys.len() - 1]
            )));
        }
        let body = match decoded.entries {
            Entries::Leaf(entries) => {
                *len += entries.len();
                Body::Leaf(entries)
            }
            Entries::Internal(entries) => {
                let mut children = Vec::with_capacity(entries.len());
                for (i, &(key, child)) in entries.iter().enumerate() {
                    let child_upper = entries.get(i + 1).map(|&(k, _)| k).or(upper);
                    let place = Place {
                        level: Some(decoded.level - 1),
                        lower: Some(key),
                        upper: child_upper,
                        generation_max: decoded.generation,
                    };
                    let id = self.load_node(child, nonce, place, read, block, len)?;
                    children.push((key, id));
                }
                Body::Internal(children)
            }
        };
        Ok(self.alloc(Node {
            level: decoded.level,
            body,
            address,
            dirty: false,
            changed: false,
        }))
    }

    /// Verifies every invariant in the module docs; says which one fails where.
    pub fn check(&self) -> Result<(), String> {
        let mut count = 0;
        self.check_node(self.root, None, None, true, &mut count)?;
        if count != self.len {
            return Err(format!("{count} entries, but len says {}", self.len));
        }
        Ok(())
    }

    fn check_node(
        &self,
        id: NodeId,
        lower: Option<Key>,
        upper: Option<Key>,
        is_root: bool,
        count: &mut usize,
    ) -> Result<(), String> {
        let node = &self.nodes[id as usize];
        if !is_root && node.len() < node.capacity() / 4 {
            return Err(format!(
                "node {id} holds {} of {}",
                node.len(),
                node.capacity()
            ));
        }
        if node.len() > node.capacity() {
            return Err(format!("node {id} over capacity"));
        }
        let in_range = |k: Key| lower.is_none_or(|l| k >= l) && upper.is_none_or(|u| k < u);
        match &node.body {
            Body::Leaf(entries) => {
                if node.level != 0 {
                    return Err(format!("leaf {id} at level {}", node.level));
                }
                if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
                    return Err(format!("leaf {id} keys out of order"));
                }
                if !entries.iter().all(|&(k, _)| in_range(k)) {
                    return Err(format!("leaf {id} has keys outside {lower:?}..{upper:?}"));
                }
                *count += entries.len();
            }
            Body::Internal(entries) => {
                if is_root && entries.len() < 2 {
                    return Err("internal root with one child".into());
                }
                if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
                    return Err(format!("internal node {id} keys out of order"));
                }
                if !in_range(entries[0].0) {
                    return Err(format!("internal node {id} outside its parent's range"));
                }
                for (i, &(key, child)) in entries.iter().enumerate() {
                    if self.nodes[child as usize].level + 1 != node.level {
                        return Err(format!("child {child} of {id} at the wrong level"));
                    }
                    let child_upper = entries.get(i + 1).map(|&(k, _)| k).or(upper);
                    self.check_node(child, Some(key), child_upper, false, count)?;
                }
            }
        }
        Ok(())
    }
}

/// Merges `b` into `a` when both fit one node (returns true), else evens them out (keys keep
/// their order: `a` stays the left one).
fn rebalance_pair<T>(a: &mut Vec<T>, b: &mut Vec<T>, capacity: usize) -> bool {
    if a.len() + b.len() <= capacity {
        a.append(b);
        return true;
    }
    let total = a.len() + b.len();
    let left = total / 2;
    if a.len() > left {
        // Move `a`'s tail to the front of `b` in place: `b` ends with at most `capacity`
        // entries, within the room every body is made with.
        let moved = a.len() - left;
        b.extend(a.drain(left..));
        b.rotate_right(moved);
    } else {
        let take = left - a.len();
        a.extend(b.drain(..take));
    }
    false
}

/// Iterator of `ExtentTree::range`: the path from the root to the current leaf entry.
pub struct Range<'a> {
    tree: &'a ExtentTree,
    /// (node, index of the current entry or child) from the root down; `depth` are in use.
    path: [(NodeId, usize); node::LEVEL_MAX as usize + 1],
    depth: usize,
    to: Key,
}

impl Range<'_> {
    fn push(&mut self, id: NodeId, index: usize) {
        assert!(self.depth < self.path.len(), "tree height limit");
        self.path[self.depth] = (id, index);
        self.depth += 1;
    }
}

impl Iterator for Range<'_> {
    type Item = (Key, Value);

    fn next(&mut self) -> Option<(Key, Value)> {
        while self.depth > 0 {
            let (id, index) = self.path[self.depth - 1];
            match &self.tree.nodes[id as usize].body {
                Body::Leaf(entries) => {
                    if let Some(&(key, value)) = entries.get(index) {
                        if key >= self.to {
                            self.depth = 0;
                            return None;
                        }
                        self.path[self.depth - 1].1 += 1;
                        return Some((key, value));
                    }
                    self.depth -= 1; // Leaf done: on to the parent's next child.
                    if self.depth > 0 {
                        self.path[self.depth - 1].1 += 1;
                    }
                }
                Body::Internal(entries) => match entries.get(index) {
                    Some(&(key, child)) if key < self.to => {
                        let child_index = 0;
                        self.push(child, child_index);
                    }
                    _ => {
                        self.depth -= 1;
                        if self.depth > 0 {
                            self.path[self.depth - 1].1 += 1;
                        }
                    }
                },
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
