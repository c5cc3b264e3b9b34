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
// Command line

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Randwrite,
    Randread,
    Seqwrite,
    Seqread,
    Mixed,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Randwrite => "randwrite",
            Workload::Randread => "randread",
            Workload::Seqwrite => "seqwrite",
            Workload::Seqread => "seqread",
            Workload::Mixed => "mixed",
        }
    }

    fn sequential(self) -> bool {
        matches!(self, Workload::Seqwrite | Workload::Seqread)
    }
}

/// How requests reach the server.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP connections (the wire frames as a stream).
    Tcp,
    /// The datagram RPC over kernel UDP sockets (`serve --transport udp`).
    Udp,
    /// The datagram RPC over a DPDK port (needs a build with --features dpdk).
    Dpdk,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server address (with --transport udp: the server's --udp address).
    #[arg(long, default_value = "127.0.0.1:6800")]
    pub target: String,
    /// tcp (default), udp (one UDP socket per client, the datagram RPC), or dpdk.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// --transport udp and dpdk: the link MTU the RPC's packets are sized for (1280 to 9000),
    /// the same as the server's `serve --rpc-mtu`.
    #[arg(long, default_value = "9000", value_parser = carmine_dataplane::udp::parse_rpc_mtu)]
    pub rpc_mtu: u16,
    /// Workload: random or sequential writes or reads, or a random read/write mix.
    #[arg(long, value_enum, default_value = "randwrite")]
    pub op: Workload,
    /// Block size of every request, e.g. 4096, 4k, 4KiB, 1MiB.
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per client connection.
    #[arg(long, default_value = "32")]
    pub qd: u32,
    /// TCP connections.
    #[arg(long, default_value = "4")]
    pub clients: u32,
    /// Generator threads; clients and objects are spread over them.
    #[arg(long, default_value = "1")]
    pub threads: u32,
    /// Length of the timed run, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Objects, named "{prefix}.{index}".
    #[arg(long, default_value = "64")]
    pub objects: u32,
    /// Size of each object (a multiple of --bs).
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub object_size: u64,
    /// Write every block of every object once before the timed run.
    #[arg(long)]
    pub prefill: bool,
    /// Check the content of every read against what was written. Over the datagram RPC
    /// (`--transport udp`/`dpdk`) the reply frames' crc32c is checked only with it (their
    /// headers always).
    #[arg(long)]
    pub verify: bool,
    /// Shard-aware client (TCP): ask each connection which server core owns it (HELLO) and send
    /// each timed op only on a connection owned by the core of the op's object, so that no op
    /// crosses the server's rings. Each connection then works on the objects of its core. Needs a
    /// connection on every core the thread's objects live on; otherwise, or against a server
    /// without HELLO (classic mode), the thread runs unrouted and says so.
    #[arg(long)]
    pub route: bool,
    /// Percentage of reads in the mixed workload.
    #[arg(long, default_value = "70")]
    pub read_pct: u8,
    /// Seed of block selection.
    #[arg(long, default_value = "1")]
    pub seed: u64,
    /// Object name prefix.
    #[arg(long, default_value = "obj")]
    pub prefix: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Pin generator threads to these CPUs, e.g. "0" or "0,1".
    #[arg(long)]
    pub cpus: Option<String>,
    /// Append every write sent and every write acknowledged to FILE (the crash tests' oracle;
    /// keeps one write per block in flight, as --verify does).
    #[arg(long, value_name = "FILE")]
    pub ack_log: Option<std::path::PathBuf>,
    /// Run no workload: read back every block FILE (an --ack-log) names and check that each
    /// holds its last acknowledged write (or one sent after it). Exit status 1 on any loss.
    #[arg(long, value_name = "FILE", conflicts_with = "ack_log")]
    pub check: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub dpdk: DpdkArgs,
}

/// `--transport dpdk` settings (the target is the server's --udp address on the DPDK link).
#[derive(clap::Args, Debug, Clone)]
pub struct DpdkArgs {
    /// EAL arguments with --transport dpdk, split at spaces, e.g. --dpdk-args="--no-huge --no-pci -m 256 --file-prefix load --vdev net_memif0,role=client,socket=/run/m.sock".
    #[arg(long = "dpdk-args", default_value = "", allow_hyphen_values = true)]
    pub dpdk_args: String,
    /// The DPDK port (ethdev id) to send from.
    #[arg(long = "dpdk-port", default_value = "0")]
    pub dpdk_port: u16,
    /// This generator's IPv4 address on the DPDK link (the server learns the MAC from frames).
    #[arg(long = "dpdk-ip", default_value = "10.77.0.2")]
    pub dpdk_ip: std::net::Ipv4Addr,
    /// With --transport dpdk: the server's TCP address (--listen) to fetch its STATUS from after the run (without it the report has no server section).
    #[arg(long = "status-target")]
    pub status_target: Option<String>,
}

