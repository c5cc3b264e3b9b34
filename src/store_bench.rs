//! `carmine store-bench`: drives one segment-store shard directly, in this thread, to measure the
//! store alone: no network, no reactors, no PG layer. What `carmine load` is to a server, this is
//! to a `SegmentStore`: the same object names, the same block content (so reads are verified the
//! same way) and the same report keys, plus the store's write amplification and fill.
//!
//! Phases:
//! 1. Device: a missing file is created sparse and formatted with one shard; an existing device
//!    is mounted (its log replayed) and shard 0 is used.
//! 2. Prefill (untimed): every object that is not already complete is written whole, front to
//!    back, in big chunks with up to `--qd` ops in flight. The last chunk of an object sets the
//!    xattr `store-bench.bs`, so a later run knows the object is complete and written with the
//!    same `--bs` and skips it.
//! 3. Timed: exactly `--qd` ops in flight until `--duration` has passed; a completion is
//!    replaced at once. One block is never the target of two ops at a time, and the counter of
//!    each block's last acknowledged write is kept, so every read's expected content is known.
//! 4. Read-back (randwrite only, untimed): every block written in the timed phase is read and
//!    must hold exactly its last acknowledged write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use carmine_dataplane::reactor::Waker;
use carmine_storage::segment::format::{Superblock, SPARE_PERCENT_DEFAULT};
use carmine_storage::segment::store::OPS_IN_FLIGHT_MAX;
use carmine_storage::segment::{MountError, SegmentStats, SegmentStore};
use carmine_storage::{
    AlignedBuf, ObjectStat, ObjectStore, OutputBuffer, StoreError, StoreStats, SubOp, SubOpResult,
    Submit, UringQueuePair, DEPTH_MAX, STATUS_OK,
};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::client;
use crate::load::{self, BlockCheck, LoadReport, Mismatch, Rng, BLOCK_HEADER_BYTES};
use crate::units::{parse_duration, parse_size};

/// Xattr set by the last prefill chunk of an object: `--bs` as u64 little-endian. Its presence
/// (with the right value and the right object size) means the object is complete.
const MARKER_XATTR: &[u8] = b"store-bench.bs";
/// Prefill ops write at most this much (and at most a quarter of a segment: one op's data must
/// fit in one journal record).
const FILL_CHUNK_MAX_BYTES: u64 = 1 << 20;
/// Largest --bs: like the prefill chunk, one write must fit well inside a journal record.
const BS_MAX_BYTES: u64 = 1 << 20;
/// --fill above this leaves the log no room to write anything: refused.
const FILL_MAX: f64 = 0.95;
/// Objects: names are kept in memory (as `carmine load` does).
const OBJECTS_MAX: u64 = 1 << 22;
/// One u32 counter and two bits per block are kept in memory.
const BLOCKS_MAX: u64 = 1 << 28;
/// Largest --completions-per-poll.
const POLL_MAX: usize = 256;
/// Ops in flight but nothing completes for this long: the store is wedged.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Verify failures logged in detail (all of them are counted).
const VERIFY_LOG_MAX: u64 = 5;
/// Tag of the one-at-a-time ops made before the prefill (slot tags are 0..qd).
const SYNC_TAG: u64 = u32::MAX as u64;
/// Longest wait for a device completion after an idle poll (the store may have work that no
/// completion announces; an adaptive reactor parks as long at most).
const IDLE_WAIT: Duration = Duration::from_millis(1);

type Store = SegmentStore<UringQueuePair>;

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    Randwrite,
    Randread,
}

