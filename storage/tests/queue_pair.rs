//! Block queue pairs: behaviour every backend shares (round trips with scatter-gather, input
//! rejection, back-pressure), the mem backend's fault model (latency, reordering, flush
//! coverage, power cut with torn writes, remount) against a model, and the io_uring backend on
//! a real file under /var/tmp, and the NVMe backend on a real controller when CARMINE_NVME_PCI
//! names one (ci/vm/test.sh runs the `nvme_` tests in a QEMU guest).
//!
//! The io_uring tests print why they are skipped when the environment cannot run them (no
//! io_uring, or a filesystem refusing O_DIRECT); they never skip silently.
//!
//! `uring_random_write_iops` is a measurement, not a check:
//! `cargo test --release -p carmine-storage --test queue_pair -- --ignored --nocapture`.

// The workspace's rust-version (1.80) predates `is_multiple_of` (1.87).
#![allow(clippy::manual_is_multiple_of)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use carmine_storage::queue_pair::{
    AlignedBuf, IoError, IoVec, MemFaults, MemQueuePair, NvmeQueuePair, QueuePair, SubmitError,
    Tear, TearGranularity, UringQueuePair, BLOCK_SIZE_BYTES, IOVECS_PER_REQUEST_MAX,
};
use proptest::prelude::*;

const BLOCK: u64 = BLOCK_SIZE_BYTES as u64;

/// Polls until nothing is in flight; returns (tag, result) in completion order.
fn drain(qp: &mut dyn QueuePair) -> Vec<(u64, Result<(), IoError>)> {
    let mut done = Vec::new();
    let start = Instant::now();
    while qp.in_flight() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "I/O never completed"
        );
        qp.poll(usize::MAX, &mut |tag, result| done.push((tag, result)));
    }
    done
}

/// Fills a block with its identity: every u64 word is `id << 32 | block` (id 0: zeros).
fn stamp(bytes: &mut [u8], first_block: u64, id: u32) {
    for (i, block) in bytes.chunks_exact_mut(BLOCK_SIZE_BYTES).enumerate() {
        let word = if id == 0 {
            0
        } else {
            u64::from(id) << 32 | (first_block + i as u64)
        };
        for chunk in block.chunks_exact_mut(8) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
    }
}

fn stamped(first_block: u64, blocks: usize, id: u32) -> AlignedBuf {
    let mut buf = AlignedBuf::new(blocks * BLOCK_SIZE_BYTES);
    stamp(&mut buf, first_block, id);
    buf
}

/// Splits `buf` into `parts` IoVecs (block multiples, the last one takes the rest).
///
/// # Safety
/// As `AlignedBuf::as_io_vec`.
unsafe fn split(buf: &mut AlignedBuf, parts: usize) -> Vec<IoVec> {
    let blocks = buf.len() / BLOCK_SIZE_BYTES;
    let parts = parts.clamp(1, blocks);
    let mut vecs = Vec::new();
    let mut at = 0;
    for part in 0..parts {
        let len = if part + 1 == parts { blocks - at } else { 1 };
        // SAFETY: forwarded to our caller.
        vecs.push(unsafe { buf.io_vec_at(at * BLOCK_SIZE_BYTES, len * BLOCK_SIZE_BYTES) });
        at += len;
    }
    vecs
}

/// Writes 3 blocks gathered from 3 buffers of different sizes, flushes, and reads them back
/// scattered differently.
fn check_scatter_gather_round_trip(qp: &mut dyn QueuePair) {
    let mut one = stamped(4, 1, 11);
    let mut two = stamped(5, 2, 11);
    let mut three = stamped(7, 1, 11);
    // SAFETY: drained before the buffers are touched or dropped.
    let gather = unsafe { [one.as_io_vec(), two.as_io_vec(), three.as_io_vec()] };
    qp.submit_write(4 * BLOCK, &gather, 1).unwrap();
    assert_eq!(drain(qp), vec![(1, Ok(()))]);
    qp.submit_flush(2).unwrap();
    assert_eq!(drain(qp), vec![(2, Ok(()))]);

    let mut back = AlignedBuf::new(4 * BLOCK_SIZE_BYTES);
    // SAFETY: drained before `back` is read.
    let scatter = unsafe { [back.io_vec_at(0, 8192), back.io_vec_at(8192, 8192)] };
    qp.submit_read(4 * BLOCK, &scatter, 3).unwrap();
    assert_eq!(drain(qp), vec![(3, Ok(()))]);
    assert_eq!(&back[..], &stamped(4, 4, 11)[..]);
}

