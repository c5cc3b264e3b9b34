//! fsck: an offline, read-only check of a segment-store device (`carmine fsck`).
//!
//! Nothing here writes: the device is opened read-only and read with positional reads, so it
//! works on a regular file or a block device, and on a device a crash left behind (it must not
//! be mounted by a running server while it is checked: the log would move under the check).
//!
//! What is checked, per shard (each finding is a `Problem`; a clean device has none):
//! 1. The superblock copies (both valid and equal) and that the device holds every segment.
//! 2. Mount: superblock, log scan and replay of every record into metadata, exactly as a
//!    server mounts (`mount::replay_from`). If that fails, the shard's other checks are skipped.
//! 3. Every live block: inside this shard's segments, 4 KiB aligned, in a segment the log knows
//!    (a journal or data segment: a block anywhere else would be handed out as free space), and
//!    referenced by one (object, block index) only.
//! 4. Every live block's bytes against the crc32c the metadata holds for it, reading each
//!    segment that holds live blocks with one read (the span from its first to its last live
//!    block).
//! 5. The segment inventory (live blocks per segment, what the cleaner trusts) against a recount
//!    from the extent maps.
//! 6. No valid record after the log's end (see `check_after_end` for why that means damage).
//! 7. No block mapped at or past an object's last block (`exec.rs` keeps "no block at or past
//!    the size's last block is mapped": truncate unmaps them).
//!
//! Where and why the log ends is reported as information, not as a problem: after a crash the
//! last record is often torn, and it was never acknowledged. A damaged *last* record looks the
//! same (its crc fails and nothing follows it), so fsck cannot tell the two apart; when the
//! record's head is intact it names the data blocks that fail their crc.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::segment::format::{
    Delta, DeltaReader, FormatError, RecordHeader, Superblock, BLOCK_SIZE_BYTES,
    RECORD_FLAG_CHECKPOINT, SEGMENTS_START_BYTES, SUPERBLOCK_OFFSETS,
};
use crate::segment::metadata::Metadata;
use crate::segment::mount::{self, Mounted};
use crate::segment::scan::{BlockReader, LogEnd, ScanError, ShardLog};
use crate::segment::tail;

/// A file or block device opened read-only, read with positional reads.
pub struct FileReader {
    file: File,
    len: u64,
}

impl FileReader {
    pub fn open(path: &Path) -> io::Result<FileReader> {
        let mut file = File::open(path)?;
        // Shared with other checkers, refused while a server or mkfs holds any of it: a log
        // being written under us would show problems that are not there.
        crate::queue_pair::uring::lock_range(&file, path, libc::F_RDLCK, 0, 0)?;
        // Seeking to the end gives a block device's size too (its metadata says 0).
        let len = file.seek(SeekFrom::End(0))?;
        Ok(FileReader { file, len })
    }

    /// Bytes the file or device holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl BlockReader for FileReader {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// Why fsck could not check the device at all.
#[derive(Debug)]
pub enum FsckError {
    /// The device cannot be opened or read.
    Io(io::Error),
    /// No valid superblock: not a Carmine device (or both copies are damaged).
    NotFormatted(String),
}

impl fmt::Display for FsckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsckError::Io(error) => write!(f, "cannot read the device: {error}"),
            FsckError::NotFormatted(reason) => write!(
                f,
                "not a Carmine segment-store device (no valid superblock: {reason})"
            ),
        }
    }
}

impl std::error::Error for FsckError {}

impl From<io::Error> for FsckError {
    fn from(error: io::Error) -> FsckError {
        FsckError::Io(error)
    }
}

