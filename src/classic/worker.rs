//! Worker threads: each serves one shard of the op queue. A worker pops a PG with work, takes
//! the PG's lock (`Mutex<ClassicPg>`), takes that PG's oldest op, orders it (`Pg`: version, PG
//! log; reads wait behind writes not yet acknowledged, exactly as in RTC mode), applies it to
//! the shard's store (under the store's lock), encodes the reply and hands it to the finisher.
//!
//! The op logic is the RTC core's (`to_store_op`, `first_failure`, the same statuses and
//! counters); only the execution model differs.

use std::collections::VecDeque;
use std::sync::Arc;

use carmine_dataplane::wire::{
    self, Frame, Header, Status, HEADER_SIZE, SUB_OPS_CEILING, SUB_OP_RESULT_SIZE,
};
use carmine_storage::{SubOp, SubOpResult};

use crate::classic::finisher::Reply;
use crate::classic::op_queue::Op;
use crate::classic::replication::Acked;
use crate::classic::store::PendingOp;
use crate::classic::Shared;
use crate::osd::core::{error_counter, first_failure, spin_for, status_of, to_store_op};
use crate::osd::message::Results;
use crate::osd::pg::Pg;
use crate::osd::stats::{Counter, Counters, SharedCounters};

/// Ops between two publications of a busy worker's counters.
const PUBLISH_EVERY_OPS: u32 = 64;

/// A PG in classic mode: the same `Pg` as RTC mode, plus the ops waiting for it (reads behind
/// unacknowledged writes, and everything behind them), guarded by the PG lock.
pub struct ClassicPg {
    pub pg: Pg,
    pub waiting: VecDeque<Op>,
}

struct Worker<'a> {
    shared: &'a Shared,
    shard: usize,
    counters: Counters,
    published: Arc<SharedCounters>,
    unpublished_ops: u32,
}

/// A worker thread's loop: until the queue stops and its shard is empty.
pub fn run(shared: &Shared, shard: usize, entry: usize) {
    let mut worker = Worker {
        shared,
        shard,
        counters: Counters::default(),
        published: shared.board.core(entry),
        unpublished_ops: 0,
    };
    loop {
        let local_pg = match shared.queue.try_next_pg(shard) {
            Some(pg) => pg,
            None => {
                worker.publish();
                match shared.queue.next_pg(shard) {
                    Some(pg) => pg,
                    None => break,
                }
            }
        };
        let (reply, frame) = {
            let mut pg = shared.pgs[shard][local_pg as usize]
                .lock()
                .expect("PG lock poisoned");
            let op = shared.queue.take_op(shard, local_pg);
            worker.execute(&mut pg, op)
        };
        if let Some(frame) = frame {
            shared.buffers.give([frame]);
        }
        if let Some(reply) = reply {
            shared.finisher.push(reply);
        }
        worker.unpublished_ops += 1;
        if worker.unpublished_ops >= PUBLISH_EVERY_OPS {
            worker.publish();
        }
    }
    worker.publish();
}

/// An op's reply with no per-sub-op results (failed before or as a whole in the store).
pub(crate) fn status_reply(header: &Header, status: Status) -> Vec<u8> {
    let mut bytes = [0u8; HEADER_SIZE].to_vec();
    wire::encode_reply(&mut bytes, header, status, &[], &[]);
    bytes
}