fn check_rejections(qp: &mut dyn QueuePair) {
    let capacity = qp.capacity_bytes();
    let mut buf = AlignedBuf::new(2 * BLOCK_SIZE_BYTES);
    // SAFETY: none of these requests is accepted, so nothing outlives this function.
    let (whole, odd) = unsafe { (buf.as_io_vec(), IoVec::new(buf.as_mut_ptr().add(512), 4096)) };
    let short = unsafe { IoVec::new(buf.as_mut_ptr(), 1000) };
    assert_eq!(
        qp.submit_write(512, &[whole], 1),
        Err(SubmitError::Misaligned)
    );
    assert_eq!(qp.submit_read(0, &[odd], 1), Err(SubmitError::Misaligned));
    assert_eq!(
        qp.submit_write(0, &[short], 1),
        Err(SubmitError::Misaligned)
    );
    assert_eq!(qp.submit_read(0, &[], 1), Err(SubmitError::Misaligned));
    assert_eq!(
        qp.submit_write(capacity - BLOCK, &[whole], 1),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(
        qp.submit_read(capacity, &[whole], 1),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(
        qp.submit_read(u64::MAX - 4095, &[whole], 1),
        Err(SubmitError::OutOfRange)
    );
    let many = [whole; IOVECS_PER_REQUEST_MAX + 1];
    assert_eq!(
        qp.submit_write(0, &many, 1),
        Err(SubmitError::TooManyBuffers)
    );
    assert_eq!(qp.in_flight(), 0, "rejected requests take no slot");
    assert_eq!(
        qp.poll(usize::MAX, &mut |_, _| panic!("no completion expected")),
        0
    );
}

/// Fills the queue, checks QueueFull, then that one poll's completion makes room again, and
/// that `completions_max` is honoured.
fn check_queue_full(qp: &mut dyn QueuePair) {
    let depth = qp.depth();
    let mut bufs: Vec<AlignedBuf> = (0..=depth).map(|_| AlignedBuf::new(4096)).collect();
    // SAFETY: drained before `bufs` is dropped.
    let vecs: Vec<IoVec> = bufs.iter_mut().map(|b| unsafe { b.as_io_vec() }).collect();
    for (tag, vec) in vecs.iter().take(depth as usize).enumerate() {
        qp.submit_read(0, &[*vec], tag as u64).unwrap();
    }
    assert_eq!(qp.in_flight(), depth);
    assert_eq!(
        qp.submit_read(0, &[vecs[depth as usize]], 99),
        Err(SubmitError::QueueFull)
    );
    assert_eq!(qp.submit_flush(99), Err(SubmitError::QueueFull));
    let start = Instant::now();
    let mut reported = 0;
    while reported == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "no completion");
        reported = qp.poll(1, &mut |_, result| assert_eq!(result, Ok(())));
    }
    assert_eq!(reported, 1, "completions_max honoured");
    assert_eq!(qp.in_flight(), depth - 1);
    qp.submit_read(0, &[vecs[depth as usize]], 99).unwrap();
    let done = drain(qp);
    assert_eq!(done.len(), depth as usize);
    assert!(done.iter().any(|&(tag, _)| tag == 99));
}

// ---- no allocation per I/O ------------------------------------------------------------------

thread_local! {
    /// Allocations by this thread, so the harness's other threads do not count.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct CountingAllocator;

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; counting touches only a const-initialized thread-local `Cell`, which
// does not allocate (`try_with`: during thread teardown it may be gone).
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: our caller upholds `alloc`'s contract, which is `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: as for `alloc` (and calloc's lazily zeroed pages stay lazy).
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
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

