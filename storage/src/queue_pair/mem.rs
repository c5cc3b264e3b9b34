//! `MemQueuePair`: a RAM-backed queue pair for tests, with deterministic fault injection.
//!
//! The device has a *durable image* (what survives a power cut) and a *volatile write cache*
//! (writes that completed but that no completed flush covers yet). Reads see the cache over the
//! durable image, kept as a third image, `current`, so that a read is one copy.
//!
//! Time is counted in `poll` calls, never the wall clock: each request draws a latency `L` from
//! `MemFaults::latency_polls` at submission and completes in the `L + 1`-th poll after it (so
//! `(0, 0)` completes everything at the next poll). Among the requests due in one poll, those
//! reported complete come in submission order, or in a random order with `MemFaults::reorder`;
//! beyond `completions_max` they stay due for the next poll. A request takes effect when it is
//! reported: a write's bytes are read from its buffers then, a read's buffers filled then.
//!
//! Flush: at submission it records how many writes had completed; when it completes, exactly
//! those writes (and any earlier ones) move from the cache to the durable image. A write that
//! completes after the flush was submitted stays volatile: this is the weakest a real device may
//! be, so that a caller who flushes too early loses data here rather than in production.
//!
//! The cache holds `MemFaults::volatile_cache_bytes`; a write completing into a full cache first
//! destages the oldest cached writes to the durable image, as a write-back cache does (a device
//! may persist any completed write at any time; callers must not rely on losing data either).
//!
//! Power cut (`power_cut`): every cached write is dropped and every in-flight write is lost,
//! except one *torn* write, chosen uniformly by the seeded generator among the in-flight writes
//! (in slot order) followed by the cached writes (oldest first). Each of its units
//! (`TearGranularity`: 512 bytes or 4 KiB), in address order, independently reaches the durable
//! image with probability 1/2; the units that did are reported by `last_tear`. Afterwards every
//! outstanding request and every new one completes with `IoError::PowerLoss` at the next poll.
//!
//! Determinism: everything random comes from one SplitMix64 generator seeded by
//! `MemFaults::seed`, drawn in a fixed order (latency at each submission when the range is not a
//! single value, a shuffle of each poll's due requests under `reorder`, the tear at a power
//! cut), so the same seed and call sequence give the same completions and the same tear.

use std::collections::VecDeque;

use super::{
    check_request, IoError, IoVec, QueuePair, SubmitError, BLOCK_SIZE_BYTES, DEPTH_MAX,
    IOVECS_PER_REQUEST_MAX, SECTOR_SIZE_BYTES,
};

/// errno reported for a read of a block marked by `inject_read_error` (EIO).
const MEDIUM_ERROR_ERRNO: i32 = 5;

/// Size of the unit a power cut tears a write into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TearGranularity {
    /// 512-byte sectors (a device with 512-byte atomic writes).
    Sector512,
    /// 4 KiB blocks (a 4Kn device).
    Block4K,
}

impl TearGranularity {
    /// The unit in bytes.
    pub fn unit_bytes(self) -> usize {
        match self {
            TearGranularity::Sector512 => SECTOR_SIZE_BYTES,
            TearGranularity::Block4K => BLOCK_SIZE_BYTES,
        }
    }
}

/// Faults to inject, all driven by `seed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemFaults {
    /// Seed of the generator behind every random choice.
    pub seed: u64,
    /// Each request completes after a uniformly random number of poll calls in this inclusive
    /// range (see the module docs). `(0, 0)`: at the next poll.
    pub latency_polls: (u32, u32),
    /// Report the requests due in one poll in random order instead of submission order.
    pub reorder: bool,
    /// Size of the volatile write cache in bytes; 0 means the device's capacity. Rounded up to
    /// a block.
    pub volatile_cache_bytes: u64,
}

impl Default for MemFaults {
    /// No faults: every request completes at the next poll, in submission order.
    fn default() -> MemFaults {
        MemFaults {
            seed: 0,
            latency_polls: (0, 0),
            reorder: false,
            volatile_cache_bytes: 0,
        }
    }
}

