//! The journal writer of one shard: group commit of ops into records, on the shard's queue pair.
//!
//! Ops append their deltas and their data (by reference: `IoVec`s into the caller's buffers,
//! typically the network receive buffer) to the open batch, which is sealed into a record.
//! Up to `RECORDS_IN_FLIGHT_MAX` (two) records are on their way to the device at once: while
//! one is being written or flushed, the next batch can be sealed and written beside it, so
//! the device is not left idle for a whole write+flush cycle (session 9 measured that cycle
//! growing from ~170 us to 370-950 us at 80% fill, with the cleaner's copies and reads beside
//! it, and nothing else written meanwhile).
//!
//! The rule "an op is acknowledged only when its record and every earlier record are durable"
//! is kept so:
//! - each record is made durable by its own flush, submitted once all its own writes have
//!   completed (a flush covers only writes completed before it was submitted); a later
//!   record's flush may complete first, and the record then waits;
//! - `retire` takes records from the front of the flight queue only, so acknowledgements,
//!   and the deltas the store applies to its metadata, go strictly in record order;
//! - after a failed write or flush every record still in flight is failed (`JournalError::Io`)
//!   and nothing more is acknowledged.
//!
//! A power cut may then tear record N and keep N + 1 whole. Replay stops at the first torn
//! record (`scan.rs`), so N + 1 is discarded, and it was never acknowledged. A record sealed
//! beside another is marked `RECORD_FLAG_OVERLAPS`, which lets the search for records past
//! the log's end (`tail.rs`) tell that state from damage.
//!
//! Only client records overlap, and only big enough ones
//! (`OVERLAP_DATA_BLOCKS_PER_HEAD_BLOCK_MIN`). Checkpoint records (the snapshot must equal
//! the state after every record written), publishing a checkpoint and opening a segment (its
//! header goes alone and must be durable before any record goes into it) wait until nothing
//! is in flight: they are rare, and draining keeps their rules as simple as with one record.
//!
//! Extent deltas need the device address of their data, which depends on the record's head
//! length, known only when the batch is sealed. An extent delta's encoding has a fixed size, so
//! the writer encodes a placeholder address and patches it at seal time (`patches`).
//!
//! The writer does not own the queue pair (the shard's reads share it): the caller passes it in
//! and hands back completions whose tag has `JOURNAL_TAG_BIT` set.

use crate::queue_pair::{
    AlignedBuf, IoError, IoVec, QueuePair, SubmitError, IOVECS_PER_REQUEST_MAX,
};
use std::collections::VecDeque;

use crate::segment::checkpoint_nodes::{CheckpointNodes, NoNodes};
use crate::segment::format::{
    encode_extent_map, encode_extent_move, record_data_crc_append, Delta, RecordHeader,
    SegmentHeader, Superblock, BLOCK_SIZE_BYTES, RECORD_DATA_BLOCKS_MAX, RECORD_FLAG_CHECKPOINT,
    RECORD_FLAG_CHECKPOINT_END, RECORD_FLAG_OVERLAPS, RECORD_HEADER_SIZE_BYTES,
    TREE_ROOT_DELTA_BYTES,
};
use crate::segment::scan::ShardLog;

/// Completions with this bit set belong to the journal.
pub const JOURNAL_TAG_BIT: u64 = 1 << 63;
/// Deltas in one record: bounds the head buffer (allocated once) and the replay of one record.
pub const BATCH_METADATA_MAX_BYTES: usize = 256 << 10;
/// Ops acknowledged by one record.
pub const BATCH_OPS_MAX: usize = 1024;
/// Deltas in one checkpoint record (the checkpoint reuses the batch's head buffer), less the
/// room the last one keeps for a `TreeRoot`.
pub const CHECKPOINT_CHUNK_MAX_BYTES: usize = BATCH_METADATA_MAX_BYTES - TREE_ROOT_DELTA_BYTES;
/// Extent-tree nodes in one checkpoint record: bounds the node buffer, allocated once with the
/// journal (256 KiB) and reused by every checkpoint record (they go one at a time).
pub const CHECKPOINT_NODE_BLOCKS_MAX: usize = 64;
const HEAD_BUFFER_BYTES: usize =
    (RECORD_HEADER_SIZE_BYTES + BATCH_METADATA_MAX_BYTES).div_ceil(4096) * 4096;
const TAG_FLUSH: u64 = 1;
/// Sealed records (client records, written and flushed) on their way to the device at once.
/// Two let the next record's write go out while the one before it is still being written or
/// flushed, so the device is never idle for a record's whole cycle. Acknowledgements still go
/// strictly in record order. Two at most: the mark a record carries when it overlaps its
/// predecessor (`RECORD_FLAG_OVERLAPS`) names only the record just before it, and that is
/// what lets the mount tell a torn tail of two records from damage (`tail.rs`).
pub const RECORDS_IN_FLIGHT_MAX: usize = 2;
/// Bound of `Journal::cold_left` (see there).
const COLD_LEFT_MAX: usize = RECORDS_IN_FLIGHT_MAX + 3;
const _: () = assert!(
    RECORDS_IN_FLIGHT_MAX == 2,
    "RECORD_FLAG_OVERLAPS names one record"
);
/// Records sealed after the last cold run written into a cold segment before that segment may
/// be freed (and so overwritten). The scan checks the cold runs of the chain's last
/// `RECORDS_IN_FLIGHT_MAX` records (`scan::check_cold_at_end`), and a write in flight with
/// record N (or a segment header before it) may be torn at a crash whose chain ends at N - 2,
/// so a run checked then belongs to a record >= N - 3: one written at most N - 4 is never
/// checked by the time its bytes can be overwritten. Without this, a move that no longer
/// applied (its block rewritten first) or whose blocks the very next record rewrote left its
/// segment free at once, and a torn write reusing it made the scan end the log at an
/// acknowledged record (`carmine sim --first-seed 5000 --cuts 3000`, seed 5437).
pub const COLD_REUSE_RECORDS_AFTER: u64 = RECORDS_IN_FLIGHT_MAX as u64 + 1;

/// A record sealed beside another carries at least this many data blocks per head block.
/// Every record costs a head (at least one 4 KiB block) and a flush; sealed as soon as a
/// record is in flight, a batch would often be one op or one cleaner copy, a head block per
/// data block: write amplification up, and the cleaner's room bound broken
/// (`cleaner::copy_head_blocks_bound` counts an eighth for heads and deltas). A smaller batch
/// waits for the record in flight and goes next, as it did with one record in flight.
pub const OVERLAP_DATA_BLOCKS_PER_HEAD_BLOCK_MIN: u32 = 8;

/// Data blocks a client batch takes while no record is in flight; later client ops wait for
/// the next batch, which is sealed beside it (`Journal::client_batch_closed`). Sealed alone,
/// a closed-loop load's whole window went into one record and the device had one write and
/// one flush to work on at a time: with whole-block writes no longer waiting in their
/// objects' lanes, 4 KiB random writes at queue depth 128 (`carmine store-bench --qd 128`)
/// fell from 274k to 212-225k IOPS in one record per window; with this limit, 281k (64
/// blocks: 268k), and through the server 348k (no limit: 293-304k). See ARCHITECTURE.md.
pub const LONE_BATCH_DATA_BLOCKS_MAX: u32 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalError {
    /// The op does not fit the open batch: retry after the next record completes.
    BatchFull,
    /// No free segment to open: the cleaner must free one (removes free space).
    NoSpace,
    /// A journal write or flush failed: the shard stops acknowledging (its log may have a hole).
    Io(IoError),
}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JournalError::BatchFull => f.write_str("journal batch full"),
            JournalError::NoSpace => f.write_str("no free segment"),
            JournalError::Io(error) => write!(f, "journal I/O failed: {error}"),
        }
    }
}

struct Batch {
    metadata: Vec<u8>,
    /// (byte offset of an extent delta's physical field in `metadata`, first data block index)
    patches: Vec<(usize, u32)>,
    data: Vec<IoVec>,
    data_blocks: u32,
    data_crc: u32,
    /// The cleaner's copies: written to the cold head, not after the record's head. Patches
    /// index the cold run's blocks.
    cold_patches: Vec<(usize, u32)>,
    cold: Vec<IoVec>,
    cold_blocks: u32,
    cold_crc: u32,
    delta_count: u32,
    tags: Vec<u64>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            metadata: Vec::with_capacity(BATCH_METADATA_MAX_BYTES),
            patches: Vec::with_capacity(BATCH_OPS_MAX * 4),
            data: Vec::with_capacity(RECORD_DATA_BLOCKS_MAX as usize),
            data_blocks: 0,
            data_crc: 0,
            cold_patches: Vec::with_capacity(BATCH_OPS_MAX * 4),
            cold: Vec::with_capacity(RECORD_DATA_BLOCKS_MAX as usize),
            cold_blocks: 0,
            cold_crc: 0,
            delta_count: 0,
            tags: Vec::with_capacity(BATCH_OPS_MAX),
        }
    }

    fn clear(&mut self) {
        self.metadata.clear();
        self.patches.clear();
        self.data.clear();
        self.data_blocks = 0;
        self.data_crc = 0;
        self.cold_patches.clear();
        self.cold.clear();
        self.cold_blocks = 0;
        self.cold_crc = 0;
        self.delta_count = 0;
        self.tags.clear();
    }

    /// Data blocks of the record, wherever they go.
    fn all_blocks(&self) -> u32 {
        self.data_blocks + self.cold_blocks
    }
}

