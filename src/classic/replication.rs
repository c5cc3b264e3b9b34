//! The null replication hook in classic mode: a timer thread. A write that needs replica acks
//! is applied by its worker, counted in its PG's `unacked_writes`, and parked here until
//! `replication_cost` has passed; then the PG is told (reads held behind the write go back to
//! the op queue) and the reply goes to the finisher. Workers never sleep on it.
//!
//! Every write waits the same cost, so deadlines arrive in (almost) push order: a FIFO is the
//! timer queue. A deadline pushed a few microseconds out of order fires a few microseconds late.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::classic::finisher::Reply;
use crate::classic::worker::release_pg;
use crate::classic::Shared;

pub struct Acked {
    pub shard: usize,
    pub local_pg: u32,
    pub reply: Reply,
}

struct State {
    pending: VecDeque<(Instant, Acked)>,
    stopping: bool,
}

pub struct Replication {
    cost: Duration,
    state: Mutex<State>,
    ready: Condvar,
}

impl Replication {
    pub fn new(cost: Duration) -> Replication {
        Replication {
            cost,
            state: Mutex::new(State {
                pending: VecDeque::new(),
                stopping: false,
            }),
            ready: Condvar::new(),
        }
    }

    pub fn push(&self, acked: Acked) {
        let deadline = Instant::now() + self.cost;
        let mut state = self.state.lock().expect("replication lock");
        let was_empty = state.pending.is_empty();
        state.pending.push_back((deadline, acked));
        if was_empty {
            self.ready.notify_one();
        }
    }

    pub fn stop(&self) {
        self.state.lock().expect("replication lock").stopping = true;
        self.ready.notify_one();
    }

    /// The next write whose acks are due, waiting for it. None once stopped and empty.
    fn next_due(&self) -> Option<Acked> {
        let mut state = self.state.lock().expect("replication lock");
        loop {
            let now = Instant::now();
            match state.pending.front() {
                Some((deadline, _)) if *deadline <= now => {
                    return state.pending.pop_front().map(|(_, acked)| acked);
                }
                Some((deadline, _)) => {
                    let wait = *deadline - now;
                    state = self.ready.wait_timeout(state, wait).expect("lock").0;
                }
                None if state.stopping => return None,
                None => state = self.ready.wait(state).expect("replication lock"),
            }
        }
    }
}

/// The timer thread's loop.
pub fn run(shared: &Shared, replication: &Replication) {
    while let Some(acked) = replication.next_due() {
        release_pg(shared, acked.shard, acked.local_pg);
        shared.finisher.push(acked.reply);
    }
}