/// The write a power cut tore, and which of its units reached the durable image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tear {
    /// Device offset of the write, in bytes.
    pub offset: u64,
    /// Length of the write, in bytes.
    pub length: u64,
    /// Whether the write was in flight (otherwise it had completed, uncovered by a flush).
    pub in_flight: bool,
    pub granularity: TearGranularity,
    /// One entry per unit, in address order: whether that unit reached the durable image.
    pub units_persisted: Vec<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

/// A request slot, preallocated: the table has `depth` of them.
struct Slot {
    busy: bool,
    /// Completes with PowerLoss: submitted before or after a power cut and not yet reported.
    lost: bool,
    kind: Kind,
    tag: u64,
    offset: u64,
    length: u64,
    iovecs: [IoVec; IOVECS_PER_REQUEST_MAX],
    iovec_count: usize,
    /// Submission order, to report due requests in that order.
    submit_seq: u64,
    /// The poll count at which the request becomes due.
    due_poll: u64,
    /// For a flush: it covers the writes whose completion number is at most this.
    flush_cut: u64,
}

const IOVEC_NONE: IoVec = IoVec {
    ptr: core::ptr::null_mut(),
    len: 0,
};

impl Slot {
    fn idle() -> Slot {
        Slot {
            busy: false,
            lost: false,
            kind: Kind::Flush,
            tag: 0,
            offset: 0,
            length: 0,
            iovecs: [IOVEC_NONE; IOVECS_PER_REQUEST_MAX],
            iovec_count: 0,
            submit_seq: 0,
            due_poll: 0,
            flush_cut: 0,
        }
    }

    fn iovecs(&self) -> &[IoVec] {
        &self.iovecs[..self.iovec_count]
    }
}

/// SplitMix64: tiny, fast, and good enough to drive test faults reproducibly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`, `n > 0` (multiply-shift: no modulo bias worth caring about here).
    fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// One completed, not yet durable write in the cache.
#[derive(Clone, Copy, Debug)]
struct CacheEntry {
    /// Completion number of the write (1 for the first write completed).
    seq: u64,
    offset: u64,
    length: usize,
    /// Where its bytes start in the cache ring.
    start: usize,
}

/// The volatile write cache: a ring of bytes holding completed writes in completion order,
/// preallocated so completing a write never allocates.
struct VolatileCache {
    ring: Vec<u8>,
    /// Ring index of the oldest entry's first byte.
    head: usize,
    used: usize,
    /// Each entry holds at least one block, so `ring.len() / BLOCK_SIZE_BYTES` bounds them.
    entries: VecDeque<CacheEntry>,
}

impl VolatileCache {
    fn new(size_bytes: usize) -> VolatileCache {
        debug_assert!(size_bytes % BLOCK_SIZE_BYTES == 0 && size_bytes > 0);
        VolatileCache {
            ring: vec![0; size_bytes],
            head: 0,
            used: 0,
            entries: VecDeque::with_capacity(size_bytes / BLOCK_SIZE_BYTES),
        }
    }

    fn free_bytes(&self) -> usize {
        self.ring.len() - self.used
    }

    /// Appends a write; the caller has made room.
    fn push(&mut self, seq: u64, offset: u64, data: &[u8]) {
        assert!(data.len() <= self.free_bytes(), "volatile cache overflow");
        let start = (self.head + self.used) % self.ring.len();
        let first = data.len().min(self.ring.len() - start);
        self.ring[start..start + first].copy_from_slice(&data[..first]);
        self.ring[..data.len() - first].copy_from_slice(&data[first..]);
        self.used += data.len();
        self.entries.push_back(CacheEntry {
            seq,
            offset,
            length: data.len(),
            start,
        });
    }

    /// Copies an entry's bytes into `out` (`out.len() == entry.length`).
    fn copy_out(&self, entry: &CacheEntry, out: &mut [u8]) {
        debug_assert_eq!(out.len(), entry.length);
        let first = entry.length.min(self.ring.len() - entry.start);
        out[..first].copy_from_slice(&self.ring[entry.start..entry.start + first]);
        out[first..].copy_from_slice(&self.ring[..entry.length - first]);
    }

