//! `SegmentStore`: one shard of the segment store, an `ObjectStore` on a block `QueuePair`.
//!
//! An op's life:
//! 1. `submit` checks its shape. If another op on the same object is still in progress (its
//!    blocks being read, or its record not yet durable), it waits in that object's lane: a
//!    mutation runs alone, in order, so each op sees the durable result of the one before (and
//!    a read never sees data that a crash could still take back); reads in a row run together.
//!    The exception: a whole-block write starts at once behind journaled whole-block writes
//!    (`exec::pipelines`, `Lane::after`), since it reads nothing of the object and its record
//!    goes after theirs.
//! 2. The blocks it needs from the device (reads, and the edges of partial-block writes) are
//!    read, each checked against the crc32c in the metadata.
//! 3. `exec::execute` runs its sub-ops on a private working set: read outputs are produced,
//!    mutations become a `Plan`, and a failing mutation drops it all (nothing applied).
//! 4. The plan's deltas and data blocks join the journal's open batch (group commit). When the
//!    record is durable, its deltas are applied to the in-memory metadata, exactly as replay
//!    would apply them, and the op completes.
//!
//! An op that needs neither the device nor a record (a Stat, an xattr read, a read of a hole)
//! completes inside `submit`.

use std::collections::{HashMap, VecDeque};

use hashbrown::HashTable;

mod checkpoint;
mod maintenance;
use maintenance::WALK_EXTENTS_PER_STEP;

use crate::object_store::{
    check_operation, ObjectStore, OutputBuffer, StoreStats, SubOp, SubOpResult, Submit, SUB_OPS_MAX,
};
use crate::queue_pair::{AlignedBuf, IoError, QueuePair, SubmitError};
use crate::segment::btree::WriteOut;
use crate::segment::cleaner::{self, Cleaner, MoveStage, CLEANER_TAG_BIT};
use crate::segment::exec::{self, After, BlockPool, Dirty, OldBlocks, Plan};
use crate::segment::format::{Delta, DeltaReader, Superblock, BLOCK_SIZE_BYTES};
use crate::segment::journal::{
    Journal, JournalError, SegmentRole, CHECKPOINT_CHUNK_MAX_BYTES, JOURNAL_TAG_BIT,
};
use crate::segment::metadata::{BlockRef, Metadata, ObjectRef};
use crate::segment::mount::{self, MountError};
use crate::StoreError;

/// Completions with this bit (and not the journal's) are block reads of an op.
const READ_TAG_BIT: u64 = 1 << 62;
/// Ops in progress at once: a fixed slot table, sized at mount.
pub const OPS_IN_FLIGHT_MAX: usize = 4096;
/// Free 4 KiB block buffers kept for reuse.
const BLOCK_BUFFERS_RETAINED: usize = 4096;
/// Block reads merged into one request, at most (a run's validity is a 64-bit mask).
const READ_RUN_BLOCKS_MAX: u64 = 64;
/// Queue pair completions taken per poll, at most (and at most the caller's `max`).
const QP_COMPLETIONS_PER_POLL: usize = 256;
/// What a checkpoint writes (`SegmentStore::set_checkpoint_writes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointWrites {
    /// Always a dump of every extent (format 5's checkpoints; a tree on the device is
    /// released once a dump is named).
    Dump,
    /// The extent tree's changed nodes when that is predicted to write less than the dump
    /// (`store/checkpoint.rs`); the default.
    Cheaper,
    /// The tree's changed nodes whenever they fit the checkpoint's room: tests and the
    /// simulation, so that crash runs on small devices (where the dump is cheaper) cut
    /// through tree checkpoints too.
    Tree,
}

/// Counters beyond `StoreStats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentStats {
    pub records_written: u64,
    /// Client records sealed while the record before them was in flight (the two went to the
    /// device side by side: `journal::RECORDS_IN_FLIGHT_MAX`).
    pub records_overlapped: u64,
    pub journal_bytes: u64,
    pub client_bytes_written: u64,
    pub block_reads: u64,
    pub checksum_errors: u64,
    pub read_errors: u64,
    pub lane_waits: u64,
    /// Whole-block writes that started behind journaled, not yet durable writes to the same
    /// object instead of waiting in its lane (`exec::pipelines`).
    pub lane_pipelined: u64,
    pub batch_full_waits: u64,
    pub buffer_allocations: u64,
    pub free_segments: u64,
    /// Segments the journal may not hand to clients (the cleaner's and checkpoint's room).
    pub reserve_segments: u64,
    /// Data segments (before the replay start; what the cleaner empties).
    pub data_segments: u64,
    /// Journal segments (replay reads them).
    pub journal_segments: u64,
    pub checkpoints: u64,
    pub checkpoint_bytes: u64,
    /// What the same checkpoints would have written had each written only the extent-tree
    /// nodes changed since the one before (4 KiB each, `Metadata::take_changed_tree_nodes`)
    /// plus the onode table: the incremental checkpoint's cost in steady state, measured
    /// before it is built (ARCHITECTURE.md, "the plan", step 3).
    pub checkpoint_incremental_estimate_bytes: u64,
    /// Checkpoints that wrote the extent tree's changed nodes rather than dumping the
    /// extents (`set_incremental_checkpoints`), and the node blocks they wrote (in
    /// `checkpoint_bytes` too).
    pub checkpoints_incremental: u64,
    pub checkpoint_node_blocks: u64,
    pub segments_cleaned: u64,
    pub segments_freed_empty: u64,
    pub blocks_moved: u64,
    /// Read requests the cleaner made, and the blocks they read (live or not: a read may span
    /// dead blocks between live ones, `cleaner::MOVE_GAP_BLOCKS_MAX`).
    pub cleaner_reads: u64,
    pub cleaner_blocks_read: u64,
    /// Steps of the cleaner's walks for victims' live blocks (one per victim when no I/O was
    /// in flight, else one per `WALK_EXTENTS_PER_STEP` extents).
    pub cleaner_walk_steps: u64,
    pub victims_abandoned: u64,
    /// Cold segments opened (the cleaner's own log head), and times the head left its
    /// segment early because space was short (`Journal::leave_cold`).
    pub cold_segments_opened: u64,
    pub cold_heads_left: u64,
    /// Of `blocks_moved`, those the cleaner wrote to its cold head.
    pub blocks_moved_cold: u64,
    /// Writes that waited for the cleaner to free space.
    pub space_waits: u64,
    /// Logical blocks mapped (client data stored), and how many the spare leaves clients
    /// (`Superblock::usable_blocks`): a write that would map more gets NoSpace.
    pub mapped_blocks: u64,
    pub usable_blocks: u64,
    /// Writes refused because the usable capacity was full.
    pub usable_full_refusals: u64,
}

impl SegmentStats {
    /// Bytes written to the device per byte of client data: records (headers, deltas, data),
    /// segment headers, checkpoints and the cleaner's copies over client write payload.
    pub fn write_amplification(&self) -> f64 {
        if self.client_bytes_written == 0 {
            return 0.0;
        }
        self.journal_bytes as f64 / self.client_bytes_written as f64
    }

