//! What lies after a shard's log end. A torn tail is normal after a crash; a *valid* record
//! after the end is not: it means the log was damaged in the middle, and replaying the prefix
//! would silently serve older data. fsck reports it; mount refuses the shard.

use std::collections::HashSet;

use crate::segment::format::{
    RecordHeader, SegmentHeader, Superblock, BLOCK_SIZE_BYTES, RECORD_FLAG_CHECKPOINT,
    RECORD_FLAG_OVERLAPS,
};
use crate::segment::scan::{records_after, BlockReader, LogRecord, ScanError, ShardLog};

/// Where the log's next record would go: the last journal segment and the offset after its
/// last record (or after its header).
pub fn next_position(sb: &Superblock, log: &ShardLog) -> Option<(SegmentHeader, u64)> {
    let last = log.segments.last()?;
    let after_last_record = log
        .records
        .iter()
        .rev()
        .find(|r| r.segment == last.segment)
        .map(|r| r.offset + u64::from(r.header.total_blocks()) * BLOCK_SIZE_BYTES);
    Some((
        *last,
        after_last_record.unwrap_or(sb.segment_offset(last.segment) + BLOCK_SIZE_BYTES),
    ))
}

/// The log's end as a phrase for messages.
pub fn end_text(sb: &Superblock, log: &ShardLog) -> String {
    match next_position(sb, log) {
        Some((segment, offset)) => format!(
            "record {} at offset {offset}, segment {}",
            log.next_record_seq, segment.segment
        ),
        None => "an empty log".to_string(),
    }
}

/// Valid records found after the end in one segment.
pub struct AfterEnd {
    pub segment: SegmentHeader,
    /// Whether the segment's header is valid (else it was rebuilt from its first record).
    pub header_valid: bool,
    /// Client records: each means damage before it.
    pub client: Vec<LogRecord>,
    /// The client record right after the log's end, written beside the torn record there
    /// (`RECORD_FLAG_OVERLAPS`): never acknowledged, a power cut's tail, not damage.
    pub unacknowledged: Vec<LogRecord>,
    /// Checkpoint records: a crash during a checkpoint can leave these (see below).
    pub checkpoint: Vec<LogRecord>,
}

/// Records after the log's end: in the rest of the segment where the log stops, in every
/// segment with a header after the end (`ShardLog::orphans`), and in segments without a valid
/// header whose first record comes after the end (their header was damaged).
///
/// Why a valid record there means damage, and not a torn tail: the writer has at most two
/// records in flight (`journal::RECORDS_IN_FLIGHT_MAX`), and seals a record beside another
/// only then; it marks such a record `RECORD_FLAG_OVERLAPS`. A crash can therefore tear or
/// lose only the last two records written: the log ends at the older one (record N), and the
/// newer (N + 1, marked) may have survived. That one is excused (`unacknowledged`): the writer
/// acknowledges a record only when it and every record before it are durable, so N + 1 was
/// never acknowledged. An unmarked N + 1, or anything from N + 2 on, was written after N was
/// durable: damage. (The price: damage to the second-to-last record of a log whose last
/// record is marked looks like a power cut's tail, and is not reported.) A segment header
/// goes alone, with nothing else in flight, and a record goes into a segment only once its
/// header is durable, so a crash while a segment is opened leaves its header torn and no
/// record, or its header whole and the log's next records after it (the scan follows them:
/// they are in the log, not an orphan). (Images from writers before that rule may hold a
/// torn header with the log's next record under it; that record is excused below.) After
/// a mount the writer continues in a fresh segment whose header starts at the next record
/// number, which the scan follows, so records of a later life of the shard are part of the log,
/// never after its end. Records of a segment's earlier life carry another `segment_seq` and are
/// not counted. So a valid record after the end, but the one excused, was written after the
/// end's record was durable:
/// that record was damaged since (a flipped bit, a lost write), and every record after it,
/// acknowledged ones included, is lost to replay.
///
/// The exception: a checkpoint's records go without a flush between them (only its last one
/// flushes, and nothing is acknowledged by them), so a crash in the middle of one may keep a
/// later checkpoint record and lose an earlier one. Valid checkpoint records after the end are
/// therefore reported as notes, not problems. (Also not covered, as too rare to tell from
/// damage: a checkpoint abandoned halfway for lack of space, then a crash before the next
/// client record's flush; and a process crash followed by a power loss before the next mount's
/// first flush, which may lose unflushed records that mount had read from the device's cache
/// and keep the new segment written after them.)
pub fn records_after_end(
    reader: &mut dyn BlockReader,
    sb: &Superblock,
    shard: u32,
    log: &ShardLog,
    buf: &mut Vec<u8>,
) -> Result<Vec<AfterEnd>, ScanError> {
    // (segment, where to look from, whether its header is valid)
    let mut places: Vec<(SegmentHeader, u64, bool)> = next_position(sb, log)
        .map(|(segment, from)| (segment, from, true))
        .into_iter()
        .collect();
    for orphan in &log.orphans {
        places.push((
            *orphan,
            sb.segment_offset(orphan.segment) + BLOCK_SIZE_BYTES,
            true,
        ));
    }
    let with_header: HashSet<u32> = log
        .segments
        .iter()
        .chain(&log.data_segments)
        .chain(&log.orphans)
        .map(|h| h.segment)
        .collect();
    let mut block = vec![0u8; BLOCK_SIZE_BYTES as usize];
    for segment in sb.shard_segments(shard) {
        if with_header.contains(&segment) {
            continue;
        }
        // One block per segment: never-used segments hold zeros or another filesystem's bytes.
        let first = sb.segment_offset(segment) + BLOCK_SIZE_BYTES;
        reader.read_at(first, &mut block).map_err(ScanError::Io)?;
        let Ok(header) = RecordHeader::decode(&block, sb.nonce()) else {
            continue;
        };
        if header.shard != shard || header.record_seq < log.next_record_seq {
            continue; // Stale: from before the log's end.
        }
        // The header this segment had, as its first record names it.
        let lost = SegmentHeader {
            nonce: sb.nonce(),
            shard,
            segment,
            segment_seq: header.segment_seq,
            first_record_seq: header.record_seq,
            replay_start_seq: 0,
            replay_start_offset: 0,
            cold: false,
        };
        places.push((lost, first, false));
    }
    let end_segment = next_position(sb, log).map(|(segment, _)| segment);
    let mut found_all = Vec::new();
    for (segment, from, header_valid) in places {
        let mut found = records_after(sb, &segment, from, &log.data_segments, reader, buf)?;
        if !header_valid {
            // The log's next record, alone in a segment whose header is torn: the crash hit
            // while the segment was being opened.
            found.retain(|r| r.header.record_seq > log.next_record_seq);
        }
        let (checkpoint, mut client): (Vec<LogRecord>, Vec<LogRecord>) = found
            .into_iter()
            .partition(|r| r.header.flags & RECORD_FLAG_CHECKPOINT != 0);
        // Only where the log ends: the record after its torn end, written beside it.
        let at_end = header_valid && Some(segment) == end_segment;
        let (unacknowledged, client): (Vec<LogRecord>, Vec<LogRecord>) =
            client.drain(..).partition(|r| {
                at_end
                    && r.header.record_seq == log.next_record_seq + 1
                    && r.header.flags & RECORD_FLAG_OVERLAPS != 0
            });
        if !client.is_empty() || !checkpoint.is_empty() || !unacknowledged.is_empty() {
            found_all.push(AfterEnd {
                segment,
                header_valid,
                client,
                unacknowledged,
                checkpoint,
            });
        }
    }
    Ok(found_all)
}
