//! Work: what requests are made of, and where replies are booked.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Write,
    Read,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Prefill,
    Timed,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Request {
    pub(super) block: u32,
    pub(super) kind: Kind,
    pub(super) counter: u32,
}

pub(super) struct Stats {
    pub(super) ops: u64,
    pub(super) bytes: u64,
    pub(super) errors: u64,
    pub(super) by_status: BTreeMap<u32, u64>,
    pub(super) verify_failures: u64,
    pub(super) unwritten_reads: u64,
    pub(super) latency: Histogram<u64>,
    /// Busy-polling generators: wall time of passes that did work.
    pub(super) busy_ns: u64,
}

impl Stats {
    pub(super) fn new() -> Stats {
        Stats {
            ops: 0,
            bytes: 0,
            errors: 0,
            by_status: BTreeMap::new(),
            verify_failures: 0,
            unwritten_reads: 0,
            latency: Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3)
                .expect("static histogram bounds are valid"),
            busy_ns: 0,
        }
    }

    pub(super) fn error(&mut self, status: u32) {
        self.errors += 1;
        *self.by_status.entry(status).or_insert(0) += 1;
    }

    pub(super) fn absorb(&mut self, other: &Stats) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.errors += other.errors;
        for (status, n) in &other.by_status {
            *self.by_status.entry(*status).or_insert(0) += n;
        }
        self.verify_failures += other.verify_failures;
        self.unwritten_reads += other.unwritten_reads;
        self.busy_ns += other.busy_ns;
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds merge");
    }
}

pub(super) struct Work {
    pub(super) config: Arc<Config>,
    pub(super) thread: usize,
    pub(super) table: BlockTable,
    pub(super) rng: Rng,
    seq_cursor: u32,
    /// With --route: each server core's blocks (see `BlockTable::group_by_core`) and a
    /// sequential cursor per core; empty when this thread does not route.
    core_blocks: Vec<Range<u32>>,
    core_cursors: Vec<u32>,
    /// Connections whose timed ops were routed to their core (--route).
    pub(super) routed_connections: u32,
    prefill_cursor: u32,
    pub(super) phase: Phase,
    /// Set at the deadline: no new requests, only replies.
    pub(super) stopping: bool,
    pub(super) in_flight: usize,
    pub(super) timed: Stats,
    pub(super) prefill: Stats,
    /// This thread's lines of `--ack-log`.
    pub(super) ack_log: Option<ThreadLog>,
}

impl Work {
    /// Shows this thread's op count for the running phase (the progress line reads it).
    pub(super) fn publish(&self, progress: &Progress) {
        match self.phase {
            Phase::Prefill => progress
                .prefill_ops
                .store(self.prefill.ops, Ordering::Relaxed),
            Phase::Timed => progress.timed_ops.store(self.timed.ops, Ordering::Relaxed),
        }
    }

    pub(super) fn new(config: Arc<Config>, thread: usize, names: Vec<String>) -> Work {
        // The ack log's judgement needs each block's writes in order: one in flight per block.
        let exclusive = config.verify || config.ack_log.is_some();
        let table = BlockTable::new(names, config.blocks_per_object, config.bs, exclusive);
        Work {
            ack_log: config.ack_log.as_ref().map(AckLog::thread),
            rng: Rng(config.seed.wrapping_add(thread as u64)),
            table,
            config,
            thread,
            seq_cursor: 0,
            core_blocks: Vec::new(),
            core_cursors: Vec::new(),
            routed_connections: 0,
            prefill_cursor: 0,
            phase: Phase::Prefill,
            stopping: false,
            in_flight: 0,
            timed: Stats::new(),
            prefill: Stats::new(),
        }
    }

    pub(super) fn begin(&mut self, phase: Phase) {
        self.phase = phase;
        self.stopping = false;
    }

    /// True when the phase has nothing more to issue (prefill wrote every block).
    pub(super) fn exhausted(&self) -> bool {
        self.phase == Phase::Prefill && self.prefill_cursor == self.table.len()
    }

