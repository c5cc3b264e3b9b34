//! One op's transaction semantics on the segment store: the sub-ops run against a private
//! working set (the object as durable before the op, plus the blocks and metadata changes this
//! op makes) and produce a `Plan`, which the store journals as one record.
//!
//! Nothing here touches the store: a failing mutation drops the working set and the op leaves
//! no trace, which is what makes the op atomic before it is journaled; the record's atomicity
//! makes it atomic after. The semantics are the memory store's (the `ObjectStore` docs), and a
//! property test runs both stores side by side.
//!
//! Block rules the executor keeps, which reads rely on:
//! - bytes past the object's size, inside its last block, are zero;
//! - no block at or past the size's last block is mapped.
//!
//! Old block contents come from the store (`OldBlocks`): before running an op, the store reads
//! every block that `blocks_to_read` lists, and only those.

use crate::object_store::{ObjectStat, OutputBuffer, SubOp, SubOpResult, STATUS_OK};
use crate::queue_pair::AlignedBuf;
use crate::segment::dirty::DirtyBlocks;
use crate::segment::metadata::{BlockRef, ObjectRef};
use crate::StoreError;

const BLOCK: u64 = 4096;
const BLOCK_USIZE: usize = BLOCK as usize;
static ZERO_BLOCK: [u8; BLOCK_USIZE] = [0; BLOCK_USIZE];

/// Durable contents of the blocks the store read for an op.
pub trait OldBlocks {
    /// Logical block `index` as durable before the op; Err(Io) if it failed its checksum or
    /// could not be read. The store read every mapped block `blocks_to_read` listed, and exec
    /// asks only for blocks under the same sub-ops, so a block it did not read is one the
    /// object does not map: `None` (zeros), with no second extent-tree lookup per block.
    fn block(&self, index: u64) -> Result<Option<&[u8]>, StoreError>;
}

/// A block this op gives the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dirty {
    /// Block `at` of the op's buffer `buf`.
    Data { buf: u32, at: u32 },
    /// No data: reads as zeros, unmapped when journaled.
    Hole,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaChange {
    pub xattr: bool,
    pub key: Vec<u8>,
    /// `None` removes the key.
    pub value: Option<Vec<u8>>,
}

/// What an op does to its object, ready to journal.
pub struct Plan {
    pub existed: bool,
    pub exists: bool,
    /// The object as it was is dropped (a Remove ran), even if a later sub-op recreated it.
    pub dropped: bool,
    pub mutated: bool,
    pub size: u64,
    pub dirty: DirtyBlocks,
    pub bufs: Vec<AlignedBuf>,
    pub meta: Vec<MetaChange>,
    /// The generation Stat reports after the op.
    pub generation: u64,
    /// Logical blocks mapped before the op, for deciding which holes need an unmap delta.
    old_blocks_dropped: bool,
}

impl Plan {
    /// An empty plan, to be recycled through `execute`.
    pub fn new() -> Plan {
        Plan {
            existed: false,
            exists: false,
            dropped: false,
            mutated: false,
            size: 0,
            dirty: DirtyBlocks::new(),
            bufs: Vec::new(),
            meta: Vec::new(),
            generation: 0,
            old_blocks_dropped: false,
        }
    }

    /// Makes this (recycled) plan the starting point of an op on `old`, or on what the
    /// journaled ops before it leave (`after`), keeping the vectors' capacity. Its buffers
    /// must have gone back to the pool.
    fn reset(&mut self, old: Option<ObjectRef<'_>>, after: Option<After>) {
        assert!(
            self.bufs.is_empty(),
            "a recycled plan's buffers go back to the pool first"
        );
        self.existed = old.is_some() || after.is_some();
        self.exists = self.existed;
        self.dropped = false;
        self.mutated = false;
        self.size = after.map_or(old.map_or(0, |o| o.size), |a| a.size);
        self.dirty.clear();
        self.meta.clear();
        self.generation = after.map_or(old.map_or(0, |o| o.changes), |a| a.generation);
        self.old_blocks_dropped = false;
    }

    /// What the object is after this op, for an op pipelined behind it (`pipelines`).
    pub fn after(&self) -> After {
        debug_assert!(self.exists && !self.dropped);
        After {
            size: self.size,
            generation: self.generation,
        }
    }

