//! `segment::fsck` on device images made by a real `SegmentStore` (on the `mem` queue pair,
//! then written to a file): a clean store is clean; flipped bits in data blocks, record deltas,
//! record data and superblocks are found and named, never a panic; torn tails after power cuts
//! are not problems.

use std::collections::BTreeMap;
use std::path::PathBuf;

use carmine_storage::segment::format::{
    RecordHeader, BLOCK_SIZE_BYTES, RECORD_FLAG_CHECKPOINT, RECORD_HEADER_SIZE_BYTES,
};
use carmine_storage::segment::mount::{replay_from, Mounted};
use carmine_storage::segment::scan::LogEnd;
use carmine_storage::segment::{fsck, mkfs, FsckError, FsckReport, Problem, SegmentStore};
use carmine_storage::{
    MemFaults, MemQueuePair, ObjectStore, OutputBuffer, StoreError, SubOp, SubOpResult, Submit,
    TearGranularity,
};

mod common;
use common::{settle, Store};

const SEGMENT: u64 = 1 << 20;
const BLOCK: usize = BLOCK_SIZE_BYTES as usize;

/// A directory under cargo's target tmp dir, removed when the test ends.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fsck-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir(path)
    }

    /// Writes `image` to a file in the directory and returns its path.
    fn image(&self, name: &str, image: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, image).unwrap();
        path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn device(megabytes: u64, faults: MemFaults) -> MemQueuePair {
    let mut qp = MemQueuePair::new(megabytes << 20, 64, faults);
    mkfs(&mut qp, SEGMENT, 1, 0, *b"fsck-test-uuid!!").expect("mkfs");
    qp
}

/// Runs one op to completion: each sub-op's status and output.
fn run(
    store: &mut Store,
    oid: &[u8],
    ops: &[SubOp<'_>],
) -> Result<Vec<(u16, Vec<u8>)>, StoreError> {
    let mut out = vec![0u8; 1 << 20];
    let mut results = [SubOpResult::default(); 16];
    let mut outcome = None;
    {
        // SAFETY: `out` outlives the op (polled to completion below) and is not touched until then.
        let mut output = unsafe { OutputBuffer::from_raw(out.as_mut_ptr(), out.len()) };
        match store.submit(7, oid, ops, &mut output, &mut results[..ops.len()])? {
            Submit::Done => outcome = Some(Ok(results[..ops.len()].to_vec())),
            Submit::Pending => {}
        }
    }
    for _ in 0..1_000_000 {
        if outcome.is_some() {
            break;
        }
        store.poll(16, &mut |tag, result| {
            assert_eq!(tag, 7);
            outcome = Some(result.map(|r| r.to_vec()));
        });
    }
    let results = outcome.expect("the op completes")?;
    Ok(results
        .iter()
        .map(|r| {
            let start = r.out_offset as usize;
            (r.status, out[start..start + r.out_len as usize].to_vec())
        })
        .collect())
}

/// Bytes that differ for every (object, round) and are never all zero.
fn pattern(len: usize, object: u64, round: u64) -> Vec<u8> {
    let mut state = (object << 32 | round).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) | 1
        })
        .collect()
}

/// A store image with history: cold objects written once, hot ones overwritten until the
/// journal has wrapped (checkpoints, data segments, cleaning), one truncated, two removed, and
/// what each surviving object holds.
struct Written {
    image: Vec<u8>,
    objects: BTreeMap<Vec<u8>, Vec<u8>>,
    checkpoints: u64,
}

