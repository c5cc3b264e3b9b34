use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;

fn key(object: u64, block: u64) -> Key {
    Key { object, block }
}

fn value(n: u64) -> Value {
    Value {
        physical: (n % (1 << 40) + 1) * 4096,
        crc: n as u32 ^ 0x5bd1_e995,
    }
}

/// A device of 4 KiB blocks in a map, with a bump allocator: what `write_out` and `load` see.
#[derive(Default)]
struct Blocks {
    blocks: HashMap<u64, Vec<u8>>,
    next: u64,
}

impl Blocks {
    fn write_out(&mut self, tree: &mut ExtentTree, generation: u64) -> u64 {
        let next = &mut self.next;
        let blocks = &mut self.blocks;
        tree.write_out(
            7,
            generation,
            &mut || {
                *next += 4096;
                *next
            },
            &mut |address, block| {
                assert!(
                    blocks.insert(address, block.to_vec()).is_none(),
                    "copy on write"
                );
            },
        )
    }

    fn load(&self, root: u64) -> Result<ExtentTree, LoadError> {
        ExtentTree::load(root, 7, &mut |address, out| {
            let block = self
                .blocks
                .get(&address)
                .ok_or_else(|| std::io::Error::other(format!("no block at {address}")))?;
            out.copy_from_slice(block);
            Ok(())
        })
    }
}

fn contents(tree: &ExtentTree) -> Vec<(Key, Value)> {
    let mut out = Vec::new();
    tree.for_each_in(Key::default(), key(u64::MAX, u64::MAX), &mut |k, v| {
        out.push((k, v))
    });
    out
}

#[test]
fn grows_to_several_levels_and_shrinks_back() {
    let mut tree = ExtentTree::new();
    let n = 60_000u64;
    for i in 0..n {
        // Scattered objects, sequential blocks within each: the store's shape.
        assert_eq!(tree.insert(key(i % 97, i / 97), value(i)), None);
    }
    tree.check().unwrap();
    assert_eq!(tree.len(), n as usize);
    assert!(tree.height() >= 2, "height {}", tree.height());
    for i in 0..n {
        assert_eq!(tree.get(key(i % 97, i / 97)), Some(value(i)));
    }
    for i in (0..n).filter(|i| i % 3 != 0) {
        assert_eq!(tree.remove(key(i % 97, i / 97)), Some(value(i)));
    }
    tree.check().unwrap();
    for i in (0..n).filter(|i| i % 3 == 0) {
        assert_eq!(tree.remove(key(i % 97, i / 97)), Some(value(i)));
    }
    tree.check().unwrap();
    assert!(tree.is_empty());
    assert_eq!(tree.height(), 0);
    assert_eq!(tree.node_count(), 1, "freed nodes go back to the arena");
}

#[test]
fn in_order_inserts_leave_nodes_three_quarters_full() {
    // A replay from a checkpoint inserts keys in order: object by object, block by block.
    let mut tree = ExtentTree::new();
    let n = 100_000u64;
    for i in 0..n {
        tree.insert(key(i / 1000, i % 1000), value(i));
    }
    tree.check().unwrap();
    let leaves_min = n as usize / LEAF_CAPACITY;
    let three_quarters = n as usize / (LEAF_CAPACITY - LEAF_CAPACITY / 4 - 1);
    assert!(
        tree.node_count() <= three_quarters + three_quarters / 100 + 2,
        "{} nodes for {n} entries ({leaves_min} if every leaf were full)",
        tree.node_count()
    );
    // Out-of-order inserts still split evenly (and the tree stays valid either way).
    let mut scattered = ExtentTree::new();
    for i in 0..n {
        scattered.insert(key(i % 97, i / 97), value(i));
    }
    scattered.check().unwrap();
    assert!(scattered.node_count() > tree.node_count());
}