impl Default for DpdkArgs {
    fn default() -> Self {
        DpdkArgs {
            dpdk_args: String::new(),
            dpdk_port: 0,
            dpdk_ip: std::net::Ipv4Addr::new(10, 77, 0, 2),
            status_target: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(serde::Serialize, Debug, Clone, Default, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(serde::Serialize, Debug, Clone)]
pub struct LoadReport {
    pub op: String,
    pub bs: u64,
    pub qd: u32,
    pub clients: u32,
    /// From the start of the timed run to its last reply.
    pub duration_s: f64,
    /// Completed requests of the timed run, failed ones included.
    pub ops: u64,
    pub iops: f64,
    /// Bytes written or read back by successful requests.
    pub bytes: u64,
    pub mib_per_s: f64,
    pub errors: u64,
    pub errors_by_status: BTreeMap<String, u64>,
    pub verify_failures: u64,
    /// Reads of blocks nobody had written (not found, empty or zeros) in a run without --prefill.
    pub unwritten_reads: u64,
    pub latency_us: Latency,
    pub prefill_ops: u64,
    /// Prefill writes answered with an error (kept out of `errors`, which describes the timed run).
    pub prefill_errors: u64,
    /// Connections that sent each timed op to its object's server core (--route; 0 without it,
    /// or when the server or the connection spread did not allow it).
    pub routed_connections: u32,
    /// A busy-polling generator's (`--transport dpdk`) wall time in passes that received or
    /// sent something, over the timed run: with `duration_s`, how much of its CPU the work took
    /// (a poller uses all of its CPU either way). 0 for the others, which sleep in epoll.
    pub generator_busy_s: f64,
    pub server: Option<serde_json::Value>,
}

/// Prints a short human summary to stdout.
pub fn print_human(report: &LoadReport) {
    println!(
        "{}  bs={}  qd={}  clients={}  duration={:.2}s",
        report.op, report.bs, report.qd, report.clients, report.duration_s
    );
    println!(
        "  ops          {:>12}   {:.0} IOPS",
        report.ops, report.iops
    );
    println!(
        "  throughput   {:>12.1} MiB/s   ({} bytes)",
        report.mib_per_s, report.bytes
    );
    let l = &report.latency_us;
    println!(
        "  latency (us) p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
        l.p50, l.p99, l.p999, l.max, l.mean
    );
    let by_status: Vec<String> = report
        .errors_by_status
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    println!(
        "  errors       {:>12}   {}",
        report.errors,
        by_status.join(" ")
    );
    println!(
        "  verify       {:>12} failures   {} unwritten reads",
        report.verify_failures, report.unwritten_reads
    );
    if report.prefill_ops > 0 {
        println!(
            "  prefill      {:>12} ops   {} errors",
            report.prefill_ops, report.prefill_errors
        );
    }
    if report.unwritten_reads > 0 && report.unwritten_reads == report.ops {
        println!("  note: every read found no data; write the objects first (--prefill)");
    }
}

// ---------------------------------------------------------------------------------------------
// Plan: validated arguments, split over threads

/// What every thread needs to know, validated.
#[derive(Clone, Debug)]
struct Config {
    target: String,
    transport: Transport,
    rpc_mtu: u16,
    workload: Workload,
    bs: u64,
    qd: u32,
    duration: Duration,
    blocks_per_object: u64,
    prefill: bool,
    verify: bool,
    route: bool,
    read_pct: u8,
    seed: u64,
    ack_log: Option<AckLog>,
}

struct ThreadPlan {
    index: usize,
    clients: usize,
    /// Global object indices owned by this thread.
    objects: Vec<u64>,
    cpu: Option<usize>,
}

fn validate(args: &LoadArgs) -> Result<(Config, Vec<ThreadPlan>), String> {
    if args.bs < BLOCK_HEADER_BYTES as u64 || args.bs > BS_MAX_BYTES {
        return Err(format!(
            "--bs must be {BLOCK_HEADER_BYTES}..={BS_MAX_BYTES} bytes (blocks start with a {BLOCK_HEADER_BYTES}-byte header), got {}",
            args.bs
        ));
    }
    let blocks_per_object = args.object_size / args.bs;
    if blocks_per_object == 0 || blocks_per_object * args.bs != args.object_size {
        return Err(format!(
            "--object-size ({}) must be a non-zero multiple of --bs ({})",
            args.object_size, args.bs
        ));
    }
    if args.qd == 0 || args.qd > QD_MAX {
        return Err(format!("--qd must be 1..={QD_MAX}, got {}", args.qd));
    }
    if args.clients == 0 || args.threads == 0 || args.objects == 0 {
        return Err("--clients, --threads and --objects must be at least 1".to_string());
    }
    if args.objects > OBJECTS_MAX {
        return Err(format!(
            "--objects must be at most {OBJECTS_MAX}, got {}",
            args.objects
        ));
    }
    if args.duration > DURATION_MAX {
        return Err(format!(
            "--duration must be at most {} days",
            DURATION_MAX.as_secs() / 86_400
        ));
    }
    if args.threads > args.clients || args.threads > args.objects {
        return Err(format!(
            "--threads ({}) must not exceed --clients ({}) or --objects ({}): each thread needs its own of both",
            args.threads, args.clients, args.objects
        ));
    }
    if args.read_pct > 100 {
        return Err(format!("--read-pct must be 0..=100, got {}", args.read_pct));
    }
    let blocks = blocks_per_object.saturating_mul(u64::from(args.objects));
    if blocks > BLOCKS_MAX {
        return Err(format!(
            "{blocks} blocks (objects * object-size / bs) exceed the {BLOCKS_MAX} the generator tracks: \
             use fewer or smaller objects or a larger --bs"
        ));
    }
    let longest_name = object_name(&args.prefix, u64::from(args.objects - 1)).len();
    if longest_name > usize::from(wire::OID_LEN_CEILING) {
        return Err(format!(
            "object names of {longest_name} bytes exceed the wire limit of {}",
            wire::OID_LEN_CEILING
        ));
    }
    let cpus = match &args.cpus {
        Some(text) => Some(checked_cpus(text)?),
        None => None,
    };
    match args.transport {
        Transport::Tcp => {}
        Transport::Udp => udp::validate(args)?,
        #[cfg(feature = "dpdk")]
        Transport::Dpdk => dpdk::validate(args)?,
        #[cfg(not(feature = "dpdk"))]
        Transport::Dpdk => {
            return Err(if cfg!(feature = "dpdk") {
                "--transport dpdk: the DPDK client is not wired into load yet (issue 5); use --transport udp".to_string()
            } else {
                "--transport dpdk: this carmine was built without DPDK; install libdpdk-dev and clang and build with `cargo build --release --features dpdk`".to_string()
            })
        }
    }
    let config = Config {
        target: args.target.clone(),
        transport: args.transport,
        rpc_mtu: args.rpc_mtu,
        workload: args.op,
        bs: args.bs,
        qd: args.qd,
        duration: args.duration,
        blocks_per_object,
        prefill: args.prefill,
        verify: args.verify,
        route: args.route,
        read_pct: args.read_pct,
        seed: args.seed,
        ack_log: match &args.ack_log {
            Some(path) => Some(AckLog::open(path)?),
            None => None,
        },
    };
    Ok((config, split_threads(args, cpus.as_deref())))
}

fn checked_cpus(text: &str) -> Result<Vec<usize>, String> {
    let cpus = crate::units::parse_cpu_list(text)?;
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|c| c.id)
        .collect();
    match cpus.iter().find(|cpu| !available.contains(cpu)) {
        Some(cpu) => Err(format!(
            "--cpus: CPU {cpu} is not available to this process (available: {available:?})"
        )),
        None => Ok(cpus),
    }
}

fn split_threads(args: &LoadArgs, cpus: Option<&[usize]>) -> Vec<ThreadPlan> {
    let threads = args.threads as usize;
    (0..threads)
        .map(|index| ThreadPlan {
            index,
            clients: (0..args.clients as usize)
                .filter(|c| c % threads == index)
                .count(),
            objects: (0..u64::from(args.objects))
                .filter(|o| *o as usize % threads == index)
                .collect(),
            cpu: cpus.map(|list| list[index % list.len()]),
        })
        .collect()
}

pub(crate) fn object_name(prefix: &str, index: u64) -> String {
    format!("{prefix}.{index}")
}

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

// ---------------------------------------------------------------------------------------------
// Block content: derived from (object, offset, counter), checked without storing anything

/// FNV-1a of the object name, finished with a mixer: identifies the object in block headers
/// (names, unlike indices, stay unique across runs with different prefixes).
pub(crate) fn name_hash(name: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in name {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(hash)
}

/// splitmix64's finalizer: a cheap bijective mixer with good avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

fn stream_seed(name_hash: u64, offset: u64, counter: u64) -> u64 {
    mix64(name_hash ^ mix64(offset ^ mix64(counter.wrapping_add(GOLDEN_GAMMA))))
}

/// Words of the stream pool: 256 KiB, so the pool stays in a core's L2 cache.
const POOL_WORDS: usize = 32 * 1024;
/// Seed of the pool. Fixed forever: any process must be able to verify what any other wrote.
const POOL_SEED: u64 = u64::from_le_bytes(*b"CRMNPOOL");

/// Pseudo-random words shared by every stream. Streams are XORs of pool slices because XORing a
/// slice vectorizes to memory speed, while computing splitmix64 per word cost ~0.9 us per 4 KiB
/// block: a quarter of a write's CPU budget at 300k writes/s on one core.
fn pool() -> &'static [u64] {
    static POOL: OnceLock<Box<[u64]>> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut rng = Rng(POOL_SEED);
        (0..POOL_WORDS).map(|_| rng.next_u64()).collect()
    })
}

/// The stream of `seed`, `words` long, as runs of (first stream word, first pool word, length,
/// key): it reads the pool from a seed-chosen start, wrapping around, and each pass over the pool
/// is XORed with its own seed-derived key, so streams of different seeds differ in every word and
/// long blocks do not repeat themselves.
fn stream_runs(seed: u64, words: usize) -> impl Iterator<Item = (usize, usize, usize, u64)> {
    let mut word = 0;
    let mut pool_at = (mix64(seed) % POOL_WORDS as u64) as usize;
    let mut key = seed;
    std::iter::from_fn(move || {
        if word >= words {
            return None;
        }
        let len = (POOL_WORDS - pool_at).min(words - word);
        key = mix64(key.wrapping_add(GOLDEN_GAMMA));
        let run = (word, pool_at, len, key);
        word += len;
        pool_at = 0;
        Some(run)
    })
}

/// Fills `out` with the stream of `seed` (little-endian words; a partial last word is cut).
fn fill_stream(out: &mut [u8], seed: u64) {
    let pool = pool();
    let total = out.len();
    for (word, pool_at, len, key) in stream_runs(seed, total.div_ceil(8)) {
        let bytes = &mut out[word * 8..((word + len) * 8).min(total)];
        let source = &pool[pool_at..pool_at + len];
        let mut chunks = bytes.chunks_exact_mut(8);
        for (chunk, value) in (&mut chunks).zip(source) {
            chunk.copy_from_slice(&(value ^ key).to_le_bytes());
        }
        let tail = chunks.into_remainder();
        let tail_len = tail.len();
        if tail_len > 0 {
            tail.copy_from_slice(&(source[len - 1] ^ key).to_le_bytes()[..tail_len]);
        }
    }
}