/// One inconsistency. Its `Display` names what is affected: object, logical block index,
/// device offset and segment, as they apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// One superblock copy is damaged or differs from the other (the device has lost the
    /// redundancy a torn superblock write relies on).
    SuperblockCopy { offset: u64, reason: String },
    /// The device is smaller than its superblock's segments need (a truncated image?).
    DeviceTooSmall { bytes: u64, needed: u64 },
    /// The shard does not mount: superblock, log scan, or a record that does not apply.
    Mount(String),
    /// A live block outside the shard's segments.
    OutsideShard {
        oid: Vec<u8>,
        index: u64,
        physical: u64,
    },
    Misaligned {
        oid: Vec<u8>,
        index: u64,
        physical: u64,
    },
    /// A live block in a segment that is neither a journal nor a data segment of the log.
    UnknownSegment {
        oid: Vec<u8>,
        index: u64,
        physical: u64,
        segment: u32,
    },
    /// Two (object, block index) pairs point at the same device block.
    SharedBlock {
        physical: u64,
        first: (Vec<u8>, u64),
        second: (Vec<u8>, u64),
    },
    /// A live block's bytes do not match the crc32c in the metadata.
    Checksum {
        oid: Vec<u8>,
        index: u64,
        physical: u64,
        segment: u32,
        expected: u32,
        found: u32,
    },
    /// A live block cannot be read.
    Unreadable {
        oid: Vec<u8>,
        index: u64,
        physical: u64,
        error: String,
    },
    /// The segment inventory disagrees with a recount from the extent maps.
    Inventory {
        segment: u32,
        recorded: u32,
        counted: u32,
    },
    /// Valid records lie after the log's end: the log is damaged in the middle.
    RecordsAfterEnd {
        segment: u32,
        /// Whether the segment has a valid header (if not, it was damaged too).
        header_valid: bool,
        offset: u64,
        record_seq: u64,
        records: usize,
        /// Where the log stops: the record that should have come next, where it should be.
        end: String,
    },
    /// A read fsck needed failed (other than a live block's).
    Io { what: String, error: String },
    /// A block mapped at or past the object's last block.
    BlockPastSize {
        oid: Vec<u8>,
        index: u64,
        physical: u64,
        size: u64,
    },
}

/// An object id as text: printable ASCII as is, other bytes escaped.
pub fn show_oid(oid: &[u8]) -> String {
    format!("\"{}\"", oid.escape_ascii())
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::SuperblockCopy { offset, reason } => {
                write!(f, "superblock copy at offset {offset}: {reason}")
            }
            Problem::DeviceTooSmall { bytes, needed } => write!(
                f,
                "the device holds {bytes} bytes but its segments end at {needed} (truncated?)"
            ),
            Problem::Mount(reason) => write!(f, "does not mount: {reason}"),
            Problem::OutsideShard {
                oid,
                index,
                physical,
            } => write!(
                f,
                "object {} block {index}: offset {physical} lies outside the shard's segments",
                show_oid(oid)
            ),
            Problem::Misaligned {
                oid,
                index,
                physical,
            } => write!(
                f,
                "object {} block {index}: offset {physical} is not 4 KiB aligned",
                show_oid(oid)
            ),
            Problem::UnknownSegment {
                oid,
                index,
                physical,
                segment,
            } => write!(
                f,
                "object {} block {index}: offset {physical} lies in segment {segment}, which the \
                 log does not hold (it would be reused as free space)",
                show_oid(oid)
            ),
            Problem::SharedBlock {
                physical,
                first,
                second,
            } => write!(
                f,
                "offset {physical} is block {} of object {} and block {} of object {}",
                first.1,
                show_oid(&first.0),
                second.1,
                show_oid(&second.0)
            ),
            Problem::Checksum {
                oid,
                index,
                physical,
                segment,
                expected,
                found,
            } => write!(
                f,
                "object {} block {index}: checksum mismatch at offset {physical} (segment \
                 {segment}): crc32c {found:#010x}, metadata says {expected:#010x}",
                show_oid(oid)
            ),
            Problem::Unreadable {
                oid,
                index,
                physical,
                error,
            } => write!(
                f,
                "object {} block {index}: read at offset {physical} failed: {error}",
                show_oid(oid)
            ),
            Problem::Inventory {
                segment,
                recorded,
                counted,
            } => write!(
                f,
                "segment {segment}: inventory says {recorded} live block(s), the extent maps \
                 hold {counted}"
            ),
            Problem::RecordsAfterEnd {
                segment,
                header_valid,
                offset,
                record_seq,
                records,
                end,
            } => write!(
                f,
                "valid records after the log's end at offset {offset} (segment {segment}{}, \
                 record {record_seq}, {records} record(s) there): the log is damaged in the \
                 middle, records after it are not replayed (the log stops at {end})",
                if *header_valid {
                    ""
                } else {
                    ", whose header is damaged"
                }
            ),
            Problem::Io { what, error } => write!(f, "{what}: {error}"),
            Problem::BlockPastSize {
                oid,
                index,
                physical,
                size,
            } => write!(
                f,
                "object {} block {index} (offset {physical}) lies past the object's size {size}",
                show_oid(oid)
            ),
        }
    }
}

