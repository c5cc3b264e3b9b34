//! Making and mounting a segment store: mkfs writes the superblock; mount reads it back,
//! replays a shard's log into metadata, and reports what it found. Both are start-up work, so
//! they drive the queue pair synchronously (submit, then poll until the request completes).

use std::io;

use crate::queue_pair::{AlignedBuf, IoVec, QueuePair, SubmitError};
use crate::segment::format::{
    Delta, DeltaReader, FormatError, Superblock, BLOCK_SIZE_BYTES, RECORD_FLAG_CHECKPOINT,
    RECORD_FLAG_CHECKPOINT_END, SUPERBLOCK_OFFSETS,
};
use crate::segment::metadata::{ApplyError, Metadata};
use crate::segment::scan::{scan_shard, BlockReader, ScanError, ShardLog};
use crate::segment::tail;

#[derive(Debug)]
pub enum MountError {
    Io(io::Error),
    /// Neither superblock copy is valid: not a Carmine device, or both copies are damaged.
    NotFormatted(FormatError),
    Geometry(FormatError),
    Scan(ScanError),
    /// A record that passed its checksums holds a delta the metadata rejects.
    Corrupt {
        record_seq: u64,
        error: String,
    },
    /// Valid records lie after the log's end: the log is damaged in the middle.
    DamagedLog {
        /// Where the log ends, as a phrase.
        end: String,
        /// The first valid record after it: segment, device offset, record number.
        segment: u32,
        offset: u64,
        record_seq: u64,
        /// Valid client records after the end, in all.
        records: usize,
    },
    /// The superblock has fewer shards than asked for.
    NoSuchShard {
        shard: u32,
        shards: u32,
    },
}

impl std::fmt::Display for MountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountError::Io(error) => write!(f, "device I/O failed: {error}"),
            MountError::NotFormatted(error) => {
                write!(f, "no valid superblock (run `carmine mkfs`?): {error}")
            }
            MountError::Geometry(error) => write!(f, "bad geometry: {error}"),
            MountError::Scan(error) => write!(f, "log scan failed: {error}"),
            MountError::Corrupt { record_seq, error } => {
                write!(f, "record {record_seq} does not apply: {error}")
            }
            MountError::DamagedLog {
                end,
                segment,
                offset,
                record_seq,
                records,
            } => write!(
                f,
                "the log is damaged in the middle: it ends at {end}, yet {records} valid \
                 record(s) follow (first: record {record_seq} at offset {offset}, segment \
                 {segment}); replaying only the part before the damage would serve older data \
                 as current, so the shard is not mounted. `carmine fsck` names the damage"
            ),
            MountError::NoSuchShard { shard, shards } => write!(
                f,
                "shard {shard} asked for, but the device was made with {shards} shard(s): run with --cores {shards} or mkfs again"
            ),
        }
    }
}

impl std::error::Error for MountError {}

/// Reads and writes through a queue pair, one request at a time, waiting for each.
pub struct SyncIo<'a> {
    qp: &'a mut dyn QueuePair,
    bounce: AlignedBuf,
}

const BOUNCE_BYTES: usize = 1 << 20;
const SYNC_TAG: u64 = 0x5359_4e43;

impl<'a> SyncIo<'a> {
    pub fn new(qp: &'a mut dyn QueuePair) -> SyncIo<'a> {
        SyncIo {
            qp,
            bounce: AlignedBuf::new(BOUNCE_BYTES),
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        let mut outcome = None;
        while outcome.is_none() {
            self.qp.poll(1, &mut |tag, result| {
                debug_assert_eq!(tag, SYNC_TAG);
                outcome = Some(result);
            });
            if outcome.is_none() {
                std::hint::spin_loop();
            }
        }
        outcome
            .expect("set above")
            .map_err(|error| io::Error::other(error.to_string()))
    }

    fn submit(
        &mut self,
        request: impl Fn(&mut dyn QueuePair) -> Result<(), SubmitError>,
    ) -> io::Result<()> {
        loop {
            match request(self.qp) {
                Ok(()) => return self.wait(),
                // Synchronous use: nothing else is in flight, so a full queue clears by polling.
                Err(SubmitError::QueueFull) => {
                    self.qp.poll(1, &mut |_, _| {});
                }
                Err(error) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        error.to_string(),
                    ))
                }
            }
        }
    }

    /// Writes `data` (a whole number of blocks) at `offset`.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        for (index, chunk) in data.chunks(BOUNCE_BYTES).enumerate() {
            self.bounce[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: the bounce buffer is ours and untouched until `submit` returns, which
            // waits for the request's completion.
            let iovec = unsafe { self.bounce.io_vec_at(0, chunk.len()) };
            let at = offset + (index * BOUNCE_BYTES) as u64;
            self.submit(|qp| qp.submit_write(at, &[iovec], SYNC_TAG))?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.submit(|qp| qp.submit_flush(SYNC_TAG))
    }
}