fn write_history() -> Written {
    let mut store = SegmentStore::mount(device(16, MemFaults::default()), 0).expect("mount");
    let mut objects = BTreeMap::new();
    for cold in 0..4u64 {
        let oid = format!("cold-{cold}").into_bytes();
        let data = pattern(16 * BLOCK, cold, 0);
        run(&mut store, &oid, &[SubOp::WriteFull { data: &data }]).unwrap();
        run(
            &mut store,
            &oid,
            &[SubOp::SetXattr {
                name: b"kind",
                value: b"cold",
            }],
        )
        .unwrap();
        objects.insert(oid, data);
    }
    for round in 1..=30u64 {
        for hot in 0..6u64 {
            let oid = format!("hot-{hot}").into_bytes();
            let data = pattern(32 * BLOCK, 100 + hot, round);
            let outcome = run(&mut store, &oid, &[SubOp::WriteFull { data: &data }]).unwrap();
            assert_eq!(outcome[0].0, 0);
            objects.insert(oid, data);
        }
    }
    run(&mut store, b"hot-0", &[SubOp::Truncate { size: 10_000 }]).unwrap();
    objects.get_mut(&b"hot-0"[..]).unwrap().truncate(10_000);
    for removed in ["hot-4", "hot-5"] {
        run(&mut store, removed.as_bytes(), &[SubOp::Remove]).unwrap();
        objects.remove(removed.as_bytes());
    }
    settle(&mut store);
    let checkpoints = store.segment_stats().checkpoints;
    // Everything acknowledged is durable: the image a clean shutdown leaves.
    let image = store.queue_pair().durable().to_vec();
    Written {
        image,
        objects,
        checkpoints,
    }
}

fn replay(image: &[u8]) -> Mounted {
    let mut reader: &[u8] = image;
    replay_from(&mut reader, 0).expect("the image mounts")
}

fn check(dir: &TestDir, name: &str, image: &[u8]) -> FsckReport {
    fsck(&dir.image(name, image)).expect("fsck runs")
}

/// Every problem of the report, as text (for failure messages).
fn problems(report: &FsckReport) -> Vec<String> {
    report
        .problems
        .iter()
        .chain(report.shards.iter().flat_map(|s| &s.problems))
        .map(|p| p.to_string())
        .collect()
}

fn expected_blocks(objects: &BTreeMap<Vec<u8>, Vec<u8>>) -> u64 {
    objects
        .values()
        .map(|data| data.len().div_ceil(BLOCK) as u64)
        .sum()
}

#[test]
fn a_clean_store_is_clean_and_counted() {
    let dir = TestDir::new("clean");
    let written = write_history();
    assert!(
        written.checkpoints > 0,
        "the history must reach checkpoints"
    );
    let report = check(&dir, "clean.img", &written.image);
    assert!(report.is_clean(), "{:?}", problems(&report));
    assert_eq!(report.shards.len(), 1);
    let shard = &report.shards[0];
    assert_eq!(shard.objects, written.objects.len() as u64);
    assert_eq!(shard.objects, 8, "4 cold + 6 hot - 2 removed");
    assert_eq!(shard.live_blocks, expected_blocks(&written.objects));
    assert_eq!(shard.live_blocks, 4 * 16 + 3 + 3 * 32);
    assert_eq!(shard.bytes_verified, shard.live_blocks * BLOCK_SIZE_BYTES);
    let mounted = replay(&written.image);
    assert_eq!(shard.records, mounted.log.records.len() as u64);
    assert!(shard.records > 0);
    assert_ne!(shard.replay_start, (0, 0), "replay starts at a checkpoint");
    assert_eq!(
        shard.journal_segments + shard.data_segments + shard.free_segments,
        shard.segments
    );
    assert_eq!(shard.journal_segments as usize, mounted.log.segments.len());
    assert!(shard.journal_segments >= 1);
    assert!(matches!(shard.log_end, Some(LogEnd::Stop { .. })));
    assert!(shard.notes.is_empty(), "{:?}", shard.notes);
}