/// What fsck found in one shard.
#[derive(Clone, Debug, Default)]
pub struct ShardReport {
    pub shard: u32,
    /// Segments the shard owns.
    pub segments: u32,
    pub objects: u64,
    pub live_blocks: u64,
    /// Segments replay reads (at or after the one holding the replay start).
    pub journal_segments: u32,
    /// Segments before the replay start that hold live blocks.
    pub data_segments: u32,
    /// Everything else: no header, a header after the log's end, or a data segment emptied.
    pub free_segments: u32,
    /// Segments with a valid header after the log's end (counted as free).
    pub orphan_segments: u32,
    /// Records replayed (from the replay start).
    pub records: u64,
    /// (record seq, device offset) replay starts at; (0, 0) without a checkpoint.
    pub replay_start: (u64, u64),
    /// Where the log ends and why, or None when the shard did not mount.
    pub log_end: Option<LogEnd>,
    /// More about the record at the log's end, when its head is intact (which data blocks
    /// fail their crc).
    pub log_end_detail: Option<String>,
    /// Live block bytes read and checked against their crc.
    pub bytes_verified: u64,
    /// Findings that are not problems (e.g. records of an unfinished checkpoint after the end).
    pub notes: Vec<String>,
    pub problems: Vec<Problem>,
}

impl ShardReport {
    /// Where the log ends and why, as one line.
    pub fn log_end_text(&self) -> String {
        let mut text = match &self.log_end {
            None => "unknown (the shard does not mount)".to_string(),
            Some(LogEnd::Empty) => "none: the log is empty (nothing written)".to_string(),
            Some(LogEnd::Stop {
                segment,
                offset,
                reason,
            }) => format!("offset {offset} (segment {segment}): {reason}"),
        };
        if let Some(detail) = &self.log_end_detail {
            text.push_str("; ");
            text.push_str(detail);
        }
        text
    }
}

#[derive(Clone, Debug)]
pub struct FsckReport {
    pub device: PathBuf,
    pub device_bytes: u64,
    pub superblock: Superblock,
    /// Device-wide problems (superblock copies, device size).
    pub problems: Vec<Problem>,
    pub shards: Vec<ShardReport>,
}

impl FsckReport {
    pub fn problem_count(&self) -> usize {
        self.problems.len() + self.shards.iter().map(|s| s.problems.len()).sum::<usize>()
    }

    pub fn is_clean(&self) -> bool {
        self.problem_count() == 0
    }
}

/// Checks the device at `path` (read-only). An error only when the device cannot be read at
/// all or holds no valid superblock; every other finding is in the report.
pub fn fsck(path: &Path) -> Result<FsckReport, FsckError> {
    let mut reader = FileReader::open(path)?;
    let device_bytes = reader.len();
    fsck_reader(&mut reader, device_bytes, path)
}

/// Checks the `device_bytes` bytes `reader` reads (read-only), reporting them as `path`: for
/// devices that are not files (an NVMe namespace through a queue pair).
pub fn fsck_reader(
    reader: &mut dyn BlockReader,
    device_bytes: u64,
    path: &Path,
) -> Result<FsckReport, FsckError> {
    if device_bytes < SUPERBLOCK_OFFSETS[1] + BLOCK_SIZE_BYTES {
        return Err(FsckError::NotFormatted(format!(
            "{device_bytes} bytes is too small to hold a superblock"
        )));
    }
    let (superblock, problems) = check_superblocks(reader, device_bytes)?;
    let mut shards = Vec::with_capacity(superblock.shard_count as usize);
    let mut buf = Vec::new();
    for shard in 0..superblock.shard_count {
        shards.push(check_shard(reader, &superblock, shard, &mut buf));
    }
    Ok(FsckReport {
        device: path.to_path_buf(),
        device_bytes,
        superblock,
        problems,
        shards,
    })
}

fn check_superblocks(
    reader: &mut dyn BlockReader,
    device_bytes: u64,
) -> Result<(Superblock, Vec<Problem>), FsckError> {
    let mut copies = Vec::with_capacity(2);
    for offset in SUPERBLOCK_OFFSETS {
        let mut block = vec![0u8; BLOCK_SIZE_BYTES as usize];
        reader.read_at(offset, &mut block)?;
        copies.push(Superblock::decode(&block));
    }
    let sb = Superblock::pick(copies[0].clone(), copies[1].clone())
        .map_err(|error: FormatError| FsckError::NotFormatted(error.to_string()))?;
    let mut problems = Vec::new();
    for (copy, offset) in copies.iter().zip(SUPERBLOCK_OFFSETS) {
        match copy {
            Err(error) => problems.push(Problem::SuperblockCopy {
                offset,
                reason: error.to_string(),
            }),
            Ok(decoded) if *decoded != sb => problems.push(Problem::SuperblockCopy {
                offset,
                reason: format!(
                    "differs from the copy in use (generation {} vs {})",
                    decoded.generation, sb.generation
                ),
            }),
            Ok(_) => {}
        }
    }
    let needed = SEGMENTS_START_BYTES + u64::from(sb.segment_count) * sb.segment_size;
    if device_bytes < needed {
        problems.push(Problem::DeviceTooSmall {
            bytes: device_bytes,
            needed,
        });
    }
    Ok((sb, problems))
}

