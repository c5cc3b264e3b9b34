//! The object store interface: atomic multi-step operations on one object, in the style of Ceph's
//! MOSDOp, with completion that may be synchronous (`Submit::Done`) or reported later by `poll`
//! (`Submit::Pending`).
//!
//! Every store (the in-memory store now, the log-structured segment store on NVMe queue pairs
//! later) implements `ObjectStore`, and the OSD layer above speaks only to this trait. Stores are
//! per-core instances driven by a run-to-completion poll loop: nothing here is `Sync`, nothing
//! blocks, nothing locks.
//!
//! The interface knows no network and no wire format: sub-ops borrow their arguments, and outputs
//! go to a caller-owned `OutputBuffer` (perhaps a network buffer, but that is not our concern).

use core::marker::PhantomData;
use core::ptr::NonNull;

pub use crate::error::{StoreError, STATUS_OK};

/// Largest object size, in bytes: no byte may be written at or past this offset. A store may run
/// out of space (NoSpace) well before it.
pub const OBJECT_SIZE_MAX_BYTES: u64 = 1 << 40;

/// Longest object id, in bytes.
pub const OBJECT_ID_MAX_BYTES: usize = 1024;

/// Longest xattr name, in bytes.
pub const XATTR_NAME_MAX_BYTES: usize = 256;

/// Largest xattr value, in bytes.
pub const XATTR_VALUE_MAX_BYTES: usize = 64 * 1024;

/// Longest omap key, in bytes.
pub const OMAP_KEY_MAX_BYTES: usize = 1024;

/// Largest omap value, in bytes.
pub const OMAP_VALUE_MAX_BYTES: usize = 64 * 1024;

/// Most sub-ops in one operation, a count. Bounds the work of one atomic transaction, and lets
/// validation rescan earlier sub-ops without allocating.
pub const SUB_OPS_MAX: usize = 64;

/// Output of a Stat sub-op, in bytes: size u64 LE, then generation u64 LE.
pub const STAT_OUTPUT_SIZE_BYTES: usize = 16;

/// Largest output buffer, in bytes: `SubOpResult` reports offsets and lengths as u32.
pub const OUTPUT_BUFFER_SIZE_MAX_BYTES: usize = u32::MAX as usize;