    /// Counters accumulated since `earlier` (gauges such as free segments keep their value).
    pub fn since(&self, earlier: &SegmentStats) -> SegmentStats {
        SegmentStats {
            records_written: self.records_written - earlier.records_written,
            records_overlapped: self.records_overlapped - earlier.records_overlapped,
            journal_bytes: self.journal_bytes - earlier.journal_bytes,
            client_bytes_written: self.client_bytes_written - earlier.client_bytes_written,
            block_reads: self.block_reads - earlier.block_reads,
            checksum_errors: self.checksum_errors - earlier.checksum_errors,
            read_errors: self.read_errors - earlier.read_errors,
            lane_waits: self.lane_waits - earlier.lane_waits,
            lane_pipelined: self.lane_pipelined - earlier.lane_pipelined,
            batch_full_waits: self.batch_full_waits - earlier.batch_full_waits,
            buffer_allocations: self.buffer_allocations - earlier.buffer_allocations,
            checkpoints: self.checkpoints - earlier.checkpoints,
            checkpoint_bytes: self.checkpoint_bytes - earlier.checkpoint_bytes,
            checkpoint_incremental_estimate_bytes: self.checkpoint_incremental_estimate_bytes
                - earlier.checkpoint_incremental_estimate_bytes,
            checkpoints_incremental: self.checkpoints_incremental - earlier.checkpoints_incremental,
            checkpoint_node_blocks: self.checkpoint_node_blocks - earlier.checkpoint_node_blocks,
            segments_cleaned: self.segments_cleaned - earlier.segments_cleaned,
            segments_freed_empty: self.segments_freed_empty - earlier.segments_freed_empty,
            blocks_moved: self.blocks_moved - earlier.blocks_moved,
            cleaner_reads: self.cleaner_reads - earlier.cleaner_reads,
            cleaner_blocks_read: self.cleaner_blocks_read - earlier.cleaner_blocks_read,
            cleaner_walk_steps: self.cleaner_walk_steps - earlier.cleaner_walk_steps,
            victims_abandoned: self.victims_abandoned - earlier.victims_abandoned,
            cold_segments_opened: self.cold_segments_opened - earlier.cold_segments_opened,
            cold_heads_left: self.cold_heads_left - earlier.cold_heads_left,
            blocks_moved_cold: self.blocks_moved_cold - earlier.blocks_moved_cold,
            space_waits: self.space_waits - earlier.space_waits,
            usable_full_refusals: self.usable_full_refusals - earlier.usable_full_refusals,
            ..*self
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubOpKind {
    Write,
    WriteFull,
    Read,
    Zero,
    Truncate,
    Remove,
    Stat,
    SetXattr,
    GetXattr,
    OmapSet,
    OmapGet,
    OmapRemove,
}

/// A sub-op copied into its slot: numbers inline, byte strings as ranges of the slot's `args`.
#[derive(Clone, Copy, Debug)]
struct StoredSubOp {
    kind: SubOpKind,
    a: u64,
    b: u64,
    first: (u32, u32),
    second: (u32, u32),
}

/// Reads of one op: runs of logically and physically consecutive blocks.
struct ReadRun {
    first_index: u64,
    blocks: u32,
    /// Index of this run's first block crc in the slot's `run_crcs`.
    crc_first: u32,
    physical: u64,
    buf: AlignedBuf,
    /// Bit per block, set when the block's crc matched.
    valid: u64,
    done: bool,
    submitted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Free,
    /// Waiting in its object's lane.
    Queued,
    /// Block reads in flight.
    Reading,
    /// Planned; waiting for room in the journal's batch.
    Blocked,
    /// In the journal; completes when its record is durable.
    Journaled,
    /// Finished; waiting to be reported by `poll`.
    Done,
}

struct Slot {
    stage: Stage,
    tag: u64,
    oid: Vec<u8>,
    /// `oid`'s hash (`Metadata::hash_oid`), computed once per op: its lane's key and its
    /// object's.
    oid_hash: u64,
    args: Vec<u8>,
    ops: Vec<StoredSubOp>,
    out_ptr: *mut u8,
    out_capacity: usize,
    results: [SubOpResult; SUB_OPS_MAX],
    /// How many of `results` the op has (its sub-op count).
    result_count: usize,
    result: Result<(), StoreError>,
    runs: Vec<ReadRun>,
    /// The metadata's crc of each block the runs read, in run order (`ReadRun::crc_first`).
    /// Taken when the runs are built: the object's lane keeps client mutations out until the
    /// reads are done, and a cleaner move keeps a block's bytes and so its crc.
    run_crcs: Vec<u32>,
    reads_outstanding: u32,
    plan: Option<Plan>,
    /// Client payload bytes the op writes (write amplification's denominator).
    write_bytes: u64,
    /// The op has a mutating sub-op (it runs alone in its object's lane, or behind a chain
    /// of journaled writes when it `pipelines`).
    mutates: bool,
    /// Whole-block writes only (`exec::pipelines`).
    pipelines: bool,
    /// Blocks its plan maps that were not mapped before, counted in `pending_new_blocks`
    /// from admission until its record is durable (or failed).
    new_blocks: u64,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            stage: Stage::Free,
            tag: 0,
            oid: Vec::new(),
            oid_hash: 0,
            args: Vec::new(),
            ops: Vec::with_capacity(SUB_OPS_MAX),
            out_ptr: std::ptr::null_mut(),
            out_capacity: 0,
            results: [SubOpResult::default(); SUB_OPS_MAX],
            result_count: 0,
            result: Ok(()),
            runs: Vec::new(),
            run_crcs: Vec::new(),
            reads_outstanding: 0,
            plan: None,
            write_bytes: 0,
            mutates: false,
            pipelines: false,
            new_blocks: 0,
        }
    }

    fn store_ops(&mut self, ops: &[SubOp<'_>]) {
        self.args.clear();
        self.ops.clear();
        let args = &mut self.args;
        let mut put = |bytes: &[u8]| {
            let start = args.len() as u32;
            args.extend_from_slice(bytes);
            (start, args.len() as u32)
        };
        for op in ops {
            let mut stored = StoredSubOp {
                kind: SubOpKind::Stat,
                a: 0,
                b: 0,
                first: (0, 0),
                second: (0, 0),
            };
            stored.kind = match *op {
                SubOp::Write { offset, data } => {
                    stored.a = offset;
                    stored.first = put(data);
                    SubOpKind::Write
                }
                SubOp::WriteFull { data } => {
                    stored.first = put(data);
                    SubOpKind::WriteFull
                }
                SubOp::Read { offset, length } => {
                    (stored.a, stored.b) = (offset, length);
                    SubOpKind::Read
                }
                SubOp::Zero { offset, length } => {
                    (stored.a, stored.b) = (offset, length);
                    SubOpKind::Zero
                }
                SubOp::Truncate { size } => {
                    stored.a = size;
                    SubOpKind::Truncate
                }
                SubOp::Remove => SubOpKind::Remove,
                SubOp::Stat => SubOpKind::Stat,
                SubOp::SetXattr { name, value } => {
                    stored.first = put(name);
                    stored.second = put(value);
                    SubOpKind::SetXattr
                }
                SubOp::GetXattr { name } => {
                    stored.first = put(name);
                    SubOpKind::GetXattr
                }
                SubOp::OmapSet { key, value } => {
                    stored.first = put(key);
                    stored.second = put(value);
                    SubOpKind::OmapSet
                }
                SubOp::OmapGet { key } => {
                    stored.first = put(key);
                    SubOpKind::OmapGet
                }
                SubOp::OmapRemove { key } => {
                    stored.first = put(key);
                    SubOpKind::OmapRemove
                }
            };
            self.ops.push(stored);
        }
    }

    /// The stored sub-ops, borrowing `args`.
    /// The op's sub-ops, borrowing its stored arguments, in `into`'s first `ops.len()` places
    /// (an array on the caller's stack: no allocation per op).
    fn sub_ops<'a>(ops: &[StoredSubOp], args: &'a [u8], into: &mut [SubOp<'a>; SUB_OPS_MAX]) {
        let bytes = |(start, end): (u32, u32)| &args[start as usize..end as usize];
        for (op, place) in ops.iter().zip(into.iter_mut()) {
            *place = match op.kind {
                SubOpKind::Write => SubOp::Write {
                    offset: op.a,
                    data: bytes(op.first),
                },
                SubOpKind::WriteFull => SubOp::WriteFull {
                    data: bytes(op.first),
                },
                SubOpKind::Read => SubOp::Read {
                    offset: op.a,
                    length: op.b,
                },
                SubOpKind::Zero => SubOp::Zero {
                    offset: op.a,
                    length: op.b,
                },
                SubOpKind::Truncate => SubOp::Truncate { size: op.a },
                SubOpKind::Remove => SubOp::Remove,
                SubOpKind::Stat => SubOp::Stat,
                SubOpKind::SetXattr => SubOp::SetXattr {
                    name: bytes(op.first),
                    value: bytes(op.second),
                },
                SubOpKind::GetXattr => SubOp::GetXattr {
                    name: bytes(op.first),
                },
                SubOpKind::OmapSet => SubOp::OmapSet {
                    key: bytes(op.first),
                    value: bytes(op.second),
                },
                SubOpKind::OmapGet => SubOp::OmapGet {
                    key: bytes(op.first),
                },
                SubOpKind::OmapRemove => SubOp::OmapRemove {
                    key: bytes(op.first),
                },
            };
        }
    }
}

/// The blocks an op read, as `exec` asks for them.
struct ReadBlocks<'a> {
    runs: &'a [ReadRun],
}

impl OldBlocks for ReadBlocks<'_> {
    fn block(&self, index: u64) -> Result<Option<&[u8]>, StoreError> {
        // Runs are few (one per physically contiguous stretch): a scan is the cheap lookup.
        let Some(run) = self
            .runs
            .iter()
            .find(|r| (r.first_index..r.first_index + u64::from(r.blocks)).contains(&index))
        else {
            return Ok(None); // Not listed by `blocks_to_read`: unmapped.
        };
        let at = (index - run.first_index) as usize;
        if run.valid & (1 << at) == 0 {
            return Err(StoreError::Io);
        }
        Ok(Some(
            &run.buf[at * BLOCK_SIZE_BYTES as usize..][..BLOCK_SIZE_BYTES as usize],
        ))
    }
}

