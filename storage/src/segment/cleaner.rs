//! The segment cleaner of one shard: which segment to empty next, and the state of the copies
//! that empty it. The store drives it from its poll loop, mixed with client work.
//!
//! How space comes back:
//! 1. Overwrites and removes leave dead blocks behind in old segments.
//! 2. A checkpoint (the journal writes the whole metadata, then names it in the next segment
//!    header) turns the journal segments before it into *data segments*: replay no longer reads
//!    them, only their live blocks matter.
//! 3. A data segment with no live block is free at once. One with some is a candidate victim:
//!    the cleaner reads its live blocks (crc-checked) and journals them again as
//!    `ExtentMove`s, in client records, but with their data blocks in a log head of their
//!    own (cold segments, `Journal::cold`), so that blocks that survived long enough to be
//!    moved gather apart from hot writes instead of being mixed with them again. Each move applies only if the block is still
//!    where it was read, so a client write in between always wins. One read request covers
//!    live blocks up to `MOVE_GAP_BLOCKS_MAX` dead blocks apart (within `MOVE_BLOCKS_MAX`), so
//!    a victim's scattered live blocks cost a request per few blocks, not per block.
//!
//! Victims are chosen by cost-benefit, as in LFS and SeaStore: `(1 - u) * age / (1 + u)`, where
//! `u` is the live fraction (the cost is reading and rewriting `u`, the benefit is `1 - u` of a
//! segment) and `age` is how many segments the journal opened since this one: old segments
//! that are still live hold cold data, likely to stay live, so they are worth compacting.
//!
//! Throttle: clients may not take the last `reserve` free segments; the cleaner and the
//! checkpoint may. A client write that finds no room waits while the cleaner can still free
//! space, and gets `NoSpace` only when it cannot.

use crate::queue_pair::AlignedBuf;
use crate::segment::btree::Key;
use crate::segment::format::BLOCK_SIZE_BYTES;
use crate::segment::journal::{Journal, SegmentRole};
use crate::segment::metadata::{BlockRef, Metadata};

/// Completions with this bit set (and not the journal's or an op read's) are cleaner reads.
pub const CLEANER_TAG_BIT: u64 = 1 << 61;
/// Copies (read, then journaled) in progress at once: bounds the cleaner's buffers.
pub const MOVES_IN_FLIGHT_MAX: usize = 16;
/// Blocks one copy reads (one request: live blocks and the dead gaps between them); so also
/// the most live blocks, and extent deltas, one copy journals.
pub const MOVE_BLOCKS_MAX: usize = 64;
/// Dead blocks a copy's read may span between two live blocks, rather than ending there and
/// leaving the next live block to a request of its own. Random overwrites leave a victim's
/// live blocks scattered (one in four at the default spare), so a read per run of adjacent
/// live blocks was nearly a request per block; on this project's virtio disk a 4 KiB random
/// read costs the device about what five blocks of a sequential one do (fio: 146k random
/// 4 KiB reads a second, 3.1 GB/s of 64 KiB sequential ones). Measured side by side
/// (store-bench randwrite at fill 0.8, two binaries at once on one disk): gaps of up to 4
/// blocks gave 1.02-1.03x the IOPS of 0, 16 gave 1.02-1.05x of 4, 64 the same as 16.
pub const MOVE_GAP_BLOCKS_MAX: u64 = 16;

/// A victim must have at least this many dead blocks: copies that do not fit the tail of the
/// open segment wait for a fresh one, so cleaning a segment may leave up to one copy's worth
/// of blocks unused; a victim with less dead space than that could cost more than it frees,
/// and a cleaner that keeps picking such victims would never give clients room.
pub const VICTIM_DEAD_BLOCKS_MIN: u32 = MOVE_BLOCKS_MAX as u32 + 2;

/// Blocks of the cleaner's own head (cold segments) that copying `live` blocks may take, at
/// most: the blocks themselves, the tail of the cold segment if a copy did not fit it (the
/// cleaner opens at most one fresh cold segment per victim), and that segment's header.
pub fn copy_cold_blocks_bound(live: u32) -> u64 {
    u64::from(live) + MOVE_BLOCKS_MAX as u64 + 1
}