impl StoreOp {
    fn name(self) -> &'static str {
        match self {
            StoreOp::Randwrite => "randwrite",
            StoreOp::Randread => "randread",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Drive one segment-store shard directly (no network, no reactors) and measure it",
    long_about = "Mounts shard 0 of a segment-store device in this process and keeps exactly --qd \
ops in flight in it for --duration: random writes or verified random reads of --bs bytes over a \
working set of objects named as `carmine load` names them. Objects are prefilled (untimed) unless \
a previous store-bench run left them complete. The report has the keys of `carmine load --json` \
plus write_amplification (journal bytes / bytes of acknowledged writes, timed phase) and fill (live \
fraction of the shard's capacity at the start and end of the timed phase).\n\n\
Every write appends to the store's log; the cleaner reclaims what overwrites leave dead, mixed \
with the benchmark's writes (its cost shows in write_amplification). A write fails with no_space \
only when the live data leaves the cleaner nothing to reclaim: use a larger --device or a lower \
--fill."
)]
pub struct StoreBenchArgs {
    /// Segment-store device: a file or block device. A missing file is created sparse, of
    /// --device-size, and formatted with one shard (--segment-size); an existing device is mounted
    /// as it is (its log replayed) and its shard 0 is driven. Files must be on a filesystem with
    /// O_DIRECT (ext4, xfs, btrfs; not tmpfs).
    #[arg(long)]
    pub device: PathBuf,
    /// Timed workload: randwrite (one Write sub-op of --bs bytes at a random --bs-aligned offset
    /// of a random object) or randread (one Read sub-op of --bs bytes, content verified).
    #[arg(long, value_enum, default_value = "randwrite")]
    pub op: StoreOp,
    /// Bytes per op of the timed phase (e.g. 4096, 4k, 64KiB); at least 32 (every block starts
    /// with a 32-byte header naming object, offset and write counter), at most 1MiB and a quarter
    /// of the device's segment size.
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    pub bs: u64,
    /// Ops in flight in the store during the timed phase (and at most this many in the prefill).
    #[arg(long, default_value_t = 32)]
    pub qd: u32,
    /// Length of the timed phase, e.g. 20s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Working set as a fraction of the shard's usable capacity (its data capacity less the
    /// spare), in [0, 0.95]: the object count is chosen so that --object-size objects fill
    /// this much. 0 (the default): --objects objects instead.
    #[arg(long, default_value_t = 0.0)]
    pub fill: f64,
    /// Objects in the working set, named "{prefix}.{index}" (default 64; not with --fill).
    #[arg(long)]
    pub objects: Option<u32>,
    /// Size of each object: a non-zero multiple of --bs.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub object_size: u64,
    /// Size of the device file created when --device does not exist (ignored otherwise).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    pub device_size: u64,
    /// Segment size when formatting a new device file (ignored for an existing device, which
    /// keeps its own): the unit of log writing.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub segment_size: u64,
    /// Spare when formatting a new device file (ignored for an existing device, which keeps
    /// its own): percent of the shard's data capacity kept from clients, as `carmine mkfs
    /// --spare`. --fill is a fraction of what is left (the usable capacity).
    #[arg(long, default_value_t = SPARE_PERCENT_DEFAULT, value_parser = crate::device::parse_spare)]
    pub spare: u32,
    /// When creating the device file, write zeros over it first (as fio lays out its file),
    /// so the run measures overwrites rather than the file system allocating blocks on first
    /// write (see `carmine mkfs --preallocate`).
    #[arg(long)]
    pub preallocate: bool,
    /// io_uring queue depth of the shard's queue pair (device requests in flight at most).
    #[arg(long, default_value_t = 256)]
    pub queue_depth: u32,
    /// Seed of block selection.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Skewed access, FRACTION:SHARE: SHARE of the timed ops go to the first FRACTION of the
    /// blocks (the hot set), the rest to the others, each uniformly. E.g. 0.1:0.9 (90% of ops
    /// on 10% of the data). Default: uniform over all blocks.
    #[arg(long, value_parser = parse_hot)]
    pub hot: Option<(f64, f64)>,
    /// Object name prefix.
    #[arg(long, default_value = "obj")]
    pub prefix: String,
    /// randwrite: skip the untimed read-back that checks every block written in the timed phase.
    #[arg(long)]
    pub no_readback: bool,
    /// randread: do not compare each timed read's bytes with what was written (the store still
    /// checks every block's crc32c, and a read that fails it is an error). The comparison costs
    /// the benchmark about a fifth of its reads' CPU (2,000-2,500 instructions a 4 KiB block)
    /// and delays the next request: use this to measure the store alone against a tool that
    /// does not verify either, such as fio. The untimed read-back after randwrite always
    /// compares.
    #[arg(long)]
    pub no_verify: bool,
    /// Print the report as one JSON object (the keys of `carmine load --json`, plus
    /// write_amplification, fill and readback_blocks).
    #[arg(long)]
    pub json: bool,
    /// Poll the store without pause. By default a poll that finds nothing to do is followed by
    /// a wait in the kernel for the next device completion (the io_uring signals an eventfd;
    /// at most 1 ms), as fio waits in io_uring_enter and an adaptive reactor parks: a thread
    /// spinning between completions competes for its CPU with whatever else runs there, on a
    /// shared machine, and is scheduled out for it.
    #[arg(long)]
    pub spin: bool,
    /// Device completions the store takes (and ops it reports) per poll, 1..=256. Each
    /// reported op is replaced before the next poll, whose io_uring_enter hands the
    /// replacements to the device. Default: 1 for randread, so that a new read reaches the
    /// device as soon as one completion is processed, as fio submits each I/O (a larger value
    /// makes fewer system calls but leaves the device idle while a batch of completions is
    /// processed; see ARCHITECTURE.md, "Reads against fio"); 256 for randwrite, as before
    /// (its runs vary with the flushes of whatever else uses the disk too much to tell).
    #[arg(long)]
    pub completions_per_poll: Option<usize>,
}

/// The arguments that do not depend on the device, checked.
fn validate(args: &StoreBenchArgs) -> Result<(), String> {
    if !(0.0..=FILL_MAX).contains(&args.fill) {
        return Err(format!(
            "--fill must be in [0, {FILL_MAX}], got {}",
            args.fill
        ));
    }
    if args.fill > 0.0 && args.objects.is_some() {
        return Err("--fill and --objects both set the object count: give one of them".to_string());
    }
    if args.bs < BLOCK_HEADER_BYTES as u64 || args.bs > BS_MAX_BYTES {
        return Err(format!(
            "--bs must be {BLOCK_HEADER_BYTES}..={BS_MAX_BYTES} bytes (blocks start with a {BLOCK_HEADER_BYTES}-byte header), got {}",
            args.bs
        ));
    }
    if args.object_size == 0 || args.object_size / args.bs * args.bs != args.object_size {
        return Err(format!(
            "--object-size ({}) must be a non-zero multiple of --bs ({})",
            args.object_size, args.bs
        ));
    }
    let qd_max = OPS_IN_FLIGHT_MAX as u32 - 1;
    if args.qd == 0 || args.qd > qd_max {
        return Err(format!("--qd must be 1..={qd_max}, got {}", args.qd));
    }
    if !(1..=DEPTH_MAX).contains(&args.queue_depth) {
        return Err(format!(
            "--queue-depth must be 1..={DEPTH_MAX}, got {}",
            args.queue_depth
        ));
    }
    if let Some(count) = args.completions_per_poll {
        if !(1..=POLL_MAX).contains(&count) {
            return Err(format!(
                "--completions-per-poll must be 1..={POLL_MAX}, got {count}"
            ));
        }
    }
    if args.duration.is_zero() {
        return Err("--duration must be positive".to_string());
    }
    if args.objects == Some(0) {
        return Err("--objects must be at least 1".to_string());
    }
    Ok(())
}

