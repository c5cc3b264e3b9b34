//! In-memory object store, in CyanStore's role: the reference implementation of `ObjectStore`,
//! for tests and for running the OSD without devices.
//!
//! One instance per core: no locks, no `unsafe`, every op completes inside `submit`.
//!
//! Atomicity comes from two passes. The validation pass simulates the op (does the object exist,
//! its size, the bytes it and the store account for) through the sub-op sequence without touching
//! the store, and returns the first error. The apply pass then cannot fail: it mutates in place and
//! serves read-like sub-ops, which so see the sub-ops before them.
//!
//! Reads of whole 4 KiB blocks can be served in place (`read_in_place`): the store keeps each
//! block's crc32c from the first such read after the block last changed, so a reply can carry
//! the bytes straight from the object's memory with their kept crc, and the client's check of
//! the reply crc covers the bytes as they were hashed here. Any mutation of an object forgets
//! the crcs of the blocks it touches.
//!
//! Steady state allocates nothing: overwriting or reading bytes within an object's size works in
//! place, reads copy straight from object data into the caller's buffer, and lookups by `&[u8]`
//! borrow rather than build keys. Allocation happens only when something grows (a new object,
//! key, or larger size) or shrinks a lot.

use std::cmp::{max, min};
use std::collections::{BTreeMap, HashMap};

use crate::object_store::{
    check_operation, InPlaceRead, ObjectStat, ObjectStore, OutputBuffer, StoreError, StoreStats,
    SubOp, SubOpResult, Submit, READ_IN_PLACE_BLOCK_BYTES, STATUS_OK,
};

mod oid_hash;
use oid_hash::OidHashSeed;

/// Bytes of data one kept crc covers.
const CRC_BLOCK_BYTES: usize = READ_IN_PLACE_BLOCK_BYTES as usize;

/// Slack, in bytes, that a shrinking object may keep allocated before its buffer is shrunk to
/// fit. Shrinking reallocates, so small slack is kept: repeated WriteFulls of similar sizes stay
/// allocation-free, while a big object truncated to little returns its memory.
const DATA_SLACK_MAX_BYTES: usize = 64 * 1024;

type MetaMap = BTreeMap<Box<[u8]>, Box<[u8]>>;

/// One stored object. While an op has logically removed it, it stays in the map empty (see
/// `Apply::exists`) so that a later sub-op can recreate it in place.
#[derive(Debug, Default)]
struct Object {
    data: Vec<u8>,
    /// crc32c of each `CRC_BLOCK_BYTES` block of `data` (the last one may be partial), kept
    /// from its first in-place read until the block changes; None when not known. As many
    /// entries as `data` has blocks: it grows with `data` (store capacity), never per read.
    block_crcs: Vec<Option<u32>>,
    xattrs: MetaMap,
    omap: MetaMap,
    /// Key plus value bytes of `xattrs` and `omap`, kept so accounting never walks the maps.
    meta_bytes: u64,
    generation: u64,
}

impl Object {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Bytes this object accounts against the store's capacity.
    fn bytes_accounted(&self) -> u64 {
        self.size() + self.meta_bytes
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
            && self.xattrs.is_empty()
            && self.omap.is_empty()
            && self.generation == 0
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return; // As pwrite: writing nothing does not extend.
        }
        let start = to_usize(offset);
        let end = start + bytes.len();
        let old_len = self.data.len();
        if end > self.data.len() {
            // Zero-fills any hole between the old size and `start`.
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(bytes);
        self.changed(min(start, old_len), end);
    }

    fn write_full(&mut self, bytes: &[u8]) {
        self.data.clear();
        self.data.extend_from_slice(bytes);
        self.release_slack();
        self.changed(0, self.data.len());
    }

    /// Forgets the kept crcs of the blocks overlapping `start..end` (bytes that changed, or
    /// appeared or went away there), and keeps one entry per block of `data`.
    fn changed(&mut self, start: usize, end: usize) {
        let blocks = self.data.len().div_ceil(CRC_BLOCK_BYTES);
        self.block_crcs.truncate(blocks);
        self.block_crcs.resize(blocks, None);
        let first = start / CRC_BLOCK_BYTES;
        let stop = min(end.div_ceil(CRC_BLOCK_BYTES), blocks);
        if first < stop {
            self.block_crcs[first..stop].fill(None);
        }
    }

