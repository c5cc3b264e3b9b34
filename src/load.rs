//! `carmine load`: a closed-loop load generator speaking the OSD wire protocol.
//!
//! Each generator thread owns some TCP connections (non-blocking, driven by epoll) and a disjoint
//! set of objects (object i belongs to thread i % threads), so threads never coordinate during the
//! timed run. Every connection keeps `qd` requests in flight: a reply frees a slot, the slot is
//! refilled at once, and every request made while handling one batch of replies leaves in one
//! write. Buffers are reused, so the steady state allocates nothing per request and a single
//! pinned core can drive a server core.
//!
//! Data is derived, not stored: block (object, offset) written with counter c holds a 32-byte
//! header (magic, hash of the object name, offset, counter) followed by a pseudo-random stream
//! keyed by those three (see `stream_runs`). Every write carries such data, so any later run can
//! verify it. With `--verify`, a
//! thread never has two requests in flight for one block and remembers the counter of each
//! block's last acknowledged write, so the content every read must return is known exactly.
//!
//! Map: `args` (the command line), `plan` (arguments checked, work split over threads),
//! `content` (block content derived and checked), `blocks` (random picks, each thread's block
//! table), `work` (requests and where replies are booked), `conn` (a TCP connection, its slots
//! and buffers, the epoll set), `generator` (one thread's life: connect, prefill, timed run),
//! `report`; this file runs the threads and merges their reports. `udp` and `dpdk` drive the
//! datagram RPC with the same `Work`.

use std::collections::BTreeMap;
use std::io::{ErrorKind, IsTerminal, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use carmine_dataplane::wire::{self, Frame, Limits, Opcode, Status, SubOpSpec};

use crate::units::{parse_duration, parse_size};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

use crate::ack_log::{AckLog, ThreadLog};
use crate::client;
use crate::osd::placement::{Placement, PlacementMode};

#[cfg(feature = "dpdk")]
mod dpdk;
mod udp;

mod args;
mod blocks;
mod conn;
mod content;
mod generator;
mod plan;
mod report;
#[cfg(test)]
mod tests;
mod work;

pub use args::*;
pub(crate) use blocks::*;
use conn::*;
pub(crate) use content::*;
use generator::*;
pub(crate) use plan::*;
pub use report::*;
use work::*;

/// Every block starts with magic, name hash, offset and counter (u64 each).
pub const BLOCK_HEADER_BYTES: usize = 32;
/// "CRMNBLK1": marks a block written by this generator.
const BLOCK_MAGIC: u64 = u64::from_le_bytes(*b"CRMNBLK1");
/// Request ids carry the slot in the low 32 bits; far more than any useful queue depth.
const QD_MAX: u32 = 65_536;
/// One u32 counter per block is kept in memory: 2^28 blocks is 1 GiB of counters.
const BLOCKS_MAX: u64 = 1 << 28;
/// Object names are built once and kept (~60 bytes each): 2^22 objects is ~250 MiB.
const OBJECTS_MAX: u32 = 1 << 22;
/// Longer runs are surely typos, and the deadline must not overflow `Instant`.
const DURATION_MAX: Duration = Duration::from_secs(366 * 24 * 3600);
/// A write's payload is one sub-op descriptor plus the block; it must fit the wire ceiling.
const BS_MAX_BYTES: u64 = wire::PAYLOAD_LEN_CEILING_BYTES as u64 - wire::SUB_OP_DESC_SIZE as u64;
/// Random picks that hit an in-flight block before falling back to a scan for a free one.
const RANDOM_TRIES: u32 = 8;
/// Verify failures logged in detail per thread (all of them are counted).
const VERIFY_LOG_MAX: u64 = 5;
const EVENTS_MAX: usize = 64;
const RX_BUFFER_BYTES: usize = 256 << 10;
/// Free space guaranteed before each read, so one read can take a whole batch of replies.
const RX_READ_MIN_BYTES: usize = 64 << 10;
/// Longest epoll wait: bounds how late an abort or the deadline is noticed.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// No reply at all for this long with requests in flight: the server is wedged.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const PROGRESS_TICK: Duration = Duration::from_millis(200);
/// Latencies above this are recorded as this (replies time out long before).
pub(crate) const LATENCY_MAX_NS: u64 = 60_000_000_000;

const PHASE_CONNECT: u8 = 0;
const PHASE_PREFILL: u8 = 1;
const PHASE_TIMED: u8 = 2;
/// The error of threads stopped because another one failed; the other one's error is reported.
const ABORTED: &str = "aborted: another generator thread failed";

// ---------------------------------------------------------------------------------------------
// run: threads, progress, merged report

/// State the generator threads share with each other and with the progress display.
struct Shared {
    abort: AtomicBool,
    rendezvous: Rendezvous,
    phase: AtomicU8,
    /// When the timed run started (set once, by thread 0), for the progress bar's clock.
    timed_start: OnceLock<Instant>,
    progress: Vec<Progress>,
}

/// One thread's completed ops, published for the progress bar. Padded: each is written by its own
/// thread, and sharing a cache line would make the threads slow each other down.
#[repr(align(64))]
#[derive(Default)]
struct Progress {
    prefill_ops: AtomicU64,
    timed_ops: AtomicU64,
}

impl Shared {
    fn check_abort(&self) -> Result<(), String> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(ABORTED.to_string());
        }
        Ok(())
    }

    fn abort(&self) {
        self.abort.store(true, Ordering::Relaxed);
        self.rendezvous.wake_all();
    }
}

