//! A shard's store in classic mode, shared by the shard's workers under a lock, and the store
//! thread that completes its asynchronous ops (BlueStore's role split: workers queue
//! transactions, a store thread waits for the device and hands finished ops to the finisher).
//!
//! A worker locks the store, takes a tag, submits. The memory store finishes at once and the
//! worker replies as before. The segment store answers Pending: the worker parks the op's
//! context (its reply buffer, which the store fills in place, and what the reply needs) under
//! the tag, counts a write in its PG's `unacked_writes` (reads queue behind it, as in RTC
//! mode) and goes back to the op queue. The store thread sleeps in `poll(2)` on an eventfd
//! that both the kernel (one signal per io_uring completion) and workers (after a submit,
//! only when the thread sleeps) write; awake, it locks the store, polls it, and finishes each
//! completed op: reply encoded, PG released (or the replication hook), reply to the finisher.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use carmine_dataplane::reactor::Waker;
use carmine_dataplane::wire::{Header, SUB_OPS_CEILING};
use carmine_storage::segment::SegmentStore;
use carmine_storage::{
    ObjectStore, OutputBuffer, StoreError, StoreStats, SubOp, SubOpResult, Submit, UringQueuePair,
};

use crate::classic::connection::Conn;
use crate::classic::finisher::Reply;
use crate::classic::replication::Acked;
use crate::classic::worker::{count_op, encode_results, release_pg, status_reply};
use crate::classic::Shared;
use crate::osd::core::status_of;
use crate::osd::stats::Counters;

/// Completions taken from the store per lock round (bounds the gathering array).
const COMPLETIONS_PER_ROUND_MAX: usize = 64;
/// Longest sleep while the store has work but no I/O to wake the thread (the cleaner waiting
/// for space, say): a bound on how late such work is noticed, not a polling interval.
const SLEEP_BUSY_MAX: Duration = Duration::from_millis(1);
/// Longest sleep with nothing in the store, so a stopping server is noticed.
const SLEEP_IDLE_MAX: Duration = Duration::from_millis(50);

/// What a Pending op's reply needs when the store thread finishes it.
pub struct PendingOp {
    pub conn: Arc<Conn>,
    pub header: Header,
    /// Reply head space, then the output the store writes in place.
    pub bytes: Vec<u8>,
    pub head_len: usize,
    pub sub_op_count: usize,
    pub mutates: bool,
    pub written: u64,
    pub local_pg: u32,
}

/// The store and the ops it has not finished, under one lock.
pub struct StoreState {
    store: Box<dyn ObjectStore + Send>,
    /// Pending ops by tag slot; `None` for a free slot.
    pending: Vec<Option<PendingOp>>,
    free: Vec<u32>,
    pending_count: usize,
}

impl StoreState {
    pub fn stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// Submits an op whose reply is `bytes` (head space of `head_len`, then output room). On
    /// Pending the op's context is parked here and `None` comes back; otherwise `bytes` comes
    /// back with the result.
    pub fn submit(
        &mut self,
        oid: &[u8],
        ops: &[SubOp<'_>],
        results: &mut [SubOpResult],
        park: impl FnOnce(Vec<u8>) -> PendingOp,
        mut bytes: Vec<u8>,
        head_len: usize,
    ) -> Option<(Vec<u8>, Result<(), StoreError>)> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.pending.push(None);
                (self.pending.len() - 1) as u32
            }
        };
        debug_assert!(self.pending[slot as usize].is_none());
        let submitted = {
            let spare = &mut bytes[head_len..];
            // SAFETY: the region is the heap buffer of `bytes`, which this op owns until it is
            // finished: on Done/Err below it is handed back to the caller after `submit`
            // returns; on Pending it is moved into `self.pending[slot]` (moving a Vec does not
            // move its heap buffer) and not touched, resized or freed until the store reports
            // the op complete from `poll`.
            let mut out = unsafe { OutputBuffer::from_raw(spare.as_mut_ptr(), spare.len()) };
            self.store
                .submit(u64::from(slot), oid, ops, &mut out, results)
        };
        match submitted {
            Ok(Submit::Pending) => {
                self.pending[slot as usize] = Some(park(bytes));
                self.pending_count += 1;
                None
            }
            Ok(Submit::Done) => {
                self.free.push(slot);
                Some((bytes, Ok(())))
            }
            Err(error) => {
                self.free.push(slot);
                Some((bytes, Err(error)))
            }
        }
    }
}

pub struct ShardStore {
    state: Mutex<StoreState>,
    /// Present for an asynchronous store: the store thread's wake-up (also the ring's
    /// completion eventfd).
    waker: Option<Waker>,
    /// Pending submits so far; the store thread compares it before sleeping.
    submits: AtomicU64,
    stopping: AtomicBool,
}

impl ShardStore {
    pub fn memory(store: carmine_storage::MemoryStore) -> ShardStore {
        ShardStore::new(Box::new(store), None)
    }