    /// The crc32c of `count` whole blocks from block `first` (all within `data`), hashing
    /// only the blocks whose crc is not kept, and keeping theirs.
    fn blocks_crc(&mut self, first: usize, count: usize) -> u32 {
        debug_assert!(count > 0 && (first + count) * CRC_BLOCK_BYTES <= self.data.len());
        let mut crc = 0;
        for block in first..first + count {
            let bytes = &self.data[block * CRC_BLOCK_BYTES..(block + 1) * CRC_BLOCK_BYTES];
            let block_crc =
                *self.block_crcs[block].get_or_insert_with(|| carmine_crc::crc32c(bytes));
            // A kept crc that disagrees with the bytes would be caught by the client; tests
            // catch it here first, where the stale entry is.
            debug_assert_eq!(
                block_crc,
                carmine_crc::crc32c(bytes),
                "stale crc of block {block}"
            );
            crc = if block == first {
                block_crc
            } else {
                carmine_crc::crc32c_combine(crc, block_crc, READ_IN_PLACE_BLOCK_BYTES)
            };
        }
        crc
    }

    fn zero(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let start = to_usize(offset);
        let end = to_usize(offset + length);
        let stop = min(end, self.data.len());
        if start < stop {
            self.data[start..stop].fill(0);
        }
        let old_len = self.data.len();
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.changed(min(start, old_len), end);
    }

    fn truncate(&mut self, size: u64) {
        let size = to_usize(size);
        let old_len = self.data.len();
        if size < self.data.len() {
            self.data.truncate(size);
            self.release_slack();
        } else {
            self.data.resize(size, 0);
        }
        self.changed(min(size, old_len), max(size, old_len));
    }

    fn release_slack(&mut self) {
        let slack = self.data.capacity() - self.data.len();
        if slack > DATA_SLACK_MAX_BYTES && slack > self.data.len() {
            self.data.shrink_to_fit();
        }
    }

    fn stat(&self) -> ObjectStat {
        ObjectStat {
            size: self.size(),
            generation: self.generation,
        }
    }
}

/// Sets `key` to `value` in `map`, overwriting an equal-length value in place.
fn meta_set(map: &mut MetaMap, meta_bytes: &mut u64, key: &[u8], value: &[u8]) {
    match map.get_mut(key) {
        Some(old) => {
            *meta_bytes = *meta_bytes - old.len() as u64 + value.len() as u64;
            if old.len() == value.len() {
                old.copy_from_slice(value);
            } else {
                *old = value.into();
            }
        }
        None => {
            map.insert(key.into(), value.into());
            *meta_bytes += (key.len() + value.len()) as u64;
        }
    }
}

fn meta_remove(map: &mut MetaMap, meta_bytes: &mut u64, key: &[u8]) {
    if let Some(old) = map.remove(key) {
        *meta_bytes -= (key.len() + old.len()) as u64;
    }
}

/// Sizes in memory fit `usize`: validation bounded them by the capacity of a store that exists.
fn to_usize(value: u64) -> usize {
    usize::try_from(value).expect("object size does not fit in memory")
}

/// The in-memory object store.
pub struct MemoryStore {
    /// Keyed by object id under a fast keyed hash of our own (`oid_hash`: why not SipHash,
    /// and why keyed).
    objects: HashMap<Box<[u8]>, Object, OidHashSeed>,
    capacity_bytes: u64,
    /// Sum of `Object::bytes_accounted` over `objects`; never past `capacity_bytes`.
    bytes_used: u64,
    transactions: u64,
    reads: u64,
    errors: u64,
}

impl MemoryStore {
    /// An empty store that accounts at most `capacity_bytes` (object data plus xattr and omap
    /// keys and values).
    pub fn new(capacity_bytes: u64) -> MemoryStore {
        MemoryStore {
            objects: HashMap::with_hasher(OidHashSeed::random()),
            capacity_bytes,
            bytes_used: 0,
            transactions: 0,
            reads: 0,
            errors: 0,
        }
    }

    /// Checks every accounting invariant by walking the whole store: O(data), for tests.
    pub fn verify(&self) {
        let mut bytes_used = 0;
        for (oid, object) in &self.objects {
            assert!(!oid.is_empty());
            assert!(object.generation >= 1, "a stored object was never modified");
            let meta_bytes: usize = object
                .xattrs
                .iter()
                .chain(object.omap.iter())
                .map(|(key, value)| key.len() + value.len())
                .sum();
            assert_eq!(object.meta_bytes, meta_bytes as u64);
            bytes_used += object.bytes_accounted();
        }
        assert_eq!(self.bytes_used, bytes_used);
        assert!(self.bytes_used <= self.capacity_bytes);
    }