    /// Removes the oldest entry, after copying its bytes into the durable image.
    fn destage_oldest(&mut self, durable: &mut [u8]) -> Option<CacheEntry> {
        let entry = self.entries.pop_front()?;
        let offset = entry.offset as usize;
        self.copy_out(&entry, &mut durable[offset..offset + entry.length]);
        self.head = (self.head + entry.length) % self.ring.len();
        self.used -= entry.length;
        Some(entry)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.head = 0;
        self.used = 0;
    }

    /// Whether a cached write covers byte `offset`.
    fn covers(&self, offset: u64) -> bool {
        self.entries
            .iter()
            .any(|e| e.offset <= offset && offset < e.offset + e.length as u64)
    }
}

/// A RAM-backed queue pair with fault injection; see the module docs for the exact model.
pub struct MemQueuePair {
    faults: MemFaults,
    rng: Rng,
    depth: u32,
    durable: Vec<u8>,
    /// The cache over the durable image: what reads return.
    current: Vec<u8>,
    cache: VolatileCache,
    slots: Box<[Slot]>,
    /// Indices of idle slots (a stack).
    free: Vec<u32>,
    /// Scratch for one poll's due slots, preallocated to `depth`.
    due: Vec<u32>,
    polls: u64,
    submits: u64,
    /// Writes completed so far; the last one's completion number.
    writes_completed: u64,
    powered_off: bool,
    /// Blocks whose reads fail with EIO until a write to them completes.
    bad_blocks: Vec<u64>,
    tear: Option<Tear>,
    /// A broken device: flushes complete without making anything durable (`set_lying_flush`).
    lying_flush: bool,
}

// SAFETY: the only raw pointers a `MemQueuePair` holds are the submitted `IoVec`s, which by
// `IoVec::new`'s contract stay valid for access from whichever thread polls the queue pair;
// nothing else in it is tied to a thread.
unsafe impl Send for MemQueuePair {}

impl MemQueuePair {
    /// A zero-filled device of `capacity_bytes`.
    ///
    /// # Panics
    /// If `capacity_bytes` is not a positive multiple of `BLOCK_SIZE_BYTES`, or `depth` is not
    /// in `1..=DEPTH_MAX`, or `faults.latency_polls` is an empty range (test set-up bugs).
    pub fn new(capacity_bytes: u64, depth: u32, faults: MemFaults) -> MemQueuePair {
        let capacity = usize::try_from(capacity_bytes).expect("capacity exceeds memory");
        MemQueuePair::from_image(vec![0; capacity], depth, faults)
    }

    /// A device whose durable image is `image`, as after a power cut: remounting.
    ///
    /// # Panics
    /// As `new`, with `image.len()` as the capacity.
    pub fn from_image(image: Vec<u8>, depth: u32, faults: MemFaults) -> MemQueuePair {
        let capacity = image.len();
        assert!(
            capacity > 0 && capacity % BLOCK_SIZE_BYTES == 0,
            "capacity {capacity} is not a positive multiple of {BLOCK_SIZE_BYTES}"
        );
        assert!(
            (1..=DEPTH_MAX).contains(&depth),
            "depth {depth} not in 1..={DEPTH_MAX}"
        );
        assert!(
            faults.latency_polls.0 <= faults.latency_polls.1,
            "empty latency range"
        );
        let cache_bytes = match faults.volatile_cache_bytes {
            0 => capacity,
            bytes => usize::try_from(bytes)
                .expect("cache exceeds memory")
                .next_multiple_of(BLOCK_SIZE_BYTES),
        };
        MemQueuePair {
            faults,
            rng: Rng(faults.seed),
            depth,
            current: image.clone(),
            durable: image,
            cache: VolatileCache::new(cache_bytes),
            slots: (0..depth).map(|_| Slot::idle()).collect(),
            // Popped from the end: slot 0 is used first.
            free: (0..depth).rev().collect(),
            due: Vec::with_capacity(depth as usize),
            polls: 0,
            submits: 0,
            writes_completed: 0,
            powered_off: false,
            bad_blocks: Vec::new(),
            tear: None,
            lying_flush: false,
        }
    }

    /// The durable image: what a power cut now would keep, before tearing.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// Whether `power_cut` has happened.
    pub fn is_powered_off(&self) -> bool {
        self.powered_off
    }