#[test]
fn a_flipped_bit_in_a_data_block_is_named_and_reads_fail() {
    let dir = TestDir::new("data-bit");
    let written = write_history();
    let mut image = written.image.clone();
    let Mounted { metadata, log, sb } = replay(&image);
    // A block of a data segment (before the replay start): replay does not read those records
    // again, so only the block's own crc in the metadata can catch the flip.
    let data_segments: Vec<u32> = log.data_segments.iter().map(|h| h.segment).collect();
    let (oid, index, block) = metadata
        .objects()
        .flat_map(|(oid, onode)| {
            onode
                .blocks
                .iter()
                .map(move |(index, block)| (oid.to_vec(), index, block))
        })
        .filter(|(_, _, block)| data_segments.contains(&sb.segment_at(block.physical).unwrap()))
        .min_by_key(|(_, _, block)| block.physical)
        .expect("some live block lies in a data segment");
    image[block.physical as usize + 100] ^= 1 << 3;
    let found = crc32c::crc32c(&image[block.physical as usize..][..BLOCK]);

    let report = check(&dir, "data-bit.img", &image);
    assert_eq!(
        report.shards[0].problems,
        vec![Problem::Checksum {
            oid: oid.clone(),
            index,
            physical: block.physical,
            segment: sb.segment_at(block.physical).unwrap(),
            expected: block.crc,
            found,
        }],
        "{:?}",
        problems(&report)
    );
    assert!(report.problems.is_empty());
    let text = report.shards[0].problems[0].to_string();
    assert!(
        text.contains(&format!("block {index}")) && text.contains(&block.physical.to_string()),
        "{text}"
    );

    // The store itself: the bad block is an I/O error, never wrong bytes; the rest reads fine.
    let qp = MemQueuePair::from_image(image, 64, MemFaults::default());
    let mut store = SegmentStore::mount(qp, 0).expect("a flipped data bit does not stop mount");
    let bad = run(
        &mut store,
        &oid,
        &[SubOp::Read {
            offset: index * BLOCK_SIZE_BYTES,
            length: BLOCK_SIZE_BYTES,
        }],
    )
    .unwrap();
    assert_eq!(bad[0], (StoreError::Io.code(), Vec::new()));
    for (name, data) in &written.objects {
        for (block_index, expected) in data.chunks(BLOCK).enumerate() {
            if *name == oid && block_index as u64 == index {
                continue;
            }
            let outcome = run(
                &mut store,
                name,
                &[SubOp::Read {
                    offset: (block_index * BLOCK) as u64,
                    length: expected.len() as u64,
                }],
            )
            .unwrap();
            assert_eq!(
                outcome[0],
                (0, expected.to_vec()),
                "object {:?} block {block_index}",
                String::from_utf8_lossy(name)
            );
        }
    }
    assert_eq!(store.segment_stats().checksum_errors, 1);
}

/// A record of the replayed log, not the last, whose successor is a client record too (a
/// checkpoint record after the end is excused, see `fsck::check_after_end`).
fn middle_record(log: &carmine_storage::segment::scan::ShardLog, with_data: bool) -> usize {
    let records = &log.records;
    let client = |i: usize| records[i].header.flags & RECORD_FLAG_CHECKPOINT == 0;
    (records.len() / 3..records.len() - 1)
        .find(|&i| {
            client(i)
                && client(i + 1)
                && records[i].header.metadata_len > 0
                && (!with_data || records[i].header.data_blocks > 0)
        })
        .expect("a client record in the middle of the log")
}

#[test]
fn a_flipped_bit_in_a_middle_records_deltas_is_damage() {
    let dir = TestDir::new("delta-bit");
    let written = write_history();
    let mut image = written.image.clone();
    let log = replay(&image).log;
    let victim = middle_record(&log, false);
    let record = log.records[victim];
    let at =
        record.offset as usize + RECORD_HEADER_SIZE_BYTES + record.header.metadata_len as usize / 2;
    image[at] ^= 1 << 5;

    let report = check(&dir, "delta-bit.img", &image);
    assert!(!report.is_clean());
    let shard = &report.shards[0];
    assert_eq!(
        shard.records, victim as u64,
        "replay stops at the damaged record"
    );
    // The log ends there, or (when the record was its segment's last) where the next segment
    // fails to continue it; either way the damaged record is described.
    let detail = shard
        .log_end_detail
        .as_deref()
        .expect("the damaged record is described");
    assert!(
        detail.contains(&format!(
            "record {} at offset {}",
            record.header.record_seq, record.offset
        )) && detail.contains("head (header and deltas) fails its crc"),
        "{detail}"
    );
    let after_end: Vec<&Problem> = shard
        .problems
        .iter()
        .filter(|p| matches!(p, Problem::RecordsAfterEnd { .. }))
        .collect();
    assert!(!after_end.is_empty(), "{:?}", problems(&report));
    let next = log.records[victim + 1];
    assert!(
        shard.problems.iter().any(|p| matches!(p,
            Problem::RecordsAfterEnd { offset, record_seq, .. }
                if *offset == next.offset && *record_seq == next.header.record_seq)),
        "the record right after the damage is named: {:?}",
        problems(&report)
    );
    assert!(after_end[0].to_string().contains("damaged in the middle"));

    // Mounting the damaged image must not panic either (it may refuse, or replay the prefix).
    let qp = MemQueuePair::from_image(image, 64, MemFaults::default());
    let _ = SegmentStore::mount(qp, 0);
}