/// One step of an atomic operation on a single object (Ceph MOSDOp style).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubOp<'a> {
    /// Writes `data` at `offset`. Creates the object if missing. Extends the size to
    /// `offset + data.len()` if that is past it, zero-filling any hole. Writing no bytes creates
    /// the object but does not change its size (as POSIX `pwrite`).
    Write { offset: u64, data: &'a [u8] },
    /// Replaces all data: the size becomes `data.len()`. Creates the object if missing. Xattrs
    /// and omap are kept.
    WriteFull { data: &'a [u8] },
    /// Output: the bytes of `offset..offset + length`, short past the end of the object (empty
    /// if `offset` is at or past the end). Status NotFound if the object is missing.
    Read { offset: u64, length: u64 },
    /// Zeroes `offset..offset + length`, extending the size if the range ends past it.
    /// NotFound if the object is missing. A zero `length` changes nothing.
    Zero { offset: u64, length: u64 },
    /// Sets the size, dropping data past it or zero-filling up to it. Creates the object if
    /// missing.
    Truncate { size: u64 },
    /// Removes the object with its data, xattrs and omap. NotFound if missing.
    Remove,
    /// Output: `STAT_OUTPUT_SIZE_BYTES` bytes, see `ObjectStat::to_bytes`. Status NotFound if
    /// the object is missing.
    Stat,
    /// Sets xattr `name` to `value`. Creates the object if missing. An empty name is
    /// InvalidArgument.
    SetXattr { name: &'a [u8], value: &'a [u8] },
    /// Output: the value of xattr `name`. Status NoData if absent.
    GetXattr { name: &'a [u8] },
    /// Sets omap `key` to `value`. Creates the object if missing. Empty keys are allowed.
    OmapSet { key: &'a [u8], value: &'a [u8] },
    /// Output: the value of omap `key`. Status NoData if absent.
    OmapGet { key: &'a [u8] },
    /// Removes omap `key`; an absent key is fine. NotFound if the object is missing (as Ceph's
    /// omap-rm-keys): only sub-ops that store something create objects.
    OmapRemove { key: &'a [u8] },
}

impl SubOp<'_> {
    /// Whether this sub-op changes the store. The others (Read, Stat, GetXattr, OmapGet) are
    /// read-like: they never fail the operation, they report a per-sub-op status.
    pub fn is_mutation(&self) -> bool {
        match self {
            SubOp::Read { .. } | SubOp::Stat | SubOp::GetXattr { .. } | SubOp::OmapGet { .. } => {
                false
            }
            SubOp::Write { .. }
            | SubOp::WriteFull { .. }
            | SubOp::Zero { .. }
            | SubOp::Truncate { .. }
            | SubOp::Remove
            | SubOp::SetXattr { .. }
            | SubOp::OmapSet { .. }
            | SubOp::OmapRemove { .. } => true,
        }
    }

    /// Whether this sub-op creates the object when it is missing (otherwise a mutation of a
    /// missing object is NotFound).
    pub fn creates_object(&self) -> bool {
        matches!(
            self,
            SubOp::Write { .. }
                | SubOp::WriteFull { .. }
                | SubOp::Truncate { .. }
                | SubOp::SetXattr { .. }
                | SubOp::OmapSet { .. }
        )
    }

    /// The most output bytes this sub-op can produce, so callers can size `OutputBuffer`s;
    /// `None` for mutations, which produce none.
    pub fn output_len_max(&self) -> Option<u64> {
        match self {
            SubOp::Read { length, .. } => Some(*length),
            SubOp::Stat => Some(STAT_OUTPUT_SIZE_BYTES as u64),
            SubOp::GetXattr { .. } => Some(XATTR_VALUE_MAX_BYTES as u64),
            SubOp::OmapGet { .. } => Some(OMAP_VALUE_MAX_BYTES as u64),
            _ => {
                debug_assert!(self.is_mutation());
                None
            }
        }
    }

    /// Checks the limits that do not depend on the store's state: ranges within
    /// `OBJECT_SIZE_MAX_BYTES`, names, keys and values within theirs. Stores call this for each
    /// sub-op in order, so that the first failing sub-op decides the error.
    pub fn check_limits(&self) -> Result<(), StoreError> {
        match *self {
            SubOp::Write { offset, data } => check_range(offset, data.len() as u64),
            SubOp::WriteFull { data } => check_range(0, data.len() as u64),
            SubOp::Zero { offset, length } => check_range(offset, length),
            SubOp::Truncate { size } => check_range(0, size),
            // Reads past the end are short reads, not errors.
            SubOp::Read { .. } | SubOp::Remove | SubOp::Stat => Ok(()),
            SubOp::SetXattr { name, value } => {
                check_xattr_name(name)?;
                check_len(value, XATTR_VALUE_MAX_BYTES)
            }
            SubOp::GetXattr { name } => check_xattr_name(name),
            SubOp::OmapSet { key, value } => {
                check_len(key, OMAP_KEY_MAX_BYTES)?;
                check_len(value, OMAP_VALUE_MAX_BYTES)
            }
            SubOp::OmapGet { key } | SubOp::OmapRemove { key } => {
                check_len(key, OMAP_KEY_MAX_BYTES)
            }
        }
    }
}

fn check_range(offset: u64, length: u64) -> Result<(), StoreError> {
    match offset.checked_add(length) {
        Some(end) if end <= OBJECT_SIZE_MAX_BYTES => Ok(()),
        _ => Err(StoreError::TooLarge),
    }
}

fn check_len(bytes: &[u8], max: usize) -> Result<(), StoreError> {
    if bytes.len() <= max {
        Ok(())
    } else {
        Err(StoreError::TooLarge)
    }
}

fn check_xattr_name(name: &[u8]) -> Result<(), StoreError> {
    if name.is_empty() {
        return Err(StoreError::InvalidArgument);
    }
    check_len(name, XATTR_NAME_MAX_BYTES)
}

/// Checks the shape of an operation before any store state is looked at: the object id and the
/// number of sub-ops. Every store calls this first in `submit`.
pub fn check_operation(oid: &[u8], ops: &[SubOp<'_>]) -> Result<(), StoreError> {
    if oid.is_empty() {
        return Err(StoreError::InvalidArgument);
    }
    if oid.len() > OBJECT_ID_MAX_BYTES {
        return Err(StoreError::TooLarge);
    }
    // An empty operation is a malformed request: it has nothing to apply or report.
    if ops.is_empty() || ops.len() > SUB_OPS_MAX {
        return Err(StoreError::InvalidArgument);
    }
    Ok(())
}

/// The output of a Stat sub-op.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectStat {
    /// Logical size in bytes.
    pub size: u64,
    /// How many operations have modified the object since it was created; 1 after the creating
    /// operation. An operation counts once however many of its sub-ops mutate.
    pub generation: u64,
}

impl ObjectStat {
    /// The encoding of a Stat output: size u64 little-endian, then generation u64 little-endian.
    pub fn to_bytes(&self) -> [u8; STAT_OUTPUT_SIZE_BYTES] {
        let mut bytes = [0; STAT_OUTPUT_SIZE_BYTES];
        bytes[..8].copy_from_slice(&self.size.to_le_bytes());
        bytes[8..].copy_from_slice(&self.generation.to_le_bytes());
        bytes
    }

    /// Decodes a Stat output; `None` unless `bytes` is exactly `STAT_OUTPUT_SIZE_BYTES` long.
    pub fn from_bytes(bytes: &[u8]) -> Option<ObjectStat> {
        let bytes: &[u8; STAT_OUTPUT_SIZE_BYTES] = bytes.try_into().ok()?;
        let (size, generation) = bytes.split_at(8);
        Some(ObjectStat {
            size: u64::from_le_bytes(size.try_into().ok()?),
            generation: u64::from_le_bytes(generation.try_into().ok()?),
        })
    }
}

/// Result of one sub-op: where its output went in the caller's output buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubOpResult {
    /// `STATUS_OK` or a `StoreError::code`.
    pub status: u16,
    /// Offset of this sub-op's output in the output buffer.
    pub out_offset: u32,
    /// Length of this sub-op's output; 0 for mutations and failed reads.
    pub out_len: u32,
}

impl SubOpResult {
    /// The status as a `Result`. An unknown nonzero status is a bug in the store.
    pub fn result(&self) -> Result<(), StoreError> {
        if self.status == STATUS_OK {
            return Ok(());
        }
        match StoreError::from_code(self.status) {
            Some(error) => Err(error),
            None => panic!("invalid sub-op status {}", self.status),
        }
    }
}

/// The caller's output region, where read-like sub-ops put their output back to back.
///
/// It is raw (a pointer and a capacity, not a slice) because an asynchronous store fills it after
/// `submit` has returned, until it reports the op complete from `poll`. Two ways to make one:
///
/// - `from_raw` (unsafe): the caller promises the region stays valid and untouched until
///   completion. Such a buffer may be filled asynchronously.
/// - `from_slice` (safe): the region is borrowed only for the duration of `submit`
///   (`is_borrowed()` is true). A store must finish writing such a buffer before `submit`
///   returns; a store that cannot must reject the op with InvalidArgument instead of returning
///   `Submit::Pending`.
///
/// Stores only ever write the region (never read it), so it need not be initialized.
#[derive(Debug)]
pub struct OutputBuffer<'a> {
    ptr: NonNull<u8>,
    capacity: usize,
    borrowed: bool,
    _region: PhantomData<&'a mut [u8]>,
}

impl OutputBuffer<'static> {
    /// Wraps a raw output region.
    ///
    /// # Safety
    /// `ptr..ptr + capacity` is valid for writes and not accessed by anyone else until the store
    /// reports the op complete (immediately for `Submit::Done` or `Err`, otherwise from `poll`).
    /// `ptr` may be null only if `capacity` is 0.
    pub unsafe fn from_raw(ptr: *mut u8, capacity: usize) -> OutputBuffer<'static> {
        assert!(capacity <= OUTPUT_BUFFER_SIZE_MAX_BYTES);
        let ptr = if capacity == 0 {
            // Keep a non-null pointer so that zero-length copies stay well-defined.
            NonNull::dangling()
        } else {
            NonNull::new(ptr).expect("output buffer pointer is null")
        };
        OutputBuffer {
            ptr,
            capacity,
            borrowed: false,
            _region: PhantomData,
        }
    }

    /// A buffer with no room: for operations without read-like sub-ops.
    pub fn empty() -> OutputBuffer<'static> {
        OutputBuffer {
            ptr: NonNull::dangling(),
            capacity: 0,
            borrowed: false,
            _region: PhantomData,
        }
    }
}

