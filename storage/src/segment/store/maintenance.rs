//! A shard's background work, run from `poll` between client work (no thread, no timer):
//! freeing data segments nothing lives in, sizing the reserve, asking the journal for
//! checkpoints, and the cleaner's copies (see `segment::cleaner` for the policy).

use super::*;
use crate::segment::btree::Key;
use crate::segment::cleaner::{MOVES_IN_FLIGHT_MAX, MOVE_BLOCKS_MAX};

/// Cleaning starts when free segments fall to the reserve plus this many, plus 1/16 of the
/// shard up to `CLEAN_AHEAD_SHARE_MAX`: early enough that clients rarely wait, late enough
/// that victims have died a bit. Bounded because free segments are room the cleaner cannot
/// use to let victims die, and the room needed to absorb a burst of writes while the cleaner
/// catches up depends on the write rate, not on capacity. (Unbounded, 1/16 of a 127-segment
/// shard kept 10 segments idle at 80% fill, 0.05-0.07 of write amplification at a 35% spare.)
const CLEAN_AHEAD_SEGMENTS: usize = 2;
const CLEAN_AHEAD_SHARE_MAX: usize = 2;
/// A checkpoint is written after the journal grew this many times the checkpoint's size: its
/// cost stays a small fraction of the bytes written. (A checkpoint is a full dump; at 8 it
/// was 15% of the client bytes under random 4 KiB overwrites at 60% fill, 2 GiB shard, since
/// the cleaner's copies grow the journal too; at 32 it is 2-4%. The journal segments this
/// keeps from the cleaner are the youngest, mostly live, which a victim pick would pass over
/// anyway; the price is a longer replay at mount, at most a quarter of the shard.)
const CHECKPOINT_INTERVAL_FACTOR: usize = 32;
const CHECKPOINT_INTERVAL_MIN_SEGMENTS: usize = 4;
/// Extents a step of the victim walk visits while I/O is in flight (~50 us): the walk of a
/// whole tree (~250k extents at 1 GiB stored) took ~2 ms, in which the shard completed and
/// submitted nothing, so the device sat idle once per victim (~45 victims a second at fill
/// 0.8). With nothing in flight there is nothing to stall and the walk runs to its end.
pub(super) const WALK_EXTENTS_PER_STEP: usize = 8192;

impl<Q: QueuePair> SegmentStore<Q> {
    /// Data blocks a segment holds (its first block is the header).
    pub(super) fn blocks_per_segment(&self) -> u32 {
        (self.sb.segment_size / BLOCK_SIZE_BYTES) as u32 - 1
    }

    fn clean_ahead(&self) -> usize {
        let shard = self.sb.shard_segments(self.shard).len();
        CLEAN_AHEAD_SEGMENTS + (shard / 16).min(CLEAN_AHEAD_SHARE_MAX)
    }

    /// Segments a checkpoint would take, as estimated when the journal last grew (the
    /// estimate walks every object: not something to do on each poll).
    fn checkpoint_segments(&self) -> usize {
        self.checkpoint_segments
    }

    /// Fresh segments a checkpoint written now would open: what does not fit the open
    /// segment's tail, plus the segment that publishes it.
    fn checkpoint_fresh_segments(&self) -> usize {
        let tail = self.journal.open_tail_blocks() * BLOCK_SIZE_BYTES;
        let rest = self.checkpoint_bytes.saturating_sub(tail);
        rest.div_ceil(self.sb.segment_size - BLOCK_SIZE_BYTES) as usize + 1
    }