#[test]
fn range_visits_one_object_in_block_order() {
    let mut tree = ExtentTree::new();
    for object in 0..50 {
        for block in (0..400).rev() {
            tree.insert(key(object, block), value(object * 1000 + block));
        }
    }
    let mut seen = Vec::new();
    tree.for_each_in(key(17, 0), key(18, 0), &mut |k, v| seen.push((k, v)));
    assert_eq!(seen.len(), 400);
    assert!(tree.height() >= 2, "the range crosses internal nodes");
    assert!(tree.range(key(17, 0), key(18, 0)).eq(seen.iter().copied()));
    for (block, &(k, v)) in seen.iter().enumerate() {
        assert_eq!(
            (k, v),
            (key(17, block as u64), value(17_000 + block as u64))
        );
    }
}

#[test]
fn write_out_is_copy_on_write_and_load_gives_the_same_tree() {
    let mut tree = ExtentTree::new();
    let mut blocks = Blocks::default();
    for i in 0..20_000u64 {
        tree.insert(key(i % 13, i), value(i));
    }
    let root = blocks.write_out(&mut tree, 1);
    assert_eq!(tree.dirty_count(), 0);
    assert!(
        tree.take_obsolete().is_empty(),
        "a first write-out replaces nothing"
    );
    let written = blocks.blocks.len();
    assert_eq!(written, tree.node_count());

    // One change rewrites the path from its leaf to the root, nothing else.
    tree.insert(key(5, 5), value(99));
    let path = usize::from(tree.height()) + 1;
    assert_eq!(tree.dirty_count(), path);
    let new_root = blocks.write_out(&mut tree, 2);
    assert_ne!(new_root, root);
    assert_eq!(blocks.blocks.len(), written + path);
    let obsolete = tree.take_obsolete();
    assert_eq!(obsolete.len(), path);
    assert!(obsolete.contains(&root));

    // Both versions load: the old root still describes the old tree (until its blocks are
    // reused), the new one the new tree.
    let old = blocks.load(root).unwrap();
    assert_eq!(old.get(key(5, 5)), Some(value(5)));
    let loaded = blocks.load(new_root).unwrap();
    loaded.check().unwrap();
    assert_eq!(contents(&loaded), contents(&tree));
    assert_eq!(loaded.dirty_count(), 0);

    assert_eq!(blocks.load(0).unwrap().len(), 0, "root 0 is the empty tree");
}

#[test]
fn changed_nodes_count_per_interval_whether_or_not_written_out() {
    let mut tree = ExtentTree::new();
    let mut blocks = Blocks::default();
    for i in 0..20_000u64 {
        tree.insert(key(i % 13, i), value(i));
    }
    assert_eq!(tree.changed_count(), tree.node_count(), "every node is new");
    tree.clear_changed();
    assert_eq!(tree.changed_count(), 0);
    assert_eq!(
        tree.dirty_count(),
        tree.node_count(),
        "clearing the interval writes nothing out"
    );

    // An overwrite changes its leaf-to-root path; a write-out leaves the count alone (the
    // interval ends at a checkpoint, not at a write-out).
    tree.insert(key(5, 5), value(99));
    let path = usize::from(tree.height()) + 1;
    assert_eq!(tree.changed_count(), path);
    blocks.write_out(&mut tree, 1);
    assert_eq!((tree.dirty_count(), tree.changed_count()), (0, path));
    tree.clear_changed();

    // Removing a whole object merges leaves: the survivors count, the freed nodes do not.
    let before = tree.node_count();
    for i in (0..20_000u64).filter(|i| i % 13 == 3) {
        tree.remove(key(3, i)).unwrap();
    }
    assert!(tree.node_count() < before);
    let changed = tree.changed_count();
    assert!(changed > 0 && changed < tree.node_count(), "{changed}");
    assert_eq!(changed, tree.dirty_count());
    tree.check().unwrap();
}