/// A write of a record in flight that the queue pair has not accepted yet.
#[derive(Clone, Copy)]
struct PendingWrite {
    offset: u64,
    /// Index into `Journal::write_iovecs`.
    first: usize,
    count: usize,
}

/// What one record in flight owns until it is retired: its head (header and deltas, which stay
/// here until the record is durable and they are applied), its writes, and its ops' tags.
/// One set per place in the flight queue, allocated once.
struct RecordBuffers {
    head: AlignedBuf,
    /// iovecs of the record: head, then data (a record may need several writes).
    write_iovecs: Vec<IoVec>,
    /// Its writes that the queue pair has not accepted yet.
    pending: Vec<PendingWrite>,
    /// The ops the record acknowledges.
    tags: Vec<u64>,
}

impl RecordBuffers {
    /// Cuts `write_iovecs[first..]` into writes of at most `IOVECS_PER_REQUEST_MAX` iovecs,
    /// back to back from `offset`; returns the offset after the last.
    fn queue_writes(&mut self, mut first: usize, mut offset: u64) -> u64 {
        while first < self.write_iovecs.len() {
            let count = (self.write_iovecs.len() - first).min(IOVECS_PER_REQUEST_MAX);
            self.pending.push(PendingWrite {
                offset,
                first,
                count,
            });
            offset += self.write_iovecs[first..first + count]
                .iter()
                .map(|v| v.len() as u64)
                .sum::<u64>();
            first += count;
        }
        offset
    }

    fn new() -> RecordBuffers {
        RecordBuffers {
            head: AlignedBuf::new(HEAD_BUFFER_BYTES),
            // Head, data, a cold segment's header and the cold run (at most
            // `RECORD_DATA_BLOCKS_MAX` data blocks in all: `record_data_blocks_max`).
            write_iovecs: Vec::with_capacity(3 + RECORD_DATA_BLOCKS_MAX as usize),
            pending: Vec::with_capacity(
                4 + RECORD_DATA_BLOCKS_MAX as usize / IOVECS_PER_REQUEST_MAX + 1,
            ),
            tags: Vec::with_capacity(BATCH_OPS_MAX),
        }
    }
}

struct InFlight {
    record_seq: u64,
    /// Index into `Journal::buffers`.
    buffers: usize,
    /// Length of the record's deltas, which stay in its buffers' head until it is durable.
    metadata_len: usize,
    /// When the record was sealed, its last write completed, and its flush was submitted
    /// (client records only: `RecordTimes`).
    sealed_at: Option<std::time::Instant>,
    written_at: Option<std::time::Instant>,
    flushing_at: Option<std::time::Instant>,
    writes_outstanding: u32,
    /// Whether the record ends with a flush. Only a checkpoint's inner records go without:
    /// nothing is acknowledged by them, and the checkpoint's last record flushes them all.
    flush: bool,
    flush_submitted: bool,
    /// The flush completed (or, without one, the writes did): every op in it is acknowledged.
    durable: bool,
    /// A checkpoint record: its deltas describe the metadata, they do not change it.
    checkpoint: bool,
    /// The segment header this flight writes (and flushes) names this replay start.
    names_replay_start: Option<(u64, u64)>,
    /// Not a record: a fresh segment's header, written and flushed before any record goes
    /// into that segment (see `Sealed::SegmentHeader`). It acknowledges nothing.
    segment_header_only: bool,
    /// Blocks of the record's cold run (the cleaner's copies), for stall reports and tests.
    cold_blocks: u32,
}

/// What `seal` put in flight.
enum Sealed {
    /// The batch, as the record with this (sequence number, device offset).
    Record(u64, u64),
    /// The batch did not fit the open segment, so a fresh segment's header went first, alone;
    /// the batch stays open (and may grow) until the header is durable.
    ///
    /// Why alone: a power cut keeps any subset of unflushed writes. Were a record written beside
    /// its segment's header, the record could survive while the header does not; the next
    /// mount cannot see that segment, hands out the same segment and record sequence numbers
    /// again, and a later torn write could then splice the stale record into the log
    /// (`carmine sim --seed 1250`). With the header durable first, every record on the device
    /// lies under a durable header, so the scan sees the newest sequence numbers in use.
    SegmentHeader,
}

/// What a segment of the shard is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentRole {
    /// Holds nothing anybody needs: the journal may open it.
    Free,
    /// Part of the log that replay reads (at or after the segment holding the replay start).
    Journal,
    /// Before the replay start: only its live data blocks matter. The cleaner empties these.
    /// A cold segment becomes one once the cleaner's head has left it and every record that
    /// wrote into it is retired (its moves applied).
    Data,
    /// The cleaner's log head (`Journal::cold`), or a cold segment it left whose records are
    /// still in flight: its blocks are not all counted live yet, so it is neither freed nor
    /// cleaned.
    Cold,
}

enum Checkpoint {
    Idle,
    /// Asked for: when no record is in flight, the store hands over a snapshot of its
    /// metadata (which then equals the state after every record written so far).
    Requested {
        urgent: bool,
    },
    /// Writing the snapshot as consecutive records; `start` is where the first one went.
    /// Once all are durable, the next segment header names `start`: at once in a fresh
    /// segment if `urgent` (space is short), else when the open segment fills (a roll
    /// would waste the rest of it). With `tree`, the extent tree's nodes go first, as the
    /// data blocks of records without deltas (`seal_node_record`), then the chunks (the
    /// onode table), the last one ending with `TreeRoot`; the nodes carry `generation`.
    Writing {
        chunks: VecDeque<Vec<u8>>,
        start: Option<(u64, u64)>,
        urgent: bool,
        tree: bool,
        generation: u64,
    },
}

struct OpenSegment {
    segment: u32,
    next_offset: u64,
    end: u64,
    segment_seq: u64,
}

/// Where a client record's time goes, summed over records: for a log line and for tuning
/// group commit (a record's cycle bounds the journal's records per second).
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordTimes {
    /// Client records that went through every phase.
    pub records: u64,
    /// Sealed until the last data write completed (as the store saw it).
    pub write_ns: u64,
    /// Last write completed until the flush was handed to the queue pair.
    pub write_to_flush_ns: u64,
    /// Flush handed over until its completion was seen.
    pub flush_ns: u64,
    /// Flush completion seen until the next record was sealed (acknowledging, then waiting
    /// for ops when the batch was empty), for records sealed with nothing in flight.
    pub durable_to_next_ns: u64,
    /// Client records sealed while the record before them was still in flight.
    pub overlapped: u64,
}

pub struct Journal {
    pub record_times: RecordTimes,
    /// When the last client record became durable (for `RecordTimes::durable_to_next_ns`).
    last_durable_at: Option<std::time::Instant>,
    sb: Superblock,
    shard: u32,
    free_segments: VecDeque<u32>,
    /// Role and header sequence number of every segment on the device (the shard's range only).
    roles: Vec<SegmentRole>,
    seqs: Vec<u64>,
    /// Journal segments, in log order.
    chain: VecDeque<u32>,
    /// The replay start new segment headers name, and the newest one a durable header names.
    replay_start_published: (u64, u64),
    /// A finished checkpoint waits for the next segment header to name it.
    publish_waiting: bool,
    /// ... and that header should come now: the next record opens a fresh segment.
    publish_now: bool,
    replay_start_durable: (u64, u64),
    checkpoint: Checkpoint,
    /// The client batch's place while a checkpoint or marker record is sealed.
    aux: Batch,
    /// A checkpoint record's node blocks (`CHECKPOINT_NODE_BLOCKS_MAX`), encoded when the
    /// record is sealed and written from here. Checkpoint records go one at a time, with
    /// nothing else in flight (`may_seal`), so one buffer serves them all.
    node_blocks: AlignedBuf,
    /// Extent-tree node blocks written by checkpoints (also in `checkpoint_bytes`).
    pub checkpoint_node_blocks: u64,
    pub checkpoints_written: u64,
    pub checkpoint_bytes: u64,
    open: Option<OpenSegment>,
    /// The cleaner's log head: the cold segment its copies go to, apart from the clients'
    /// writes, so that what the cleaner moved (cold, by having survived) gathers in segments
    /// of its own instead of being mixed again with hot writes. Opened when a record first
    /// needs it (after a mount too: a fresh one, never after a possibly torn run).
    cold: Option<OpenSegment>,
    /// Cold segments the head left, each with the first record that did not write into it:
    /// they become data segments once every record before that one is retired and
    /// `COLD_REUSE_RECORDS_AFTER` more records were sealed. Entries wait for records no older
    /// than the last few sealed, each of which opens at most one cold segment, plus one left
    /// by `leave_cold` (and after a mount, the cold segments of the log's last records).
    cold_left: VecDeque<(u32, u64)>,
    /// One header block per record buffer: a record that opens a cold segment writes its
    /// header in the same request as its cold run.
    cold_headers: AlignedBuf,
    pub cold_segments_opened: u64,
    next_record_seq: u64,
    next_segment_seq: u64,
    /// The newest segment header this writer knows durable (0: none since mount). Records go
    /// only under it.
    durable_segment_seq: u64,
    batch: Batch,
    /// Sealed records (or a segment header) on their way, oldest first; at most
    /// `RECORDS_IN_FLIGHT_MAX`, and more than one only for client records (`may_seal`).
    in_flight: VecDeque<InFlight>,
    /// One set per place in `in_flight`; a flight uses the one no other flight holds.
    buffers: [RecordBuffers; RECORDS_IN_FLIGHT_MAX],
    segment_header: AlignedBuf,
    failed: Option<IoError>,
    /// Free segments that ops may not take (the cleaner's working room).
    pub reserve_segments: usize,
    pub records_written: u64,
    pub bytes_written: u64,
}

