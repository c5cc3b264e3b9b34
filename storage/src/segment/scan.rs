//! Scanning a shard's log at mount (and in fsck): which records survive, in which order, and
//! where the log ends.
//!
//! Rules, which the journal writer keeps and this scanner relies on:
//! - A segment joins the log when its header is written, and the header is durable before any
//!   record goes into it (so every record lies under a header the scan sees). Headers carry a
//!   per-shard `segment_seq`: the log's segment order is the header order, whatever the
//!   segment numbers.
//! - Records carry a per-shard `record_seq` that grows by exactly one, across segments.
//! - A record is acknowledged only after it and every earlier record are durable.
//! - A segment is freed only once it lies before the replay start that a durable header names
//!   (and holds no live block); its stale header is then older than the replay start's
//!   segment, so its records are never replayed, and reusing it writes a new header.
//!
//! So the log is the longest chain of valid records with consecutive sequence numbers, starting
//! at the replay start (the newest checkpoint a header names) or, without one, at the oldest
//! segment's first record. The first record that is missing, torn, stale (left
//! from the segment's previous life: its `segment_seq` differs) or foreign ends the chain; what
//! follows was never acknowledged and is discarded.
//!
//! Mount-time scanning reads synchronously through `BlockReader`; it is not the data path.

use std::collections::VecDeque;
use std::io;

use crate::segment::journal::RECORDS_IN_FLIGHT_MAX;

use crate::segment::format::{
    RecordHeader, SegmentHeader, Superblock, BLOCK_SIZE_BYTES, RECORD_DATA_BLOCKS_MAX,
    RECORD_HEADER_SIZE_BYTES, RECORD_METADATA_MAX_BYTES,
};

/// Synchronous reads of whole blocks at block-aligned device offsets.
pub trait BlockReader {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl<T: BlockReader + ?Sized> BlockReader for &mut T {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
}

/// A plain byte image is a device (tests, and the `mem` queue pair's power-cut images).
impl BlockReader for &[u8] {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let source = self
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(source);
        Ok(())
    }
}

/// A record that belongs to the log, with where it lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub header: RecordHeader,
    pub segment: u32,
    /// Device offset of the record's first block.
    pub offset: u64,
}

/// Why the log ends where it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogEnd {
    /// Nothing was ever written (no segment has a header).
    Empty,
    /// The next position holds no record of this log: the clean end, or a torn or stale record.
    Stop {
        segment: u32,
        offset: u64,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLog {
    /// Segments holding the log's records, in log order (ascending `segment_seq`).
    pub segments: Vec<SegmentHeader>,
    /// Segments opened before the one holding the replay start: not replayed; they hold the
    /// data blocks the metadata points at (a segment here with no live block is free).
    pub data_segments: Vec<SegmentHeader>,
    /// Segments with a header but after the log's end: nothing in them was acknowledged, so
    /// they are free. (The writer never appends into a segment after a mount: it opens a new
    /// one, so a torn tail is never overwritten in place.)
    pub orphans: Vec<SegmentHeader>,
    pub records: Vec<LogRecord>,
    pub end: LogEnd,
    pub next_record_seq: u64,
    /// Greater than every header seen, orphans included, so a new segment never collides.
    pub next_segment_seq: u64,
    /// (record seq, device offset) replay started at; (0, 0) when the log has no checkpoint.
    pub replay_start: (u64, u64),
}

#[derive(Debug)]
pub enum ScanError {
    Io(io::Error),
    /// Two segments claim the same place in the log: metadata corruption, not a torn write.
    DuplicateSegmentSeq {
        seq: u64,
        segments: (u32, u32),
    },
    /// A segment header names a checkpoint that is not on the device.
    MissingCheckpoint {
        seq: u64,
        offset: u64,
    },
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanError::Io(error) => write!(f, "read failed: {error}"),
            ScanError::DuplicateSegmentSeq { seq, segments } => {
                write!(
                    f,
                    "segments {} and {} both claim log position {seq}",
                    segments.0, segments.1
                )
            }
            ScanError::MissingCheckpoint { seq, offset } => write!(
                f,
                "the log's checkpoint (record {seq} at device offset {offset}) is missing or damaged"
            ),
        }
    }
}