#[test]
fn a_write_out_one_node_at_a_time_goes_where_the_caller_places_it() {
    let mut tree = ExtentTree::new();
    let mut blocks = Blocks::default();
    for i in 0..5_000u64 {
        tree.insert(key(i % 3, i), value(i));
    }
    blocks.write_out(&mut tree, 1);
    for i in (0..5_000u64).step_by(97) {
        tree.insert(key(i % 3, i), value(i + 1));
    }
    let dirty = tree.dirty_count();
    let mut write_out = tree.begin_write_out();
    assert_eq!((write_out.nodes(), write_out.remaining()), (dirty, dirty));
    // Addresses going down, as no allocator would hand them out: the caller decides.
    let mut address = 1 << 30;
    let mut block = vec![0u8; NODE_BYTES];
    while tree.write_next_node(&mut write_out, 7, 2, address, &mut block) {
        assert_eq!(write_out.written_at(), address);
        assert!(blocks.blocks.insert(address, block.clone()).is_none());
        address -= 4096;
    }
    assert_eq!(write_out.remaining(), 0);
    assert_eq!(tree.dirty_count(), 0);
    assert_eq!(
        tree.root_address(),
        address + 4096,
        "the root is written last"
    );
    assert_eq!(tree.take_obsolete().len(), dirty);
    let loaded = blocks.load(tree.root_address()).unwrap();
    loaded.check().unwrap();
    assert_eq!(contents(&loaded), contents(&tree));
}

#[test]
#[should_panic(expected = "children are written before their parent")]
fn a_tree_changed_during_a_write_out_is_caught() {
    let mut tree = ExtentTree::new();
    for i in 0..2_000u64 {
        tree.insert(key(1, i), value(i));
    }
    let mut write_out = tree.begin_write_out();
    let mut block = vec![0u8; NODE_BYTES];
    assert!(tree.write_next_node(&mut write_out, 7, 1, 4096, &mut block));
    // The first leaf, written, changes again: its parent must not point at the stale copy.
    tree.insert(key(1, 0), value(5));
    let mut address = 8192;
    while tree.write_next_node(&mut write_out, 7, 1, address, &mut block) {
        address += 4096;
    }
}

#[test]
fn nodes_in_an_address_range_move_at_the_next_write_out_with_their_paths() {
    let mut tree = ExtentTree::new();
    let mut blocks = Blocks::default();
    for i in 0..30_000u64 {
        tree.insert(key(i % 5, i), value(i));
    }
    let root = blocks.write_out(&mut tree, 1);
    assert!(tree.height() >= 1);
    let mut addresses = Vec::new();
    tree.for_each_node_address(&mut |address| addresses.push(address));
    addresses.sort_unstable();
    assert_eq!(addresses.len(), tree.node_count());
    assert_eq!(addresses.last(), Some(&root), "the root is written last");

    // A "segment" holding the first ten nodes written (leaves: children go first).
    let segment = addresses[0]..addresses[10];
    assert_eq!(tree.mark_dirty_in(segment.clone()), 10);
    assert_eq!(
        tree.changed_count(),
        tree.node_count(),
        "marking is not a change"
    );
    let dirty = tree.dirty_count();
    assert!(dirty > 10, "their parents up to the root move too: {dirty}");
    let before = contents(&tree);
    blocks.write_out(&mut tree, 2);
    let obsolete = tree.take_obsolete();
    assert_eq!(obsolete.len(), dirty);
    assert_eq!(obsolete.iter().filter(|a| segment.contains(a)).count(), 10);
    let mut left = 0;
    tree.for_each_node_address(&mut |address| left += usize::from(segment.contains(&address)));
    assert_eq!(left, 0, "no node of the tree is in the segment any more");
    let loaded = blocks.load(tree.root_address()).unwrap();
    loaded.check().unwrap();
    assert_eq!(contents(&loaded), before);
    assert_eq!(tree.mark_dirty_in(segment), 0);
    assert_eq!(tree.dirty_count(), 0);
}

