//! Object ids on disk (format 5): a replay from a checkpoint numbers every object, including
//! those created after the checkpoint, exactly as the running store did, so the replayed
//! metadata equals the running store's (`Metadata::same_as` compares ids, the extent tree's
//! keys).

use carmine_storage::segment::mount::replay_from;
use carmine_storage::segment::{mkfs, SegmentStore};
use carmine_storage::{MemFaults, MemQueuePair, SubOp};

mod common;
use common::{run, settle, Store};

const SEGMENT: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn mounted_store(megabytes: u64) -> Store {
    let mut qp = MemQueuePair::new(megabytes << 20, 64, MemFaults::default());
    mkfs(&mut qp, SEGMENT, 1, 0, *b"object-ids-test!").expect("mkfs");
    SegmentStore::mount(qp, 0).expect("mount")
}

#[test]
fn replay_after_checkpoints_numbers_objects_as_the_running_store() {
    let mut store = mounted_store(12);
    let hot = vec![0x5au8; 64 * BLOCK];
    let small = vec![0xa5u8; 4 * BLOCK];
    let mut created_after_a_checkpoint = 0;
    let mut round = 0u64;
    // Each round creates an object and removes it again at once (the newest id dies: a replay
    // that restarted numbering from the highest id it saw would reuse it), keeps one object of
    // every fourth round, and overwrites a hot object to drive checkpoints.
    while created_after_a_checkpoint < 20 {
        round += 1;
        assert!(round < 5_000, "checkpoints never came");
        let checkpoints = store.segment_stats().checkpoints;
        let oid = format!("round-{round}").into_bytes();
        run(&mut store, &oid, &[SubOp::WriteFull { data: &small }]).unwrap();
        if round % 4 != 0 {
            run(&mut store, &oid, &[SubOp::Remove]).unwrap();
        }
        run(&mut store, b"hot", &[SubOp::WriteFull { data: &hot }]).unwrap();
        if checkpoints >= 2 {
            created_after_a_checkpoint += 1;
        }
    }
    settle(&mut store);
    let image = store.queue_pair().durable().to_vec();
    let running = store.metadata();
    assert!(
        running.next_object_id() > running.object_count() as u64 + 10,
        "removed objects left gaps in the ids"
    );
    let mut reader: &[u8] = &image;
    let replayed = replay_from(&mut reader, 0).expect("the image mounts");
    assert_ne!(
        replayed.log.replay_start.0, 0,
        "replay starts at a checkpoint"
    );
    replayed.metadata.extent_tree().check().unwrap();
    for (oid, object) in running.objects() {
        let found = replayed.metadata.object(oid).expect("every object replays");
        assert_eq!(found.id, object.id, "{}", String::from_utf8_lossy(oid));
    }
    assert!(replayed.metadata.same_as(running));
}