#[test]
fn a_flipped_bit_in_a_middle_records_data_is_damage_and_named() {
    let dir = TestDir::new("record-data-bit");
    let written = write_history();
    let mut image = written.image.clone();
    let log = replay(&image).log;
    let victim = middle_record(&log, true);
    let record = log.records[victim];
    let data_start = record.offset + u64::from(record.header.head_blocks()) * BLOCK_SIZE_BYTES;
    image[data_start as usize + 7] ^= 1;

    let report = check(&dir, "record-data-bit.img", &image);
    assert!(!report.is_clean());
    let shard = &report.shards[0];
    assert_eq!(shard.records, victim as u64);
    assert!(
        shard
            .problems
            .iter()
            .any(|p| matches!(p, Problem::RecordsAfterEnd { .. })),
        "{:?}",
        problems(&report)
    );
    let detail = shard
        .log_end_detail
        .as_deref()
        .expect("the end record's head is intact");
    assert!(
        detail.contains(&format!("at offset {data_start}")) && detail.contains("object \"hot-"),
        "{detail}"
    );
}

#[test]
fn a_torn_last_record_is_information_not_a_problem() {
    let dir = TestDir::new("torn-last");
    let written = write_history();
    let mut image = written.image.clone();
    let log = replay(&image).log;
    let last = *log.records.last().unwrap();
    // As a crash mid-write leaves it: the record's first 512-byte sector never arrived.
    image[last.offset as usize..][..512].fill(0);
    let report = check(&dir, "torn.img", &image);
    assert!(report.is_clean(), "{:?}", problems(&report));
    let shard = &report.shards[0];
    assert_eq!(shard.records, log.records.len() as u64 - 1);
    assert!(
        matches!(&shard.log_end, Some(LogEnd::Stop { offset, .. }) if *offset == last.offset),
        "{:?}",
        shard.log_end
    );
}

#[test]
fn superblock_damage_is_reported_or_refused_without_panic() {
    let dir = TestDir::new("superblock");
    let written = write_history();

    // One copy damaged: the other still serves, and the lost redundancy is a problem.
    let mut one = written.image.clone();
    one[40] ^= 0x10;
    let report = check(&dir, "one-copy.img", &one);
    assert_eq!(report.problems.len(), 1, "{:?}", problems(&report));
    assert!(matches!(
        report.problems[0],
        Problem::SuperblockCopy { offset: 0, .. }
    ));
    assert!(report.shards[0].problems.is_empty());
    assert_eq!(report.shards[0].objects, written.objects.len() as u64);

    // Both copies garbage: not a Carmine device, an error rather than a report.
    let mut garbage = written.image.clone();
    for (i, byte) in garbage[..2 * BLOCK].iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    let error = fsck(&dir.image("garbage.img", &garbage)).unwrap_err();
    assert!(matches!(error, FsckError::NotFormatted(_)), "{error}");
    assert!(error.to_string().contains("not a Carmine"), "{error}");

    // A file too small for a superblock, and one that is not there.
    let error = fsck(&dir.image("tiny.img", b"hello")).unwrap_err();
    assert!(matches!(error, FsckError::NotFormatted(_)), "{error}");
    let error = fsck(&dir.0.join("missing.img")).unwrap_err();
    assert!(matches!(error, FsckError::Io(_)), "{error}");

    // A truncated image: the missing segments are named, the shard's log does not read.
    let truncated = &written.image[..written.image.len() / 2];
    let report = check(&dir, "truncated.img", truncated);
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::DeviceTooSmall { .. })),
        "{:?}",
        problems(&report)
    );
    assert!(!report.is_clean());
}