/// A live block, as the check walks them (sorted by device offset).
#[derive(Clone, Copy)]
struct Live {
    physical: u64,
    /// Index into the shard's object id list.
    object: u32,
    index: u64,
    crc: u32,
}

fn check_shard(
    reader: &mut dyn BlockReader,
    sb: &Superblock,
    shard: u32,
    buf: &mut Vec<u8>,
) -> ShardReport {
    let range = sb.shard_segments(shard);
    let mut report = ShardReport {
        shard,
        segments: range.len() as u32,
        ..ShardReport::default()
    };
    let Mounted { metadata, log, .. } = match mount::replay_from(reader, shard) {
        Ok(mounted) => mounted,
        Err(error) => {
            report.problems.push(Problem::Mount(error.to_string()));
            return report;
        }
    };
    report.objects = metadata.object_count() as u64;
    report.records = log.records.len() as u64;
    report.replay_start = log.replay_start;
    report.log_end = Some(log.end.clone());
    report.orphan_segments = log.orphans.len() as u32;
    let counts = metadata.live_block_counts();
    report.journal_segments = log.segments.len() as u32;
    report.data_segments = log
        .data_segments
        .iter()
        .filter(|h| counts[h.segment as usize] > 0)
        .count() as u32;
    report.free_segments = report
        .segments
        .saturating_sub(report.journal_segments + report.data_segments);

    let (oids, live) = collect_live_blocks(&metadata, &mut report);
    report.live_blocks = live.len() as u64;
    let known: HashSet<u32> = log
        .segments
        .iter()
        .chain(&log.data_segments)
        .map(|h| h.segment)
        .collect();
    let readable = check_locations(sb, shard, &known, &oids, &live, &mut report);
    check_crcs(reader, sb, &oids, &readable, buf, &mut report);

    let recounted = metadata.recount_live_blocks();
    for (segment, (&recorded, &counted)) in counts.iter().zip(&recounted).enumerate() {
        if recorded != counted {
            report.problems.push(Problem::Inventory {
                segment: segment as u32,
                recorded,
                counted,
            });
        }
    }
    report.log_end_detail = describe_end_record(reader, sb, &log, &metadata);
    if let Err(error) = check_after_end(reader, sb, shard, &log, buf, &mut report) {
        report.problems.push(Problem::Io {
            what: "reading the segments after the log's end".into(),
            error: error.to_string(),
        });
    }
    report
}

/// Every live block sorted by device offset, and the object ids they index. Checks the object
/// size rule on the way.
fn collect_live_blocks<'m>(
    metadata: &'m Metadata,
    report: &mut ShardReport,
) -> (Vec<&'m [u8]>, Vec<Live>) {
    let mut oids = Vec::with_capacity(metadata.object_count());
    let mut live = Vec::new();
    for (object, (oid, onode)) in metadata.objects().enumerate() {
        oids.push(oid);
        let blocks_in_size = onode.size.div_ceil(BLOCK_SIZE_BYTES);
        for (index, block) in onode.blocks.iter() {
            if index >= blocks_in_size {
                report.problems.push(Problem::BlockPastSize {
                    oid: oid.to_vec(),
                    index,
                    physical: block.physical,
                    size: onode.size,
                });
            }
            live.push(Live {
                physical: block.physical,
                object: object as u32,
                index,
                crc: block.crc,
            });
        }
    }
    live.sort_unstable_by_key(|b| (b.physical, b.object, b.index));
    (oids, live)
}

