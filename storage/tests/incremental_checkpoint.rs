//! Checkpoints that write the extent tree's changed nodes (format 6), end to end on a store:
//! replay loads the tree from the newest named checkpoint and equals the running store; a
//! power cut anywhere in a checkpoint's writes mounts with every object intact (the old tree
//! or the new one, never a mix); a segment the cleaner emptied of data but which holds nodes
//! is freed only once the checkpoint that moved them is named, and its nodes stay readable
//! until then; the store picks the tree write for a hot set and the dump otherwise.

use carmine_storage::segment::journal::SegmentRole;
use carmine_storage::segment::mount::replay_from;
use carmine_storage::segment::{mkfs, CheckpointWrites, SegmentStore};
use carmine_storage::{
    MemFaults, MemQueuePair, ObjectStore, OutputBuffer, SubOp, SubOpResult, Submit, TearGranularity,
};

mod common;
use common::{run, settle, Store};

const SEGMENT: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// Cold objects and their blocks: written once, whole, so the dump encodes each in a few
/// extent deltas while the tree holds an entry per block.
const COLD_OBJECTS: usize = 160;
const COLD_BLOCKS: usize = 64;

fn mounted_store(megabytes: u64) -> Store {
    let mut qp = MemQueuePair::new(megabytes << 20, 64, MemFaults::default());
    mkfs(&mut qp, SEGMENT, 1, 0, *b"incremental-ckpt").expect("mkfs");
    let mut store = SegmentStore::mount(qp, 0).expect("mount");
    store.set_checkpoint_writes(CheckpointWrites::Cheaper);
    store
}

fn cold_oid(n: usize) -> Vec<u8> {
    format!("cold-object-{n:06}").into_bytes()
}

fn block_pattern(seed: usize, blocks: usize) -> Vec<u8> {
    (0..blocks * BLOCK)
        .map(|i| (i / BLOCK * 7 + seed * 13 + i % 251) as u8)
        .collect()
}

/// Cold objects, then overwrites of a hot object until `until` says stop (checked after every
/// overwrite). Returns the overwrites made.
fn hot_set(store: &mut Store, until: &mut dyn FnMut(&mut Store) -> bool) -> usize {
    for n in 0..COLD_OBJECTS {
        let data = block_pattern(n, COLD_BLOCKS);
        run(store, &cold_oid(n), &[SubOp::WriteFull { data: &data }]).unwrap();
    }
    for round in 0..20_000 {
        let data = block_pattern(round, 64);
        run(store, b"hot", &[SubOp::WriteFull { data: &data }]).unwrap();
        if until(store) {
            return round + 1;
        }
    }
    panic!("never stopped: {:?}", store.segment_stats());
}

/// Every object of `running` is in `image`'s replay, the same, its blocks' crcs right.
fn assert_replays_as(image: &[u8], running: &carmine_storage::segment::metadata::Metadata) {
    let mut reader: &[u8] = image;
    let replayed = replay_from(&mut reader, 0).expect("the image mounts");
    replayed.metadata.extent_tree().check().unwrap();
    assert!(
        replayed.metadata.same_as(running),
        "replay equals the running store"
    );
    for (oid, object) in replayed.metadata.objects() {
        for (_, block) in object.blocks.iter() {
            let bytes = &image[block.physical as usize..][..BLOCK];
            assert_eq!(
                carmine_crc::crc32c(bytes),
                block.crc,
                "{}",
                String::from_utf8_lossy(oid)
            );
        }
    }
    assert_eq!(
        replayed.metadata.recount_live_blocks(),
        replayed.metadata.live_block_counts(),
        "the replayed inventory counts every node and block"
    );
}

#[test]
fn replay_after_incremental_checkpoints_equals_the_running_store() {
    let mut store = mounted_store(160);
    hot_set(&mut store, &mut |store| {
        store.segment_stats().checkpoints_incremental >= 3
    });
    settle(&mut store);
    let stats = store.segment_stats();
    assert!(stats.checkpoint_node_blocks > 0);
    let image = store.queue_pair().durable().to_vec();
    let mut reader: &[u8] = &image;
    let replayed = replay_from(&mut reader, 0).expect("the image mounts");
    let nodes: u32 = (0..replayed.sb.segment_count)
        .map(|s| replayed.metadata.node_blocks(s))
        .sum();
    assert!(
        nodes > 0,
        "replay started at a checkpoint that wrote the tree"
    );
    assert_eq!(nodes as usize, replayed.metadata.extent_tree().node_count());
    assert_replays_as(&image, store.metadata());

    // The store mounted again goes on from the loaded tree: more overwrites, another
    // checkpoint, and a replay still equals it.
    drop(replayed);
    let qp = MemQueuePair::from_image(image, 64, MemFaults::default());
    let mut store = SegmentStore::mount(qp, 0).expect("mount");
    store.set_checkpoint_writes(CheckpointWrites::Cheaper);
    let before = store.segment_stats().checkpoints_incremental;
    for round in 0..20_000 {
        let data = block_pattern(round + 7, 64);
        run(&mut store, b"hot", &[SubOp::WriteFull { data: &data }]).unwrap();
        if store.segment_stats().checkpoints_incremental > before + 1 {
            break;
        }
    }
    settle(&mut store);
    let image = store.queue_pair().durable().to_vec();
    assert_replays_as(&image, store.metadata());
}