#[test]
fn forgotten_addresses_are_obsolete_and_the_whole_tree_is_written_again() {
    let mut tree = ExtentTree::new();
    let mut blocks = Blocks::default();
    for i in 0..10_000u64 {
        tree.insert(key(2, i), value(i));
    }
    blocks.write_out(&mut tree, 1);
    let written = tree.node_count();
    tree.forget_addresses();
    assert_eq!(tree.take_obsolete().len(), written);
    assert_eq!(tree.dirty_count(), written);
    assert_eq!(tree.root_address(), 0);
    let mut count = 0;
    tree.for_each_node_address(&mut |_| count += 1);
    assert_eq!(count, 0, "no node keeps a block live");
    blocks.write_out(&mut tree, 2);
    assert_eq!(blocks.blocks.len(), 2 * written);
    assert!(tree.take_obsolete().is_empty(), "nothing left to replace");
    assert_eq!(
        contents(&blocks.load(tree.root_address()).unwrap()),
        contents(&tree)
    );
}

#[test]
fn load_refuses_damaged_or_misplaced_nodes() {
    let mut tree = ExtentTree::new();
    let mut blocks = Blocks::default();
    for i in 0..5_000u64 {
        tree.insert(key(i % 3, i), value(i));
    }
    let root = blocks.write_out(&mut tree, 1);
    let addresses: Vec<u64> = blocks.blocks.keys().copied().collect();
    for &address in &addresses {
        let saved = blocks.blocks[&address].clone();
        blocks.blocks.get_mut(&address).unwrap()[100] ^= 0x10;
        let error = blocks.load(root).err().expect("a flipped bit is found");
        assert!(
            matches!(error, LoadError::Node { address: a, .. } if a == address),
            "{error}"
        );
        blocks.blocks.insert(address, saved);
    }
    // A node copied to another address (a misdirected write) is refused there.
    let (&a, &b) = (&addresses[0], &addresses[1]);
    let copy = blocks.blocks[&a].clone();
    blocks.blocks.insert(b, copy);
    assert!(blocks.load(root).is_err());
}

#[test]
fn load_refuses_a_child_outside_its_parents_range() {
    // Two trees written into one device; graft the second's leaf under the first's root.
    let mut blocks = Blocks::default();
    let mut tree = ExtentTree::new();
    for i in 0..1_000u64 {
        tree.insert(key(1, i), value(i));
    }
    let root = blocks.write_out(&mut tree, 1);
    let mut other = ExtentTree::new();
    other.insert(key(9, 9), value(9));
    let stray = blocks.write_out(&mut other, 1);
    let node::DecodedNode {
        entries,
        level,
        generation,
    } = node::decode(&blocks.blocks[&root], 7, root).unwrap();
    let Entries::Internal(mut children) = entries else {
        panic!("1,000 entries need an internal root")
    };
    children[0].1 = stray;
    let mut block = vec![0u8; NODE_BYTES];
    node::encode(
        &mut block,
        7,
        root,
        generation,
        level,
        &Entries::Internal(children),
    );
    blocks.blocks.insert(root, block);
    let error = blocks.load(root).err().expect("the graft is found");
    assert!(matches!(error, LoadError::Shape { .. }), "{error}");
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u64, u64, u64),
    Remove(u64, u64),
    WriteOut,
}