/// Sets the abort flag unless disarmed, so a thread that fails (or panics) stops the others
/// instead of leaving them waiting at a rendezvous.
struct AbortGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for AbortGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.abort();
        }
    }
}

/// Runs the load described by `args` and returns its report. Prints nothing but the progress bar.
pub fn run(args: &LoadArgs) -> Result<LoadReport, String> {
    let (config, plans) = validate(args)?;
    warn_if_blocks_limit_depth(&config, &plans);
    let config = Arc::new(config);
    let shared = Arc::new(Shared {
        abort: AtomicBool::new(false),
        rendezvous: Rendezvous::new(plans.len()),
        phase: AtomicU8::new(PHASE_CONNECT),
        timed_start: OnceLock::new(),
        progress: (0..plans.len()).map(|_| Progress::default()).collect(),
    });
    let total_blocks = config.blocks_per_object * u64::from(args.objects);
    #[cfg(feature = "dpdk")]
    if args.transport == Transport::Dpdk {
        dpdk::open(args)?;
    }
    let mut handles = Vec::new();
    for plan in plans {
        let (thread_config, thread_shared, prefix) =
            (config.clone(), shared.clone(), args.prefix.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("load-{}", plan.index))
            .spawn(move || thread_main(&thread_config, &thread_shared, &prefix, plan));
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                shared.abort();
                return Err(format!("spawn generator thread: {e}"));
            }
        }
    }
    if std::io::stderr().is_terminal() && !args.json {
        show_progress(&handles, &shared, total_blocks, config.duration);
    }
    let outcomes = join_all(handles)?;
    let mut report = merge(args, outcomes);
    let status = match args.transport {
        Transport::Udp => udp::fetch_status(&args.target, args.rpc_mtu),
        Transport::Dpdk => match &args.dpdk.status_target {
            Some(target) => client::fetch_status(target),
            None => Err("--transport dpdk: no --status-target given".to_string()),
        },
        Transport::Tcp => client::fetch_status(&args.target),
    };
    report.server = match status {
        Ok(status) => Some(status),
        Err(e) => {
            log::warn!("could not fetch the server's status after the run: {e}");
            None
        }
    };
    Ok(report)
}

/// With --verify a block has at most one request in flight, so a thread with fewer blocks than
/// slots cannot keep its queues full: say so rather than report a lower depth as if it were qd.
fn warn_if_blocks_limit_depth(config: &Config, plans: &[ThreadPlan]) {
    if !config.verify {
        return;
    }
    for plan in plans {
        let blocks = plan.objects.len() as u64 * config.blocks_per_object;
        let slots = plan.clients as u64 * u64::from(config.qd);
        if blocks < slots {
            log::warn!(
                "thread {} has {blocks} blocks for {slots} request slots: with --verify at most {blocks} \
                 requests are in flight (one per block)",
                plan.index
            );
        }
    }
}

/// Joins every thread; the first real failure wins over the "aborted" of the threads it stopped.
type Handle = JoinHandle<Result<ThreadOutcome, String>>;