/// Drives a hot set until a tree-writing checkpoint has been named, then overwrites the hot
/// object poll by poll until the next one starts, and cuts the power `cut` polls later. Returns
/// whether the store was still busy (the checkpoint, or the op waiting behind it) at the cut.
fn cut_during_checkpoint(cut: usize) -> bool {
    let mut store = mounted_store(160);
    hot_set(&mut store, &mut |store| {
        store.segment_stats().checkpoints_incremental >= 2
    });
    settle(&mut store);
    let before = store.segment_stats().checkpoints_incremental;
    let mut results = [SubOpResult::default(); 1];
    let mut output = OutputBuffer::empty();
    'ops: for round in 0..20_000 {
        let data = block_pattern(round + 11, 64);
        let ops = [SubOp::WriteFull { data: &data }];
        if let Submit::Done = store
            .submit(1, b"hot", &ops, &mut output, &mut results)
            .unwrap()
        {
            continue;
        }
        let mut done = false;
        while !done {
            store.poll(16, &mut |_, result| {
                result.unwrap();
                done = true;
            });
            if store.segment_stats().checkpoints_incremental > before {
                break 'ops;
            }
        }
    }
    assert!(store.segment_stats().checkpoints_incremental > before);
    for _ in 0..cut {
        store.poll(16, &mut |_, result| result.map(|_| ()).unwrap());
    }
    let still_writing = store.busy();
    let image = store
        .queue_pair()
        .power_cut(TearGranularity::Sector512)
        .to_vec();
    // What was acknowledged is in the running store's metadata (applied when durable): the
    // image mounts to exactly that, from the old checkpoint's tree or the new one's.
    assert_replays_as(&image, store.metadata());
    still_writing
}

#[test]
fn a_power_cut_anywhere_in_a_tree_checkpoint_keeps_every_object() {
    let mut cuts = 0;
    for cut in 0.. {
        if !cut_during_checkpoint(cut) {
            break;
        }
        cuts += 1;
        assert!(cut < 10_000, "the checkpoint never finished");
    }
    assert!(cuts >= 3, "the checkpoint took several polls ({cuts})");
}

#[test]
fn a_segment_holding_nodes_is_freed_only_once_the_checkpoint_moving_them_is_named() {
    // Small enough that the cleaner runs: the cold objects take ~40 of ~63 segments.
    let mut store = mounted_store(64);
    // Until the cleaner has emptied a segment of data that still held nodes.
    let mut waited = None;
    hot_set(&mut store, &mut |store| {
        let nodes: Vec<u32> = (0..store.metadata().live_block_counts().len() as u32)
            .filter(|&s| {
                let md = store.metadata();
                store.segment_role(s) == SegmentRole::Data
                    && md.node_blocks(s) > 0
                    && md.live_blocks(s) == md.node_blocks(s)
            })
            .collect();
        let named = store.segment_stats().checkpoints;
        if let Some(&segment) = nodes.first() {
            waited = Some((segment, named));
            return true;
        }
        false
    });
    let (segment, _) = waited.expect("a segment held nodes only");
    let start = SEGMENT as usize + segment as usize * SEGMENT as usize;
    let nodes_before = store.metadata().node_blocks(segment);
    // A power cut now finds those nodes where the named checkpoint's tree expects them.
    {
        let image = store.queue_pair().durable().to_vec();
        assert_replays_as(&image, store.metadata());
    }
    // Overwrites go on until the segment is freed: its nodes were moved by a checkpoint, and
    // it is freed only after a durable header named that checkpoint.
    let mut freed = false;
    for round in 0..20_000 {
        let data = block_pattern(round + 3, 64);
        run(&mut store, b"hot", &[SubOp::WriteFull { data: &data }]).unwrap();
        let md = store.metadata();
        if md.node_blocks(segment) == 0 {
            freed = true;
            // Every replay from what is durable now loads a tree without the old nodes.
            let image = store.queue_pair().durable().to_vec();
            let mut reader: &[u8] = &image;
            let replayed = replay_from(&mut reader, 0).expect("mounts");
            let mut inside = 0;
            replayed
                .metadata
                .extent_tree()
                .for_each_node_address(&mut |a| {
                    inside += usize::from((start as u64..start as u64 + SEGMENT).contains(&a))
                });
            assert_eq!(
                inside, 0,
                "the named checkpoint's tree left segment {segment}"
            );
            break;
        }
        assert!(
            md.node_blocks(segment) <= nodes_before,
            "no new node goes into a data segment"
        );
    }
    assert!(freed, "the segment's nodes were never moved");
    settle(&mut store);
    let image = store.queue_pair().durable().to_vec();
    assert_replays_as(&image, store.metadata());
}