impl BlockReader for SyncIo<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (index, chunk) in buf.chunks_mut(BOUNCE_BYTES).enumerate() {
            let len = chunk.len().next_multiple_of(BLOCK_SIZE_BYTES as usize);
            // SAFETY: as in `write_at`: the bounce buffer is only touched after completion.
            let iovec: IoVec = unsafe { self.bounce.io_vec_at(0, len) };
            let at = offset + (index * BOUNCE_BYTES) as u64;
            self.submit(|qp| qp.submit_read(at, &[iovec], SYNC_TAG))?;
            chunk.copy_from_slice(&self.bounce[..chunk.len()]);
        }
        Ok(())
    }
}

/// Lays out an empty filesystem on the device behind `qp` and returns its superblock. Anything
/// an earlier mkfs left is ignored from then on: the new uuid changes the nonce every segment
/// and record carries. `spare_percent` of each shard's data capacity is kept from clients
/// (`Superblock::spare_percent`).
pub fn mkfs(
    qp: &mut dyn QueuePair,
    segment_size: u64,
    shards: u32,
    spare_percent: u32,
    uuid: [u8; 16],
) -> Result<Superblock, MountError> {
    let sb = Superblock::for_device(qp.capacity_bytes(), segment_size, shards, uuid)
        .and_then(|sb| sb.with_spare(spare_percent))
        .map_err(MountError::Geometry)?;
    let mut io = SyncIo::new(qp);
    let block = sb.encode();
    for offset in SUPERBLOCK_OFFSETS {
        io.write_at(offset, &block).map_err(MountError::Io)?;
    }
    io.flush().map_err(MountError::Io)?;
    Ok(sb)
}

pub fn read_superblock(reader: &mut dyn BlockReader) -> Result<Superblock, MountError> {
    let mut copies = [
        vec![0u8; BLOCK_SIZE_BYTES as usize],
        vec![0u8; BLOCK_SIZE_BYTES as usize],
    ];
    for (copy, offset) in copies.iter_mut().zip(SUPERBLOCK_OFFSETS) {
        reader.read_at(offset, copy).map_err(MountError::Io)?;
    }
    Superblock::pick(
        Superblock::decode(&copies[0]),
        Superblock::decode(&copies[1]),
    )
    .map_err(MountError::NotFormatted)
}

/// What mounting a shard found.
pub struct Mounted {
    pub sb: Superblock,
    pub metadata: Metadata,
    pub log: ShardLog,
}