fn join_all(handles: Vec<Handle>) -> Result<Vec<ThreadOutcome>, String> {
    let mut outcomes = Vec::new();
    let mut first_error: Option<String> = None;
    for handle in handles {
        let result = handle
            .join()
            .unwrap_or_else(|_| Err("generator thread panicked".to_string()));
        match result {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) if e == ABORTED => first_error = first_error.or(Some(e)),
            Err(e) => {
                if first_error.as_deref().unwrap_or(ABORTED) == ABORTED {
                    first_error = Some(e);
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(outcomes),
    }
}

fn merge(args: &LoadArgs, outcomes: Vec<ThreadOutcome>) -> LoadReport {
    let mut total = Stats::new();
    let (mut prefill_ops, mut prefill_errors, mut elapsed) = (0, 0, Duration::ZERO);
    let mut routed_connections = 0;
    for outcome in outcomes {
        routed_connections += outcome.routed_connections;
        total.absorb(&outcome.timed);
        prefill_ops += outcome.prefill.ops;
        prefill_errors += outcome.prefill.errors;
        elapsed = elapsed.max(outcome.elapsed);
    }
    let duration_s = elapsed.as_secs_f64();
    let per_second = |value: f64| {
        if duration_s > 0.0 {
            value / duration_s
        } else {
            0.0
        }
    };
    LoadReport {
        op: args.op.name().to_string(),
        bs: args.bs,
        qd: args.qd,
        clients: args.clients,
        duration_s,
        ops: total.ops,
        iops: per_second(total.ops as f64),
        bytes: total.bytes,
        mib_per_s: per_second(total.bytes as f64 / f64::from(1u32 << 20)),
        errors: total.errors,
        errors_by_status: total
            .by_status
            .iter()
            .map(|(status, n)| (client::status_name(*status), *n))
            .collect(),
        verify_failures: total.verify_failures,
        unwritten_reads: total.unwritten_reads,
        latency_us: latency_summary(&total.latency),
        prefill_ops,
        prefill_errors,
        routed_connections,
        generator_busy_s: total.busy_ns as f64 / 1e9,
        server: None,
    }
}

pub(crate) fn latency_summary(histogram: &Histogram<u64>) -> Latency {
    if histogram.is_empty() {
        return Latency::default();
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Latency {
        p50: us(histogram.value_at_quantile(0.5)),
        p99: us(histogram.value_at_quantile(0.99)),
        p999: us(histogram.value_at_quantile(0.999)),
        max: us(histogram.max()),
        mean: histogram.mean() / 1000.0,
    }
}

/// Draws the progress bar until every thread has finished. Runs on the caller's thread, which
/// otherwise only waits, so the generator threads never touch the terminal.
fn show_progress(handles: &[Handle], shared: &Shared, total_blocks: u64, duration: Duration) {
    let style = ProgressStyle::with_template("{spinner} [{bar:40}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::new(1).with_style(style);
    let sum = |pick: fn(&Progress) -> &AtomicU64| -> u64 {
        shared
            .progress
            .iter()
            .map(|p| pick(p).load(Ordering::Relaxed))
            .sum()
    };
    let (mut last_ops, mut last_tick) = (0u64, Instant::now());
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(PROGRESS_TICK);
        match shared.phase.load(Ordering::Acquire) {
            PHASE_PREFILL => {
                let done = sum(|p| &p.prefill_ops);
                bar.set_message(format!("prefill {done}/{total_blocks} blocks"));
                bar.set_length(total_blocks.max(1));
                bar.set_position(done);
            }
            PHASE_TIMED => {
                let since = *shared.timed_start.get_or_init(Instant::now);
                let ops = sum(|p| &p.timed_ops);
                let now = Instant::now();
                let window = now.duration_since(last_tick.max(since)).as_secs_f64();
                let iops = if window > 0.0 {
                    ops.saturating_sub(last_ops) as f64 / window
                } else {
                    0.0
                };
                (last_ops, last_tick) = (ops, now);
                let elapsed = since.elapsed().min(duration);
                let (elapsed_s, duration_s) = (elapsed.as_secs_f64(), duration.as_secs_f64());
                bar.set_message(format!(
                    "{elapsed_s:.1}s/{duration_s:.1}s  {ops} ops  {iops:.0} IOPS"
                ));
                bar.set_length(duration.as_millis().max(1) as u64);
                bar.set_position(elapsed.as_millis() as u64);
            }
            _ => bar.set_message("connecting"),
        }
        bar.tick();
    }
    bar.finish_and_clear();
}