/// Checks where each live block lies; returns the ones worth reading (well placed, first
/// reference of their offset), still sorted by offset.
fn check_locations(
    sb: &Superblock,
    shard: u32,
    known: &HashSet<u32>,
    oids: &[&[u8]],
    live: &[Live],
    report: &mut ShardReport,
) -> Vec<Live> {
    let range = sb.shard_segments(shard);
    let mut readable = Vec::with_capacity(live.len());
    for (position, block) in live.iter().enumerate() {
        let oid = || oids[block.object as usize].to_vec();
        if position > 0 && live[position - 1].physical == block.physical {
            let first = live[position - 1];
            report.problems.push(Problem::SharedBlock {
                physical: block.physical,
                first: (oids[first.object as usize].to_vec(), first.index),
                second: (oid(), block.index),
            });
            continue;
        }
        if block.physical % BLOCK_SIZE_BYTES != 0 {
            report.problems.push(Problem::Misaligned {
                oid: oid(),
                index: block.index,
                physical: block.physical,
            });
            continue;
        }
        match sb.segment_at(block.physical) {
            Some(segment) if range.contains(&segment) => {
                if known.contains(&segment) {
                    readable.push(*block);
                } else {
                    report.problems.push(Problem::UnknownSegment {
                        oid: oid(),
                        index: block.index,
                        physical: block.physical,
                        segment,
                    });
                }
            }
            _ => report.problems.push(Problem::OutsideShard {
                oid: oid(),
                index: block.index,
                physical: block.physical,
            }),
        }
    }
    readable
}

/// Reads every live block (one read per segment: the span from its first to its last live
/// block) and checks it against its crc. A failed read falls back to block-by-block reads, so
/// that an unreadable block is named.
fn check_crcs(
    reader: &mut dyn BlockReader,
    sb: &Superblock,
    oids: &[&[u8]],
    blocks: &[Live],
    buf: &mut Vec<u8>,
    report: &mut ShardReport,
) {
    let block_len = BLOCK_SIZE_BYTES as usize;
    for group in blocks.chunk_by(|a, b| sb.segment_at(a.physical) == sb.segment_at(b.physical)) {
        let segment = sb.segment_at(group[0].physical).expect("checked in place");
        let start = group[0].physical;
        let end = group[group.len() - 1].physical + BLOCK_SIZE_BYTES;
        buf.resize((end - start) as usize, 0);
        let span_read = reader.read_at(start, &mut buf[..]);
        for block in group {
            let at = (block.physical - start) as usize;
            if span_read.is_err() {
                if let Err(error) = reader.read_at(block.physical, &mut buf[at..at + block_len]) {
                    report.problems.push(Problem::Unreadable {
                        oid: oids[block.object as usize].to_vec(),
                        index: block.index,
                        physical: block.physical,
                        error: error.to_string(),
                    });
                    continue;
                }
            }
            report.bytes_verified += BLOCK_SIZE_BYTES;
            let found = carmine_crc::crc32c(&buf[at..at + block_len]);
            if found != block.crc {
                report.problems.push(Problem::Checksum {
                    oid: oids[block.object as usize].to_vec(),
                    index: block.index,
                    physical: block.physical,
                    segment,
                    expected: block.crc,
                    found,
                });
            }
        }
    }
}