/// Blocks of the clients' head that copying `live` blocks may take, at most: the copies'
/// deltas, in the heads of the records that carry them (a copy can be a single block, with a
/// delta of some 60 bytes: an eighth of the blocks is generous).
pub fn copy_head_blocks_bound(live: u32) -> u64 {
    u64::from(live) / 8 + 2
}

/// The data segment to empty next: the best cost-benefit score among data segments with at
/// least `VICTIM_DEAD_BLOCKS_MIN` dead blocks. `None` when there is none.
pub fn pick_victim(
    journal: &Journal,
    metadata: &Metadata,
    segments: std::ops::Range<u32>,
    blocks_per_segment: u32,
    skip: &[u32],
    waiting: &[u32],
) -> Option<u32> {
    let now = journal.next_segment_seq();
    let mut best: Option<(f64, u32)> = None;
    for segment in segments {
        if journal.role(segment) != SegmentRole::Data
            || skip.contains(&segment)
            || waiting.contains(&segment)
        {
            continue;
        }
        let live = metadata.live_blocks(segment);
        if live + VICTIM_DEAD_BLOCKS_MIN > blocks_per_segment {
            continue;
        }
        let u = f64::from(live) / f64::from(blocks_per_segment);
        let age = (now - journal.segment_seq(segment)) as f64;
        let score = (1.0 - u) * age / (1.0 + u);
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, segment));
        }
    }
    best.map(|(_, segment)| segment)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveStage {
    Free,
    /// Planned; the queue pair has not taken its read yet.
    Unsubmitted,
    Reading,
    /// Read; waiting for room in the journal's batch.
    Blocked,
    /// In the journal; done when its record is durable.
    Journaled,
}

/// Live blocks of one object inside a copy's read, consecutive both logically and on the
/// device: one extent delta.
pub struct MoveRun {
    pub oid: Box<[u8]>,
    pub first_index: u64,
    /// Where the run starts in the copy's read, in blocks from `Move::from`.
    pub at: u32,
    pub blocks: u32,
}

/// One copy: one read of `span_blocks` device blocks from `from`, the live blocks in it
/// journaled again as one op of one extent delta per run.
pub struct Move {
    pub stage: MoveStage,
    /// In device order; bounded by `MOVE_BLOCKS_MAX` (a run holds at least one block).
    pub runs: Vec<MoveRun>,
    /// Live blocks: the runs' blocks together.
    pub blocks: u32,
    /// Blocks read, live or not: from the first live block to the last.
    pub span_blocks: u32,
    pub from: u64,
    /// crc32c the metadata had for each live block when the copy was planned, in run order.
    pub expected: Vec<u32>,
    /// crc32c of the live blocks as read, in run order.
    pub actual: Vec<u32>,
    pub buf: Option<AlignedBuf>,
}

/// Counters the store reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanerStats {
    pub segments_cleaned: u64,
    /// Data segments freed without copying (every block already dead).
    pub segments_freed_empty: u64,
    pub blocks_moved: u64,
    /// Of `blocks_moved`, those that went to the cold head (the rest went to the clients'
    /// head, for lack of free segments: `Cleaner::to_cold`).
    pub blocks_moved_cold: u64,
    pub bytes_moved: u64,
    /// Read requests, and the blocks they spanned (live and the dead gaps between them).
    pub reads: u64,
    pub blocks_read: u64,
    pub walk_steps: u64,
    /// Victims given up on (a block could not be read): they stay allocated.
    pub victims_abandoned: u64,
}

