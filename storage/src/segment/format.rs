//! On-disk structures of the segment store, version 1: encoding, decoding, and the checks that
//! make a torn or rotten byte an error rather than a wrong answer.
//!
//! All integers are little-endian. Every structure starts with an 8-byte magic and ends its
//! fixed part with a crc32c; decoders check magic, version, crc and ranges, and never panic on
//! arbitrary input (proptests below feed them random bytes).

use core::fmt;
use core::ops::Range;

pub const BLOCK_SIZE_BYTES: u64 = 4096;
/// Version 2: segment headers carry the replay start (checkpoints); `ObjectState` and
/// `ExtentMove` deltas (checkpoints and the cleaner). Version 4: the superblock carries the
/// spare (the share of the data capacity kept from clients so the cleaner finds emptier
/// victims; `Superblock::spare_percent`). Version 5: object ids on disk (`ObjectState` carries
/// the object's id, a checkpoint ends with `ObjectIdNext`), so a replay numbers the objects
/// created after a checkpoint exactly as the running store did. Version 6: a checkpoint may
/// write the extent tree's nodes as its records' data blocks (each node a 4 KiB block with
/// its own crc, nonce, address and generation, `btree/node.rs`) and name the tree's root in a
/// `TreeRoot` delta in its last record, instead of dumping every extent as `ExtentMap` deltas.
/// Version 7: the cleaner's copies have a log head of their own (*cold* segments, whose header
/// says so and which hold data blocks only); a record names the run of cold blocks it wrote
/// there (`RecordHeader::cold_*`: device offset, the cold segment's sequence number, block
/// count and data crc), which the scan checks as it checks the record's own data.
pub const FORMAT_VERSION: u32 = 7;
/// Spare `carmine mkfs` leaves by default, in percent of the data capacity: enough that random
/// 4 KiB overwrites at 80% of the usable capacity cost at most 1.5x in writes (measured 1.38-1.43
/// in steady state; 35% gave 1.55-1.58: ARCHITECTURE.md, segment store costs).
pub const SPARE_PERCENT_DEFAULT: u32 = 40;
/// Largest spare: a shard must keep some usable capacity.
pub const SPARE_PERCENT_MAX: u32 = 90;
/// Two superblock copies: mkfs writes both; a torn write of one leaves the other.
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, BLOCK_SIZE_BYTES];
/// Segments start at 1 MiB: room for the superblocks, aligned for any device.
pub const SEGMENTS_START_BYTES: u64 = 1 << 20;
pub const SEGMENT_SIZE_MIN_BYTES: u64 = 1 << 20;
pub const SEGMENT_SIZE_MAX_BYTES: u64 = 1 << 32;
pub const SHARDS_MAX: u32 = 64;
/// A shard needs an open segment, one being cleaned and a reserve to clean into.
pub const SEGMENTS_PER_SHARD_MIN: u32 = 4;
pub const RECORD_HEADER_SIZE_BYTES: usize = 88;
/// Bytes of deltas in one record: bounded so a record's head is a bounded read.
pub const RECORD_METADATA_MAX_BYTES: u32 = 1 << 20;
/// Data blocks in one record (16 MiB): bounded so a record always fits a segment.
pub const RECORD_DATA_BLOCKS_MAX: u32 = 4096;
pub const OID_MAX_BYTES: usize = 1024;

const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"CRMNSUPR");
const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"CRMNSEGH");
const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"CRMNRECD");
const SUPERBLOCK_CRC_OFFSET: usize = 76;
const SEGMENT_HEADER_CRC_OFFSET: usize = 64;
const RECORD_HEADER_CRC_OFFSET: usize = 84;

const _: () = assert!(SUPERBLOCK_CRC_OFFSET + 4 <= BLOCK_SIZE_BYTES as usize);
const _: () = assert!(RECORD_HEADER_CRC_OFFSET + 4 == RECORD_HEADER_SIZE_BYTES);
const _: () = assert!(SEGMENTS_START_BYTES >= 2 * BLOCK_SIZE_BYTES);
const _: () = assert!(
    (RECORD_HEADER_SIZE_BYTES as u64 + RECORD_METADATA_MAX_BYTES as u64)
        + RECORD_DATA_BLOCKS_MAX as u64 * BLOCK_SIZE_BYTES
        < SEGMENT_SIZE_MIN_BYTES * 32
);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatError {
    BadMagic {
        what: &'static str,
    },
    BadVersion {
        what: &'static str,
        version: u32,
    },
    BadCrc {
        what: &'static str,
    },
    /// Written by another filesystem (a previous mkfs): its nonce does not match.
    Foreign {
        what: &'static str,
    },
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    Geometry(String),
    BadDelta {
        offset: usize,
        reason: &'static str,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::BadMagic { what } => write!(f, "{what}: bad magic"),
            FormatError::BadVersion { what, version } => {
                write!(f, "{what}: format version {version}, this build reads version {FORMAT_VERSION} only (no upgrade path yet: copy the objects out with a matching build, then mkfs)")
            }
            FormatError::BadCrc { what } => write!(f, "{what}: checksum mismatch"),
            FormatError::Foreign { what } => write!(f, "{what}: belongs to another filesystem"),
            FormatError::Truncated { what, needed, got } => {
                write!(f, "{what}: needs {needed} bytes, got {got}")
            }
            FormatError::Geometry(reason) => write!(f, "geometry: {reason}"),
            FormatError::BadDelta { offset, reason } => {
                write!(f, "delta at byte {offset}: {reason}")
            }
        }
    }
}