/// The record where the log's next one would be, if it carries the right sequence numbers but
/// fails its checks: whether its head (header and deltas) or its data fails its crc, and which
/// data blocks fail the crcs its own deltas give them. Information: a torn write of the last
/// record looks the same as damage to it.
fn describe_end_record(
    reader: &mut dyn BlockReader,
    sb: &Superblock,
    log: &ShardLog,
    metadata: &Metadata,
) -> Option<String> {
    let (segment, offset) = tail::next_position(sb, log)?;
    let segment_end = sb.segment_offset(segment.segment) + sb.segment_size;
    if offset + BLOCK_SIZE_BYTES > segment_end {
        return None;
    }
    let mut block = vec![0u8; BLOCK_SIZE_BYTES as usize];
    reader.read_at(offset, &mut block).ok()?;
    let header = RecordHeader::decode(&block, sb.nonce()).ok()?;
    if header.record_seq != log.next_record_seq
        || header.segment_seq != segment.segment_seq
        || header.shard != segment.shard
        || offset + u64::from(header.total_blocks()) * BLOCK_SIZE_BYTES > segment_end
    {
        return None;
    }
    let what = if header.flags & RECORD_FLAG_CHECKPOINT != 0 {
        "checkpoint record"
    } else {
        "record"
    };
    let seq = header.record_seq;
    let mut record = vec![0u8; header.total_blocks() as usize * BLOCK_SIZE_BYTES as usize];
    reader.read_at(offset, &mut record).ok()?;
    let head_len = header.head_blocks() as usize * BLOCK_SIZE_BYTES as usize;
    let Ok(deltas) = header.verify_head(&record[..head_len]) else {
        return Some(format!(
            "{what} {seq} at offset {offset} (segment {}): its head (header and deltas) fails \
             its crc",
            segment.segment
        ));
    };
    if header.verify_data(&record[head_len..]).is_ok() {
        return None;
    }
    let data_start = offset + head_len as u64;
    let data_end = offset + record.len() as u64;
    let block_crc = |physical: u64| -> Option<u32> {
        if physical < data_start || physical + BLOCK_SIZE_BYTES > data_end {
            return None;
        }
        let at = (physical - offset) as usize;
        Some(carmine_crc::crc32c(
            &record[at..at + BLOCK_SIZE_BYTES as usize],
        ))
    };
    let mut bad = Vec::new();
    for delta in DeltaReader::new(deltas) {
        match delta {
            Ok(Delta::ExtentMap {
                oid,
                offset: logical,
                physical,
                blocks,
                crcs,
            }) => {
                for i in 0..u64::from(blocks) {
                    let want = crcs
                        .get(i as usize * 4..i as usize * 4 + 4)
                        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
                    let at = physical + i * BLOCK_SIZE_BYTES;
                    if want.is_some() && block_crc(at) != want {
                        bad.push(format!(
                            "object {} block {} at offset {at}",
                            show_oid(oid),
                            logical / BLOCK_SIZE_BYTES + i
                        ));
                    }
                }
            }
            Ok(Delta::ExtentMove {
                oid,
                offset: logical,
                from,
                physical,
                blocks,
            }) => {
                for i in 0..u64::from(blocks) {
                    let index = logical / BLOCK_SIZE_BYTES + i;
                    let Some(old) = metadata
                        .object(oid)
                        .and_then(|onode| onode.blocks.get(index))
                        .filter(|b| b.physical == from + i * BLOCK_SIZE_BYTES)
                    else {
                        continue; // The copy is dead anyway: its block moved on.
                    };
                    let at = physical + i * BLOCK_SIZE_BYTES;
                    if block_crc(at) != Some(old.crc) {
                        bad.push(format!(
                            "object {} block {index} (cleaner copy) at offset {at}",
                            show_oid(oid)
                        ));
                    }
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let place = format!(
        "{what} {seq} at offset {offset} (segment {})",
        segment.segment
    );
    Some(if bad.is_empty() {
        format!("{place}: head intact, its data fails its crc")
    } else {
        const SHOWN: usize = 8;
        let more = bad.len().saturating_sub(SHOWN);
        let mut text = format!(
            "{place}: head intact, data failing its crc: {}",
            bad[..bad.len().min(SHOWN)].join(", ")
        );
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        text
    })
}

/// Valid records after the log's end (`tail::records_after_end` says why they mean damage):
/// client records are problems; checkpoint records, and the unacknowledged record written
/// beside a torn last one, notes.
fn check_after_end(
    reader: &mut dyn BlockReader,
    sb: &Superblock,
    shard: u32,
    log: &ShardLog,
    buf: &mut Vec<u8>,
    report: &mut ShardReport,
) -> io::Result<()> {
    let end_text = tail::end_text(sb, log);
    let found = tail::records_after_end(reader, sb, shard, log, buf).map_err(|e| match e {
        ScanError::Io(error) => error,
        other => io::Error::other(other.to_string()),
    })?;
    for after in found {
        let segment = after.segment.segment;
        if let Some(first) = after.client.first() {
            report.problems.push(Problem::RecordsAfterEnd {
                segment,
                header_valid: after.header_valid,
                offset: first.offset,
                record_seq: first.header.record_seq,
                records: after.client.len(),
                end: end_text.clone(),
            });
        }
        if let Some(first) = after.unacknowledged.first() {
            report.notes.push(format!(
                "record {} at offset {} in segment {segment}, after the log's end: written \
                 beside the torn record there and never acknowledged (a power cut's tail, not damage)",
                first.header.record_seq, first.offset
            ));
        }
        if let Some(first) = after.checkpoint.first() {
            report.notes.push(format!(
                "{} record(s) of an unfinished checkpoint after the log's end in segment {segment} \
                 (first: record {} at offset {}): a crash during a checkpoint, not damage",
                after.checkpoint.len(),
                first.header.record_seq,
                first.offset
            ));
        }
    }
    Ok(())
}