    /// Whether the op changes anything durable (else it completes without a record).
    pub fn needs_record(&self) -> bool {
        self.mutated && (self.existed || self.exists)
    }

    /// Data blocks the record will carry.
    pub fn data_blocks(&self) -> u32 {
        self.dirty
            .values()
            .filter(|d| matches!(d, Dirty::Data { .. }))
            .count() as u32
    }
}

/// Alignment of the block pool's arenas, in bytes: SPDK's registration granularity.
pub const ARENA_ALIGN_BYTES: usize = 2 * 1024 * 1024;

/// Size classes of the pool's multi-block buffers: (blocks per buffer, buffers kept). A
/// request takes the smallest class that fits it (a larger one when that is empty). Sized for
/// the store's users of runs: read runs and cleaner moves of up to 64 blocks
/// (`READ_RUN_BLOCKS_MAX`, `MOVE_BLOCKS_MAX`, 16 moves at once) and multi-block writes; 3,712
/// blocks (14.5 MiB) in all, as much again as the single blocks.
pub const RUN_CLASSES: [(u64, usize); 6] =
    [(2, 64), (4, 64), (8, 32), (16, 32), (32, 16), (64, 32)];

/// Blocks of the largest class: a buffer of more is always allocated.
pub const RUN_BLOCKS_MAX: u64 = RUN_CLASSES[RUN_CLASSES.len() - 1].0;

/// Reusable block buffers, so that steady writes and reads allocate nothing. Every buffer
/// handed out at start is a piece of one of two arenas allocated at start-up (4 KiB single
/// blocks, and the multi-block size classes of `RUN_CLASSES`), which the store registers with
/// its queue pair (`QueuePair::register_buffers`): the NVMe driver then writes and reads them
/// in place, no bounce copy. Bounded: when a class (and every larger one) is empty, or a
/// buffer is larger than the largest class, the pool allocates one (counted in
/// `allocations`; the device then takes its ordinary path, a bounce copy on NVMe) and frees it
/// when it comes back.
pub struct BlockPool {
    // Field order is drop order: the pieces (which free nothing) before their arenas.
    singles: Vec<AlignedBuf>,
    /// Per class of `RUN_CLASSES`, its idle pieces (each at its class's full length).
    runs: [Vec<AlignedBuf>; RUN_CLASSES.len()],
    retain_max: usize,
    pub allocations: u64,
    /// `retain_max` blocks; every single block handed out at start is a piece of it.
    arena: AlignedBuf,
    /// The pieces of `runs`, class after class.
    runs_arena: AlignedBuf,
}

impl BlockPool {
    pub fn new(retain_max: usize) -> BlockPool {
        assert!(retain_max > 0);
        // 2 MiB aligned, so that SPDK (whose `spdk_mem_register` takes only 2 MiB-aligned
        // ranges) can register it for zero copy too; the NVMe driver and io_uring need 4 KiB.
        let mut arena = AlignedBuf::with_alignment(retain_max * BLOCK_USIZE, ARENA_ALIGN_BYTES);
        let singles = (0..retain_max)
            // SAFETY: the pieces are disjoint blocks of `arena`, which the pool keeps (and
            // drops after them); a piece handed out is used only by the store that owns this
            // pool, which drops the pool only when done with every piece.
            .map(|index| unsafe { arena.carve(index * BLOCK_USIZE, BLOCK_USIZE) })
            .collect();
        let run_blocks: u64 = RUN_CLASSES
            .iter()
            .map(|&(blocks, count)| blocks * count as u64)
            .sum();
        let mut runs_arena =
            AlignedBuf::with_alignment(run_blocks as usize * BLOCK_USIZE, ARENA_ALIGN_BYTES);
        let mut offset = 0;
        let runs = RUN_CLASSES.map(|(blocks, count)| {
            let bytes = blocks as usize * BLOCK_USIZE;
            (0..count)
                .map(|_| {
                    // SAFETY: as for `singles`: disjoint pieces of `runs_arena`, which the
                    // pool drops after them.
                    let piece = unsafe { runs_arena.carve(offset, bytes) };
                    offset += bytes;
                    piece
                })
                .collect()
        });
        debug_assert_eq!(offset, runs_arena.len());
        BlockPool {
            singles,
            runs,
            retain_max,
            allocations: 0,
            arena,
            runs_arena,
        }
    }