#[test]
fn damaged_segment_headers_are_damage() {
    let dir = TestDir::new("segment-header");
    let written = write_history();
    let Mounted {
        log, sb, metadata, ..
    } = replay(&written.image);

    // A data segment holding live blocks: they would be handed out as free space.
    let data = log
        .data_segments
        .iter()
        .find(|h| metadata.live_blocks(h.segment) > 0)
        .expect("a data segment with live blocks");
    let mut image = written.image.clone();
    image[sb.segment_offset(data.segment) as usize + 33] ^= 4;
    let report = check(&dir, "data-header.img", &image);
    assert!(
        matches!(&report.shards[0].problems[..], [Problem::Mount(reason)]
            if reason.contains(&format!("segment {}", data.segment)) && reason.contains("no valid header")),
        "{:?}",
        problems(&report)
    );

    // A journal segment after the first: the log stops before it, its records are not replayed.
    assert!(
        log.segments.len() >= 2,
        "{} journal segments",
        log.segments.len()
    );
    let journal = log.segments[1];
    let mut image = written.image.clone();
    image[sb.segment_offset(journal.segment) as usize + 33] ^= 4;
    let report = check(&dir, "journal-header.img", &image);
    assert!(!report.is_clean(), "{:?}", report.shards[0]);
    assert!(
        report.shards[0].problems.iter().any(|p| matches!(
            p,
            Problem::Mount(_)
                | Problem::RecordsAfterEnd {
                    header_valid: false,
                    ..
                }
        )),
        "{:?}",
        problems(&report)
    );
}

/// Seeded power cuts under pipelined writes, truncates and removes with the cleaner and
/// checkpoints at work: the image a crash leaves is clean (a torn tail is not a problem), and
/// fsck counts what a remount finds.
#[test]
fn images_left_by_power_cuts_are_clean() {
    let dir = TestDir::new("power-cuts");
    let mut notes = 0;
    let mut checkpoints = 0;
    for seed in 0..40u64 {
        let faults = MemFaults {
            seed,
            latency_polls: (0, 3),
            reorder: true,
            ..MemFaults::default()
        };
        let mut store = SegmentStore::mount(device(12, faults), 0).expect("mount");
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let rounds = 200 + next(600);
        let mut tag = 0u64;
        for _ in 0..rounds {
            for _ in 0..next(4) {
                let oid = format!("o{}", next(10)).into_bytes();
                let data = pattern(BLOCK * (1 + next(16) as usize), seed, tag);
                let ops = match next(30) {
                    0 => vec![SubOp::Remove],
                    1 => vec![SubOp::Truncate {
                        size: next(200_000),
                    }],
                    _ => vec![SubOp::Write {
                        offset: next(48) * BLOCK_SIZE_BYTES + next(2) * 100,
                        data: &data,
                    }],
                };
                let mut results = [SubOpResult::default(); 1];
                let mut out = OutputBuffer::empty();
                let _ = store.submit(tag, &oid, &ops, &mut out, &mut results);
                tag += 1;
            }
            store.poll(1024, &mut |_, _| {});
        }
        checkpoints += store.segment_stats().checkpoints;
        let granularity = if seed % 2 == 0 {
            TearGranularity::Sector512
        } else {
            TearGranularity::Block4K
        };
        let image = store.queue_pair().power_cut(granularity);
        let report = check(&dir, &format!("cut-{seed}.img"), &image);
        assert!(
            report.is_clean(),
            "seed {seed}: {:?} (log end: {})",
            problems(&report),
            report.shards[0].log_end_text()
        );
        notes += report.shards[0].notes.len();
        let remounted =
            SegmentStore::mount(MemQueuePair::from_image(image, 64, MemFaults::default()), 0)
                .unwrap_or_else(|e| panic!("seed {seed}: remount failed: {e}"));
        assert_eq!(
            report.shards[0].objects,
            remounted.metadata().object_count() as u64,
            "seed {seed}"
        );
    }
    assert!(checkpoints > 0, "the workload never checkpointed");
    // Not asserted: how often a cut leaves checkpoint records after the end (seed-dependent).
    let _ = notes;
}