impl std::error::Error for ScanError {}

/// Segment headers of a shard, in log order. Segments without a valid header are free.
pub fn read_segment_headers(
    sb: &Superblock,
    shard: u32,
    reader: &mut dyn BlockReader,
) -> Result<Vec<SegmentHeader>, ScanError> {
    let mut block = vec![0u8; BLOCK_SIZE_BYTES as usize];
    let mut headers = Vec::new();
    for segment in sb.shard_segments(shard) {
        reader
            .read_at(sb.segment_offset(segment), &mut block)
            .map_err(ScanError::Io)?;
        if let Ok(header) = SegmentHeader::decode(&block, sb.nonce(), segment) {
            if header.shard == shard {
                headers.push(header);
            }
        }
    }
    headers.sort_by_key(|h| h.segment_seq);
    for pair in headers.windows(2) {
        if pair[0].segment_seq == pair[1].segment_seq {
            return Err(ScanError::DuplicateSegmentSeq {
                seq: pair[0].segment_seq,
                segments: (pair[0].segment, pair[1].segment),
            });
        }
    }
    Ok(headers)
}

/// Walks the shard's log. `visit` sees each record's verified deltas, in order, before the scan
/// moves on (replay applies them; fsck checks them).
///
/// Replay starts at the newest checkpoint any segment header names (the writer names one only
/// once it is durable), or at the oldest segment's first record when none does. Segments older
/// than the one holding the replay start are not replayed: they hold data blocks the
/// checkpoint's extent maps point at (`ShardLog::data_segments`), or nothing live at all.
pub fn scan_shard(
    sb: &Superblock,
    shard: u32,
    reader: &mut dyn BlockReader,
    visit: &mut dyn FnMut(&LogRecord, &[u8]),
) -> Result<ShardLog, ScanError> {
    let mut segments = read_segment_headers(sb, shard, reader)?;
    let next_segment_seq = segments.last().map_or(1, |last| last.segment_seq + 1);
    // Cold segments (the cleaner's head) hold data blocks only: never part of the chain,
    // listed with the data segments, which is what they are.
    let cold: Vec<SegmentHeader> = segments.iter().filter(|h| h.cold).copied().collect();
    segments.retain(|h| !h.cold);
    let start = segments
        .iter()
        .map(|h| (h.replay_start_seq, h.replay_start_offset))
        .max()
        .filter(|&(seq, _)| seq != 0);
    let mut data_segments = Vec::new();
    let mut first_offset = None;
    if let Some((seq, offset)) = start {
        // The segment holding the checkpoint: every segment opened before it is a data segment.
        let holder = sb.segment_at(offset);
        let position = segments
            .iter()
            .position(|h| Some(h.segment) == holder && h.first_record_seq <= seq)
            .ok_or(ScanError::MissingCheckpoint { seq, offset })?;
        data_segments = segments.drain(..position).collect();
        first_offset = Some(offset);
    }
    let journal_next_segment_seq = segments.last().map_or(0, |last| last.segment_seq + 1);
    data_segments.extend_from_slice(&cold);
    let mut log = ShardLog {
        segments: Vec::with_capacity(segments.len()),
        data_segments,
        orphans: Vec::new(),
        records: Vec::new(),
        end: LogEnd::Empty,
        next_record_seq: start.map_or_else(
            || segments.first().map_or(1, |first| first.first_record_seq),
            |(seq, _)| seq,
        ),
        next_segment_seq,
        replay_start: start.unwrap_or((0, 0)),
    };
    let mut buf = Vec::new();
    // Records read but not yet visited: the last `RECORDS_IN_FLIGHT_MAX`, whose cold runs are
    // checked once the chain's end is known (`check_cold_at_end`).
    let mut unchecked: VecDeque<(LogRecord, Vec<u8>)> =
        VecDeque::with_capacity(RECORDS_IN_FLIGHT_MAX + 1);
    let mut remaining = segments.drain(..);
    for segment in remaining.by_ref() {
        let from = first_offset.take();
        if from.is_none()
            && segment.first_record_seq < log.next_record_seq
            && unchecked
                .front()
                .is_some_and(|(r, _)| r.header.record_seq <= segment.first_record_seq)
        {
            // An earlier mount ended the log at `first_record_seq` because that record's
            // cold run was torn (`check_cold_at_end`), and its writer continued from there in
            // this fresh segment. The discarded records still have valid heads, so the walk
            // took them: they are the last ones read, never visited, and this segment
            // supersedes them.
            while unchecked
                .back()
                .is_some_and(|(r, _)| r.header.record_seq >= segment.first_record_seq)
            {
                unchecked.pop_back();
            }
            log.next_record_seq = segment.first_record_seq;
        }
        if from.is_none() && segment.first_record_seq != log.next_record_seq {
            // The writer opens a segment with the next sequence number; a mismatch means the
            // earlier segment's tail records were lost, so this segment's never counted.
            log.end = LogEnd::Stop {
                segment: segment.segment,
                offset: sb.segment_offset(segment.segment),
                reason: format!(
                    "segment starts at record {} but the log continues at {}",
                    segment.first_record_seq, log.next_record_seq
                ),
            };
            log.orphans.push(segment);
            break;
        }
        log.segments.push(segment);
        let more = journal_next_segment_seq > segment.segment_seq + 1;
        if let Some(stop) = scan_segment(
            sb,
            &segment,
            from,
            more,
            reader,
            &mut buf,
            &mut log,
            &mut unchecked,
            visit,
        )? {
            log.end = stop;
            break;
        }
    }
    log.orphans.extend(remaining);
    check_cold_at_end(sb, &cold, reader, &mut log, &mut unchecked, visit)?;
    if start.is_some() && log.records.is_empty() {
        // The checkpoint a durable header names is not there: corruption, not a torn tail.
        let (seq, offset) = log.replay_start;
        return Err(ScanError::MissingCheckpoint { seq, offset });
    }
    Ok(log)
}