    /// The write the last power cut tore, if there was a candidate.
    pub fn last_tear(&self) -> Option<&Tear> {
        self.tear.as_ref()
    }

    /// Turns this into a broken device whose flushes report success and persist nothing
    /// (writes still reach the durable image when the cache destages them). Only for tests
    /// that prove a crash checker notices acknowledged writes going missing.
    pub fn set_lying_flush(&mut self, lying: bool) {
        self.lying_flush = lying;
    }

    /// Makes reads of the block holding `offset` fail with `IoError::Io(EIO)` until a write to
    /// that block completes (a medium error, which a rewrite remaps).
    pub fn inject_read_error(&mut self, offset: u64) {
        assert!(
            offset < self.capacity_bytes(),
            "inject_read_error past capacity"
        );
        let block = offset / BLOCK_SIZE_BYTES as u64;
        if !self.bad_blocks.contains(&block) {
            self.bad_blocks.push(block);
        }
    }

    /// Flips bit `bit` (0..8) of the byte at `offset` in the durable image (bit rot), and in
    /// what reads see unless a cached write hides that byte.
    pub fn corrupt(&mut self, offset: u64, bit: u8) {
        assert!(offset < self.capacity_bytes(), "corrupt past capacity");
        assert!(bit < 8, "bit {bit} is not in 0..8");
        let index = offset as usize;
        self.durable[index] ^= 1 << bit;
        if !self.cache.covers(offset) {
            self.current[index] ^= 1 << bit;
        }
    }

    /// Cuts the power (see the module docs): drops uncovered writes, tears one at `granularity`,
    /// and fails every outstanding and later request with PowerLoss. Returns the durable image,
    /// which `from_image` remounts. A second cut changes nothing more.
    pub fn power_cut(&mut self, granularity: TearGranularity) -> Vec<u8> {
        if !self.powered_off {
            self.powered_off = true;
            self.tear = self.tear_one(granularity);
            self.cache.clear();
            self.current.copy_from_slice(&self.durable);
            self.bad_blocks.clear();
            for slot in self.slots.iter_mut().filter(|slot| slot.busy) {
                slot.lost = true;
                slot.due_poll = self.polls + 1;
            }
        }
        self.durable.clone()
    }

    /// Picks the torn write and persists its chosen units. Allocation is fine: not data path.
    fn tear_one(&mut self, granularity: TearGranularity) -> Option<Tear> {
        let in_flight = self
            .slots
            .iter()
            .filter(|s| s.busy && !s.lost && s.kind == Kind::Write)
            .count();
        let candidates = in_flight + self.cache.entries.len();
        if candidates == 0 {
            return None;
        }
        let chosen = self.rng.below(candidates as u64) as usize;
        let (offset, data) = if chosen < in_flight {
            let slot = self
                .slots
                .iter()
                .filter(|s| s.busy && !s.lost && s.kind == Kind::Write)
                .nth(chosen)
                .expect("chosen in-flight write");
            let mut data = vec![0; slot.length as usize];
            // SAFETY: the slot is in flight, so its buffers are valid for reads and unmodified
            // (IoVec contract); `data` is exactly their total length (checked at submit).
            unsafe { gather(slot.iovecs(), &mut data) };
            (slot.offset, data)
        } else {
            let entry = self.cache.entries[chosen - in_flight];
            let mut data = vec![0; entry.length];
            self.cache.copy_out(&entry, &mut data);
            (entry.offset, data)
        };
        let unit = granularity.unit_bytes();
        let mut units_persisted = Vec::with_capacity(data.len() / unit);
        for (index, bytes) in data.chunks_exact(unit).enumerate() {
            let persisted = self.rng.next() & 1 == 1;
            if persisted {
                let at = offset as usize + index * unit;
                self.durable[at..at + unit].copy_from_slice(bytes);
            }
            units_persisted.push(persisted);
        }
        Some(Tear {
            offset,
            length: data.len() as u64,
            in_flight: chosen < in_flight,
            granularity,
            units_persisted,
        })
    }

