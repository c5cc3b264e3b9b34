//! The spare (`mkfs` with `spare_percent`): clients may map at most the usable blocks, the
//! store says NoSpace exactly there and nowhere earlier, overwrites at that limit keep working
//! (the cleaner has the spare to work in), removes give room back, and nothing acknowledged is
//! damaged along the way.

use carmine_storage::segment::format::BLOCK_SIZE_BYTES;
use carmine_storage::segment::fsck::fsck_reader;
use carmine_storage::segment::{mkfs, SegmentStore};
use carmine_storage::{
    MemFaults, MemQueuePair, ObjectStore, OutputBuffer, StoreError, SubOp, SubOpResult, Submit,
};

const SEGMENT: u64 = 2 << 20;
const SPARE_PERCENT: u32 = 25;
const OBJECT_BYTES: usize = 64 << 10;

type Store = SegmentStore<MemQueuePair>;

fn store(megabytes: u64) -> Store {
    let mut qp = MemQueuePair::new(megabytes << 20, 64, MemFaults::default());
    mkfs(&mut qp, SEGMENT, 1, SPARE_PERCENT, *b"spare-test-uuid!").expect("mkfs");
    SegmentStore::mount(qp, 0).expect("mount")
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) as u8)
        .collect()
}

/// Submits every op (one sub-op list per object) before polling, then polls until all are
/// done: each op's error, or its sub-ops' statuses and outputs.
fn run_batch(
    store: &mut Store,
    batch: &[(Vec<u8>, Vec<SubOp<'_>>)],
) -> Vec<Result<Vec<u8>, StoreError>> {
    let mut outs: Vec<Vec<u8>> = batch.iter().map(|_| vec![0u8; OBJECT_BYTES]).collect();
    let mut outcomes: Vec<Option<Result<Vec<u8>, StoreError>>> = vec![None; batch.len()];
    for (tag, ((oid, ops), out)) in batch.iter().zip(outs.iter_mut()).enumerate() {
        let mut results = [SubOpResult::default(); 8];
        // SAFETY: `out` is neither moved nor touched until the op completes below (`outs` is
        // not resized while ops are in flight).
        let mut output = unsafe { OutputBuffer::from_raw(out.as_mut_ptr(), out.len()) };
        match store.submit(tag as u64, oid, ops, &mut output, &mut results[..ops.len()]) {
            Ok(Submit::Done) => outcomes[tag] = Some(Ok(Vec::new())),
            Ok(Submit::Pending) => {}
            Err(error) => outcomes[tag] = Some(Err(error)),
        }
    }
    let mut finished = Vec::new();
    for _ in 0..1_000_000 {
        if outcomes.iter().all(Option::is_some) {
            break;
        }
        store.poll(1024, &mut |tag, result| {
            let statuses_ok = result.map(|r| r.iter().all(|r| r.status == 0));
            finished.push((
                tag,
                statuses_ok,
                result.map(|r| r.first().map(|r| r.out_len)),
            ));
        });
        for (tag, ok, len) in finished.drain(..) {
            let tag = tag as usize;
            assert!(outcomes[tag].is_none(), "op {tag} completed twice");
            outcomes[tag] = Some(match (ok, len) {
                (Ok(true), Ok(len)) => Ok(outs[tag][..len.unwrap_or(0) as usize].to_vec()),
                (Ok(false), _) => Err(StoreError::InvalidArgument),
                (Err(error), _) | (_, Err(error)) => Err(error),
            });
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.expect("every op completes (a stall would leave one pending)"))
        .collect()
}

fn write_full(store: &mut Store, oid: &str, data: &[u8]) -> Result<Vec<u8>, StoreError> {
    run_batch(
        store,
        &[(oid.as_bytes().to_vec(), vec![SubOp::WriteFull { data }])],
    )
    .remove(0)
}

fn read(store: &mut Store, oid: &str, length: usize) -> Vec<u8> {
    run_batch(
        store,
        &[(
            oid.as_bytes().to_vec(),
            vec![SubOp::Read {
                offset: 0,
                length: length as u64,
            }],
        )],
    )
    .remove(0)
    .unwrap_or_else(|error| panic!("read of {oid}: {error:?}"))
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Fills a 64 MiB shard (31 segments of 2 MiB) with 25% spare to its usable limit, then
/// overwrites at random, removes and remounts. (With 1 MiB segments the same spare is too
/// little: the reserve and the journal take whole segments, and the rest of the dead space
/// spreads so thin that no segment has the dead blocks a victim needs; overwrites then get
/// NoSpace, as they did before spares existed.)
#[test]
fn no_space_at_the_usable_limit_and_the_cleaner_keeps_working_there() {
    let mut store = store(64);
    let stats = store.segment_stats();
    let data_blocks = 31 * (SEGMENT / BLOCK_SIZE_BYTES - 1);
    assert_eq!(stats.usable_blocks, data_blocks * 75 / 100);
    assert_eq!(
        store.stats().capacity_bytes,
        stats.usable_blocks * BLOCK_SIZE_BYTES,
        "clients are told the usable capacity, not the raw one"
    );

    // 1. Whole 64 KiB objects (16 blocks) until one does not fit: refused by the usable
    // limit (not by segment space), with fewer than 16 usable blocks left.
    let object_blocks = (OBJECT_BYTES as u64) / BLOCK_SIZE_BYTES;
    let mut objects = Vec::new();
    loop {
        let name = format!("big{}", objects.len());
        let data = pattern(OBJECT_BYTES, objects.len() as u64);
        match write_full(&mut store, &name, &data) {
            Ok(_) => objects.push((name, data)),
            Err(error) => {
                assert_eq!(error, StoreError::NoSpace);
                break;
            }
        }
        assert!(objects.len() < 1000, "64 MiB cannot hold 64 MiB of objects");
    }
    let stats = store.segment_stats();
    assert_eq!(stats.usable_full_refusals, 1, "{stats:?}");
    assert_eq!(stats.mapped_blocks, objects.len() as u64 * object_blocks);
    let left = stats.usable_blocks - stats.mapped_blocks;
    assert!(
        left < object_blocks,
        "refused with {left} usable blocks left"
    );

    // 2. Single-block objects, all at once (admission counts the ops still in flight): exactly
    // the blocks left are taken, the rest refused, and then the shard is at its limit.
    let small: Vec<Vec<u8>> = (0..32).map(|n| pattern(4096, 1000 + n)).collect();
    let batch: Vec<(Vec<u8>, Vec<SubOp<'_>>)> = small
        .iter()
        .enumerate()
        .map(|(n, data)| {
            (
                format!("small{n}").into_bytes(),
                vec![SubOp::WriteFull { data }],
            )
        })
        .collect();
    let outcomes = run_batch(&mut store, &batch);
    let accepted = outcomes.iter().filter(|o| o.is_ok()).count() as u64;
    assert_eq!(accepted, left, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|o| o.is_ok() || *o == Err(StoreError::NoSpace)));
    for (n, outcome) in outcomes.iter().enumerate() {
        if outcome.is_ok() {
            objects.push((format!("small{n}"), small[n].clone()));
        }
    }
    let stats = store.segment_stats();
    assert_eq!(stats.mapped_blocks, stats.usable_blocks);
    // Growing an object maps a new block: refused, and the object is as it was.
    let (name, data) = objects[0].clone();
    let grow = run_batch(
        &mut store,
        &[(
            name.clone().into_bytes(),
            vec![SubOp::Write {
                offset: OBJECT_BYTES as u64,
                data: &small[0],
            }],
        )],
    );
    assert_eq!(grow[0], Err(StoreError::NoSpace));
    assert_eq!(read(&mut store, &name, OBJECT_BYTES), data);

    // 3. Random 4 KiB overwrites at the limit, twice the raw capacity over: all succeed
    // (no new block), the cleaner runs, and every object reads back as last written.
    let big_objects = objects.iter().filter(|(n, _)| n.starts_with("big")).count() as u64;
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let overwrites = 2 * data_blocks;
    for round in 0..overwrites / 32 {
        let picks: Vec<(usize, u64, Vec<u8>)> = (0..32)
            .map(|_| {
                let object = (xorshift(&mut rng) % big_objects) as usize;
                let block = xorshift(&mut rng) % object_blocks;
                (object, block, pattern(4096, xorshift(&mut rng)))
            })
            .collect();
        let batch: Vec<(Vec<u8>, Vec<SubOp<'_>>)> = picks
            .iter()
            .map(|(object, block, data)| {
                (
                    objects[*object].0.clone().into_bytes(),
                    vec![SubOp::Write {
                        offset: block * BLOCK_SIZE_BYTES,
                        data,
                    }],
                )
            })
            .collect();
        for (outcome, (object, block, data)) in run_batch(&mut store, &batch).iter().zip(&picks) {
            assert!(
                outcome.is_ok(),
                "round {round}: an overwrite at the usable limit failed: {outcome:?}; {}",
                store.debug_state()
            );
            let at = (*block * BLOCK_SIZE_BYTES) as usize;
            objects[*object].1[at..at + 4096].copy_from_slice(data);
        }
    }
    let stats = store.segment_stats();
    assert!(
        stats.segments_cleaned > 10,
        "the cleaner hardly ran: {stats:?}"
    );
    assert_eq!(stats.mapped_blocks, stats.usable_blocks);
    for (name, data) in &objects {
        assert!(
            read(&mut store, name, data.len()) == *data,
            "{name} differs"
        );
    }

    // 4. The image is fsck-clean; remounted, the limit holds, and a remove makes room for
    // exactly what it freed.
    let image = store.queue_pair().durable().to_vec();
    let report = fsck_reader(&mut &image[..], image.len() as u64, "spare".as_ref()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.superblock.spare_percent, SPARE_PERCENT);
    let mut store =
        SegmentStore::mount(MemQueuePair::from_image(image, 64, MemFaults::default()), 0)
            .expect("remount");
    assert_eq!(store.segment_stats().mapped_blocks, stats.usable_blocks);
    assert_eq!(
        write_full(&mut store, "one-more", &small[0]),
        Err(StoreError::NoSpace)
    );
    let (removed, _) = objects.remove(1);
    run_batch(&mut store, &[(removed.into_bytes(), vec![SubOp::Remove])])
        .remove(0)
        .unwrap();
    let replacement = pattern(OBJECT_BYTES, 77);
    write_full(&mut store, "replacement", &replacement).expect("a removed object's room");
    assert_eq!(
        write_full(&mut store, "one-more", &small[0]),
        Err(StoreError::NoSpace)
    );
    for (name, data) in &objects {
        assert!(
            read(&mut store, name, data.len()) == *data,
            "{name} differs after remount"
        );
    }
    assert_eq!(read(&mut store, "replacement", OBJECT_BYTES), replacement);
}

/// Without a spare every block is usable: the limit is the device's segments, as before.
#[test]
fn spare_zero_leaves_the_whole_capacity_usable() {
    let mut qp = MemQueuePair::new(16 << 20, 64, MemFaults::default());
    mkfs(&mut qp, SEGMENT, 1, 0, *b"spare-test-zero!").expect("mkfs");
    let store = SegmentStore::mount(qp, 0).expect("mount");
    assert_eq!(
        store.segment_stats().usable_blocks,
        7 * (SEGMENT / BLOCK_SIZE_BYTES - 1)
    );
    let mut qp = MemQueuePair::new(16 << 20, 64, MemFaults::default());
    assert!(
        mkfs(&mut qp, SEGMENT, 1, 91, *b"spare-test-over!").is_err(),
        "a spare over 90% is refused"
    );
}
