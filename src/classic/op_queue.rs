//! The sharded op queue (Ceph's `ShardedOpWQ`): ops go to shard `pg % shards`; each shard is a
//! `Mutex` + two `Condvar`s, shared by that shard's worker threads.
//!
//! Ordering per PG with several workers per shard, as Ceph does it: the shard keeps one FIFO of
//! ops per PG (the "pg slot") and a FIFO of tokens naming PGs, one token per queued op. A worker
//! pops a token, takes that PG's lock, and only then pops the *front* of the PG's slot. Whichever
//! worker gets the PG lock first runs the PG's oldest op, so ops on one PG run in arrival order.
//!
//! Bounded: a shard holds at most `capacity` ops; a messenger pushing into a full shard waits
//! (and so stops reading its sockets: back-pressure reaches the clients through TCP).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

use carmine_dataplane::wire::Header;

use crate::classic::connection::Conn;
use std::sync::Arc;

/// One decoded request on its way to a worker. The frame is owned (the messenger copied it out
/// of its connection's receive buffer, as a classic messenger decodes into a message).
pub struct Op {
    pub conn: Arc<Conn>,
    pub header: Header,
    pub frame: Vec<u8>,
    /// The PG's index among its shard's PGs.
    pub local_pg: u32,
    pub object_hash: u32,
    pub mutates: bool,
}

struct ShardState {
    /// One token (a local PG index) per queued op, in arrival order.
    tokens: VecDeque<u32>,
    /// Per PG: its queued ops, oldest first.
    slots: Vec<VecDeque<Op>>,
    queued: usize,
    stopping: bool,
    /// Workers waiting in `pop` (notify only when someone waits: a futex wake is a syscall).
    idle_workers: u32,
    /// Messengers waiting in `push` for room.
    blocked_pushers: u32,
}

struct Shard {
    state: Mutex<ShardState>,
    not_empty: Condvar,
    not_full: Condvar,
}

pub struct OpQueue {
    shards: Vec<Shard>,
    capacity: usize,
}

fn lock(shard: &Shard) -> MutexGuard<'_, ShardState> {
    shard.state.lock().expect("op queue lock poisoned")
}

impl OpQueue {
    /// `pgs_per_shard[s]` PG slots in shard s, each shard holding at most `capacity` ops.
    pub fn new(pgs_per_shard: &[u32], capacity: usize) -> OpQueue {
        assert!(capacity > 0);
        let shards = pgs_per_shard
            .iter()
            .map(|&pgs| Shard {
                state: Mutex::new(ShardState {
                    tokens: VecDeque::with_capacity(capacity),
                    slots: (0..pgs).map(|_| VecDeque::new()).collect(),
                    queued: 0,
                    stopping: false,
                    idle_workers: 0,
                    blocked_pushers: 0,
                }),
                not_empty: Condvar::new(),
                not_full: Condvar::new(),
            })
            .collect();
        OpQueue { shards, capacity }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Appends `ops` (all for `shard`) in order: one lock round for the batch, waiting for room
    /// when the shard is full.
    pub fn push_batch(&self, shard: usize, ops: &mut Vec<Op>) {
        let shard_ref = &self.shards[shard];
        let mut state = lock(shard_ref);
        let mut ops = ops.drain(..);
        loop {
            while state.queued < self.capacity {
                let Some(op) = ops.next() else {
                    if state.idle_workers > 0 {
                        shard_ref.not_empty.notify_all();
                    }
                    return;
                };
                state.tokens.push_back(op.local_pg);
                state.slots[op.local_pg as usize].push_back(op);
                state.queued += 1;
            }
            if state.idle_workers > 0 {
                shard_ref.not_empty.notify_all();
            }
            state.blocked_pushers += 1;
            state = shard_ref.not_full.wait(state).expect("op queue lock");
            state.blocked_pushers -= 1;
        }
    }

    /// Puts ops that waited on their PG back at the front of its slot, oldest first, so they run
    /// before anything that arrived after them. Never blocks (they were counted before).
    pub fn requeue_front(&self, shard: usize, local_pg: u32, ops: VecDeque<Op>) {
        let shard_ref = &self.shards[shard];
        let mut state = lock(shard_ref);
        for op in ops.into_iter().rev() {
            state.tokens.push_back(local_pg);
            state.slots[local_pg as usize].push_front(op);
            state.queued += 1;
        }
        if state.idle_workers > 0 {
            shard_ref.not_empty.notify_all();
        }
    }

    /// A PG with queued work, without waiting. None when the shard is empty.
    pub fn try_next_pg(&self, shard: usize) -> Option<u32> {
        lock(&self.shards[shard]).tokens.pop_front()
    }

    /// Waits for a PG with queued work. None once the queue is stopping and the shard is empty.
    pub fn next_pg(&self, shard: usize) -> Option<u32> {
        let shard_ref = &self.shards[shard];
        let mut state = lock(shard_ref);
        loop {
            if let Some(pg) = state.tokens.pop_front() {
                return Some(pg);
            }
            if state.stopping && state.queued == 0 {
                return None;
            }
            state.idle_workers += 1;
            state = shard_ref.not_empty.wait(state).expect("op queue lock");
            state.idle_workers -= 1;
        }
    }

    /// The oldest op of `local_pg`. Called with the PG's lock held, after a token for it.
    pub fn take_op(&self, shard: usize, local_pg: u32) -> Op {
        let shard_ref = &self.shards[shard];
        let mut state = lock(shard_ref);
        let op = state.slots[local_pg as usize]
            .pop_front()
            .expect("a token stands for one queued op");
        state.queued -= 1;
        if state.blocked_pushers > 0 {
            shard_ref.not_full.notify_all();
        }
        op
    }

    /// Workers exit once their shard is empty.
    pub fn stop(&self) {
        for shard in &self.shards {
            lock(shard).stopping = true;
            shard.not_empty.notify_all();
        }
    }
}