    fn submit(
        &mut self,
        kind: Kind,
        offset: u64,
        buffers: &[IoVec],
        tag: u64,
    ) -> Result<(), SubmitError> {
        let length = match kind {
            Kind::Flush => 0,
            Kind::Read | Kind::Write => check_request(offset, buffers, self.capacity_bytes())?,
        };
        let index = self.free.pop().ok_or(SubmitError::QueueFull)? as usize;
        let (low, high) = self.faults.latency_polls;
        let latency = if high > low {
            low as u64 + self.rng.below(u64::from(high - low) + 1)
        } else {
            low as u64
        };
        self.submits += 1;
        let slot = &mut self.slots[index];
        debug_assert!(!slot.busy);
        slot.busy = true;
        slot.lost = self.powered_off;
        slot.kind = kind;
        slot.tag = tag;
        slot.offset = offset;
        slot.length = length;
        slot.iovecs[..buffers.len()].copy_from_slice(buffers);
        slot.iovec_count = buffers.len();
        slot.submit_seq = self.submits;
        slot.due_poll = if self.powered_off {
            self.polls + 1
        } else {
            self.polls + 1 + latency
        };
        slot.flush_cut = self.writes_completed;
        Ok(())
    }

    /// Carries out a due request's effect; returns its result.
    fn execute(&mut self, index: usize) -> Result<(), IoError> {
        let slot = &self.slots[index];
        if slot.lost {
            return Err(IoError::PowerLoss);
        }
        let range = slot.offset as usize..(slot.offset + slot.length) as usize;
        match slot.kind {
            Kind::Read => {
                let first = slot.offset / BLOCK_SIZE_BYTES as u64;
                let end = first + slot.length / BLOCK_SIZE_BYTES as u64;
                if self.bad_blocks.iter().any(|b| (first..end).contains(b)) {
                    return Err(IoError::Io(MEDIUM_ERROR_ERRNO));
                }
                // SAFETY: the read is in flight until we report it, so its buffers are valid
                // for writes and unaliased (IoVec contract); lengths match (checked at submit).
                unsafe { scatter(&self.current[range], slot.iovecs()) };
            }
            Kind::Write => {
                let (offset, length) = (slot.offset, slot.length as usize);
                while self.cache.free_bytes() < length {
                    self.cache
                        .destage_oldest(&mut self.durable)
                        .expect("a write never exceeds the cache");
                }
                // SAFETY: the write is in flight until we report it, so its buffers are valid
                // for reads and unmodified (IoVec contract); lengths match (checked at submit).
                unsafe { gather(slot.iovecs(), &mut self.current[range.clone()]) };
                self.writes_completed += 1;
                self.cache
                    .push(self.writes_completed, offset, &self.current[range]);
                let first = offset / BLOCK_SIZE_BYTES as u64;
                let end = first + (length / BLOCK_SIZE_BYTES) as u64;
                self.bad_blocks.retain(|b| !(first..end).contains(b));
            }
            Kind::Flush if self.lying_flush => {}
            Kind::Flush => {
                let cut = slot.flush_cut;
                while self.cache.entries.front().is_some_and(|e| e.seq <= cut) {
                    self.cache.destage_oldest(&mut self.durable);
                }
            }
        }
        Ok(())
    }
}

/// Copies the buffers' bytes, in order, into `out`.
///
/// # Safety
/// Every buffer is valid for reads and not concurrently modified; their lengths sum to
/// `out.len()`.
unsafe fn gather(buffers: &[IoVec], out: &mut [u8]) {
    let mut at = 0;
    for buffer in buffers {
        // SAFETY: valid for reads per our contract; `out` is ours, so no overlap.
        let bytes = unsafe { core::slice::from_raw_parts(buffer.ptr, buffer.len) };
        out[at..at + buffer.len].copy_from_slice(bytes);
        at += buffer.len;
    }
    debug_assert_eq!(at, out.len());
}

