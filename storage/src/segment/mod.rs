//! The segment store (SeaStore's role): a log-structured store on a block `QueuePair`.
//!
//! Checkpoints and the cleaner: see ARCHITECTURE.md and `cleaner.rs`. Offline check: `fsck.rs`.
//!
//! # On-disk layout, version 7
//!
//! ```text
//! offset 0        superblock copy A (one 4 KiB block)
//! offset 4 KiB    superblock copy B
//! offset 1 MiB    segment 0 | segment 1 | ... | segment N-1      (segment_size each, from mkfs)
//! ```
//!
//! * The superblock is written by mkfs only, in two copies with a generation number: a torn
//!   write of one copy leaves the other. It holds the spare (percent of each shard's data
//!   blocks clients may not fill: the cleaner's elbow room, version 4 on). It fixes the
//!   geometry and the shard partition: shard
//!   `s` owns a contiguous range of segments (`Superblock::shard_segments`) and no shard ever
//!   touches another's, as SeaStore's per-core instances on static partitions.
//! * A segment, once opened by its shard, starts with a `SegmentHeader` block (shard, segment
//!   sequence number, the filesystem's nonce) and is then filled front to back with records.
//! * A record is `RecordHeader | deltas | data blocks`: one sequential write, made durable by a
//!   flush before any op in it is acknowledged (group commit batches ops into one record).
//!   Deltas describe metadata changes (object created, extent mapped with its per-4-KiB crc32c,
//!   xattr set, ...); data blocks are 4 KiB-aligned so they can be written straight from a
//!   network buffer and read back by offset. A checkpoint's records may instead carry
//!   extent-tree nodes as their data blocks (version 6), the last one naming the root
//!   (`TreeRoot`; `checkpoint_nodes.rs`).
//! * The cleaner's copies have a head of their own (version 7): their data blocks go to *cold*
//!   segments (header flagged cold, data blocks only, no record), as the record's *cold run*,
//!   which its header names (offset, cold segment sequence, blocks, crc); their deltas stay in
//!   the record. One record sequence, so replay order is unchanged.
//! * Replay walks a shard's segments in segment-sequence order and its records in
//!   record-sequence order; the first record that fails any check (magic, nonce, sequence,
//!   metadata crc, data crc; for the last two records, the cold run) ends the log: it is a
//!   torn tail and is discarded.
//!
//! Every data block is covered by a crc32c kept in the metadata (4 KiB granularity, so a 4 KiB
//! read verifies exactly what it reads); every metadata byte is covered by its record's crc.

pub mod btree;
pub mod checkpoint_nodes;
pub mod cleaner;
pub mod dirty;
pub mod exec;
pub mod format;
pub mod fsck;
pub mod journal;
pub mod metadata;
pub mod mount;
pub mod scan;
pub mod store;
pub mod tail;

pub use fsck::{fsck, fsck_reader, FsckError, FsckReport, Problem, ShardReport};
pub use mount::{mkfs, MountError};
pub use store::{CheckpointWrites, SegmentStats, SegmentStore};