impl Worker<'_> {
    fn publish(&mut self) {
        self.published.publish(&self.counters);
        self.unpublished_ops = 0;
    }

    /// Runs `op` with its PG locked: its reply (None while it waits on the PG or on replica
    /// acks) and its frame, done with, for the buffer pool.
    fn execute(&mut self, pg: &mut ClassicPg, mut op: Op) -> (Option<Reply>, Option<Vec<u8>>) {
        if pg.pg.must_queue(op.mutates) {
            self.counters.add(Counter::pg_queued, 1);
            pg.waiting.push_back(op);
            pg.pg.queued += 1;
            return (None, None);
        }
        let reply = self.run_op(pg, &op);
        (reply, Some(std::mem::take(&mut op.frame)))
    }

    fn run_op(&mut self, pg: &mut ClassicPg, op: &Op) -> Option<Reply> {
        let view = Frame::view(op.header, &op.frame);
        let mut store_ops = [SubOp::Stat; SUB_OPS_CEILING as usize];
        let mut count = 0;
        let mut output_len: u64 = 0;
        let mut sub_op_mask: u16 = 0;
        let mut written: u64 = 0;
        for sub_op in view.sub_ops() {
            let store_op = to_store_op(&sub_op);
            output_len = output_len.saturating_add(store_op.output_len_max().unwrap_or(0));
            if sub_op.code.is_mutation() {
                sub_op_mask |= 1 << (sub_op.code as u16);
            }
            written += sub_op.data.len() as u64;
            store_ops[count] = store_op;
            count += 1;
        }
        if output_len > self.shared.output_len_max {
            count_op(&mut self.counters, op.mutates, 0, 0, Status::OverLimit);
            let bytes = status_reply(&op.header, Status::OverLimit);
            return Some(Reply {
                conn: op.conn.clone(),
                bytes,
            });
        }
        if op.mutates {
            if !self.shared.hooks.snapshot_cost.is_zero() {
                spin_for(self.shared.hooks.snapshot_cost);
            }
            pg.pg.next_version(op.object_hash, sub_op_mask);
        }
        let head_len = HEADER_SIZE + count * SUB_OP_RESULT_SIZE;
        let mut bytes = self.shared.buffers.take(head_len + output_len as usize);
        bytes.resize(head_len + output_len as usize, 0);
        let mut results = [SubOpResult::default(); SUB_OPS_CEILING as usize];
        let shard_store = &self.shared.stores[self.shard];
        let park = |bytes| PendingOp {
            conn: op.conn.clone(),
            header: op.header,
            bytes,
            head_len,
            sub_op_count: count,
            mutates: op.mutates,
            written,
            local_pg: op.local_pg,
        };
        let submitted = shard_store.lock().submit(
            view.oid,
            &store_ops[..count],
            &mut results[..count],
            park,
            bytes,
            head_len,
        );
        let (bytes, result) = match submitted {
            Some(done) => done,
            None => {
                // The store thread replies. Until then the write holds its PG (reads wait
                // behind it, as behind an unacknowledged write in RTC mode).
                if op.mutates {
                    pg.pg.unacked_writes += 1;
                }
                shard_store.kick();
                return None;
            }
        };
        if let Err(error) = result {
            // Failed as a whole: nothing was applied, so no per-sub-op results and no output.
            let status = status_of(error);
            count_op(&mut self.counters, op.mutates, written, 0, status);
            self.shared.buffers.give([bytes]);
            return Some(Reply {
                conn: op.conn.clone(),
                bytes: status_reply(&op.header, status),
            });
        }
        let (bytes, status, output_used) =
            encode_results(&op.header, bytes, head_len, &results[..count]);
        count_op(
            &mut self.counters,
            op.mutates,
            written,
            output_used as u64,
            status,
        );
        let reply = Reply {
            conn: op.conn.clone(),
            bytes,
        };
        if op.mutates && self.shared.hooks.replicas > 0 {
            pg.pg.unacked_writes += 1;
            let replication = self.shared.replication.as_ref().expect("replicas > 0");
            replication.push(Acked {
                shard: self.shard,
                local_pg: op.local_pg,
                reply,
            });
            return None;
        }
        Some(reply)
    }
}

/// Encodes the reply of an applied op into `bytes` (head space of `head_len`, then the
/// output the store wrote): returns the trimmed frame, its status and the output length.
pub(crate) fn encode_results(
    header: &Header,
    mut bytes: Vec<u8>,
    head_len: usize,
    results: &[SubOpResult],
) -> (Vec<u8>, Status, usize) {
    let mut table = Results {
        count: results.len() as u8,
        ..Results::default()
    };
    let mut output_used = 0usize;
    for (item, result) in table.items.iter_mut().zip(results) {
        *item = (u32::from(result.status), result.out_len);
        output_used += result.out_len as usize;
    }
    let status = first_failure(&table);
    let (head, output) = bytes.split_at_mut(head_len);
    wire::encode_reply(
        head,
        header,
        status,
        table.as_slice(),
        &[&output[..output_used]],
    );
    bytes.truncate(head_len + output_used);
    (bytes, status, output_used)
}

/// A write the PG waited on is acknowledged: once none is left, the ops held behind it go
/// back to the front of the op queue.
pub(crate) fn release_pg(shared: &Shared, shard: usize, local_pg: u32) {
    let mut pg = shared.pgs[shard][local_pg as usize]
        .lock()
        .expect("PG lock poisoned");
    pg.pg.unacked_writes -= 1;
    if pg.pg.unacked_writes == 0 && !pg.waiting.is_empty() {
        let waiting = std::mem::take(&mut pg.waiting);
        pg.pg.queued = 0;
        shared.queue.requeue_front(shard, local_pg, waiting);
    }
}

pub(crate) fn count_op(c: &mut Counters, mutates: bool, written: u64, read: u64, status: Status) {
    c.add(Counter::ops, 1);
    if mutates {
        c.add(Counter::ops_write, 1);
        c.add(Counter::bytes_written, written);
    } else {
        c.add(Counter::ops_read, 1);
    }
    c.add(Counter::bytes_read, read);
    if status != Status::Ok {
        c.add(error_counter(status), 1);
    }
}
