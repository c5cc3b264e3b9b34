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
//!    `ExtentMove`s, mixed with client records. Each move applies only if the block is still
//!    where it was read, so a client write in between always wins.
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
use crate::segment::journal::{Journal, SegmentRole};
use crate::segment::metadata::{BlockRef, Metadata};

/// Completions with this bit set (and not the journal's or an op read's) are cleaner reads.
pub const CLEANER_TAG_BIT: u64 = 1 << 61;
/// Copies (read, then journaled) in progress at once: bounds the cleaner's buffers.
pub const MOVES_IN_FLIGHT_MAX: usize = 16;
/// Blocks per copy (one read request, one extent delta).
pub const MOVE_BLOCKS_MAX: usize = 64;

/// A victim must have at least this many dead blocks: copies that do not fit the tail of the
/// open segment wait for a fresh one, so cleaning a segment may leave up to one copy's worth
/// of blocks unused; a victim with less dead space than that could cost more than it frees,
/// and a cleaner that keeps picking such victims would never give clients room.
pub const VICTIM_DEAD_BLOCKS_MIN: u32 = MOVE_BLOCKS_MAX as u32 + 2;

/// Journal blocks that copying `live` blocks may take, at most: the blocks themselves, their
/// deltas and record heads (a copy can be a single block, with a delta of some 60 bytes: an
/// eighth more is generous), and the tail of the open segment if a copy did not fit it (the
/// cleaner opens at most one fresh segment per victim).
pub fn copy_blocks_bound(live: u32) -> u64 {
    let live = u64::from(live);
    live + live / 8 + MOVE_BLOCKS_MAX as u64 + 2
}

/// The data segment to empty next: the best cost-benefit score among data segments with at
/// least `VICTIM_DEAD_BLOCKS_MIN` dead blocks. `None` when there is none.
pub fn pick_victim(
    journal: &Journal,
    metadata: &Metadata,
    segments: std::ops::Range<u32>,
    blocks_per_segment: u32,
    skip: &[u32],
) -> Option<u32> {
    let now = journal.next_segment_seq();
    let mut best: Option<(f64, u32)> = None;
    for segment in segments {
        if journal.role(segment) != SegmentRole::Data || skip.contains(&segment) {
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

/// One copy: a run of blocks of one object, consecutive both logically and on the device.
pub struct Move {
    pub stage: MoveStage,
    pub oid: Box<[u8]>,
    pub first_index: u64,
    pub blocks: u32,
    pub from: u64,
    /// crc32c the metadata had for each block when the copy was planned.
    pub expected: Vec<u32>,
    /// crc32c of the bytes as read.
    pub actual: Vec<u32>,
    pub buf: Option<AlignedBuf>,
    pub read_failed: bool,
}

/// Counters the store reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanerStats {
    pub segments_cleaned: u64,
    /// Data segments freed without copying (every block already dead).
    pub segments_freed_empty: u64,
    pub blocks_moved: u64,
    pub bytes_moved: u64,
    /// Victims given up on (a block could not be read): they stay allocated.
    pub victims_abandoned: u64,
}

pub struct Cleaner {
    pub victim: Option<u32>,
    /// Live blocks of the victim still to copy, in device order (popped from the back).
    pub todo: Vec<(Box<[u8]>, u64, BlockRef)>,
    pub moves: Vec<Move>,
    pub free_moves: Vec<usize>,
    /// Segments whose blocks could not be read: not picked again until restart.
    pub stuck: Vec<u32>,
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
            todo: Vec::new(),
            moves: (0..MOVES_IN_FLIGHT_MAX)
                .map(|_| Move {
                    stage: MoveStage::Free,
                    oid: Box::default(),
                    first_index: 0,
                    blocks: 0,
                    from: 0,
                    expected: Vec::with_capacity(MOVE_BLOCKS_MAX),
                    actual: Vec::with_capacity(MOVE_BLOCKS_MAX),
                    buf: None,
                    read_failed: false,
                })
                .collect(),
            free_moves: (0..MOVES_IN_FLIGHT_MAX).rev().collect(),
            stuck: Vec::new(),
            stats: CleanerStats::default(),
        }
    }

    pub fn moves_in_flight(&self) -> usize {
        MOVES_IN_FLIGHT_MAX - self.free_moves.len()
    }

    pub fn active(&self) -> bool {
        self.victim.is_some() || self.moves_in_flight() > 0
    }

    /// Takes the next run to copy off `todo`: up to `MOVE_BLOCKS_MAX` blocks of one object,
    /// consecutive logically and physically. Fills `mv` (but not its buffer).
    pub fn next_run(&mut self, mv: usize) -> bool {
        let Some((oid, first_index, first)) = self.todo.pop() else {
            return false;
        };
        let m = &mut self.moves[mv];
        m.expected.clear();
        m.actual.clear();
        m.expected.push(first.crc);
        let mut blocks = 1u32;
        while let Some((next_oid, next_index, next)) = self.todo.last() {
            if blocks as usize == MOVE_BLOCKS_MAX
                || *next_oid != oid
                || *next_index != first_index + u64::from(blocks)
                || next.physical != first.physical + u64::from(blocks) * 4096
            {
                break;
            }
            m.expected.push(next.crc);
            blocks += 1;
            self.todo.pop();
        }
        m.oid = oid;
        m.first_index = first_index;
        m.blocks = blocks;
        m.from = first.physical;
        m.read_failed = false;
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
            pick_victim(&journal, &metadata, 0..8, blocks_per_segment, &[]),
            Some(2),
            "the emptier segment wins despite being younger"
        );
        assert_eq!(
            pick_victim(&journal, &metadata, 0..8, blocks_per_segment, &[2]),
            Some(1)
        );
        assert!(250 + VICTIM_DEAD_BLOCKS_MIN > blocks_per_segment);
        assert_eq!(
            pick_victim(&journal, &metadata, 0..8, blocks_per_segment, &[1, 2]),
            None,
            "a segment with fewer than VICTIM_DEAD_BLOCKS_MIN dead blocks is not worth a copy"
        );

        let mut cleaner = Cleaner::new();
        metadata.live_in_segment(2, &mut cleaner.todo);
        cleaner.todo.reverse();
        assert_eq!(cleaner.todo.len(), 20);
        assert!(cleaner.next_run(0));
        assert_eq!(
            (cleaner.moves[0].first_index, cleaner.moves[0].blocks),
            (1000, 10)
        );
        assert!(cleaner.next_run(1));
        assert_eq!(
            (cleaner.moves[1].first_index, cleaner.moves[1].blocks),
            (2000, 10)
        );
        assert!(!cleaner.next_run(2));
    }
}