impl std::error::Error for FormatError {}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn check_version(what: &'static str, version: u32) -> Result<(), FormatError> {
    if version != FORMAT_VERSION {
        return Err(FormatError::BadVersion { what, version });
    }
    Ok(())
}

fn need(what: &'static str, bytes: &[u8], needed: usize) -> Result<(), FormatError> {
    if bytes.len() < needed {
        return Err(FormatError::Truncated {
            what,
            needed,
            got: bytes.len(),
        });
    }
    Ok(())
}

// ---- superblock -----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every rewrite; mount takes the valid copy with the highest.
    pub generation: u64,
    pub uuid: [u8; 16],
    pub device_size: u64,
    pub segment_size: u64,
    pub segment_count: u32,
    pub shard_count: u32,
    /// Percent of each shard's data capacity that clients may not fill (the over-provisioning
    /// of an SSD): the cleaner's elbow room. 0..=`SPARE_PERCENT_MAX`.
    pub spare_percent: u32,
}

impl Superblock {
    /// The geometry mkfs lays out on a device of `device_size` bytes.
    pub fn for_device(
        device_size: u64,
        segment_size: u64,
        shard_count: u32,
        uuid: [u8; 16],
    ) -> Result<Superblock, FormatError> {
        if !(SEGMENT_SIZE_MIN_BYTES..=SEGMENT_SIZE_MAX_BYTES).contains(&segment_size)
            || segment_size % BLOCK_SIZE_BYTES != 0
        {
            return Err(FormatError::Geometry(format!(
                "segment size {segment_size} must be a multiple of 4 KiB between {SEGMENT_SIZE_MIN_BYTES} and {SEGMENT_SIZE_MAX_BYTES}"
            )));
        }
        if shard_count == 0 || shard_count > SHARDS_MAX {
            return Err(FormatError::Geometry(format!(
                "shard count {shard_count} must be 1..={SHARDS_MAX}"
            )));
        }
        let segment_count = device_size.saturating_sub(SEGMENTS_START_BYTES) / segment_size;
        let needed = u64::from(shard_count * SEGMENTS_PER_SHARD_MIN);
        if segment_count < needed || segment_count > u64::from(u32::MAX) {
            return Err(FormatError::Geometry(format!(
                "a {device_size}-byte device holds {segment_count} segments of {segment_size} bytes; {shard_count} shard(s) need at least {needed}"
            )));
        }
        Ok(Superblock {
            generation: 1,
            uuid,
            device_size,
            segment_size,
            segment_count: segment_count as u32,
            shard_count,
            spare_percent: 0,
        })
    }

    /// The same geometry with `spare_percent` of the data capacity kept from clients.
    pub fn with_spare(self, spare_percent: u32) -> Result<Superblock, FormatError> {
        if spare_percent > SPARE_PERCENT_MAX {
            return Err(FormatError::Geometry(format!(
                "spare {spare_percent}% must be 0..={SPARE_PERCENT_MAX}%"
            )));
        }
        Ok(Superblock {
            spare_percent,
            ..self
        })
    }

    /// Data blocks of shard `shard` clients may have mapped at once: its segments' blocks
    /// (less each segment's header block) less the spare.
    pub fn usable_blocks(&self, shard: u32) -> u64 {
        let segments = self.shard_segments(shard).len() as u64;
        let blocks = segments * (self.segment_size / BLOCK_SIZE_BYTES - 1);
        blocks * u64::from(100 - self.spare_percent) / 100
    }

    /// Tags every segment and record of this filesystem, so leftovers of an earlier mkfs on the
    /// same device are never mistaken for its own.
    pub fn nonce(&self) -> u64 {
        u64_at(&self.uuid, 0) ^ u64_at(&self.uuid, 8)
    }

    /// The segments shard `shard` owns: a contiguous, disjoint range.
    pub fn shard_segments(&self, shard: u32) -> Range<u32> {
        assert!(shard < self.shard_count);
        let count = u64::from(self.segment_count);
        let shards = u64::from(self.shard_count);
        let start = count * u64::from(shard) / shards;
        let end = count * (u64::from(shard) + 1) / shards;
        start as u32..end as u32
    }

    /// The segment holding device offset `offset`, if any does.
    pub fn segment_at(&self, offset: u64) -> Option<u32> {
        let segment = offset.checked_sub(SEGMENTS_START_BYTES)? / self.segment_size;
        (segment < u64::from(self.segment_count)).then_some(segment as u32)
    }

