//! One seed's run: the simulated server, the scheduler, power cuts, remounts and checks.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use carmine_dataplane::buffers::{CorePools, PoolSizes};
use carmine_dataplane::reactor::{Core, LoopCounters, Waker};
use carmine_dataplane::ring;
use carmine_dataplane::wire::{self, Frame, Limits, Opcode, Status, SubOpCode, SubOpSpec};
use carmine_storage::segment::format::{Superblock, BLOCK_SIZE_BYTES};
use carmine_storage::segment::{fsck::fsck_reader, mkfs, CheckpointWrites, SegmentStore};
use carmine_storage::{
    MemFaults, MemQueuePair, ObjectStat, ObjectStore, OutputBuffer, StoreError, StoreStats, SubOp,
    SubOpResult, Submit, TearGranularity,
};

use super::device::{compose, partition, window_image, ShardWindow};
use super::model::{describe, Fate, Mutation, Object, ObjectModel, State, OBJECT_BYTES_MAX};
use super::model::{OMAP_KEYS, XATTR_NAMES};
use super::net::SimNet;
use crate::osd::core::{CoreSetup, Hooks, OsdCore, Shutdown};
use crate::osd::message::Message;
use crate::osd::network::Clock;
use crate::osd::placement::{Placement, PlacementMode};
use crate::status::StatusBoard;

const SEGMENT_BYTES: u64 = 1 << 20;
/// Spares the sim formats with, drawn per seed: none (the whole device is usable, the
/// cleaner runs at its tightest), and the kinds an operator picks (`mkfs --spare`, 40% by
/// default).
const SIM_SPARE_PERCENTS: [u32; 4] = [0, 0, 20, 40];
const QUEUE_DEPTH: u32 = 64;
/// Small on purpose: full rings, full op tables and empty pools are paths to exercise.
const RING_CAPACITY: usize = 8;
const OP_SLOTS: u32 = 12;
const PG_COUNT: u32 = 8;
const IN_FLIGHT_MAX: usize = 24;
const IN_FLIGHT_PER_OBJECT_MAX: usize = 3;
/// Steps of one power cycle before the cut: uniform in 1..=this.
const STEPS_PER_CYCLE_MAX: u64 = 3_000;
/// Rounds (every core polls once) a drain may take before it counts as a hang.
const DRAIN_ROUNDS_MAX: u32 = 20_000;