/// No blocks: for ops whose `blocks_to_read` listed none (every block they touch is unmapped).
struct NoBlocks;

impl OldBlocks for NoBlocks {
    fn block(&self, _index: u64) -> Result<Option<&[u8]>, StoreError> {
        Ok(None)
    }
}

/// Ops on one object: those in progress (one mutation, or any number of read-only ops), then
/// the ones waiting, in order.
struct Lane {
    oid: Vec<u8>,
    /// `oid`'s hash (`Metadata::hash_oid`): the lane table's key, so an op hashes its
    /// object id once however often it looks its lane up.
    hash: u64,
    active: u32,
    /// Of the `active` ops, those whose records are in the journal (not yet durable). The
    /// others are at most one: an op started behind them that is not journaled yet.
    journaled: u32,
    /// While the journaled ops are a chain of whole-block writes: what the newest leaves
    /// the object as. A whole-block write may then start at once behind them
    /// (`exec::pipelines`); its record goes after theirs, so replay and acknowledgements
    /// keep the order.
    after: Option<After>,
    /// Blocks (sorted indexes) the journaled chain maps that the metadata did not have
    /// mapped, until their op is durable: a write behind the chain to one of them maps
    /// nothing new (the space admission counts each block once, as when the second write
    /// waited for the first to be applied).
    chain_new: Vec<u64>,
    /// The ops in progress are read-only: another read-only op may join them, unless an op
    /// waits (a read submitted after a write must see it).
    reading: bool,
    waiting: VecDeque<u32>,
}

pub struct SegmentStore<Q: QueuePair> {
    sb: Superblock,
    shard: u32,
    qp: Q,
    journal: Journal,
    metadata: Metadata,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// Objects with an op in progress. A table keyed by a hash the op computes once (in
    /// `submit`), where a map would hash the id again at each of the op's four lookups.
    lanes: HashTable<Lane>,
    /// Keys and queues of closed lanes, reused: opening a lane allocates nothing once as
    /// many lanes as ever were open at once have been.
    spare_lanes: Vec<(Vec<u8>, VecDeque<u32>, Vec<u64>)>,
    /// The blocks an op being journaled maps anew (`journal_plan`).
    new_scratch: Vec<u64>,
    /// Slots whose reads all completed, to execute.
    ready: VecDeque<u32>,
    /// Slots with a plan that did not fit the open batch.
    blocked: VecDeque<u32>,
    /// Slots just journaled whose lanes have ops waiting: a waiting whole-block write may
    /// start behind them (`start_pipelined`).
    pipeline_checks: Vec<u32>,
    /// Slots with reads the queue pair did not accept yet.
    unsubmitted: VecDeque<u32>,
    /// Finished slots, to report.
    finished: VecDeque<u32>,
    pool: BlockPool,
    needed: Vec<(u64, BlockRef)>,
    /// The queue pair's completions of one poll (`QP_COMPLETIONS_PER_POLL` at most).
    qp_events: Vec<(u64, Result<(), IoError>)>,
    crcs: Vec<u32>,
    durable_scratch: Vec<u8>,
    done_scratch: Vec<(u64, Result<(), JournalError>)>,
    /// Plans of finished ops, kept with their vectors' capacity for the next ops.
    spare_plans: Vec<Plan>,
    stats: StoreStats,
    extra: SegmentStats,
    cleaner: Cleaner,
    /// Reads planned or in flight per segment: a segment is not freed under a reader.
    readers: Vec<u32>,
    /// Metadata changed since data segments were last checked for being empty.
    sweep_needed: bool,
    /// The journal length at which the reserve and checkpoint interval were last computed.
    sized_at_chain_len: usize,
    checkpoint_interval: usize,
    /// Extents a step of the victim walk visits while I/O is in flight.
    walk_step_extents: usize,
    /// Whether the cleaner may write its copies to its own head (`Cleaner::to_cold`); off,
    /// they go beside client writes as before format 7 (tests compare the two).
    cold_head: bool,
    /// Whether checkpoints may write the extent tree's changed nodes instead of dumping the
    /// extents (`take_snapshot`).
    checkpoint_writes: CheckpointWrites,
    /// The nodes of the checkpoint being written, while it writes the tree.
    write_out: Option<WriteOut>,
    /// The generation (first record number) of the checkpoint being written.
    checkpoint_generation: u64,
    /// Segments a checkpoint takes, estimated at `sized_at_chain_len`.
    checkpoint_segments: usize,
    /// ... and its size in bytes, from the same estimate.
    checkpoint_bytes: u64,
    /// Blocks clients may have mapped (`Superblock::usable_blocks`).
    usable_blocks: u64,
    /// New blocks of the ops admitted whose records are not durable yet: with the mapped
    /// blocks, never more than `usable_blocks` (checked at admission, `journal_plan`).
    pending_new_blocks: u64,
}

impl<Q: QueuePair> SegmentStore<Q> {
    /// Mounts shard `shard` of the filesystem on `qp`: reads the superblock, replays the
    /// shard's log into memory, and continues the log in a fresh segment.
    pub fn mount(mut qp: Q, shard: u32) -> Result<SegmentStore<Q>, MountError> {
        let mounted = mount::replay(&mut qp, shard)?;
        // Replay may have read records the last process wrote but never flushed (so never
        // acknowledged): they are about to be served and built on, so they become durable
        // first, or a power cut now could take back what a client has since read.
        mount::SyncIo::new(&mut qp)
            .flush()
            .map_err(MountError::Io)?;
        let journal = Journal::new(
            mounted.sb,
            shard,
            &mounted.log,
            mounted.metadata.live_block_counts(),
        );
        let mut metadata = mounted.metadata;
        // A tree loaded from disk would have no changed node: the first checkpoint's
        // incremental estimate counts what changed since mount, not the replay's inserts.
        metadata.take_changed_tree_nodes();
        let mut store = SegmentStore {
            sb: mounted.sb,
            shard,
            qp,
            journal,
            metadata,
            slots: (0..OPS_IN_FLIGHT_MAX).map(|_| Slot::new()).collect(),
            free_slots: (0..OPS_IN_FLIGHT_MAX as u32).rev().collect(),
            lanes: HashTable::with_capacity(OPS_IN_FLIGHT_MAX),
            spare_lanes: Vec::new(),
            new_scratch: Vec::new(),
            ready: VecDeque::with_capacity(OPS_IN_FLIGHT_MAX),
            blocked: VecDeque::with_capacity(OPS_IN_FLIGHT_MAX),
            pipeline_checks: Vec::with_capacity(OPS_IN_FLIGHT_MAX),
            unsubmitted: VecDeque::with_capacity(OPS_IN_FLIGHT_MAX),
            finished: VecDeque::with_capacity(OPS_IN_FLIGHT_MAX),
            pool: BlockPool::new(BLOCK_BUFFERS_RETAINED),
            needed: Vec::new(),
            qp_events: Vec::with_capacity(QP_COMPLETIONS_PER_POLL),
            crcs: Vec::new(),
            durable_scratch: Vec::new(),
            done_scratch: Vec::new(),
            spare_plans: Vec::with_capacity(OPS_IN_FLIGHT_MAX),
            stats: StoreStats::default(),
            extra: SegmentStats::default(),
            cleaner: Cleaner::new(),
            readers: vec![0; mounted.sb.segment_count as usize],
            sweep_needed: true,
            sized_at_chain_len: usize::MAX,
            checkpoint_interval: 4,
            walk_step_extents: WALK_EXTENTS_PER_STEP,
            cold_head: true,
            checkpoint_writes: CheckpointWrites::Cheaper,
            write_out: None,
            checkpoint_generation: 0,
            checkpoint_segments: 1,
            checkpoint_bytes: 0,
            usable_blocks: mounted.sb.usable_blocks(shard),
            pending_new_blocks: 0,
        };
        if store.mapped_blocks() > store.usable_blocks {
            // Not made by this store's admission (which keeps it at most usable): say so, and
            // serve; new blocks are refused until removes bring it under.
            log::warn!(
                "shard {}: {} blocks mapped, more than the {} the spare leaves usable",
                shard,
                store.mapped_blocks(),
                store.usable_blocks
            );
        }
        store.stats.capacity_bytes = store.data_capacity_bytes();
        store.register_buffers();
        Ok(store)
    }