/// Copies `data`, in order, into the buffers.
///
/// # Safety
/// Every buffer is valid for writes and not accessed by anyone else; their lengths sum to
/// `data.len()`.
unsafe fn scatter(data: &[u8], buffers: &[IoVec]) {
    let mut at = 0;
    for buffer in buffers {
        // SAFETY: valid for writes and unaliased per our contract; `data` is the device's
        // memory, which no caller buffer can overlap.
        let bytes = unsafe { core::slice::from_raw_parts_mut(buffer.ptr, buffer.len) };
        bytes.copy_from_slice(&data[at..at + buffer.len]);
        at += buffer.len;
    }
    debug_assert_eq!(at, data.len());
}

impl QueuePair for MemQueuePair {
    fn submit_read(&mut self, offset: u64, buffers: &[IoVec], tag: u64) -> Result<(), SubmitError> {
        self.submit(Kind::Read, offset, buffers, tag)
    }

    fn submit_write(
        &mut self,
        offset: u64,
        buffers: &[IoVec],
        tag: u64,
    ) -> Result<(), SubmitError> {
        self.submit(Kind::Write, offset, buffers, tag)
    }

    fn submit_flush(&mut self, tag: u64) -> Result<(), SubmitError> {
        self.submit(Kind::Flush, 0, &[], tag)
    }