    pub(super) fn stats(&mut self) -> &mut Stats {
        match self.phase {
            Phase::Prefill => &mut self.prefill,
            Phase::Timed => &mut self.timed,
        }
    }

    /// Routes the timed phase (--route): each connection then asks for requests on the objects
    /// of its own server core. False (nothing changes) unless every core that owns some of this
    /// thread's objects has one of `conn_cores`.
    pub(super) fn route(&mut self, placement: &Placement, conn_cores: &[usize]) -> bool {
        let core_blocks = self
            .table
            .group_by_core(placement.cores, |name| placement.locate(name).core);
        let uncovered = (0..placement.cores)
            .find(|core| !core_blocks[*core].is_empty() && !conn_cores.contains(core));
        if let Some(core) = uncovered {
            log::warn!(
                "thread {}: --route: none of its {} connection(s) is on server core {core}, which owns some of its objects: not routed",
                self.thread,
                conn_cores.len()
            );
            return false;
        }
        self.core_cursors = core_blocks.iter().map(|r| r.start).collect();
        self.core_blocks = core_blocks;
        true
    }

    /// The next request to issue, marked in flight; None when stopping, done, or (with --verify)
    /// every block already has a request in flight. `core`: the server core of the connection
    /// asking, when routed; its timed requests are then on that core's objects only.
    pub(super) fn next_request(&mut self, core: Option<usize>) -> Option<Request> {
        if self.stopping {
            return None;
        }
        let request = match self.phase {
            Phase::Prefill => {
                if self.exhausted() {
                    return None;
                }
                self.prefill_cursor += 1;
                Request {
                    block: self.prefill_cursor - 1,
                    kind: Kind::Write,
                    counter: 1,
                }
            }
            Phase::Timed => {
                let kind = match self.config.workload {
                    Workload::Randwrite | Workload::Seqwrite => Kind::Write,
                    Workload::Randread | Workload::Seqread => Kind::Read,
                    Workload::Mixed if self.rng.below(100) < u64::from(self.config.read_pct) => {
                        Kind::Read
                    }
                    Workload::Mixed => Kind::Write,
                };
                let routed = core.and_then(|c| self.core_blocks.get(c).map(|r| (c, r.clone())));
                let block = match (routed, self.config.workload.sequential()) {
                    (Some((c, range)), true) => self
                        .table
                        .pick_sequential_in(&mut self.core_cursors[c], &range)?,
                    (Some((_, range)), false) => {
                        self.table.pick_random_in(&mut self.rng, &range)?
                    }
                    (None, true) => self.table.pick_sequential(&mut self.seq_cursor)?,
                    (None, false) => self.table.pick_random(&mut self.rng)?,
                };
                // Without --verify two writes to a block may overlap; they then carry the same
                // counter and identical data, so the block stays self-consistent either way.
                let counter = self.table.counters[block as usize].wrapping_add(1).max(1);
                Request {
                    block,
                    kind,
                    counter,
                }
            }
        };
        self.table.set_busy(request.block, true);
        self.in_flight += 1;
        Some(request)
    }

    /// Appends the request's frame to `tx`.
    pub(super) fn encode(&mut self, tx: &mut Vec<u8>, request_id: u64, request: Request) {
        let start = tx.len();
        self.encode_at(tx, start, request_id, request);
    }

    /// Writes the request's frame over `frame`'s contents (a datagram request body reused:
    /// a write's old block is overwritten, not zeroed first).
    pub(super) fn encode_over(&mut self, frame: &mut Vec<u8>, request_id: u64, request: Request) {
        self.encode_at(frame, 0, request_id, request);
    }

