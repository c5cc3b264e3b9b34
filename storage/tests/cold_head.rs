//! The cleaner's own log head (format 7): its copies go to cold segments, apart from client
//! writes. End to end on a store: cold segments hold only what the cleaner moved, and a
//! client write never lands in one; a hot set after a uniform phase moves fewer blocks than
//! with the copies beside client writes (the reason for the head); a power cut at every poll
//! while copies go cold keeps every acknowledged write, and fsck finds the images clean.

use std::path::Path;

use carmine_storage::segment::format::SegmentHeader;
use carmine_storage::segment::metadata::Metadata;
use carmine_storage::segment::mount::replay_from;
use carmine_storage::segment::scan::read_segment_headers;
use carmine_storage::segment::{fsck_reader, mkfs, SegmentStats, SegmentStore};
use carmine_storage::{
    MemFaults, MemQueuePair, ObjectStore, OutputBuffer, SubOp, SubOpResult, Submit, TearGranularity,
};

mod common;
use common::{run, settle, Store};

const SEGMENT: u64 = 1 << 20;
const BLOCK: usize = 4096;
const OBJECTS: usize = 256;
const OBJECT_BLOCKS: usize = 16;

fn mounted_store(megabytes: u64, faults: MemFaults) -> Store {
    let mut qp = MemQueuePair::new(megabytes << 20, 64, faults);
    mkfs(&mut qp, SEGMENT, 1, 40, *b"cold-head-tests!").expect("mkfs");
    SegmentStore::mount(qp, 0).expect("mount")
}

fn oid(n: usize) -> Vec<u8> {
    format!("object-{n:04}").into_bytes()
}

/// A block's bytes, distinct per (object, block, generation).
fn block_bytes(object: usize, block: u64, generation: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i as u64 * 7 + object as u64 * 31 + block * 13 + generation * 101) as u8)
        .collect()
}

/// xorshift: the tests' overwrites are the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Every object written whole, then `overwrites` random 4 KiB overwrites of objects below
/// `objects` (all of them: uniform; a few: a hot set), one op at a time.
fn fill(store: &mut Store) {
    for n in 0..OBJECTS {
        let data: Vec<u8> = (0..OBJECT_BLOCKS as u64)
            .flat_map(|b| block_bytes(n, b, 0))
            .collect();
        run(store, &oid(n), &[SubOp::WriteFull { data: &data }]).unwrap();
    }
}

/// Generation of each block's bytes (`block_bytes`), per object.
type Model = Vec<[u64; OBJECT_BLOCKS]>;

fn overwrite(
    store: &mut Store,
    rng: &mut Rng,
    objects: usize,
    overwrites: usize,
    model: &mut Model,
) {
    for _ in 0..overwrites {
        let object = rng.below(objects as u64) as usize;
        let block = rng.below(OBJECT_BLOCKS as u64);
        let generation = model[object][block as usize] + 1;
        let data = block_bytes(object, block, generation);
        let ops = [SubOp::Write {
            offset: block * BLOCK as u64,
            data: &data,
        }];
        run(store, &oid(object), &ops).unwrap();
        model[object][block as usize] = generation;
    }
}

fn cold_segments(image: &[u8], store: &Store) -> Vec<SegmentHeader> {
    let mut reader: &[u8] = image;
    read_segment_headers(store.superblock(), 0, &mut reader)
        .unwrap()
        .into_iter()
        .filter(|h| h.cold)
        .collect()
}

/// The image replays to exactly `running`, every block's bytes match its crc, and fsck finds
/// nothing wrong.
fn assert_image_holds(image: &[u8], running: &Metadata) {
    let mut reader: &[u8] = image;
    let replayed = replay_from(&mut reader, 0).expect("the image mounts");
    assert!(
        replayed.metadata.same_as(running),
        "replay equals the running store"
    );
    for (oid, object) in replayed.metadata.objects() {
        for (index, block) in object.blocks.iter() {
            assert_eq!(
                carmine_crc::crc32c(&image[block.physical as usize..][..BLOCK]),
                block.crc,
                "{} block {index}",
                String::from_utf8_lossy(oid)
            );
        }
    }
    let mut reader: &[u8] = image;
    let report = fsck_reader(&mut reader, image.len() as u64, Path::new("image")).unwrap();
    assert!(report.is_clean(), "fsck: {report:?}");
}

