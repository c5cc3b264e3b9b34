//! Helpers the segment-store integration tests share: one op run to completion, and a store
//! polled until nothing is in progress.
#![allow(dead_code)] // each test file uses its own subset

use carmine_storage::segment::SegmentStore;
use carmine_storage::{
    MemQueuePair, ObjectStore, OutputBuffer, StoreError, SubOp, SubOpResult, Submit,
};

pub type Store = SegmentStore<MemQueuePair>;

/// Runs one op (at most 4 sub-ops, no output) to completion; its error, if any.
pub fn run(store: &mut Store, oid: &[u8], ops: &[SubOp<'_>]) -> Result<(), StoreError> {
    let mut results = [SubOpResult::default(); 4];
    let mut output = OutputBuffer::empty();
    if let Submit::Done = store.submit(1, oid, ops, &mut output, &mut results[..ops.len()])? {
        return Ok(());
    }
    let mut outcome = None;
    for _ in 0..1_000_000 {
        store.poll(16, &mut |tag, result| {
            assert_eq!(tag, 1);
            outcome = Some(result.map(|_| ()));
        });
        if let Some(outcome) = outcome {
            return outcome;
        }
    }
    panic!("the op never completed: {}", store.debug_state());
}

/// Polls until the store has nothing in progress (cleaner and checkpoint included).
pub fn settle(store: &mut Store) {
    for _ in 0..1_000_000 {
        if !store.busy() {
            return;
        }
        store.poll(16, &mut |_, _| panic!("no op is in flight"));
    }
    panic!("the store never settles: {}", store.debug_state());
}