    /// Runs a well-formed op: validate, then apply.
    fn execute(
        &mut self,
        oid: &[u8],
        ops: &[SubOp<'_>],
        out: &mut OutputBuffer<'_>,
        results: &mut [SubOpResult],
    ) -> Result<(), StoreError> {
        let found = self.objects.get_mut(oid);
        let bytes_after = validate(found.as_deref(), ops, self.bytes_used, self.capacity_bytes)?;
        let mutates = ops.iter().any(SubOp::is_mutation);
        let (object, existed) = match found {
            Some(object) => (object, true),
            None if !mutates => {
                // Nothing to create: every sub-op is read-like and reports NotFound. Taking this
                // path keeps reads of missing objects from allocating a key.
                let mut apply = Apply {
                    exists: false,
                    bumped: false,
                    out_pos: 0,
                };
                for (op, result) in ops.iter().zip(results.iter_mut()) {
                    *result = apply.read(None, op, out);
                }
                self.reads += ops.len() as u64;
                return Ok(());
            }
            None => (self.objects.entry(oid.into()).or_default(), false),
        };
        let bytes_before = object.bytes_accounted();
        let mut apply = Apply {
            exists: existed,
            bumped: false,
            out_pos: 0,
        };
        for (op, result) in ops.iter().zip(results.iter_mut()) {
            *result = apply.sub_op(object, op, out);
        }
        let bytes_now = object.bytes_accounted();
        if !apply.exists {
            debug_assert!(object.is_empty());
            self.objects.remove(oid);
        }
        self.bytes_used = self.bytes_used - bytes_before + bytes_now;
        // Validation and apply must agree, or capacity accounting drifts: a corruption.
        assert_eq!(
            self.bytes_used, bytes_after,
            "validation mispredicted the bytes used"
        );
        assert!(self.bytes_used <= self.capacity_bytes);
        self.reads += ops.iter().filter(|op| !op.is_mutation()).count() as u64;
        self.transactions += u64::from(mutates);
        Ok(())
    }
}

impl ObjectStore for MemoryStore {
    fn submit(
        &mut self,
        _tag: u64,
        oid: &[u8],
        ops: &[SubOp<'_>],
        out: &mut OutputBuffer<'_>,
        results: &mut [SubOpResult],
    ) -> Result<Submit, StoreError> {
        assert!(results.len() >= ops.len(), "fewer results than sub-ops");
        let outcome = check_operation(oid, ops).and_then(|()| self.execute(oid, ops, out, results));
        match outcome {
            Ok(()) => Ok(Submit::Done),
            Err(error) => {
                self.errors += 1;
                Err(error)
            }
        }
    }

    fn poll(
        &mut self,
        _max: usize,
        _complete: &mut dyn FnMut(u64, Result<&[SubOpResult], StoreError>),
    ) -> usize {
        0 // Every op completes inside `submit`.
    }

    fn read_in_place(&mut self, oid: &[u8], offset: u64, length: u64) -> Option<InPlaceRead> {
        let block = READ_IN_PLACE_BLOCK_BYTES;
        if length == 0 || !offset.is_multiple_of(block) || !length.is_multiple_of(block) {
            return None;
        }
        let read = [SubOp::Read { offset, length }];
        check_operation(oid, &read).ok()?;
        let object = self.objects.get_mut(oid)?;
        if offset.checked_add(length)? > object.size() {
            return None; // A short read: the usual path answers it.
        }
        let (start, len) = (to_usize(offset), to_usize(length));
        let crc = object.blocks_crc(start / CRC_BLOCK_BYTES, len / CRC_BLOCK_BYTES);
        self.reads += 1;
        Some(InPlaceRead {
            ptr: object.data[start..start + len].as_ptr(),
            len,
            crc,
        })
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            objects: self.objects.len() as u64,
            bytes_stored: self.bytes_used,
            capacity_bytes: self.capacity_bytes,
            transactions: self.transactions,
            reads: self.reads,
            errors: self.errors,
            ..StoreStats::default()
        }
    }
}

/// The object as the validation pass believes it to be after the sub-ops simulated so far.
struct Simulation {
    exists: bool,
    size: u64,
    /// Bytes the object accounts (data plus xattr and omap bytes).
    object_bytes: u64,
    /// Bytes the whole store accounts.
    store_bytes: u64,
}

impl Simulation {
    fn set_size(&mut self, size: u64) {
        self.object_bytes = self.object_bytes - self.size + size;
        self.store_bytes = self.store_bytes - self.size + size;
        self.size = size;
    }