    pub fn segment_offset(&self, segment: u32) -> u64 {
        assert!(segment < self.segment_count);
        SEGMENTS_START_BYTES + u64::from(segment) * self.segment_size
    }

    pub fn encode(&self) -> [u8; BLOCK_SIZE_BYTES as usize] {
        let mut block = [0u8; BLOCK_SIZE_BYTES as usize];
        put_u64(&mut block, 0, SUPERBLOCK_MAGIC);
        put_u32(&mut block, 8, FORMAT_VERSION);
        put_u32(&mut block, 12, BLOCK_SIZE_BYTES as u32);
        put_u64(&mut block, 16, self.generation);
        block[24..40].copy_from_slice(&self.uuid);
        put_u64(&mut block, 40, self.device_size);
        put_u64(&mut block, 48, self.segment_size);
        put_u32(&mut block, 56, self.segment_count);
        put_u32(&mut block, 60, self.shard_count);
        put_u64(&mut block, 64, SEGMENTS_START_BYTES);
        put_u32(&mut block, 72, self.spare_percent);
        let crc = carmine_crc::crc32c(&block[..SUPERBLOCK_CRC_OFFSET]);
        put_u32(&mut block, SUPERBLOCK_CRC_OFFSET, crc);
        block
    }

    pub fn decode(block: &[u8]) -> Result<Superblock, FormatError> {
        const WHAT: &str = "superblock";
        need(WHAT, block, SUPERBLOCK_CRC_OFFSET + 4)?;
        if u64_at(block, 0) != SUPERBLOCK_MAGIC {
            return Err(FormatError::BadMagic { what: WHAT });
        }
        // The version first: another version's superblock has its crc elsewhere, and the
        // operator needs "made by another version", not "checksum mismatch".
        check_version(WHAT, u32_at(block, 8))?;
        if carmine_crc::crc32c(&block[..SUPERBLOCK_CRC_OFFSET])
            != u32_at(block, SUPERBLOCK_CRC_OFFSET)
        {
            return Err(FormatError::BadCrc { what: WHAT });
        }
        if u32_at(block, 12) as u64 != BLOCK_SIZE_BYTES || u64_at(block, 64) != SEGMENTS_START_BYTES
        {
            return Err(FormatError::Geometry(
                "block size or segment start differs from this version's".into(),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&block[24..40]);
        let decoded = Superblock::for_device(
            u64_at(block, 40),
            u64_at(block, 48),
            u32_at(block, 60),
            uuid,
        )?
        .with_spare(u32_at(block, 72))?;
        if decoded.segment_count != u32_at(block, 56) {
            return Err(FormatError::Geometry(
                "segment count does not match the device size".into(),
            ));
        }
        Ok(Superblock {
            generation: u64_at(block, 16),
            ..decoded
        })
    }

    /// The superblock to mount from, given both copies: the valid one with the higher generation.
    pub fn pick(
        a: Result<Superblock, FormatError>,
        b: Result<Superblock, FormatError>,
    ) -> Result<Superblock, FormatError> {
        match (a, b) {
            (Ok(a), Ok(b)) if a.generation == b.generation && a != b => Err(FormatError::Geometry(
                "the two superblock copies disagree at the same generation".into(),
            )),
            (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(a), Err(_)) => Err(a),
        }
    }
}

// ---- segment header -------------------------------------------------------------------------

/// First block of a segment once its shard opens it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub nonce: u64,
    pub shard: u32,
    pub segment: u32,
    /// Order of the shard's log: segments replay in this order.
    pub segment_seq: u64,
    /// Sequence number the segment's first record carries.
    pub first_record_seq: u64,
    /// Where replay starts, as the shard knew it when it opened this segment: the first record
    /// of the newest complete checkpoint (its sequence number and device offset). 0 means the
    /// log has no checkpoint yet: replay starts at the oldest segment's first record.
    pub replay_start_seq: u64,
    pub replay_start_offset: u64,
    /// A cold segment: the cleaner's log head, holding the data blocks of `ExtentMove`s that
    /// records in journal segments name (`RecordHeader::cold_offset`), and no record. Never
    /// part of the log's chain; the scan lists it with the data segments. Its
    /// `first_record_seq` and replay start are 0.
    pub cold: bool,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; BLOCK_SIZE_BYTES as usize] {
        let mut block = [0u8; BLOCK_SIZE_BYTES as usize];
        put_u64(&mut block, 0, SEGMENT_MAGIC);
        put_u32(&mut block, 8, FORMAT_VERSION);
        put_u32(&mut block, 12, self.shard);
        put_u32(&mut block, 16, self.segment);
        put_u32(&mut block, 20, u32::from(self.cold));
        put_u64(&mut block, 24, self.nonce);
        put_u64(&mut block, 32, self.segment_seq);
        put_u64(&mut block, 40, self.first_record_seq);
        put_u64(&mut block, 48, self.replay_start_seq);
        put_u64(&mut block, 56, self.replay_start_offset);
        let crc = carmine_crc::crc32c(&block[..SEGMENT_HEADER_CRC_OFFSET]);
        put_u32(&mut block, SEGMENT_HEADER_CRC_OFFSET, crc);
        block
    }