#[test]
fn copies_gather_in_cold_segments_apart_from_client_writes() {
    let mut store = mounted_store(40, MemFaults::default());
    fill(&mut store);
    overwrite(
        &mut store,
        &mut Rng(0x9e37_79b9_7f4a_7c15),
        OBJECTS,
        12_000,
        &mut vec![[0; OBJECT_BLOCKS]; OBJECTS],
    );
    settle(&mut store);
    let stats = store.segment_stats();
    assert!(stats.blocks_moved_cold > 0, "no copy went cold: {stats:?}");
    let image = store.queue_pair().durable().to_vec();
    let cold = cold_segments(&image, &store);
    assert!(!cold.is_empty());
    let in_cold: u64 = cold
        .iter()
        .map(|h| u64::from(store.metadata().live_blocks(h.segment)))
        .sum();
    assert!(in_cold > 0, "the copies died already?");
    // A cold segment holds nothing but copies: fewer live blocks than were ever moved there
    // (some died since), and no tree node (checkpoints go to the clients' head).
    assert!(
        in_cold <= stats.blocks_moved_cold,
        "{in_cold} live blocks in cold segments, {} moved there",
        stats.blocks_moved_cold
    );
    for h in &cold {
        assert_eq!(store.metadata().node_blocks(h.segment), 0);
    }
    // A client write never lands in one.
    let fresh: Vec<u8> = (0..8u64).flat_map(|b| block_bytes(9999, b, 0)).collect();
    run(&mut store, b"fresh", &[SubOp::WriteFull { data: &fresh }]).unwrap();
    let object = store.metadata().object(b"fresh").unwrap();
    for (_, block) in object.blocks.iter() {
        let segment = store.superblock().segment_at(block.physical).unwrap();
        assert!(cold.iter().all(|h| h.segment != segment));
    }
    settle(&mut store);
    let image = store.queue_pair().durable().to_vec();
    assert_image_holds(&image, store.metadata());
}

/// Blocks the cleaner moved per client write while only a few objects are overwritten, after
/// every object was overwritten uniformly.
fn hot_after_uniform(cold_head: bool) -> (f64, SegmentStats) {
    let mut store = mounted_store(40, MemFaults::default());
    store.set_cold_head(cold_head);
    fill(&mut store);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut model = vec![[0; OBJECT_BLOCKS]; OBJECTS];
    overwrite(&mut store, &mut rng, OBJECTS, 12_000, &mut model);
    let before = store.segment_stats();
    let writes = 24_000;
    overwrite(&mut store, &mut rng, OBJECTS / 20, writes, &mut model);
    settle(&mut store);
    let stats = store.segment_stats().since(&before);
    let image = store.queue_pair().durable().to_vec();
    assert_image_holds(&image, store.metadata());
    (stats.blocks_moved as f64 / writes as f64, stats)
}

#[test]
fn a_hot_set_after_a_uniform_phase_moves_fewer_blocks_with_the_cold_head() {
    let (mixed, mixed_stats) = hot_after_uniform(false);
    let (cold, cold_stats) = hot_after_uniform(true);
    eprintln!("moved per client write in the hot phase: copies beside client writes {mixed:.3}, in cold segments {cold:.3}; WA {:.3} / {:.3}", mixed_stats.write_amplification(), cold_stats.write_amplification());
    assert_eq!(mixed_stats.blocks_moved_cold, 0);
    assert!(cold_stats.blocks_moved_cold > 0);
    assert!(
        mixed > 0.1,
        "the hot set did not make the cleaner move cold blocks again: {mixed_stats:?}"
    );
    assert!(
        cold < mixed / 2.0,
        "the cold head should at least halve the moves: {cold:.3} against {mixed:.3}"
    );
}