    pub(super) fn maintain(&mut self) {
        if self.sweep_needed {
            self.sweep_needed = false;
            self.free_empty_data_segments();
        }
        self.size_reserve();
        let free = self.journal.free_segment_count();
        let low = free <= self.journal.reserve_segments + self.clean_ahead();
        let journal = &self.journal;
        self.cleaner
            .nodes_waiting
            .retain(|&s| journal.role(s) == SegmentRole::Data);
        if self.journal.checkpoint_idle() && self.journal.chain_len() >= 2 {
            // Segments written since the last checkpoint (the chain also holds the one it
            // starts in), while it leaves the cleaner a segment; or space short with nothing
            // else to clean; or cleaned segments wait for their tree nodes to move.
            let due = self.journal.chain_len() > self.checkpoint_interval
                && free >= self.checkpoint_segments() + 2;
            let starved = low
                && !self.cleaner.active()
                && self.usable_victim().is_none()
                && self.checkpoint_can_start();
            let relocate = !self.cleaner.nodes_waiting.is_empty()
                && free > self.checkpoint_fresh_segments() + 1;
            if due || starved || relocate {
                self.journal
                    .request_checkpoint(starved || (relocate && low));
                self.pump_journal();
            }
        }
        if low && self.journal.publish_waiting() {
            // Space is short: name the written checkpoint now, so that the journal segments
            // before it become cleanable, rather than when the open segment fills.
            self.journal.publish_now();
            self.pump_journal();
        }
        if low && self.cleaner.victim.is_none() {
            self.start_victim();
        }
        if low
            && self.cleaner.victim.is_none()
            && self.cleaner.moves_in_flight() == 0
            && !self.journal.batch_has_cold()
            && self.journal.cold_tail_blocks() >= u64::from(cleaner::VICTIM_DEAD_BLOCKS_MIN)
        {
            // Nothing to clean, and the cold head's tail is room only the cleaner could use:
            // leaving it makes that segment a victim with the tail counted dead (a small
            // shard's spare is a few segments: without this, random overwrites at high fill
            // ran out of space with every victim short of `VICTIM_DEAD_BLOCKS_MIN`).
            self.journal.leave_cold();
            self.extra.cold_heads_left += 1;
        }
        self.run_cleaner();
    }

    /// Whether a write that found no room should wait for the cleaner rather than fail: the
    /// cleaner or a checkpoint is at work, or one of them can start and bring space back, or
    /// records are on their way (their overwrites, once applied, leave blocks dead that may
    /// make a victim usable: with whole-block writes to one object journaled side by side,
    /// a window of overwrites can be in flight when the open segment fills).
    /// (Never true when nothing can move: a waiting write would wait forever.)
    pub(super) fn space_reclaimable(&self) -> bool {
        self.journal.records_in_flight() > 0
            || self.cleaner.active()
            || !self.journal.checkpoint_idle()
            || self.usable_victim().is_some()
            || self.checkpoint_can_start()
    }

    /// A checkpoint asked for because space is short takes its chunks and the fresh segment
    /// that publishes it (the cleaner then copies into that segment's tail), never the last
    /// free segment (see `OpAppender::placement`); it is worth it only if it makes a
    /// segment's worth of dead journal blocks cleanable.
    fn checkpoint_can_start(&self) -> bool {
        self.journal.chain_len() >= 2
            && self.journal.free_segment_count() > self.checkpoint_fresh_segments()
            && self.chain_dead_blocks() >= u64::from(self.blocks_per_segment())
    }