    /// Decodes and checks that the header belongs to this filesystem and this segment.
    pub fn decode(block: &[u8], nonce: u64, segment: u32) -> Result<SegmentHeader, FormatError> {
        const WHAT: &str = "segment header";
        need(WHAT, block, SEGMENT_HEADER_CRC_OFFSET + 4)?;
        if u64_at(block, 0) != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic { what: WHAT });
        }
        if carmine_crc::crc32c(&block[..SEGMENT_HEADER_CRC_OFFSET])
            != u32_at(block, SEGMENT_HEADER_CRC_OFFSET)
        {
            return Err(FormatError::BadCrc { what: WHAT });
        }
        check_version(WHAT, u32_at(block, 8))?;
        let cold = match u32_at(block, 20) {
            0 => false,
            1 => true,
            kind => {
                return Err(FormatError::Geometry(format!(
                    "segment kind {kind} unknown"
                )))
            }
        };
        let header = SegmentHeader {
            nonce: u64_at(block, 24),
            shard: u32_at(block, 12),
            segment: u32_at(block, 16),
            segment_seq: u64_at(block, 32),
            first_record_seq: u64_at(block, 40),
            replay_start_seq: u64_at(block, 48),
            replay_start_offset: u64_at(block, 56),
            cold,
        };
        if header.nonce != nonce || header.segment != segment {
            return Err(FormatError::Foreign { what: WHAT });
        }
        Ok(header)
    }
}

// ---- record ---------------------------------------------------------------------------------

/// Head of a journal record: `RecordHeader | deltas | padding to a block | data blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub nonce: u64,
    pub shard: u32,
    /// Per-shard, strictly increasing by one: a gap or repeat ends replay.
    pub record_seq: u64,
    pub segment_seq: u64,
    pub delta_count: u32,
    pub metadata_len: u32,
    pub data_blocks: u32,
    /// crc32c of the data blocks' own crc32c values (`record_data_crc`): detects a torn
    /// data write at replay. Built from the per-block crcs the deltas carry anyway, so the
    /// writer never hashes a block twice (combining whole-block crcs costs more than a block).
    pub data_crc: u32,
    /// `RECORD_FLAG_*` bits.
    pub flags: u32,
    /// The record's cold run: `cold_blocks` data blocks the cleaner copied, written at device
    /// offset `cold_offset` in the cold segment whose header carries `cold_segment_seq`,
    /// covered by `cold_crc` (as `data_crc`). All zero when the record has none. The record
    /// is valid only if its cold run is (the scan reads and checks it): a record whose cold
    /// write was torn is a torn record, and ends the log like one.
    pub cold_offset: u64,
    pub cold_segment_seq: u64,
    pub cold_blocks: u32,
    pub cold_crc: u32,
}

/// The record is part of a checkpoint: its deltas rebuild metadata from nothing, so replay
/// applies it only as part of the checkpoint it starts from (elsewhere the state it describes
/// is already there).
pub const RECORD_FLAG_CHECKPOINT: u32 = 1;
/// The last record of a checkpoint.
pub const RECORD_FLAG_CHECKPOINT_END: u32 = 2;
/// The record was sealed while the record before it was in flight (not yet known durable),
/// so the two went to the device side by side and a power cut may keep this one and tear
/// that one. Replay ignores the flag (it stops at the torn record either way); the search for
/// records past the log's end (`tail.rs`) uses it to tell that state from damage. Readers of
/// format 4 built before the flag ignore it too.
pub const RECORD_FLAG_OVERLAPS: u32 = 4;

impl RecordHeader {
    /// Blocks taken by the header and the deltas (the record's head).
    pub fn head_blocks(&self) -> u32 {
        let head = RECORD_HEADER_SIZE_BYTES as u64 + u64::from(self.metadata_len);
        head.div_ceil(BLOCK_SIZE_BYTES) as u32
    }

    pub fn total_blocks(&self) -> u32 {
        self.head_blocks() + self.data_blocks
    }