/// Appends one op to the open batch; dropped without `commit`, it takes back what it added.
pub struct OpAppender<'a> {
    journal: &'a mut Journal,
    metadata_mark: usize,
    patches_mark: usize,
    data_mark: usize,
    data_blocks_mark: u32,
    data_crc_mark: u32,
    cold_patches_mark: usize,
    cold_mark: usize,
    cold_blocks_mark: u32,
    cold_crc_mark: u32,
    delta_count_mark: u32,
    committed: bool,
}

impl OpAppender<'_> {
    fn batch(&mut self) -> &mut Batch {
        &mut self.journal.batch
    }

    pub fn delta(&mut self, delta: &Delta<'_>) -> Result<(), JournalError> {
        let before = self.batch().metadata.len();
        delta.encode(&mut self.journal.batch.metadata);
        if self.batch().metadata.len() > BATCH_METADATA_MAX_BYTES {
            self.batch().metadata.truncate(before);
            return Err(JournalError::BatchFull);
        }
        self.batch().delta_count += 1;
        Ok(())
    }

    /// Journals `data` (a whole number of 4 KiB blocks, `crcs` one per block) as logical
    /// blocks starting at `logical_offset` of `oid`.
    ///
    /// # Safety
    /// The memory behind `data` stays valid and unmodified until this op's completion is
    /// reported (the journal writes it by reference).
    pub unsafe fn extent(
        &mut self,
        oid: &[u8],
        logical_offset: u64,
        data: IoVec,
        crcs: &[u32],
    ) -> Result<(), JournalError> {
        self.data_extent(data, crcs, false, |metadata| {
            encode_extent_map(metadata, oid, logical_offset, 0, crcs)
        })
    }

    /// Journals a copy the cleaner made: `data` holds blocks read from device offset `from`,
    /// to live again at the place the record gives them (`Delta::ExtentMove`). `crcs` are the
    /// crc32c of the bytes as read (for the record's data crc; the metadata keeps its own).
    ///
    /// # Safety
    /// As `extent`: `data` stays valid and unmodified until the op's completion is reported.
    ///
    /// `to_cold`: the data goes to the cleaner's head (cold segments); else after the
    /// record's head, as client data does.
    pub unsafe fn moved_extent(
        &mut self,
        oid: &[u8],
        logical_offset: u64,
        from: u64,
        data: IoVec,
        crcs: &[u32],
        to_cold: bool,
    ) -> Result<(), JournalError> {
        let blocks = crcs.len() as u32;
        self.data_extent(data, crcs, to_cold, |metadata| {
            encode_extent_move(metadata, oid, logical_offset, from, blocks)
        })
    }

    /// Adds `data` to the batch with the delta `encode` appends (returning the offset of the
    /// delta's physical address, patched when the record is placed). `cold`: the data goes
    /// to the cleaner's head (`Journal::cold`), not after the record's head.
    fn data_extent(
        &mut self,
        data: IoVec,
        crcs: &[u32],
        cold: bool,
        encode: impl FnOnce(&mut Vec<u8>) -> usize,
    ) -> Result<(), JournalError> {
        let blocks = (data.len() / BLOCK_SIZE_BYTES as usize) as u32;
        assert!(
            data.len() % BLOCK_SIZE_BYTES as usize == 0
                && blocks as usize == crcs.len()
                && blocks > 0
        );
        let data_blocks_max = self.journal.record_data_blocks_max();
        let batch = &mut self.journal.batch;
        let iovecs_full = if cold {
            batch.cold.len() == batch.cold.capacity()
        } else {
            batch.data.len() == batch.data.capacity()
        };
        if batch.all_blocks() + blocks > data_blocks_max || iovecs_full {
            return Err(JournalError::BatchFull);
        }
        let before = batch.metadata.len();
        let physical_field = encode(&mut batch.metadata);
        if batch.metadata.len() > BATCH_METADATA_MAX_BYTES {
            batch.metadata.truncate(before);
            return Err(JournalError::BatchFull);
        }
        batch.delta_count += 1;
        if cold {
            batch.cold_patches.push((physical_field, batch.cold_blocks));
            batch.cold.push(data);
            for &crc in crcs {
                batch.cold_crc = record_data_crc_append(batch.cold_crc, crc);
            }
            batch.cold_blocks += blocks;
        } else {
            batch.patches.push((physical_field, batch.data_blocks));
            batch.data.push(data);
            for &crc in crcs {
                batch.data_crc = record_data_crc_append(batch.data_crc, crc);
            }
            batch.data_blocks += blocks;
        }
        Ok(())
    }

    /// Whether the batch, with what this op added, has a place on the device. Clients keep
    /// off the journal's reserve: they write while at least `reserve_segments` segments are
    /// free, and open one only if more are. Removes and the cleaner (`may_use_reserve`) may
    /// write into it, and open any free segment but the last, which stays for the replay after
    /// a crash (a journal with no segment to open could not even log a remove). A batch that
    /// passes this for its last op never fails to seal for lack of space.
    ///
    /// `BatchFull` when the ops before this one fit the open segment and this one does not:
    /// they go there first, and this op waits for the next record, so that a big op never
    /// rolls the journal past a tail that smaller ones could fill.
    ///
    /// The cleaner's copies need room in the cold head as well (`Journal::cold`): a batch
    /// may need two fresh segments, one per head, and then passes only if both can be
    /// opened. A copy that overflows the cold tail waits for the next record only if copies
    /// before it in this batch use that tail (else waiting would not help: clients never
    /// write there).
    pub fn placement(&self, may_use_reserve: bool) -> Result<(), JournalError> {
        let journal = &*self.journal;
        let batch = &journal.batch;
        let free = journal.free_segments.len();
        let (keep_in_tail, keep_to_open) = if may_use_reserve {
            (0, 1)
        } else {
            (journal.reserve_segments, journal.reserve_segments)
        };
        let client_fits = journal.fits_open_segment(batch.metadata.len(), batch.data_blocks);
        let cold_fits = journal.fits_cold(batch.cold_blocks);
        if client_fits && cold_fits {
            return if free >= keep_in_tail {
                Ok(())
            } else {
                Err(JournalError::NoSpace)
            };
        }
        let before_fits = journal.fits_open_segment(self.metadata_mark, self.data_blocks_mark)
            && journal.fits_cold(self.cold_blocks_mark);
        if !batch.tags.is_empty() && before_fits && (!client_fits || self.cold_blocks_mark > 0) {
            return Err(JournalError::BatchFull);
        }
        let fresh = usize::from(!client_fits) + usize::from(!cold_fits);
        if free >= keep_to_open + fresh {
            Ok(())
        } else {
            Err(JournalError::NoSpace)
        }
    }

    /// The op's completion will be reported under `tag` once its record is durable.
    pub fn commit(mut self, tag: u64) {
        assert_eq!(
            tag & JOURNAL_TAG_BIT,
            0,
            "op tags must not use the journal's bit"
        );
        self.journal.batch.tags.push(tag);
        self.committed = true;
    }
}

impl Drop for OpAppender<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let (metadata, patches, data) = (self.metadata_mark, self.patches_mark, self.data_mark);
            let batch = &mut self.journal.batch;
            batch.metadata.truncate(metadata);
            batch.patches.truncate(patches);
            batch.data.truncate(data);
            batch.data_blocks = self.data_blocks_mark;
            batch.data_crc = self.data_crc_mark;
            batch.cold_patches.truncate(self.cold_patches_mark);
            batch.cold.truncate(self.cold_mark);
            batch.cold_blocks = self.cold_blocks_mark;
            batch.cold_crc = self.cold_crc_mark;
            batch.delta_count = self.delta_count_mark;
        }
    }
}