/// The chain's last records, whose cold runs (`RecordHeader::cold_offset`) are checked now:
/// the first that fails ends the log there, as a torn record does, and it and what follows
/// are dropped; the others are visited and join the log.
///
/// Why only the last `RECORDS_IN_FLIGHT_MAX`: the writer seals record M only when fewer
/// than that many records are in flight, so every record up to M - 2 was durable, cold run
/// included, before M was written, and a valid M proves it. Such a record's cold run may
/// since have been overwritten, legitimately: once its moved blocks died (client writes in
/// later records), its cold segment was freed and reused while the record itself stays in
/// the log until a checkpoint (`carmine sim --seed 6` found this when every cold run was
/// checked). Its moves then replay onto blocks that later records remap, so those bytes
/// are never read; and every live block keeps its own crc in the metadata (reads and fsck
/// check it). Only the last records can have a torn cold run, and none of them can have had
/// its cold segment reused (that takes later records that kill its blocks).
fn check_cold_at_end(
    sb: &Superblock,
    cold: &[SegmentHeader],
    reader: &mut dyn BlockReader,
    log: &mut ShardLog,
    unchecked: &mut VecDeque<(LogRecord, Vec<u8>)>,
    visit: &mut dyn FnMut(&LogRecord, &[u8]),
) -> Result<(), ScanError> {
    while let Some((record, deltas)) = unchecked.pop_front() {
        if let Err(reason) = check_cold(sb, &record.header, cold, reader)? {
            log.end = LogEnd::Stop {
                segment: record.segment,
                offset: record.offset,
                reason,
            };
            log.next_record_seq = record.header.record_seq;
            unchecked.clear();
            // Segments opened after the dropped record hold nothing of the log. (None can
            // exist: a segment opens with nothing in flight, so the record before it was
            // durable whole. Kept for images a future writer might leave.)
            if let Some(at) = log
                .segments
                .iter()
                .position(|h| h.segment == record.segment)
            {
                let after: Vec<SegmentHeader> = log.segments.drain(at + 1..).collect();
                log.orphans.splice(0..0, after);
            }
            return Ok(());
        }
        visit(&record, &deltas);
        log.records.push(record);
    }
    Ok(())
}