    /// Writes header, deltas and zero padding into `head` (exactly `head_blocks()` blocks).
    pub fn encode_head(&self, metadata: &[u8], head: &mut [u8]) {
        assert_eq!(metadata.len(), self.metadata_len as usize);
        assert!(
            self.metadata_len <= RECORD_METADATA_MAX_BYTES
                && self.data_blocks <= RECORD_DATA_BLOCKS_MAX
                && self.cold_blocks <= RECORD_DATA_BLOCKS_MAX
                && (self.cold_blocks == 0) == (self.cold_offset == 0)
        );
        assert_eq!(
            head.len() as u64,
            u64::from(self.head_blocks()) * BLOCK_SIZE_BYTES
        );
        head.fill(0);
        put_u64(head, 0, RECORD_MAGIC);
        put_u64(head, 8, self.nonce);
        put_u64(head, 16, self.record_seq);
        put_u64(head, 24, self.segment_seq);
        put_u32(head, 32, self.shard);
        put_u32(head, 36, self.delta_count);
        put_u32(head, 40, self.metadata_len);
        put_u32(head, 44, self.data_blocks);
        put_u32(head, 48, self.data_crc);
        put_u32(head, 52, FORMAT_VERSION);
        put_u32(head, 56, self.flags);
        put_u64(head, 60, self.cold_offset);
        put_u64(head, 68, self.cold_segment_seq);
        put_u32(head, 76, self.cold_blocks);
        put_u32(head, 80, self.cold_crc);
        head[RECORD_HEADER_SIZE_BYTES..RECORD_HEADER_SIZE_BYTES + metadata.len()]
            .copy_from_slice(metadata);
        let mut crc = carmine_crc::crc32c(&head[..RECORD_HEADER_CRC_OFFSET]);
        crc = carmine_crc::crc32c_append(crc, metadata);
        put_u32(head, RECORD_HEADER_CRC_OFFSET, crc);
    }

    /// Reads the fixed header from a record's first block. Checks magic, nonce and bounds; the
    /// crc needs the whole head (`verify_head`), which may span more blocks.
    pub fn decode(block: &[u8], nonce: u64) -> Result<RecordHeader, FormatError> {
        const WHAT: &str = "record header";
        need(WHAT, block, RECORD_HEADER_SIZE_BYTES)?;
        if u64_at(block, 0) != RECORD_MAGIC {
            return Err(FormatError::BadMagic { what: WHAT });
        }
        if u64_at(block, 8) != nonce {
            return Err(FormatError::Foreign { what: WHAT });
        }
        check_version(WHAT, u32_at(block, 52))?;
        let header = RecordHeader {
            nonce,
            record_seq: u64_at(block, 16),
            segment_seq: u64_at(block, 24),
            shard: u32_at(block, 32),
            delta_count: u32_at(block, 36),
            metadata_len: u32_at(block, 40),
            data_blocks: u32_at(block, 44),
            data_crc: u32_at(block, 48),
            flags: u32_at(block, 56),
            cold_offset: u64_at(block, 60),
            cold_segment_seq: u64_at(block, 68),
            cold_blocks: u32_at(block, 76),
            cold_crc: u32_at(block, 80),
        };
        if header.metadata_len > RECORD_METADATA_MAX_BYTES
            || header.data_blocks > RECORD_DATA_BLOCKS_MAX
            || header.cold_blocks > RECORD_DATA_BLOCKS_MAX
            || (header.cold_blocks == 0) != (header.cold_offset == 0)
            || header.cold_offset % BLOCK_SIZE_BYTES != 0
        {
            return Err(FormatError::Geometry(
                "record larger than the format allows".into(),
            ));
        }
        Ok(header)
    }

    /// Checks the head's crc and returns the deltas' bytes.
    pub fn verify_head<'a>(&self, head: &'a [u8]) -> Result<&'a [u8], FormatError> {
        const WHAT: &str = "record head";
        let metadata_end = RECORD_HEADER_SIZE_BYTES + self.metadata_len as usize;
        need(WHAT, head, metadata_end)?;
        let mut crc = carmine_crc::crc32c(&head[..RECORD_HEADER_CRC_OFFSET]);
        crc = carmine_crc::crc32c_append(crc, &head[RECORD_HEADER_SIZE_BYTES..metadata_end]);
        if crc != u32_at(head, RECORD_HEADER_CRC_OFFSET) {
            return Err(FormatError::BadCrc { what: WHAT });
        }
        Ok(&head[RECORD_HEADER_SIZE_BYTES..metadata_end])
    }

    pub fn verify_data(&self, data: &[u8]) -> Result<(), FormatError> {
        const WHAT: &str = "record data";
        let len = self.data_blocks as usize * BLOCK_SIZE_BYTES as usize;
        need(WHAT, data, len)?;
        if record_data_crc(&data[..len]) != self.data_crc {
            return Err(FormatError::BadCrc { what: WHAT });
        }
        Ok(())
    }

    /// Checks the record's cold run, as read from `cold_offset`.
    pub fn verify_cold(&self, cold: &[u8]) -> Result<(), FormatError> {
        const WHAT: &str = "record cold data";
        let len = self.cold_blocks as usize * BLOCK_SIZE_BYTES as usize;
        need(WHAT, cold, len)?;
        if record_data_crc(&cold[..len]) != self.cold_crc {
            return Err(FormatError::BadCrc { what: WHAT });
        }
        Ok(())
    }
}

/// Adds one data block, by its crc32c, to a record's `data_crc` (start from 0).
pub fn record_data_crc_append(data_crc: u32, block_crc: u32) -> u32 {
    carmine_crc::crc32c_append(data_crc, &block_crc.to_le_bytes())
}