    /// The victim the cleaner would pick, if all its copies fit where the cleaner may write:
    /// a cleaner that ran out of room halfway would hold its victim and the last free
    /// segments, and nothing could move again.
    /// Returns the victim and whether its copies go to the cold head (`Cleaner::to_cold`).
    fn usable_victim(&self) -> Option<(u32, bool)> {
        let victim = cleaner::pick_victim(
            &self.journal,
            &self.metadata,
            self.sb.shard_segments(self.shard),
            self.blocks_per_segment(),
            &self.cleaner.stuck,
            &self.cleaner.nodes_waiting,
        )?;
        // The cleaner copies into its cold head's tail and at most one fresh cold segment,
        // never the last free one: a victim copied so gives back at least the segment it
        // took, so cleaning never leaves less free space than it found, even when a crash
        // interrupts it (the copies made are durable; the victim is simply less live after
        // replay). The copies' deltas go in the clients' head: its tail, or a fresh segment
        // too if the tail is short, which then holds the heads of many victims to come (an
        // eighth of a victim's blocks at most, ~1/60 in practice). Both fresh segments are
        // taken only with a third left free.
        // With one free segment left, the copies may still go where they went before the
        // cold head existed: after the record heads, in the clients' head's tail.
        let live = self.metadata.live_blocks(victim);
        let free = self.journal.free_segment_count();
        let (cold, heads) = (
            cleaner::copy_cold_blocks_bound(live),
            cleaner::copy_head_blocks_bound(live),
        );
        debug_assert!(
            cold <= u64::from(self.blocks_per_segment()),
            "a victim's copies fit a fresh segment (it has VICTIM_DEAD_BLOCKS_MIN dead blocks)"
        );
        let cold_fresh = cold > self.journal.cold_tail_blocks();
        let head_fresh = heads > self.journal.open_tail_blocks();
        if self.cold_head
            && free > self.journal.reserve_segments
            && (!cold_fresh || free >= 2)
            && (!head_fresh || free >= 2 + usize::from(cold_fresh))
        {
            return Some((victim, true));
        }
        let fresh = if free >= 2 {
            u64::from(self.blocks_per_segment())
        } else {
            0
        };
        (cold + heads <= self.journal.open_tail_blocks() + fresh).then_some((victim, false))
    }

    /// Dead blocks in journal segments other than the newest: a checkpoint would make them
    /// cleanable.
    fn chain_dead_blocks(&self) -> u64 {
        let chain = self.journal.chain();
        let count = chain.len().saturating_sub(1);
        chain
            .take(count)
            .map(|&s| {
                u64::from(
                    self.blocks_per_segment()
                        .saturating_sub(self.metadata.live_blocks(s)),
                )
            })
            .sum()
    }

    fn size_reserve(&mut self) {
        let chain = self.journal.chain_len();
        if chain == self.sized_at_chain_len {
            return;
        }
        self.sized_at_chain_len = chain;
        let bytes = self.metadata.checkpoint_bytes_estimate();
        let checkpoint = bytes.div_ceil(self.sb.segment_size - BLOCK_SIZE_BYTES) as usize;
        self.checkpoint_segments = checkpoint;
        self.checkpoint_bytes = bytes;
        // Where clients stop, either a checkpoint (its segments and the one that publishes
        // it) or the cleaner (one segment to copy a victim into) can still work, and one
        // segment is left that neither takes (see `OpAppender::placement`).
        self.journal.reserve_segments = checkpoint + 2;
        let shard = self.sb.shard_segments(self.shard).len();
        self.checkpoint_interval = (CHECKPOINT_INTERVAL_FACTOR * checkpoint)
            .max(CHECKPOINT_INTERVAL_MIN_SEGMENTS)
            .min((shard / 4).max(2));
    }

    fn free_empty_data_segments(&mut self) {
        for segment in self.sb.shard_segments(self.shard) {
            if self.journal.role(segment) == SegmentRole::Data
                && self.metadata.live_blocks(segment) == 0
                && self.readers[segment as usize] == 0
                && self.cleaner.victim != Some(segment)
            {
                self.journal.release(segment);
                self.cleaner.stats.segments_freed_empty += 1;
            }
        }
    }

    fn start_victim(&mut self) {
        let Some((victim, to_cold)) = self.usable_victim() else {
            return;
        };
        self.cleaner.to_cold = to_cold;
        debug_assert_eq!(self.cleaner.moves_in_flight(), 0);
        self.cleaner.todo.clear();
        self.cleaner.victim = Some(victim);
        self.cleaner.walk_from = Some(Key::default());
        self.cleaner.gapless_until = 0;
    }