/// Appends the segment's records to the log. Returns where the log stops, if it stops here.
/// `more`: journal segments follow this one. Records go through `unchecked` (see
/// `check_cold_at_end`): each is visited once `RECORDS_IN_FLIGHT_MAX` more follow it.
#[allow(clippy::too_many_arguments)]
fn scan_segment(
    sb: &Superblock,
    segment: &SegmentHeader,
    from: Option<u64>,
    more: bool,
    reader: &mut dyn BlockReader,
    buf: &mut Vec<u8>,
    log: &mut ShardLog,
    unchecked: &mut VecDeque<(LogRecord, Vec<u8>)>,
    visit: &mut dyn FnMut(&LogRecord, &[u8]),
) -> Result<Option<LogEnd>, ScanError> {
    let segment_end = sb.segment_offset(segment.segment) + sb.segment_size;
    let mut offset = from.unwrap_or(sb.segment_offset(segment.segment) + BLOCK_SIZE_BYTES);
    loop {
        match read_record(
            sb,
            segment,
            offset,
            segment_end,
            log.next_record_seq,
            reader,
            buf,
        )? {
            Ok(header) => {
                let record = LogRecord {
                    header,
                    segment: segment.segment,
                    offset,
                };
                let deltas =
                    buf[RECORD_HEADER_SIZE_BYTES..][..header.metadata_len as usize].to_vec();
                unchecked.push_back((record, deltas));
                if unchecked.len() > RECORDS_IN_FLIGHT_MAX {
                    let (record, deltas) = unchecked.pop_front().expect("not empty");
                    visit(&record, &deltas);
                    log.records.push(record);
                }
                log.next_record_seq += 1;
                offset += u64::from(header.total_blocks()) * BLOCK_SIZE_BYTES;
            }
            // The writer moved on to the next segment (it does when a record no longer fits):
            // the log continues there, if that segment starts with the next record.
            Err(_) if more => return Ok(None),
            Err(reason) => {
                return Ok(Some(LogEnd::Stop {
                    segment: segment.segment,
                    offset,
                    reason,
                }))
            }
        }
    }
}

/// Valid records of `segment`'s current life (its `segment_seq`) at or after device offset
/// `from`, found by trying every block position up to the segment's end (fsck: a record past
/// the log's end means the log was damaged before it). A record found is skipped whole, so
/// data blocks inside it that happen to look like a record are not taken for one. The range is
/// read with one read; `buf` is scratch.
pub fn records_after(
    sb: &Superblock,
    segment: &SegmentHeader,
    from: u64,
    cold: &[SegmentHeader],
    reader: &mut dyn BlockReader,
    buf: &mut Vec<u8>,
) -> Result<Vec<LogRecord>, ScanError> {
    let segment_end = sb.segment_offset(segment.segment) + sb.segment_size;
    let mut found = Vec::new();
    if from >= segment_end {
        return Ok(found);
    }
    let mut area = vec![0u8; (segment_end - from) as usize];
    reader.read_at(from, &mut area).map_err(ScanError::Io)?;
    let mut image = Window {
        bytes: &area,
        base: from,
    };
    let block = BLOCK_SIZE_BYTES as usize;
    let mut offset = from;
    while offset < segment_end {
        let at = (offset - from) as usize;
        let candidate = RecordHeader::decode(&area[at..at + block], sb.nonce())
            .ok()
            .filter(|h| h.segment_seq == segment.segment_seq && h.shard == segment.shard);
        if let Some(candidate) = candidate {
            let checked = read_record(
                sb,
                segment,
                offset,
                segment_end,
                candidate.record_seq,
                &mut image,
                buf,
            )?;
            let checked = match checked {
                Ok(header) => check_cold(sb, &header, cold, reader)?.map(|()| header),
                Err(reason) => Err(reason),
            };
            if let Ok(header) = checked {
                found.push(LogRecord {
                    header,
                    segment: segment.segment,
                    offset,
                });
                offset += u64::from(header.total_blocks()) * BLOCK_SIZE_BYTES;
                continue;
            }
        }
        offset += BLOCK_SIZE_BYTES;
    }
    Ok(found)
}