/// A record's `data_crc` for `data` (whole blocks).
pub fn record_data_crc(data: &[u8]) -> u32 {
    data.chunks(BLOCK_SIZE_BYTES as usize)
        .fold(0, |acc, block| {
            record_data_crc_append(acc, carmine_crc::crc32c(block))
        })
}

// ---- deltas ---------------------------------------------------------------------------------

/// One metadata change, as journaled. Byte strings borrow from the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delta<'a> {
    ObjectCreate {
        oid: &'a [u8],
    },
    ObjectRemove {
        oid: &'a [u8],
    },
    ObjectSize {
        oid: &'a [u8],
        size: u64,
    },
    /// Logical blocks `[offset, offset + blocks * 4 KiB)` of the object now live at device
    /// offset `physical`; `crcs` holds one little-endian crc32c per block.
    ExtentMap {
        oid: &'a [u8],
        offset: u64,
        physical: u64,
        blocks: u32,
        crcs: &'a [u8],
    },
    /// Logical blocks that no longer hold data (read back as zeros).
    ExtentUnmap {
        oid: &'a [u8],
        offset: u64,
        blocks: u32,
    },
    XattrSet {
        oid: &'a [u8],
        name: &'a [u8],
        value: &'a [u8],
    },
    XattrRemove {
        oid: &'a [u8],
        name: &'a [u8],
    },
    OmapSet {
        oid: &'a [u8],
        key: &'a [u8],
        value: &'a [u8],
    },
    OmapRemove {
        oid: &'a [u8],
        key: &'a [u8],
    },
    /// A checkpoint's record of an object: it exists under extent-tree id `id` with this size
    /// and change count (its extents, xattrs and omap follow as their own deltas).
    ObjectState {
        oid: &'a [u8],
        id: u64,
        size: u64,
        changes: u64,
    },
    /// A checkpoint's last delta: the id the next created object gets. Every id a checkpoint's
    /// `ObjectState` names is below it, and the `ObjectCreate`s replayed after the checkpoint
    /// take ids from it on, in the order the running store applied them. The one delta that
    /// names no object.
    ObjectIdNext {
        next: u64,
    },
    /// A checkpoint that wrote the extent tree's nodes (as data blocks of its records) names
    /// the tree here, in its last record, after `ObjectIdNext`: the root's device address
    /// (0: an empty tree), its height (0: the root is a leaf), the entries it holds and the
    /// generation its nodes were written with. Replay loads the tree from the root instead of
    /// applying `ExtentMap` deltas (a checkpoint without it is a dump and carries those).
    TreeRoot {
        root: u64,
        height: u8,
        entries: u64,
        generation: u64,
    },
    /// The cleaner copied blocks `[offset, offset + blocks * 4 KiB)` of the object from device
    /// offset `from` to `physical`. Applies to each block only if it still lives at `from`: a
    /// client write journaled in between wins, and the copy is dead on arrival.
    ExtentMove {
        oid: &'a [u8],
        offset: u64,
        from: u64,
        physical: u64,
        blocks: u32,
    },
}