/// From `image` (a store in the middle of cleaning, holding `model`), overwrites with several
/// ops in flight (one per object), polled `cut` times, then a power cut. The image left must
/// hold every acknowledged write: each block as last acknowledged, or as the write to it
/// still unanswered at the cut (its record may be durable with its completion not yet taken).
/// Returns whether a record with a cold run was in flight at the cut.
fn cut_while_copying(image: &[u8], model: &Model, cut: usize, seed: u64) -> bool {
    let qp = MemQueuePair::from_image(
        image.to_vec(),
        64,
        MemFaults {
            seed,
            latency_polls: (0, 4),
            reorder: true,
            ..MemFaults::default()
        },
    );
    let mut store = SegmentStore::mount(qp, 0).expect("mount");
    let mut rng = Rng(seed | 1);
    let mut acked = model.clone();
    // Per object, the write not answered yet: (block, generation).
    let mut in_flight: Vec<Option<(usize, u64)>> = vec![None; OBJECTS];
    let mut cold_in_flight = false;
    for _ in 0..cut {
        for _ in 0..4 {
            let object = rng.below(OBJECTS as u64) as usize;
            if in_flight[object].is_some() {
                continue;
            }
            let block = rng.below(OBJECT_BLOCKS as u64);
            let generation = acked[object][block as usize] + 1;
            let data = block_bytes(object, block, generation);
            let ops = [SubOp::Write {
                offset: block * BLOCK as u64,
                data: &data,
            }];
            let mut results = [SubOpResult::default(); 1];
            let mut output = OutputBuffer::empty();
            match store
                .submit(object as u64, &oid(object), &ops, &mut output, &mut results)
                .unwrap()
            {
                Submit::Done => acked[object][block as usize] = generation,
                Submit::Pending => in_flight[object] = Some((block as usize, generation)),
            }
        }
        store.poll(16, &mut |tag, result| {
            result.unwrap();
            let (block, generation) = in_flight[tag as usize].take().expect("a write was out");
            acked[tag as usize][block] = generation;
        });
        cold_in_flight = store.cold_run_in_flight();
    }
    let image = store.queue_pair().power_cut(TearGranularity::Sector512);
    let mut reader: &[u8] = &image;
    let replayed = replay_from(&mut reader, 0).expect("the image mounts");
    for (object, blocks) in acked.iter().enumerate() {
        let onode = replayed
            .metadata
            .object(&oid(object))
            .expect("every object");
        for (index, &generation) in blocks.iter().enumerate() {
            let block = onode.blocks.get(index as u64).expect("every block mapped");
            let bytes = &image[block.physical as usize..][..BLOCK];
            let unanswered = in_flight[object]
                .filter(|&(b, _)| b == index)
                .map(|(_, g)| g);
            assert!(
                bytes == block_bytes(object, index as u64, generation)
                    || unanswered.is_some_and(|g| bytes == block_bytes(object, index as u64, g)),
                "cut {cut} seed {seed}: object {object} block {index} lost generation {generation}"
            );
        }
    }
    let mut reader: &[u8] = &image;
    let report = fsck_reader(&mut reader, image.len() as u64, Path::new("image")).unwrap();
    assert!(report.is_clean(), "cut {cut} seed {seed}: fsck: {report:?}");
    cold_in_flight
}

#[test]
fn a_power_cut_while_copies_go_cold_keeps_every_acknowledged_write() {
    let mut store = mounted_store(40, MemFaults::default());
    fill(&mut store);
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    let mut model = vec![[0; OBJECT_BLOCKS]; OBJECTS];
    // Until the cleaner is copying to its cold head, and a little more.
    for _ in 0..200 {
        overwrite(&mut store, &mut rng, OBJECTS, 100, &mut model);
        if store.segment_stats().blocks_moved_cold > 500 {
            break;
        }
    }
    assert!(store.segment_stats().blocks_moved_cold > 500);
    settle(&mut store);
    let image = store.queue_pair().durable().to_vec();
    let mut cold_cuts = 0;
    for cut in 0..80 {
        cold_cuts += usize::from(cut_while_copying(&image, &model, 20 + cut * 3, cut as u64));
    }
    assert!(
        cold_cuts >= 5,
        "only {cold_cuts} of 80 cuts met a cold run in flight"
    );
}