/// Completions per poll in the timed phase: `--completions-per-poll`, else the op's default.
fn completions_per_poll(args: &StoreBenchArgs) -> usize {
    args.completions_per_poll.unwrap_or(match args.op {
        StoreOp::Randread => 1,
        StoreOp::Randwrite => POLL_MAX,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(serde::Serialize, Debug, Clone)]
struct Fill {
    /// bytes_stored / capacity_bytes when the timed phase starts.
    start: f64,
    /// The same when it ends.
    end: f64,
}

#[derive(serde::Serialize, Debug, Clone)]
struct StoreBenchReport {
    #[serde(flatten)]
    load: LoadReport,
    /// Journal bytes written / bytes of acknowledged client writes, timed phase; null without
    /// writes.
    write_amplification: Option<f64>,
    fill: Fill,
    /// Blocks read back and checked after a randwrite run (failures are in verify_failures).
    readback_blocks: u64,
    /// Timed reads were compared with what was written (false with --no-verify; randwrite
    /// runs: true).
    reads_verified: bool,
}

fn print_human(report: &StoreBenchReport) {
    load::print_human(&report.load);
    let server = report
        .load
        .server
        .as_ref()
        .expect("store-bench sets server");
    let number = |key: &str| server[key].as_u64().unwrap_or(0);
    match report.write_amplification {
        Some(wa) => println!(
            "  write amp    {:>12.2}   (journal {} bytes / {} bytes of acknowledged writes)",
            wa,
            number("journal_bytes"),
            number("client_bytes_acknowledged")
        ),
        None => println!(
            "  write amp    {:>12}   (no writes in the timed phase)",
            "-"
        ),
    }
    println!(
        "  fill         {:>12.3}   at start, {:.3} at end (of {} MiB shard capacity)",
        report.fill.start,
        report.fill.end,
        number("capacity_bytes") >> 20
    );
    println!(
        "  store        {:>12} records ({} beside another)   {} block reads   {} lane waits   {} writes behind journaled ones   {} of {} segments free",
        number("records_written"),
        number("records_overlapped"),
        number("block_reads"),
        number("lane_waits"),
        number("lane_pipelined"),
        number("free_segments"),
        number("segments")
    );
    if report.readback_blocks > 0 {
        println!(
            "  read-back    {:>12} blocks verified after the timed phase",
            report.readback_blocks
        );
    }
    if report.load.errors_by_status.contains_key("no_space") {
        println!(
            "  note: no_space: the live data left the cleaner nothing to reclaim; use a larger \
             --device or a lower --fill"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Device

fn parse_hot(text: &str) -> Result<(f64, f64), String> {
    let parse = |part: Option<&str>| -> Option<f64> {
        part?
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| *v > 0.0 && *v < 1.0)
    };
    let mut parts = text.split(':');
    match (parse(parts.next()), parse(parts.next()), parts.next()) {
        (Some(fraction), Some(share), None) => Ok((fraction, share)),
        _ => Err(format!(
            "expected FRACTION:SHARE, both between 0 and 1 (e.g. 0.1:0.9), got {text:?}"
        )),
    }
}

/// Creates and formats (one shard) the device file if it is missing.
fn prepare_device(args: &StoreBenchArgs) -> Result<(), String> {
    crate::device::create_and_format(
        &args.device,
        args.device_size,
        1,
        args.segment_size,
        args.spare,
        args.preallocate,
    )
    .map(|_| ())
}

fn mount(path: &Path, queue_depth: u32) -> Result<Store, String> {
    let size = crate::device::device_size(path)? / 4096 * 4096;
    if size == 0 {
        return Err(format!("{}: empty device", path.display()));
    }
    let qp = UringQueuePair::open(path, 0, size, queue_depth)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut store = SegmentStore::mount(qp, 0).map_err(|error| {
        let hint = match error {
            MountError::NotFormatted(_) => format!(
                " (format it with `carmine mkfs --device {} --cores 1`, or give a path that does \
                 not exist and store-bench creates and formats one)",
                path.display()
            ),
            _ => String::new(),
        };
        format!("cannot mount {}: {error}{hint}", path.display())
    })?;
    let sb = *store.superblock();
    crate::device::lock_shard(store.queue_pair(), &sb, 0)?;
    Ok(store)
}

// ---------------------------------------------------------------------------------------------
// The bench

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Prefill,
    Timed,
    Readback,
}

#[derive(Clone, Copy, Debug)]
enum Request {
    /// Prefill: bytes `offset..offset + len` of an object.
    Fill {
        object: u32,
        offset: u64,
        len: u64,
    },
    Write {
        block: u32,
        counter: u32,
    },
    Read {
        block: u32,
    },
}

/// Outcome of one op: the op's error, or its first failing sub-op's result (else the first).
type Outcome = Result<SubOpResult, StoreError>;

fn outcome(result: Result<&[SubOpResult], StoreError>) -> Outcome {
    result.map(|results| {
        results
            .iter()
            .find(|r| r.status != STATUS_OK)
            .copied()
            .unwrap_or(results[0])
    })
}

/// The wire name of an outcome's failure ("no_space"), None for success.
fn failure_name(outcome: &Outcome) -> Option<String> {
    let code = match outcome {
        Err(error) => error.code(),
        Ok(result) if result.status != STATUS_OK => result.status,
        Ok(_) => return None,
    };
    Some(client::status_name(u32::from(code)))
}

struct TimedStats {
    ops: u64,
    bytes: u64,
    /// Bytes of acknowledged writes.
    written: u64,
    errors: u64,
    by_status: BTreeMap<String, u64>,
    verify_failures: u64,
    latency: Histogram<u64>,
}

impl TimedStats {
    fn new() -> TimedStats {
        TimedStats {
            ops: 0,
            bytes: 0,
            written: 0,
            errors: 0,
            by_status: BTreeMap::new(),
            verify_failures: 0,
            latency: Histogram::new_with_bounds(1, load::LATENCY_MAX_NS, 3)
                .expect("static histogram bounds are valid"),
        }
    }
}

#[derive(Default)]
struct PrefillStats {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
}

struct Bench {
    // Declared first, so dropped first: the store may still hold pointers into `bufs` (reads
    // in flight) if a phase ends with an error; once it is gone nothing writes them.
    store: Store,
    /// One block-aligned buffer per in-flight slot: write data, then read output.
    bufs: Vec<AlignedBuf>,
    slots: Vec<Option<(Request, Instant)>>,
    free: Vec<u32>,
    in_flight: usize,
    completions: Vec<(u64, Outcome)>,
    /// `--completions-per-poll` (or its default for the op), for the timed phase; the
    /// untimed phases take up to `POLL_MAX`.
    poll_max: usize,
    /// Signalled by the store's queue pair on each device completion: an idle poll waits on
    /// it (None with --spin, or a queue pair that cannot signal).
    waker: Option<Waker>,
    /// Waits for completions (see `--spin`), and those that ended at `IDLE_WAIT` with no
    /// completion signalled (many would mean a missed wakeup, or store work no completion
    /// announces).
    idle_waits: u64,
    idle_wait_timeouts: u64,

    names: Vec<Box<[u8]>>,
    hashes: Vec<u64>,
    object_size: u64,
    bs: u64,
    blocks_per_object: u64,
    /// Counter of the last acknowledged write per block; 0: unknown (a previous run wrote it),
    /// so any self-consistent content is accepted.
    counters: Vec<u32>,
    /// Bit per block: an op on it is in flight.
    busy: Vec<u64>,
    /// Bit per block: written (acknowledged) in the timed phase.
    written: Vec<u64>,
    next_counter: u32,
    rng: Rng,
    /// `--hot`: (fraction of the blocks, share of the ops).
    hot: Option<(f64, f64)>,

    phase: Phase,
    op: StoreOp,
    fill_chunk: u64,
    /// Objects to prefill, and the position of the next chunk.
    to_fill: Vec<u32>,
    fill_cursor: (usize, u64),
    prefill_counter: u32,
    readback: Vec<u32>,
    readback_cursor: usize,
    /// --no-verify: timed reads are counted, not compared.
    verify_timed_reads: bool,

    prefill: PrefillStats,
    timed: TimedStats,
    readback_failures: u64,
    readback_done: u64,
    verify_logged: u64,
    /// The store's state was logged at the first no_space.
    no_space_logged: bool,
}

fn bit(bits: &[u64], index: u32) -> bool {
    bits[index as usize / 64] & (1 << (index % 64)) != 0
}

fn set_bit(bits: &mut [u64], index: u32, value: bool) {
    let word = &mut bits[index as usize / 64];
    let mask = 1u64 << (index % 64);
    *word = if value { *word | mask } else { *word & !mask };
}

impl Bench {
    fn blocks(&self) -> u32 {
        self.counters.len() as u32
    }

    /// (object, byte offset) of a block.
    fn locate(&self, block: u32) -> (usize, u64) {
        let block = u64::from(block);
        (
            (block / self.blocks_per_object) as usize,
            (block % self.blocks_per_object) * self.bs,
        )
    }

    fn counter(&mut self) -> u32 {
        self.next_counter = self.next_counter.wrapping_add(1).max(1);
        self.next_counter
    }

    /// A random block with no op in flight: uniform, or in the hot or cold set (`--hot`).
    fn pick_block(&mut self) -> u32 {
        let n = u64::from(self.blocks());
        let (first, count) = match self.hot {
            None => (0, n),
            Some((fraction, share)) => {
                let hot = ((n as f64 * fraction) as u64).clamp(1, n - 1);
                if (self.rng.below(1 << 20) as f64) < share * f64::from(1 << 20) {
                    (0, hot)
                } else {
                    (hot, n - hot)
                }
            }
        };
        for _ in 0..8 {
            let block = (first + self.rng.below(count)) as u32;
            if !bit(&self.busy, block) {
                return block;
            }
        }
        let start = self.rng.below(n) as u32;
        (0..self.blocks())
            .map(|step| (start + step) % self.blocks())
            .find(|&block| !bit(&self.busy, block))
            .expect("a free slot means a free block (blocks >= qd)")
    }

    fn next_request(&mut self) -> Option<Request> {
        match self.phase {
            Phase::Prefill => {
                let (index, offset) = self.fill_cursor;
                let &object = self.to_fill.get(index)?;
                let len = self.fill_chunk.min(self.object_size - offset);
                self.fill_cursor = if offset + len == self.object_size {
                    (index + 1, 0)
                } else {
                    (index, offset + len)
                };
                Some(Request::Fill {
                    object,
                    offset,
                    len,
                })
            }
            Phase::Timed => {
                let block = self.pick_block();
                Some(match self.op {
                    StoreOp::Randwrite => Request::Write {
                        block,
                        counter: self.counter(),
                    },
                    StoreOp::Randread => Request::Read { block },
                })
            }
            Phase::Readback => {
                let &block = self.readback.get(self.readback_cursor)?;
                self.readback_cursor += 1;
                Some(Request::Read { block })
            }
        }
    }

    /// Submits `request` in `slot`; a completion inside `submit` is booked at once.
    fn issue(&mut self, slot: u32, request: Request, now: Instant) {
        let Bench {
            store,
            bufs,
            names,
            hashes,
            ..
        } = self;
        let buf = &mut bufs[slot as usize];
        let mut results = [SubOpResult::default(); 4];
        let bs = self.bs;
        let submitted = match request {
            Request::Fill {
                object,
                offset,
                len,
            } => {
                let data = &mut buf[..len as usize];
                for (index, block) in data.chunks_mut(bs as usize).enumerate() {
                    let at = offset + index as u64 * bs;
                    load::fill_block(
                        block,
                        hashes[object as usize],
                        at,
                        u64::from(self.prefill_counter),
                    );
                }
                let marker = bs.to_le_bytes();
                let mut ops = [SubOp::Stat; 4];
                let mut count = 0;
                if offset == 0 {
                    // A fresh start: exact size, and no completeness marker until the end.
                    ops[0] = SubOp::Truncate {
                        size: self.object_size,
                    };
                    ops[1] = SubOp::SetXattr {
                        name: MARKER_XATTR,
                        value: b"",
                    };
                    count = 2;
                }
                ops[count] = SubOp::Write { offset, data };
                count += 1;
                if offset + len == self.object_size {
                    ops[count] = SubOp::SetXattr {
                        name: MARKER_XATTR,
                        value: &marker,
                    };
                    count += 1;
                }
                let name = &names[object as usize];
                store.submit(
                    u64::from(slot),
                    name,
                    &ops[..count],
                    &mut OutputBuffer::empty(),
                    &mut results,
                )
            }
            Request::Write { block, counter } => {
                set_bit(&mut self.busy, block, true);
                let (object, offset) = (
                    (u64::from(block) / self.blocks_per_object) as usize,
                    (u64::from(block) % self.blocks_per_object) * bs,
                );
                let data = &mut buf[..bs as usize];
                load::fill_block(data, hashes[object], offset, u64::from(counter));
                let ops = [SubOp::Write { offset, data }];
                store.submit(
                    u64::from(slot),
                    &names[object],
                    &ops,
                    &mut OutputBuffer::empty(),
                    &mut results,
                )
            }
            Request::Read { block } => {
                set_bit(&mut self.busy, block, true);
                let (object, offset) = (
                    (u64::from(block) / self.blocks_per_object) as usize,
                    (u64::from(block) % self.blocks_per_object) * bs,
                );
                let ops = [SubOp::Read { offset, length: bs }];
                // SAFETY: the slot's buffer is at least `bs` bytes, lives in `self.bufs` (heap
                // memory that never moves) until after the store is dropped, and is not touched
                // until this op's completion is booked: the slot is busy until then.
                let mut out = unsafe { OutputBuffer::from_raw(buf.as_mut_ptr(), bs as usize) };
                store.submit(
                    u64::from(slot),
                    &names[object],
                    &ops,
                    &mut out,
                    &mut results,
                )
            }
        };
        self.slots[slot as usize] = Some((request, now));
        self.in_flight += 1;
        match submitted {
            Ok(Submit::Pending) => {}
            Ok(Submit::Done) => {
                let count = match request {
                    Request::Fill { .. } => results.len(),
                    _ => 1,
                };
                let done = outcome(Ok(&results[..count]));
                self.complete(slot, done, Instant::now());
            }
            Err(error) => self.complete(slot, Err(error), Instant::now()),
        }
    }

    /// Books the completion of the op in `slot`.
    fn complete(&mut self, slot: u32, done: Outcome, now: Instant) {
        let (request, started) = self.slots[slot as usize]
            .take()
            .expect("a completion for a slot in use");
        self.free.push(slot);
        self.in_flight -= 1;
        let failure = failure_name(&done);
        if matches!(done, Err(StoreError::NoSpace)) && !self.no_space_logged {
            self.no_space_logged = true;
            log::warn!(
                "first no_space ({:?} phase); store state: {}",
                self.phase,
                self.store.debug_state()
            );
        }
        match (self.phase, request) {
            (_, Request::Fill { .. }) => {
                self.prefill.ops += 1;
                if let Some(name) = failure {
                    self.prefill.errors += 1;
                    self.prefill.first_error.get_or_insert(name);
                }
            }
            (Phase::Timed, Request::Write { block, counter }) => {
                set_bit(&mut self.busy, block, false);
                let stats = &mut self.timed;
                stats.ops += 1;
                stats
                    .latency
                    .saturating_record(now.duration_since(started).as_nanos().max(1) as u64);
                match failure {
                    None => {
                        stats.bytes += self.bs;
                        stats.written += self.bs;
                        self.counters[block as usize] = counter;
                        set_bit(&mut self.written, block, true);
                    }
                    Some(name) => {
                        stats.errors += 1;
                        *stats.by_status.entry(name).or_insert(0) += 1;
                        if matches!(done, Err(StoreError::Io)) {
                            // The record may or may not be on the device: either version is fine.
                            self.counters[block as usize] = 0;
                        }
                    }
                }
            }
            (phase, Request::Read { block }) => {
                set_bit(&mut self.busy, block, false);
                if phase == Phase::Timed {
                    let stats = &mut self.timed;
                    stats.ops += 1;
                    stats
                        .latency
                        .saturating_record(now.duration_since(started).as_nanos().max(1) as u64);
                    if let Some(name) = &failure {
                        stats.errors += 1;
                        *stats.by_status.entry(name.clone()).or_insert(0) += 1;
                    }
                } else {
                    self.readback_done += 1;
                }
                let intact = if phase == Phase::Timed && !self.verify_timed_reads {
                    matches!(&done, Ok(result) if result.status == STATUS_OK)
                } else {
                    self.verify_read(slot, block, &done)
                };
                if phase == Phase::Timed {
                    if intact {
                        self.timed.bytes += self.bs;
                    } else if failure.is_none() {
                        self.timed.verify_failures += 1;
                    }
                } else if !intact {
                    self.readback_failures += 1;
                }
            }
            (phase, request) => unreachable!("{request:?} in phase {phase:?}"),
        }
    }

    /// Checks a read's output against what the block must hold; logs the first failures.
    fn verify_read(&mut self, slot: u32, block: u32, done: &Outcome) -> bool {
        let expected = self.counters[block as usize];
        let (object, offset) = self.locate(block);
        let mismatch = match done {
            Err(error) => Mismatch {
                reason: if *error == StoreError::NotFound {
                    "object not found"
                } else {
                    "op failed"
                },
                got_counter: 0,
                byte: 0,
            },
            Ok(result) if result.status != STATUS_OK => Mismatch {
                reason: "read failed",
                got_counter: 0,
                byte: 0,
            },
            Ok(result) => {
                let output = &self.bufs[slot as usize][result.out_offset as usize..]
                    [..result.out_len as usize];
                match load::check_block(
                    output,
                    self.bs as usize,
                    self.hashes[object],
                    offset,
                    expected,
                ) {
                    BlockCheck::Intact { .. } => return true,
                    BlockCheck::Unwritten => Mismatch {
                        reason: "block reads as never written",
                        got_counter: 0,
                        byte: 0,
                    },
                    BlockCheck::Mismatch(mismatch) => mismatch,
                }
            }
        };
        self.verify_logged += 1;
        if self.verify_logged <= VERIFY_LOG_MAX {
            log::error!(
                "verify failure ({:?}): {} offset {offset}: {} at byte {} (expected counter {expected}, got {})",
                self.phase,
                String::from_utf8_lossy(&self.names[object]),
                mismatch.reason,
                mismatch.byte,
                mismatch.got_counter
            );
        }
        false
    }

    /// Runs a phase: keeps every slot busy while there is work (and, with a deadline, until
    /// it passes), then waits for what is in flight. Returns when the last op completed.
    fn run_phase(&mut self, phase: Phase, deadline: Option<Instant>) -> Result<Instant, String> {
        self.phase = phase;
        let mut last = Instant::now();
        let mut completions = std::mem::take(&mut self.completions);
        let poll_max = if phase == Phase::Timed {
            self.poll_max
        } else {
            POLL_MAX
        };
        loop {
            while let Some(&slot) = self.free.last() {
                let now = Instant::now();
                if deadline.is_some_and(|deadline| now >= deadline) {
                    break;
                }
                let Some(request) = self.next_request() else {
                    break;
                };
                self.free.pop();
                self.issue(slot, request, now);
            }
            if self.in_flight == 0 {
                break;
            }
            completions.clear();
            let work = self.store.poll(poll_max, &mut |tag, result| {
                completions.push((tag, outcome(result)));
            });
            if work == 0 {
                if let Some(waker) = &self.waker {
                    self.idle_waits += 1;
                    if !waker.wait(IDLE_WAIT) {
                        self.idle_wait_timeouts += 1;
                    }
                }
            }
            if completions.is_empty() {
                if last.elapsed() > STALL_TIMEOUT {
                    return Err(format!(
                        "the store completed nothing for {}s with {} op(s) in flight ({phase:?} phase); store state: {}",
                        STALL_TIMEOUT.as_secs(),
                        self.in_flight,
                        self.store.debug_state()
                    ));
                }
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            for &(tag, done) in &completions {
                self.complete(tag as u32, done, now);
            }
            last = now;
        }
        self.completions = completions;
        Ok(last)
    }

    /// One op, waited for (nothing else may be in flight): for the checks before the prefill.
    fn run_sync(
        &mut self,
        object: usize,
        ops: &[SubOp<'_>],
        out: &mut AlignedBuf,
    ) -> Result<Vec<SubOpResult>, StoreError> {
        assert_eq!(self.in_flight, 0);
        let mut results = vec![SubOpResult::default(); ops.len()];
        // SAFETY: `out` is borrowed mutably for this whole call, which returns only once the
        // op has completed, and nothing else touches it meanwhile.
        let mut output = unsafe { OutputBuffer::from_raw(out.as_mut_ptr(), out.len()) };
        let name = &self.names[object];
        match self
            .store
            .submit(SYNC_TAG, name, ops, &mut output, &mut results)?
        {
            Submit::Done => return Ok(results),
            Submit::Pending => {}
        }
        let started = Instant::now();
        let mut reported: Option<Result<Vec<SubOpResult>, StoreError>> = None;
        while reported.is_none() {
            self.store.poll(1, &mut |tag, result| {
                debug_assert_eq!(tag, SYNC_TAG);
                reported = Some(result.map(|r| r.to_vec()));
            });
            if reported.is_none() && started.elapsed() > STALL_TIMEOUT {
                return Err(StoreError::Io);
            }
        }
        reported.expect("set above")
    }

    /// Whether object `object` is complete from an earlier run with this --bs and size.
    fn is_complete(&mut self, object: usize) -> Result<bool, String> {
        let mut out = AlignedBuf::new(4096);
        let ops = [SubOp::Stat, SubOp::GetXattr { name: MARKER_XATTR }];
        let results = self.run_sync(object, &ops, &mut out).map_err(|e| {
            format!(
                "checking object {}: {e}",
                String::from_utf8_lossy(&self.names[object])
            )
        })?;
        let (stat, marker) = (results[0], results[1]);
        if stat.status != STATUS_OK || marker.status != STATUS_OK {
            return Ok(false);
        }
        let bytes = |r: SubOpResult| &out[r.out_offset as usize..][..r.out_len as usize];
        let size = ObjectStat::from_bytes(bytes(stat)).map(|s| s.size);
        Ok(size == Some(self.object_size) && bytes(marker) == self.bs.to_le_bytes())
    }
}

fn fraction(stats: &StoreStats) -> f64 {
    if stats.capacity_bytes == 0 {
        0.0
    } else {
        stats.bytes_stored as f64 / stats.capacity_bytes as f64
    }
}

/// The timed phase's store counters as JSON: deltas of the SegmentStats counters, plus levels.
fn server_json(
    before: &SegmentStats,
    after: &SegmentStats,
    start: &StoreStats,
    end: &StoreStats,
    sb: &Superblock,
) -> serde_json::Value {
    json!({
        "store": "segment",
        "records_written": after.records_written.saturating_sub(before.records_written),
        "records_overlapped": after.records_overlapped.saturating_sub(before.records_overlapped),
        "journal_bytes": after.journal_bytes.saturating_sub(before.journal_bytes),
        "client_bytes_written": after.client_bytes_written.saturating_sub(before.client_bytes_written),
        "block_reads": after.block_reads.saturating_sub(before.block_reads),
        "checksum_errors": after.checksum_errors.saturating_sub(before.checksum_errors),
        "read_errors": after.read_errors.saturating_sub(before.read_errors),
        "lane_waits": after.lane_waits.saturating_sub(before.lane_waits),
        // Whole-block writes that started behind journaled writes to their object.
        "lane_pipelined": after.lane_pipelined.saturating_sub(before.lane_pipelined),
        "batch_full_waits": after.batch_full_waits.saturating_sub(before.batch_full_waits),
        // Writes that found no free segment and waited for the cleaner.
        "space_waits": after.space_waits.saturating_sub(before.space_waits),
        "buffer_allocations": after.buffer_allocations.saturating_sub(before.buffer_allocations),
        // Where journal_bytes went besides client data: metadata checkpoints and the
        // cleaner's copies (each moved block is rewritten once).
        "checkpoints": after.checkpoints.saturating_sub(before.checkpoints),
        "checkpoint_bytes": after.checkpoint_bytes.saturating_sub(before.checkpoint_bytes),
        // What the same checkpoints would write as incremental ones (only the extent-tree
        // nodes changed since the previous checkpoint, plus the onode table): the store's
        // prediction, which picks between the two at each checkpoint.
        "checkpoint_incremental_estimate_bytes": after
            .checkpoint_incremental_estimate_bytes
            .saturating_sub(before.checkpoint_incremental_estimate_bytes),
        // Checkpoints that wrote the extent tree's dirty nodes instead of a dump, and the
        // node blocks they wrote (in checkpoint_bytes too).
        "checkpoints_incremental": after
            .checkpoints_incremental
            .saturating_sub(before.checkpoints_incremental),
        "checkpoint_node_blocks": after
            .checkpoint_node_blocks
            .saturating_sub(before.checkpoint_node_blocks),
        "blocks_moved": after.blocks_moved.saturating_sub(before.blocks_moved),
        // Of blocks_moved, those written to the cleaner's own head (cold segments); the rest
        // went beside client writes, when free segments were too few to open a cold one.
        "blocks_moved_cold": after.blocks_moved_cold.saturating_sub(before.blocks_moved_cold),
        "cold_segments_opened": after
            .cold_segments_opened
            .saturating_sub(before.cold_segments_opened),
        "cold_heads_left": after.cold_heads_left.saturating_sub(before.cold_heads_left),
        "cleaner_reads": after.cleaner_reads.saturating_sub(before.cleaner_reads),
        "cleaner_blocks_read": after.cleaner_blocks_read.saturating_sub(before.cleaner_blocks_read),
        "cleaner_walk_steps": after.cleaner_walk_steps.saturating_sub(before.cleaner_walk_steps),
        "segments_cleaned": after.segments_cleaned.saturating_sub(before.segments_cleaned),
        "segments_freed_empty": after.segments_freed_empty.saturating_sub(before.segments_freed_empty),
        "free_segments_start": before.free_segments,
        "free_segments": after.free_segments,
        "segments": sb.shard_segments(0).len(),
        "segment_size": sb.segment_size,
        "shards": sb.shard_count,
        // Usable capacity (what --fill is a fraction of), and the spare kept from it.
        "capacity_bytes": end.capacity_bytes,
        "spare_percent": sb.spare_percent,
        "usable_full_refusals": after.usable_full_refusals.saturating_sub(before.usable_full_refusals),
        "bytes_stored_start": start.bytes_stored,
        "bytes_stored": end.bytes_stored,
        "objects": end.objects,
        "store_errors": end.errors.saturating_sub(start.errors),
    })
}

pub fn run(args: &StoreBenchArgs) -> Result<(), String> {
    validate(args)?;
    prepare_device(args)?;
    let store = mount(&args.device, args.queue_depth)?;
    let sb = *store.superblock();
    let initial = store.stats();
    log::info!(
        "mounted shard 0 of {} ({} shard(s), {} segments of {} MiB, {}% spare): {} objects, {} free segments, fill {:.3}",
        args.device.display(),
        sb.shard_count,
        sb.shard_segments(0).len(),
        sb.segment_size >> 20,
        sb.spare_percent,
        initial.objects,
        store.segment_stats().free_segments,
        fraction(&initial)
    );
    if args.bs > sb.segment_size / 4 {
        return Err(format!(
            "--bs ({}) must be at most a quarter of the device's segment size ({}): one write's data must fit in one journal record",
            args.bs, sb.segment_size
        ));
    }
    let capacity = initial.capacity_bytes;
    let objects = if args.fill > 0.0 {
        let count = (args.fill * capacity as f64 / args.object_size as f64) as u64;
        if count == 0 {
            return Err(format!(
                "--fill {} of the shard's {capacity} bytes holds no object of --object-size {}",
                args.fill, args.object_size
            ));
        }
        count
    } else {
        u64::from(args.objects.unwrap_or(64))
    };
    if objects > OBJECTS_MAX {
        return Err(format!(
            "{objects} objects exceed the {OBJECTS_MAX} store-bench tracks: use a larger --object-size"
        ));
    }
    let working_set = objects * args.object_size;
    if working_set as f64 > FILL_MAX * capacity as f64 {
        return Err(format!(
            "the working set ({objects} objects x {} bytes = {working_set} bytes) is over {}% of the shard's capacity ({capacity} bytes): use fewer or smaller objects, or a larger device",
            args.object_size,
            FILL_MAX * 100.0
        ));
    }
    let blocks_per_object = args.object_size / args.bs;
    let blocks = objects * blocks_per_object;
    if blocks > BLOCKS_MAX {
        return Err(format!(
            "{blocks} blocks (objects x object-size / bs) exceed the {BLOCKS_MAX} store-bench tracks: use a larger --bs"
        ));
    }
    if blocks < u64::from(args.qd) {
        return Err(format!(
            "the working set has {blocks} blocks of --bs, fewer than --qd ({}): each op in flight needs its own block",
            args.qd
        ));
    }
    let fill_chunk = (FILL_CHUNK_MAX_BYTES.min(sb.segment_size / 4) / args.bs).max(1) * args.bs;
    let buf_bytes = fill_chunk.max(args.bs).next_multiple_of(4096) as usize;
    let names: Vec<Box<[u8]>> = (0..objects)
        .map(|index| {
            load::object_name(&args.prefix, index)
                .into_bytes()
                .into_boxed_slice()
        })
        .collect();
    let base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut bench = Bench {
        store,
        bufs: (0..args.qd).map(|_| AlignedBuf::new(buf_bytes)).collect(),
        slots: vec![None; args.qd as usize],
        free: (0..args.qd).rev().collect(),
        in_flight: 0,
        completions: Vec::with_capacity(POLL_MAX),
        poll_max: completions_per_poll(args),
        waker: None,
        idle_waits: 0,
        idle_wait_timeouts: 0,
        hashes: names.iter().map(|n| load::name_hash(n)).collect(),
        names,
        object_size: args.object_size,
        bs: args.bs,
        blocks_per_object,
        counters: vec![0; blocks as usize],
        busy: vec![0; (blocks as usize).div_ceil(64)],
        written: vec![0; (blocks as usize).div_ceil(64)],
        // Counters differ from run to run, so a block still holding an earlier run's write
        // never passes for this run's.
        next_counter: (load::name_hash(&base.to_le_bytes()) as u32).max(1),
        rng: Rng(args.seed),
        hot: args.hot,
        phase: Phase::Prefill,
        op: args.op,
        fill_chunk,
        to_fill: Vec::new(),
        fill_cursor: (0, 0),
        prefill_counter: 0,
        readback: Vec::new(),
        readback_cursor: 0,
        verify_timed_reads: !args.no_verify,
        prefill: PrefillStats::default(),
        timed: TimedStats::new(),
        readback_failures: 0,
        readback_done: 0,
        verify_logged: 0,
        no_space_logged: false,
    };
    bench.prefill_counter = bench.counter();
    if !args.spin {
        let waker = Waker::new().map_err(|e| format!("eventfd: {e}"))?;
        match bench.store.wake_on_completion(waker.fd()) {
            Ok(true) => bench.waker = Some(waker),
            Ok(false) => {
                log::info!("the queue pair cannot signal completions: polling without pause")
            }
            Err(e) => return Err(format!("registering the completion eventfd: {e}")),
        }
    }

    // Prefill what an earlier run did not leave complete.
    for object in 0..objects as usize {
        if !bench.is_complete(object)? {
            bench.to_fill.push(object as u32);
            let first = object as u64 * blocks_per_object;
            bench.counters[first as usize..(first + blocks_per_object) as usize]
                .fill(bench.prefill_counter);
        }
    }
    let fill_bytes = bench.to_fill.len() as u64 * args.object_size;
    let segment_data = sb.segment_size - 4096;
    let free_bytes = bench.store.segment_stats().free_segments * segment_data;
    if fill_bytes > free_bytes {
        log::warn!(
            "the prefill writes {fill_bytes} bytes but the log has {free_bytes} bytes of free segments: \
             it may fail with no_space unless the cleaner reclaims enough; a fresh --device (or deleting {}) \
             starts from an empty log",
            args.device.display()
        );
    }
    log::info!(
        "{objects} objects of {} bytes: {} already complete, prefilling {} ({fill_bytes} bytes in {fill_chunk}-byte writes)",
        args.object_size,
        objects as usize - bench.to_fill.len(),
        bench.to_fill.len()
    );
    let prefill_start = Instant::now();
    bench.run_phase(Phase::Prefill, None)?;
    if bench.prefill.errors > 0 {
        return Err(format!(
            "prefill failed: {} of {} writes failed (first: {}){}",
            bench.prefill.errors,
            bench.prefill.ops,
            bench.prefill.first_error.as_deref().unwrap_or("?"),
            if bench.prefill.first_error.as_deref() == Some("no_space") {
                ": the live data left the cleaner nothing to reclaim; use a larger --device or a lower --fill"
            } else {
                ""
            }
        ));
    }
    if bench.prefill.ops > 0 {
        log::info!(
            "prefill: {} writes in {:.2}s",
            bench.prefill.ops,
            prefill_start.elapsed().as_secs_f64()
        );
    }

    // The timed phase.
    let (segment_before, stats_before) = (bench.store.segment_stats(), bench.store.stats());
    let start = Instant::now();
    let last = bench.run_phase(Phase::Timed, Some(start + args.duration))?;
    let (segment_after, stats_after) = (bench.store.segment_stats(), bench.store.stats());

    // Read-back of every block this run wrote.
    if args.op == StoreOp::Randwrite && !args.no_readback {
        bench.readback = (0..bench.blocks())
            .filter(|&block| bit(&bench.written, block))
            .collect();
        let readback_start = Instant::now();
        bench.run_phase(Phase::Readback, None)?;
        log::info!(
            "read-back: {} blocks in {:.2}s, {} failure(s)",
            bench.readback_done,
            readback_start.elapsed().as_secs_f64(),
            bench.readback_failures
        );
    }

    let duration_s = last.saturating_duration_since(start).as_secs_f64();
    let per_second = |value: f64| {
        if duration_s > 0.0 {
            value / duration_s
        } else {
            0.0
        }
    };
    let server = server_json(
        &segment_before,
        &segment_after,
        &stats_before,
        &stats_after,
        &sb,
    );
    let journal_bytes = server["journal_bytes"].as_u64().unwrap_or(0);
    let timed = &bench.timed;
    // The denominator is what the store acknowledged, counted here: the store's own
    // client_bytes_written counter misses the writes it journals straight from `submit` (an
    // idle object, whole blocks), so it is reported in `server` but not divided by.
    let client_bytes = timed.written;
    let store_client_bytes = server["client_bytes_written"].as_u64().unwrap_or(0);
    if store_client_bytes != client_bytes {
        log::warn!(
            "the store's client_bytes_written counter ({store_client_bytes}) differs from the bytes of the writes it acknowledged ({client_bytes}); write_amplification uses the latter"
        );
    }
    let mut server = server;
    server["client_bytes_acknowledged"] = json!(client_bytes);
    // Waits for a device completion after an idle poll, all phases (0 with --spin).
    server["idle_waits"] = json!(bench.idle_waits);
    server["idle_wait_timeouts"] = json!(bench.idle_wait_timeouts);
    let report = StoreBenchReport {
        load: LoadReport {
            op: args.op.name().to_string(),
            bs: args.bs,
            qd: args.qd,
            clients: 1,
            duration_s,
            ops: timed.ops,
            iops: per_second(timed.ops as f64),
            bytes: timed.bytes,
            mib_per_s: per_second(timed.bytes as f64 / f64::from(1u32 << 20)),
            errors: timed.errors,
            errors_by_status: timed.by_status.clone(),
            verify_failures: timed.verify_failures + bench.readback_failures,
            unwritten_reads: 0,
            latency_us: load::latency_summary(&timed.latency),
            prefill_ops: bench.prefill.ops,
            prefill_errors: bench.prefill.errors,
            routed_connections: 0,
            generator_busy_s: 0.0,
            server: Some(server),
        },
        write_amplification: (client_bytes > 0).then(|| journal_bytes as f64 / client_bytes as f64),
        fill: Fill {
            start: fraction(&stats_before),
            end: fraction(&stats_after),
        },
        readback_blocks: bench.readback_done,
        reads_verified: bench.verify_timed_reads,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serialises")
        );
    } else {
        print_human(&report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: StoreBenchArgs,
    }

    fn parse(extra: &[&str]) -> StoreBenchArgs {
        let mut argv = vec!["store-bench", "--device", "/nonexistent/x.img"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("parses").args
    }

    #[test]
    fn hot_is_fraction_colon_share() {
        assert_eq!(parse(&["--hot", "0.1:0.9"]).hot, Some((0.1, 0.9)));
        assert_eq!(parse(&[]).hot, None);
        for bad in ["0.1", "1:0.5", "0.1:0", "a:b", "0.1:0.9:0.5"] {
            assert!(parse_hot(bad).is_err(), "{bad} is refused");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let args = parse(&[]);
        assert_eq!(args.bs, 4096);
        assert_eq!(args.qd, 32);
        assert_eq!(args.device_size, 2 << 30);
        assert_eq!(validate(&args), Ok(()));
    }

    #[test]
    fn bad_arguments_are_refused_with_a_reason() {
        let error = |extra: &[&str]| validate(&parse(extra)).unwrap_err();
        assert!(error(&["--fill", "0.99"]).contains("--fill must be in [0, 0.95]"));
        assert!(error(&["--fill=-0.1"]).contains("--fill must be in"));
        assert!(error(&["--fill", "0.5", "--objects", "3"]).contains("give one"));
        assert!(error(&["--bs", "16"]).contains("--bs must be"));
        assert!(error(&["--object-size", "6000"]).contains("multiple of --bs"));
        assert!(error(&["--qd", "0"]).contains("--qd must be"));
        assert!(error(&["--queue-depth", "0"]).contains("--queue-depth"));
        assert!(error(&["--duration", "0s"]).contains("--duration"));
        assert!(error(&["--completions-per-poll", "0"]).contains("must be 1..=256, got 0"));
        assert!(error(&["--completions-per-poll", "257"]).contains("got 257"));
        assert_eq!(validate(&parse(&["--fill", "0.95"])), Ok(()));
        assert_eq!(validate(&parse(&["--completions-per-poll", "256"])), Ok(()));
    }

    #[test]
    fn reads_refill_one_at_a_time_and_writes_a_whole_batch_unless_told() {
        assert_eq!(completions_per_poll(&parse(&["--op", "randread"])), 1);
        assert_eq!(
            completions_per_poll(&parse(&["--op", "randwrite"])),
            POLL_MAX
        );
        let told = ["--op", "randread", "--completions-per-poll", "32"];
        assert_eq!(completions_per_poll(&parse(&told)), 32);
    }

    #[test]
    fn failing_sub_op_decides_the_outcome() {
        let ok = SubOpResult::default();
        let range = SubOpResult {
            status: StoreError::Range.code(),
            out_offset: 0,
            out_len: 0,
        };
        assert_eq!(outcome(Ok(&[ok, range])), Ok(range));
        assert_eq!(failure_name(&Ok(range)).as_deref(), Some("range"));
        assert_eq!(failure_name(&Ok(ok)), None);
        assert_eq!(
            failure_name(&Err(StoreError::NoSpace)).as_deref(),
            Some("no_space")
        );
    }
}
