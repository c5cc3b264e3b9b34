//! The journal writing a checkpoint's extent-tree nodes (format 6), checked on the device:
//! the records scan (the data crc covers the nodes), the last one names the root, and the tree
//! loads from there equal to the one written.

use super::*;
use crate::queue_pair::{MemFaults, MemQueuePair, QueuePair};
use crate::segment::btree::{Key, Value};
use crate::segment::format::{
    DeltaReader, Superblock, RECORD_FLAG_CHECKPOINT, RECORD_FLAG_CHECKPOINT_END,
    SEGMENTS_START_BYTES,
};
use crate::segment::journal::{Journal, CHECKPOINT_CHUNK_MAX_BYTES, CHECKPOINT_NODE_BLOCKS_MAX};
use crate::segment::metadata::Metadata;
use crate::segment::scan::scan_shard;

/// 1 MiB segments (255 blocks of records each): a tree of a few hundred nodes spans segments.
const SEGMENT: u64 = 1 << 20;

fn device() -> (Superblock, MemQueuePair) {
    let size = SEGMENTS_START_BYTES + 8 * SEGMENT;
    let sb = Superblock::for_device(size, SEGMENT, 1, *b"ckpt-nodes-test!").unwrap();
    let mut image = vec![0u8; size as usize];
    image[..4096].copy_from_slice(&sb.encode());
    let faults = MemFaults {
        latency_polls: (1, 4),
        ..MemFaults::default()
    };
    (sb, MemQueuePair::from_image(image, 64, faults))
}

/// A tree of `entries` blocks over a few objects, at made-up addresses.
fn tree(entries: u64) -> ExtentTree {
    let mut tree = ExtentTree::new();
    for n in 0..entries {
        let key = Key {
            object: n % 7,
            block: n / 7,
        };
        let value = Value {
            physical: SEGMENTS_START_BYTES + (n % 1000) * 4096,
            crc: (n as u32).wrapping_mul(0x9e37_79b9),
        };
        tree.insert(key, value);
    }
    tree
}

fn entries(tree: &ExtentTree) -> Vec<(Key, Value)> {
    let mut out = Vec::new();
    let all = (
        Key {
            object: 0,
            block: 0,
        },
        Key {
            object: u64::MAX,
            block: 0,
        },
    );
    tree.for_each_in(all.0, all.1, &mut |k, v| out.push((k, v)));
    out
}

/// Writes a checkpoint of `tree` (and an empty onode table) through a fresh journal, urgent
/// so that a segment header names it at once; returns the journal.
fn write_checkpoint(sb: &Superblock, qp: &mut MemQueuePair, tree: &mut ExtentTree) -> Journal {
    let log = scan_shard(sb, 0, &mut &qp.durable()[..], &mut |_, _| {}).unwrap();
    let mut journal = Journal::new(*sb, 0, &log, &vec![0; sb.segment_count as usize]);
    let mut chunks = Vec::new();
    Metadata::new(*sb).checkpoint_onodes(CHECKPOINT_CHUNK_MAX_BYTES, &mut chunks);
    let mut write_out = tree.begin_write_out();
    journal.request_checkpoint(true);
    assert!(journal.wants_snapshot());
    journal.begin_checkpoint(chunks, true);
    assert!(journal.writing_tree());
    for _ in 0..10_000 {
        journal.retire(&mut |_| panic!("no client record"), &mut |_, _| {});
        let mut nodes = TreeNodes {
            tree,
            write_out: &mut write_out,
            nonce: sb.nonce(),
        };
        journal.advance_with(qp, &mut nodes, &mut |_, _| panic!("no client op"));
        qp.poll(64, &mut |tag, result| journal.complete_io(tag, result));
        if journal.checkpoint_idle() && journal.records_in_flight() == 0 {
            return journal;
        }
    }
    panic!("the checkpoint did not finish: {}", journal.debug_state());
}