#[test]
fn the_dump_is_kept_under_uniform_overwrites() {
    let mut store = mounted_store(64);
    let objects = 48;
    for n in 0..objects {
        let data = block_pattern(n, 32);
        run(
            &mut store,
            &cold_oid(n),
            &[SubOp::WriteFull { data: &data }],
        )
        .unwrap();
    }
    // Eight blocks of every object per round, in a scattered order: every leaf changes
    // between checkpoints, and the dump (one extent delta per run of eight) is the cheaper
    // encoding. (Single-block overwrites scattered over a small tree would not be: a dump
    // spends ~40 bytes per lone block, a leaf ~30 per entry.)
    let one = block_pattern(99, 8);
    let mut round = 0;
    while store.segment_stats().checkpoints < 4 {
        for n in 0..objects {
            let offset = ((round * 7 + n * 13) % 4 * 8 * BLOCK) as u64;
            run(
                &mut store,
                &cold_oid((n * 5) % objects),
                &[SubOp::Write { offset, data: &one }],
            )
            .unwrap();
        }
        round += 1;
        assert!(round < 10_000);
    }
    let stats = store.segment_stats();
    assert_eq!(stats.checkpoints_incremental, 0, "{stats:?}");
    assert_eq!(stats.checkpoint_node_blocks, 0);
}

#[test]
fn fsck_names_a_flipped_bit_in_a_tree_node() {
    use carmine_storage::segment::{fsck_reader, Problem};
    let mut store = mounted_store(160);
    hot_set(&mut store, &mut |store| {
        store.segment_stats().checkpoints_incremental >= 3
    });
    settle(&mut store);
    let image = store.queue_pair().durable().to_vec();
    let path = std::path::Path::new("incremental.img");
    let report = fsck_reader(&mut &image[..], image.len() as u64, path).unwrap();
    assert!(report.is_clean(), "{:?}", report.shards[0].problems);

    let mut reader: &[u8] = &image;
    let replayed = replay_from(&mut reader, 0).expect("the image mounts");
    let data_segments: Vec<u32> = replayed
        .log
        .data_segments
        .iter()
        .map(|h| h.segment)
        .collect();
    let mut in_data = None;
    let mut in_log = None;
    replayed
        .metadata
        .extent_tree()
        .for_each_node_address(&mut |address| {
            let segment = ((address - SEGMENT) / SEGMENT) as u32;
            if data_segments.contains(&segment) {
                in_data.get_or_insert(address);
            } else if address > replayed.log.replay_start.1 {
                in_log.get_or_insert(address);
            }
        });
    // A node of an older checkpoint, in a data segment (no record crc covers it any more):
    // its own crc names it.
    let address = in_data.expect("a node of an older checkpoint in a data segment");
    let mut flipped = image.clone();
    flipped[address as usize + 1000] ^= 0x10;
    let report = fsck_reader(&mut &flipped[..], flipped.len() as u64, path).unwrap();
    assert!(
        matches!(&report.shards[0].problems[..], [Problem::Mount(reason)]
            if reason.contains(&format!("tree node at {address}"))),
        "{:?}",
        report.shards[0].problems
    );
    // A node in the named checkpoint's own records: the record's data crc fails, so the
    // checkpoint is missing (its first record) or the log ends inside it (a later one): damage
    // either way, not a torn tail.
    let address = in_log.expect("a node the named checkpoint wrote");
    let mut flipped = image.clone();
    flipped[address as usize + 1000] ^= 0x10;
    let report = fsck_reader(&mut &flipped[..], flipped.len() as u64, path).unwrap();
    assert!(
        report.shards[0]
            .problems
            .iter()
            .any(|p| matches!(p, Problem::Mount(reason) if reason.contains("checkpoint"))),
        "{:?}",
        report.shards[0].problems
    );
}

#[test]
fn a_hot_set_gets_tree_checkpoints_that_write_a_fraction_of_the_tree() {
    let mut store = mounted_store(160);
    hot_set(&mut store, &mut |store| {
        store.segment_stats().checkpoints >= 6
    });
    settle(&mut store);
    let first = store.segment_stats();
    let nodes = store.metadata().extent_tree().node_count() as u64;
    // The first checkpoints may dump (nothing changed yet says little; after a dump the first
    // tree write writes every node); from then on every one writes the tree.
    assert!(
        first.checkpoints_incremental + 2 >= first.checkpoints,
        "{first:?}"
    );
    // Three more: each writes the hot object's leaves and their paths, not the tree.
    hot_set_more(&mut store, first.checkpoints + 3);
    let stats = store.segment_stats().since(&first);
    assert_eq!(
        stats.checkpoints_incremental, stats.checkpoints,
        "{stats:?}"
    );
    assert!(
        stats.checkpoint_node_blocks * 4 < stats.checkpoints * nodes,
        "{} node blocks in {} checkpoints of a {nodes}-node tree",
        stats.checkpoint_node_blocks,
        stats.checkpoints
    );
}

fn hot_set_more(store: &mut Store, checkpoints: u64) {
    for round in 0..20_000 {
        let data = block_pattern(round + 5, 64);
        run(store, b"hot", &[SubOp::WriteFull { data: &data }]).unwrap();
        if store.segment_stats().checkpoints >= checkpoints {
            settle(store);
            return;
        }
    }
    panic!("checkpoints never came");
}