const KIND_OBJECT_CREATE: u8 = 1;
const KIND_OBJECT_REMOVE: u8 = 2;
const KIND_OBJECT_SIZE: u8 = 3;
const KIND_EXTENT_MAP: u8 = 4;
const KIND_EXTENT_UNMAP: u8 = 5;
const KIND_XATTR_SET: u8 = 6;
const KIND_XATTR_REMOVE: u8 = 7;
const KIND_OMAP_SET: u8 = 8;
const KIND_OMAP_REMOVE: u8 = 9;
const KIND_OBJECT_STATE: u8 = 10;
const KIND_EXTENT_MOVE: u8 = 11;
const KIND_OBJECT_ID_NEXT: u8 = 12;
const KIND_TREE_ROOT: u8 = 13;
/// Encoded size of a `TreeRoot` delta (kind, root, height, entries, generation): the room a
/// checkpoint's last record keeps for it.
pub const TREE_ROOT_DELTA_BYTES: usize = 1 + 8 + 1 + 8 + 8;

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl Delta<'_> {
    /// The object the delta changes (`None` for `ObjectIdNext` and `TreeRoot`, which name none).
    pub fn oid(&self) -> Option<&[u8]> {
        Some(match *self {
            Delta::ObjectCreate { oid }
            | Delta::ObjectRemove { oid }
            | Delta::ObjectSize { oid, .. }
            | Delta::ExtentMap { oid, .. }
            | Delta::ExtentUnmap { oid, .. }
            | Delta::XattrSet { oid, .. }
            | Delta::XattrRemove { oid, .. }
            | Delta::OmapSet { oid, .. }
            | Delta::OmapRemove { oid, .. }
            | Delta::ObjectState { oid, .. }
            | Delta::ExtentMove { oid, .. } => oid,
            Delta::ObjectIdNext { .. } | Delta::TreeRoot { .. } => return None,
        })
    }

    /// Appends the encoding (kind, oid, fields; `ObjectIdNext` and `TreeRoot`: kind, fields)
    /// to `out`, reusing its capacity.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let Some(oid) = self.oid() else {
            match *self {
                Delta::ObjectIdNext { next } => {
                    out.push(KIND_OBJECT_ID_NEXT);
                    out.extend_from_slice(&next.to_le_bytes());
                }
                Delta::TreeRoot {
                    root,
                    height,
                    entries,
                    generation,
                } => {
                    let start = out.len();
                    out.push(KIND_TREE_ROOT);
                    out.extend_from_slice(&root.to_le_bytes());
                    out.push(height);
                    out.extend_from_slice(&entries.to_le_bytes());
                    out.extend_from_slice(&generation.to_le_bytes());
                    debug_assert_eq!(out.len() - start, TREE_ROOT_DELTA_BYTES);
                }
                _ => unreachable!("only ObjectIdNext and TreeRoot name no object"),
            }
            return;
        };
        assert!(!oid.is_empty() && oid.len() <= OID_MAX_BYTES);
        let kind = match self {
            Delta::ObjectCreate { .. } => KIND_OBJECT_CREATE,
            Delta::ObjectRemove { .. } => KIND_OBJECT_REMOVE,
            Delta::ObjectSize { .. } => KIND_OBJECT_SIZE,
            Delta::ExtentMap { .. } => KIND_EXTENT_MAP,
            Delta::ExtentUnmap { .. } => KIND_EXTENT_UNMAP,
            Delta::XattrSet { .. } => KIND_XATTR_SET,
            Delta::XattrRemove { .. } => KIND_XATTR_REMOVE,
            Delta::OmapSet { .. } => KIND_OMAP_SET,
            Delta::OmapRemove { .. } => KIND_OMAP_REMOVE,
            Delta::ObjectState { .. } => KIND_OBJECT_STATE,
            Delta::ExtentMove { .. } => KIND_EXTENT_MOVE,
            Delta::ObjectIdNext { .. } | Delta::TreeRoot { .. } => {
                unreachable!("encoded above")
            }
        };
        out.push(kind);
        put_bytes(out, oid);
        match *self {
            Delta::ObjectCreate { .. }
            | Delta::ObjectRemove { .. }
            | Delta::ObjectIdNext { .. }
            | Delta::TreeRoot { .. } => {}
            Delta::ObjectSize { size, .. } => out.extend_from_slice(&size.to_le_bytes()),
            Delta::ExtentMap {
                offset,
                physical,
                blocks,
                crcs,
                ..
            } => {
                assert_eq!(crcs.len(), blocks as usize * 4, "one crc per block");
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&physical.to_le_bytes());
                out.extend_from_slice(&blocks.to_le_bytes());
                out.extend_from_slice(crcs);
            }
            Delta::ExtentUnmap { offset, blocks, .. } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&blocks.to_le_bytes());
            }
            Delta::XattrSet {
                name: a, value: b, ..
            }
            | Delta::OmapSet {
                key: a, value: b, ..
            } => {
                put_bytes(out, a);
                put_bytes(out, b);
            }
            Delta::XattrRemove { name: a, .. } | Delta::OmapRemove { key: a, .. } => {
                put_bytes(out, a)
            }
            Delta::ObjectState {
                id, size, changes, ..
            } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&changes.to_le_bytes());
            }
            Delta::ExtentMove {
                offset,
                from,
                physical,
                blocks,
                ..
            } => {
                assert!(blocks > 0);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&physical.to_le_bytes());
                out.extend_from_slice(&blocks.to_le_bytes());
            }
        }
    }
}

/// Appends an `ExtentMap` delta built from crcs as integers (the journal's hot path: no
/// intermediate byte vector). Returns the offset in `out` of its `physical` field, which the
/// journal patches once the record is placed. Same bytes as `Delta::ExtentMap::encode`.
pub fn encode_extent_map(
    out: &mut Vec<u8>,
    oid: &[u8],
    offset: u64,
    physical: u64,
    crcs: &[u32],
) -> usize {
    assert!(!oid.is_empty() && oid.len() <= OID_MAX_BYTES && !crcs.is_empty());
    out.push(KIND_EXTENT_MAP);
    put_bytes(out, oid);
    out.extend_from_slice(&offset.to_le_bytes());
    let physical_at = out.len();
    out.extend_from_slice(&physical.to_le_bytes());
    out.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
    for crc in crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    physical_at
}

/// Appends an `ExtentMove` delta; returns the offset of its `physical` field (patched by the
/// journal, as for `encode_extent_map`). Same bytes as `Delta::ExtentMove::encode`.
pub fn encode_extent_move(
    out: &mut Vec<u8>,
    oid: &[u8],
    offset: u64,
    from: u64,
    blocks: u32,
) -> usize {
    let before = out.len();
    Delta::ExtentMove {
        oid,
        offset,
        from,
        physical: 0,
        blocks,
    }
    .encode(out);
    // kind, oid (length + bytes), offset, from: then physical.
    let physical_at = before + 1 + 4 + oid.len() + 8 + 8;
    debug_assert_eq!(out.len(), physical_at + 8 + 4);
    physical_at
}

