//! The simulated device: one `MemQueuePair` per shard holding only what that shard may touch
//! (the superblock area and its own partition), seen through `ShardWindow` at the real
//! device's offsets. The store and mount code see one device of the full size, as in
//! production; the simulation copies a few MiB per power cycle instead of the whole device
//! per core. A request outside the window is refused (`OutOfRange`): a shard writing into
//! another shard's partition is a bug the simulation reports.

use carmine_storage::queue_pair::{check_request, IoError, IoVec, QueuePair, SubmitError};
use carmine_storage::segment::format::{Superblock, SEGMENTS_START_BYTES};
use carmine_storage::MemQueuePair;

pub struct ShardWindow {
    pub inner: MemQueuePair,
    /// The whole device's size (what `capacity_bytes` reports).
    device_bytes: u64,
    /// The shard's partition: device offsets `start..end`, held at `SEGMENTS_START_BYTES..`.
    start: u64,
    end: u64,
}

/// The device range shard `shard` owns.
pub fn partition(sb: &Superblock, shard: u32) -> (u64, u64) {
    let segments = sb.shard_segments(shard);
    let start = sb.segment_offset(segments.start);
    (
        start,
        start + u64::from(segments.len() as u32) * sb.segment_size,
    )
}

/// Shard `shard`'s window image cut out of a whole-device image.
pub fn window_image(device: &[u8], sb: &Superblock, shard: u32) -> Vec<u8> {
    let (start, end) = partition(sb, shard);
    let mut image = Vec::with_capacity((SEGMENTS_START_BYTES + end - start) as usize);
    image.extend_from_slice(&device[..SEGMENTS_START_BYTES as usize]);
    image.extend_from_slice(&device[start as usize..end as usize]);
    image
}

/// Writes a window image's partition back into a whole-device image (the superblock area is
/// taken from shard 0's window: no shard writes it after mkfs).
pub fn compose(device: &mut [u8], window: &[u8], sb: &Superblock, shard: u32) {
    let (start, end) = partition(sb, shard);
    if shard == 0 {
        device[..SEGMENTS_START_BYTES as usize]
            .copy_from_slice(&window[..SEGMENTS_START_BYTES as usize]);
    }
    device[start as usize..end as usize].copy_from_slice(&window[SEGMENTS_START_BYTES as usize..]);
}

impl ShardWindow {
    pub fn new(inner: MemQueuePair, sb: &Superblock, shard: u32) -> ShardWindow {
        let (start, end) = partition(sb, shard);
        assert_eq!(inner.capacity_bytes(), SEGMENTS_START_BYTES + end - start);
        ShardWindow {
            inner,
            device_bytes: sb.device_size,
            start,
            end,
        }
    }

    /// A medium error on the block at device offset `offset` (inside this shard's partition):
    /// its reads fail with EIO until a write to it completes or the power goes.
    pub fn inject_read_error(&mut self, offset: u64) {
        assert!(
            offset >= self.start && offset < self.end,
            "read error outside the shard"
        );
        self.inner
            .inject_read_error(SEGMENTS_START_BYTES + offset - self.start);
    }

    fn map(&self, offset: u64, buffers: &[IoVec]) -> Result<u64, SubmitError> {
        let length = check_request(offset, buffers, self.device_bytes)?;
        if offset + length <= SEGMENTS_START_BYTES {
            return Ok(offset);
        }
        if offset >= self.start && offset + length <= self.end {
            return Ok(SEGMENTS_START_BYTES + offset - self.start);
        }
        Err(SubmitError::OutOfRange)
    }
}

impl QueuePair for ShardWindow {
    fn submit_read(&mut self, offset: u64, buffers: &[IoVec], tag: u64) -> Result<(), SubmitError> {
        let at = self.map(offset, buffers)?;
        self.inner.submit_read(at, buffers, tag)
    }

    fn submit_write(
        &mut self,
        offset: u64,
        buffers: &[IoVec],
        tag: u64,
    ) -> Result<(), SubmitError> {
        let at = self.map(offset, buffers)?;
        self.inner.submit_write(at, buffers, tag)
    }

    fn submit_flush(&mut self, tag: u64) -> Result<(), SubmitError> {
        self.inner.submit_flush(tag)
    }

    fn poll(
        &mut self,
        completions_max: usize,
        complete: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        self.inner.poll(completions_max, complete)
    }

    fn capacity_bytes(&self) -> u64 {
        self.device_bytes
    }

    fn depth(&self) -> u32 {
        self.inner.depth()
    }

    fn in_flight(&self) -> u32 {
        self.inner.in_flight()
    }
}