impl Journal {
    /// The buffers every record write uses (the heads: header and deltas; the segment
    /// header; a checkpoint's node blocks), to register for DMA once.
    pub fn dma_regions(&mut self) -> [(*mut u8, usize); RECORDS_IN_FLIGHT_MAX + 3] {
        let [first, second] = &mut self.buffers;
        [
            first.head.region(),
            second.head.region(),
            self.segment_header.region(),
            self.node_blocks.region(),
            self.cold_headers.region(),
        ]
    }

    /// A writer continuing `log` (from `scan_shard`). It always opens a fresh segment: nothing is
    /// ever appended after a possibly torn tail. `live_blocks` (per segment, from the replayed
    /// metadata) tells which segments before the replay start still hold data.
    pub fn new(sb: Superblock, shard: u32, log: &ShardLog, live_blocks: &[u32]) -> Journal {
        let count = sb.segment_count as usize;
        let mut roles = vec![SegmentRole::Free; count];
        let mut seqs = vec![0; count];
        let mut chain = VecDeque::with_capacity(count);
        for header in &log.segments {
            roles[header.segment as usize] = SegmentRole::Journal;
            seqs[header.segment as usize] = header.segment_seq;
            chain.push_back(header.segment);
        }
        for header in &log.data_segments {
            seqs[header.segment as usize] = header.segment_seq;
            if live_blocks[header.segment as usize] > 0 {
                roles[header.segment as usize] = SegmentRole::Data;
            }
        }
        // Cold segments the log's last records wrote into stay unfreeable until enough new
        // records follow (`COLD_REUSE_RECORDS_AFTER`), whatever their live count: a crash
        // soon after this mount checks those records' cold runs again.
        let mut cold_left = VecDeque::with_capacity(COLD_LEFT_MAX);
        for record in &log.records {
            if record.header.cold_blocks == 0
                || record.header.record_seq + COLD_REUSE_RECORDS_AFTER < log.next_record_seq
            {
                continue;
            }
            let segment = sb
                .segment_at(record.header.cold_offset)
                .expect("the scan checked the cold run");
            if roles[segment as usize] == SegmentRole::Journal {
                // Reused as a journal segment: impossible under the reuse rule (it needs
                // records this log does not have yet); nothing to protect then.
                debug_assert!(
                    false,
                    "segment {segment} holds a recent cold run and the log"
                );
                continue;
            }
            roles[segment as usize] = SegmentRole::Cold;
            cold_left.retain(|&(s, _)| s != segment);
            assert!(cold_left.len() < cold_left.capacity());
            cold_left.push_back((segment, record.header.record_seq + 1));
        }
        let free_segments = sb
            .shard_segments(shard)
            .filter(|&s| roles[s as usize] == SegmentRole::Free)
            .collect();
        Journal {
            record_times: RecordTimes::default(),
            last_durable_at: None,
            sb,
            shard,
            free_segments,
            roles,
            seqs,
            chain,
            replay_start_published: log.replay_start,
            publish_waiting: false,
            publish_now: false,
            replay_start_durable: log.replay_start,
            checkpoint: Checkpoint::Idle,
            aux: Batch::new(),
            node_blocks: AlignedBuf::new(CHECKPOINT_NODE_BLOCKS_MAX * BLOCK_SIZE_BYTES as usize),
            checkpoint_node_blocks: 0,
            checkpoints_written: 0,
            checkpoint_bytes: 0,
            open: None,
            cold: None,
            cold_left,
            cold_headers: AlignedBuf::new(RECORDS_IN_FLIGHT_MAX * BLOCK_SIZE_BYTES as usize),
            cold_segments_opened: 0,
            next_record_seq: log.next_record_seq,
            next_segment_seq: log.next_segment_seq + mount_segment_seq_gap(&sb, shard),
            durable_segment_seq: 0,
            batch: Batch::new(),
            in_flight: VecDeque::with_capacity(RECORDS_IN_FLIGHT_MAX),
            buffers: std::array::from_fn(|_| RecordBuffers::new()),
            segment_header: AlignedBuf::new(BLOCK_SIZE_BYTES as usize),
            failed: None,
            reserve_segments: 0,
            records_written: 0,
            bytes_written: 0,
        }
    }

    /// Blocks left in the open segment (0 when none is open).
    pub fn open_tail_blocks(&self) -> u64 {
        self.open
            .as_ref()
            .map_or(0, |open| (open.end - open.next_offset) / BLOCK_SIZE_BYTES)
    }

    /// Blocks left in the cleaner's head (0 when none is open).
    pub fn cold_tail_blocks(&self) -> u64 {
        self.cold
            .as_ref()
            .map_or(0, |cold| (cold.end - cold.next_offset) / BLOCK_SIZE_BYTES)
    }

    /// Whether `blocks` copies fit what is left of the cleaner's head (none always fit).
    fn fits_cold(&self, blocks: u32) -> bool {
        blocks == 0 || u64::from(blocks) <= self.cold_tail_blocks()
    }

    /// Whether a record of `metadata_len` bytes of deltas and `data_blocks` fits what is left
    /// of the open segment.
    fn fits_open_segment(&self, metadata_len: usize, data_blocks: u32) -> bool {
        let head_bytes = (RECORD_HEADER_SIZE_BYTES + metadata_len) as u64;
        let record_bytes = head_bytes.next_multiple_of(BLOCK_SIZE_BYTES)
            + u64::from(data_blocks) * BLOCK_SIZE_BYTES;
        self.open
            .as_ref()
            .is_some_and(|open| open.next_offset + record_bytes <= open.end)
    }

    pub fn role(&self, segment: u32) -> SegmentRole {
        self.roles[segment as usize]
    }

    /// The header sequence number of the segment's current (or last) life; 0 if never opened.
    pub fn segment_seq(&self, segment: u32) -> u64 {
        self.seqs[segment as usize]
    }

    pub fn next_segment_seq(&self) -> u64 {
        self.next_segment_seq
    }

    /// Journal segments (what replay reads, and what a checkpoint would retire).
    pub fn chain_len(&self) -> usize {
        self.chain.len()
    }