#[derive(Clone, Copy, Debug)]
pub struct SeedConfig {
    pub seed: u64,
    /// Power cuts (each followed by a remount and checks).
    pub cuts: u32,
    /// Broken device (flush persists nothing): for proving the checks can fail.
    pub lying_flush: bool,
    /// Pools small enough to hit the OSD's buffer deadlock (see `pool_sizes`).
    pub tight_pools: bool,
    /// Inject medium errors (reads of a block fail until it is rewritten) at random blocks:
    /// clients may then see Io errors, never wrong bytes, and a failed op changes nothing.
    pub read_errors: bool,
    /// `mkfs --spare` for this seed; None: drawn from the seed (`SIM_SPARE_PERCENTS`).
    pub spare_percent: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeedReport {
    pub cores: usize,
    /// The share of data capacity mkfs kept from clients (`mkfs --spare`): the sim formats
    /// with and without one, since admission by mapped blocks differs between the two.
    pub spare_percent: u32,
    pub cuts: u64,
    pub ops: u64,
    pub acked: u64,
    pub unknown_ops: u64,
    pub reads_checked: u64,
    pub objects_checked: u64,
    pub segments_cleaned: u64,
    /// Blocks the cleaner moved to its cold head (cold segments), summed at the last cut.
    pub blocks_moved_cold: u64,
    pub checkpoints: u64,
    /// Shards that had two journal records in flight at a cut (the overlap a torn earlier
    /// record and a surviving later one come from).
    pub cuts_with_two_records: u64,
    pub read_errors_injected: u64,
    /// Ops answered Io before a cut (only with read errors injected).
    pub io_errors_answered: u64,
    /// Digest of every event: the same seed must give the same digest.
    pub trace_digest: u64,
}

/// SplitMix64, the simulation's only source of randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// The store a core owns, shared with the simulation so it can cut the device's power.
struct SharedStore(Rc<RefCell<SegmentStore<ShardWindow>>>);

impl ObjectStore for SharedStore {
    fn submit(
        &mut self,
        tag: u64,
        oid: &[u8],
        ops: &[SubOp<'_>],
        out: &mut OutputBuffer<'_>,
        results: &mut [SubOpResult],
    ) -> Result<Submit, StoreError> {
        self.0.borrow_mut().submit(tag, oid, ops, out, results)
    }

    fn poll(
        &mut self,
        max: usize,
        complete: &mut dyn FnMut(u64, Result<&[SubOpResult], StoreError>),
    ) -> usize {
        self.0.borrow_mut().poll(max, complete)
    }

    fn busy(&self) -> bool {
        self.0.borrow().busy()
    }

    fn stats(&self) -> StoreStats {
        self.0.borrow().stats()
    }
}

/// The server between two power cuts.
struct Server {
    cores: Vec<OsdCore<SimNet>>,
    board: Arc<StatusBoard>,
    stores: Vec<Rc<RefCell<SegmentStore<ShardWindow>>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Mutation,
    Read,
}

struct Sent {
    object: usize,
    kind: Kind,
}

/// One seed's world.
struct Sim {
    rng: Rng,
    lying_flush: bool,
    read_errors: bool,
    cores: usize,
    sb: Superblock,
    hooks: Hooks,
    clock: Arc<AtomicU64>,
    objects: Vec<ObjectModel>,
    /// Each object's connection core (all its ops go through it, in order).
    home: Vec<usize>,
    in_flight: BTreeMap<u64, Sent>,
    next_request: u64,
    /// The power is off: answers still come (the drain), and count differently.
    powered_off: bool,
    stalled: Vec<u64>,
    /// CARMINE_SIM_VERBOSE: print every op, reply and cut (to debug a failing seed).
    verbose: bool,
    digest: u64,
    report: SeedReport,
}

fn no_allocation_counter() -> u64 {
    0
}

/// The default sizing gives every op a frame and an output (at most `IN_FLIGHT_MAX` ops
/// exist). `tight` (the first sizing, `carmine sim --tight-pools`) lets frames hold most
/// buffers, so ops wait for outputs: it hung once (seed 93, a core's ring blocked behind an
/// `Execute` while the `Release`s after it held the buffers; see `OsdCore::deferred_remote`),
/// and receive leaves `RX_LEAVES_FREE` of each class for outputs.
fn pool_sizes(tight: bool) -> PoolSizes {
    if tight {
        return PoolSizes {
            small_size_bytes: 64 << 10,
            small_count: 24,
            large_size_bytes: 512 << 10,
            large_count: 4,
        };
    }
    PoolSizes {
        small_size_bytes: 64 << 10,
        small_count: 2 * IN_FLIGHT_MAX as u32 + 8,
        large_size_bytes: 384 << 10,
        large_count: 2 * IN_FLIGHT_MAX as u32 + 4,
    }
}

/// Runs one seed; Err names the broken rule (the caller adds the seed).
pub fn run_seed(config: &SeedConfig) -> Result<SeedReport, String> {
    let mut rng = Rng(config.seed ^ 0x5eed_0f_ca_4d_1e);
    let cores = 2 + rng.below(2) as usize;
    let segments_per_shard = 5 + rng.below(4);
    let device_bytes = SEGMENT_BYTES + cores as u64 * segments_per_shard * SEGMENT_BYTES;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&rng.bytes(16));
    let mut formatter = MemQueuePair::new(device_bytes, QUEUE_DEPTH, MemFaults::default());
    // From its own stream, so the main stream (and every seed found before spares were
    // drawn) plays as it did.
    let spare_percent = config.spare_percent.unwrap_or_else(|| {
        SIM_SPARE_PERCENTS
            [Rng(config.seed ^ 0x5bea_e5ba_4e00).below(SIM_SPARE_PERCENTS.len() as u64) as usize]
    });
    let sb = mkfs(
        &mut formatter,
        SEGMENT_BYTES,
        cores as u32,
        spare_percent,
        uuid,
    )
    .map_err(|e| format!("mkfs: {e}"))?;
    let device = formatter.durable().to_vec();
    drop(formatter);
    let object_count = 4 + rng.below(13) as usize;
    let home = (0..object_count)
        .map(|_| rng.below(cores as u64) as usize)
        .collect();
    let hooks = Hooks {
        replicas: rng.below(2) as u32,
        replication_cost: Duration::from_micros(rng.below(300)),
        snapshot_cost: Duration::ZERO,
    };
    let mut sim = Sim {
        rng,
        lying_flush: config.lying_flush,
        read_errors: config.read_errors,
        cores,
        sb,
        hooks,
        clock: Arc::new(AtomicU64::new(0)),
        objects: vec![ObjectModel::default(); object_count],
        home,
        in_flight: BTreeMap::new(),
        next_request: 1,
        powered_off: false,
        stalled: vec![0; cores],
        verbose: std::env::var_os("CARMINE_SIM_VERBOSE").is_some(),
        digest: 0xcbf2_9ce4_8422_2325,
        report: SeedReport {
            cores,
            spare_percent,
            ..SeedReport::default()
        },
    };
    let mut pools = (0..cores)
        .map(|index| take_pools(index, config.tight_pools))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("buffer pools: {e}"))?;
    let mut windows: Vec<Vec<u8>> = (0..cores as u32)
        .map(|shard| window_image(&device, &sim.sb, shard))
        .collect();
    for _ in 0..config.cuts {
        let mut server = sim.boot(windows, pools)?;
        sim.verify_all(&mut server)?;
        sim.run_until_cut(&mut server)?;
        let (images, returned) = sim.cut_and_drain(server)?;
        pools = returned;
        sim.fsck(&images)?;
        windows = images;
        sim.report.cuts += 1;
    }
    // The last cut's survivors too.
    let mut server = sim.boot(windows, pools)?;
    sim.verify_all(&mut server)?;
    // Buffers sent to another core go home over the rings: a few rounds bring them back.
    for _ in 0..4 {
        for core in 0..sim.cores {
            sim.poll_core(&mut server, core)?;
        }
    }
    for pools in sim.give_back_pools(server)? {
        return_pools(pools, config.tight_pools);
    }
    sim.report.trace_digest = sim.digest;
    Ok(sim.report)
}