    /// A step of the walk for the victim's live blocks, run after the pass's I/O went out
    /// (see `WALK_EXTENTS_PER_STEP`). The walk's end sorts them into device order.
    pub(super) fn walk_victim(&mut self) {
        let (Some(victim), Some(from)) = (self.cleaner.victim, self.cleaner.walk_from) else {
            return;
        };
        let budget = if self.qp.in_flight() > 0 {
            self.walk_step_extents
        } else {
            usize::MAX
        };
        self.cleaner.walk_from =
            self.metadata
                .live_in_segment_step(victim, from, budget, &mut self.cleaner.todo);
        self.cleaner.stats.walk_steps += 1;
        if self.cleaner.walk_from.is_none() {
            // Popped from the back: sorted in reverse so copies go in device order.
            self.cleaner
                .todo
                .sort_unstable_by_key(|(_, _, block)| std::cmp::Reverse(block.physical));
            log::debug!(
                "shard {}: cleaning segment {victim} ({} live blocks)",
                self.shard,
                self.cleaner.todo.len()
            );
        }
    }

    fn run_cleaner(&mut self) {
        let Some(victim) = self.cleaner.victim else {
            return;
        };
        if self.cleaner.walk_from.is_some() {
            return;
        }
        for mv in 0..MOVES_IN_FLIGHT_MAX {
            match self.cleaner.moves[mv].stage {
                MoveStage::Blocked => self.journal_move(mv),
                MoveStage::Unsubmitted => self.submit_move_read(mv),
                _ => {}
            }
        }
        while let Some(&mv) = self.cleaner.free_moves.last() {
            if !self.cleaner.next_run(mv) {
                break;
            }
            self.cleaner.free_moves.pop();
            let span = self.cleaner.moves[mv].span_blocks;
            debug_assert!(span as usize <= MOVE_BLOCKS_MAX);
            self.cleaner.moves[mv].buf = Some(self.pool.take(u64::from(span)));
            self.cleaner.moves[mv].stage = MoveStage::Unsubmitted;
            self.readers[victim as usize] += 1;
            self.submit_move_read(mv);
        }
        if self.cleaner.todo.is_empty() && self.cleaner.moves_in_flight() == 0 {
            let live = self.metadata.live_blocks(victim);
            if live == 0 {
                if self.readers[victim as usize] == 0 {
                    self.cleaner.victim = None;
                    self.journal.release(victim);
                    self.cleaner.stats.segments_cleaned += 1;
                }
            } else if live == self.metadata.node_blocks(victim) {
                // Only tree nodes are left: a checkpoint moves them, and the segment is freed
                // as an empty data segment once the header naming it is durable.
                debug_assert!(!self.cleaner.nodes_waiting.contains(&victim));
                self.cleaner.victim = None;
                self.cleaner.nodes_waiting.push(victim);
            } else {
                log::error!(
                    "shard {}: segment {victim} keeps {} blocks that could not be read; it stays allocated",
                    self.shard,
                    self.metadata.live_blocks(victim)
                );
                self.cleaner.victim = None;
                self.cleaner.stuck.push(victim);
                self.cleaner.stats.victims_abandoned += 1;
            }
        }
    }

    fn submit_move_read(&mut self, mv: usize) {
        let m = &mut self.cleaner.moves[mv];
        let buf = m.buf.as_mut().expect("a move being read has a buffer");
        // SAFETY: the buffer stays in the move, untouched, until the read completes
        // (`move_read`), and until the journal reports the copy durable after that.
        let iovec = unsafe { buf.io_vec_at(0, m.span_blocks as usize * BLOCK_SIZE_BYTES as usize) };
        match self
            .qp
            .submit_read(m.from, &[iovec], CLEANER_TAG_BIT | mv as u64)
        {
            Ok(()) => {
                m.stage = MoveStage::Reading;
                self.cleaner.stats.reads += 1;
                self.cleaner.stats.blocks_read += u64::from(m.span_blocks);
            }
            Err(SubmitError::QueueFull) => m.stage = MoveStage::Unsubmitted,
            Err(error) => panic!("cleaner read request malformed: {error}"),
        }
    }