    /// Journal segments in log order, the open one last.
    pub fn chain(&self) -> std::collections::vec_deque::Iter<'_, u32> {
        self.chain.iter()
    }

    /// The cleaner emptied a data segment: the journal may open it again.
    pub fn release(&mut self, segment: u32) {
        assert_eq!(
            self.roles[segment as usize],
            SegmentRole::Data,
            "only a data segment is released"
        );
        self.roles[segment as usize] = SegmentRole::Free;
        self.free_segments.push_back(segment);
    }

    /// Records (or a segment header) sealed and not yet retired.
    pub fn records_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A journal write or flush failed: nothing more will be acknowledged.
    pub fn has_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// What the journal is doing, for stall reports.
    pub fn debug_state(&self) -> String {
        format!(
            "records in flight (seq, writes, flush, flush submitted, durable, pending writes, cold blocks) {:?}; batch {} ops {} data blocks {} cold; open segment room {:?}; cold head room {:?}; failed {:?}",
            self.in_flight
                .iter()
                .map(|f| (
                    f.record_seq,
                    f.writes_outstanding,
                    f.flush,
                    f.flush_submitted,
                    f.durable,
                    self.buffers[f.buffers].pending.len(),
                    f.cold_blocks,
                ))
                .collect::<Vec<_>>(),
            self.batch.tags.len(),
            self.batch.data_blocks,
            self.batch.cold_blocks,
            self.open.as_ref().map(|o| (o.end - o.next_offset) / BLOCK_SIZE_BYTES),
            self.cold.as_ref().map(|o| (o.end - o.next_offset) / BLOCK_SIZE_BYTES),
            self.failed,
        )
    }

    /// No checkpoint is asked for, being written, waiting to be named by a header, or named
    /// by a header not yet durable.
    pub fn checkpoint_idle(&self) -> bool {
        matches!(self.checkpoint, Checkpoint::Idle)
            && !self.publish_waiting
            && self.replay_start_published == self.replay_start_durable
    }

    /// A checkpoint is asked for or being written (I/O to come, unlike a waiting publish).
    pub fn checkpoint_in_progress(&self) -> bool {
        !matches!(self.checkpoint, Checkpoint::Idle)
    }

    /// A written checkpoint waits for the open segment to fill before a header names it.
    pub fn publish_waiting(&self) -> bool {
        self.publish_waiting
    }

    /// Names the waiting checkpoint now, in a fresh segment (space is short: the journal
    /// segments before it should become cleanable).
    pub fn publish_now(&mut self) {
        if self.publish_waiting {
            self.publish_now = true;
        }
    }

    /// Asks for a checkpoint: once written and named by a durable segment header, every
    /// journal segment before it becomes a data segment the cleaner can empty. `urgent`:
    /// name it in a fresh segment at once rather than when the open one fills.
    pub fn request_checkpoint(&mut self, urgent: bool) {
        if self.checkpoint_idle() {
            self.checkpoint = Checkpoint::Requested { urgent };
        }
    }

    /// The journal waits for the store's snapshot (`begin_checkpoint`): nothing is in flight,
    /// so the store's metadata is the state after every record written.
    pub fn wants_snapshot(&self) -> bool {
        matches!(self.checkpoint, Checkpoint::Requested { .. }) && self.in_flight.is_empty()
    }

    /// The snapshot, as delta chunks of at most `CHECKPOINT_CHUNK_MAX_BYTES` each. With
    /// `tree`, the chunks are the onode table only and the extent tree's nodes go first:
    /// the caller passes them to every `advance_with` until the checkpoint is written, and
    /// the last record names the root (`TreeRoot`). Without, the chunks are the whole dump.
    /// Returns the checkpoint's generation: the number of its first record, which the
    /// header that names it will carry as the replay start (`replay_start_durable().0`).
    pub fn begin_checkpoint(&mut self, chunks: Vec<Vec<u8>>, tree: bool) -> u64 {
        assert!(self.wants_snapshot());
        assert!(!chunks.is_empty(), "a checkpoint ends with ObjectIdNext");
        assert!(chunks.iter().all(|c| c.len() <= CHECKPOINT_CHUNK_MAX_BYTES));
        let Checkpoint::Requested { urgent } = self.checkpoint else {
            unreachable!("checked by wants_snapshot");
        };
        self.checkpoint = Checkpoint::Writing {
            chunks: chunks.into(),
            start: None,
            urgent,
            tree,
            // Nothing is in flight: the checkpoint's first record gets this number. Records
            // are numbered in log order, so a later checkpoint's nodes have a higher one.
            generation: self.next_record_seq,
        };
        self.next_record_seq
    }

    /// The newest checkpoint start (record seq, device offset) a durable header names.
    pub fn replay_start_durable(&self) -> (u64, u64) {
        self.replay_start_durable
    }

    /// A checkpoint that writes the extent tree's nodes is being written: the caller must
    /// pass them to `advance_with`.
    pub fn writing_tree(&self) -> bool {
        matches!(self.checkpoint, Checkpoint::Writing { tree: true, .. })
    }

    fn record_data_blocks_max(&self) -> u32 {
        let segment_blocks = (self.sb.segment_size / BLOCK_SIZE_BYTES) as u32;
        let head_blocks_max = (HEAD_BUFFER_BYTES as u64 / BLOCK_SIZE_BYTES) as u32;
        RECORD_DATA_BLOCKS_MAX.min(segment_blocks - 1 - head_blocks_max)
    }

    pub fn free_segment_count(&self) -> usize {
        self.free_segments.len()
    }

    /// Opens an op in the batch. `BatchFull` when the batch has as many ops as a record takes.
    pub fn append(&mut self) -> Result<OpAppender<'_>, JournalError> {
        if let Some(error) = self.failed {
            return Err(JournalError::Io(error));
        }
        if self.batch.tags.len() == BATCH_OPS_MAX {
            return Err(JournalError::BatchFull);
        }
        Ok(OpAppender {
            metadata_mark: self.batch.metadata.len(),
            patches_mark: self.batch.patches.len(),
            data_mark: self.batch.data.len(),
            data_blocks_mark: self.batch.data_blocks,
            data_crc_mark: self.batch.data_crc,
            cold_patches_mark: self.batch.cold_patches.len(),
            cold_mark: self.batch.cold.len(),
            cold_blocks_mark: self.batch.cold_blocks,
            cold_crc_mark: self.batch.cold_crc,
            delta_count_mark: self.batch.delta_count,
            committed: false,
            journal: self,
        })
    }

    /// Whether the open batch takes no more client ops for now: no record is in flight and
    /// it holds `LONE_BATCH_DATA_BLOCKS_MAX` data blocks, so the next `pump` seals it and
    /// the ops after it make the record that goes beside it. Cleaner copies are not held
    /// back (they are how space comes back).
    pub fn client_batch_closed(&self) -> bool {
        self.in_flight.is_empty() && self.batch.data_blocks >= LONE_BATCH_DATA_BLOCKS_MAX
    }

    /// Hands the journal a completion whose tag has `JOURNAL_TAG_BIT` set.
    ///
    /// Each record is made durable by its own flush, submitted once all its writes completed
    /// (a flush covers only writes completed before it was submitted). A later record's flush
    /// may complete first; it then waits, durable, until every record before it is retired.
    pub fn complete_io(&mut self, tag: u64, result: Result<(), IoError>) {
        assert_ne!(tag & JOURNAL_TAG_BIT, 0);
        let record_seq = (tag & !JOURNAL_TAG_BIT) >> 1;
        let in_flight = self
            .in_flight
            .iter_mut()
            .find(|f| f.record_seq == record_seq)
            .expect("journal completions come for a record in flight");
        let pending_empty = self.buffers[in_flight.buffers].pending.is_empty();
        if let Err(error) = result {
            self.failed.get_or_insert(error);
        }
        if tag & TAG_FLUSH != 0 {
            debug_assert!(in_flight.flush_submitted && in_flight.writes_outstanding == 0);
            in_flight.durable = true;
            if in_flight.segment_header_only {
                return;
            }
            let now = std::time::Instant::now();
            if let (Some(sealed), Some(written), Some(flushing)) = (
                in_flight.sealed_at,
                in_flight.written_at,
                in_flight.flushing_at,
            ) {
                let t = &mut self.record_times;
                t.records += 1;
                t.write_ns += (written - sealed).as_nanos() as u64;
                t.write_to_flush_ns += (flushing - written).as_nanos() as u64;
                t.flush_ns += (now - flushing).as_nanos() as u64;
            }
            self.last_durable_at = Some(now);
        } else {
            in_flight.writes_outstanding -= 1;
            if in_flight.writes_outstanding == 0
                && in_flight.flush
                && pending_empty
                && !in_flight.segment_header_only
            {
                in_flight.written_at = Some(std::time::Instant::now());
            }
            if in_flight.writes_outstanding == 0 && !in_flight.flush && pending_empty {
                in_flight.durable = true;
            }
        }
    }

    /// Moves the journal forward: submits what the queue pair can take, acknowledges durable
    /// records (reported through `done`), and seals the next record. Never blocks.
    ///
    /// `durable` sees each record's deltas once the record is durable, before its ops are
    /// acknowledged, in record order: the store applies them to its metadata there, so that
    /// what it knows is exactly what replay would rebuild. (Checkpoint records are not passed:
    /// they describe the metadata rather than change it.)
    pub fn pump(
        &mut self,
        qp: &mut dyn QueuePair,
        durable: &mut dyn FnMut(&[u8]),
        done: &mut dyn FnMut(u64, Result<(), JournalError>),
    ) -> usize {
        self.retire(durable, done) + self.advance(qp, done)
    }

    /// The first half of `pump`: while the oldest record in flight is durable, passes its
    /// deltas to `durable` and acknowledges its ops through `done`. A durable record behind a
    /// record that is not stays: acknowledgements go strictly in record order, since replay
    /// stops at the first torn record and would drop every record after it. Seals nothing, so
    /// that a caller can start the ops those acknowledgements unblock (the next write to the
    /// same object) and have them join the very next record rather than the one after it.
    pub fn retire(
        &mut self,
        durable: &mut dyn FnMut(&[u8]),
        done: &mut dyn FnMut(u64, Result<(), JournalError>),
    ) -> usize {
        let mut work = 0;
        while self.in_flight.front().is_some_and(|r| r.durable) {
            let in_flight = self.in_flight.pop_front().expect("checked");
            work += self.retire_one(&in_flight, durable, done);
            self.settle_cold_left();
        }
        work
    }

    /// The cleaner's head leaves its segment, with no copy waiting in the batch for it: space
    /// is short and no victim is usable, and the head's unwritten tail is room nothing else
    /// can use. Left, the segment becomes a data segment (once the records that wrote into it
    /// are retired) whose tail counts as dead, so the cleaner can pick it; the next copy
    /// opens a fresh cold segment.
    pub fn leave_cold(&mut self) {
        assert_eq!(self.batch.cold_blocks, 0, "no copy waits for the cold tail");
        if let Some(left) = self.cold.take() {
            assert!(self.cold_left.len() < self.cold_left.capacity());
            self.cold_left
                .push_back((left.segment, self.next_record_seq));
            self.settle_cold_left();
        }
    }

    /// Whether a record with a cold run is in flight.
    pub fn cold_run_in_flight(&self) -> bool {
        self.in_flight.iter().any(|f| f.cold_blocks > 0)
    }

    /// Whether copies in the open batch wait for the cold head.
    pub fn batch_has_cold(&self) -> bool {
        self.batch.cold_blocks > 0
    }

    /// Cold segments the cleaner's head left become data segments once every record that
    /// wrote into them is retired: their moves are applied, so their live count is whole and
    /// the sweep may free them or the cleaner pick them.
    fn settle_cold_left(&mut self) {
        while let Some(&(segment, first_not_in)) = self.cold_left.front() {
            if self.next_record_seq < first_not_in + COLD_REUSE_RECORDS_AFTER
                || self
                    .in_flight
                    .iter()
                    .any(|f| !f.segment_header_only && f.record_seq < first_not_in)
            {
                break;
            }
            self.cold_left.pop_front();
            debug_assert_eq!(self.roles[segment as usize], SegmentRole::Cold);
            self.roles[segment as usize] = SegmentRole::Data;
        }
    }

    fn retire_one(
        &mut self,
        in_flight: &InFlight,
        durable: &mut dyn FnMut(&[u8]),
        done: &mut dyn FnMut(u64, Result<(), JournalError>),
    ) -> usize {
        let result = self.failed.map_or(Ok(()), |e| Err(JournalError::Io(e)));
        let buffers = &mut self.buffers[in_flight.buffers];
        debug_assert!(buffers.pending.is_empty() && in_flight.writes_outstanding == 0);
        if in_flight.segment_header_only {
            debug_assert!(
                buffers.tags.is_empty(),
                "a segment header acknowledges nothing"
            );
            if result.is_ok() {
                let open = self.open.as_ref().expect("the header's segment is open");
                self.durable_segment_seq = open.segment_seq;
                if let Some(start) = in_flight.names_replay_start {
                    self.advance_replay_start(start);
                }
            }
            return 1;
        }
        if result.is_ok() {
            if !in_flight.checkpoint {
                durable(&buffers.head[RECORD_HEADER_SIZE_BYTES..][..in_flight.metadata_len]);
            }
            if let Some(start) = in_flight.names_replay_start {
                self.advance_replay_start(start);
            }
        }
        let buffers = &mut self.buffers[in_flight.buffers];
        for &tag in &buffers.tags {
            done(tag, result);
        }
        let work = buffers.tags.len() + 1;
        // The vector keeps its capacity for the next record that uses these buffers.
        buffers.tags.clear();
        work
    }

    /// The second half of `pump`: submits what the queue pair can take of the records in
    /// flight and, when there is room (`may_seal`), seals the next record and submits it.
    /// Ops of a batch that cannot be sealed are failed through `done`.
    pub fn advance(
        &mut self,
        qp: &mut dyn QueuePair,
        done: &mut dyn FnMut(u64, Result<(), JournalError>),
    ) -> usize {
        self.advance_with(qp, &mut NoNodes, done)
    }

    /// `advance`, with the nodes of a checkpoint that writes the extent tree
    /// (`writing_tree`): a checkpoint record sealed now takes its node blocks from `nodes`.
    pub fn advance_with(
        &mut self,
        qp: &mut dyn QueuePair,
        nodes: &mut dyn CheckpointNodes,
        done: &mut dyn FnMut(u64, Result<(), JournalError>),
    ) -> usize {
        let mut work = 0;
        for index in 0..self.in_flight.len() {
            work += self.submit_pending(qp, index);
        }
        if self.in_flight.front().is_some_and(|r| r.durable) {
            // `retire` first: a durable record is acknowledged before the next seals.
            return work;
        }
        if !self.may_seal() {
            return work;
        }
        match self.next_record(nodes) {
            Ok(true) => work + self.submit_pending(qp, self.in_flight.len() - 1),
            Ok(false) => work,
            Err(error) => {
                for &tag in &self.batch.tags {
                    done(tag, Err(error));
                }
                work += self.batch.tags.len();
                self.batch.clear();
                work
            }
        }
    }

    /// Whether the next record may be sealed now. With nothing in flight, always. Beside a
    /// record in flight, only a client record behind client records that fits the open
    /// segment and is big enough (`OVERLAP_DATA_BLOCKS_PER_HEAD_BLOCK_MIN`): checkpoint records, publishing a checkpoint and opening a segment (its header
    /// must be durable before any record goes into it) wait until nothing is in flight. Those
    /// are rare (one segment switch per segment), and draining keeps their rules as they were
    /// with one record in flight: the snapshot equals the state after every record written,
    /// and no record lies beside its segment's header.
    fn may_seal(&self) -> bool {
        if self.in_flight.is_empty() {
            return true;
        }
        let head_blocks = (RECORD_HEADER_SIZE_BYTES + self.batch.metadata.len())
            .div_ceil(BLOCK_SIZE_BYTES as usize) as u32;
        self.in_flight.len() < RECORDS_IN_FLIGHT_MAX
            && self.failed.is_none()
            && matches!(self.checkpoint, Checkpoint::Idle)
            && !self.publish_now
            && !self.batch.tags.is_empty()
            && self
                .in_flight
                .iter()
                .all(|f| f.flush && !f.checkpoint && !f.segment_header_only)
            && self.batch.all_blocks() >= OVERLAP_DATA_BLOCKS_PER_HEAD_BLOCK_MIN * head_blocks
            && self.fits_open_segment(self.batch.metadata.len(), self.batch.data_blocks)
    }

    /// Seals what goes next, if anything: a checkpoint record, the record that publishes a
    /// finished checkpoint, or the client batch.
    fn next_record(&mut self, nodes: &mut dyn CheckpointNodes) -> Result<bool, JournalError> {
        match std::mem::replace(&mut self.checkpoint, Checkpoint::Idle) {
            Checkpoint::Idle => {
                if self.publish_now {
                    self.publish_now = false;
                    if self.publish_waiting {
                        return self.publish_in_fresh_segment();
                    }
                }
            }
            // The store's snapshot comes first; client records wait for it.
            requested @ Checkpoint::Requested { .. } => {
                self.checkpoint = requested;
                return Ok(false);
            }
            Checkpoint::Writing {
                mut chunks,
                mut start,
                urgent,
                tree,
                generation,
            } => {
                if tree && nodes.remaining() > 0 {
                    // On failure the checkpoint is abandoned (back to Idle), as below; the
                    // journal has failed for good then (`failed`), so nothing is written again.
                    if let Some(at) = self.seal_node_record(nodes, generation)? {
                        debug_assert!(start.is_some() || at.0 == generation);
                        start.get_or_insert(at);
                    }
                    self.checkpoint = Checkpoint::Writing {
                        chunks,
                        start,
                        urgent,
                        tree,
                        generation,
                    };
                    return Ok(true);
                }
                if let Some(chunk) = chunks.pop_front() {
                    let last = chunks.is_empty();
                    std::mem::swap(&mut self.batch, &mut self.aux);
                    self.batch.metadata.extend_from_slice(&chunk);
                    self.batch.delta_count =
                        crate::segment::format::DeltaReader::new(&chunk).count() as u32;
                    if last && tree {
                        // After ObjectIdNext, every node written: replay loads the tree from
                        // here once the onodes it belongs to exist.
                        let before = self.batch.metadata.len();
                        nodes.root(generation).encode(&mut self.batch.metadata);
                        debug_assert_eq!(self.batch.metadata.len() - before, TREE_ROOT_DELTA_BYTES);
                        self.batch.delta_count += 1;
                    }
                    let flags =
                        RECORD_FLAG_CHECKPOINT | if last { RECORD_FLAG_CHECKPOINT_END } else { 0 };
                    let sealed = self.seal(flags, last);
                    std::mem::swap(&mut self.batch, &mut self.aux);
                    self.aux.clear();
                    // On failure the checkpoint is abandoned (back to Idle); the store asks again.
                    let at = match sealed? {
                        Sealed::Record(seq, offset) => (seq, offset),
                        Sealed::SegmentHeader => {
                            // The chunk goes in the next record, once the header is durable.
                            chunks.push_front(chunk);
                            self.checkpoint = Checkpoint::Writing {
                                chunks,
                                start,
                                urgent,
                                tree,
                                generation,
                            };
                            return Ok(true);
                        }
                    };
                    self.in_flight.back_mut().expect("sealed").checkpoint = true;
                    debug_assert!(start.is_some() || at.0 == generation);
                    start.get_or_insert(at);
                    self.checkpoints_written += u64::from(last);
                    self.checkpoint_bytes += chunk.len() as u64;
                    self.checkpoint = Checkpoint::Writing {
                        chunks,
                        start,
                        urgent,
                        tree,
                        generation,
                    };
                    return Ok(true);
                }
                // Every checkpoint record is durable: the next segment header names it.
                self.replay_start_published = start.expect("a checkpoint has a record");
                self.publish_waiting = true;
                if urgent {
                    return self.publish_in_fresh_segment();
                }
            }
        }
        if self.batch.tags.is_empty() && !self.cold_left_waits_for_records() {
            return Ok(false);
        }
        // (An empty batch: a record with nothing in it, so a left cold segment does not wait
        // for client writes to become cleanable. Rare: only when the journal is otherwise idle.)
        self.seal(0, true)?;
        Ok(true)
    }

    /// A left cold segment waits only for more records to be sealed (nothing in flight).
    fn cold_left_waits_for_records(&self) -> bool {
        self.in_flight.is_empty()
            && self.cold_left.front().is_some_and(|&(_, first_not_in)| {
                self.next_record_seq < first_not_in + COLD_REUSE_RECORDS_AFTER
            })
    }

    /// Seals a checkpoint record whose data blocks are the next extent-tree nodes of `nodes`
    /// (as many as fit the open segment, the node buffer and a record), encoded at the
    /// addresses the record gives them. Returns where the record went, or `None` when the open
    /// segment has no room for a node: a fresh segment's header went instead (alone, as for
    /// any record), and the nodes follow in the next record.
    fn seal_node_record(
        &mut self,
        nodes: &mut dyn CheckpointNodes,
        generation: u64,
    ) -> Result<Option<(u64, u64)>, JournalError> {
        if let Some(error) = self.failed {
            return Err(JournalError::Io(error));
        }
        assert!(self.in_flight.is_empty(), "checkpoint records go alone");
        assert!(self.aux.tags.is_empty() && self.aux.metadata.is_empty());
        // A record without deltas: its head is the header alone.
        let head_blocks = RECORD_HEADER_SIZE_BYTES.div_ceil(BLOCK_SIZE_BYTES as usize) as u64;
        let tail_blocks = self
            .open
            .as_ref()
            .map_or(0, |open| (open.end - open.next_offset) / BLOCK_SIZE_BYTES);
        let count = nodes
            .remaining()
            .min(CHECKPOINT_NODE_BLOCKS_MAX)
            .min(self.record_data_blocks_max() as usize)
            .min(tail_blocks.saturating_sub(head_blocks) as usize);
        if count == 0 {
            self.open = None;
            self.start_segment()?;
            return Ok(None);
        }
        let open = self.open.as_ref().expect("room was found in it");
        let data_start = open.next_offset + head_blocks * BLOCK_SIZE_BYTES;
        std::mem::swap(&mut self.batch, &mut self.aux);
        let block_bytes = BLOCK_SIZE_BYTES as usize;
        for index in 0..count {
            let address = data_start + (index * block_bytes) as u64;
            let block = &mut self.node_blocks[index * block_bytes..][..block_bytes];
            nodes.write_next(address, generation, block);
            self.batch.data_crc =
                record_data_crc_append(self.batch.data_crc, carmine_crc::crc32c(block));
            // SAFETY: the node buffer belongs to the journal and is not touched again until
            // this record is durable: the next checkpoint record is sealed only with nothing
            // in flight (`may_seal`).
            self.batch
                .data
                .push(unsafe { self.node_blocks.io_vec_at(index * block_bytes, block_bytes) });
        }
        self.batch.data_blocks = count as u32;
        let sealed = self.seal(RECORD_FLAG_CHECKPOINT, false);
        std::mem::swap(&mut self.batch, &mut self.aux);
        self.aux.clear();
        let Sealed::Record(seq, offset) = sealed? else {
            unreachable!("the record was sized to fit the open segment");
        };
        assert_eq!(
            offset + head_blocks * BLOCK_SIZE_BYTES,
            data_start,
            "nodes were encoded where the record put them"
        );
        self.in_flight.back_mut().expect("sealed").checkpoint = true;
        self.checkpoint_node_blocks += count as u64;
        self.checkpoint_bytes += (count * block_bytes) as u64;
        Ok(Some((seq, offset)))
    }

    /// Publishes the waiting checkpoint in a fresh segment's header (written and flushed on
    /// its own; waiting clients go in the record after it).
    fn publish_in_fresh_segment(&mut self) -> Result<bool, JournalError> {
        self.open = None;
        self.start_segment()?;
        Ok(true)
    }

    /// A durable segment header names `start`: journal segments before the one holding it are
    /// no longer read by replay, so they become data segments.
    fn advance_replay_start(&mut self, start: (u64, u64)) {
        if start <= self.replay_start_durable {
            return;
        }
        self.replay_start_durable = start;
        let holder = self
            .sb
            .segment_at(start.1)
            .expect("a checkpoint lies on the device");
        while let Some(&front) = self.chain.front() {
            if front == holder {
                break;
            }
            self.chain.pop_front();
            self.roles[front as usize] = SegmentRole::Data;
        }
        assert_eq!(
            self.chain.front(),
            Some(&holder),
            "the checkpoint's segment is in the log"
        );
    }

    /// Submits what the queue pair takes of the writes of `in_flight[index]`, then its flush
    /// once every write of it completed.
    fn submit_pending(&mut self, qp: &mut dyn QueuePair, index: usize) -> usize {
        let in_flight = &mut self.in_flight[index];
        let buffers = &mut self.buffers[in_flight.buffers];
        let tag = JOURNAL_TAG_BIT | in_flight.record_seq << 1;
        let mut submitted = 0;
        while let Some(write) = buffers.pending.last().copied() {
            let iovecs = &buffers.write_iovecs[write.first..write.first + write.count];
            match qp.submit_write(write.offset, iovecs, tag) {
                Ok(()) => {
                    buffers.pending.pop();
                    submitted += 1;
                }
                Err(SubmitError::QueueFull) => return submitted,
                Err(error) => panic!("journal wrote a malformed request: {error}"),
            }
        }
        if in_flight.flush
            && in_flight.writes_outstanding == 0
            && !in_flight.flush_submitted
            && buffers.pending.is_empty()
        {
            match qp.submit_flush(tag | TAG_FLUSH) {
                Ok(()) => {
                    in_flight.flush_submitted = true;
                    submitted += 1;
                    if !in_flight.segment_header_only {
                        in_flight.flushing_at = Some(std::time::Instant::now());
                    }
                }
                Err(SubmitError::QueueFull) => {}
                Err(error) => panic!("flush refused: {error}"),
            }
        }
        submitted
    }

    /// The record buffers no flight holds.
    fn free_buffers(&self) -> usize {
        let index = (0..RECORDS_IN_FLIGHT_MAX)
            .find(|&i| self.in_flight.iter().all(|f| f.buffers != i))
            .expect("a free place in the flight queue");
        debug_assert!(
            self.buffers[index].tags.is_empty() && self.buffers[index].pending.is_empty()
        );
        index
    }

    /// Turns the batch into a record in flight: places it, patches addresses, encodes the
    /// head. When the batch does not fit the open segment, puts a fresh segment's header in
    /// flight instead and leaves the batch open (only with nothing in flight: `may_seal`).
    fn seal(&mut self, flags: u32, flush: bool) -> Result<Sealed, JournalError> {
        if let Some(error) = self.failed {
            return Err(JournalError::Io(error));
        }
        assert!(self.in_flight.len() < RECORDS_IN_FLIGHT_MAX);
        let overlaps = !self.in_flight.is_empty();
        let metadata_len = self.batch.metadata.len();
        let mut header = RecordHeader {
            nonce: self.sb.nonce(),
            shard: self.shard,
            record_seq: self.next_record_seq,
            segment_seq: 0,
            delta_count: self.batch.delta_count,
            metadata_len: metadata_len as u32,
            data_blocks: self.batch.data_blocks,
            data_crc: self.batch.data_crc,
            flags: flags | if overlaps { RECORD_FLAG_OVERLAPS } else { 0 },
            cold_offset: 0,
            cold_segment_seq: 0,
            cold_blocks: self.batch.cold_blocks,
            cold_crc: self.batch.cold_crc,
        };
        let record_bytes = u64::from(header.total_blocks()) * BLOCK_SIZE_BYTES;
        let needs_segment = self
            .open
            .as_ref()
            .is_none_or(|open| open.next_offset + record_bytes > open.end);
        if needs_segment {
            assert!(!overlaps, "a segment opens only with nothing in flight");
            self.start_segment()?;
            return Ok(Sealed::SegmentHeader);
        }
        let slot = self.free_buffers();
        let cold_opened = header.cold_blocks > 0 && !self.fits_cold(header.cold_blocks);
        if cold_opened {
            self.open_cold_segment(slot)?;
        }
        if header.cold_blocks > 0 {
            let cold = self.cold.as_ref().expect("open, and the run fits it");
            assert!(
                cold.next_offset + u64::from(header.cold_blocks) * BLOCK_SIZE_BYTES <= cold.end
            );
            header.cold_offset = cold.next_offset;
            header.cold_segment_seq = cold.segment_seq;
            for &(at, block_index) in &self.batch.cold_patches {
                let physical = header.cold_offset + u64::from(block_index) * BLOCK_SIZE_BYTES;
                self.batch.metadata[at..at + 8].copy_from_slice(&physical.to_le_bytes());
            }
        }
        let buffers = &mut self.buffers[slot];
        buffers.write_iovecs.clear();
        buffers.pending.clear();
        let open = self.open.as_mut().expect("checked above");
        assert!(
            self.durable_segment_seq >= open.segment_seq,
            "a record goes only under a durable segment header"
        );
        header.segment_seq = open.segment_seq;
        let record_offset = open.next_offset;
        let data_start = record_offset + u64::from(header.head_blocks()) * BLOCK_SIZE_BYTES;
        for &(at, block_index) in &self.batch.patches {
            let physical = data_start + u64::from(block_index) * BLOCK_SIZE_BYTES;
            self.batch.metadata[at..at + 8].copy_from_slice(&physical.to_le_bytes());
        }
        let head_len = header.head_blocks() as usize * BLOCK_SIZE_BYTES as usize;
        header.encode_head(&self.batch.metadata, &mut buffers.head[..head_len]);
        // SAFETY: the head belongs to these buffers, which no other flight uses, and is not
        // touched until the record is retired.
        let head_iovec = unsafe { buffers.head.io_vec_at(0, head_len) };
        // Head and data are contiguous on the device: one request covers both (and as much
        // data as a request's buffer list holds), so a small record costs one device write.
        debug_assert_eq!(record_offset + head_len as u64, data_start);
        buffers.write_iovecs.push(head_iovec);
        buffers.write_iovecs.extend_from_slice(&self.batch.data);
        let end = buffers.queue_writes(0, record_offset);
        debug_assert_eq!(end, record_offset + record_bytes);
        if header.cold_blocks > 0 {
            // The cold run (after its segment's header, when this record opened the segment:
            // one request, and the header is durable with the first record that needs it).
            let cold = self.cold.as_mut().expect("placed above");
            let cold_bytes = u64::from(header.cold_blocks) * BLOCK_SIZE_BYTES;
            let first = buffers.write_iovecs.len();
            let mut offset = header.cold_offset;
            if cold_opened {
                // SAFETY: this slot's header block belongs to this record's buffers, which no
                // other flight uses, and is not touched until the record is retired.
                let iovec = unsafe {
                    self.cold_headers
                        .io_vec_at(slot * BLOCK_SIZE_BYTES as usize, BLOCK_SIZE_BYTES as usize)
                };
                buffers.write_iovecs.push(iovec);
                offset -= BLOCK_SIZE_BYTES;
                debug_assert_eq!(Some(offset), Some(self.sb.segment_offset(cold.segment)));
            }
            buffers.write_iovecs.extend_from_slice(&self.batch.cold);
            let end = buffers.queue_writes(first, offset);
            debug_assert_eq!(end, header.cold_offset + cold_bytes);
            cold.next_offset += cold_bytes;
            self.bytes_written += cold_bytes;
        }
        debug_assert!(buffers.pending.len() <= buffers.pending.capacity());
        debug_assert!(buffers.write_iovecs.len() <= buffers.write_iovecs.capacity());
        open.next_offset += record_bytes;
        self.next_record_seq += 1;
        self.records_written += 1;
        self.bytes_written += record_bytes;
        std::mem::swap(&mut buffers.tags, &mut self.batch.tags);
        let writes = buffers.pending.len() as u32;
        let sealed_at = flush.then(std::time::Instant::now);
        if let Some(now) = sealed_at {
            if overlaps {
                self.record_times.overlapped += 1;
            } else if let Some(durable_at) = self.last_durable_at {
                self.record_times.durable_to_next_ns += (now - durable_at).as_nanos() as u64;
            }
        }
        self.in_flight.push_back(InFlight {
            record_seq: header.record_seq,
            buffers: slot,
            metadata_len,
            sealed_at,
            written_at: None,
            flushing_at: None,
            writes_outstanding: writes,
            flush,
            flush_submitted: false,
            durable: false,
            checkpoint: false,
            names_replay_start: None,
            segment_header_only: false,
            cold_blocks: header.cold_blocks,
        });
        self.batch.clear();
        self.settle_cold_left();
        Ok(Sealed::Record(header.record_seq, record_offset))
    }

    /// Opens a fresh segment and puts its header in flight alone, with a flush.
    fn start_segment(&mut self) -> Result<(), JournalError> {
        assert!(self.in_flight.is_empty(), "a segment header goes alone");
        let slot = self.free_buffers();
        self.buffers[slot].write_iovecs.clear();
        self.buffers[slot].pending.clear();
        self.open_segment(slot)?;
        self.publish_waiting = false;
        self.in_flight.push_back(InFlight {
            // The next record's number (nothing consumes it): completions name the flight.
            record_seq: self.next_record_seq,
            buffers: slot,
            metadata_len: 0,
            sealed_at: None,
            written_at: None,
            flushing_at: None,
            writes_outstanding: 1,
            flush: true,
            flush_submitted: false,
            durable: false,
            checkpoint: false,
            names_replay_start: Some(self.replay_start_published),
            segment_header_only: true,
            cold_blocks: 0,
        });
        Ok(())
    }

    /// Moves the cleaner's head to a fresh cold segment, whose header the record sealed in
    /// `slot` writes in front of its cold run. The segment left becomes a data segment once
    /// the records before this one are retired (`settle_cold_left`).
    fn open_cold_segment(&mut self, slot: usize) -> Result<(), JournalError> {
        // Cold segments hold no records: no first record, no replay start.
        let (header, opened) = self.take_free_segment(SegmentRole::Cold, 0, (0, 0))?;
        if let Some(left) = self.cold.take() {
            assert!(self.cold_left.len() < self.cold_left.capacity());
            self.cold_left
                .push_back((left.segment, self.next_record_seq));
        }
        self.cold_segments_opened += 1;
        let block = BLOCK_SIZE_BYTES as usize;
        self.cold_headers[slot * block..][..block].copy_from_slice(&header.encode());
        self.cold = Some(opened);
        Ok(())
    }

    /// Takes the next free segment for `role` (Journal or Cold): its header (written by the
    /// caller, in front of what the segment will hold, and counted in `bytes_written` here),
    /// its role and sequence number recorded, and the room after the header.
    fn take_free_segment(
        &mut self,
        role: SegmentRole,
        first_record_seq: u64,
        replay_start: (u64, u64),
    ) -> Result<(SegmentHeader, OpenSegment), JournalError> {
        debug_assert!(matches!(role, SegmentRole::Journal | SegmentRole::Cold));
        let segment = self
            .free_segments
            .pop_front()
            .ok_or(JournalError::NoSpace)?;
        let header = SegmentHeader {
            nonce: self.sb.nonce(),
            shard: self.shard,
            segment,
            segment_seq: self.next_segment_seq,
            first_record_seq,
            replay_start_seq: replay_start.0,
            replay_start_offset: replay_start.1,
            cold: role == SegmentRole::Cold,
        };
        debug_assert_eq!(self.roles[segment as usize], SegmentRole::Free);
        self.roles[segment as usize] = role;
        self.seqs[segment as usize] = header.segment_seq;
        self.next_segment_seq += 1;
        self.bytes_written += BLOCK_SIZE_BYTES;
        let start = self.sb.segment_offset(segment);
        let opened = OpenSegment {
            segment,
            next_offset: start + BLOCK_SIZE_BYTES,
            end: start + self.sb.segment_size,
            segment_seq: header.segment_seq,
        };
        Ok((header, opened))
    }

    fn open_segment(&mut self, slot: usize) -> Result<(), JournalError> {
        let (header, opened) = self.take_free_segment(
            SegmentRole::Journal,
            self.next_record_seq,
            self.replay_start_published,
        )?;
        self.chain.push_back(opened.segment);
        self.segment_header.copy_from_slice(&header.encode());
        // SAFETY: the header buffer is owned by the journal and unchanged until the record completes.
        let iovec = unsafe { self.segment_header.as_io_vec() };
        let buffers = &mut self.buffers[slot];
        buffers.write_iovecs.push(iovec);
        buffers.pending.push(PendingWrite {
            offset: self.sb.segment_offset(opened.segment),
            first: buffers.write_iovecs.len() - 1,
            count: 1,
        });
        self.open = Some(opened);
        Ok(())
    }
}