thread_local! {
    /// Pools of finished seeds, by core index and sizing: mapping and populating them again
    /// for every seed cost more system time than the rest of a seed.
    static SPARE_POOLS: RefCell<Vec<(usize, bool, CorePools)>> = const { RefCell::new(Vec::new()) };
}

fn take_pools(index: usize, tight: bool) -> std::io::Result<CorePools> {
    let spare = SPARE_POOLS.with(|spare| {
        let mut spare = spare.borrow_mut();
        let at = spare
            .iter()
            .position(|(i, t, _)| *i == index && *t == tight)?;
        Some(spare.swap_remove(at).2)
    });
    match spare {
        Some(pools) => Ok(pools),
        None => CorePools::new(index, pool_sizes(tight), false),
    }
}

fn return_pools(pools: CorePools, tight: bool) {
    assert_eq!(pools.in_use(), 0, "only empty pools are kept");
    SPARE_POOLS.with(|spare| spare.borrow_mut().push((pools.core, tight, pools)));
}

impl Sim {
    fn trace(&mut self, value: u64) {
        // FNV-1a over the value's bytes: cheap, and order-sensitive.
        for byte in value.to_le_bytes() {
            self.digest = (self.digest ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
    }

    /// Mounts every shard from its surviving image (the real mount code) and builds the cores.
    fn boot(&mut self, windows: Vec<Vec<u8>>, pools: Vec<CorePools>) -> Result<Server, String> {
        let wakers: Arc<[Waker]> = (0..self.cores)
            .map(|_| Waker::new())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("eventfd: {e}"))?
            .into();
        let board = Arc::new(StatusBoard::new(self.cores, serde_json::Value::Null));
        let shutdown = Arc::new(Shutdown::new(self.cores));
        let links = ring::mesh::<Message>(self.cores, RING_CAPACITY);
        let mut server = Server {
            cores: Vec::with_capacity(self.cores),
            board: Arc::clone(&board),
            stores: Vec::with_capacity(self.cores),
        };
        for ((index, links), (window, pools)) in links
            .into_iter()
            .enumerate()
            .zip(windows.into_iter().zip(pools))
        {
            let latency = [(0, 0), (0, 2), (0, 8), (1, 40)][self.rng.below(4) as usize];
            let faults = MemFaults {
                seed: self.rng.next(),
                latency_polls: latency,
                reorder: self.rng.chance(50),
                // 0 is "as large as the device": nothing destages before a flush. No smaller than the
                // largest write the store makes (a record head, 256 KiB of data).
                volatile_cache_bytes: [0, 512 << 10, 1 << 20][self.rng.below(3) as usize],
            };
            let mut qp = MemQueuePair::from_image(window, QUEUE_DEPTH, faults);
            qp.set_lying_flush(self.lying_flush);
            let store =
                SegmentStore::mount(ShardWindow::new(qp, &self.sb, index as u32), index as u32)
                    .map_err(|e| format!("remounting shard {index}: {e}"))?;
            // Victim walks split over many polls (as on a large device) or, mostly, in one.
            let mut store = store;
            store.set_walk_step_extents([16, 8192][self.rng.below(2) as usize]);
            // Checkpoints as the server writes them, or the tree's nodes whenever they fit
            // (the dump is the cheaper one on the sim's small shards, so crashes would
            // otherwise never meet a tree checkpoint).
            store.set_checkpoint_writes(
                [CheckpointWrites::Cheaper, CheckpointWrites::Tree][self.rng.below(2) as usize],
            );
            let store = Rc::new(RefCell::new(store));
            let setup = CoreSetup {
                index,
                cores: self.cores,
                placement: Placement::new(PlacementMode::Pg { pg_count: PG_COUNT }, self.cores),
                exec_slots: OP_SLOTS,
                client_slots: OP_SLOTS,
                hooks: self.hooks,
                alloc_counter: no_allocation_counter,
            };
            let core = OsdCore::new(
                setup,
                SimNet::new(Limits::DEFAULT),
                pools,
                Box::new(SharedStore(Rc::clone(&store))),
                links,
                Arc::clone(&wakers),
                Arc::clone(&board),
                Arc::clone(&shutdown),
            )
            .with_clock(Clock::Simulated(Arc::clone(&self.clock)));
            server.cores.push(core);
            server.stores.push(store);
        }
        Ok(server)
    }

    fn advance_clock(&mut self, ns: u64) {
        self.clock.fetch_add(ns, Ordering::Relaxed);
    }

    fn poll_core(&mut self, server: &mut Server, core: usize) -> Result<(), String> {
        let work = server.cores[core].poll_once();
        let elapsed = 1_000 + self.rng.below(20_000);
        self.advance_clock(elapsed);
        if work > 0 {
            self.trace((core as u64) << 32 | work as u64);
        }
        self.take_replies(server, core)
    }

    /// One power cycle's workload, until the cut.
    fn run_until_cut(&mut self, server: &mut Server) -> Result<(), String> {
        let steps = 1 + self.rng.below(STEPS_PER_CYCLE_MAX);
        for _ in 0..steps {
            for stall in &mut self.stalled {
                *stall = stall.saturating_sub(1);
            }
            match self.rng.below(100) {
                0..=29 => self.send_op(server),
                30..=94 => {
                    let core = self.rng.below(self.cores as u64) as usize;
                    if self.stalled[core] == 0 {
                        self.poll_core(server, core)?;
                    }
                }
                95..=98 => {
                    let ns = self.rng.below(400_000);
                    self.advance_clock(ns);
                }
                _ if self.read_errors && self.rng.chance(50) => self.inject_read_error(server),
                _ => {
                    // A latency spike: the core does not poll for a while (its device
                    // completions and incoming messages wait).
                    let core = self.rng.below(self.cores as u64) as usize;
                    self.stalled[core] = 10 + self.rng.below(400);
                }
            }
        }
        Ok(())
    }

    /// A medium error on a random shard: at one of its objects' live data blocks half the
    /// time (what reads and the cleaner then hit), else at any block (a record, a free one).
    fn inject_read_error(&mut self, server: &mut Server) {
        let shard = self.rng.below(self.cores as u64) as usize;
        let (start, end) = partition(&self.sb, shard as u32);
        let mut live: Vec<u64> = server.stores[shard]
            .borrow()
            .metadata()
            .objects()
            .flat_map(|(_, onode)| onode.blocks.iter().map(|(_, b)| b.physical))
            .collect();
        // Sorted: the metadata's map iterates in a per-process order, and a seed must replay.
        live.sort_unstable();
        let offset = if !live.is_empty() && self.rng.chance(50) {
            live[self.rng.below(live.len() as u64) as usize]
        } else {
            start + self.rng.below((end - start) / BLOCK_SIZE_BYTES) * BLOCK_SIZE_BYTES
        };
        self.trace(offset);
        if self.verbose {
            eprintln!("sim: read error injected at {offset} (shard {shard})");
        }
        self.report.read_errors_injected += 1;
        server.stores[shard]
            .borrow_mut()
            .queue_pair()
            .inject_read_error(offset);
    }

    fn send_op(&mut self, server: &mut Server) {
        if self.in_flight.len() >= IN_FLIGHT_MAX {
            return;
        }
        let object = self.rng.below(self.objects.len() as u64) as usize;
        if self.objects[object].in_flight() >= IN_FLIGHT_PER_OBJECT_MAX {
            return;
        }
        let request_id = self.next_request;
        self.next_request += 1;
        let mut frame = Vec::new();
        let oid = oid(object);
        let kind = if self.rng.chance(25) {
            Kind::Read
        } else {
            Kind::Mutation
        };
        match kind {
            Kind::Read => encode_read(&mut frame, request_id, &oid),
            Kind::Mutation => {
                let count = if self.rng.chance(10) {
                    4 + self.rng.below(4)
                } else {
                    1 + self.rng.below(3)
                };
                let ops: Vec<Mutation> = (0..count).map(|_| self.mutation()).collect();
                let specs: Vec<SubOpSpec<'_>> = ops.iter().map(Mutation::spec).collect();
                wire::encode_request(&mut frame, Opcode::OsdOp, request_id, &oid, &specs, &[]);
                self.objects[object].push(request_id, ops);
            }
        }
        self.trace(request_id ^ carmine_crc::crc32c(&frame) as u64);
        self.in_flight.insert(request_id, Sent { object, kind });
        self.report.ops += 1;
        let core = self.home[object];
        if self.verbose {
            eprintln!("sim: send {request_id} (object {object}, {kind:?}) on core {core}");
        }
        server.cores[core].network_mut().deliver(frame);
    }

    fn mutation(&mut self) -> Mutation {
        let max = OBJECT_BYTES_MAX;
        match self.rng.below(100) {
            0..=39 => {
                let len = if self.rng.chance(50) {
                    4096 * self.rng.below(4)
                } else {
                    self.rng.below(12_000)
                };
                let offset = if self.rng.chance(50) {
                    4096 * self.rng.below((max - len) / 4096 + 1)
                } else {
                    self.rng.below(max - len + 1)
                };
                Mutation::Write {
                    offset,
                    data: self.rng.bytes(len as usize),
                }
            }
            40..=47 => {
                let len = self.rng.below(20_000) as usize;
                Mutation::WriteFull {
                    data: self.rng.bytes(len),
                }
            }
            48..=55 => {
                let length = self.rng.below(16_000);
                Mutation::Zero {
                    offset: self.rng.below(max - length + 1),
                    length,
                }
            }
            56..=63 => Mutation::Truncate {
                size: self.rng.below(max + 1),
            },
            64..=71 => Mutation::Remove,
            72..=81 => {
                let len = self.rng.below(40) as usize;
                Mutation::SetXattr {
                    name: XATTR_NAMES[self.rng.below(2) as usize].to_vec(),
                    value: self.rng.bytes(len),
                }
            }
            82..=91 => {
                let len = self.rng.below(40) as usize;
                Mutation::OmapSet {
                    key: OMAP_KEYS[self.rng.below(2) as usize].to_vec(),
                    value: self.rng.bytes(len),
                }
            }
            _ => Mutation::OmapRemove {
                key: OMAP_KEYS[self.rng.below(2) as usize].to_vec(),
            },
        }
    }

    fn take_replies(&mut self, server: &mut Server, core: usize) -> Result<(), String> {
        while let Some(bytes) = server.cores[core].network_mut().take_reply() {
            self.trace(u64::from(carmine_crc::crc32c(&bytes)));
            self.on_reply(&bytes)?;
        }
        Ok(())
    }

    fn on_reply(&mut self, bytes: &[u8]) -> Result<(), String> {
        let header = match wire::parse_header(bytes, &Limits::CEILING) {
            Ok(Some(header)) if header.frame_len() == bytes.len() && header.is_reply() => header,
            other => return Err(format!("a malformed reply: {other:?}")),
        };
        let frame = Frame::view(header, bytes);
        if !frame.crc_ok(bytes) {
            return Err(format!("reply {} fails its crc", header.request_id));
        }
        let id = header.request_id;
        let sent = self
            .in_flight
            .remove(&id)
            .ok_or_else(|| format!("a reply to request {id}, which is not in flight"))?;
        let status = Status::from_u32(header.status)
            .ok_or_else(|| format!("reply {id}: unknown status {}", header.status))?;
        if self.verbose {
            eprintln!(
                "sim: reply {id} (object {}, {:?}): {status}{}",
                sent.object,
                sent.kind,
                if self.powered_off {
                    ", after the cut"
                } else {
                    ""
                }
            );
        }
        let results: Vec<(u32, &[u8])> = frame
            .reply_results()
            .map_err(|s| format!("reply {id}: result table {s:?}"))?
            .collect();
        match sent.kind {
            Kind::Mutation => {
                // After the cut the cores still answer (the drain), but a real power cut
                // leaves no one to answer: only what was decided before it may constrain the
                // state. An acknowledgement is such a decision (its record was durable, or the
                // store broke its promise); a refusal is not: it reflects memory without the
                // op whose record failed, while that record may have reached the device.
                let fate = match status {
                    Status::Ok => Fate::Acked,
                    Status::NotFound | Status::NoSpace if self.powered_off => Fate::NotApplied,
                    Status::NotFound | Status::NoSpace => Fate::Refused(status),
                    _ if self.powered_off => Fate::Unknown,
                    // A read the op needed hit an injected medium error: it must have failed
                    // as a whole.
                    Status::Io if self.read_errors => {
                        self.report.io_errors_answered += 1;
                        Fate::Refused(status)
                    }
                    other => {
                        return Err(format!(
                            "mutation {id} on object {} failed with {other} before any power cut",
                            sent.object
                        ))
                    }
                };
                match fate {
                    Fate::Acked => self.report.acked += 1,
                    Fate::Unknown => self.report.unknown_ops += 1,
                    _ => {}
                }
                let model = &mut self.objects[sent.object];
                model.resolve(id, fate);
                if !self.powered_off {
                    model.compact();
                }
            }
            Kind::Read if self.powered_off => {} // Answered from memory, see above.
            Kind::Read => {
                let Some(observed) = observe(status, &results, self.powered_off, self.read_errors)
                    .map_err(|e| format!("read {id} of object {}: {e}", sent.object))?
                else {
                    // Failed with an injected read error: nothing to check.
                    self.report.io_errors_answered += 1;
                    return Ok(());
                };
                let candidates = self.objects[sent.object]
                    .candidates(Some(id))
                    .map_err(|e| format!("object {}: {e}", sent.object))?;
                if !candidates.contains(&observed) {
                    return Err(mismatch(
                        sent.object,
                        "a read returned",
                        &observed,
                        &candidates,
                        &self.objects[sent.object],
                    ));
                }
                self.report.reads_checked += 1;
            }
        }
        Ok(())
    }

    /// The power cut: every device at the same instant, then the cores drain (every op gets
    /// an answer) and give back their pools, which must hold no buffer in use.
    fn cut_and_drain(
        &mut self,
        mut server: Server,
    ) -> Result<(Vec<Vec<u8>>, Vec<CorePools>), String> {
        let granularity = if self.rng.chance(50) {
            TearGranularity::Sector512
        } else {
            TearGranularity::Block4K
        };
        let mut images = Vec::with_capacity(self.cores);
        for store in &server.stores {
            let mut store = store.borrow_mut();
            self.report.cuts_with_two_records += u64::from(store.journal_records_in_flight() == 2);
            let qp = &mut store.queue_pair().inner;
            images.push(qp.power_cut(granularity));
            let tear = qp
                .last_tear()
                .map_or(0, |t| t.offset ^ t.units_persisted.len() as u64);
            self.trace(tear);
        }
        for store in &server.stores {
            let stats = store.borrow().segment_stats();
            self.report.segments_cleaned = self
                .report
                .segments_cleaned
                .max(stats.segments_cleaned + stats.segments_freed_empty);
            self.report.checkpoints = self.report.checkpoints.max(stats.checkpoints);
            self.report.blocks_moved_cold =
                self.report.blocks_moved_cold.max(stats.blocks_moved_cold);
        }
        self.powered_off = true;
        if self.verbose {
            eprintln!("sim: power cut {} ({granularity:?})", self.report.cuts + 1);
        }
        let mut quiet_rounds = 0;
        for round in 0.. {
            if round == DRAIN_ROUNDS_MAX {
                let debug: Vec<String> = server
                    .stores
                    .iter()
                    .map(|s| s.borrow().debug_state())
                    .collect();
                for core in &mut server.cores {
                    core.publish(&LoopCounters::default());
                }
                return Err(format!(
                    "after the power cut, {} ops never got an answer: {:?}; stores: {debug:?}; cores: {}",
                    self.in_flight.len(),
                    self.in_flight.keys().take(8).collect::<Vec<_>>(),
                    crate::status::render(&server.board)
                ));
            }
            for core in 0..self.cores {
                self.poll_core(&mut server, core)?;
            }
            self.advance_clock(1_000_000);
            let idle = server.cores.iter_mut().all(|c| c.network_mut().is_idle());
            if self.in_flight.is_empty() && idle {
                // A few more rounds bring buffers home over the rings.
                quiet_rounds += 1;
                if quiet_rounds == 4 {
                    break;
                }
            }
        }
        for model in &mut self.objects {
            model.power_cut();
        }
        self.powered_off = false;
        let pools = self.give_back_pools(server)?;
        Ok((images, pools))
    }

    /// Stops the cores and takes their pools back: no buffer may still be in use.
    fn give_back_pools(&mut self, server: Server) -> Result<Vec<CorePools>, String> {
        let mut pools = Vec::with_capacity(self.cores);
        for (index, core) in server.cores.into_iter().enumerate() {
            let returned = core.into_pools();
            if returned.in_use() != 0 {
                return Err(format!(
                    "core {index} holds {} buffers after every op was answered (a leak)",
                    returned.in_use()
                ));
            }
            pools.push(returned);
        }
        drop(server.stores);
        Ok(pools)
    }

    /// The composed device must pass the real fsck.
    fn fsck(&mut self, windows: &[Vec<u8>]) -> Result<(), String> {
        let mut device = vec![0u8; self.sb.device_size as usize];
        for (shard, window) in windows.iter().enumerate() {
            compose(&mut device, window, &self.sb, shard as u32);
        }
        let report = fsck_reader(
            &mut device.as_slice(),
            self.sb.device_size,
            Path::new("sim"),
        )
        .map_err(|e| format!("fsck after cut {}: {e}", self.report.cuts + 1))?;
        if !report.is_clean() {
            return Err(format!(
                "fsck after cut {} found problems: {:?} {:?}",
                self.report.cuts + 1,
                report.problems,
                report
                    .shards
                    .iter()
                    .map(|s| &s.problems)
                    .collect::<Vec<_>>()
            ));
        }
        for shard in &report.shards {
            self.trace(shard.objects << 32 ^ shard.live_blocks ^ shard.records << 48);
        }
        Ok(())
    }

    /// Reads every object through the (re)mounted server: each must be in a state its
    /// history allows; that state becomes its only one.
    fn verify_all(&mut self, server: &mut Server) -> Result<(), String> {
        assert!(
            self.in_flight.is_empty(),
            "verification starts with nothing in flight"
        );
        let mut reads = BTreeMap::new();
        for object in 0..self.objects.len() {
            let request_id = self.next_request;
            self.next_request += 1;
            let mut frame = Vec::new();
            encode_read(&mut frame, request_id, &oid(object));
            server.cores[self.home[object]].network_mut().deliver(frame);
            reads.insert(request_id, object);
        }
        let mut observed: BTreeMap<usize, State> = BTreeMap::new();
        for _ in 0..DRAIN_ROUNDS_MAX {
            for core in 0..self.cores {
                server.cores[core].poll_once();
                self.advance_clock(10_000);
                while let Some(bytes) = server.cores[core].network_mut().take_reply() {
                    self.trace(u64::from(carmine_crc::crc32c(&bytes)));
                    let (id, status, results) = parse_reply(&bytes)?;
                    let object = reads
                        .remove(&id)
                        .ok_or_else(|| format!("a reply to request {id}, which was not sent"))?;
                    let results: Vec<(u32, &[u8])> =
                        results.iter().map(|(s, o)| (*s, &o[..])).collect();
                    let state = observe(status, &results, false, false)
                        .map_err(|e| format!("reading object {object} after remount: {e}"))?
                        .expect("not powered off");
                    observed.insert(object, state);
                }
            }
            if reads.is_empty() {
                break;
            }
        }
        if !reads.is_empty() {
            return Err(format!(
                "{} reads after remount never got an answer",
                reads.len()
            ));
        }
        for (object, state) in observed {
            let candidates = self.objects[object]
                .candidates(None)
                .map_err(|e| format!("object {object}: {e}"))?;
            if !candidates.contains(&state) {
                let what = if self.report.cuts == 0 {
                    "at start".to_string()
                } else {
                    format!("after power cut {}", self.report.cuts)
                };
                return Err(mismatch(
                    object,
                    &format!("remounted {what}, the server has"),
                    &state,
                    &candidates,
                    &self.objects[object],
                ));
            }
            self.objects[object].settle(state);
            self.report.objects_checked += 1;
        }
        Ok(())
    }
}

fn oid(object: usize) -> Vec<u8> {
    format!("sim.{object}").into_bytes()
}

/// Everything a client can see of an object, in one op.
fn encode_read(frame: &mut Vec<u8>, request_id: u64, oid: &[u8]) {
    let mut specs = vec![
        SubOpSpec::simple(SubOpCode::Stat),
        SubOpSpec::read(0, OBJECT_BYTES_MAX),
    ];
    for name in XATTR_NAMES {
        let mut spec = SubOpSpec::simple(SubOpCode::GetXattr);
        spec.name = name;
        specs.push(spec);
    }
    for key in OMAP_KEYS {
        let mut spec = SubOpSpec::simple(SubOpCode::OmapGet);
        spec.name = key;
        specs.push(spec);
    }
    wire::encode_request(frame, Opcode::OsdOp, request_id, oid, &specs, &[]);
}

type ParsedReply = (u64, Status, Vec<(u32, Vec<u8>)>);

fn parse_reply(bytes: &[u8]) -> Result<ParsedReply, String> {
    let header = match wire::parse_header(bytes, &Limits::CEILING) {
        Ok(Some(header)) if header.frame_len() == bytes.len() && header.is_reply() => header,
        other => return Err(format!("a malformed reply: {other:?}")),
    };
    let frame = Frame::view(header, bytes);
    if !frame.crc_ok(bytes) {
        return Err(format!("reply {} fails its crc", header.request_id));
    }
    let status = Status::from_u32(header.status)
        .ok_or_else(|| format!("unknown status {}", header.status))?;
    let results = frame
        .reply_results()
        .map_err(|s| format!("result table {s:?}"))?
        .map(|(s, o)| (s, o.to_vec()))
        .collect();
    Ok((header.request_id, status, results))
}

/// The state a read op's answer shows. Ok(None): it failed after a power cut (unchecked).
fn observe(
    status: Status,
    results: &[(u32, &[u8])],
    powered_off: bool,
    read_errors: bool,
) -> Result<Option<State>, String> {
    let code = |s: Status| s as u32;
    let failed = results.is_empty()
        || results
            .iter()
            .any(|(s, _)| ![0, code(Status::NotFound), code(Status::NoData)].contains(s));
    if failed {
        if powered_off {
            return Ok(None);
        }
        // An injected medium error fails the read (Io), never returns other bytes.
        let io = |s: u32| s == code(Status::Io);
        if read_errors && (status == Status::Io || results.iter().any(|&(s, _)| io(s))) {
            return Ok(None);
        }
        return Err(format!(
            "status {status}, results {:?}",
            results.iter().map(|r| r.0).collect::<Vec<_>>()
        ));
    }
    if results.len() != 2 + XATTR_NAMES.len() + OMAP_KEYS.len() {
        return Err(format!("{} results for 6 sub-ops", results.len()));
    }
    if results[0].0 == code(Status::NotFound) {
        if results.iter().any(|(s, _)| *s != code(Status::NotFound)) {
            return Err("a missing object, but not every sub-op says NotFound".into());
        }
        return Ok(Some(None));
    }
    let stat = ObjectStat::from_bytes(results[0].1).ok_or("a stat output that does not decode")?;
    let data = results[1].1.to_vec();
    if results[1].0 != 0 || stat.size != data.len() as u64 {
        return Err(format!(
            "stat says size {}, the read returned {} bytes (status {})",
            stat.size,
            data.len(),
            results[1].0
        ));
    }
    let mut object = Object {
        data,
        ..Object::default()
    };
    let pairs = XATTR_NAMES
        .iter()
        .map(|n| (true, *n))
        .chain(OMAP_KEYS.iter().map(|k| (false, *k)));
    for ((is_xattr, name), (status, value)) in pairs.zip(&results[2..]) {
        if *status == 0 {
            let map = if is_xattr {
                &mut object.xattrs
            } else {
                &mut object.omap
            };
            map.insert(name.to_vec(), value.to_vec());
        } else if *status != code(Status::NoData) {
            return Err(format!(
                "{} gets status {status}",
                String::from_utf8_lossy(name)
            ));
        }
    }
    Ok(Some(Some(object)))
}

fn mismatch(
    object: usize,
    what: &str,
    observed: &State,
    candidates: &[State],
    model: &ObjectModel,
) -> String {
    format!(
        "object {object}: {what} {}, but its acknowledged history allows only {}\nits history since it was last observed:\n{}",
        describe(observed),
        candidates.iter().map(describe).collect::<Vec<_>>().join(" or "),
        model.describe_history()
    )
}