fn op() -> impl Strategy<Value = Op> {
    // Few objects and blocks, so that removes hit and nodes split and merge often.
    prop_oneof![
        6 => (0..4u64, 0..600u64, any::<u64>()).prop_map(|(o, b, v)| Op::Insert(o, b, v)),
        5 => (0..4u64, 0..600u64).prop_map(|(o, b)| Op::Remove(o, b)),
        1 => Just(Op::WriteOut),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The tree is a map: after any sequence of inserts, removes and write-outs it holds what
    /// a `BTreeMap` holds, keeps every invariant, and loads back from its last write-out.
    #[test]
    fn behaves_as_a_map(ops in proptest::collection::vec(op(), 1..3000)) {
        let mut tree = ExtentTree::new();
        let mut model = BTreeMap::new();
        let mut blocks = Blocks::default();
        let mut last = None;
        for (generation, op) in ops.into_iter().enumerate() {
            match op {
                Op::Insert(o, b, v) => {
                    prop_assert_eq!(tree.insert(key(o, b), value(v)), model.insert(key(o, b), value(v)));
                }
                Op::Remove(o, b) => {
                    prop_assert_eq!(tree.remove(key(o, b)), model.remove(&key(o, b)));
                }
                Op::WriteOut => {
                    let root = blocks.write_out(&mut tree, generation as u64);
                    last = Some((root, model.clone()));
                }
            }
        }
        tree.check().map_err(TestCaseError::fail)?;
        let expected: Vec<(Key, Value)> = model.iter().map(|(&k, &v)| (k, v)).collect();
        prop_assert_eq!(contents(&tree), expected.clone());
        // The iterator agrees with the map on every window, including ones that start or end
        // between keys, inside and across objects.
        let all: Vec<(Key, Value)> = tree.range(Key::default(), key(u64::MAX, u64::MAX)).collect();
        prop_assert_eq!(all, expected);
        for (from, to) in [(key(0, 0), key(1, 0)), (key(1, 300), key(3, 17)), (key(2, 599), key(2, 600)), (key(3, 5), key(3, 5))] {
            let got: Vec<(Key, Value)> = tree.range(from, to).collect();
            let want: Vec<(Key, Value)> = model.range(from..to).map(|(&k, &v)| (k, v)).collect();
            prop_assert_eq!(got, want, "range {:?}..{:?}", from, to);
        }
        if let Some((root, snapshot)) = last {
            let loaded = blocks.load(root).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let expected: Vec<(Key, Value)> = snapshot.iter().map(|(&k, &v)| (k, v)).collect();
            prop_assert_eq!(contents(&loaded), expected);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A walk in steps (`for_each_from`, as the cleaner walks a victim across polls) visits,
    /// in key order and each once, every entry that stays in the tree from the walk's start to
    /// its end, even when inserts and removes between steps split and merge the nodes under
    /// it; it never visits a key twice nor one behind where it resumed.
    #[test]
    fn walk_in_steps_sees_every_entry_that_stays(
        start in proptest::collection::vec((0..4u64, 0..600u64), 0..2000),
        steps in proptest::collection::vec((1..300usize, proptest::collection::vec(op(), 0..40)), 1..200),
    ) {
        let mut tree = ExtentTree::new();
        for &(o, b) in &start {
            tree.insert(key(o, b), value(o * 1000 + b));
        }
        let mut stayed: BTreeMap<Key, Value> = contents(&tree).into_iter().collect();
        let mut seen: Vec<Key> = Vec::new();
        let mut from = Some(Key::default());
        let mut steps = steps.into_iter();
        while let Some(at) = from {
            let (budget, ops) = steps.next().unwrap_or((usize::MAX, Vec::new()));
            let mut visited = 0;
            from = tree.for_each_from(at, budget, &mut |run| {
                assert!(!run.is_empty(), "no empty runs");
                for &(k, v) in run {
                    visited += 1;
                    seen.push(k);
                    assert!(k >= at, "visited {k:?} behind the resume key {at:?}");
                    assert!(tree_value_check(k, v));
                }
            });
            prop_assert!(visited <= budget);
            if let Some(next) = from {
                prop_assert_eq!(visited, budget, "stopped early only when the budget ran out");
                prop_assert!(seen.last().is_none_or(|&last| last < next));
            }
            for op in ops {
                match op {
                    Op::Insert(o, b, _) => {
                        tree.insert(key(o, b), value(o * 1000 + b));
                        stayed.remove(&key(o, b));
                    }
                    Op::Remove(o, b) => {
                        tree.remove(key(o, b));
                        stayed.remove(&key(o, b));
                    }
                    Op::WriteOut => {}
                }
            }
        }
        tree.check().map_err(TestCaseError::fail)?;
        prop_assert!(seen.windows(2).all(|w| w[0] < w[1]), "in key order, each once");
        let seen_set: std::collections::BTreeSet<Key> = seen.iter().copied().collect();
        for k in stayed.keys() {
            prop_assert!(seen_set.contains(k), "{:?} stayed in the tree and was not visited", k);
        }
    }
}

/// Every value the walk test inserts is derived from its key.
fn tree_value_check(k: Key, v: Value) -> bool {
    v == value(k.object * 1000 + k.block)
}