    /// Registers the block pool's arena and the journal's record buffers with the queue pair
    /// once, so that a backend that can (NVMe) moves 4 KiB writes without a bounce copy. A
    /// refusal costs speed, not correctness: logged, and the ordinary path stays.
    fn register_buffers(&mut self) {
        let [head, second_head, header, nodes, cold_headers] = self.journal.dma_regions();
        let [singles, runs] = self.pool.regions();
        let regions = [
            singles,
            runs,
            head,
            second_head,
            header,
            nodes,
            cold_headers,
        ];
        // SAFETY: the arena and the journal's buffers are heap memory owned by this store,
        // never reallocated, and dropped only with the store, after its queue pair (field
        // order: `qp` comes first) stops using them.
        match unsafe { self.qp.register_buffers(&regions) } {
            Ok(true) => log::info!(
                "shard {}: block pool and journal buffers registered for DMA",
                self.shard
            ),
            Ok(false) => {}
            Err(e) => log::warn!(
                "shard {}: registering buffers for DMA failed, payload is copied: {e}",
                self.shard
            ),
        }
    }

    /// The queue pair (tests cut its power).
    pub fn queue_pair(&mut self) -> &mut Q {
        &mut self.qp
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Sets how many extents a step of the cleaner's victim walk visits while I/O is in
    /// flight (`WALK_EXTENTS_PER_STEP` by default). For tests and the simulation: a small
    /// step makes the walk span many polls on a small device, as it does on a large one.
    pub fn set_walk_step_extents(&mut self, extents: usize) {
        assert!(extents > 0, "a walk step visits at least one extent");
        self.walk_step_extents = extents;
    }

    /// Lets the cleaner write its copies to a log head of its own (the default), or not: then
    /// they go beside client writes, as before format 7. For tests that compare the two.
    pub fn set_cold_head(&mut self, enabled: bool) {
        self.cold_head = enabled;
    }

    /// Whether a record carrying cleaner copies to the cold head is in flight (tests cut the
    /// power then).
    pub fn cold_run_in_flight(&self) -> bool {
        self.journal.cold_run_in_flight()
    }

    /// What `segment` is for now (tests watch a segment through the cleaner).
    pub fn segment_role(&self, segment: u32) -> SegmentRole {
        self.journal.role(segment)
    }

    /// What checkpoints write (`CheckpointWrites::Cheaper` by default). Takes effect at the
    /// next checkpoint.
    pub fn set_checkpoint_writes(&mut self, writes: CheckpointWrites) {
        self.checkpoint_writes = writes;
    }

    pub fn segment_stats(&self) -> SegmentStats {
        let mut extra = self.extra;
        extra.checkpoint_node_blocks = self.journal.checkpoint_node_blocks;
        extra.records_written = self.journal.records_written;
        extra.records_overlapped = self.journal.record_times.overlapped;
        extra.journal_bytes = self.journal.bytes_written;
        extra.buffer_allocations = self.pool.allocations;
        extra.free_segments = self.journal.free_segment_count() as u64;
        extra.reserve_segments = self.journal.reserve_segments as u64;
        extra.journal_segments = self.journal.chain_len() as u64;
        extra.data_segments = self
            .sb
            .shard_segments(self.shard)
            .filter(|&s| self.journal.role(s) == SegmentRole::Data)
            .count() as u64;
        extra.checkpoints = self.journal.checkpoints_written;
        extra.checkpoint_bytes = self.journal.checkpoint_bytes;
        let cleaned = self.cleaner.stats;
        extra.segments_cleaned = cleaned.segments_cleaned;
        extra.segments_freed_empty = cleaned.segments_freed_empty;
        extra.blocks_moved = cleaned.blocks_moved;
        extra.cleaner_reads = cleaned.reads;
        extra.cleaner_blocks_read = cleaned.blocks_read;
        extra.cleaner_walk_steps = cleaned.walk_steps;
        extra.victims_abandoned = cleaned.victims_abandoned;
        extra.cold_segments_opened = self.journal.cold_segments_opened;
        extra.blocks_moved_cold = cleaned.blocks_moved_cold;
        extra.mapped_blocks = self.mapped_blocks();
        extra.usable_blocks = self.usable_blocks;
        extra
    }

    /// Logical blocks mapped: what clients have stored, in blocks.
    fn mapped_blocks(&self) -> u64 {
        self.metadata.extent_tree().len() as u64
    }

    /// Journal records (or a segment header) on their way to the device now.
    pub fn journal_records_in_flight(&self) -> usize {
        self.journal.records_in_flight()
    }

    /// What the shard is doing, for a test or a log line about a stall.
    pub fn debug_state(&self) -> String {
        let mut stages: HashMap<String, usize> = HashMap::new();
        for slot in &self.slots {
            if slot.stage != Stage::Free {
                *stages.entry(format!("{:?}", slot.stage)).or_default() += 1;
            }
        }
        let moves: Vec<_> = self.cleaner.moves.iter().map(|m| m.stage).collect();
        format!(
            "ops {stages:?}; device requests in flight {}; free segments {} (reserve {}); journal segments {} ({}); checkpoint idle {}; victim {:?} (walk from {:?}, todo {}, moves {moves:?}); readers {:?}; stats {:?}",
            self.qp.in_flight(),
            self.journal.free_segment_count(),
            self.journal.reserve_segments,
            self.journal.chain_len(),
            self.journal.debug_state(),
            self.journal.checkpoint_idle(),
            self.cleaner.victim,
            self.cleaner.walk_from,
            self.cleaner.todo.len(),
            self.readers.iter().enumerate().filter(|(_, &r)| r > 0).collect::<Vec<_>>(),
            self.segment_stats()
        )
    }

    /// Ops in progress (submitted, not yet reported).
    pub fn in_flight(&self) -> usize {
        OPS_IN_FLIGHT_MAX - self.free_slots.len()
    }

    /// A free slot for an op on `oid` under `tag`; None when `OPS_IN_FLIGHT_MAX` are in progress.
    fn claim_slot(&mut self, tag: u64, oid: &[u8], hash: u64, ops: &[SubOp<'_>]) -> Option<u32> {
        let slot_index = self.free_slots.pop()?;
        let slot = &mut self.slots[slot_index as usize];
        slot.write_bytes = ops
            .iter()
            .map(|op| match op {
                SubOp::Write { data, .. } | SubOp::WriteFull { data } => data.len() as u64,
                _ => 0,
            })
            .sum();
        slot.mutates = ops.iter().any(SubOp::is_mutation);
        slot.pipelines = exec::pipelines(ops);
        slot.tag = tag;
        slot.oid.clear();
        slot.oid.extend_from_slice(oid);
        slot.oid_hash = hash;
        Some(slot_index)
    }

    /// What clients may store: the shard's data blocks less the spare.
    fn data_capacity_bytes(&self) -> u64 {
        self.usable_blocks * BLOCK_SIZE_BYTES
    }

    // ---- starting ops -------------------------------------------------------------------

    /// Starts the op in `slot` (its lane is ours): read what it needs, or run it now.
    fn start(&mut self, slot_index: u32) {
        let slot = &mut self.slots[slot_index as usize];
        let mut all = [SubOp::Stat; SUB_OPS_MAX];
        Slot::sub_ops(&slot.ops, &slot.args, &mut all);
        let ops = &all[..slot.ops.len()];
        let old = self.metadata.object_hashed(&slot.oid, slot.oid_hash);
        exec::blocks_to_read(old, ops, slot.out_capacity, &mut self.needed);
        if self.needed.is_empty() {
            self.run(slot_index, None);
            return;
        }
        self.start_reads(slot_index);
    }

    /// Starts the reads of the op in `slot`, whose blocks to read are in `self.needed`
    /// (computed by `start`, or by `submit` for an op that starts at once: same sub-ops,
    /// same output capacity, and no metadata change since).
    fn start_reads(&mut self, slot_index: u32) {
        debug_assert!(!self.needed.is_empty());
        let slot = &mut self.slots[slot_index as usize];
        build_runs(
            &self.needed,
            &mut slot.runs,
            &mut slot.run_crcs,
            &mut self.pool,
        );
        for run in &slot.runs {
            let segment = self
                .sb
                .segment_at(run.physical)
                .expect("mapped blocks are inside");
            self.readers[segment as usize] += 1;
        }
        slot.reads_outstanding = slot.runs.len() as u32;
        slot.stage = Stage::Reading;
        self.extra.block_reads += self.needed.len() as u64;
        self.unsubmitted.push_back(slot_index);
        self.submit_reads();
    }

    /// Runs the op in `slot` with its reads complete (or, with `after`, behind journaled
    /// writes to its object), and journals its plan.
    fn run(&mut self, slot_index: u32, after: Option<After>) {
        let slot = &mut self.slots[slot_index as usize];
        let mut all = [SubOp::Stat; SUB_OPS_MAX];
        Slot::sub_ops(&slot.ops, &slot.args, &mut all);
        let ops = &all[..slot.ops.len()];
        if ops.iter().any(SubOp::is_mutation) && self.journal.has_failed() {
            return self.finish(slot_index, Err(StoreError::Io)); // As in `submit`.
        }
        // SAFETY: the pointer and capacity come from the caller's `OutputBuffer`, checked to
        // be a `from_raw` buffer in `submit`; its contract keeps the region valid and ours
        // until we report this op complete, which has not happened yet.
        let mut out = unsafe { OutputBuffer::from_raw(slot.out_ptr, slot.out_capacity) };
        let old = self.metadata.object_hashed(&slot.oid, slot.oid_hash);
        let blocks = ReadBlocks { runs: &slot.runs };
        let plan = self.spare_plans.pop().unwrap_or_else(Plan::new);
        let executed = exec::execute(
            old,
            after,
            &ops,
            &blocks,
            &mut out,
            &mut slot.results[..ops.len()],
            &mut self.pool,
            plan,
        );
        for run in slot.runs.drain(..) {
            self.pool.give(run.buf);
        }
        count_reads(&mut self.stats, &ops);
        match executed {
            Err((error, plan)) => {
                self.recycle_plan(plan);
                self.finish(slot_index, Err(error))
            }
            Ok(plan) if !plan.needs_record() => {
                self.stats.transactions += u64::from(plan.mutated);
                self.recycle_plan(plan);
                self.finish(slot_index, Ok(()))
            }
            Ok(plan) => {
                let slot = &mut self.slots[slot_index as usize];
                slot.plan = Some(plan);
                self.journal_plan(slot_index);
            }
        }
    }

    /// Puts the slot's plan in the journal's batch, or leaves it blocked if the batch is full.
    /// An op that would map more blocks than the spare leaves usable gets NoSpace, applied
    /// nothing (overwrites map no new block and always pass).
    fn journal_plan(&mut self, slot_index: u32) {
        let mapped = self.mapped_blocks();
        let slot = &mut self.slots[slot_index as usize];
        let plan = slot.plan.as_mut().expect("a planned op");
        let old = self.metadata.object_hashed(&slot.oid, slot.oid_hash);
        debug_assert_eq!(slot.new_blocks, 0, "admitted once");
        let lane = self
            .lanes
            .find_mut(slot.oid_hash, |l| l.oid == slot.oid)
            .expect("an op in progress holds its object's lane");
        new_mapped_blocks(plan, old, &lane.chain_new, &mut self.new_scratch);
        let new_blocks = self.new_scratch.len() as u64;
        if new_blocks > 0 && mapped + self.pending_new_blocks + new_blocks > self.usable_blocks {
            self.extra.usable_full_refusals += 1;
            return self.finish(slot_index, Err(StoreError::NoSpace));
        }
        let appended = if self.journal.client_batch_closed() {
            Err(JournalError::BatchFull)
        } else {
            append_plan(
                &mut self.journal,
                &slot.oid,
                old,
                plan,
                &mut self.crcs,
                slot_index as u64,
            )
        };
        match appended {
            Ok(()) => {
                slot.stage = Stage::Journaled;
                slot.new_blocks = new_blocks;
                self.pending_new_blocks += new_blocks;
                self.extra.client_bytes_written += slot.write_bytes;
                let after = slot.pipelines.then(|| plan.after());
                debug_assert!(lane.journaled < lane.active && !lane.reading);
                // The chain goes on only from a whole-block write whose predecessors still
                // in the journal are one too (or that has none left there).
                lane.after = after.filter(|_| lane.journaled == 0 || lane.after.is_some());
                lane.journaled += 1;
                if lane.after.is_some() {
                    for &index in &self.new_scratch {
                        if let Err(at) = lane.chain_new.binary_search(&index) {
                            lane.chain_new.insert(at, index);
                        }
                    }
                } else {
                    lane.chain_new.clear();
                }
                if !lane.waiting.is_empty() && lane.after.is_some() {
                    self.pipeline_checks.push(slot_index);
                }
            }
            Err(JournalError::BatchFull) => {
                slot.stage = Stage::Blocked;
                self.extra.batch_full_waits += 1;
                self.blocked.push_back(slot_index);
            }
            Err(JournalError::NoSpace) if self.space_reclaimable() => {
                self.slots[slot_index as usize].stage = Stage::Blocked;
                self.extra.space_waits += 1;
                self.blocked.push_back(slot_index);
            }
            Err(JournalError::NoSpace) => self.finish(slot_index, Err(StoreError::NoSpace)),
            Err(JournalError::Io(error)) => {
                log::error!("shard {}: journal failed earlier: {error}", self.shard);
                self.finish(slot_index, Err(StoreError::Io))
            }
        }
    }

    /// Gives a plan's buffers back to the pool and keeps the plan for a later op.
    fn recycle_plan(&mut self, mut plan: Plan) {
        self.pool.give_all(&mut plan.bufs);
        if self.spare_plans.len() < OPS_IN_FLIGHT_MAX {
            self.spare_plans.push(plan);
        }
    }

    /// The op is over (with `result`): report it and let its object's next op start.
    fn finish(&mut self, slot_index: u32, result: Result<(), StoreError>) {
        let slot = &mut self.slots[slot_index as usize];
        let mut plan = slot.plan.take();
        if let Some(plan) = plan.as_mut() {
            // Before the lane starts the next op, which takes buffers from the pool.
            self.pool.give_all(&mut plan.bufs);
        }
        if result.is_err() {
            self.stats.errors += 1;
        }
        let journaled = slot.stage == Stage::Journaled;
        slot.result = result;
        slot.stage = Stage::Done;
        self.finished.push_back(slot_index);
        self.release_lane(slot_index, plan.as_ref().filter(|_| journaled));
        if let Some(plan) = plan {
            self.recycle_plan(plan);
        }
    }

    /// `oid`'s lane (`hash` is its hash), with one op (a mutation unless `reading`) in progress.
    fn open_lane(&mut self, oid: &[u8], hash: u64, reading: bool) {
        debug_assert_eq!(hash, self.metadata.hash_oid(oid));
        debug_assert!(
            self.lanes.find(hash, |l| l.oid == oid).is_none(),
            "one lane per object"
        );
        let (mut key, waiting, chain_new) = self.spare_lanes.pop().unwrap_or_default();
        debug_assert!(waiting.is_empty() && chain_new.is_empty());
        key.clear();
        key.extend_from_slice(oid);
        let lane = Lane {
            oid: key,
            hash,
            active: 1,
            journaled: 0,
            after: None,
            chain_new,
            reading,
            waiting,
        };
        self.lanes.insert_unique(hash, lane, |l| l.hash);
    }

    /// The lane of an object with an op in progress.
    fn lane_mut(&mut self, oid: &[u8], hash: u64) -> &mut Lane {
        self.lanes
            .find_mut(hash, |l| l.oid == oid)
            .expect("an op in progress holds its object's lane")
    }

    /// The op in `slot` is over (`journaled`: the plan of an op whose record was in the
    /// journal): the next ops of its object start when it was the last in progress.
    fn release_lane(&mut self, slot_index: u32, journaled: Option<&Plan>) {
        let slot = &self.slots[slot_index as usize];
        let (oid, hash) = (&slot.oid, slot.oid_hash);
        let Ok(mut entry) = self.lanes.find_entry(hash, |l| l.oid == *oid) else {
            panic!("an op holds its lane");
        };
        let lane = entry.get_mut();
        debug_assert!(lane.active > 0 && lane.journaled >= u32::from(journaled.is_some()));
        lane.active -= 1;
        if let Some(plan) = journaled {
            lane.journaled -= 1;
            if lane.active > 0 && !lane.chain_new.is_empty() {
                // Its blocks are in the metadata now (or the journal failed): the chain's
                // list need not cover them any more.
                for &(index, _) in plan.dirty.entries() {
                    if let Ok(at) = lane.chain_new.binary_search(&index) {
                        lane.chain_new.remove(at);
                    }
                }
            }
        }
        if lane.active > 0 {
            return;
        }
        debug_assert_eq!(lane.journaled, 0);
        lane.after = None;
        lane.chain_new.clear();
        let Some(&front) = lane.waiting.front() else {
            let (lane, _) = entry.remove();
            let mut chain_new = lane.chain_new;
            chain_new.clear();
            self.spare_lanes.push((lane.oid, lane.waiting, chain_new));
            return;
        };
        // Next: one mutation, or every read-only op up to the next mutation. All are counted
        // active before any starts: one that completes at once releases the lane again, and
        // must not see it idle while the others have yet to start.
        let slots = &self.slots;
        let read_only = |slot: u32| !slots[slot as usize].mutates;
        let group = if read_only(front) {
            lane.waiting.iter().take_while(|&&s| read_only(s)).count()
        } else {
            1
        };
        lane.active = group as u32;
        lane.reading = read_only(front);
        for _ in 0..group {
            let slot = &self.slots[slot_index as usize];
            let lane = self
                .lanes
                .find_mut(slot.oid_hash, |l| l.oid == slot.oid)
                .expect("held while active");
            let next = lane.waiting.pop_front().expect("counted above");
            self.start(next);
        }
    }

    /// Starts the waiting whole-block writes that may now run behind the chains of
    /// journaled writes `journal_plan` noted (each may extend its chain and note it again).
    /// Returns how many started.
    fn start_pipelined(&mut self) -> usize {
        let mut started = 0;
        while let Some(slot_index) = self.pipeline_checks.pop() {
            let slot = &self.slots[slot_index as usize];
            if slot.stage != Stage::Journaled {
                continue; // Durable since (or failed): its lane moved on without it.
            }
            let Some(lane) = self.lanes.find_mut(slot.oid_hash, |l| l.oid == slot.oid) else {
                continue;
            };
            let Some(after) = lane.after else { continue };
            let next = match lane.waiting.front() {
                Some(&next)
                    if lane.active == lane.journaled && self.slots[next as usize].pipelines =>
                {
                    next
                }
                _ => continue,
            };
            lane.waiting.pop_front();
            lane.active += 1;
            self.extra.lane_pipelined += 1;
            started += 1;
            self.run(next, Some(after));
        }
        started
    }

    fn submit_reads(&mut self) {
        while let Some(&slot_index) = self.unsubmitted.front() {
            let slot = &mut self.slots[slot_index as usize];
            for (run_index, run) in slot.runs.iter_mut().enumerate() {
                if run.submitted {
                    continue;
                }
                let tag = READ_TAG_BIT | u64::from(slot_index) << 16 | run_index as u64;
                // SAFETY: the run's buffer lives in the slot until the read completes (the slot
                // stays in Reading until every run reported) and nobody touches it meanwhile.
                let iovec = unsafe { run.buf.io_vec_at(0, run.blocks as usize * 4096) };
                match self.qp.submit_read(run.physical, &[iovec], tag) {
                    Ok(()) => run.submitted = true,
                    Err(SubmitError::QueueFull) => return,
                    Err(error) => panic!("shard read request malformed: {error}"),
                }
            }
            self.unsubmitted.pop_front();
        }
    }

    fn read_completed(&mut self, tag: u64, result: Result<(), IoError>) {
        let slot_index = ((tag & !READ_TAG_BIT) >> 16) as u32;
        let run_index = (tag & 0xffff) as usize;
        let slot = &mut self.slots[slot_index as usize];
        debug_assert_eq!(slot.stage, Stage::Reading);
        let oid = &slot.oid;
        let run = &mut slot.runs[run_index];
        run.done = true;
        let segment = self.sb.segment_at(run.physical).expect("reads are inside");
        self.readers[segment as usize] -= 1;
        match result {
            Ok(()) => {
                let crcs = &slot.run_crcs[run.crc_first as usize..][..run.blocks as usize];
                for at in 0..u64::from(run.blocks) {
                    let expected = crcs[at as usize];
                    let bytes =
                        &run.buf[(at * BLOCK_SIZE_BYTES) as usize..][..BLOCK_SIZE_BYTES as usize];
                    if carmine_crc::crc32c(bytes) == expected {
                        run.valid |= 1 << at;
                    } else {
                        self.extra.checksum_errors += 1;
                        log::error!(
                            "shard {}: checksum mismatch in object {:?} block {} at device offset {}",
                            self.shard,
                            String::from_utf8_lossy(oid),
                            run.first_index + at,
                            run.physical + at * BLOCK_SIZE_BYTES
                        );
                    }
                }
            }
            Err(error) => {
                self.extra.read_errors += 1;
                log::error!(
                    "shard {}: read of {} blocks at {} failed: {error}",
                    self.shard,
                    run.blocks,
                    run.physical
                );
            }
        }
        slot.reads_outstanding -= 1;
        if slot.reads_outstanding == 0 {
            self.ready.push_back(slot_index);
        }
    }

    fn apply_record(&mut self, deltas: &[u8]) {
        self.sweep_needed = true;
        for delta in DeltaReader::new(deltas) {
            let delta = delta.expect("the store encoded this record itself");
            if let Err(error) = self.metadata.apply(&delta) {
                // The store journaled a delta its own metadata rejects: continuing would
                // serve wrong data. Stop here; replay of the durable log is the recovery.
                panic!(
                    "shard {}: own journal record does not apply: {error}",
                    self.shard
                );
            }
        }
    }
}

/// Groups the blocks to read into runs that are consecutive both logically and on the device.
fn build_runs(
    needed: &[(u64, BlockRef)],
    runs: &mut Vec<ReadRun>,
    crcs: &mut Vec<u32>,
    pool: &mut BlockPool,
) {
    runs.clear();
    crcs.clear();
    let mut i = 0;
    while i < needed.len() {
        let (first, block) = needed[i];
        let physical = block.physical;
        let crc_first = crcs.len() as u32;
        crcs.push(block.crc);
        let mut count = 1;
        while i + count < needed.len()
            && (count as u64) < READ_RUN_BLOCKS_MAX
            && needed[i + count].0 == first + count as u64
        {
            let next = needed[i + count].1;
            if next.physical != physical + count as u64 * 4096 {
                break;
            }
            crcs.push(next.crc);
            count += 1;
        }
        runs.push(ReadRun {
            first_index: first,
            blocks: count as u32,
            crc_first,
            physical,
            buf: pool.take(count as u64),
            valid: 0,
            done: false,
            submitted: false,
        });
        i += count;
    }
}

/// Puts in `new` the blocks `plan` maps that neither `old` nor the journaled writes before
/// it (`chain`, sorted) have mapped: what the op adds to the mapped count once applied. A
/// dropped object's blocks are unmapped by the same record, but they are counted as they
/// stand until then: admission may refuse early, never late.
fn new_mapped_blocks(plan: &Plan, old: Option<ObjectRef<'_>>, chain: &[u64], new: &mut Vec<u64>) {
    new.clear();
    let data = plan
        .dirty
        .entries()
        .iter()
        .filter(|(_, dirty)| matches!(dirty, Dirty::Data { .. }))
        .filter(|(index, _)| chain.binary_search(index).is_err());
    let indexes = |(index, _): &(u64, Dirty)| *index;
    match old {
        Some(old) if !plan.dropped && old.mapped_blocks > 0 => {
            // No block is mapped at or past the object's size (fsck's `BlockPastSize` rule:
            // writes grow the size, truncates unmap what they cut), so an object with as
            // many blocks mapped as its size spans has every one of them: a dense object,
            // the common case, answers without a tree lookup per block (which was ~10% of
            // a shard's CPU under 4 KiB random overwrites).
            let dense = old.mapped_blocks == old.size.div_ceil(BLOCK_SIZE_BYTES);
            data.filter(|(index, _)| {
                let mapped = if dense {
                    *index < old.mapped_blocks
                } else {
                    old.blocks.contains(*index)
                };
                debug_assert!(
                    !dense || mapped == old.blocks.contains(*index),
                    "dense object, block {index}: mapped {mapped} by its size, not in the tree"
                );
                !mapped
            })
            .map(indexes)
            .for_each(|index| new.push(index));
        }
        _ => data.map(indexes).for_each(|index| new.push(index)),
    }
}

fn count_reads(stats: &mut StoreStats, ops: &[SubOp<'_>]) {
    stats.reads += ops.iter().filter(|op| !op.is_mutation()).count() as u64;
}

/// Appends the plan's deltas and data to the journal's batch as one op. On error the batch is
/// as before.
fn append_plan(
    journal: &mut Journal,
    oid: &[u8],
    old: Option<ObjectRef<'_>>,
    plan: &mut Plan,
    crcs: &mut Vec<u32>,
    tag: u64,
) -> Result<(), JournalError> {
    let mut op = journal.append()?;
    if plan.dropped {
        op.delta(&Delta::ObjectRemove { oid })?;
    }
    if !plan.exists {
        debug_assert!(plan.dropped);
    } else {
        if !plan.existed || plan.dropped {
            op.delta(&Delta::ObjectCreate { oid })?;
        }
        let entries = plan.dirty.entries();
        let mut i = 0;
        while i < entries.len() {
            let (index, dirty) = entries[i];
            match dirty {
                Dirty::Data { buf, at } => {
                    let mut count = 1;
                    while let Some(&(next, Dirty::Data { buf: b, at: a })) = entries.get(i + count)
                    {
                        if next != index + count as u64 || b != buf || a != at + count as u32 {
                            break;
                        }
                        count += 1;
                    }
                    let buffer = &mut plan.bufs[buf as usize];
                    crcs.clear();
                    for block in 0..count {
                        let start = (at as usize + block) * 4096;
                        crcs.push(carmine_crc::crc32c(&buffer[start..start + 4096]));
                    }
                    // SAFETY: the buffer belongs to the plan, which the slot keeps unchanged
                    // until the journal reports this op's record durable (or failed).
                    let iovec = unsafe { buffer.io_vec_at(at as usize * 4096, count * 4096) };
                    // SAFETY: as above: the memory stays valid and unmodified until completion.
                    unsafe { op.extent(oid, index * BLOCK_SIZE_BYTES, iovec, crcs)? };
                    i += count;
                }
                Dirty::Hole => {
                    let mut count = 1;
                    while let Some(&(next, Dirty::Hole)) = entries.get(i + count) {
                        if next != index + count as u64 {
                            break;
                        }
                        count += 1;
                    }
                    let unmapped = (index..index + count as u64)
                        .any(|block| exec::hole_needs_unmap(plan, old, block));
                    if unmapped {
                        op.delta(&Delta::ExtentUnmap {
                            oid,
                            offset: index * BLOCK_SIZE_BYTES,
                            blocks: count as u32,
                        })?;
                    }
                    i += count;
                }
            }
        }
        for change in &plan.meta {
            let delta = match (change.xattr, &change.value) {
                (true, Some(value)) => Delta::XattrSet {
                    oid,
                    name: &change.key,
                    value,
                },
                (true, None) => Delta::XattrRemove {
                    oid,
                    name: &change.key,
                },
                (false, Some(value)) => Delta::OmapSet {
                    oid,
                    key: &change.key,
                    value,
                },
                (false, None) => Delta::OmapRemove {
                    oid,
                    key: &change.key,
                },
            };
            op.delta(&delta)?;
        }
        op.delta(&Delta::ObjectSize {
            oid,
            size: plan.size,
        })?;
    }
    // An op without data (a remove, a truncate, an xattr) may take the reserve: on a full
    // device, removes are how space comes back.
    let writes_data = plan.dirty.values().any(|d| matches!(d, Dirty::Data { .. }));
    op.placement(!writes_data)?;
    op.commit(tag);
    Ok(())
}

// SAFETY: the only field that is not `Send` is `Slot::out_ptr`, a caller's output region made
// by `OutputBuffer::from_raw`. Its contract gives the store the region, for writes by nobody
// else, until the op is reported complete; it names no thread, and the store writes the region
// only through `&mut self`. Whoever owns the store (one reactor, or classic mode's store under
// its lock) is the one writer, whichever thread that is.
unsafe impl<Q: QueuePair + Send> Send for SegmentStore<Q> {}

impl<Q: QueuePair> ObjectStore for SegmentStore<Q> {
    fn debug_state(&self) -> String {
        // The inherent method: what the shard's ops, journal and cleaner are doing.
        SegmentStore::debug_state(self)
    }

    fn submit(
        &mut self,
        tag: u64,
        oid: &[u8],
        ops: &[SubOp<'_>],
        out: &mut OutputBuffer<'_>,
        results: &mut [SubOpResult],
    ) -> Result<Submit, StoreError> {
        assert!(results.len() >= ops.len(), "fewer results than sub-ops");
        if let Err(error) = check_operation(oid, ops) {
            self.stats.errors += 1;
            return Err(error);
        }
        let read_only = !ops.iter().any(SubOp::is_mutation);
        if !read_only && self.journal.has_failed() {
            // The device may hold a record whose op was failed: memory no longer says what
            // is durable, so no mutation may be answered from it (even one that needs no
            // record would be acknowledged against a state the device may not hold).
            self.stats.errors += 1;
            return Err(StoreError::Io);
        }
        // Keyed SipHash (ids come from clients), once: the lane and the object are found by it.
        let hash = self.metadata.hash_oid(oid);
        let (idle, joins, after) = match self.lanes.find(hash, |l| l.oid == oid) {
            None => (true, false, None),
            Some(lane) => (
                false,
                read_only && lane.reading && lane.waiting.is_empty(),
                // Behind a chain of journaled whole-block writes, with nothing else waiting.
                lane.after.filter(|_| {
                    lane.waiting.is_empty() && lane.active == lane.journaled && exec::pipelines(ops)
                }),
            ),
        };
        if idle || joins || after.is_some() {
            // Fast path: nothing to read and nothing to wait for runs right here, with the
            // caller's sub-ops, and completes now unless it journals.
            let old = self.metadata.object_hashed(oid, hash);
            exec::blocks_to_read(old, ops, out.capacity(), &mut self.needed);
            if self.needed.is_empty() {
                let plan = self.spare_plans.pop().unwrap_or_else(Plan::new);
                let executed = exec::execute(
                    old,
                    after,
                    ops,
                    &NoBlocks,
                    out,
                    results,
                    &mut self.pool,
                    plan,
                );
                count_reads(&mut self.stats, ops);
                let plan = match executed {
                    Err((error, plan)) => {
                        self.recycle_plan(plan);
                        self.stats.errors += 1;
                        return Err(error);
                    }
                    Ok(plan) if !plan.needs_record() => {
                        self.stats.transactions += u64::from(plan.mutated);
                        self.recycle_plan(plan);
                        return Ok(Submit::Done);
                    }
                    Ok(plan) => plan,
                };
                let Some(slot_index) = self.claim_slot(tag, oid, hash, ops) else {
                    self.recycle_plan(plan);
                    self.stats.errors += 1;
                    return Err(StoreError::NoSpace);
                };
                let slot = &mut self.slots[slot_index as usize];
                slot.ops.clear();
                slot.args.clear();
                slot.results[..ops.len()].copy_from_slice(&results[..ops.len()]);
                slot.result_count = ops.len();
                slot.plan = Some(plan);
                if idle {
                    self.open_lane(oid, hash, false);
                } else {
                    debug_assert!(after.is_some(), "a mutation runs alone or behind a chain");
                    self.lane_mut(oid, hash).active += 1;
                    self.extra.lane_pipelined += 1;
                }
                self.journal_plan(slot_index);
                self.stats.transactions += 1;
                return Ok(Submit::Pending);
            }
        }
        // The op waits (for its lane or its reads) and fills `out` later: that needs a raw
        // output buffer, and copies of its arguments.
        if out.is_borrowed() && ops.iter().any(|op| !op.is_mutation()) {
            self.stats.errors += 1;
            return Err(StoreError::InvalidArgument);
        }
        let Some(slot_index) = self.claim_slot(tag, oid, hash, ops) else {
            self.stats.errors += 1;
            return Err(StoreError::NoSpace);
        };
        let slot = &mut self.slots[slot_index as usize];
        slot.store_ops(ops);
        slot.result_count = ops.len();
        slot.out_ptr = out.as_mut_ptr();
        slot.out_capacity = out.capacity();
        slot.stage = Stage::Queued;
        if ops.iter().any(SubOp::is_mutation) {
            self.stats.transactions += 1;
        }
        // An op that starts now reached here with its blocks to read in `self.needed` (the
        // fast path above found some): they are not computed twice.
        if idle {
            self.open_lane(oid, hash, read_only);
            self.start_reads(slot_index);
        } else if joins {
            self.lane_mut(oid, hash).active += 1;
            self.start_reads(slot_index);
        } else {
            self.extra.lane_waits += 1;
            self.lane_mut(oid, hash).waiting.push_back(slot_index);
        }
        Ok(Submit::Pending)
    }

    fn poll(
        &mut self,
        max: usize,
        complete: &mut dyn FnMut(u64, Result<&[SubOpResult], StoreError>),
    ) -> usize {
        // 1. Device completions. Gathered into a kept vector (not a stack array, which cost
        // ~730 instructions a poll to initialize: more than the rest of an idle poll).
        // No more than the caller's `max`: a caller that replaces each finished op with a new
        // one polls for a few at a time, so that the replacements of the first ops of a batch
        // reach the device before the rest of the batch is processed (the others wait in the
        // completion ring, which holds every request in flight). Taking the whole batch first
        // left the device idle for the time it takes to process it (see ARCHITECTURE.md,
        // "Reads against fio").
        let mut events = std::mem::take(&mut self.qp_events);
        debug_assert!(events.is_empty() && events.capacity() >= QP_COMPLETIONS_PER_POLL);
        self.qp
            .poll(max.clamp(1, QP_COMPLETIONS_PER_POLL), &mut |tag, result| {
                events.push((tag, result));
            });
        let count = events.len();
        for &(tag, result) in &events {
            if tag & JOURNAL_TAG_BIT != 0 {
                self.journal.complete_io(tag, result);
            } else if tag & CLEANER_TAG_BIT != 0 {
                self.move_read(tag, result);
            } else {
                debug_assert_ne!(tag & READ_TAG_BIT, 0);
                self.read_completed(tag, result);
            }
        }
        events.clear();
        self.qp_events = events;
        // 2. Ops whose reads are in, then ops waiting for batch room, then the journal.
        self.submit_reads();
        while let Some(slot_index) = self.ready.pop_front() {
            self.run(slot_index, None);
        }
        self.pump_journal();
        let blocked = self.blocked.len();
        for _ in 0..blocked {
            let slot_index = self.blocked.pop_front().expect("counted");
            self.journal_plan(slot_index);
        }
        let pipelined = self.start_pipelined();
        if blocked > 0 || pipelined > 0 {
            self.pump_journal();
        }
        self.maintain();
        // What this pass queued goes to the device now, not at the next pass: a core that
        // parks after this pass must have its I/O out, or nothing would wake it.
        self.qp.submit_queued();
        // CPU work that would otherwise hold back what was just queued.
        self.walk_victim();
        // 3. Report.
        let mut reported = 0;
        while reported < max {
            let Some(slot_index) = self.finished.pop_front() else {
                break;
            };
            let slot = &mut self.slots[slot_index as usize];
            let result = slot.result.map(|()| &slot.results[..slot.result_count]);
            complete(slot.tag, result);
            slot.stage = Stage::Free;
            self.free_slots.push(slot_index);
            reported += 1;
        }
        reported + count
    }

    fn busy(&self) -> bool {
        self.in_flight() > 0 || self.cleaner.active() || self.journal.checkpoint_in_progress()
    }

    fn wake_on_completion(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<bool> {
        self.qp.wake_on_completion(fd)
    }

    fn stats(&self) -> StoreStats {
        let mut stats = self.stats;
        stats.objects = self.metadata.object_count() as u64;
        stats.bytes_stored = self.metadata.data_blocks() * BLOCK_SIZE_BYTES;
        let segment = self.segment_stats();
        stats.device_bytes_written = segment.journal_bytes;
        stats.client_bytes_written = segment.client_bytes_written;
        stats.records_written = self.journal.records_written;
        stats
    }
}

impl<Q: QueuePair> SegmentStore<Q> {
    fn pump_journal(&mut self) {
        // Gathered first, handled after: handling finishes ops, which needs `&mut self`.
        let mut durable = std::mem::take(&mut self.durable_scratch);
        let mut done = std::mem::take(&mut self.done_scratch);
        let mut any_durable = false;
        self.journal.retire(
            &mut |deltas| {
                any_durable = true;
                durable.extend_from_slice(deltas);
            },
            &mut |tag, result| done.push((tag, result)),
        );
        // Even a record without deltas may publish a checkpoint, making journal segments
        // data segments: some may hold nothing live.
        self.sweep_needed |= any_durable;
        if !durable.is_empty() {
            self.apply_record(&durable);
            durable.clear();
        }
        // Finishing an op starts the next one on its object (lanes), which joins the open
        // batch now, before it is sealed: a run of writes to one object goes into consecutive
        // records, not every other one.
        self.finish_journaled(&mut done);
        if self.journal.wants_snapshot() {
            self.take_snapshot();
        }
        self.advance_journal(&mut done);
        self.finish_journaled(&mut done);
        self.durable_scratch = durable;
        self.done_scratch = done;
    }

    /// Finishes the ops (and cleaner moves) the journal reported, and empties `done`.
    fn finish_journaled(&mut self, done: &mut Vec<(u64, Result<(), JournalError>)>) {
        // Their new blocks are mapped now (the records were applied before this), or never
        // will be (failed): all leave the pending count before any op finishes, because
        // finishing one starts the next op on its object, whose admission must not count
        // the others' blocks twice (mapped and pending).
        for &(tag, _) in done.iter() {
            if tag & CLEANER_TAG_BIT == 0 {
                let slot = &mut self.slots[tag as usize];
                debug_assert!(self.pending_new_blocks >= slot.new_blocks);
                self.pending_new_blocks -= slot.new_blocks;
                slot.new_blocks = 0;
            }
        }
        for &(tag, result) in done.iter() {
            if tag & CLEANER_TAG_BIT != 0 {
                self.move_done((tag & !CLEANER_TAG_BIT) as usize, result.is_ok());
                continue;
            }
            let result = result.map_err(|error| {
                log::error!("shard {}: {error}", self.shard);
                match error {
                    JournalError::NoSpace => StoreError::NoSpace,
                    JournalError::BatchFull | JournalError::Io(_) => StoreError::Io,
                }
            });
            self.finish(tag as u32, result);
        }
        done.clear();
    }
}