    /// Replaces a metadata entry of `key_len` bytes whose value was `old` bytes by one of `new`.
    fn replace_meta(&mut self, key_len: usize, old: Option<usize>, new: Option<usize>) {
        let old = old.map_or(0, |value_len| (key_len + value_len) as u64);
        let new = new.map_or(0, |value_len| (key_len + value_len) as u64);
        self.object_bytes = self.object_bytes - old + new;
        self.store_bytes = self.store_bytes - old + new;
    }
}

/// Validates `ops` against the object as found (`None` if missing) without changing anything.
/// Returns the bytes the store will account after the op, or the first failing mutation's error.
/// Capacity is checked after every sub-op, so an op may not even pass through a state past it.
fn validate(
    found: Option<&Object>,
    ops: &[SubOp<'_>],
    store_bytes: u64,
    capacity_bytes: u64,
) -> Result<u64, StoreError> {
    let mut sim = Simulation {
        exists: found.is_some(),
        size: found.map_or(0, Object::size),
        object_bytes: found.map_or(0, Object::bytes_accounted),
        store_bytes,
    };
    for (index, op) in ops.iter().enumerate() {
        if !op.is_mutation() {
            continue; // Read-like sub-ops never fail the op.
        }
        op.check_limits()?;
        simulate_mutation(&mut sim, found, &ops[..index], op)?;
        if sim.store_bytes > capacity_bytes {
            return Err(StoreError::NoSpace);
        }
    }
    Ok(sim.store_bytes)
}

fn simulate_mutation(
    sim: &mut Simulation,
    found: Option<&Object>,
    before: &[SubOp<'_>],
    op: &SubOp<'_>,
) -> Result<(), StoreError> {
    if !sim.exists {
        if !op.creates_object() {
            return Err(StoreError::NotFound);
        }
        debug_assert!(sim.size == 0 && sim.object_bytes == 0);
        sim.exists = true;
    }
    match *op {
        SubOp::Write { offset, data } if !data.is_empty() => {
            sim.set_size(max(sim.size, offset + data.len() as u64));
        }
        SubOp::Write { .. } => {}
        SubOp::WriteFull { data } => sim.set_size(data.len() as u64),
        SubOp::Zero { offset, length } if length > 0 => {
            sim.set_size(max(sim.size, offset + length));
        }
        SubOp::Zero { .. } => {}
        SubOp::Truncate { size } => sim.set_size(size),
        SubOp::Remove => {
            sim.store_bytes -= sim.object_bytes;
            *sim = Simulation {
                exists: false,
                size: 0,
                object_bytes: 0,
                store_bytes: sim.store_bytes,
            };
        }
        SubOp::SetXattr { name, value } => {
            let old = meta_value_len(found, before, Meta::Xattr, name);
            sim.replace_meta(name.len(), old, Some(value.len()));
        }
        SubOp::OmapSet { key, value } => {
            let old = meta_value_len(found, before, Meta::Omap, key);
            sim.replace_meta(key.len(), old, Some(value.len()));
        }
        SubOp::OmapRemove { key } => {
            let old = meta_value_len(found, before, Meta::Omap, key);
            sim.replace_meta(key.len(), old, None);
        }
        SubOp::Read { .. } | SubOp::Stat | SubOp::GetXattr { .. } | SubOp::OmapGet { .. } => {
            unreachable!("read-like sub-ops are not simulated")
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Meta {
    Xattr,
    Omap,
}

/// Length of the value of metadata `key` as the sub-ops `before` leave it: the last of them to
/// set or remove it decides, else the object as found. Rescanning (at most `SUB_OPS_MAX` sub-ops)
/// avoids allocating a map of pending changes.
fn meta_value_len(
    found: Option<&Object>,
    before: &[SubOp<'_>],
    meta: Meta,
    key: &[u8],
) -> Option<usize> {
    for op in before.iter().rev() {
        match (*op, meta) {
            (SubOp::SetXattr { name, value }, Meta::Xattr) if name == key => {
                return Some(value.len())
            }
            (SubOp::OmapSet { key: k, value }, Meta::Omap) if k == key => return Some(value.len()),
            (SubOp::OmapRemove { key: k }, Meta::Omap) if k == key => return None,
            // Remove drops all metadata; a recreated object starts with none.
            (SubOp::Remove, _) => return None,
            _ => {}
        }
    }
    let object = found?;
    let map = match meta {
        Meta::Xattr => &object.xattrs,
        Meta::Omap => &object.omap,
    };
    map.get(key).map(|value| value.len())
}

/// The apply pass's state through one op. It cannot fail: validation already passed.
struct Apply {
    /// Whether the object logically exists; when not, the map entry is empty.
    exists: bool,
    /// Whether this op already counted in the object's generation.
    bumped: bool,
    /// Where the next output goes.
    out_pos: usize,
}

impl Apply {
    fn sub_op(
        &mut self,
        object: &mut Object,
        op: &SubOp<'_>,
        out: &mut OutputBuffer<'_>,
    ) -> SubOpResult {
        if op.is_mutation() {
            self.mutate(object, op);
            SubOpResult {
                status: STATUS_OK,
                out_offset: self.out_offset(),
                out_len: 0,
            }
        } else {
            let found = if self.exists { Some(&*object) } else { None };
            self.read(found, op, out)
        }
    }

    fn mutate(&mut self, object: &mut Object, op: &SubOp<'_>) {
        if !self.exists {
            assert!(
                op.creates_object(),
                "validation passed a mutation of a missing object"
            );
            debug_assert!(object.is_empty());
            self.exists = true;
            self.bumped = false;
        }
        match *op {
            SubOp::Write { offset, data } => object.write(offset, data),
            SubOp::WriteFull { data } => object.write_full(data),
            SubOp::Zero { offset, length } => object.zero(offset, length),
            SubOp::Truncate { size } => object.truncate(size),
            SubOp::Remove => {
                // Dropping the old object frees its memory now; the entry leaves the map at the
                // end of the op unless a later sub-op recreates it.
                *object = Object::default();
                self.exists = false;
                return;
            }
            SubOp::SetXattr { name, value } => {
                meta_set(&mut object.xattrs, &mut object.meta_bytes, name, value);
            }
            SubOp::OmapSet { key, value } => {
                meta_set(&mut object.omap, &mut object.meta_bytes, key, value);
            }
            SubOp::OmapRemove { key } => meta_remove(&mut object.omap, &mut object.meta_bytes, key),
            SubOp::Read { .. } | SubOp::Stat | SubOp::GetXattr { .. } | SubOp::OmapGet { .. } => {
                unreachable!("not a mutation")
            }
        }
        // The generation counts operations, not sub-ops.
        if !self.bumped {
            object.generation += 1;
            self.bumped = true;
        }
    }

    /// Serves a read-like sub-op from the object (`None` if it does not exist).
    fn read(
        &mut self,
        found: Option<&Object>,
        op: &SubOp<'_>,
        out: &mut OutputBuffer<'_>,
    ) -> SubOpResult {
        let out_offset = self.out_offset();
        let output = op.check_limits().and_then(|()| {
            let object = found.ok_or(StoreError::NotFound)?;
            match *op {
                SubOp::Read { offset, length } => {
                    let size = object.size();
                    let start = to_usize(min(offset, size));
                    let end = to_usize(min(offset.saturating_add(length), size));
                    self.output(out, &object.data[start..end])
                }
                SubOp::Stat => self.output(out, &object.stat().to_bytes()),
                SubOp::GetXattr { name } => {
                    let value = object.xattrs.get(name).ok_or(StoreError::NoData)?;
                    self.output(out, value)
                }
                SubOp::OmapGet { key } => {
                    let value = object.omap.get(key).ok_or(StoreError::NoData)?;
                    self.output(out, value)
                }
                _ => unreachable!("not read-like"),
            }
        });
        match output {
            Ok(out_len) => SubOpResult {
                status: STATUS_OK,
                out_offset,
                out_len,
            },
            Err(error) => SubOpResult {
                status: error.code(),
                out_offset,
                out_len: 0,
            },
        }
    }

    /// Appends `bytes` to the output, or Range if they do not fit (then nothing is written).
    fn output(&mut self, out: &mut OutputBuffer<'_>, bytes: &[u8]) -> Result<u32, StoreError> {
        debug_assert!(self.out_pos <= out.capacity());
        if bytes.len() > out.capacity() - self.out_pos {
            return Err(StoreError::Range);
        }
        out.write_at(self.out_pos, bytes);
        self.out_pos += bytes.len();
        // The output buffer's capacity is at most u32::MAX, so lengths fit.
        Ok(bytes.len() as u32)
    }

    fn out_offset(&self) -> u32 {
        u32::try_from(self.out_pos).expect("output offset past u32")
    }
}

#[cfg(test)]
mod tests;