/// The record header fsck reads at the log's end decodes from the image (a guard that the
/// tests above flip bits where they mean to).
#[test]
fn record_offsets_point_at_record_headers() {
    let written = write_history();
    let Mounted { log, sb, .. } = replay(&written.image);
    for record in &log.records {
        let header = RecordHeader::decode(
            &written.image[record.offset as usize..][..BLOCK],
            sb.nonce(),
        )
        .unwrap();
        assert_eq!(header, record.header);
    }
}

/// How a random flip ended.
#[derive(Default, Debug)]
struct FlipTally {
    /// fsck reported damage (or could not read the device as Carmine's).
    fsck_found: u64,
    /// fsck clean, and every object still reads back exactly: the flip hit dead bytes.
    harmless: u64,
    /// Mount refused the image.
    mount_refused: u64,
    /// Reads that returned an error instead of bytes (after fsck found the damage).
    read_errors: u64,
}

/// Bit rot at random: one bit flipped anywhere a store once wrote (superblocks, segment
/// headers, record heads and deltas, data blocks, live or dead), `CARMINE_BITROT_FLIPS` times
/// (default 150). Each flip must be reported by fsck, or be harmless (every object reads back
/// exactly); and whatever fsck says, mount and reads never panic and never return wrong bytes:
/// a read gives the right data or an error.
#[test]
fn random_flips_are_found_by_fsck_or_harmless_and_never_read_back_wrong() {
    let flips: u64 = std::env::var("CARMINE_BITROT_FLIPS")
        .ok()
        .map_or(150, |text| {
            text.parse().expect("CARMINE_BITROT_FLIPS: a number")
        });
    let dir = TestDir::new("random-flips");
    let written = write_history();
    let path = dir.image("rot.img", &written.image);
    let written_blocks: Vec<usize> = written
        .image
        .chunks(BLOCK)
        .enumerate()
        .filter(|(_, block)| block.iter().any(|b| *b != 0))
        .map(|(index, _)| index)
        .collect();
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut tally = FlipTally::default();
    for flip in 0..flips {
        let block = written_blocks[(next() % written_blocks.len() as u64) as usize];
        let at = block * BLOCK + (next() % BLOCK as u64) as usize;
        let bit = 1u8 << (next() % 8);
        let mut image = written.image.clone();
        image[at] ^= bit;
        std::fs::write(&path, &image).unwrap();
        let verdict = fsck(&path);
        let found = match &verdict {
            Ok(report) => !report.is_clean(),
            Err(_) => true,
        };
        let said = match &verdict {
            Ok(report) => format!(
                "{:?} end {:?}",
                problems(report),
                report.shards[0].log_end_detail
            ),
            Err(error) => error.to_string(),
        };
        tally.fsck_found += u64::from(found);
        let what = format!("flip {flip}: byte {at} bit {bit:#04x} (block {block})");
        let qp = MemQueuePair::from_image(image, 64, MemFaults::default());
        let Ok(mut store) = SegmentStore::mount(qp, 0) else {
            assert!(found, "{what}: mount refused an image fsck calls clean");
            tally.mount_refused += 1;
            continue;
        };
        let mut intact = true;
        for (name, data) in &written.objects {
            let outcome = run(
                &mut store,
                name,
                &[SubOp::Read {
                    offset: 0,
                    length: data.len() as u64,
                }],
            );
            match outcome {
                Ok(results) if results[0] == (0, data.clone()) => {}
                Ok(results) if results[0].0 != 0 => {
                    intact = false;
                    tally.read_errors += 1;
                }
                Err(_) => {
                    intact = false;
                    tally.read_errors += 1;
                }
                Ok(results) => panic!(
                    "{what}: object {:?} read back {} wrong bytes without an error (fsck: {said})",
                    String::from_utf8_lossy(name),
                    results[0].1.len()
                ),
            }
        }
        if !found {
            assert!(intact, "{what}: fsck calls the image clean but reads fail");
            tally.harmless += 1;
        }
    }
    eprintln!("{flips} random flips: {tally:?}");
    assert_eq!(tally.fsck_found + tally.harmless, flips);
    assert!(tally.fsck_found > 0, "some flips hit live bytes: {tally:?}");
}