    /// The two arenas behind the pool's buffers, to register for DMA.
    pub fn regions(&mut self) -> [(*mut u8, usize); 2] {
        [self.arena.region(), self.runs_arena.region()]
    }

    /// A buffer of `blocks` blocks. Its contents are arbitrary: callers write every byte.
    pub fn take(&mut self, blocks: u64) -> AlignedBuf {
        assert!(blocks > 0);
        if blocks == 1 {
            if let Some(buf) = self.singles.pop() {
                return buf;
            }
        } else if blocks <= RUN_BLOCKS_MAX {
            for (class, &(class_blocks, _)) in RUN_CLASSES.iter().enumerate() {
                if class_blocks < blocks {
                    continue;
                }
                if let Some(mut buf) = self.runs[class].pop() {
                    buf.set_len(blocks as usize * BLOCK_USIZE);
                    return buf;
                }
            }
        }
        self.allocations += 1;
        AlignedBuf::new(usize::try_from(blocks * BLOCK).expect("buffer fits memory"))
    }

    pub fn give(&mut self, mut buf: AlignedBuf) {
        if buf.is_owned() {
            // Allocated when the arenas ran dry: kept only as a single block while there is
            // room, else freed.
            if buf.len() == BLOCK_USIZE && self.singles.len() < self.retain_max {
                self.singles.push(buf);
            }
            return;
        }
        let capacity = buf.capacity();
        if capacity == BLOCK_USIZE {
            if self.singles.len() < self.retain_max {
                self.singles.push(buf);
            } else if let Some(heap) = self.singles.iter().position(AlignedBuf::is_owned) {
                // Full of heap blocks taken while the arena ran dry: an arena piece (registered
                // for DMA) is worth more than a heap block, which is freed instead. Rare: a scan.
                self.singles[heap] = buf;
            }
            return;
        }
        let class = RUN_CLASSES
            .iter()
            .position(|&(blocks, _)| blocks as usize * BLOCK_USIZE == capacity)
            .expect("an arena piece is a single block or of a run class");
        // Every piece of the class was handed out once: it cannot come back more often.
        assert!(self.runs[class].len() < RUN_CLASSES[class].1);
        buf.set_len(capacity);
        self.runs[class].push(buf);
    }

    pub fn give_all(&mut self, bufs: &mut Vec<AlignedBuf>) {
        for buf in bufs.drain(..) {
            self.give(buf);
        }
    }
}

/// Lists (sorted, deduplicated) the mapped blocks of `old` that running `ops` may read, with
/// where each lives (so the reads need no second lookup in the extent tree): blocks under
/// Read ranges and the partially covered edge blocks of Write, Zero and Truncate.
pub fn blocks_to_read(
    old: Option<ObjectRef<'_>>,
    ops: &[SubOp<'_>],
    out_capacity: usize,
    needed: &mut Vec<(u64, BlockRef)>,
) {
    needed.clear();
    let Some(old) = old else { return };
    let mut push_range = |start: u64, end: u64| {
        if start < end {
            let (first, last) = (start / BLOCK, (end - 1) / BLOCK);
            if first == last {
                // One block (a 4 KiB read, a write's edge): a point lookup costs less than
                // setting up a range walk.
                needed.extend(old.blocks.get(first).map(|block| (first, block)));
            } else {
                needed.extend(old.blocks.range(first, last));
            }
        }
    };
    for op in ops {
        match *op {
            SubOp::Read { offset, length } => {
                let end = offset
                    .saturating_add(length.min(out_capacity as u64))
                    .min(old.size);
                push_range(offset.min(end), end);
            }
            SubOp::Write { offset, data } => {
                edges(offset, data.len() as u64, &mut push_range);
            }
            SubOp::Zero { offset, length } => edges(offset, length, &mut push_range),
            SubOp::Truncate { size } if size % BLOCK != 0 => push_range(size, size + 1),
            _ => {}
        }
    }
    needed.sort_unstable_by_key(|&(index, _)| index);
    needed.dedup_by_key(|&mut (index, _)| index);
}

/// Calls `push(start, end)` for the partially covered first and last blocks of a range.
fn edges(offset: u64, length: u64, push: &mut dyn FnMut(u64, u64)) {
    let Some(end) = offset.checked_add(length) else {
        return;
    };
    if length == 0 {
        return;
    }
    if offset % BLOCK != 0 {
        push(offset, offset + 1);
    }
    if end % BLOCK != 0 {
        push(end - 1, end);
    }
}

/// The object as a chain of journaled, not yet durable writes leaves it: it exists, with
/// this size and generation. Its block map is the metadata's plus the chain's blocks, which
/// an op that `pipelines` never looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct After {
    pub size: u64,
    pub generation: u64,
}