#[test]
fn a_checkpoints_nodes_load_back_from_the_root_its_last_record_names() {
    let (sb, mut qp) = device();
    // ~20k entries: ~190 nodes, several records of `CHECKPOINT_NODE_BLOCKS_MAX` and a segment
    // switch in the middle of the nodes.
    let mut written = tree(20_000);
    let expected = entries(&written);
    let node_count = written.node_count();
    assert!(node_count > 2 * CHECKPOINT_NODE_BLOCKS_MAX && node_count as u64 * 4096 > SEGMENT);
    let journal = write_checkpoint(&sb, &mut qp, &mut written);
    assert_eq!(journal.checkpoint_node_blocks, node_count as u64);
    assert_eq!(written.dirty_count(), 0, "every node written");

    // The scan verifies every record, its node blocks by the data crc.
    let image = qp.durable().to_vec();
    let mut roots = Vec::new();
    let mut node_records = 0;
    let log = scan_shard(&sb, 0, &mut &image[..], &mut |record, deltas| {
        let flags = record.header.flags;
        assert_ne!(flags & RECORD_FLAG_CHECKPOINT, 0, "only checkpoint records");
        node_records += usize::from(record.header.data_blocks > 0);
        if record.header.data_blocks > 0 {
            assert_eq!(record.header.delta_count, 0, "node records carry no deltas");
        }
        for delta in DeltaReader::new(deltas) {
            if let Delta::TreeRoot {
                root,
                height,
                entries,
                generation,
            } = delta.unwrap()
            {
                assert_ne!(flags & RECORD_FLAG_CHECKPOINT_END, 0, "in the last record");
                roots.push(Delta::TreeRoot {
                    root,
                    height,
                    entries,
                    generation,
                });
            }
        }
    })
    .unwrap();
    assert!(node_records >= node_count.div_ceil(CHECKPOINT_NODE_BLOCKS_MAX));
    let [Delta::TreeRoot {
        root,
        height,
        entries: count,
        generation,
    }] = roots[..]
    else {
        panic!("one TreeRoot: {roots:?}");
    };
    assert_eq!(root, written.root_address());
    assert_eq!((height, count), (written.height(), expected.len() as u64));
    // The header published names the checkpoint's first record, whose number the nodes carry.
    assert_eq!(log.replay_start.0, generation);
    assert!(log.segments.len() >= 3, "the nodes spanned segments");

    let mut read = |address: u64, block: &mut [u8]| {
        block.copy_from_slice(&image[address as usize..][..block.len()]);
        Ok(())
    };
    let loaded = ExtentTree::load_written_by(root, sb.nonce(), generation, &mut read).unwrap();
    loaded.check().unwrap();
    // Nodes newer than the checkpoint that names them are refused.
    let newer = ExtentTree::load_written_by(root, sb.nonce(), generation - 1, &mut read);
    assert!(
        matches!(&newer, Err(e) if e.to_string().contains("is newer than")),
        "{:?}",
        newer.err()
    );
    assert_eq!(entries(&loaded), expected);
    assert_eq!(loaded.node_count(), node_count);

    // A flipped bit in a node is caught twice over: by the record's data crc (the scan ends
    // the log there) and by the node's own crc (`load`).
    let mut flipped = image.clone();
    flipped[root as usize + 100] ^= 1;
    let mut read_flipped = |address: u64, block: &mut [u8]| {
        block.copy_from_slice(&flipped[address as usize..][..block.len()]);
        Ok(())
    };
    assert!(ExtentTree::load(root, sb.nonce(), &mut read_flipped).is_err());
    let cut = scan_shard(&sb, 0, &mut &flipped[..], &mut |_, _| {}).unwrap();
    assert!(cut.records.len() < log.records.len());
}

#[test]
fn a_second_checkpoint_writes_only_the_changed_paths() {
    let (sb, mut qp) = device();
    let mut tree = tree(20_000);
    let first = write_checkpoint(&sb, &mut qp, &mut tree);
    let nodes_first = first.checkpoint_node_blocks;
    drop(first);
    let old_root = tree.root_address();
    assert!(
        tree.take_obsolete().is_empty(),
        "a first write-out replaces nothing"
    );
    // One entry changes: its leaf and the path above it.
    tree.insert(
        Key {
            object: 3,
            block: 100,
        },
        Value {
            physical: SEGMENTS_START_BYTES + 4096,
            crc: 1,
        },
    );
    let expected = entries(&tree);
    let second = write_checkpoint(&sb, &mut qp, &mut tree);
    assert_eq!(second.checkpoint_node_blocks, u64::from(tree.height()) + 1);
    assert!(second.checkpoint_node_blocks < nodes_first);
    let obsolete = tree.take_obsolete();
    assert_eq!(obsolete.len() as u64, second.checkpoint_node_blocks);
    assert!(obsolete.contains(&old_root));
    // The new root's tree shares the first checkpoint's untouched nodes, and loads whole.
    let image = qp.durable().to_vec();
    let mut read = |address: u64, block: &mut [u8]| {
        block.copy_from_slice(&image[address as usize..][..block.len()]);
        Ok(())
    };
    let loaded = ExtentTree::load(tree.root_address(), sb.nonce(), &mut read).unwrap();
    assert_eq!(entries(&loaded), expected);
}
