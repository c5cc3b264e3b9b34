//! Bytes per checkpoint, today's full dump against an incremental checkpoint that writes only
//! the extent-tree nodes changed since the checkpoint before (4 KiB each) plus the onode
//! table, for 4 KiB overwrites spread over every object or confined to 5% of them.
//! (`Metadata::take_changed_tree_nodes`; the running store reports the same estimate as
//! `checkpoint_incremental_estimate_bytes`.) Run with `--nocapture` for the numbers.
//!
//! What it settles for step 3 (ARCHITECTURE.md, "the plan"): under uniform overwrites nearly
//! every leaf changes between checkpoints and the incremental checkpoint writes more than the
//! dump, so it needs the dump as fallback; with a hot set it writes a small part of it.

use carmine_storage::segment::format::{Delta, Superblock, SEGMENTS_START_BYTES};
use carmine_storage::segment::metadata::Metadata;

const BLOCK: u64 = 4096;
const SEGMENT: u64 = 16 << 20;
const OBJECTS: u64 = 64;
const BLOCKS_PER_OBJECT: u64 = 1024;
const BLOCKS: u64 = OBJECTS * BLOCKS_PER_OBJECT;
/// Overwrites between checkpoints, per mapped block: store-bench's randwrite at 50% of a
/// 2 GiB shard checkpoints every ~18k overwrites of ~259k blocks (ARCHITECTURE.md).
const INTERVAL: u64 = BLOCKS * 18 / 259;

/// A shard with every object's blocks mapped one by one at scattered addresses (as the
/// cleaner leaves them in steady state, so the dump cannot merge neighbours into one extent).
fn scattered_store() -> Metadata {
    // Room for the initial blocks and one fresh block per overwrite.
    let segments = (2 * BLOCKS * BLOCK).div_ceil(SEGMENT) + 1;
    let sb = Superblock::for_device(
        SEGMENTS_START_BYTES + segments * SEGMENT,
        SEGMENT,
        1,
        [3; 16],
    )
    .unwrap();
    let mut md = Metadata::new(sb);
    for object in 0..OBJECTS {
        let oid = format!("obj.{object}").into_bytes();
        md.apply(&Delta::ObjectCreate { oid: &oid }).unwrap();
        for block in 0..BLOCKS_PER_OBJECT {
            // An odd multiplier permutes 0..BLOCKS (a power of two).
            let slot = ((object * BLOCKS_PER_OBJECT + block) * 40_503) % BLOCKS;
            map(&mut md, &oid, block, SEGMENTS_START_BYTES + slot * BLOCK);
        }
    }
    md
}

fn map(md: &mut Metadata, oid: &[u8], block: u64, physical: u64) {
    md.apply(&Delta::ExtentMap {
        oid,
        offset: block * BLOCK,
        physical,
        blocks: 1,
        crcs: &(block as u32).to_le_bytes(),
    })
    .unwrap();
}

/// One checkpoint's cost.
#[derive(Clone, Copy, Default)]
struct Cost {
    /// Bytes per 1,000 overwrites.
    dump: u64,
    incremental: u64,
    changed_nodes: u64,
    nodes: u64,
}

/// The third of three intervals of `INTERVAL` overwrites at random blocks of the first
/// `hot_objects` objects.
fn checkpoint_cost(hot_objects: u64) -> Cost {
    let mut md = scattered_store();
    md.take_changed_tree_nodes();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next_physical = SEGMENTS_START_BYTES + BLOCKS * BLOCK;
    let mut measured = Cost::default();
    for _ in 0..3 {
        for _ in 0..INTERVAL {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let block = rng % (hot_objects * BLOCKS_PER_OBJECT);
            let oid = format!("obj.{}", block / BLOCKS_PER_OBJECT).into_bytes();
            map(&mut md, &oid, block % BLOCKS_PER_OBJECT, next_physical);
            next_physical += BLOCK;
        }
        let mut chunks = Vec::new();
        let extent_bytes = md.checkpoint(1 << 20, &mut chunks);
        let dump: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let changed = md.take_changed_tree_nodes() as u64;
        let incremental = changed * BLOCK + (dump - extent_bytes);
        measured = Cost {
            dump: dump * 1000 / INTERVAL,
            incremental: incremental * 1000 / INTERVAL,
            changed_nodes: changed,
            nodes: md.extent_tree().node_count() as u64,
        };
        println!(
            "{hot_objects} of {OBJECTS} objects overwritten: {INTERVAL} overwrites a checkpoint; dump {dump} bytes, incremental {incremental} ({changed} of {} nodes changed, onode table {}); per 1,000 overwrites {} / {}",
            measured.nodes,
            dump - extent_bytes,
            measured.dump,
            measured.incremental
        );
    }
    measured
}

#[test]
fn uniform_overwrites_change_nearly_every_leaf_and_a_hot_set_few() {
    // Every block its own extent in the dump (35 bytes with these names) against 4 KiB
    // leaves three quarters full (~28 bytes an entry), every one of them changed.
    let uniform = checkpoint_cost(OBJECTS);
    assert!(
        uniform.changed_nodes * 100 >= uniform.nodes * 99,
        "uniform: {} of {} nodes changed",
        uniform.changed_nodes,
        uniform.nodes
    );
    assert!(
        uniform.incremental > uniform.dump,
        "uniform: incremental {} against the dump's {} per 1,000 overwrites",
        uniform.incremental,
        uniform.dump
    );
    let hot = OBJECTS / 20;
    let skewed = checkpoint_cost(hot);
    assert_eq!(
        skewed.dump, uniform.dump,
        "the dump's size does not depend on what changed"
    );
    assert!(
        skewed.incremental * 8 < skewed.dump,
        "hot set of {hot}: incremental {} against the dump's {}",
        skewed.incremental,
        skewed.dump
    );
}