/// Runs 2000 4 KiB writes, reads and flushes at full depth through `qp` and returns how many
/// allocations this thread made meanwhile (the buffers are allocated before counting starts).
fn allocations_in_steady_state(qp: &mut dyn QueuePair) -> u64 {
    let depth = qp.depth() as usize;
    let mut pool = AlignedBuf::new(depth * BLOCK_SIZE_BYTES);
    let mut free: Vec<u64> = (0..depth as u64).collect();
    let before = ALLOCATIONS.with(Cell::get);
    let mut issued = 0u64;
    while issued < 2000 || qp.in_flight() > 0 {
        while issued < 2000 {
            let Some(slot) = free.pop() else { break };
            // SAFETY: the slot's block of `pool` is untouched until its completion; `pool`
            // outlives the loop, which ends with nothing in flight.
            let vec = unsafe { pool.io_vec_at(slot as usize * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES) };
            let offset = issued % 16 * BLOCK;
            let result = match issued % 3 {
                0 => qp.submit_write(offset, &[vec], slot),
                1 => qp.submit_read(offset, &[vec], slot),
                _ => qp.submit_flush(slot),
            };
            result.unwrap();
            issued += 1;
        }
        qp.poll(usize::MAX, &mut |slot, result| {
            assert_eq!(result, Ok(()));
            free.push(slot);
        });
    }
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn steady_state_io_does_not_allocate() {
    let faults = MemFaults {
        seed: 5,
        latency_polls: (0, 3),
        reorder: true,
        volatile_cache_bytes: 8 * BLOCK,
    };
    let mut mem = MemQueuePair::new(MEM_CAPACITY, 16, faults);
    assert_eq!(allocations_in_steady_state(&mut mem), 0, "mem backend");
    let file = TempFile::new("no-alloc", 64 * BLOCK);
    if let Some(mut uring) = open_or_skip("steady_state_io_does_not_allocate", &file, 16) {
        assert_eq!(allocations_in_steady_state(&mut uring), 0, "uring backend");
    }
}

// ---- mem backend ----------------------------------------------------------------------------

const MEM_CAPACITY: u64 = 64 * BLOCK;

#[test]
fn mem_scatter_gather_round_trip() {
    check_scatter_gather_round_trip(&mut MemQueuePair::new(
        MEM_CAPACITY,
        8,
        MemFaults::default(),
    ));
}

#[test]
fn mem_rejects_misaligned_out_of_range_and_too_many_buffers() {
    check_rejections(&mut MemQueuePair::new(
        MEM_CAPACITY,
        8,
        MemFaults::default(),
    ));
}

#[test]
fn mem_refuses_write_zeroes_and_deallocate_as_unsupported() {
    // The trait's default: only backends whose device has them (NVMe ONCS) accept them.
    let mut mem = MemQueuePair::new(MEM_CAPACITY, 8, MemFaults::default());
    assert_eq!(
        mem.submit_write_zeroes(0, BLOCK, 1),
        Err(SubmitError::Unsupported)
    );
    assert_eq!(
        mem.submit_deallocate(0, BLOCK, 2),
        Err(SubmitError::Unsupported)
    );
    assert_eq!(mem.in_flight(), 0);
    assert!(SubmitError::Unsupported.to_string().contains("not support"));
}

#[test]
fn mem_queue_full_at_depth_and_recovery_after_poll() {
    let faults = MemFaults {
        latency_polls: (0, 3),
        reorder: true,
        seed: 3,
        ..MemFaults::default()
    };
    check_queue_full(&mut MemQueuePair::new(MEM_CAPACITY, 5, faults));
}

/// Submits 48 requests in waves and returns the tags in completion order.
fn completion_order(seed: u64) -> Vec<u64> {
    let faults = MemFaults {
        seed,
        latency_polls: (0, 4),
        reorder: true,
        ..MemFaults::default()
    };
    let mut qp = MemQueuePair::new(MEM_CAPACITY, 16, faults);
    let mut bufs: Vec<AlignedBuf> = (0..48).map(|i| stamped(i % 64, 1, 1 + i as u32)).collect();
    let mut order = Vec::new();
    for (tag, buf) in bufs.iter_mut().enumerate() {
        // SAFETY: drained below before `bufs` is dropped.
        let vec = unsafe { buf.as_io_vec() };
        while qp
            .submit_write(tag as u64 % 64 * BLOCK, &[vec], tag as u64)
            .is_err()
        {
            qp.poll(3, &mut |tag, _| order.push(tag));
        }
    }
    order.extend(drain(&mut qp).into_iter().map(|(tag, _)| tag));
    order
}

#[test]
fn mem_latency_and_reorder_are_deterministic_per_seed() {
    let first = completion_order(7);
    assert_eq!(first.len(), 48);
    assert_eq!(first, completion_order(7), "same seed, same order");
    assert_ne!(first, completion_order(8), "another seed, another order");
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_ne!(first, sorted, "completions are reordered");
    assert_eq!(sorted, (0..48).collect::<Vec<u64>>());
}

#[test]
fn mem_without_faults_completes_in_submission_order_at_next_poll() {
    let mut qp = MemQueuePair::new(MEM_CAPACITY, 8, MemFaults::default());
    let mut buf = AlignedBuf::new(4096);
    // SAFETY: all requests are reported by the poll below before `buf` is dropped.
    let vec = unsafe { buf.as_io_vec() };
    for tag in 0..4 {
        qp.submit_read(tag * BLOCK, &[vec], tag).unwrap();
    }
    let mut order = Vec::new();
    assert_eq!(qp.poll(usize::MAX, &mut |tag, _| order.push(tag)), 4);
    assert_eq!(order, vec![0, 1, 2, 3]);
}

/// The image a power cut must leave: `before` with the tear's persisted units of `data`
/// (the torn write's bytes) copied in.
fn expected_after_tear(before: &[u8], tear: &Tear, data: &[u8]) -> Vec<u8> {
    let mut image = before.to_vec();
    let unit = tear.granularity.unit_bytes();
    assert_eq!(tear.units_persisted.len(), tear.length as usize / unit);
    for (i, &persisted) in tear.units_persisted.iter().enumerate() {
        if persisted {
            let at = tear.offset as usize + i * unit;
            image[at..at + unit].copy_from_slice(&data[i * unit..(i + 1) * unit]);
        }
    }
    image
}

#[test]
fn mem_power_cut_drops_unflushed_writes_and_keeps_flushed_ones() {
    let mut qp = MemQueuePair::new(MEM_CAPACITY, 8, MemFaults::default());
    let mut flushed = stamped(0, 2, 1);
    let mut unflushed = stamped(8, 2, 2);
    let mut in_flight = stamped(16, 2, 3);
    // SAFETY: `flushed` and `unflushed` are drained; `in_flight` outlives the power cut and the
    // drain that reports it lost.
    let vecs = unsafe {
        [
            flushed.as_io_vec(),
            unflushed.as_io_vec(),
            in_flight.as_io_vec(),
        ]
    };
    qp.submit_write(0, &vecs[..1], 1).unwrap();
    drain(&mut qp);
    qp.submit_flush(2).unwrap();
    drain(&mut qp);
    qp.submit_write(8 * BLOCK, &vecs[1..2], 3).unwrap();
    drain(&mut qp);
    qp.submit_write(16 * BLOCK, &vecs[2..], 4).unwrap();

    let before = qp.durable().to_vec();
    assert_eq!(&before[..8192], &flushed[..]);
    let image = qp.power_cut(TearGranularity::Block4K);
    let tear = qp.last_tear().expect("two candidates").clone();
    let data = if tear.in_flight {
        &in_flight
    } else {
        &unflushed
    };
    assert_eq!(
        tear.offset,
        if tear.in_flight {
            16 * BLOCK
        } else {
            8 * BLOCK
        }
    );
    assert_eq!(image, expected_after_tear(&before, &tear, data));
    assert_eq!(&image[..8192], &flushed[..], "flushed write kept");
    assert_eq!(drain(&mut qp), vec![(4, Err(IoError::PowerLoss))]);
}

/// One in-flight 64 KiB write over old data, cut at `granularity`; checks the image is exactly
/// the documented tear and that the tear is a proper subset.
fn check_torn_write(granularity: TearGranularity, seed: u64) -> Tear {
    let faults = MemFaults {
        seed,
        ..MemFaults::default()
    };
    let mut qp = MemQueuePair::new(MEM_CAPACITY, 4, faults);
    let mut old = stamped(4, 16, 1);
    let mut new = stamped(4, 16, 2);
    // SAFETY: `old` is drained; `new` outlives the cut and the drain reporting it lost.
    let (old_vec, new_vecs) = unsafe { (old.as_io_vec(), split(&mut new, 3)) };
    qp.submit_write(4 * BLOCK, &[old_vec], 1).unwrap();
    qp.submit_flush(2).unwrap();
    drain(&mut qp);
    qp.submit_flush(3).unwrap();
    drain(&mut qp);
    qp.submit_write(4 * BLOCK, &new_vecs, 4).unwrap();
    let before = qp.durable().to_vec();
    assert_eq!(&before[4 * 4096..20 * 4096], &old[..]);
    let image = qp.power_cut(granularity);
    let tear = qp.last_tear().expect("one in-flight write").clone();
    assert!(tear.in_flight);
    assert_eq!((tear.offset, tear.length), (4 * BLOCK, 16 * BLOCK));
    assert_eq!(tear.granularity, granularity);
    assert_eq!(image, expected_after_tear(&before, &tear, &new));
    let persisted = tear.units_persisted.iter().filter(|&&p| p).count();
    assert!(
        persisted > 0 && persisted < tear.units_persisted.len(),
        "a proper subset"
    );
    assert_eq!(drain(&mut qp), vec![(4, Err(IoError::PowerLoss))]);
    tear
}

#[test]
fn mem_torn_write_at_512_byte_sectors() {
    let tear = check_torn_write(TearGranularity::Sector512, 11);
    assert_eq!(tear.units_persisted.len(), 128);
    // Sector granularity really tears inside blocks: some block is half old, half new.
    let mixed = tear
        .units_persisted
        .chunks(8)
        .any(|block| block.contains(&true) && block.contains(&false));
    assert!(mixed);
    assert_eq!(
        tear,
        check_torn_write(TearGranularity::Sector512, 11),
        "deterministic"
    );
}

#[test]
fn mem_torn_write_at_4k_blocks() {
    let tear = check_torn_write(TearGranularity::Block4K, 11);
    assert_eq!(tear.units_persisted.len(), 16);
    assert_eq!(
        tear,
        check_torn_write(TearGranularity::Block4K, 11),
        "deterministic"
    );
    assert_ne!(tear, check_torn_write(TearGranularity::Block4K, 12));
}

#[test]
fn mem_power_loss_after_cut_and_remount_from_image() {
    let mut qp = MemQueuePair::new(MEM_CAPACITY, 4, MemFaults::default());
    let mut data = stamped(2, 1, 5);
    // SAFETY: drained before `data` is dropped.
    let vec = unsafe { data.as_io_vec() };
    qp.submit_write(2 * BLOCK, &[vec], 1).unwrap();
    drain(&mut qp);
    qp.submit_flush(2).unwrap();
    drain(&mut qp);
    let image = qp.power_cut(TearGranularity::Sector512);
    assert!(qp.last_tear().is_none(), "nothing to tear");
    assert!(qp.is_powered_off());
    let mut buf = AlignedBuf::new(4096);
    // SAFETY: drained before `buf` is dropped.
    let read_vec = unsafe { buf.as_io_vec() };
    qp.submit_read(2 * BLOCK, &[read_vec], 3).unwrap();
    qp.submit_flush(4).unwrap();
    let done = drain(&mut qp);
    assert_eq!(
        done,
        vec![(3, Err(IoError::PowerLoss)), (4, Err(IoError::PowerLoss))]
    );
    assert!(buf.iter().all(|&b| b == 0), "a lost read fills nothing");
    assert_eq!(
        qp.submit_read(1, &[read_vec], 5),
        Err(SubmitError::Misaligned)
    );

    let mut remounted = MemQueuePair::from_image(image, 4, MemFaults::default());
    assert_eq!(remounted.capacity_bytes(), MEM_CAPACITY);
    remounted.submit_read(2 * BLOCK, &[read_vec], 6).unwrap();
    assert_eq!(drain(&mut remounted), vec![(6, Ok(()))]);
    assert_eq!(&buf[..], &data[..]);
}

// ---- mem backend against a model ------------------------------------------------------------

const MODEL_BLOCKS: u64 = 24;

#[derive(Clone, Debug)]
enum Op {
    Write {
        block: u64,
        blocks: usize,
        parts: usize,
    },
    Read {
        block: u64,
        blocks: usize,
        parts: usize,
    },
    Flush,
    Poll {
        max: usize,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let range = (0..MODEL_BLOCKS, 1usize..=4, 1usize..=3);
    prop_oneof![
        4 => range.clone().prop_map(|(block, blocks, parts)| Op::Write { block, blocks, parts }),
        3 => range.prop_map(|(block, blocks, parts)| Op::Read { block, blocks, parts }),
        1 => Just(Op::Flush),
        4 => (1usize..=4).prop_map(|max| Op::Poll { max }),
    ]
}

/// A request the model waits on; the buffer lives here until completion.
enum Pending {
    Write {
        block: u64,
        blocks: usize,
        id: u32,
        _buf: AlignedBuf,
    },
    Read {
        block: u64,
        buf: AlignedBuf,
    },
    Flush {
        cut: u64,
    },
}

/// The device as the semantics define it: write ids per block, durable and completed.
struct Model {
    durable: Vec<u32>,
    completed: Vec<u32>,
    /// Completed writes no completed flush covers: (completion number, first block, blocks, id).
    unflushed: Vec<(u64, u64, usize, u32)>,
    writes_completed: u64,
    pending: HashMap<u64, Pending>,
    /// Blocks with a request in flight: the harness never overlaps two (undefined content).
    busy: Vec<bool>,
}

impl Model {
    fn complete(&mut self, tag: u64, result: Result<(), IoError>) {
        assert_eq!(result, Ok(()), "tag {tag}");
        match self.pending.remove(&tag).expect("known tag") {
            Pending::Write {
                block, blocks, id, ..
            } => {
                self.writes_completed += 1;
                let range = block as usize..block as usize + blocks;
                self.completed[range.clone()].fill(id);
                self.busy[range].fill(false);
                self.unflushed
                    .push((self.writes_completed, block, blocks, id));
            }
            Pending::Read { block, buf } => {
                let blocks = buf.len() / BLOCK_SIZE_BYTES;
                let range = block as usize..block as usize + blocks;
                for (i, &id) in self.completed[range.clone()].iter().enumerate() {
                    let mut expected = vec![0; BLOCK_SIZE_BYTES];
                    stamp(&mut expected, block + i as u64, id);
                    let got = &buf[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES];
                    assert!(
                        got == &expected[..],
                        "read tag {tag} block {}",
                        block + i as u64
                    );
                }
                self.busy[range].fill(false);
            }
            Pending::Flush { cut } => {
                for &(_, block, blocks, id) in self.unflushed.iter().filter(|w| w.0 <= cut) {
                    self.durable[block as usize..block as usize + blocks].fill(id);
                }
                self.unflushed.retain(|w| w.0 > cut);
            }
        }
    }

    /// The durable image the model requires (exact: the cache is large enough never to destage).
    fn durable_image(&self) -> Vec<u8> {
        let mut image = vec![0; (MODEL_BLOCKS * BLOCK) as usize];
        for (block, chunk) in image.chunks_exact_mut(BLOCK_SIZE_BYTES).enumerate() {
            stamp(chunk, block as u64, self.durable[block]);
        }
        image
    }
}

fn submit_op(qp: &mut MemQueuePair, model: &mut Model, op: &Op, tag: u64) {
    match *op {
        Op::Write {
            block,
            blocks,
            parts,
        }
        | Op::Read {
            block,
            blocks,
            parts,
        } => {
            let range = block as usize..(block as usize + blocks).min(MODEL_BLOCKS as usize);
            if model.busy[range.clone()].contains(&true) {
                return;
            }
            let is_write = matches!(op, Op::Write { .. });
            let id = tag as u32 + 1;
            let mut buf = stamped(block, blocks, if is_write { id } else { 0 });
            // SAFETY: the buffer moves into `model.pending` (its heap memory does not move)
            // and stays there until the request's completion is reported.
            let vecs = unsafe { split(&mut buf, parts) };
            let result = if is_write {
                qp.submit_write(block * BLOCK, &vecs, tag)
            } else {
                qp.submit_read(block * BLOCK, &vecs, tag)
            };
            match result {
                Ok(()) => {
                    model.busy[range].fill(true);
                    let pending = if is_write {
                        Pending::Write {
                            block,
                            blocks,
                            id,
                            _buf: buf,
                        }
                    } else {
                        Pending::Read { block, buf }
                    };
                    model.pending.insert(tag, pending);
                }
                Err(SubmitError::OutOfRange) => assert!(block as usize + blocks > range.end),
                Err(SubmitError::QueueFull) => assert_eq!(qp.in_flight(), qp.depth()),
                Err(e) => panic!("unexpected {e}"),
            }
        }
        Op::Flush => match qp.submit_flush(tag) {
            Ok(()) => {
                let cut = model.writes_completed;
                model.pending.insert(tag, Pending::Flush { cut });
            }
            Err(e) => assert_eq!(e, SubmitError::QueueFull),
        },
        Op::Poll { max } => {
            let reported = qp.poll(max, &mut |tag, result| model.complete(tag, result));
            assert!(reported <= max);
            assert_eq!(qp.durable(), &model.durable_image()[..]);
        }
    }
}

/// After a power cut: every unit outside the torn write's persisted units is the model's
/// durable content; each persisted unit carries one uncovered write's id over exactly the torn
/// range (in flight or completed-unflushed), the same write for all of them.
fn check_cut_image(model: &Model, image: &[u8], tear: Option<&Tear>) {
    let durable = model.durable_image();
    let Some(tear) = tear else {
        assert_eq!(image, &durable[..]);
        return;
    };
    let unit = tear.granularity.unit_bytes();
    let mut torn_id = None;
    for (i, chunk) in image.chunks_exact(unit).enumerate() {
        let at = (i * unit) as u64;
        let inside = at >= tear.offset && at < tear.offset + tear.length;
        let persisted = inside && tear.units_persisted[((at - tear.offset) / unit as u64) as usize];
        if !persisted {
            assert!(chunk == &durable[i * unit..(i + 1) * unit], "unit at {at}");
            continue;
        }
        let word = u64::from_le_bytes(chunk[..8].try_into().unwrap());
        assert!(
            chunk.chunks_exact(8).all(|w| w == word.to_le_bytes()),
            "unit at {at} whole"
        );
        assert_eq!(
            word & 0xffff_ffff,
            at / BLOCK,
            "unit at {at} from its own block"
        );
        let id = (word >> 32) as u32;
        assert_eq!(*torn_id.get_or_insert(id), id, "one torn write");
    }
    let Some(id) = torn_id else { return };
    let first_block = tear.offset / BLOCK;
    let blocks = (tear.length / BLOCK) as usize;
    let in_flight = model.pending.values().any(|p| {
        matches!(p, Pending::Write { block, blocks: n, id: pid, .. }
            if *pid == id && *block == first_block && *n == blocks)
    });
    let cached = model
        .unflushed
        .iter()
        .any(|w| (w.1, w.2, w.3) == (first_block, blocks, id));
    assert!(
        in_flight != cached && in_flight == tear.in_flight,
        "torn write {id} uncovered"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn mem_matches_model_under_random_ops(
        ops in proptest::collection::vec(op_strategy(), 1..80),
        seed in any::<u64>(),
        latency_max in 0u32..4,
        reorder in any::<bool>(),
        sectors in any::<bool>(),
    ) {
        let faults = MemFaults {
            seed,
            latency_polls: (0, latency_max),
            reorder,
            // More than 80 writes of at most 16 KiB: never destages, so the durable image is
            // exactly the model's.
            volatile_cache_bytes: 4 << 20,
        };
        let mut qp = MemQueuePair::new(MODEL_BLOCKS * BLOCK, 6, faults);
        let mut model = Model {
            durable: vec![0; MODEL_BLOCKS as usize],
            completed: vec![0; MODEL_BLOCKS as usize],
            unflushed: Vec::new(),
            writes_completed: 0,
            pending: HashMap::new(),
            busy: vec![false; MODEL_BLOCKS as usize],
        };
        for (tag, op) in ops.iter().enumerate() {
            submit_op(&mut qp, &mut model, op, tag as u64);
        }
        let granularity =
            if sectors { TearGranularity::Sector512 } else { TearGranularity::Block4K };
        let image = qp.power_cut(granularity);
        check_cut_image(&model, &image, qp.last_tear());
        let lost = drain(&mut qp);
        prop_assert_eq!(lost.len(), model.pending.len());
        prop_assert!(lost.iter().all(|(_, result)| *result == Err(IoError::PowerLoss)));
    }
}

// ---- io_uring backend -----------------------------------------------------------------------

/// A file under /var/tmp (a disk filesystem, where /tmp may be tmpfs), removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, size: u64) -> TempFile {
        let path = PathBuf::from(format!("/var/tmp/carmine-qp-{name}-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens the whole file, or prints why io_uring or O_DIRECT is unavailable here.
fn open_or_skip(test: &str, file: &TempFile, depth: u32) -> Option<UringQueuePair> {
    let size = std::fs::metadata(&file.0).unwrap().len();
    match UringQueuePair::open(&file.0, 0, size, depth) {
        Ok(qp) => Some(qp),
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            eprintln!("SKIPPED {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: open {}: {e}", file.0.display()),
    }
}

#[test]
fn uring_scatter_gather_round_trip_and_flush() {
    let file = TempFile::new("round-trip", 64 * BLOCK);
    let Some(mut qp) = open_or_skip("uring_scatter_gather_round_trip_and_flush", &file, 8) else {
        return;
    };
    check_scatter_gather_round_trip(&mut qp);
    drop(qp);
    let bytes = std::fs::read(&file.0).unwrap();
    assert_eq!(&bytes[4 * 4096..8 * 4096], &stamped(4, 4, 11)[..]);
}

#[test]
fn uring_rejects_misaligned_out_of_range_and_too_many_buffers() {
    let file = TempFile::new("rejects", 64 * BLOCK);
    if let Some(mut qp) = open_or_skip("uring_rejects", &file, 8) {
        check_rejections(&mut qp);
    }
}

#[test]
fn uring_queue_full_at_depth_and_recovery_after_poll() {
    let file = TempFile::new("queue-full", 64 * BLOCK);
    if let Some(mut qp) = open_or_skip("uring_queue_full", &file, 4) {
        check_queue_full(&mut qp);
    }
}

#[test]
fn uring_registered_buffers_use_fixed_io() {
    let file = TempFile::new("fixed", 64 * BLOCK);
    // Declared before `qp`, so dropped after it (also when unwinding from a failed assert).
    let mut region = AlignedBuf::new(4 * BLOCK_SIZE_BYTES);
    let Some(mut qp) = open_or_skip("uring_registered_buffers_use_fixed_io", &file, 4) else {
        return;
    };
    // SAFETY: `region` outlives `qp` and stays at its address.
    unsafe {
        qp.register_buffers(&[(region.as_mut_ptr(), region.len())])
            .unwrap()
    };
    stamp(&mut region[..2 * BLOCK_SIZE_BYTES], 9, 4);
    // SAFETY: drained before `region` is touched again.
    let (write, read) = unsafe { (region.io_vec_at(0, 8192), region.io_vec_at(8192, 8192)) };
    qp.submit_write(9 * BLOCK, &[write], 1).unwrap();
    assert_eq!(drain(&mut qp), vec![(1, Ok(()))]);
    qp.submit_read(9 * BLOCK, &[read], 2).unwrap();
    assert_eq!(drain(&mut qp), vec![(2, Ok(()))]);
    drop(qp);
    assert_eq!(&region[8192..], &stamped(9, 2, 4)[..]);
}

#[test]
fn uring_4mib_sequential_write_reads_back_with_same_crc32c() {
    const SIZE: usize = 4 << 20;
    let file = TempFile::new("sequential", SIZE as u64);
    let Some(mut qp) = open_or_skip("uring_4mib_sequential", &file, 8) else {
        return;
    };
    let mut data = AlignedBuf::new(SIZE);
    let mut state = 0x1234_5678_u32;
    for byte in data.iter_mut() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        *byte = state as u8;
    }
    // Eight 512 KiB requests, each gathered from 4 buffers.
    for request in 0..8 {
        let base = request * (SIZE / 8);
        // SAFETY: drained before `data` is read or dropped.
        let vecs: Vec<IoVec> = (0..4)
            .map(|part| unsafe { data.io_vec_at(base + part * (SIZE / 32), SIZE / 32) })
            .collect();
        qp.submit_write(base as u64, &vecs, request as u64).unwrap();
    }
    assert!(drain(&mut qp).iter().all(|(_, result)| result.is_ok()));
    qp.submit_flush(100).unwrap();
    assert_eq!(drain(&mut qp), vec![(100, Ok(()))]);
    let mut back = AlignedBuf::new(SIZE);
    // SAFETY: drained before `back` is read.
    let vec = unsafe { back.as_io_vec() };
    qp.submit_read(0, &[vec], 200).unwrap();
    assert_eq!(drain(&mut qp), vec![(200, Ok(()))]);
    assert_eq!(crc32c::crc32c(&back), crc32c::crc32c(&data));
}

/// Random 4 KiB reads and writes at depth 32, never two at once on one block, every read
/// checked against the last completed write. Half the slots use a registered region.
#[test]
fn uring_10k_random_4k_ios_at_depth_32_return_correct_data() {
    const BLOCKS: usize = 1024;
    const DEPTH: usize = 32;
    const IOS: usize = 10_000;
    let file = TempFile::new("random", (BLOCKS * BLOCK_SIZE_BYTES) as u64);
    // Declared before `qp`, so dropped after it (whose drop waits for I/O in flight).
    let mut registered = AlignedBuf::new(DEPTH * BLOCK_SIZE_BYTES);
    let mut plain = AlignedBuf::new(DEPTH * BLOCK_SIZE_BYTES);
    let Some(mut qp) = open_or_skip("uring_10k_random", &file, DEPTH as u32) else {
        return;
    };
    // SAFETY: `registered` outlives `qp` and stays at its address.
    unsafe {
        qp.register_buffers(&[(registered.as_mut_ptr(), registered.len())])
            .unwrap()
    };
    let mut versions = vec![0u32; BLOCKS];
    let mut busy = vec![false; BLOCKS];
    // Per slot: (block, is_write) of the request using it.
    let mut slots: Vec<Option<(usize, bool)>> = vec![None; DEPTH];
    let (mut issued, mut completed, mut reads_checked) = (0, 0, 0);
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        rng ^= rng << 7;
        rng ^= rng >> 9;
        rng
    };
    let start = Instant::now();
    while completed < IOS {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "stuck at {completed}"
        );
        for slot in 0..DEPTH {
            if slots[slot].is_some() || issued == IOS {
                continue;
            }
            let block = (next() % BLOCKS as u64) as usize;
            if busy[block] {
                continue;
            }
            let is_write = next() % 2 == 0;
            let pool = if slot % 2 == 0 {
                &mut registered
            } else {
                &mut plain
            };
            let buf = &mut pool[slot * BLOCK_SIZE_BYTES..(slot + 1) * BLOCK_SIZE_BYTES];
            if is_write {
                versions[block] += 1;
                stamp(buf, block as u64, versions[block]);
            }
            // SAFETY: the slot's part of the pool is untouched until its completion is reaped.
            let vec = unsafe { pool.io_vec_at(slot * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES) };
            let offset = (block * BLOCK_SIZE_BYTES) as u64;
            let result = if is_write {
                qp.submit_write(offset, &[vec], slot as u64)
            } else {
                qp.submit_read(offset, &[vec], slot as u64)
            };
            result.unwrap();
            busy[block] = true;
            slots[slot] = Some((block, is_write));
            issued += 1;
        }
        qp.poll(usize::MAX, &mut |tag, result| {
            assert_eq!(result, Ok(()));
            let slot = tag as usize;
            let (block, is_write) = slots[slot].take().expect("busy slot");
            busy[block] = false;
            completed += 1;
            if !is_write {
                let pool = if slot % 2 == 0 { &registered } else { &plain };
                let mut expected = [0u8; BLOCK_SIZE_BYTES];
                stamp(&mut expected, block as u64, versions[block]);
                let got = &pool[slot * BLOCK_SIZE_BYTES..(slot + 1) * BLOCK_SIZE_BYTES];
                assert!(
                    got == &expected[..],
                    "block {block} version {}",
                    versions[block]
                );
                reads_checked += 1;
            }
        });
    }
    assert_eq!(qp.in_flight(), 0);
    assert!(reads_checked > IOS / 3, "{reads_checked} reads checked");
}

/// Measurement: 4 KiB random writes at depth 32 for 2 s on a 64 MiB preallocated file.
#[test]
#[ignore = "measurement; run in release with --ignored --nocapture"]
fn uring_random_write_iops() {
    const BLOCKS: u64 = 16 * 1024;
    const DEPTH: usize = 32;
    let file = TempFile::new("iops", 0);
    // Written out first so the benchmark overwrites allocated blocks (no extent conversion).
    std::fs::write(&file.0, vec![0x55u8; (BLOCKS * BLOCK) as usize]).unwrap();
    std::fs::File::open(&file.0).unwrap().sync_all().unwrap();
    let mut pool = AlignedBuf::new(DEPTH * BLOCK_SIZE_BYTES);
    pool.fill(0xaa);
    let Some(mut qp) = open_or_skip("uring_random_write_iops", &file, DEPTH as u32) else {
        return;
    };
    // SAFETY: `pool` is declared first, so it outlives `qp`, and stays at its address.
    unsafe {
        qp.register_buffers(&[(pool.as_mut_ptr(), pool.len())])
            .unwrap()
    };
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut free: Vec<u64> = (0..DEPTH as u64).collect();
    let (mut completed, start) = (0u64, Instant::now());
    while start.elapsed() < Duration::from_secs(2) {
        while let Some(slot) = free.pop() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // SAFETY: each slot's block of `pool` is only ever written from, never modified.
            let vec = unsafe { pool.io_vec_at(slot as usize * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES) };
            qp.submit_write(rng % BLOCKS * BLOCK, &[vec], slot).unwrap();
        }
        qp.poll(usize::MAX, &mut |slot, result| {
            assert_eq!(result, Ok(()));
            free.push(slot);
            completed += 1;
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    drain(&mut qp);
    eprintln!(
        "uring 4 KiB random writes, depth {DEPTH}: {completed} in {seconds:.2} s = {:.0} IOPS",
        completed as f64 / seconds
    );
    assert!(completed > 0);
}

#[test]
fn uring_refuses_a_range_another_queue_pair_holds() {
    let test = "uring_refuses_a_range_another_queue_pair_holds";
    let file = TempFile::new("lock", 64 * BLOCK);
    let Some(first) = open_or_skip(test, &file, 4) else {
        return;
    };
    let second = open_or_skip(test, &file, 4).expect("opened once already");
    // Two shards of one device: the superblock shared, disjoint segment ranges exclusive.
    first.lock(0, BLOCK, false).unwrap();
    second.lock(0, BLOCK, false).unwrap();
    first.lock(BLOCK, 31 * BLOCK, true).unwrap();
    second.lock(32 * BLOCK, 32 * BLOCK, true).unwrap();
    // A second claim on a held range (a second server), or mkfs over all of it: refused.
    let third = open_or_skip(test, &file, 4).expect("opened once already");
    let error = third.lock(16 * BLOCK, 32 * BLOCK, true).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
    assert!(error.to_string().contains("in use"), "{error}");
    assert!(
        third.lock(0, 64 * BLOCK, false).is_err(),
        "fsck while served"
    );
    // Released when its holder goes, even though the kernel may close the file later.
    drop((first, second));
    third
        .lock(0, 64 * BLOCK, true)
        .expect("free once the holders are dropped");
}

// ---- nvme backend ---------------------------------------------------------------------------

/// The NVMe controller CARMINE_NVME_PCI names (bound to vfio-pci), or why the test is skipped.
fn nvme_or_skip(test: &str, depth: u32) -> Option<NvmeQueuePair> {
    match std::env::var("CARMINE_NVME_PCI") {
        Ok(address) if !address.is_empty() => {
            Some(NvmeQueuePair::open(&address, depth).expect("open the NVMe controller"))
        }
        _ => {
            eprintln!(
                "SKIPPED {test}: CARMINE_NVME_PCI is not set (ci/vm/test.sh runs it in a QEMU guest)"
            );
            None
        }
    }
}

#[test]
fn nvme_scatter_gather_round_trip_and_flush() {
    if let Some(mut qp) = nvme_or_skip("nvme_scatter_gather_round_trip_and_flush", 8) {
        check_scatter_gather_round_trip(&mut qp);
    }
}

#[test]
fn nvme_rejects_misaligned_out_of_range_and_too_many_buffers() {
    if let Some(mut qp) = nvme_or_skip("nvme_rejects", 8) {
        check_rejections(&mut qp);
    }
}

#[test]
fn nvme_queue_full_at_depth_and_recovery_after_poll() {
    if let Some(mut qp) = nvme_or_skip("nvme_queue_full", 4) {
        check_queue_full(&mut qp);
    }
}

#[test]
fn nvme_steady_state_io_does_not_allocate() {
    if let Some(mut qp) = nvme_or_skip("nvme_steady_state_io_does_not_allocate", 16) {
        assert_eq!(allocations_in_steady_state(&mut qp), 0, "nvme backend");
    }
}