impl<'a> OutputBuffer<'a> {
    /// Borrows `region` for the duration of one synchronous `submit` (see the type's docs).
    pub fn from_slice(region: &'a mut [u8]) -> OutputBuffer<'a> {
        assert!(region.len() <= OUTPUT_BUFFER_SIZE_MAX_BYTES);
        OutputBuffer {
            // A slice's pointer is never null (dangling for empty slices).
            ptr: NonNull::from(&mut *region).cast::<u8>(),
            capacity: region.len(),
            borrowed: true,
            _region: PhantomData,
        }
    }

    /// Size of the region in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the region is borrowed only for the duration of `submit` (made by `from_slice`),
    /// so that a store may not fill it asynchronously.
    pub fn is_borrowed(&self) -> bool {
        self.borrowed
    }

    /// Start of the region, for an asynchronous store that fills a `from_raw` buffer after
    /// `submit` returns (its own `unsafe` code then relies on the `from_raw` contract).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies `bytes` into the region at `offset`. Writing past the capacity is a bug in the
    /// store (it must check room first and report Range), hence a panic, not an error.
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) {
        let end = offset
            .checked_add(bytes.len())
            .expect("output offset overflow");
        assert!(
            end <= self.capacity,
            "output write past the buffer's capacity"
        );
        // SAFETY: `offset..end` lies within `ptr..ptr + capacity`, which is valid for writes and
        // exclusively ours: by the `from_raw` contract, or because `from_slice` holds the `&mut`
        // borrow for 'a. `bytes` cannot overlap the region because nobody else may access the
        // region while we hold it. Copying does not read the destination, so it may be
        // uninitialized.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(offset),
                bytes.len(),
            );
        }
    }
}