    /// A segment-store shard, whose device completions wake the store thread.
    pub fn segment(mut store: SegmentStore<UringQueuePair>) -> Result<ShardStore, String> {
        let waker = Waker::new().map_err(|e| format!("eventfd: {e}"))?;
        let wakes = store
            .wake_on_completion(waker.fd())
            .map_err(|e| format!("io_uring eventfd: {e}"))?;
        assert!(wakes, "an io_uring queue pair signals completions");
        Ok(ShardStore::new(Box::new(store), Some(waker)))
    }

    fn new(store: Box<dyn ObjectStore + Send>, waker: Option<Waker>) -> ShardStore {
        ShardStore {
            state: Mutex::new(StoreState {
                store,
                pending: Vec::new(),
                free: Vec::new(),
                pending_count: 0,
            }),
            waker,
            submits: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    /// Whether this store needs a store thread.
    pub fn asynchronous(&self) -> bool {
        self.waker.is_some()
    }

    pub fn lock(&self) -> MutexGuard<'_, StoreState> {
        self.state.lock().expect("store lock poisoned")
    }

    /// After a submit that answered Pending (with the lock released): the store thread must
    /// poll the store soon, since it flushes queued records only when polled.
    pub fn kick(&self) {
        self.submits.fetch_add(1, Ordering::Relaxed);
        if let Some(waker) = &self.waker {
            waker.wake_if_sleeping();
        }
    }

    /// The store thread exits once nothing is pending and the store is idle.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(waker) = &self.waker {
            waker.wake();
        }
    }
}

/// One completion, gathered under the store lock and finished after it is released.
type Completion = (
    PendingOp,
    Result<[SubOpResult; SUB_OPS_CEILING as usize], StoreError>,
);

/// The store thread of shard `shard` (only for an asynchronous store).
pub fn run(shared: &Shared, shard: usize, entry: usize) {
    let shard_store = &shared.stores[shard];
    let waker = shard_store.waker.as_ref().expect("asynchronous store");
    let published = shared.board.core(entry);
    let mut counters = Counters::default();
    let mut done: Vec<Completion> = Vec::with_capacity(COMPLETIONS_PER_ROUND_MAX);
    loop {
        let seen = shard_store.submits.load(Ordering::Relaxed);
        let (busy, pending) = {
            let mut guard = shard_store.lock();
            let StoreState {
                store,
                pending,
                free,
                pending_count,
            } = &mut *guard;
            store.poll(COMPLETIONS_PER_ROUND_MAX, &mut |tag, result| {
                let op = pending[tag as usize].take().expect("a pending op per tag");
                free.push(tag as u32);
                *pending_count -= 1;
                let result = result.map(|results| {
                    let mut copy = [SubOpResult::default(); SUB_OPS_CEILING as usize];
                    copy[..results.len()].copy_from_slice(results);
                    copy
                });
                done.push((op, result));
            });
            (store.busy(), *pending_count)
        };
        let finished = done.len();
        for (op, result) in done.drain(..) {
            finish(shared, shard, &mut counters, op, result);
        }
        if finished > 0 {
            published.publish(&counters);
            continue;
        }
        if pending == 0 && !busy && shard_store.stopping.load(Ordering::Acquire) {
            break;
        }
        waker.prepare_park();
        if shard_store.submits.load(Ordering::Relaxed) == seen {
            let timeout = if busy || pending > 0 {
                SLEEP_BUSY_MAX
            } else {
                SLEEP_IDLE_MAX
            };
            sleep_on(waker.fd(), timeout);
        }
        waker.finish_park();
    }
    published.publish(&counters);
}

/// Sleeps until `fd` is readable or `timeout` passes.
fn sleep_on(fd: i32, timeout: Duration) {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one live pollfd on the stack; the descriptor is the waker's own eventfd.
    unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis().max(1) as i32) };
}

/// A Pending op the store has finished: reply, PG and counters, as a worker would for a
/// store that completes at once.
fn finish(
    shared: &Shared,
    shard: usize,
    counters: &mut Counters,
    op: PendingOp,
    result: Result<[SubOpResult; SUB_OPS_CEILING as usize], StoreError>,
) {
    let (reply, applied) = match result {
        Err(error) => {
            // Failed as a whole: nothing was applied, so no per-sub-op results and no output.
            let status = status_of(error);
            count_op(counters, op.mutates, op.written, 0, status);
            (status_reply(&op.header, status), false)
        }
        Ok(results) => {
            let (bytes, status, output_used) = encode_results(
                &op.header,
                op.bytes,
                op.head_len,
                &results[..op.sub_op_count],
            );
            count_op(counters, op.mutates, op.written, output_used as u64, status);
            (bytes, true)
        }
    };
    let reply = Reply {
        conn: op.conn,
        bytes: reply,
    };
    if op.mutates && applied && shared.hooks.replicas > 0 {
        // The PG stays held (unacked_writes) until the simulated replica acks.
        let replication = shared.replication.as_ref().expect("replicas > 0");
        replication.push(Acked {
            shard,
            local_pg: op.local_pg,
            reply,
        });
        return;
    }
    if op.mutates {
        release_pg(shared, shard, op.local_pg);
    }
    shared.finisher.push(reply);
}