pub struct Cleaner {
    pub victim: Option<u32>,
    /// Where the victim's copies go: the cleaner's own head (cold segments), or, when no
    /// cold segment can be opened (one free segment left) but the clients' head has room,
    /// after the heads of the records that carry them, as before the cold head existed.
    pub to_cold: bool,
    /// Where the walk of the extent tree for the victim's live blocks resumes; Some while
    /// it runs (`SegmentStore::walk_victim`, a step per poll while I/O is in flight), and no
    /// copy starts before it ends.
    pub walk_from: Option<Key>,
    /// Live blocks of the victim still to copy, in device order (popped from the back).
    pub todo: Vec<(Box<[u8]>, u64, BlockRef)>,
    pub moves: Vec<Move>,
    pub free_moves: Vec<usize>,
    /// Segments whose blocks could not be read: not picked again until restart.
    pub stuck: Vec<u32>,
    /// Victims whose data blocks are all moved but which still hold extent-tree nodes: a
    /// checkpoint that writes the tree moves them (`Metadata::move_nodes_out_of`), and the
    /// segment is freed when the header naming it is durable (its live count then reaches 0).
    /// Not picked again meanwhile. At most one entry per segment.
    pub nodes_waiting: Vec<u32>,
    /// Live blocks before this device address are read without dead gaps: a read that spanned
    /// some failed, and an unreadable dead block must not cost the live ones around it.
    pub gapless_until: u64,
    pub stats: CleanerStats,
}

impl Default for Cleaner {
    fn default() -> Self {
        Self::new()
    }
}

impl Cleaner {
    pub fn new() -> Cleaner {
        Cleaner {
            victim: None,
            to_cold: true,
            walk_from: None,
            todo: Vec::new(),
            moves: (0..MOVES_IN_FLIGHT_MAX)
                .map(|_| Move {
                    stage: MoveStage::Free,
                    runs: Vec::with_capacity(MOVE_BLOCKS_MAX),
                    blocks: 0,
                    span_blocks: 0,
                    from: 0,
                    expected: Vec::with_capacity(MOVE_BLOCKS_MAX),
                    actual: Vec::with_capacity(MOVE_BLOCKS_MAX),
                    buf: None,
                })
                .collect(),
            free_moves: (0..MOVES_IN_FLIGHT_MAX).rev().collect(),
            stuck: Vec::new(),
            nodes_waiting: Vec::new(),
            gapless_until: 0,
            stats: CleanerStats::default(),
        }
    }

    pub fn moves_in_flight(&self) -> usize {
        MOVES_IN_FLIGHT_MAX - self.free_moves.len()
    }

    pub fn active(&self) -> bool {
        self.victim.is_some() || self.moves_in_flight() > 0
    }

    /// Takes the next copy off `todo`: live blocks in device order while the read stays within
    /// `MOVE_BLOCKS_MAX` blocks and no gap between two of them is more than
    /// `MOVE_GAP_BLOCKS_MAX` dead blocks, grouped into runs (one object's blocks, consecutive
    /// logically and on the device). Fills `mv` (but not its buffer).
    pub fn next_run(&mut self, mv: usize) -> bool {
        let Some((oid, first_index, first)) = self.todo.pop() else {
            return false;
        };
        let m = &mut self.moves[mv];
        m.runs.clear();
        m.expected.clear();
        m.actual.clear();
        m.expected.push(first.crc);
        m.runs.push(MoveRun {
            oid,
            first_index,
            at: 0,
            blocks: 1,
        });
        // Blocks from `first` to just past the last live block taken.
        let mut span = 1u64;
        while let Some((_, _, next)) = self.todo.last() {
            if next.physical < first.physical + span * BLOCK_SIZE_BYTES {
                // Not past this copy's span: blocks of a failed copy that `retry_without_gaps`
                // put back on top of `todo` while this one was taken from further on (with
                // several copies in flight) come back behind it. The next copy starts there.
                break;
            }
            let at = (next.physical - first.physical) / BLOCK_SIZE_BYTES;
            let gap_max = if next.physical < self.gapless_until {
                0
            } else {
                MOVE_GAP_BLOCKS_MAX
            };
            if at >= MOVE_BLOCKS_MAX as u64 || at - span > gap_max {
                break;
            }
            let (next_oid, next_index, next) = self.todo.pop().expect("looked at it");
            let run = m.runs.last_mut().expect("the first run is there");
            if at == span
                && next_oid == run.oid
                && next_index == run.first_index + u64::from(run.blocks)
            {
                run.blocks += 1;
            } else {
                m.runs.push(MoveRun {
                    oid: next_oid,
                    first_index: next_index,
                    at: at as u32,
                    blocks: 1,
                });
            }
            m.expected.push(next.crc);
            span = at + 1;
        }
        assert!(m.runs.len() <= MOVE_BLOCKS_MAX && span <= MOVE_BLOCKS_MAX as u64);
        m.blocks = m.expected.len() as u32;
        m.span_blocks = span as u32;
        m.from = first.physical;
        true
    }