/// Reads deltas back from a record's verified metadata. Yields an error (and then stops) at the
/// first malformed delta: metadata that passed its crc but does not parse is corruption or a bug.
pub struct DeltaReader<'a> {
    bytes: &'a [u8],
    at: usize,
    failed: bool,
}

impl<'a> DeltaReader<'a> {
    pub fn new(bytes: &'a [u8]) -> DeltaReader<'a> {
        DeltaReader {
            bytes,
            at: 0,
            failed: false,
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len());
        let end = end.ok_or(FormatError::BadDelta {
            offset: self.at,
            reason: "runs past the end of the record",
        })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32_at(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64_at(self.take(8)?, 0))
    }
    fn bytes(&mut self, max: usize) -> Result<&'a [u8], FormatError> {
        let at = self.at;
        let len = self.u32()? as usize;
        if len > max {
            return Err(FormatError::BadDelta {
                offset: at,
                reason: "byte string longer than its limit",
            });
        }
        self.take(len)
    }

    fn next_delta(&mut self) -> Result<Delta<'a>, FormatError> {
        let start = self.at;
        let kind = self.take(1)?[0];
        if kind == KIND_OBJECT_ID_NEXT {
            return Ok(Delta::ObjectIdNext { next: self.u64()? });
        }
        if kind == KIND_TREE_ROOT {
            let root = self.u64()?;
            let height = self.take(1)?[0];
            let (entries, generation) = (self.u64()?, self.u64()?);
            if root % BLOCK_SIZE_BYTES != 0 || (root == 0) != (entries == 0) {
                return Err(FormatError::BadDelta {
                    offset: start,
                    reason: "tree root misaligned, or empty tree with entries (or the reverse)",
                });
            }
            return Ok(Delta::TreeRoot {
                root,
                height,
                entries,
                generation,
            });
        }
        let oid = self.bytes(OID_MAX_BYTES)?;
        if oid.is_empty() {
            return Err(FormatError::BadDelta {
                offset: start,
                reason: "empty object id",
            });
        }
        let value_max = RECORD_METADATA_MAX_BYTES as usize;
        Ok(match kind {
            KIND_OBJECT_CREATE => Delta::ObjectCreate { oid },
            KIND_OBJECT_REMOVE => Delta::ObjectRemove { oid },
            KIND_OBJECT_SIZE => Delta::ObjectSize {
                oid,
                size: self.u64()?,
            },
            KIND_EXTENT_MAP => {
                let (offset, physical, blocks) = (self.u64()?, self.u64()?, self.u32()?);
                if blocks == 0 || blocks > RECORD_DATA_BLOCKS_MAX * 64 {
                    return Err(FormatError::BadDelta {
                        offset: start,
                        reason: "extent block count out of range",
                    });
                }
                let crcs = self.take(blocks as usize * 4)?;
                Delta::ExtentMap {
                    oid,
                    offset,
                    physical,
                    blocks,
                    crcs,
                }
            }
            KIND_EXTENT_UNMAP => Delta::ExtentUnmap {
                oid,
                offset: self.u64()?,
                blocks: self.u32()?,
            },
            KIND_XATTR_SET => Delta::XattrSet {
                oid,
                name: self.bytes(value_max)?,
                value: self.bytes(value_max)?,
            },
            KIND_XATTR_REMOVE => Delta::XattrRemove {
                oid,
                name: self.bytes(value_max)?,
            },
            KIND_OMAP_SET => Delta::OmapSet {
                oid,
                key: self.bytes(value_max)?,
                value: self.bytes(value_max)?,
            },
            KIND_OMAP_REMOVE => Delta::OmapRemove {
                oid,
                key: self.bytes(value_max)?,
            },
            KIND_OBJECT_STATE => Delta::ObjectState {
                oid,
                id: self.u64()?,
                size: self.u64()?,
                changes: self.u64()?,
            },
            KIND_EXTENT_MOVE => {
                let (offset, from, physical, blocks) =
                    (self.u64()?, self.u64()?, self.u64()?, self.u32()?);
                if blocks == 0 || blocks > RECORD_DATA_BLOCKS_MAX {
                    return Err(FormatError::BadDelta {
                        offset: start,
                        reason: "extent block count out of range",
                    });
                }
                Delta::ExtentMove {
                    oid,
                    offset,
                    from,
                    physical,
                    blocks,
                }
            }
            _ => {
                return Err(FormatError::BadDelta {
                    offset: start,
                    reason: "unknown delta kind",
                })
            }
        })
    }
}

impl<'a> Iterator for DeltaReader<'a> {
    type Item = Result<Delta<'a>, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at == self.bytes.len() {
            return None;
        }
        let delta = self.next_delta();
        self.failed = delta.is_err();
        Some(delta)
    }
}

#[cfg(test)]
mod tests;