/// Bytes read from the device at `base`, read again through `BlockReader`.
struct Window<'a> {
    bytes: &'a [u8],
    base: u64,
}

impl BlockReader for Window<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = offset
            .checked_sub(self.base)
            .and_then(|start| usize::try_from(start).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut bytes = self.bytes;
        bytes.read_at(start as u64, buf)
    }
}

/// Checks a record's cold run (`RecordHeader::cold_offset`): inside one cold segment of the
/// record's shard, past its header, under the header the record names, and its crc. The
/// outer error is an I/O failure; the inner one says why the record is not valid (a torn
/// cold write, or damage), which ends the log as a torn record does.
///
/// Why the cold header must match: a cold segment's header goes in the same write as its
/// first cold run, so a power cut may keep the run and tear the header (the record was not
/// acknowledged: its flush had not completed). Replaying such a record would map blocks into
/// a segment with no valid header, which mount would hand out as free space.
pub fn check_cold(
    sb: &Superblock,
    header: &RecordHeader,
    cold: &[SegmentHeader],
    reader: &mut dyn BlockReader,
) -> Result<Result<(), String>, ScanError> {
    if header.cold_blocks == 0 {
        return Ok(Ok(()));
    }
    let bytes = u64::from(header.cold_blocks) * BLOCK_SIZE_BYTES;
    let Some(segment) = sb.segment_at(header.cold_offset) else {
        return Ok(Err(format!(
            "record {}: cold run at {} lies outside the segments",
            header.record_seq, header.cold_offset
        )));
    };
    let start = sb.segment_offset(segment);
    let named = cold.iter().find(|h| {
        h.cold
            && h.segment == segment
            && h.shard == header.shard
            && h.segment_seq == header.cold_segment_seq
    });
    if named.is_none()
        || header.cold_offset < start + BLOCK_SIZE_BYTES
        || header.cold_offset + bytes > start + sb.segment_size
    {
        return Ok(Err(format!(
            "record {}: cold run at {} ({} blocks) is not in cold segment {segment} of sequence {}",
            header.record_seq, header.cold_offset, header.cold_blocks, header.cold_segment_seq
        )));
    }
    let mut data = vec![0u8; bytes as usize];
    reader
        .read_at(header.cold_offset, &mut data)
        .map_err(ScanError::Io)?;
    Ok(header.verify_cold(&data).map_err(|error| error.to_string()))
}