    /// The read of copy `mv` failed. If it spanned dead blocks, its live blocks go back to
    /// `todo`, to be read again without gaps (true): the error may lie in a block nothing
    /// lives in. Else (false) the live blocks themselves could not be read.
    pub fn retry_without_gaps(&mut self, mv: usize) -> bool {
        let m = &mut self.moves[mv];
        if m.span_blocks == m.blocks {
            return false;
        }
        // Never lowered: an earlier failed span, further on, stays gapless too.
        let end = m.from + u64::from(m.span_blocks) * BLOCK_SIZE_BYTES;
        self.gapless_until = self.gapless_until.max(end);
        // `todo` is popped from the back in device order: push the last block first.
        let mut crcs = m.expected.iter().rev();
        for run in m.runs.drain(..).rev() {
            for index in (0..run.blocks).rev() {
                let crc = *crcs.next().expect("a crc per live block");
                let physical = m.from + u64::from(run.at + index) * BLOCK_SIZE_BYTES;
                self.todo.push((
                    run.oid.clone(),
                    run.first_index + u64::from(index),
                    BlockRef { physical, crc },
                ));
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::format::{Delta, Superblock, SEGMENTS_START_BYTES};
    use crate::segment::scan::ShardLog;

    #[test]
    fn victims_by_cost_benefit_and_runs_by_adjacency() {
        let segment_size = 1 << 20;
        let sb = Superblock::for_device(
            SEGMENTS_START_BYTES + 8 * segment_size,
            segment_size,
            1,
            [3; 16],
        )
        .unwrap();
        let mut metadata = Metadata::new(sb);
        metadata.apply(&Delta::ObjectCreate { oid: b"a" }).unwrap();
        // Segment 1: 150 live blocks; segment 2: 20 live blocks (two runs); segment 3: none;
        // segment 4: 250 of 255 live, too few dead blocks to be worth a copy.
        let crcs = vec![0u8; 250 * 4];
        for (segment, blocks, logical) in [
            (1u32, 150u32, 0u64),
            (2, 10, 1000),
            (2, 10, 2000),
            (4, 250, 5000),
        ] {
            let physical =
                sb.segment_offset(segment) + 4096 + if logical == 2000 { 40960 } else { 0 };
            metadata
                .apply(&Delta::ExtentMap {
                    oid: b"a",
                    offset: logical * 4096,
                    physical,
                    blocks,
                    crcs: &crcs[..blocks as usize * 4],
                })
                .unwrap();
        }
        let headers: Vec<_> = (1..=4)
            .map(|segment| crate::segment::format::SegmentHeader {
                nonce: sb.nonce(),
                shard: 0,
                segment,
                segment_seq: u64::from(segment),
                first_record_seq: 1,
                replay_start_seq: 0,
                replay_start_offset: 0,
                cold: false,
            })
            .collect();
        let log = ShardLog {
            segments: vec![],
            data_segments: headers,
            orphans: vec![],
            records: vec![],
            end: crate::segment::scan::LogEnd::Empty,
            next_record_seq: 1,
            next_segment_seq: 5,
            replay_start: (0, 0),
        };
        let journal = Journal::new(sb, 0, &log, metadata.live_block_counts());
        // Segment 3 had no live block: free at mount, never a victim.
        assert_eq!(journal.role(3), SegmentRole::Free);
        let blocks_per_segment = 255;
        assert_eq!(
            pick_victim(&journal, &metadata, 0..8, blocks_per_segment, &[], &[]),
            Some(2),
            "the emptier segment wins despite being younger"
        );
        assert_eq!(
            pick_victim(&journal, &metadata, 0..8, blocks_per_segment, &[2], &[]),
            Some(1)
        );
        assert!(250 + VICTIM_DEAD_BLOCKS_MIN > blocks_per_segment);
        assert_eq!(
            pick_victim(&journal, &metadata, 0..8, blocks_per_segment, &[1, 2], &[]),
            None,
            "a segment with fewer than VICTIM_DEAD_BLOCKS_MIN dead blocks is not worth a copy"
        );

        // Segment 2's two runs lie side by side on the device: one read, two extent deltas.
        let mut cleaner = Cleaner::new();
        metadata.live_in_segment(2, &mut cleaner.todo);
        cleaner.todo.reverse();
        assert_eq!(cleaner.todo.len(), 20);
        assert!(cleaner.next_run(0));
        let m = &cleaner.moves[0];
        assert_eq!((m.blocks, m.span_blocks), (20, 20));
        let runs: Vec<_> = m
            .runs
            .iter()
            .map(|r| (r.first_index, r.at, r.blocks))
            .collect();
        assert_eq!(runs, [(1000, 0, 10), (2000, 10, 10)]);
        assert!(!cleaner.next_run(1));
    }

    /// A cleaner whose `todo` holds segment 1's live blocks, as `start_victim` leaves it, each
    /// given as (object, logical block, block in the segment, counted from `base`, the first
    /// block after the segment's header); returns the cleaner and `base`.
    fn cleaner_over(live: &[(&[u8], u64, u64)]) -> (Cleaner, u64) {
        let segment_size = 1 << 20;
        let sb = Superblock::for_device(
            SEGMENTS_START_BYTES + 4 * segment_size,
            segment_size,
            1,
            [3; 16],
        )
        .unwrap();
        let mut metadata = Metadata::new(sb);
        let base = sb.segment_offset(1) + 4096;
        for &(oid, logical, block) in live {
            if metadata.object(oid).is_none() {
                metadata.apply(&Delta::ObjectCreate { oid }).unwrap();
            }
            metadata
                .apply(&Delta::ExtentMap {
                    oid,
                    offset: logical * 4096,
                    physical: base + block * 4096,
                    blocks: 1,
                    crcs: &[0u8; 4],
                })
                .unwrap();
        }
        let mut cleaner = Cleaner::new();
        metadata.live_in_segment(1, &mut cleaner.todo);
        cleaner.todo.reverse();
        assert_eq!(cleaner.todo.len(), live.len());
        (cleaner, base)
    }

    /// Live blocks scattered as random overwrites leave them: a read spans dead gaps of up to
    /// `MOVE_GAP_BLOCKS_MAX` blocks, ends before a longer one, and never spans more than
    /// `MOVE_BLOCKS_MAX` blocks; runs split where the object or its logical order changes.
    #[test]
    fn copies_read_across_short_gaps() {
        let gap = MOVE_GAP_BLOCKS_MAX;
        // (object, logical block, block in the segment)
        let mut live = vec![
            (&b"a"[..], 7u64, 0u64),
            (b"a", 8, 1),
            (b"b", 3, 2),
            (b"a", 9, 3 + gap),
            // A gap one longer than allowed: a second read.
            (b"b", 4, 3 + gap + 1 + gap + 1),
        ];
        // Then, past a gap too long, live blocks every other block, more than one read spans.
        let start = 3 + gap + 1 + gap + 1 + 1 + gap + 1;
        for i in 0..MOVE_BLOCKS_MAX as u64 {
            live.push((b"a", 100 + i, start + 2 * i));
        }
        let (mut cleaner, base) = cleaner_over(&live);

        assert!(cleaner.next_run(0));
        let m = &cleaner.moves[0];
        assert_eq!(m.from, base);
        assert_eq!((m.blocks, m.span_blocks), (4, 4 + gap as u32));
        let runs: Vec<_> = m
            .runs
            .iter()
            .map(|r| (&r.oid[..], r.first_index, r.at, r.blocks))
            .collect();
        assert_eq!(
            runs,
            [
                (&b"a"[..], 7, 0, 2),
                (b"b", 3, 2, 1),
                (b"a", 9, 3 + gap as u32, 1)
            ],
            "a's blocks 8 and 9 are consecutive logically but not on the device: two runs"
        );
        assert_eq!(m.expected.len(), 4);

        // That read failed: its live blocks are read again without the dead blocks between
        // them (adjacent live blocks still share a read), in case the error lay in a dead one.
        let todo_before = cleaner.todo.len();
        assert!(cleaner.retry_without_gaps(0));
        assert_eq!(cleaner.todo.len(), todo_before + 4);
        let mut retried = vec![];
        for _ in 0..2 {
            assert!(cleaner.next_run(0));
            let m = &cleaner.moves[0];
            assert_eq!(m.span_blocks, m.blocks, "no dead block read again");
            retried.push((m.from, m.blocks, m.runs.len()));
        }
        assert_eq!(retried, [(base, 3, 2), (base + (3 + gap) * 4096, 1, 1)]);
        assert!(
            !cleaner.retry_without_gaps(0),
            "a read of live blocks only failed in a live block"
        );

        assert!(cleaner.next_run(1));
        let m = &cleaner.moves[1];
        assert_eq!((m.blocks, m.span_blocks, m.runs.len()), (1, 1, 1));
        assert_eq!(m.from, base + (3 + 2 * gap + 2) * 4096);

        // Every other block: 32 live blocks fit a read of at most 64.
        assert!(cleaner.next_run(2));
        let m = &cleaner.moves[2];
        assert_eq!(m.from, base + start * 4096);
        assert_eq!(m.blocks as usize, MOVE_BLOCKS_MAX / 2);
        assert_eq!(m.span_blocks as usize, MOVE_BLOCKS_MAX - 1);
        assert_eq!(m.runs.len(), MOVE_BLOCKS_MAX / 2, "a gap always ends a run");
        assert!(cleaner.next_run(3));
        assert_eq!(cleaner.moves[3].blocks as usize, MOVE_BLOCKS_MAX / 2);
        assert!(!cleaner.next_run(4));
    }

    /// Two copies in flight whose reads both fail are retried in the order they failed: the
    /// later copy's blocks then lie on top of `todo` before the earlier one's, out of device
    /// order. A copy must end there (CI's debug-build sim once hit an assertion on it), and
    /// every block must still be copied exactly once, without gaps.
    #[test]
    fn copies_retried_out_of_order_end_where_device_order_breaks() {
        let gap = MOVE_GAP_BLOCKS_MAX;
        // Two groups of three live blocks, one dead block apart inside a group, and more than
        // a gap between the groups: two copies.
        let second = 4 + gap + 2;
        let blocks = [0u64, 2, 4, second, second + 2, second + 4];
        let live: Vec<(&[u8], u64, u64)> = (0u64..)
            .zip(blocks)
            .map(|(i, b)| (&b"a"[..], i, b))
            .collect();
        let (mut cleaner, base) = cleaner_over(&live);
        assert!(cleaner.next_run(0));
        assert!(cleaner.next_run(1));
        assert_eq!(cleaner.moves[0].from, base);
        assert_eq!(cleaner.moves[1].from, base + second * 4096);
        assert!(cleaner.todo.is_empty());
        // Both fail; the first copy's blocks go back first, so they end up below the second's.
        assert!(cleaner.retry_without_gaps(0));
        assert!(cleaner.retry_without_gaps(1));
        let mut copied = vec![];
        let mut copies = 0;
        while cleaner.next_run(2) {
            let m = &cleaner.moves[2];
            assert_eq!(
                m.span_blocks, m.blocks,
                "no dead block read after a failure"
            );
            for run in &m.runs {
                for k in 0..run.blocks {
                    copied.push(m.from / 4096 + u64::from(run.at + k));
                }
            }
            copies += 1;
        }
        copied.sort_unstable();
        let expected: Vec<u64> = blocks.iter().map(|b| base / 4096 + b).collect();
        assert_eq!(copied, expected, "every live block, once");
        assert_eq!(copies, 6, "no dead gaps: a copy per live block");
    }
}