/// Reads the superblock and replays shard `shard`'s log through `reader`.
pub fn replay_from(reader: &mut dyn BlockReader, shard: u32) -> Result<Mounted, MountError> {
    let sb = read_superblock(reader)?;
    if shard >= sb.shard_count {
        return Err(MountError::NoSuchShard {
            shard,
            shards: sb.shard_count,
        });
    }
    let mut metadata = Metadata::new(sb);
    let mut failure: Option<(u64, String)> = None;
    let mut replay = Replay::default();
    // The scan reads records and, at a checkpoint that wrote the extent tree, replay reads the
    // tree's nodes: one reader, used by one of them at a time.
    let reader = std::cell::RefCell::new(reader);
    let log = scan_shard(
        &sb,
        shard,
        &mut SharedReader(&reader),
        &mut |record, deltas| {
            if failure.is_some() || !replay.applies(record.header.flags) {
                return;
            }
            for delta in DeltaReader::new(deltas) {
                let applied = delta.map_err(|error| error.to_string()).and_then(|delta| {
                    if let Delta::TreeRoot { .. } = delta {
                        return metadata.load_tree(&delta, &mut |address, block| {
                            reader.borrow_mut().read_at(address, block)
                        });
                    }
                    metadata
                        .apply(&delta)
                        .map_err(|e: ApplyError| e.to_string())
                });
                if let Err(error) = applied {
                    failure = Some((record.header.record_seq, error));
                    return;
                }
            }
        },
    )
    .map_err(MountError::Scan)?;
    if let Some((record_seq, error)) = failure {
        return Err(MountError::Corrupt { record_seq, error });
    }
    if log.replay_start != (0, 0) && !replay.start_complete {
        // A header named the checkpoint only once all its records were durable: the log
        // ending inside it is damage, and what was applied of it is not the store.
        return Err(MountError::Corrupt {
            record_seq: log.next_record_seq,
            error: format!(
                "the log ends inside the checkpoint it starts at (record {}): a record of it is damaged",
                log.replay_start.0
            ),
        });
    }
    // Every live block must lie in a segment the log knows (journal or data segment): one
    // elsewhere would be handed out as free space and overwritten.
    let known: std::collections::HashSet<u32> = log
        .segments
        .iter()
        .chain(&log.data_segments)
        .map(|h| h.segment)
        .collect();
    let counts = metadata.live_block_counts();
    if let Some(segment) = sb
        .shard_segments(shard)
        .find(|s| counts[*s as usize] > 0 && !known.contains(s))
    {
        return Err(MountError::Corrupt {
            record_seq: log.next_record_seq,
            error: format!("live blocks in segment {segment}, which has no valid header"),
        });
    }
    Ok(Mounted { sb, metadata, log })
}

/// A reader shared by the log scan and the tree's load (`replay_from`).
struct SharedReader<'r, 'a>(&'r std::cell::RefCell<&'a mut dyn BlockReader>);

impl BlockReader for SharedReader<'_, '_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.borrow_mut().read_at(offset, buf)
    }
}

/// Which records replay applies. A checkpoint's records rebuild the metadata from nothing, so
/// they apply only when replay starts with them (the records right at the replay start); any
/// later checkpoint restates what replay already built, and is skipped.
#[derive(Default)]
pub struct Replay {
    /// Past the checkpoint replay started with (or there was none).
    past_start: bool,
    /// The checkpoint replay started with ended (its last record was applied).
    start_complete: bool,
}

impl Replay {
    pub fn applies(&mut self, flags: u32) -> bool {
        if flags & RECORD_FLAG_CHECKPOINT == 0 {
            self.past_start = true;
            return true;
        }
        if self.past_start {
            return false;
        }
        self.past_start = flags & RECORD_FLAG_CHECKPOINT_END != 0;
        self.start_complete |= self.past_start;
        true
    }
}

/// `replay_from` through the shard's own queue pair.
/// A server's mount refuses a shard whose log was damaged in the middle: fsck, which replays
/// through `replay_from` too, reports the damage instead.
pub fn replay(qp: &mut dyn QueuePair, shard: u32) -> Result<Mounted, MountError> {
    let mut io = SyncIo::new(qp);
    let mounted = replay_from(&mut io, shard)?;
    refuse_damaged_log(&mut io, &mounted, shard)?;
    Ok(mounted)
}

/// Valid client records after the log's end mean damage before them (`tail.rs`): replaying
/// the part before it would serve older data as current, so the shard is not served.
fn refuse_damaged_log(
    reader: &mut dyn BlockReader,
    mounted: &Mounted,
    shard: u32,
) -> Result<(), MountError> {
    let found = tail::records_after_end(reader, &mounted.sb, shard, &mounted.log, &mut Vec::new())
        .map_err(MountError::Scan)?;
    let Some((after, first)) = found
        .iter()
        .find_map(|after| after.client.first().map(|first| (after, first)))
    else {
        return Ok(());
    };
    Err(MountError::DamagedLog {
        end: tail::end_text(&mounted.sb, &mounted.log),
        segment: after.segment.segment,
        offset: first.offset,
        record_seq: first.header.record_seq,
        records: found.iter().map(|a| a.client.len()).sum(),
    })
}