    /// Writes the request's frame at `tx[start..]`; `tx` ends with it.
    fn encode_at(&mut self, tx: &mut Vec<u8>, start: usize, request_id: u64, request: Request) {
        let (object, offset) = self.table.locate(request.block);
        let name = &self.table.names[object];
        match request.kind {
            Kind::Write => {
                if let Some(ack_log) = self.ack_log.as_mut() {
                    ack_log.issued(name, offset, self.config.bs, request.counter);
                }
                // The block is made in the frame itself (no staging buffer to copy from).
                let hash = self.table.name_hashes[object];
                let counter = u64::from(request.counter);
                let bs = self.config.bs as usize;
                wire::encode_write_request(tx, start, request_id, name, offset, bs, |block| {
                    fill_block(block, hash, offset, counter)
                });
            }
            Kind::Read => {
                tx.truncate(start);
                let ops = [SubOpSpec::read(offset, self.config.bs)];
                wire::encode_request(tx, Opcode::OsdOp, request_id, name, &ops, b"");
            }
        }
    }

    /// Books a reply: `status` is the op's status (the sub-op's when the op itself succeeded).
    pub(super) fn complete(&mut self, slot: &Slot, now_ns: u64, status: u32, output: &[u8]) {
        self.in_flight -= 1;
        self.table.set_busy(slot.request.block, false);
        let stats = match self.phase {
            Phase::Prefill => &mut self.prefill,
            Phase::Timed => &mut self.timed,
        };
        stats.ops += 1;
        stats
            .latency
            .saturating_record(now_ns.saturating_sub(slot.sent_ns).max(1));
        let block = slot.request.block as usize;
        match slot.request.kind {
            Kind::Write if status == Status::Ok as u32 => {
                stats.bytes += self.config.bs;
                self.table.counters[block] = self.table.counters[block].max(slot.request.counter);
                if let Some(ack_log) = self.ack_log.as_mut() {
                    let (object, offset) = self.table.locate(slot.request.block);
                    let name = &self.table.names[object];
                    ack_log.acked(name, offset, self.config.bs, slot.request.counter);
                }
            }
            Kind::Write => stats.error(status),
            Kind::Read => self.complete_read(slot.request.block, status, output),
        }
    }

    fn complete_read(&mut self, block: u32, status: u32, output: &[u8]) {
        let expected = self.table.counters[block as usize];
        // A block nobody wrote is legitimately missing, unless this run wrote it (or prefilled it).
        let may_be_unwritten = expected == 0 && !self.config.prefill;
        if status == Status::NotFound as u32 && may_be_unwritten {
            self.stats().unwritten_reads += 1;
            return;
        }
        if status != Status::Ok as u32 {
            self.stats().error(status);
            if status == Status::NotFound as u32 && self.config.verify {
                self.verify_failed(
                    block,
                    expected,
                    Mismatch {
                        reason: "object not found",
                        got_counter: 0,
                        byte: 0,
                    },
                );
            }
            return;
        }
        self.stats().bytes += output.len() as u64;
        if !self.config.verify {
            return;
        }
        let (object, offset) = self.table.locate(block);
        let hash = self.table.name_hashes[object];
        match check_block(output, self.config.bs as usize, hash, offset, expected) {
            BlockCheck::Intact { .. } => {}
            BlockCheck::Unwritten if may_be_unwritten => self.stats().unwritten_reads += 1,
            BlockCheck::Unwritten => {
                let mismatch = Mismatch {
                    reason: "block reads as never written",
                    got_counter: 0,
                    byte: 0,
                };
                self.verify_failed(block, expected, mismatch)
            }
            BlockCheck::Mismatch(mismatch) => self.verify_failed(block, expected, mismatch),
        }
    }

    fn verify_failed(&mut self, block: u32, expected: u32, mismatch: Mismatch) {
        let stats = self.stats();
        stats.verify_failures += 1;
        if stats.verify_failures <= VERIFY_LOG_MAX {
            let (object, offset) = self.table.locate(block);
            log::error!(
                "verify failure (thread {}): {} offset {offset}: {} at byte {} (expected counter {expected}, got {})",
                self.thread,
                String::from_utf8_lossy(&self.table.names[object]),
                mismatch.reason,
                mismatch.byte,
                mismatch.got_counter
            );
        }
    }
}
