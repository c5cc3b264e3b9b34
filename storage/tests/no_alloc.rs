//! The daemon promises no allocation per op in steady state. This test counts allocations made
//! by the test's own thread while `MemoryStore` serves steady-state ops (overwrites and reads
//! within an object's size, same-length xattr/omap overwrites, Stat, reads of missing objects)
//! and requires zero.
//!
//! It needs a counting global allocator, which is the one `unsafe` outside `OutputBuffer`: it is
//! test-only and delegates every call unchanged to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use carmine_storage::segment::SegmentStore;
use carmine_storage::{
    MemQueuePair, MemoryStore, ObjectStore, OutputBuffer, StoreError, SubOp, SubOpResult, Submit,
};

thread_local! {
    /// Allocations by this thread. Thread-local so the test harness's other threads do not count.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct CountingAllocator;

fn count_one() {
    // `try_with`: during thread teardown the counter may be gone; those allocations don't matter.
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; counting touches only a const-initialized thread-local `Cell`, which
// does not allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: our caller upholds `alloc`'s contract, which is `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`, per our caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`, per our caller.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Submits `ops` and requires every sub-op to succeed.
fn submit(
    store: &mut MemoryStore,
    oid: &[u8],
    ops: &[SubOp<'_>],
    out: &mut [u8],
    results: &mut [SubOpResult],
) {
    let submit = store.submit(0, oid, ops, &mut OutputBuffer::from_slice(out), results);
    assert_eq!(submit, Ok(Submit::Done));
    assert!(results[..ops.len()].iter().all(|r| r.result().is_ok()));
}

#[test]
fn steady_state_ops_do_not_allocate() {
    let mut store = MemoryStore::new(1 << 24);
    let mut out = vec![0u8; 64 * 1024];
    let mut results = [SubOpResult::default(); 8];
    let block = vec![0x5au8; 4096];
    let oid = b"object.0001";

    // Warm up: create the object at its full size and its metadata.
    let setup = [
        SubOp::WriteFull {
            data: &vec![0u8; 1 << 20],
        },
        SubOp::SetXattr {
            name: b"user.version",
            value: b"00000001",
        },
        SubOp::OmapSet {
            key: b"header",
            value: b"0123456789abcdef",
        },
    ];
    submit(&mut store, oid, &setup, &mut out, &mut results);

    let before = allocations();
    for round in 0..1000u64 {
        let offset = (round * 4096) % (1 << 20);
        let version = round.to_le_bytes();
        let write = [
            SubOp::Write {
                offset,
                data: &block,
            },
            SubOp::SetXattr {
                name: b"user.version",
                value: &version,
            },
            SubOp::OmapSet {
                key: b"header",
                value: b"fedcba9876543210",
            },
            SubOp::Zero {
                offset: offset + 100,
                length: 100,
            },
        ];
        submit(&mut store, oid, &write, &mut out, &mut results);
        let read = [
            SubOp::Read {
                offset,
                length: 16 * 1024,
            },
            SubOp::Stat,
            SubOp::GetXattr {
                name: b"user.version",
            },
            SubOp::OmapGet { key: b"header" },
        ];
        submit(&mut store, oid, &read, &mut out, &mut results);
        assert_eq!(results[2].out_len, 8);
        let missing = store.submit(
            0,
            b"missing",
            &[SubOp::Stat],
            &mut OutputBuffer::from_slice(&mut out),
            &mut results,
        );
        assert_eq!(missing, Ok(Submit::Done));
        assert_eq!(results[0].result(), Err(StoreError::NotFound));
    }
    let allocated = allocations() - before;
    assert_eq!(allocated, 0, "steady-state ops allocated {allocated} times");

    // The counter works: growing an object must allocate.
    let before = allocations();
    submit(
        &mut store,
        oid,
        &[SubOp::Truncate { size: 4 << 20 }],
        &mut out,
        &mut results,
    );
    assert!(allocations() > before);
}

/// A segment store on a `mem` device of `bytes`, holding four objects of 16 blocks of 5s.
fn segment_store_with_four_objects(bytes: u64) -> (SegmentStore<MemQueuePair>, Vec<Vec<u8>>) {
    use carmine_storage::segment::mkfs;
    use carmine_storage::MemFaults;

    let mut qp = MemQueuePair::new(bytes, 64, MemFaults::default());
    mkfs(&mut qp, 1 << 20, 1, 0, *b"no-alloc-segment").unwrap();
    let mut store = SegmentStore::mount(qp, 0).unwrap();
    let data = vec![5u8; 16 * 4096];
    let oids: Vec<Vec<u8>> = (0..4).map(|n| format!("obj{n}").into_bytes()).collect();
    let mut results = [SubOpResult::default(); 1];
    for oid in &oids {
        let write = [SubOp::WriteFull { data: &data }];
        let mut out = OutputBuffer::from_slice(&mut []);
        let submitted = store.submit(0, oid, &write, &mut out, &mut results);
        assert_eq!(submitted, Ok(Submit::Pending));
        wait_for(&mut store, 1);
    }
    (store, oids)
}

/// Polls until `pending` ops completed, each with every sub-op successful.
fn wait_for(store: &mut SegmentStore<MemQueuePair>, mut pending: usize) {
    while pending > 0 {
        store.poll(64, &mut |_, result| {
            assert!(result.is_ok_and(|r| r.iter().all(|r| r.result().is_ok())));
            pending -= 1;
        });
    }
}

/// The segment store's read path (lanes shared by reads, block reads, crc checks, output)
/// allocates nothing once warm: eight reads in flight over four objects, round after round.
#[test]
fn segment_store_reads_do_not_allocate_in_steady_state() {
    let (mut store, oids) = segment_store_with_four_objects(16 << 20);
    let wait = wait_for;
    let mut results = [SubOpResult::default(); 8];
    let mut outs = vec![vec![0u8; 4096]; 8];
    let mut round = |store: &mut SegmentStore<MemQueuePair>| {
        let mut pending = 0;
        for (n, out) in outs.iter_mut().enumerate() {
            let read = [SubOp::Read {
                offset: (n as u64 * 3 % 16) * 4096,
                length: 4096,
            }];
            // SAFETY: `out` is not touched again until `wait` below has seen this op complete.
            let mut out = unsafe { OutputBuffer::from_raw(out.as_mut_ptr(), out.len()) };
            match store.submit(n as u64, &oids[n % 4], &read, &mut out, &mut results[..1]) {
                Ok(Submit::Pending) => pending += 1,
                other => panic!("a block read is pending: {other:?}"),
            }
        }
        wait(store, pending);
    };
    round(&mut store);
    round(&mut store);
    let before = allocations();
    for _ in 0..4 {
        round(&mut store);
    }
    assert_eq!(
        allocations() - before,
        0,
        "allocations in 32 steady-state reads"
    );
    assert!(outs.iter().all(|out| out.iter().all(|&b| b == 5)));
}

/// The segment store's write path (lanes, exec's plan, group commit into journal records,
/// applying the durable record to the metadata) allocates nothing once warm: 4 KiB overwrites
/// of blocks that exist, eight in flight over four objects, round after round. (Growing an
/// object, creating one, or the cleaner's first victim may allocate: that is store capacity.)
#[test]
fn segment_store_overwrites_do_not_allocate_in_steady_state() {
    let (mut store, oids) = segment_store_with_four_objects(64 << 20);
    let wait = wait_for;
    let mut results = [SubOpResult::default(); 8];
    let block = vec![7u8; 4096];
    let mut round = |store: &mut SegmentStore<MemQueuePair>, round: u64| {
        let mut pending = 0;
        for n in 0..8u64 {
            let write = [SubOp::Write {
                offset: ((n + round) * 5 % 16) * 4096,
                data: &block,
            }];
            let mut out = OutputBuffer::from_slice(&mut []);
            match store.submit(
                n,
                &oids[n as usize % 4],
                &write,
                &mut out,
                &mut results[..1],
            ) {
                Ok(Submit::Pending) => pending += 1,
                other => panic!("write {n}: {other:?}"),
            }
        }
        wait(store, pending);
    };
    // Warm up: every buffer pool, lane and scratch vector reaches its working size, and the
    // first checkpoint is written (a full dump of the metadata into fresh records: background
    // work that allocates, not the op path; due every 15 journal segments on this device,
    // ~16 MiB of these rounds, about 36 KiB each (one record: the second write to an object
    // no longer waits for the first's record), so none falls in the measured 200 rounds).
    for r in 0..550 {
        round(&mut store, r);
    }
    let checkpoints = store.segment_stats().checkpoints;
    assert!(checkpoints > 0, "the warm-up wrote no checkpoint");
    let before = allocations();
    for r in 0..200 {
        round(&mut store, r);
    }
    let allocated = allocations() - before;
    assert_eq!(
        store.segment_stats().checkpoints,
        checkpoints,
        "a checkpoint fell in the measured rounds"
    );
    assert_eq!(
        allocated, 0,
        "1,600 steady-state overwrites allocated {allocated} times"
    );
}