    /// A cleaner read completed: check what was read, then journal the copy.
    pub(super) fn move_read(&mut self, tag: u64, result: Result<(), IoError>) {
        let mv = (tag & !CLEANER_TAG_BIT) as usize;
        let m = &mut self.cleaner.moves[mv];
        debug_assert_eq!(m.stage, MoveStage::Reading);
        let segment = self.sb.segment_at(m.from).expect("victims are inside");
        self.readers[segment as usize] -= 1;
        self.sweep_needed = true;
        if let Err(error) = result {
            self.extra.read_errors += 1;
            log::error!(
                "shard {}: cleaner read of {} blocks at {} failed: {error}",
                self.shard,
                m.span_blocks,
                m.from
            );
            if self.cleaner.retry_without_gaps(mv) {
                log::info!(
                    "shard {}: the cleaner reads those live blocks again without the dead ones between them",
                    self.shard
                );
            }
            self.move_done(mv, false);
            return;
        }
        let buf = m.buf.as_ref().expect("read into it");
        m.actual.clear();
        // Only the live blocks are hashed and used: the dead ones the read spanned have no crc
        // in the metadata and never leave this buffer.
        for run in &m.runs {
            for index in 0..run.blocks {
                let at = (run.at + index) as usize * BLOCK_SIZE_BYTES as usize;
                let crc = carmine_crc::crc32c(&buf[at..][..BLOCK_SIZE_BYTES as usize]);
                if crc != m.expected[m.actual.len()] {
                    // Rot: the copy keeps the metadata's crc, so a read of it still fails
                    // (never wrong bytes), and fsck still reports it.
                    self.extra.checksum_errors += 1;
                    log::error!(
                        "shard {}: checksum mismatch in object {:?} block {} at device offset {} (found by the cleaner)",
                        self.shard,
                        String::from_utf8_lossy(&run.oid),
                        run.first_index + u64::from(index),
                        m.from + at as u64
                    );
                }
                m.actual.push(crc);
            }
        }
        debug_assert_eq!(m.actual.len(), m.blocks as usize);
        m.stage = MoveStage::Blocked;
        self.journal_move(mv);
    }

    fn journal_move(&mut self, mv: usize) {
        if self.journal.has_failed() {
            self.move_done(mv, false);
            return;
        }
        // Batch full: tried again after the next record.
        let Ok(mut op) = self.journal.append() else {
            return;
        };
        let m = &mut self.cleaner.moves[mv];
        let buf = m.buf.as_mut().expect("a read move has its buffer");
        let mut crcs = &m.actual[..];
        for run in &m.runs {
            let at = run.at as usize * BLOCK_SIZE_BYTES as usize;
            // SAFETY: the buffer stays in the move, unmodified, until the journal reports this
            // op (`move_done`), which is when it goes back to the pool.
            let iovec =
                unsafe { buf.io_vec_at(at, run.blocks as usize * BLOCK_SIZE_BYTES as usize) };
            let (run_crcs, rest) = crcs.split_at(run.blocks as usize);
            crcs = rest;
            // SAFETY: as above.
            let appended = unsafe {
                op.moved_extent(
                    &run.oid,
                    run.first_index * BLOCK_SIZE_BYTES,
                    m.from + at as u64,
                    iovec,
                    run_crcs,
                    self.cleaner.to_cold,
                )
            };
            if appended.is_err() {
                // Batch full: dropped (rolled back, every run of it), tried again.
                return;
            }
        }
        if op.placement(true).is_err() {
            // No room even in the reserve: dropped (rolled back), tried again.
            return;
        }
        op.commit(CLEANER_TAG_BIT | mv as u64);
        m.stage = MoveStage::Journaled;
    }

    /// The copy's record is durable (or the copy failed): its buffer goes back.
    pub(super) fn move_done(&mut self, mv: usize, moved: bool) {
        let m = &mut self.cleaner.moves[mv];
        if moved {
            self.cleaner.stats.blocks_moved += u64::from(m.blocks);
            if self.cleaner.to_cold {
                self.cleaner.stats.blocks_moved_cold += u64::from(m.blocks);
            }
        }
        if let Some(buf) = m.buf.take() {
            self.pool.give(buf);
        }
        m.stage = MoveStage::Free;
        self.cleaner.free_moves.push(mv);
    }
}