    fn poll(
        &mut self,
        completions_max: usize,
        complete: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        self.polls += 1;
        self.due.clear();
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.busy && slot.due_poll <= self.polls {
                self.due.push(index as u32);
            }
        }
        let slots = &self.slots;
        self.due
            .sort_unstable_by_key(|&index| slots[index as usize].submit_seq);
        if self.faults.reorder {
            // Fisher-Yates, drawing from the seeded generator.
            for i in (1..self.due.len()).rev() {
                let j = self.rng.below(i as u64 + 1) as usize;
                self.due.swap(i, j);
            }
        }
        let count = completions_max.min(self.due.len());
        for i in 0..count {
            let index = self.due[i] as usize;
            let result = self.execute(index);
            let slot = &mut self.slots[index];
            slot.busy = false;
            slot.iovec_count = 0;
            let tag = slot.tag;
            self.free.push(index as u32);
            complete(tag, result);
        }
        count
    }

    fn capacity_bytes(&self) -> u64 {
        self.durable.len() as u64
    }

    fn depth(&self) -> u32 {
        self.depth
    }

    fn in_flight(&self) -> u32 {
        self.depth - self.free.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue_pair::AlignedBuf;

    const CAPACITY: u64 = 64 * 4096;

    fn filled(len: usize, byte: u8) -> AlignedBuf {
        let mut buf = AlignedBuf::new(len);
        buf.fill(byte);
        buf
    }

    /// Polls until nothing is in flight; returns (tag, result) in completion order.
    fn drain(qp: &mut MemQueuePair) -> Vec<(u64, Result<(), IoError>)> {
        let mut done = Vec::new();
        for _ in 0..1000 {
            if qp.in_flight() == 0 {
                return done;
            }
            qp.poll(usize::MAX, &mut |tag, result| done.push((tag, result)));
        }
        panic!("requests never completed");
    }

    fn write(qp: &mut MemQueuePair, offset: u64, buf: &mut AlignedBuf, tag: u64) {
        // SAFETY: every test drains the queue pair before touching or dropping `buf`.
        let vec = unsafe { buf.as_io_vec() };
        qp.submit_write(offset, &[vec], tag).unwrap();
    }

    fn read(qp: &mut MemQueuePair, offset: u64, len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::new(len);
        // SAFETY: drained below before `buf` is returned.
        let vec = unsafe { buf.as_io_vec() };
        qp.submit_read(offset, &[vec], 99).unwrap();
        assert_eq!(drain(qp), vec![(99, Ok(()))]);
        buf
    }

    #[test]
    fn write_then_read_sees_volatile_data_and_flush_makes_it_durable() {
        let mut qp = MemQueuePair::new(CAPACITY, 4, MemFaults::default());
        let mut data = filled(8192, 0xab);
        write(&mut qp, 4096, &mut data, 1);
        assert_eq!(qp.in_flight(), 1);
        assert_eq!(drain(&mut qp), vec![(1, Ok(()))]);
        assert!(read(&mut qp, 4096, 8192).iter().all(|&b| b == 0xab));
        assert!(qp.durable()[4096..12288].iter().all(|&b| b == 0));
        qp.submit_flush(2).unwrap();
        assert_eq!(drain(&mut qp), vec![(2, Ok(()))]);
        assert!(qp.durable()[4096..12288].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn flush_does_not_cover_writes_in_flight_at_its_submission() {
        let mut qp = MemQueuePair::new(CAPACITY, 4, MemFaults::default());
        let mut data = filled(4096, 7);
        write(&mut qp, 0, &mut data, 1);
        qp.submit_flush(2).unwrap();
        let done = drain(&mut qp);
        assert_eq!(done, vec![(1, Ok(())), (2, Ok(()))]);
        // The write completed before the flush, but after the flush was submitted.
        assert_eq!(qp.durable()[0], 0);
        qp.submit_flush(3).unwrap();
        drain(&mut qp);
        assert_eq!(qp.durable()[0], 7);
    }

    #[test]
    fn full_cache_destages_oldest_writes() {
        let faults = MemFaults {
            volatile_cache_bytes: 8192,
            ..MemFaults::default()
        };
        let mut qp = MemQueuePair::new(CAPACITY, 4, faults);
        let mut bufs = [filled(4096, 1), filled(4096, 2), filled(4096, 3)];
        for (i, buf) in bufs.iter_mut().enumerate() {
            write(&mut qp, i as u64 * 4096, buf, i as u64);
            drain(&mut qp);
        }
        assert_eq!(qp.durable()[0], 1, "oldest write destaged");
        assert_eq!(qp.durable()[4096], 0);
        assert_eq!(qp.durable()[8192], 0);
        assert_eq!(read(&mut qp, 8192, 4096)[0], 3);
    }

    #[test]
    fn cache_ring_wraps_around() {
        let faults = MemFaults {
            volatile_cache_bytes: 3 * 4096,
            ..MemFaults::default()
        };
        let mut qp = MemQueuePair::new(CAPACITY, 4, faults);
        for round in 0..5u8 {
            let mut buf = filled(8192, round + 1);
            write(&mut qp, u64::from(round) * 8192, &mut buf, 0);
            drain(&mut qp);
        }
        qp.submit_flush(1).unwrap();
        drain(&mut qp);
        for round in 0..5u8 {
            let at = round as usize * 8192;
            assert!(qp.durable()[at..at + 8192].iter().all(|&b| b == round + 1));
        }
    }

    #[test]
    fn read_error_sticks_until_rewritten() {
        let mut qp = MemQueuePair::new(CAPACITY, 4, MemFaults::default());
        qp.inject_read_error(4096 + 100);
        let mut buf = AlignedBuf::new(8192);
        // SAFETY: drained before `buf` is touched.
        let vec = unsafe { buf.as_io_vec() };
        qp.submit_read(0, &[vec], 5).unwrap();
        assert_eq!(drain(&mut qp), vec![(5, Err(IoError::Io(5)))]);
        let mut data = filled(4096, 9);
        write(&mut qp, 4096, &mut data, 6);
        drain(&mut qp);
        assert_eq!(read(&mut qp, 0, 8192)[4096], 9);
    }

    #[test]
    fn corrupt_flips_one_bit_unless_hidden_by_cache() {
        let mut qp = MemQueuePair::new(CAPACITY, 4, MemFaults::default());
        qp.corrupt(10, 3);
        assert_eq!(qp.durable()[10], 8);
        assert_eq!(read(&mut qp, 0, 4096)[10], 8);
        let mut data = filled(4096, 0);
        write(&mut qp, 0, &mut data, 1);
        drain(&mut qp);
        qp.corrupt(10, 0);
        assert_eq!(qp.durable()[10], 9);
        assert_eq!(
            read(&mut qp, 0, 4096)[10],
            0,
            "the cached write hides the rot"
        );
    }

    #[test]
    fn rng_is_deterministic_and_below_is_in_range() {
        let (mut a, mut b) = (Rng(42), Rng(42));
        for _ in 0..100 {
            assert_eq!(a.next(), b.next());
            assert!(a.below(7) < 7);
            b.below(7);
        }
        assert_ne!(Rng(1).next(), Rng(2).next());
    }
}