/// Whether `ops` may run behind journaled ops of the same object before they are durable:
/// whole-block writes only. Such an op reads nothing of the object (no edge block, no
/// hole), so the one thing it takes from the ops before it is `After`, and its deltas
/// (extent maps and the new size) replay the same after theirs as they would have with
/// their effects in the metadata. Anything else waits in the object's lane.
pub fn pipelines(ops: &[SubOp<'_>]) -> bool {
    !ops.is_empty()
        && ops.iter().all(|op| match *op {
            SubOp::Write { offset, data } => {
                !data.is_empty()
                    && offset.is_multiple_of(BLOCK)
                    && (data.len() as u64).is_multiple_of(BLOCK)
            }
            _ => false,
        })
}

/// Runs `ops` on the object `old` (None if missing) in `plan` (a recycled one: its vectors
/// keep their capacity); with `after`, on the object as journaled ops before it leave it
/// (then `ops` must be ones that `pipelines`). Read-like sub-ops put their output in `out`
/// and their status in `results`. Returns the plan, or the first failing mutation's error
/// with the plan back (its buffers returned to the pool; nothing planned, `results`/`out`
/// mean nothing).
#[allow(clippy::too_many_arguments)]
pub fn execute(
    old: Option<ObjectRef<'_>>,
    after: Option<After>,
    ops: &[SubOp<'_>],
    blocks: &dyn OldBlocks,
    out: &mut OutputBuffer<'_>,
    results: &mut [SubOpResult],
    pool: &mut BlockPool,
    mut plan: Plan,
) -> Result<Plan, (StoreError, Plan)> {
    assert!(
        after.is_none() || pipelines(ops),
        "only whole-block writes run behind journaled ops"
    );
    plan.reset(old, after);
    let mut work = Working {
        old,
        blocks,
        plan,
        bumped: false,
        out_pos: 0,
    };
    for (op, result) in ops.iter().zip(results.iter_mut()) {
        if op.is_mutation() {
            if let Err(error) = work.mutate(op, pool) {
                pool.give_all(&mut work.plan.bufs);
                return Err((error, work.plan));
            }
            *result = SubOpResult {
                status: STATUS_OK,
                out_offset: work.out_pos as u32,
                out_len: 0,
            };
        } else {
            *result = work.read(op, out);
        }
    }
    Ok(work.plan)
}

struct Working<'a> {
    old: Option<ObjectRef<'a>>,
    blocks: &'a dyn OldBlocks,
    plan: Plan,
    bumped: bool,
    out_pos: usize,
}

impl Working<'_> {
    /// The old object, unless this op dropped it.
    fn old_live(&self) -> Option<ObjectRef<'_>> {
        if self.plan.old_blocks_dropped {
            None
        } else {
            self.old
        }
    }

    /// Current content of logical block `index`; `None` means zeros.
    fn content(&self, index: u64) -> Result<Option<&[u8]>, StoreError> {
        match self.plan.dirty.get(index) {
            Some(Dirty::Data { buf, at }) => {
                let start = *at as usize * BLOCK_USIZE;
                Ok(Some(
                    &self.plan.bufs[*buf as usize][start..start + BLOCK_USIZE],
                ))
            }
            Some(Dirty::Hole) => Ok(None),
            None => match self.old_live() {
                Some(old) => {
                    let block = self.blocks.block(index)?;
                    debug_assert!(
                        block.is_some() || !old.blocks.contains(index),
                        "block {index} is mapped but was not read: blocks_to_read missed it"
                    );
                    Ok(block)
                }
                None => Ok(None),
            },
        }
    }

    /// `content`, or zeros without looking when `known_zero`.
    fn content_if(&self, known_zero: bool, index: u64) -> Result<Option<&[u8]>, StoreError> {
        if known_zero {
            Ok(None)
        } else {
            self.content(index)
        }
    }

    /// Blocks in `first..=last` that hold data now.
    fn blocks_with_data(&self, first: u64, last: u64) -> Vec<u64> {
        let mut indexes: Vec<u64> = self
            .plan
            .dirty
            .range(first, last)
            .iter()
            .filter(|(_, d)| matches!(d, Dirty::Data { .. }))
            .map(|&(i, _)| i)
            .collect();
        if let Some(old) = self.old_live() {
            indexes.extend(
                old.blocks
                    .range(first, last)
                    .map(|(i, _)| i)
                    .filter(|&i| !self.plan.dirty.contains_key(i)),
            );
        }
        indexes.sort_unstable();
        indexes
    }

    fn mutate(&mut self, op: &SubOp<'_>, pool: &mut BlockPool) -> Result<(), StoreError> {
        op.check_limits()?;
        if !self.plan.exists {
            if !op.creates_object() {
                return Err(StoreError::NotFound);
            }
            self.plan.exists = true;
        }
        match *op {
            SubOp::Write { offset, data } => self.write(offset, data, pool)?,
            SubOp::WriteFull { data } => {
                self.truncate(0, pool)?;
                self.write(0, data, pool)?;
            }
            SubOp::Zero { offset, length } => self.zero(offset, length, pool)?,
            SubOp::Truncate { size } => self.truncate(size, pool)?,
            SubOp::Remove => {
                let plan = &mut self.plan;
                plan.exists = false;
                plan.dropped = plan.existed;
                plan.old_blocks_dropped = true;
                plan.dirty.clear();
                plan.meta.clear();
                plan.size = 0;
                plan.generation = 0;
                plan.mutated = true;
                self.bumped = false;
                return Ok(());
            }
            SubOp::SetXattr { name, value } => self.plan.meta.push(MetaChange {
                xattr: true,
                key: name.to_vec(),
                value: Some(value.to_vec()),
            }),
            SubOp::OmapSet { key, value } => self.plan.meta.push(MetaChange {
                xattr: false,
                key: key.to_vec(),
                value: Some(value.to_vec()),
            }),
            SubOp::OmapRemove { key } => self.plan.meta.push(MetaChange {
                xattr: false,
                key: key.to_vec(),
                value: None,
            }),
            SubOp::Read { .. } | SubOp::Stat | SubOp::GetXattr { .. } | SubOp::OmapGet { .. } => {
                unreachable!("not a mutation")
            }
        }
        self.plan.mutated = true;
        if !self.bumped {
            self.plan.generation += 1;
            self.bumped = true;
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], pool: &mut BlockPool) -> Result<(), StoreError> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let blocks = last - first + 1;
        let mut buf = pool.take(blocks);
        let head = (offset % BLOCK) as usize;
        let tail = head + data.len();
        if head > 0 {
            fill(&mut buf[..head], self.content(first)?);
        }
        buf[head..tail].copy_from_slice(data);
        if tail < buf.len() {
            let within_last = tail - (blocks as usize - 1) * BLOCK_USIZE;
            fill(
                &mut buf[tail..],
                self.content(last)?.map(|b| &b[within_last..]),
            );
        }
        let buf_index = self.plan.bufs.len() as u32;
        self.plan.bufs.push(buf);
        for at in 0..blocks {
            self.plan.dirty.insert(
                first + at,
                Dirty::Data {
                    buf: buf_index,
                    at: at as u32,
                },
            );
        }
        self.plan.size = self.plan.size.max(end);
        Ok(())
    }

    /// Replaces block `index` by a copy with `range` (within the block) zeroed, if it has data.
    fn zero_within(
        &mut self,
        index: u64,
        range: std::ops::Range<usize>,
        pool: &mut BlockPool,
    ) -> Result<(), StoreError> {
        let Some(content) = self.content(index)? else {
            return Ok(());
        };
        let mut buf = pool.take(1);
        buf.copy_from_slice(content);
        buf[range].fill(0);
        let buf_index = self.plan.bufs.len() as u32;
        self.plan.bufs.push(buf);
        self.plan.dirty.insert(
            index,
            Dirty::Data {
                buf: buf_index,
                at: 0,
            },
        );
        Ok(())
    }

    fn zero(&mut self, offset: u64, length: u64, pool: &mut BlockPool) -> Result<(), StoreError> {
        if length == 0 {
            return Ok(());
        }
        let end = offset + length;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        for index in self.blocks_with_data(first, last) {
            let (start, stop) = (index * BLOCK, (index + 1) * BLOCK);
            let (lo, hi) = (offset.max(start), end.min(stop));
            if lo == start && hi == stop {
                self.plan.dirty.insert(index, Dirty::Hole);
            } else {
                self.zero_within(index, (lo - start) as usize..(hi - start) as usize, pool)?;
            }
        }
        self.plan.size = self.plan.size.max(end);
        Ok(())
    }

    fn truncate(&mut self, size: u64, pool: &mut BlockPool) -> Result<(), StoreError> {
        if size < self.plan.size {
            let keep = size.div_ceil(BLOCK);
            let last = (self.plan.size - 1) / BLOCK;
            if keep <= last {
                for index in self.blocks_with_data(keep, last) {
                    self.plan.dirty.insert(index, Dirty::Hole);
                }
            }
            if size % BLOCK != 0 {
                self.zero_within(size / BLOCK, (size % BLOCK) as usize..BLOCK_USIZE, pool)?;
            }
        }
        self.plan.size = size;
        Ok(())
    }

    fn read(&mut self, op: &SubOp<'_>, out: &mut OutputBuffer<'_>) -> SubOpResult {
        let out_offset = self.out_pos as u32;
        let output = op.check_limits().and_then(|()| {
            if !self.plan.exists {
                return Err(StoreError::NotFound);
            }
            match *op {
                SubOp::Read { offset, length } => self.read_data(offset, length, out),
                SubOp::Stat => {
                    let stat = ObjectStat {
                        size: self.plan.size,
                        generation: self.plan.generation,
                    };
                    self.output(out, &stat.to_bytes())
                }
                SubOp::GetXattr { name } => self.output_meta(true, name, out),
                SubOp::OmapGet { key } => self.output_meta(false, key, out),
                _ => unreachable!("not read-like"),
            }
        });
        match output {
            Ok(out_len) => SubOpResult {
                status: STATUS_OK,
                out_offset,
                out_len,
            },
            Err(error) => SubOpResult {
                status: error.code(),
                out_offset,
                out_len: 0,
            },
        }
    }

    fn read_data(
        &mut self,
        offset: u64,
        length: u64,
        out: &mut OutputBuffer<'_>,
    ) -> Result<u32, StoreError> {
        let size = self.plan.size;
        let start = offset.min(size);
        let end = offset.saturating_add(length).min(size);
        let total = (end - start) as usize;
        if total > out.capacity() - self.out_pos {
            return Err(StoreError::Range);
        }
        let mut at = start;
        while at < end {
            let index = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let take = ((BLOCK as usize - within) as u64).min(end - at) as usize;
            // Bytes of an untouched old block at or past the old size are zero (a rule the
            // executor keeps), and `blocks_to_read` does not list a block for them: a write
            // earlier in this op may have grown the object past the old size.
            let old_size = self.old_live().map_or(0, |old| old.size);
            let untouched = !self.plan.dirty.contains_key(index);
            let bytes = match self.content_if(untouched && at >= old_size, index)? {
                Some(block) => &block[within..within + take],
                None => &ZERO_BLOCK[..take],
            };
            out.write_at(self.out_pos + (at - start) as usize, bytes);
            at += take as u64;
        }
        self.out_pos += total;
        Ok(total as u32)
    }

    fn output_meta(
        &mut self,
        xattr: bool,
        key: &[u8],
        out: &mut OutputBuffer<'_>,
    ) -> Result<u32, StoreError> {
        let changed = self
            .plan
            .meta
            .iter()
            .rev()
            .find(|c| c.xattr == xattr && c.key == key);
        let value: Option<&[u8]> = match changed {
            Some(change) => change.value.as_deref(),
            None => self.old_live().and_then(|old| {
                let onode = old.onode;
                let map = if xattr { &onode.xattrs } else { &onode.omap };
                map.get(key).map(|v| &v[..])
            }),
        };
        let value = value.ok_or(StoreError::NoData)?;
        // Copy out of `self` before writing: `output` borrows `self` mutably.
        let (pos, len) = (self.out_pos, value.len());
        if len > out.capacity() - pos {
            return Err(StoreError::Range);
        }
        out.write_at(pos, value);
        self.out_pos += len;
        Ok(len as u32)
    }

    fn output(&mut self, out: &mut OutputBuffer<'_>, bytes: &[u8]) -> Result<u32, StoreError> {
        if bytes.len() > out.capacity() - self.out_pos {
            return Err(StoreError::Range);
        }
        out.write_at(self.out_pos, bytes);
        self.out_pos += bytes.len();
        Ok(bytes.len() as u32)
    }
}