/// How far a writer starting after a mount skips the segment sequence numbers past the last
/// header the scan saw.
///
/// The writer keeps an invariant (`Sealed::SegmentHeader`): a record goes into a segment only
/// once that segment's header is durable. So every record on the device lies under a header
/// the scan can see, and `+ 1` would be enough.
///
/// The gap is for images written before that invariant: such a writer may have opened
/// segments whose headers were lost while records in them survived. When it later made
/// another header durable, the numbers it used past the scanned one are below this gap, so
/// their records read as stale (`carmine sim --seed 425`). Skipping numbers costs nothing.
fn mount_segment_seq_gap(sb: &Superblock, shard: u32) -> u64 {
    let segments = sb.shard_segments(shard);
    u64::from(segments.end - segments.start) + 1
}

impl Drop for Journal {
    /// Says where the shard's client records spent their time: the journal's records per
    /// second are bounded by this cycle.
    fn drop(&mut self) {
        let t = self.record_times;
        if t.records == 0 {
            return;
        }
        let us = |ns: u64| ns as f64 / t.records as f64 / 1000.0;
        log::info!(
            "shard {}: {} client records, mean µs per record: write {:.0}, write done to flush {:.0}, flush {:.0}, durable to next seal {:.0}",
            self.shard,
            t.records,
            us(t.write_ns),
            us(t.write_to_flush_ns),
            us(t.flush_ns),
            us(t.durable_to_next_ns)
        );
    }
}

#[cfg(test)]
mod tests;