/// How `submit` completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// The op is complete (durable, for a persistent store); `out` and `results` are filled.
    Done,
    /// Completion for the op's tag will be reported by `poll`; `out` and `results` must stay
    /// untouched until then.
    Pending,
}

/// Counters of one store instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Objects that exist.
    pub objects: u64,
    /// Bytes accounted against capacity: logical object data plus xattr and omap keys and values.
    pub bytes_stored: u64,
    /// Capacity in the same bytes as `bytes_stored`.
    pub capacity_bytes: u64,
    /// Operations that committed at least one mutation.
    pub transactions: u64,
    /// Read-like sub-ops executed, whatever their status.
    pub reads: u64,
    /// Operations that failed as a whole (`submit` returned `Err`, or `poll` reported one).
    pub errors: u64,
    /// Bytes the store wrote to its device (journal records, cleaner copies, checkpoints);
    /// 0 for a store without a device.
    pub device_bytes_written: u64,
    /// Payload bytes of acknowledged client writes: with `device_bytes_written`, the write
    /// amplification.
    pub client_bytes_written: u64,
    /// Journal records written (each a device write and, for client records, a flush): with
    /// `transactions`, how many ops group commit puts in one record. 0 without a journal.
    pub records_written: u64,
}

/// An object store. One instance per core; callers never share one between threads.
pub trait ObjectStore {
    /// Applies `ops` to object `oid` as one atomic transaction: either every mutation is applied
    /// or none is.
    ///
    /// Mutations are validated before anything is applied (existence, sizes, limits, space); the
    /// first failing mutation fails the whole op with its error and nothing changes. Read-like
    /// sub-ops (Read, Stat, GetXattr, OmapGet) see the effects of the sub-ops before them in the
    /// same op and report their own status in `results[i]` without failing the op; on a missing
    /// object each gets NotFound. Output is written to `out` back to back; a read-like sub-op
    /// whose output does not fit gets status Range and writes nothing.
    ///
    /// `results.len() >= ops.len()` (a shorter slice is a caller bug: panic). On `Err`, `results`
    /// and `out` hold nothing meaningful.
    ///
    /// Returns `Ok(Submit::Done)` when complete, `Ok(Submit::Pending)` when completion for `tag`
    /// will be reported by `poll`, `Err(e)` when the op failed as a whole (nothing applied).
    ///
    /// The sub-ops (and the bytes they borrow) are borrowed for the duration of `submit` only:
    /// a store that completes later copies what it still needs. `out` may be filled later only
    /// if it was made by `OutputBuffer::from_raw`.
    fn submit(
        &mut self,
        tag: u64,
        oid: &[u8],
        ops: &[SubOp<'_>],
        out: &mut OutputBuffer<'_>,
        results: &mut [SubOpResult],
    ) -> Result<Submit, StoreError>;

    /// Reports at most `max` completions of Pending ops by calling `complete(tag, result)`,
    /// where `result` carries the op's per-sub-op results (the `results` slice given to
    /// `submit` is not written after `submit` returns Pending); never blocks. Returns how many
    /// were reported. A store with a device also takes at most `max` (at least one) device
    /// completions per call: a small `max` lets the caller's next submissions reach the device
    /// before the rest of a batch of completions is processed.
    fn poll(
        &mut self,
        max: usize,
        complete: &mut dyn FnMut(u64, Result<&[SubOpResult], StoreError>),
    ) -> usize;

    /// Whether ops are in progress inside the store (device I/O it must poll for): a core
    /// must not sleep in the kernel then, since device completions do not wake it.
    fn busy(&self) -> bool {
        false
    }

    /// What the store is doing, in one line, for a log message about a stall.
    fn debug_state(&self) -> String {
        String::new()
    }

    /// Asks the store to signal eventfd `fd` when device completions arrive, so its owner may
    /// sleep while the store is `busy`. False when it cannot: the owner must keep polling.
    fn wake_on_completion(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<bool> {
        let _ = fd;
        Ok(false)
    }

    /// Serves a read of whole `READ_IN_PLACE_BLOCK_BYTES` blocks of `oid` (`offset` and
    /// `length` multiples of it, `length > 0`, within the object's size) from the store's own
    /// memory: where the bytes are and their crc32c, which the store keeps, so the caller can
    /// send them without copying or hashing them. None when the store cannot (the default; a
    /// missing object, a range it does not cover, an invalid read): the caller then submits
    /// the read as usual, which also reports any error.
    ///
    /// The bytes stay where they are and unchanged until the next `submit` of an op with a
    /// mutation (or until the store is dropped): the caller must be done with them, or have
    /// copied them, before it submits one. Counts as a read in `stats`.
    fn read_in_place(&mut self, oid: &[u8], offset: u64, length: u64) -> Option<InPlaceRead> {
        let _ = (oid, offset, length);
        None
    }

    /// Current counters.
    fn stats(&self) -> StoreStats;
}

/// Granularity of `ObjectStore::read_in_place`: the block a kept crc covers.
pub const READ_IN_PLACE_BLOCK_BYTES: u64 = 4096;

/// Bytes served in place by `ObjectStore::read_in_place`: `len` bytes at `ptr`, valid and
/// unchanged until the store's next mutating submit, and their crc32c.
#[derive(Clone, Copy, Debug)]
pub struct InPlaceRead {
    pub ptr: *const u8,
    pub len: usize,
    pub crc: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutation_classification() {
        let reads = [
            SubOp::Read {
                offset: 0,
                length: 10,
            },
            SubOp::Stat,
            SubOp::GetXattr { name: b"a" },
            SubOp::OmapGet { key: b"k" },
        ];
        for op in reads {
            assert!(!op.is_mutation());
            assert!(!op.creates_object());
            assert!(op.output_len_max().is_some());
        }
        let creating = [
            SubOp::Write {
                offset: 0,
                data: b"x",
            },
            SubOp::WriteFull { data: b"x" },
            SubOp::Truncate { size: 3 },
            SubOp::SetXattr {
                name: b"a",
                value: b"v",
            },
            SubOp::OmapSet {
                key: b"k",
                value: b"v",
            },
        ];
        for op in creating {
            assert!(op.is_mutation());
            assert!(op.creates_object());
            assert_eq!(op.output_len_max(), None);
        }
        for op in [
            SubOp::Zero {
                offset: 0,
                length: 1,
            },
            SubOp::Remove,
            SubOp::OmapRemove { key: b"k" },
        ] {
            assert!(op.is_mutation());
            assert!(!op.creates_object());
        }
    }

    #[test]
    fn output_len_max_values() {
        assert_eq!(
            SubOp::Read {
                offset: 5,
                length: 77
            }
            .output_len_max(),
            Some(77)
        );
        assert_eq!(SubOp::Stat.output_len_max(), Some(16));
        assert_eq!(SubOp::GetXattr { name: b"n" }.output_len_max(), Some(65536));
        assert_eq!(SubOp::OmapGet { key: b"k" }.output_len_max(), Some(65536));
    }

    #[test]
    fn limits_at_and_past_the_edge() {
        let max = OBJECT_SIZE_MAX_BYTES;
        assert_eq!(
            SubOp::Write {
                offset: max - 1,
                data: b"x"
            }
            .check_limits(),
            Ok(())
        );
        assert_eq!(
            SubOp::Write {
                offset: max,
                data: b"x"
            }
            .check_limits(),
            Err(StoreError::TooLarge)
        );
        assert_eq!(
            SubOp::Write {
                offset: u64::MAX,
                data: b"x"
            }
            .check_limits(),
            Err(StoreError::TooLarge)
        );
        assert_eq!(
            SubOp::Zero {
                offset: 1,
                length: u64::MAX
            }
            .check_limits(),
            Err(StoreError::TooLarge)
        );
        assert_eq!(SubOp::Truncate { size: max }.check_limits(), Ok(()));
        assert_eq!(
            SubOp::Truncate { size: max + 1 }.check_limits(),
            Err(StoreError::TooLarge)
        );
        assert_eq!(
            SubOp::Read {
                offset: u64::MAX,
                length: u64::MAX
            }
            .check_limits(),
            Ok(())
        );

        let name_ok = [b'n'; XATTR_NAME_MAX_BYTES];
        let name_long = [b'n'; XATTR_NAME_MAX_BYTES + 1];
        let value_long = vec![0; XATTR_VALUE_MAX_BYTES + 1];
        assert_eq!(
            SubOp::SetXattr {
                name: &name_ok,
                value: b""
            }
            .check_limits(),
            Ok(())
        );
        assert_eq!(
            SubOp::SetXattr {
                name: &name_long,
                value: b""
            }
            .check_limits(),
            Err(StoreError::TooLarge)
        );
        assert_eq!(
            SubOp::SetXattr {
                name: b"n",
                value: &value_long
            }
            .check_limits(),
            Err(StoreError::TooLarge)
        );
        assert_eq!(
            SubOp::SetXattr {
                name: b"",
                value: b"v"
            }
            .check_limits(),
            Err(StoreError::InvalidArgument)
        );
        assert_eq!(
            SubOp::GetXattr { name: &name_long }.check_limits(),
            Err(StoreError::TooLarge)
        );

        let key_long = [b'k'; OMAP_KEY_MAX_BYTES + 1];
        assert_eq!(
            SubOp::OmapSet {
                key: b"",
                value: b"v"
            }
            .check_limits(),
            Ok(())
        );
        assert_eq!(
            SubOp::OmapSet {
                key: &key_long,
                value: b""
            }
            .check_limits(),
            Err(StoreError::TooLarge)
        );
        assert_eq!(
            SubOp::OmapRemove { key: &key_long }.check_limits(),
            Err(StoreError::TooLarge)
        );
        let omap_value_long = vec![0; OMAP_VALUE_MAX_BYTES + 1];
        assert_eq!(
            SubOp::OmapSet {
                key: b"k",
                value: &omap_value_long
            }
            .check_limits(),
            Err(StoreError::TooLarge)
        );
    }

    #[test]
    fn operation_shape() {
        let one = [SubOp::Stat];
        assert_eq!(check_operation(b"", &one), Err(StoreError::InvalidArgument));
        assert_eq!(check_operation(&[b'o'; OBJECT_ID_MAX_BYTES], &one), Ok(()));
        assert_eq!(
            check_operation(&[b'o'; OBJECT_ID_MAX_BYTES + 1], &one),
            Err(StoreError::TooLarge)
        );
        assert_eq!(check_operation(b"o", &[]), Err(StoreError::InvalidArgument));
        assert_eq!(check_operation(b"o", &[SubOp::Stat; SUB_OPS_MAX]), Ok(()));
        assert_eq!(
            check_operation(b"o", &[SubOp::Stat; SUB_OPS_MAX + 1]),
            Err(StoreError::InvalidArgument)
        );
    }

    #[test]
    fn stat_encoding_is_little_endian() {
        let stat = ObjectStat {
            size: 0x0102,
            generation: 7,
        };
        let bytes = stat.to_bytes();
        assert_eq!(bytes, [2, 1, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ObjectStat::from_bytes(&bytes), Some(stat));
        assert_eq!(ObjectStat::from_bytes(&bytes[..15]), None);
    }

    #[test]
    fn sub_op_result_status() {
        assert_eq!(SubOpResult::default().result(), Ok(()));
        let result = SubOpResult {
            status: StoreError::NoData.code(),
            out_offset: 0,
            out_len: 0,
        };
        assert_eq!(result.result(), Err(StoreError::NoData));
    }

    #[test]
    fn output_buffer_writes_within_capacity() {
        let mut region = [0u8; 8];
        let mut out = OutputBuffer::from_slice(&mut region);
        assert!(out.is_borrowed());
        assert_eq!(out.capacity(), 8);
        out.write_at(2, b"abc");
        out.write_at(8, b"");
        assert_eq!(region, *b"\0\0abc\0\0\0");

        let mut raw = vec![0xffu8; 4];
        // SAFETY: `raw` outlives `out` and is not touched while `out` is used.
        let mut out = unsafe { OutputBuffer::from_raw(raw.as_mut_ptr(), raw.len()) };
        assert!(!out.is_borrowed());
        out.write_at(0, b"wxyz");
        assert_eq!(raw, b"wxyz");

        // SAFETY: capacity 0: nothing is ever written.
        let out = unsafe { OutputBuffer::from_raw(core::ptr::null_mut(), 0) };
        assert_eq!(out.capacity(), 0);
        assert_eq!(OutputBuffer::empty().capacity(), 0);
    }

    #[test]
    #[should_panic(expected = "past the buffer's capacity")]
    fn output_buffer_write_past_capacity_panics() {
        let mut region = [0u8; 4];
        let mut out = OutputBuffer::from_slice(&mut region);
        out.write_at(2, b"abc");
    }
}