/// Fills `dst` from the start of `src`, or with zeros when `src` is None.
fn fill(dst: &mut [u8], src: Option<&[u8]>) {
    match src {
        Some(src) => dst.copy_from_slice(&src[..dst.len()]),
        None => dst.fill(0),
    }
}

/// Mapped-before blocks of `plan` that end as holes need an unmap delta; holes over blocks
/// that were never mapped (or whose object was dropped) do not.
pub fn hole_needs_unmap(plan: &Plan, old: Option<ObjectRef<'_>>, index: u64) -> bool {
    !plan.old_blocks_dropped && old.is_some_and(|o| o.blocks.contains(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inside(region: (*mut u8, usize), buf: &AlignedBuf) -> bool {
        let (start, len) = (region.0 as usize, region.1);
        let at = buf.as_ptr() as usize;
        at >= start && at + buf.len() <= start + len
    }

    #[test]
    fn block_pool_hands_out_arena_blocks_first_and_keeps_them() {
        let mut pool = BlockPool::new(4);
        let [region, _] = pool.regions();
        let mut taken: Vec<AlignedBuf> = (0..4).map(|_| pool.take(1)).collect();
        assert!(taken
            .iter()
            .all(|buf| inside(region, buf) && !buf.is_owned()));
        assert_eq!(pool.allocations, 0);
        // The arena ran dry: a heap block, counted.
        let heap = pool.take(1);
        assert!(heap.is_owned() && !inside(region, &heap));
        assert_eq!(pool.allocations, 1);
        // Past the largest run class, a buffer is allocated too.
        assert!(pool.take(RUN_BLOCKS_MAX + 1).is_owned());
        assert_eq!(pool.allocations, 2);
        // The heap block comes back first and takes a place; the last arena block, finding the
        // pool full, takes the heap block's place back.
        pool.give(heap);
        pool.give_all(&mut taken);
        let again: Vec<AlignedBuf> = (0..4).map(|_| pool.take(1)).collect();
        assert!(
            again.iter().all(|buf| inside(region, buf)),
            "all four arena blocks kept"
        );
    }

    #[test]
    fn block_pool_serves_runs_from_its_class_arena_then_larger_classes_then_the_heap() {
        let mut pool = BlockPool::new(1);
        let [_, runs] = pool.regions();
        // Each size up to the largest class: an arena piece of exactly that length.
        let mut taken: Vec<AlignedBuf> = (2..=RUN_BLOCKS_MAX).map(|b| pool.take(b)).collect();
        for (buf, blocks) in taken.iter().zip(2..) {
            assert!(inside(runs, buf) && !buf.is_owned(), "{blocks} blocks");
            assert_eq!(buf.len(), blocks as usize * BLOCK_USIZE);
        }
        assert_eq!(pool.allocations, 0);
        // Empty the two-block class: the next two-block buffer comes from the four-block one.
        let twos = RUN_CLASSES[0].1 - 1;
        taken.extend((0..twos).map(|_| pool.take(2)));
        let borrowed = pool.take(2);
        assert!(inside(runs, &borrowed) && borrowed.capacity() == 4 * BLOCK_USIZE);
        assert_eq!(pool.allocations, 0);
        taken.push(borrowed);
        // 33..=64 blocks took every piece of the largest class: 64 blocks come from the heap.
        assert!(pool.runs[RUN_CLASSES.len() - 1].is_empty());
        let heap = pool.take(RUN_BLOCKS_MAX);
        assert!(heap.is_owned() && pool.allocations == 1);
        pool.give(heap);
        // Everything comes back to its class at full length; the heap buffer is freed.
        pool.give_all(&mut taken);
        for (class, &(blocks, count)) in RUN_CLASSES.iter().enumerate() {
            assert_eq!(pool.runs[class].len(), count, "class of {blocks} blocks");
            assert!(pool.runs[class]
                .iter()
                .all(|buf| buf.len() == blocks as usize * BLOCK_USIZE));
        }
    }
}