/// Index of the first byte of `data` that differs from the stream of `seed`, if any.
fn stream_mismatch(data: &[u8], seed: u64) -> Option<usize> {
    let pool = pool();
    for (word, pool_at, len, key) in stream_runs(seed, data.len().div_ceil(8)) {
        let bytes = &data[word * 8..((word + len) * 8).min(data.len())];
        let source = &pool[pool_at..pool_at + len];
        // Fast path: OR together all differences (this vectorizes, an early exit would not);
        // find where they are only when there are some.
        let chunks = bytes.chunks_exact(8);
        let tail = chunks.remainder();
        let differences = chunks.zip(source).fold(0u64, |acc, (chunk, value)| {
            acc | (u64::from_le_bytes(chunk.try_into().expect("chunks_exact yields 8 bytes"))
                ^ value
                ^ key)
        });
        let tail_differs =
            !tail.is_empty() && tail != &(source[len - 1] ^ key).to_le_bytes()[..tail.len()];
        if differences != 0 || tail_differs {
            let within_run =
                bytes
                    .chunks(8)
                    .zip(source)
                    .enumerate()
                    .find_map(|(index, (chunk, value))| {
                        let expected = (value ^ key).to_le_bytes();
                        chunk
                            .iter()
                            .zip(expected)
                            .position(|(a, b)| *a != b)
                            .map(|at| index * 8 + at)
                    });
            return within_run.map(|at| word * 8 + at);
        }
    }
    None
}

