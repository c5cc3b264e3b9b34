//! The finisher: one thread that takes completed ops from a queue and writes their replies.
//!
//! Workers push a finished reply and go back to the op queue at once; the finisher takes every
//! reply queued so far in one lock round, groups them by connection, and writes each group with
//! one `writev` (under the connection's write lock). That batching is the tuning a classic
//! server gets from a dedicated reply thread; the price is one more thread hand-off per op.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

use crate::classic::connection::Conn;
use crate::classic::Shared;
use crate::osd::stats::{Counter, Counters};

/// Replies taken in one batch at most (bounds the per-batch vectors; the rest waits a round).
const BATCH_MAX: usize = 1024;

/// A complete reply frame for a connection.
pub struct Reply {
    pub conn: Arc<Conn>,
    pub bytes: Vec<u8>,
}

struct State {
    replies: VecDeque<Reply>,
    idle: bool,
    stopping: bool,
}

pub struct Finisher {
    state: Mutex<State>,
    ready: Condvar,
}

impl Finisher {
    pub fn new() -> Finisher {
        Finisher {
            state: Mutex::new(State {
                replies: VecDeque::new(),
                idle: false,
                stopping: false,
            }),
            ready: Condvar::new(),
        }
    }

    pub fn push(&self, reply: Reply) {
        let mut state = self.state.lock().expect("finisher lock");
        state.replies.push_back(reply);
        if state.idle {
            state.idle = false;
            self.ready.notify_one();
        }
    }

    pub fn stop(&self) {
        let mut state = self.state.lock().expect("finisher lock");
        state.stopping = true;
        self.ready.notify_one();
    }

    /// Moves up to `BATCH_MAX` replies into `batch`, waiting for some. False once stopped and empty.
    fn take(&self, batch: &mut Vec<Reply>) -> bool {
        let mut state = self.state.lock().expect("finisher lock");
        while state.replies.is_empty() {
            if state.stopping {
                return false;
            }
            state.idle = true;
            state = self.ready.wait(state).expect("finisher lock");
        }
        let count = state.replies.len().min(BATCH_MAX);
        batch.extend(state.replies.drain(..count));
        true
    }
}

/// The finisher thread's loop: until stopped and drained.
pub fn run(shared: &Shared, entry: usize) {
    let published = shared.board.core(entry);
    let mut counters = Counters::default();
    let mut batch: Vec<Reply> = Vec::with_capacity(BATCH_MAX);
    while shared.finisher.take(&mut batch) {
        // Stable: each connection's replies keep their order (not required by the protocol,
        // which matches replies by request id, but free).
        batch.sort_by_key(|reply| Arc::as_ptr(&reply.conn) as usize);
        let mut start = 0;
        while start < batch.len() {
            let conn = &batch[start].conn;
            let end = start
                + batch[start..]
                    .iter()
                    .take_while(|r| Arc::ptr_eq(&r.conn, conn))
                    .count();
            let frames: Vec<&[u8]> = batch[start..end].iter().map(|r| &r.bytes[..]).collect();
            let sent = conn.send(&frames, true);
            counters.add(Counter::tx_bytes, sent.bytes);
            counters.add(Counter::tx_syscalls, sent.syscalls);
            start = end;
        }
        shared
            .gauges
            .ops_in_flight
            .fetch_sub(batch.len() as u64, Ordering::AcqRel);
        shared
            .buffers
            .give(batch.drain(..).map(|reply| reply.bytes));
        published.publish(&counters);
    }
}