/// Reads and checks the record at `offset`. The outer error is an I/O failure; the inner one
/// says why there is no valid record here (the end of the log).
fn read_record(
    sb: &Superblock,
    segment: &SegmentHeader,
    offset: u64,
    segment_end: u64,
    expected_seq: u64,
    reader: &mut dyn BlockReader,
    buf: &mut Vec<u8>,
) -> Result<Result<RecordHeader, String>, ScanError> {
    let block = BLOCK_SIZE_BYTES as usize;
    if offset + BLOCK_SIZE_BYTES > segment_end {
        return Ok(Err("segment full".into()));
    }
    buf.resize(block, 0);
    reader
        .read_at(offset, &mut buf[..block])
        .map_err(ScanError::Io)?;
    let header = match RecordHeader::decode(&buf[..block], sb.nonce()) {
        Ok(header) => header,
        Err(error) => return Ok(Err(error.to_string())),
    };
    if header.record_seq != expected_seq
        || header.segment_seq != segment.segment_seq
        || header.shard != segment.shard
    {
        return Ok(Err(format!(
            "record {} of segment seq {} is not the next record {expected_seq}",
            header.record_seq, header.segment_seq
        )));
    }
    debug_assert!(
        header.metadata_len <= RECORD_METADATA_MAX_BYTES
            && header.data_blocks <= RECORD_DATA_BLOCKS_MAX
    );
    let total = u64::from(header.total_blocks()) * BLOCK_SIZE_BYTES;
    if offset + total > segment_end {
        return Ok(Err("record runs past the end of its segment".into()));
    }
    buf.resize(total as usize, 0);
    reader.read_at(offset, buf).map_err(ScanError::Io)?;
    let head_len = header.head_blocks() as usize * block;
    if let Err(error) = header.verify_head(&buf[..head_len]) {
        return Ok(Err(error.to_string()));
    }
    if let Err(error) = header.verify_data(&buf[head_len..]) {
        return Ok(Err(error.to_string()));
    }
    Ok(Ok(header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::format::{Delta, DeltaReader, SEGMENTS_START_BYTES};

    const SEGMENT_SIZE: u64 = 1 << 20;

    /// Lays out a device image the way the journal writer does.
    struct Image {
        sb: Superblock,
        bytes: Vec<u8>,
        next_record_seq: u64,
        /// (segment header, next free offset)
        open: Option<(SegmentHeader, u64)>,
        /// What the next segment header names as the replay start.
        replay_start: (u64, u64),
    }

    impl Image {
        fn new() -> Image {
            let size = SEGMENTS_START_BYTES + 8 * SEGMENT_SIZE;
            let sb = Superblock::for_device(size, SEGMENT_SIZE, 1, *b"scan-test-uuid!!").unwrap();
            let mut bytes = vec![0u8; size as usize];
            bytes[..4096].copy_from_slice(&sb.encode());
            Image {
                sb,
                bytes,
                next_record_seq: 1,
                open: None,
                replay_start: (0, 0),
            }
        }

        fn open_segment(&mut self, segment: u32, segment_seq: u64) {
            let header = SegmentHeader {
                nonce: self.sb.nonce(),
                shard: 0,
                segment,
                segment_seq,
                first_record_seq: self.next_record_seq,
                replay_start_seq: self.replay_start.0,
                replay_start_offset: self.replay_start.1,
                cold: false,
            };
            let at = self.sb.segment_offset(segment) as usize;
            self.bytes[at..at + 4096].copy_from_slice(&header.encode());
            self.open = Some((header, at as u64 + 4096));
        }

        /// Appends a record with one ObjectSize delta naming `tag` and `data_blocks` blocks of data.
        fn append(&mut self, tag: u64, data_blocks: u32) -> u64 {
            let (segment, offset) = self.open.expect("a segment is open");
            let data: Vec<u8> = (0..data_blocks as usize * 4096)
                .map(|i| (i as u64 ^ tag) as u8)
                .collect();
            let mut metadata = Vec::new();
            Delta::ObjectSize {
                oid: b"obj",
                size: tag,
            }
            .encode(&mut metadata);
            let header = RecordHeader {
                nonce: self.sb.nonce(),
                shard: 0,
                record_seq: self.next_record_seq,
                segment_seq: segment.segment_seq,
                delta_count: 1,
                metadata_len: metadata.len() as u32,
                data_blocks,
                data_crc: crate::segment::format::record_data_crc(&data),
                flags: 0,
                cold_offset: 0,
                cold_segment_seq: 0,
                cold_blocks: 0,
                cold_crc: 0,
            };
            let mut head = vec![0u8; header.head_blocks() as usize * 4096];
            header.encode_head(&metadata, &mut head);
            let at = offset as usize;
            self.bytes[at..at + head.len()].copy_from_slice(&head);
            self.bytes[at + head.len()..at + head.len() + data.len()].copy_from_slice(&data);
            self.next_record_seq += 1;
            self.open = Some((segment, offset + (head.len() + data.len()) as u64));
            offset
        }

        fn scan(&self) -> (ShardLog, Vec<u64>) {
            let mut tags = Vec::new();
            let mut reader: &[u8] = &self.bytes;
            let log = scan_shard(&self.sb, 0, &mut reader, &mut |_, deltas| {
                for delta in DeltaReader::new(deltas) {
                    if let Delta::ObjectSize { size, .. } = delta.unwrap() {
                        tags.push(size);
                    }
                }
            })
            .unwrap();
            (log, tags)
        }
    }

    #[test]
    fn empty_device_has_an_empty_log() {
        let (log, tags) = Image::new().scan();
        assert_eq!(log.end, LogEnd::Empty);
        assert!(log.records.is_empty() && tags.is_empty());
        assert_eq!((log.next_record_seq, log.next_segment_seq), (1, 1));
    }

    #[test]
    fn records_replay_in_order_across_segments() {
        let mut image = Image::new();
        // Segment numbers out of order on purpose: the log order is the segment_seq order.
        image.open_segment(5, 1);
        image.append(10, 1);
        image.append(11, 3);
        image.open_segment(2, 2);
        image.append(12, 0);
        image.append(13, 2);
        let (log, tags) = image.scan();
        assert_eq!(tags, vec![10, 11, 12, 13]);
        assert_eq!(
            log.records.iter().map(|r| r.segment).collect::<Vec<_>>(),
            vec![5, 5, 2, 2]
        );
        assert_eq!(log.next_record_seq, 5);
        assert_eq!(log.next_segment_seq, 3);
        assert!(log.orphans.is_empty());
        assert!(
            matches!(log.end, LogEnd::Stop { segment: 2, .. }),
            "{:?}",
            log.end
        );
    }

    #[test]
    fn replay_starts_at_the_checkpoint_a_header_names() {
        let mut image = Image::new();
        image.open_segment(3, 1);
        image.append(1, 1);
        image.append(2, 1);
        image.open_segment(6, 2);
        image.append(3, 1);
        let checkpoint_seq = image.next_record_seq;
        let checkpoint_at = image.append(4, 0);
        image.append(5, 2);
        // The header naming the checkpoint comes with the next segment.
        image.replay_start = (checkpoint_seq, checkpoint_at);
        image.open_segment(1, 3);
        image.append(6, 1);
        let (log, tags) = image.scan();
        assert_eq!(
            tags,
            vec![4, 5, 6],
            "records before the checkpoint are not replayed"
        );
        assert_eq!(
            log.data_segments
                .iter()
                .map(|h| h.segment)
                .collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(
            log.segments.iter().map(|h| h.segment).collect::<Vec<_>>(),
            vec![6, 1]
        );
        assert_eq!(log.replay_start, (checkpoint_seq, checkpoint_at));
        assert_eq!(log.next_record_seq, 7);

        // A header that names a checkpoint the device does not hold is corruption, loudly.
        let mut broken = Image::new();
        broken.open_segment(0, 1);
        broken.append(1, 0);
        broken.replay_start = (40, broken.sb.segment_offset(0) + 4096);
        broken.open_segment(1, 2);
        let mut reader: &[u8] = &broken.bytes;
        let result = scan_shard(&broken.sb, 0, &mut reader, &mut |_, _| {});
        assert!(
            matches!(result, Err(ScanError::MissingCheckpoint { seq: 40, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn a_torn_last_record_is_discarded() {
        let mut image = Image::new();
        image.open_segment(0, 1);
        image.append(1, 1);
        let torn_at = image.append(2, 4);
        // Tear one 512-byte sector in the middle of the last record's data.
        let sector = torn_at as usize + 4096 + 3 * 4096 + 512;
        image.bytes[sector..sector + 512].fill(0);
        let (log, tags) = image.scan();
        assert_eq!(tags, vec![1], "the torn record's deltas are never applied");
        assert_eq!(
            log.next_record_seq, 2,
            "the writer reuses the torn record's number"
        );
        match log.end {
            LogEnd::Stop {
                offset, ref reason, ..
            } => {
                assert_eq!(offset, torn_at);
                assert!(reason.contains("checksum"), "{reason}");
            }
            ref other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stale_records_of_a_reused_segment_end_the_log() {
        let mut image = Image::new();
        image.open_segment(0, 1);
        for tag in 1..=4 {
            image.append(tag, 1);
        }
        // The cleaner freed segment 0; the writer reopened it later in the log.
        image.open_segment(1, 2);
        image.append(5, 1);
        image.open_segment(0, 3);
        image.append(6, 1); // Overwrites the old record 1; old records 2..4 follow it on disk.
        let (log, tags) = image.scan();
        assert_eq!(
            tags,
            vec![5, 6],
            "log starts at the oldest live segment, stops at stale data"
        );
        let LogEnd::Stop { ref reason, .. } = log.end else {
            panic!("{:?}", log.end)
        };
        assert!(reason.contains("not the next record"), "{reason}");
    }

    #[test]
    fn records_after_a_gap_were_never_acknowledged() {
        let mut image = Image::new();
        image.open_segment(0, 1);
        image.append(1, 1);
        let lost = image.append(2, 1);
        image.open_segment(1, 2);
        image.append(3, 1);
        image.bytes[lost as usize..lost as usize + 4096].fill(0); // Record 2 never reached the disk.
        let (log, tags) = image.scan();
        assert_eq!(tags, vec![1]);
        assert_eq!(
            log.orphans.len(),
            1,
            "segment 1 holds only unacknowledged records"
        );
        assert_eq!(log.orphans[0].segment, 1);
        assert_eq!(
            log.next_segment_seq, 3,
            "a new segment must not reuse the orphan's number"
        );
    }

    #[test]
    fn records_after_finds_what_a_damaged_record_hides() {
        let mut image = Image::new();
        image.open_segment(0, 1);
        image.append(1, 1);
        let damaged = image.append(2, 2);
        let hidden = image.append(3, 1);
        image.append(4, 0);
        image.bytes[damaged as usize + 4096 + 10] ^= 1; // A flipped bit in record 2's data.
        let (log, tags) = image.scan();
        assert_eq!(tags, vec![1], "replay stops at the damaged record");
        let segment = log.segments[0];
        let mut reader: &[u8] = &image.bytes;
        let found = records_after(
            &image.sb,
            &segment,
            damaged,
            &[],
            &mut reader,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(
            found
                .iter()
                .map(|r| (r.header.record_seq, r.offset))
                .collect::<Vec<_>>(),
            vec![(3, hidden), (4, hidden + 2 * 4096)]
        );
        // Records of the segment's earlier life (another segment_seq) are not counted.
        image.open_segment(0, 2);
        let mut reader: &[u8] = &image.bytes;
        let header = SegmentHeader {
            segment_seq: 2,
            ..segment
        };
        let start = image.sb.segment_offset(0) + 4096;
        let found =
            records_after(&image.sb, &header, start, &[], &mut reader, &mut Vec::new()).unwrap();
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn foreign_segments_and_duplicate_positions() {
        let mut image = Image::new();
        image.open_segment(0, 1);
        image.append(1, 1);
        // A segment header from another filesystem (an earlier mkfs) is not part of the log.
        let foreign = SegmentHeader {
            nonce: image.sb.nonce() ^ 1,
            shard: 0,
            segment: 3,
            segment_seq: 9,
            first_record_seq: 2,
            replay_start_seq: 0,
            replay_start_offset: 0,
            cold: false,
        };
        let at = image.sb.segment_offset(3) as usize;
        image.bytes[at..at + 4096].copy_from_slice(&foreign.encode());
        let (log, tags) = image.scan();
        assert_eq!(tags, vec![1]);
        assert_eq!(log.next_segment_seq, 2);
        image.open_segment(4, 1); // Same segment_seq as segment 0: corruption.
        let mut reader: &[u8] = &image.bytes;
        let error = scan_shard(&image.sb, 0, &mut reader, &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(error, ScanError::DuplicateSegmentSeq { seq: 1, .. }),
            "{error}"
        );
    }
}