/// Writes the content of block (object, offset) at write counter `counter` into `block`.
pub(crate) fn fill_block(block: &mut [u8], name_hash: u64, offset: u64, counter: u64) {
    let (header, body) = block.split_at_mut(BLOCK_HEADER_BYTES);
    for (at, value) in [BLOCK_MAGIC, name_hash, offset, counter]
        .into_iter()
        .enumerate()
    {
        header[at * 8..at * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
    fill_stream(body, stream_seed(name_hash, offset, counter));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mismatch {
    pub(crate) reason: &'static str,
    /// Counter found in the block header (0 when the header is unusable).
    pub(crate) got_counter: u64,
    /// First differing byte within the block.
    pub(crate) byte: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockCheck {
    /// Intact content of the write with this counter.
    Intact {
        counter: u64,
    },
    /// Empty, or zeros: nobody ever wrote this block.
    Unwritten,
    Mismatch(Mismatch),
}

fn u64_le(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// Checks a block read back. `expected` is the counter of this run's last acknowledged write to it
/// (0: not written in this run, so any self-consistent content written by anyone is accepted).
pub(crate) fn check_block(
    data: &[u8],
    bs: usize,
    name_hash: u64,
    offset: u64,
    expected: u32,
) -> BlockCheck {
    let bad = |reason, got_counter, byte| {
        BlockCheck::Mismatch(Mismatch {
            reason,
            got_counter,
            byte,
        })
    };
    let all_zero = || data.iter().all(|b| *b == 0);
    if data.is_empty() || (data.len() != bs || u64_le(data, 0) != BLOCK_MAGIC) && all_zero() {
        return BlockCheck::Unwritten;
    }
    if data.len() != bs {
        return bad(
            if data.len() < bs {
                "short read"
            } else {
                "long read"
            },
            0,
            data.len().min(bs),
        );
    }
    if u64_le(data, 0) != BLOCK_MAGIC {
        return bad("no block header (bad magic)", 0, 0);
    }
    let got = u64_le(data, 24);
    if u64_le(data, 8) != name_hash {
        return bad("block belongs to another object", got, 8);
    }
    if u64_le(data, 16) != offset {
        return bad("block belongs to another offset", got, 16);
    }
    if expected != 0 && got != u64::from(expected) {
        return bad("stale or wrong write counter", got, 24);
    }
    if got == 0 {
        return bad("write counter 0 is never written", got, 24);
    }
    match stream_mismatch(
        &data[BLOCK_HEADER_BYTES..],
        stream_seed(name_hash, offset, got),
    ) {
        Some(at) => bad(
            "data differs from the write's content",
            got,
            BLOCK_HEADER_BYTES + at,
        ),
        None => BlockCheck::Intact { counter: got },
    }
}

// ---------------------------------------------------------------------------------------------
// Block selection

/// splitmix64: one add and a mix per number, any seed is good, and adjacent seeds (seed + thread)
/// give unrelated streams.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix64(self.0)
    }

    /// Uniform in 0..n (multiply-shift: no division, bias below 2^-32 for any n we use).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A thread's blocks: object names, per-block counters and in-flight marks.
struct BlockTable {
    names: Vec<Box<[u8]>>,
    name_hashes: Vec<u64>,
    blocks_per_object: u64,
    bs: u64,
    /// Counter of the last acknowledged write per block; 0: not written in this run.
    counters: Vec<u32>,
    /// In-flight bit per block; maintained only when `exclusive`.
    busy: Vec<u64>,
    exclusive: bool,
}

impl BlockTable {
    fn new(names: Vec<String>, blocks_per_object: u64, bs: u64, exclusive: bool) -> BlockTable {
        let blocks = names.len() * blocks_per_object as usize;
        BlockTable {
            name_hashes: names.iter().map(|n| name_hash(n.as_bytes())).collect(),
            names: names
                .into_iter()
                .map(|n| n.into_bytes().into_boxed_slice())
                .collect(),
            blocks_per_object,
            bs,
            counters: vec![0; blocks],
            busy: vec![0; blocks.div_ceil(64)],
            exclusive,
        }
    }

    fn len(&self) -> u32 {
        self.counters.len() as u32
    }

    /// (local object index, byte offset) of a block.
    fn locate(&self, block: u32) -> (usize, u64) {
        let block = u64::from(block);
        (
            (block / self.blocks_per_object) as usize,
            (block % self.blocks_per_object) * self.bs,
        )
    }

    fn is_busy(&self, block: u32) -> bool {
        self.busy[block as usize / 64] & (1 << (block % 64)) != 0
    }

    fn set_busy(&mut self, block: u32, busy: bool) {
        if self.exclusive {
            let word = &mut self.busy[block as usize / 64];
            let bit = 1u64 << (block % 64);
            *word = if busy { *word | bit } else { *word & !bit };
        }
    }

    /// The first free block at or after `start`, wrapping around; None when all are in flight.
    fn free_from(&self, start: u32) -> Option<u32> {
        let words = self.busy.len();
        let first_word = start as usize / 64;
        for step in 0..=words {
            let word_index = (first_word + step) % words;
            let mut free = !self.busy[word_index];
            if step == 0 {
                free &= !0u64 << (start % 64); // the scan starts at `start`, not at its word
            }
            while free != 0 {
                let block = word_index * 64 + free.trailing_zeros() as usize;
                if block < self.counters.len() {
                    return Some(block as u32);
                }
                free &= free - 1;
            }
        }
        None
    }

    /// Reorders the objects so that those of each core are contiguous (`core_of` gives an
    /// object name's core) and returns each core's blocks. Only before the first request:
    /// blocks are renumbered.
    fn group_by_core(&mut self, cores: usize, core_of: impl Fn(&[u8]) -> usize) -> Vec<Range<u32>> {
        assert!(
            self.counters.iter().all(|c| *c == 0) && self.busy.iter().all(|w| *w == 0),
            "objects are regrouped before any request"
        );
        let mut order: Vec<(usize, usize)> = (0..self.names.len())
            .map(|object| (core_of(&self.names[object]), object))
            .collect();
        order.sort_unstable();
        let names = order.iter().map(|(_, o)| self.names[*o].clone()).collect();
        let hashes = order.iter().map(|(_, o)| self.name_hashes[*o]).collect();
        (self.names, self.name_hashes) = (names, hashes);
        let per_object = self.blocks_per_object as u32;
        (0..cores)
            .map(|core| {
                let first = order.partition_point(|(c, _)| *c < core) as u32;
                let end = order.partition_point(|(c, _)| *c <= core) as u32;
                first * per_object..end * per_object
            })
            .collect()
    }

    /// The first block of `range` at or after `start` (wrapping inside the range) that is not
    /// in flight.
    fn free_in(&self, range: &Range<u32>, start: u32) -> Option<u32> {
        let len = range.end - range.start;
        (0..len)
            .map(|step| range.start + (start - range.start + step) % len)
            .find(|block| !self.is_busy(*block))
    }

    /// A uniformly random block of `range` that is not in flight.
    fn pick_random_in(&self, rng: &mut Rng, range: &Range<u32>) -> Option<u32> {
        let len = u64::from(range.end - range.start);
        if len == 0 {
            return None;
        }
        for _ in 0..RANDOM_TRIES {
            let block = range.start + rng.below(len) as u32;
            if !self.is_busy(block) {
                return Some(block);
            }
        }
        self.free_in(range, range.start + rng.below(len) as u32)
    }

    /// The next block of `range` at or after `*cursor` that is not in flight; advances the
    /// cursor past it, wrapping inside the range.
    fn pick_sequential_in(&self, cursor: &mut u32, range: &Range<u32>) -> Option<u32> {
        if range.is_empty() {
            return None;
        }
        let start = if range.contains(cursor) {
            *cursor
        } else {
            range.start
        };
        let block = self.free_in(range, start)?;
        *cursor = if block + 1 == range.end {
            range.start
        } else {
            block + 1
        };
        Some(block)
    }

    /// A uniformly random block that is not in flight.
    fn pick_random(&self, rng: &mut Rng) -> Option<u32> {
        let n = u64::from(self.len());
        for _ in 0..RANDOM_TRIES {
            let block = rng.below(n) as u32;
            if !self.is_busy(block) {
                return Some(block);
            }
        }
        self.free_from(rng.below(n) as u32)
    }

    /// The next block at or after `*cursor` that is not in flight; advances the cursor past it.
    fn pick_sequential(&self, cursor: &mut u32) -> Option<u32> {
        let block = self.free_from(*cursor)?;
        *cursor = if block + 1 == self.len() {
            0
        } else {
            block + 1
        };
        Some(block)
    }
}

// ---------------------------------------------------------------------------------------------
// Work: what requests are made of, and where replies are booked

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Prefill,
    Timed,
}

#[derive(Clone, Copy, Debug)]
struct Request {
    block: u32,
    kind: Kind,
    counter: u32,
}

struct Stats {
    ops: u64,
    bytes: u64,
    errors: u64,
    by_status: BTreeMap<u32, u64>,
    verify_failures: u64,
    unwritten_reads: u64,
    latency: Histogram<u64>,
    /// Busy-polling generators: wall time of passes that did work.
    busy_ns: u64,
}

impl Stats {
    fn new() -> Stats {
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

    fn error(&mut self, status: u32) {
        self.errors += 1;
        *self.by_status.entry(status).or_insert(0) += 1;
    }

    fn absorb(&mut self, other: &Stats) {
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

struct Work {
    config: Arc<Config>,
    thread: usize,
    table: BlockTable,
    rng: Rng,
    seq_cursor: u32,
    /// With --route: each server core's blocks (see `BlockTable::group_by_core`) and a
    /// sequential cursor per core; empty when this thread does not route.
    core_blocks: Vec<Range<u32>>,
    core_cursors: Vec<u32>,
    /// Connections whose timed ops were routed to their core (--route).
    routed_connections: u32,
    prefill_cursor: u32,
    phase: Phase,
    /// Set at the deadline: no new requests, only replies.
    stopping: bool,
    in_flight: usize,
    timed: Stats,
    prefill: Stats,
    /// This thread's lines of `--ack-log`.
    ack_log: Option<ThreadLog>,
}

impl Work {
    /// Shows this thread's op count for the running phase (the progress line reads it).
    fn publish(&self, progress: &Progress) {
        match self.phase {
            Phase::Prefill => progress
                .prefill_ops
                .store(self.prefill.ops, Ordering::Relaxed),
            Phase::Timed => progress.timed_ops.store(self.timed.ops, Ordering::Relaxed),
        }
    }

    fn new(config: Arc<Config>, thread: usize, names: Vec<String>) -> Work {
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

    fn begin(&mut self, phase: Phase) {
        self.phase = phase;
        self.stopping = false;
    }

    /// True when the phase has nothing more to issue (prefill wrote every block).
    fn exhausted(&self) -> bool {
        self.phase == Phase::Prefill && self.prefill_cursor == self.table.len()
    }

    fn stats(&mut self) -> &mut Stats {
        match self.phase {
            Phase::Prefill => &mut self.prefill,
            Phase::Timed => &mut self.timed,
        }
    }

    /// Routes the timed phase (--route): each connection then asks for requests on the objects
    /// of its own server core. False (nothing changes) unless every core that owns some of this
    /// thread's objects has one of `conn_cores`.
    fn route(&mut self, placement: &Placement, conn_cores: &[usize]) -> bool {
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
    fn next_request(&mut self, core: Option<usize>) -> Option<Request> {
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
    fn encode(&mut self, tx: &mut Vec<u8>, request_id: u64, request: Request) {
        let start = tx.len();
        self.encode_at(tx, start, request_id, request);
    }

    /// Writes the request's frame over `frame`'s contents (a datagram request body reused:
    /// a write's old block is overwritten, not zeroed first).
    fn encode_over(&mut self, frame: &mut Vec<u8>, request_id: u64, request: Request) {
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
    fn complete(&mut self, slot: &Slot, now_ns: u64, status: u32, output: &[u8]) {
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

// ---------------------------------------------------------------------------------------------
// Connections

#[derive(Clone, Copy, Debug)]
struct Slot {
    request: Request,
    /// Bumped at each use, so a late or duplicated reply cannot complete a newer request.
    generation: u32,
    active: bool,
    sent_ns: u64,
}

/// A connection's request slots; a request id is (generation << 32) | slot index.
struct Slots {
    entries: Vec<Slot>,
    free: Vec<u32>,
}

impl Slots {
    fn new(qd: u32) -> Slots {
        let request = Request {
            block: 0,
            kind: Kind::Read,
            counter: 0,
        };
        let idle = Slot {
            request,
            generation: 0,
            active: false,
            sent_ns: 0,
        };
        Slots {
            entries: vec![idle; qd as usize],
            free: (0..qd).rev().collect(),
        }
    }

    /// Fills a free slot; returns (slot index, request id).
    fn arm(&mut self, request: Request) -> (u32, u64) {
        let index = self
            .free
            .pop()
            .expect("arm is called only with a free slot");
        let slot = &mut self.entries[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.request = request;
        slot.active = true;
        (index, u64::from(slot.generation) << 32 | u64::from(index))
    }

    fn take(&mut self, request_id: u64) -> Option<Slot> {
        let index = request_id as u32;
        let slot = self.entries.get_mut(index as usize)?;
        if !slot.active || slot.generation != (request_id >> 32) as u32 {
            return None;
        }
        slot.active = false;
        self.free.push(index);
        Some(*slot)
    }
}

/// Receive buffer: bytes start..end are received and not yet consumed.
struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Length of the incomplete frame at `start` (0: unknown yet).
    need: usize,
}

impl RxBuf {
    fn new() -> RxBuf {
        RxBuf {
            buf: vec![0; RX_BUFFER_BYTES],
            start: 0,
            end: 0,
            need: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, len: usize) {
        self.start += len;
        self.need = 0;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Free space to read into: room for the whole incomplete frame and at least
    /// `RX_READ_MIN_BYTES`, made by moving the pending bytes to the front or by growing.
    fn spare(&mut self) -> &mut [u8] {
        let pending = self.end - self.start;
        let needed = self.need.max(pending + RX_READ_MIN_BYTES);
        if self.start + needed > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, pending);
            if needed > self.buf.len() {
                self.buf.resize(needed.next_power_of_two(), 0);
            }
        }
        &mut self.buf[self.end..]
    }
}

struct Conn {
    stream: TcpStream,
    rx: RxBuf,
    tx: Vec<u8>,
    tx_sent: usize,
    slots: Slots,
    /// Slots encoded since the last flush: their send time is the flush's.
    unstamped: Vec<u32>,
    /// EPOLLOUT is registered (a write was cut short).
    want_write: bool,
    /// Could not fill its slots because every block was in flight; retried each loop pass.
    starved: bool,
    /// --route: the server core that owns this connection (its timed ops are on that core's
    /// objects); None when not routed.
    route: Option<usize>,
}

impl Conn {
    /// Issues requests until the slots are full or the work has none to give.
    fn fill(&mut self, work: &mut Work) {
        self.starved = false;
        while !self.slots.free.is_empty() {
            let Some(request) = work.next_request(self.route) else {
                self.starved = !work.stopping && !work.exhausted();
                return;
            };
            let (slot, request_id) = self.slots.arm(request);
            work.encode(&mut self.tx, request_id, request);
            self.unstamped.push(slot);
        }
    }

    /// Writes what the socket takes; registers for EPOLLOUT while anything is left.
    fn flush(&mut self, epoch: Instant, epoll: &Epoll, token: usize) -> Result<(), String> {
        if !self.unstamped.is_empty() {
            let now = epoch.elapsed().as_nanos() as u64;
            for slot in self.unstamped.drain(..) {
                self.slots.entries[slot as usize].sent_ns = now;
            }
        }
        while self.tx_sent < self.tx.len() {
            match self.stream.write(&self.tx[self.tx_sent..]) {
                Ok(0) => return Err("server closed the connection".to_string()),
                Ok(n) => self.tx_sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("send: {}", client::io_reason(&e))),
            }
        }
        if self.tx_sent == self.tx.len() {
            self.tx.clear();
            self.tx_sent = 0;
        }
        let want_write = self.tx_sent < self.tx.len();
        if want_write != self.want_write {
            let events = if want_write {
                EPOLL_READ | libc::EPOLLOUT as u32
            } else {
                EPOLL_READ
            };
            epoll.modify(self.stream.as_raw_fd(), events, token)?;
            self.want_write = want_write;
        }
        Ok(())
    }

    /// Reads what has arrived and books every complete reply.
    fn receive(&mut self, work: &mut Work, epoch: Instant) -> Result<(), String> {
        loop {
            let spare = self.rx.spare();
            let spare_len = spare.len();
            let n = match self.stream.read(spare) {
                Ok(0) => return Err("server closed the connection".to_string()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("receive: {}", client::io_reason(&e))),
            };
            self.rx.end += n;
            self.drain_frames(work, epoch.elapsed().as_nanos() as u64)?;
            if n < spare_len {
                return Ok(()); // the socket is empty; level-triggered epoll reports more later
            }
        }
    }

    fn drain_frames(&mut self, work: &mut Work, now_ns: u64) -> Result<(), String> {
        loop {
            let pending = self.rx.pending();
            let header = match wire::parse_header(pending, &Limits::CEILING) {
                Ok(Some(header)) => header,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("malformed reply: {e}")),
            };
            let len = header.frame_len();
            if pending.len() < len {
                self.rx.need = len;
                return Ok(());
            }
            let bytes = &pending[..len];
            let frame = Frame::view(header, bytes);
            if !frame.crc_ok(bytes) {
                let stats = work.stats();
                stats.verify_failures += 1;
                stats.errors += 1;
                return Err(format!(
                    "reply crc mismatch (request id {:#x}); closing the connection",
                    header.request_id
                ));
            }
            if header.opcode != Opcode::OsdOp as u8 | wire::REPLY_BIT {
                let status = client::status_name(header.status);
                return Err(format!(
                    "unexpected reply opcode {:#04x} (status {status})",
                    header.opcode
                ));
            }
            let Some(slot) = self.slots.take(header.request_id) else {
                let status = client::status_name(header.status);
                return Err(format!(
                    "reply to unknown request id {:#x} (status {status})",
                    header.request_id
                ));
            };
            let (status, output) = reply_outcome(&frame)?;
            work.complete(&slot, now_ns, status, output);
            self.rx.consume(len);
        }
    }
}

/// The effective status of a one-sub-op reply and the sub-op's output.
fn reply_outcome<'a>(frame: &Frame<'a>) -> Result<(u32, &'a [u8]), String> {
    let first = frame
        .reply_results()
        .ok()
        .and_then(|mut results| results.next());
    if frame.header.status != Status::Ok as u32 {
        return Ok((frame.header.status, first.map_or(&[][..], |(_, out)| out)));
    }
    first.ok_or_else(|| "malformed reply: result table missing or inconsistent".to_string())
}

// ---------------------------------------------------------------------------------------------
// The generator thread

const EPOLL_READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    fn new() -> Result<Epoll, String> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn control(&self, op: libc::c_int, fd: RawFd, events: u32, token: usize) -> Result<(), String> {
        let mut event = libc::epoll_event {
            events,
            u64: token as u64,
        };
        // SAFETY: both descriptors are open for the duration of the call and `event` is a valid,
        // initialized epoll_event that the kernel only reads.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) };
        if rc < 0 {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn add(&self, fd: RawFd, events: u32, token: usize) -> Result<(), String> {
        self.control(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    fn modify(&self, fd: RawFd, events: u32, token: usize) -> Result<(), String> {
        self.control(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Waits for events; returns how many were stored (0 on timeout or signal).
    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> Result<usize, String> {
        let timeout_ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let capacity = events.len().min(i32::MAX as usize) as i32;
        // SAFETY: `events` is a valid, writable buffer of `capacity` epoll_event structs for the
        // duration of the call; the kernel writes at most `capacity` of them.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                capacity,
                timeout_ms,
            )
        };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(format!("epoll_wait: {error}"));
        }
        Ok(n as usize)
    }
}

struct ThreadOutcome {
    timed: Stats,
    prefill: Stats,
    /// From the start of the timed run to its last reply.
    elapsed: Duration,
    routed_connections: u32,
}

fn thread_main(
    config: &Arc<Config>,
    shared: &Shared,
    prefix: &str,
    plan: ThreadPlan,
) -> Result<ThreadOutcome, String> {
    let mut guard = AbortGuard {
        shared,
        armed: true,
    };
    if let Some(cpu) = plan.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            return Err(format!(
                "could not pin generator thread {} to CPU {cpu}",
                plan.index
            ));
        }
    }
    let names = plan
        .objects
        .iter()
        .map(|index| object_name(prefix, *index))
        .collect();
    let work = Work::new(config.clone(), plan.index, names);
    let mut generator: Box<dyn RunPhase + '_> = match config.transport {
        Transport::Udp => Box::new(udp::UdpGenerator::connect(config, shared, &plan, work)?),
        #[cfg(feature = "dpdk")]
        Transport::Dpdk => Box::new(dpdk::DpdkGenerator::connect(config, shared, &plan, work)?),
        _ => Box::new(Generator::connect(config, shared, &plan, work)?),
    };
    shared.rendezvous.wait(shared)?; // everyone connected: a refused connection fails the run early
    if config.prefill {
        if plan.index == 0 {
            shared.phase.store(PHASE_PREFILL, Ordering::Relaxed);
        }
        generator.run_phase(Phase::Prefill)?;
        shared.rendezvous.wait(shared)?; // the timed run starts only on fully written objects
    }
    if plan.index == 0 {
        let _ = shared.timed_start.set(Instant::now());
        shared.phase.store(PHASE_TIMED, Ordering::Release);
    }
    let elapsed = generator.run_phase(Phase::Timed)?;
    guard.armed = false;
    let Work {
        timed,
        prefill,
        routed_connections,
        ..
    } = generator.into_work();
    Ok(ThreadOutcome {
        timed,
        prefill,
        elapsed,
        routed_connections,
    })
}

/// Asks a fresh connection which server core owns it (--route). None: the server has no HELLO
/// (classic mode, or an older server).
fn hello(stream: &mut TcpStream, target: &str) -> Result<Option<wire::HelloReply>, String> {
    let reply = client::call(stream, Opcode::Hello, b"", &[])
        .map_err(|e| format!("--route: HELLO to {target}: {e}"))?;
    if reply.status == Status::UnknownOpcode as u32 {
        return Ok(None);
    }
    if reply.status != Status::Ok as u32 {
        return Err(format!(
            "--route: HELLO to {target}: server answered {}",
            reply.status_name()
        ));
    }
    wire::HelloReply::decode(&reply.payload)
        .map(Some)
        .map_err(|e| format!("--route: HELLO to {target}: {e}"))
}

/// The server's placement, when every connection answered HELLO and they agree.
fn routing_placement(hellos: &[Option<wire::HelloReply>], thread: usize) -> Option<Placement> {
    let first = hellos.first()?;
    if hellos.iter().any(Option::is_none) {
        log::info!("thread {thread}: --route: the server does not answer HELLO (classic mode?): not routed");
        return None;
    }
    let first = first.expect("checked: every connection answered");
    if hellos
        .iter()
        .flatten()
        .any(|h| (h.cores, h.pg_count) != (first.cores, first.pg_count))
    {
        log::warn!(
            "thread {thread}: --route: connections disagree on the server's placement: not routed"
        );
        return None;
    }
    let mode = match first.pg_count {
        Some(pg_count) => PlacementMode::Pg { pg_count },
        None => PlacementMode::Flex,
    };
    Some(Placement::new(mode, first.cores as usize))
}

/// What a generator thread drives, whatever the transport.
trait RunPhase {
    /// Runs one phase to completion (see `Generator::run_phase`); returns its length.
    fn run_phase(&mut self, phase: Phase) -> Result<Duration, String>;
    fn into_work(self: Box<Self>) -> Work;
}

impl RunPhase for Generator<'_> {
    fn run_phase(&mut self, phase: Phase) -> Result<Duration, String> {
        Generator::run_phase(self, phase)
    }

    fn into_work(self: Box<Self>) -> Work {
        self.work
    }
}

struct Generator<'a> {
    config: &'a Config,
    shared: &'a Shared,
    index: usize,
    epoll: Epoll,
    conns: Vec<Conn>,
    work: Work,
    /// Time base of send and receive stamps.
    epoch: Instant,
}

impl<'a> Generator<'a> {
    fn connect(
        config: &'a Config,
        shared: &'a Shared,
        plan: &ThreadPlan,
        work: Work,
    ) -> Result<Self, String> {
        let (index, clients) = (plan.index, plan.clients);
        let epoll = Epoll::new()?;
        let mut conns = Vec::with_capacity(clients);
        let mut hellos = Vec::with_capacity(clients);
        for token in 0..clients {
            let mut stream = client::connect(&config.target)?;
            if config.route {
                hellos.push(hello(&mut stream, &config.target)?);
            }
            stream
                .set_nonblocking(true)
                .map_err(|e| format!("connect {}: {}", config.target, client::io_reason(&e)))?;
            epoll.add(stream.as_raw_fd(), EPOLL_READ, token)?;
            conns.push(Conn {
                stream,
                rx: RxBuf::new(),
                tx: Vec::with_capacity(config.qd as usize * (config.bs as usize + 128)),
                tx_sent: 0,
                slots: Slots::new(config.qd),
                unstamped: Vec::with_capacity(config.qd as usize),
                want_write: false,
                starved: false,
                route: None,
            });
        }
        let mut work = work;
        if let Some(placement) = routing_placement(&hellos, index) {
            let cores: Vec<usize> = hellos.iter().flatten().map(|h| h.core as usize).collect();
            if work.route(&placement, &cores) {
                for (conn, core) in conns.iter_mut().zip(cores) {
                    conn.route = Some(core);
                }
                work.routed_connections = conns.len() as u32;
                log::info!(
                    "thread {index}: routed: connection cores {:?} of {}",
                    conns.iter().map(|c| c.route).collect::<Vec<_>>(),
                    placement.cores
                );
            }
        }
        Ok(Generator {
            config,
            shared,
            index,
            epoll,
            conns,
            work,
            epoch: Instant::now(),
        })
    }

    /// Runs one phase to completion: until every block is written (prefill) or until the deadline
    /// has passed and every request in flight has been answered (timed). Returns its length.
    fn run_phase(&mut self, phase: Phase) -> Result<Duration, String> {
        self.work.begin(phase);
        let start = Instant::now();
        let deadline = (phase == Phase::Timed).then(|| start + self.config.duration);
        self.work.stopping = deadline.is_some_and(|d| d <= start);
        for token in 0..self.conns.len() {
            self.fill_and_flush(token)?;
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        let mut last_event = start;
        loop {
            self.shared.check_abort()?;
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                self.work.stopping = true;
            }
            if self.work.in_flight == 0 && (self.work.stopping || self.work.exhausted()) {
                self.publish();
                return Ok(now - start);
            }
            if now - last_event >= REPLY_TIMEOUT {
                let (target, in_flight) = (&self.config.target, self.work.in_flight);
                return Err(format!(
                    "no reply from {target} for {} s with {in_flight} requests in flight",
                    REPLY_TIMEOUT.as_secs()
                ));
            }
            let timeout = match deadline {
                Some(d) if !self.work.stopping => POLL_INTERVAL.min(d - now),
                _ => POLL_INTERVAL,
            };
            let ready = self.epoll.wait(&mut events, timeout)?;
            for event in &events[..ready] {
                let (token, flags) = (event.u64 as usize, event.events);
                self.on_event(token, flags)?;
            }
            if ready > 0 {
                last_event = Instant::now();
            }
            self.refill_starved()?;
            self.publish();
        }
    }

    fn on_event(&mut self, token: usize, flags: u32) -> Result<(), String> {
        let readable = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32;
        if flags & readable != 0 {
            let conn = &mut self.conns[token];
            conn.receive(&mut self.work, self.epoch)
                .map_err(|e| self.conn_error(token, e))?;
        }
        self.fill_and_flush(token)
    }

    fn fill_and_flush(&mut self, token: usize) -> Result<(), String> {
        let conn = &mut self.conns[token];
        conn.fill(&mut self.work);
        conn.flush(self.epoch, &self.epoll, token)
            .map_err(|e| self.conn_error(token, e))
    }

    /// Connections that found every block in flight get another chance once replies freed some.
    fn refill_starved(&mut self) -> Result<(), String> {
        for token in 0..self.conns.len() {
            if self.conns[token].starved {
                self.fill_and_flush(token)?;
            }
        }
        Ok(())
    }

    fn conn_error(&self, token: usize, error: String) -> String {
        format!(
            "thread {} connection {token} to {}: {error}",
            self.index, self.config.target
        )
    }

    fn publish(&self) {
        self.work.publish(&self.shared.progress[self.index]);
    }
}

/// A barrier that an aborting thread can break, so the others return instead of waiting forever.
struct Rendezvous {
    parties: usize,
    /// (arrived, generation)
    state: Mutex<(usize, u64)>,
    wake: Condvar,
}

impl Rendezvous {
    fn new(parties: usize) -> Rendezvous {
        Rendezvous {
            parties,
            state: Mutex::new((0, 0)),
            wake: Condvar::new(),
        }
    }

    fn wait(&self, shared: &Shared) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        shared.check_abort()?;
        let generation = state.1;
        state.0 += 1;
        if state.0 == self.parties {
            *state = (0, generation + 1);
            self.wake.notify_all();
            return Ok(());
        }
        while state.1 == generation {
            state = self
                .wake
                .wait_timeout(state, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            shared.check_abort()?;
        }
        Ok(())
    }

    fn wake_all(&self) {
        let _state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::TcpListener;
    use wire::{Header, HEADER_SIZE, SUB_OP_RESULT_SIZE};

    fn written(bs: usize, hash: u64, offset: u64, counter: u64) -> Vec<u8> {
        let mut block = vec![0u8; bs];
        fill_block(&mut block, hash, offset, counter);
        block
    }

    fn reason(check: BlockCheck) -> &'static str {
        match check {
            BlockCheck::Mismatch(m) => m.reason,
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[test]
    fn block_content_round_trips() {
        let hash = name_hash(b"obj.3");
        for bs in [32, 33, 100, 4096, 4099] {
            let block = written(bs, hash, 8192, 5);
            assert_eq!(
                check_block(&block, bs, hash, 8192, 5),
                BlockCheck::Intact { counter: 5 }
            );
            // Not written in this run: any self-consistent counter is accepted.
            assert_eq!(
                check_block(&block, bs, hash, 8192, 0),
                BlockCheck::Intact { counter: 5 }
            );
        }
        // Blocks longer than the stream pool wrap around it without repeating themselves.
        let big = 600 << 10;
        let mut block = written(big, hash, 0, 9);
        assert_eq!(
            check_block(&block, big, hash, 0, 9),
            BlockCheck::Intact { counter: 9 }
        );
        let period = POOL_WORDS * 8;
        assert_ne!(block[64..64 + 4096], block[64 + period..64 + period + 4096]);
        block[big - 3] ^= 4;
        assert_eq!(
            reason(check_block(&block, big, hash, 0, 9)),
            "data differs from the write's content"
        );
        // Content depends on every input.
        let base = written(4096, hash, 0, 1);
        assert_ne!(base, written(4096, hash, 0, 2));
        assert_ne!(base, written(4096, hash, 4096, 1));
        assert_ne!(base, written(4096, name_hash(b"obj.4"), 0, 1));
    }

    #[test]
    fn verify_detects_flipped_byte_wrong_counter_and_wrong_offset() {
        let (bs, hash) = (4096, name_hash(b"obj.0"));
        let mut block = written(bs, hash, 4096, 3);
        block[1000] ^= 0x10;
        let check = check_block(&block, bs, hash, 4096, 3);
        let flipped = Mismatch {
            reason: "data differs from the write's content",
            got_counter: 3,
            byte: 1000,
        };
        assert_eq!(check, BlockCheck::Mismatch(flipped));
        let mut tail_flip = written(4099, hash, 0, 1);
        tail_flip[4098] ^= 1;
        assert_eq!(
            reason(check_block(&tail_flip, 4099, hash, 0, 1)),
            "data differs from the write's content"
        );

        let stale = written(bs, hash, 4096, 2);
        assert_eq!(
            reason(check_block(&stale, bs, hash, 4096, 3)),
            "stale or wrong write counter"
        );
        let misplaced = written(bs, hash, 8192, 3);
        assert_eq!(
            reason(check_block(&misplaced, bs, hash, 4096, 3)),
            "block belongs to another offset"
        );
        let foreign = written(bs, name_hash(b"obj.1"), 4096, 3);
        assert_eq!(
            reason(check_block(&foreign, bs, hash, 4096, 3)),
            "block belongs to another object"
        );
        // A header edited to claim another counter does not match that counter's stream.
        let mut forged = written(bs, hash, 4096, 2);
        forged[24..32].copy_from_slice(&3u64.to_le_bytes());
        assert_eq!(
            reason(check_block(&forged, bs, hash, 4096, 0)),
            "data differs from the write's content"
        );
        let mut garbage = vec![7u8; bs];
        assert_eq!(
            reason(check_block(&garbage, bs, hash, 0, 0)),
            "no block header (bad magic)"
        );
        garbage.truncate(100);
        assert_eq!(reason(check_block(&garbage, bs, hash, 0, 0)), "short read");
    }

    #[test]
    fn unwritten_blocks_are_recognised() {
        let hash = name_hash(b"obj.0");
        assert_eq!(check_block(&[], 4096, hash, 0, 0), BlockCheck::Unwritten);
        assert_eq!(
            check_block(&[0u8; 4096], 4096, hash, 0, 0),
            BlockCheck::Unwritten
        );
        assert_eq!(
            check_block(&[0u8; 512], 4096, hash, 0, 0),
            BlockCheck::Unwritten
        );
    }

    fn table(blocks_per_object: u64, objects: usize) -> BlockTable {
        let names = (0..objects).map(|i| object_name("t", i as u64)).collect();
        BlockTable::new(names, blocks_per_object, 4096, true)
    }

    #[test]
    fn routed_selection_stays_on_the_core_of_the_connection() {
        let placement = Placement::new(PlacementMode::Pg { pg_count: 128 }, 3);
        let mut table = table(10, 40);
        let ranges = table.group_by_core(3, |name| placement.locate(name).core);
        assert_eq!(ranges.len(), 3);
        assert_eq!(ranges[0].start, 0);
        assert_eq!(ranges[2].end, table.len());
        for (core, range) in ranges.iter().enumerate() {
            assert!(!range.is_empty(), "40 objects cover 3 cores");
            for block in range.clone() {
                let (object, _) = table.locate(block);
                assert_eq!(placement.locate(&table.names[object]).core, core);
            }
        }
        // Names and their hashes moved together.
        for (object, name) in table.names.iter().enumerate() {
            assert_eq!(table.name_hashes[object], name_hash(name));
        }
        let mut rng = Rng(7);
        let range = ranges[1].clone();
        for block in range.clone().step_by(2) {
            table.set_busy(block, true);
        }
        let mut cursor = range.start;
        for _ in 0..1_000 {
            let random = table
                .pick_random_in(&mut rng, &range)
                .expect("half are free");
            assert!(range.contains(&random) && !table.is_busy(random));
            let next = table
                .pick_sequential_in(&mut cursor, &range)
                .expect("half are free");
            assert!(range.contains(&next) && !table.is_busy(next));
            assert!(range.contains(&cursor));
        }
        for block in range.clone() {
            table.set_busy(block, true);
        }
        assert_eq!(table.pick_random_in(&mut rng, &range), None);
        assert_eq!(table.pick_sequential_in(&mut cursor, &range), None);
        assert_eq!(
            table.pick_random_in(&mut rng, &(5..5)),
            None,
            "an empty range"
        );
    }

    #[test]
    fn block_selection_never_returns_an_in_flight_block() {
        let mut table = table(50, 3); // 150 blocks: a partial last bitset word
        let mut rng = Rng(42);
        for block in 0..150 {
            if rng.below(10) < 9 {
                table.set_busy(block, true);
            }
        }
        let mut cursor = 0;
        for _ in 0..10_000 {
            let random = table.pick_random(&mut rng).expect("some blocks are free");
            assert!(!table.is_busy(random) && random < 150);
            let sequential = table
                .pick_sequential(&mut cursor)
                .expect("some blocks are free");
            assert!(!table.is_busy(sequential) && sequential < 150);
        }
        for block in 0..150 {
            table.set_busy(block, true);
        }
        assert_eq!(table.pick_random(&mut rng), None);
        assert_eq!(table.pick_sequential(&mut cursor), None);
        table.set_busy(149, false);
        assert_eq!(table.pick_random(&mut rng), Some(149));
        assert_eq!(table.pick_sequential(&mut cursor), Some(149));
        assert_eq!(
            cursor, 0,
            "the sequential cursor wraps after the last block"
        );
    }

    #[test]
    fn sequential_selection_walks_blocks_in_order() {
        let table = table(4, 2);
        let mut cursor = 0;
        let walk: Vec<u32> = (0..10)
            .map(|_| table.pick_sequential(&mut cursor).unwrap())
            .collect();
        assert_eq!(walk, vec![0, 1, 2, 3, 4, 5, 6, 7, 0, 1]);
        assert_eq!(table.locate(5), (1, 4096));
    }

    #[test]
    fn slots_reject_stale_and_unknown_request_ids() {
        let mut slots = Slots::new(2);
        let request = Request {
            block: 7,
            kind: Kind::Write,
            counter: 1,
        };
        let (_, first) = slots.arm(request);
        assert_eq!(slots.take(first).map(|s| s.request.block), Some(7));
        assert!(
            slots.take(first).is_none(),
            "a duplicate reply must not complete twice"
        );
        let (_, second) = slots.arm(request);
        assert_ne!(first, second);
        assert!(
            slots.take(first).is_none(),
            "a stale id must not complete the slot's new request"
        );
        assert!(slots.take(99).is_none());
        assert_eq!(slots.free.len(), 1);
    }

    // --- A fake server speaking the protocol: enough of an OSD to run the generator against.

    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        None,
        /// Flip one byte in this many read replies (with a correct crc over the corrupted bytes).
        CorruptReads(u64),
        /// Send every read reply with a wrong crc.
        BadCrc,
    }

    type Store = Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>;

    fn fake_server(fault: Fault) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let store = Store::default();
        let corruptions = Arc::new(AtomicU64::new(match fault {
            Fault::CorruptReads(n) => n,
            _ => 0,
        }));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (store, corruptions) = (store.clone(), corruptions.clone());
                std::thread::spawn(move || serve(stream, &store, fault, &corruptions));
            }
        });
        addr
    }

    /// Reads whatever arrived, answers every whole frame, sends all the answers in one write.
    fn serve(mut stream: TcpStream, store: &Store, fault: Fault, corruptions: &AtomicU64) {
        let (mut inbox, mut chunk, mut outbox) = (Vec::new(), vec![0u8; 1 << 16], Vec::new());
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            inbox.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            while let Ok(Some(header)) = wire::parse_header(&inbox[at..], &Limits::CEILING) {
                if inbox.len() - at < header.frame_len() {
                    break;
                }
                let frame = Frame::view(header, &inbox[at..]);
                assert!(frame.crc_ok(&inbox[at..]), "the generator sent a bad crc");
                answer(&frame, store, fault, corruptions, &mut outbox);
                at += header.frame_len();
            }
            inbox.drain(..at);
            if stream.write_all(&outbox).is_err() {
                return;
            }
            outbox.clear();
        }
    }

    fn answer(
        frame: &Frame<'_>,
        store: &Store,
        fault: Fault,
        corruptions: &AtomicU64,
        out: &mut Vec<u8>,
    ) {
        let request = &frame.header;
        if frame.opcode() == Some(Opcode::Status) {
            return raw_reply(out, request, Status::Ok, br#"{"fake":true}"#);
        }
        frame
            .validate_sub_ops()
            .expect("the generator sent a valid sub-op table");
        let op = frame.sub_ops().next().unwrap();
        let mut objects = store.lock().unwrap();
        match op.code {
            wire::SubOpCode::Write => {
                let object = objects.entry(frame.oid.to_vec()).or_default();
                let end = op.offset as usize + op.data.len();
                if object.len() < end {
                    object.resize(end, 0);
                }
                object[op.offset as usize..end].copy_from_slice(op.data);
                osd_reply(out, request, Status::Ok, 0, b"");
            }
            wire::SubOpCode::Read => match objects.get(frame.oid) {
                None => osd_reply(out, request, Status::NotFound, Status::NotFound as u32, b""),
                Some(object) => {
                    let start = (op.offset as usize).min(object.len());
                    let end = (op.offset + op.length).min(object.len() as u64) as usize;
                    let mut data = object[start..end].to_vec();
                    let corrupt = |n: u64| n.checked_sub(1);
                    if data.len() > 40
                        && corruptions
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, corrupt)
                            .is_ok()
                    {
                        data[40] ^= 0x01;
                    }
                    osd_reply(out, request, Status::Ok, 0, &data);
                    if fault == Fault::BadCrc {
                        let last = out.len() - 1;
                        out[last] ^= 0x80;
                    }
                }
            },
            _ => osd_reply(
                out,
                request,
                Status::Unsupported,
                Status::Unsupported as u32,
                b"",
            ),
        }
    }

    fn osd_reply(out: &mut Vec<u8>, request: &Header, status: Status, result: u32, output: &[u8]) {
        let start = out.len();
        out.resize(start + HEADER_SIZE + SUB_OP_RESULT_SIZE, 0);
        wire::encode_reply(
            &mut out[start..],
            request,
            status,
            &[(result, output.len() as u32)],
            &[output],
        );
        out.extend_from_slice(output);
    }

    fn raw_reply(out: &mut Vec<u8>, request: &Header, status: Status, payload: &[u8]) {
        let header = Header {
            opcode: request.opcode | wire::REPLY_BIT,
            request_id: request.request_id,
            payload_len: payload.len() as u32,
            status: status as u32,
            ..Header::default()
        };
        let start = out.len();
        out.resize(start + HEADER_SIZE, 0);
        out.extend_from_slice(payload);
        wire::seal_frame(header, &mut out[start..]);
    }

    #[derive(clap::Parser)]
    #[command(args_override_self = true)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    /// 8 objects of 16 blocks, 2 connections of qd 8: small enough that blocks are often busy.
    fn args(target: &str, extra: &[&str]) -> LoadArgs {
        use clap::Parser;
        let mut argv = vec![
            "load",
            "--target",
            target,
            "--objects",
            "8",
            "--object-size",
            "64KiB",
            "--bs",
            "4k",
        ];
        argv.extend(["--qd", "8", "--clients", "2", "--duration", "1s"]);
        argv.extend(extra);
        Cli::try_parse_from(argv).unwrap().load
    }

    fn assert_clean(report: &LoadReport) {
        assert!(report.ops > 0, "{report:?}");
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(report.verify_failures, 0, "{report:?}");
        assert_eq!(report.server, Some(serde_json::json!({"fake": true})));
    }

    #[test]
    fn end_to_end_randwrite_then_randread_verify() {
        let target = fake_server(Fault::None);
        let write = run(&args(&target, &["--op", "randwrite", "--verify"])).unwrap();
        assert_clean(&write);
        assert_eq!(write.bytes, write.ops * 4096);
        assert!(write.latency_us.p50 > 0.0 && write.latency_us.max >= write.latency_us.p99);
        // A new run knows no counters: it accepts any self-consistent content written before.
        let read = run(&args(&target, &["--op", "randread", "--verify"])).unwrap();
        assert_clean(&read);
        assert_eq!(
            read.unwritten_reads, 0,
            "1 s of random writes covers all 128 blocks"
        );
        eprintln!(
            "fake server: randwrite {:.0} ops/s, randread {:.0} ops/s",
            write.iops, read.iops
        );
    }

    #[test]
    fn end_to_end_prefill_mixed_two_threads() {
        let target = fake_server(Fault::None);
        let extra = [
            "--op",
            "mixed",
            "--verify",
            "--prefill",
            "--threads",
            "2",
            "--duration",
            "300ms",
            "--seed",
            "9",
        ];
        let report = run(&args(&target, &extra)).unwrap();
        assert_clean(&report);
        assert_eq!(report.prefill_ops, 128);
        assert_eq!((report.prefill_errors, report.unwritten_reads), (0, 0));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["op"], "mixed");
        assert!(json["latency_us"]["p999"].is_number());
    }

    #[test]
    fn end_to_end_reads_of_never_written_blocks_are_not_failures() {
        let target = fake_server(Fault::None);
        let report = run(&args(
            &target,
            &["--op", "seqread", "--verify", "--duration", "200ms"],
        ))
        .unwrap();
        assert_clean(&report);
        assert_eq!(report.unwritten_reads, report.ops);
    }

    #[test]
    fn end_to_end_detects_a_corrupted_read() {
        let target = fake_server(Fault::CorruptReads(1));
        let extra = [
            "--op",
            "randread",
            "--prefill",
            "--verify",
            "--duration",
            "300ms",
        ];
        let report = run(&args(&target, &extra)).unwrap();
        assert_eq!(report.verify_failures, 1, "{report:?}");
        assert_eq!(report.errors, 0);
    }

    #[test]
    fn end_to_end_reply_crc_mismatch_fails_the_run() {
        let target = fake_server(Fault::BadCrc);
        let error = run(&args(
            &target,
            &["--op", "mixed", "--prefill", "--duration", "300ms"],
        ))
        .unwrap_err();
        assert!(error.contains("reply crc mismatch"), "{error}");
    }

    #[test]
    fn blocking_client_calls_round_trip() {
        let target = fake_server(Fault::None);
        let mut stream = client::connect(&target).unwrap();
        let write = [SubOpSpec::write(4, b"hello")];
        let reply = client::call(&mut stream, Opcode::OsdOp, b"c.0", &write).unwrap();
        assert_eq!(
            (reply.status, reply.results.clone()),
            (0, vec![(0, Vec::new())])
        );
        let read = [SubOpSpec::read(0, 16)];
        let reply = client::call(&mut stream, Opcode::OsdOp, b"c.0", &read).unwrap();
        assert_eq!(reply.results, vec![(0, b"\0\0\0\0hello".to_vec())]);
        let reply = client::call(&mut stream, Opcode::OsdOp, b"c.missing", &read).unwrap();
        assert_eq!(reply.status_name(), "not_found");
        assert_eq!(
            client::fetch_status(&target),
            Ok(serde_json::json!({"fake": true}))
        );
    }

    #[test]
    fn refused_connection_is_a_clear_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap().to_string();
        drop(listener);
        let error = run(&args(&target, &[])).unwrap_err();
        assert_eq!(error, format!("connect {target}: connection refused"));
    }

    #[test]
    fn arguments_are_validated() {
        let check = |extra: &[&str], needle: &str| {
            let error = validate(&args("127.0.0.1:1", extra))
                .err()
                .unwrap_or_default();
            assert!(error.contains(needle), "{extra:?}: {error:?}");
        };
        check(&["--bs", "16"], "--bs must be");
        check(&["--bs", "3000"], "multiple of --bs");
        check(&["--qd", "0"], "--qd must be");
        check(&["--threads", "3"], "must not exceed --clients");
        check(&["--read-pct", "101"], "--read-pct");
        check(&["--objects", "1000000", "--object-size", "1GiB"], "blocks");
        check(&["--objects", "100000000"], "--objects must be at most");
        check(&["--duration", "1000000h"], "--duration must be at most");
        check(&["--cpus", "100000"], "not available");
        assert!(validate(&args("127.0.0.1:1", &["--bs", "64KiB"])).is_ok());
    }
}
