//! The block `QueuePair`: one submission and one completion queue on a block device, owned by
//! one reactor, in the shape of an NVMe (SPDK, VFIO) I/O queue pair.
//!
//! Submission (`submit_read`, `submit_write`, `submit_flush`) only queues a request; `poll`
//! reports completions by tag. Neither ever blocks, and neither allocates: every backend sizes
//! its request slots by `depth` at construction. A full queue is back-pressure
//! (`SubmitError::QueueFull`): the caller polls and retries.
//!
//! Addresses and lengths are in bytes and must be multiples of `BLOCK_SIZE_BYTES`; buffers must
//! be aligned to it (what O_DIRECT and NVMe PRPs need). Bad input is rejected at submit with a
//! `SubmitError` value, never a panic. A request may gather (write) or scatter (read) up to
//! `IOVECS_PER_REQUEST_MAX` buffers that together cover one contiguous device range.
//!
//! Semantics every backend honours:
//! - A read returns the bytes of writes that completed before it was submitted. A write in
//!   flight concurrently with a read of the same range leaves the read's content undefined, as
//!   do two concurrent writes to one range; callers never do either.
//! - Completion order is not submission order.
//! - A flush completes only after every write that completed before the flush was submitted is
//!   durable. Writes still in flight when the flush is submitted are not covered.
//! - A completed write that no completed flush covers may or may not survive a power cut, and
//!   a write in flight at a power cut may be torn (any subset of its sectors may reach media).
//!
//! Backends: `mem` (RAM, deterministic fault injection: latency, reordering, power cut with
//! torn writes), `uring` (io_uring on a file or block device with O_DIRECT), `nvme` (an
//! NVMe controller driven from user space through VFIO) and, with feature `spdk`, `spdk` (an
//! NVMe controller through SPDK's driver).

// The workspace's rust-version (1.80) predates `is_multiple_of` (1.87).
#![allow(clippy::manual_is_multiple_of)]

use core::fmt;
use core::ptr::NonNull;
use std::alloc::{self, Layout};

pub mod mem;
pub mod nvme;
#[cfg(feature = "spdk")]
pub mod spdk;
pub mod uring;

pub use mem::{MemFaults, MemQueuePair, Tear, TearGranularity};
pub use nvme::{NvmeController, NvmeQueuePair};
#[cfg(feature = "spdk")]
pub use spdk::{SpdkController, SpdkQueuePair};
pub use uring::UringQueuePair;

/// Unit of addresses, lengths and buffer alignment, in bytes.
pub const BLOCK_SIZE_BYTES: usize = 4096;

/// Smallest unit a device writes atomically, in bytes: a power cut tears writes at this
/// granularity at worst.
pub const SECTOR_SIZE_BYTES: usize = 512;

/// Most buffers in one request, a count. Bounds the per-slot iovec table, preallocated.
pub const IOVECS_PER_REQUEST_MAX: usize = 64;

/// Largest request, in bytes. Keeps a request's byte count within io_uring's `i32` result; a
/// backend whose device transfer limit is smaller (NVMe MDTS) splits requests internally.
pub const REQUEST_SIZE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Deepest queue, in requests. Slot tables are preallocated at this size or below.
pub const DEPTH_MAX: u32 = 4096;

/// Why a request was refused at submission. Nothing was queued; no completion will follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// `depth` requests are in flight: back-pressure. Retry after `poll` has reported some.
    QueueFull,
    /// The offset, a buffer's address or a buffer's length is not a multiple of
    /// `BLOCK_SIZE_BYTES`, or a buffer (or the whole request) is empty.
    Misaligned,
    /// The range ends past `capacity_bytes`.
    OutOfRange,
    /// More than `IOVECS_PER_REQUEST_MAX` buffers.
    TooManyBuffers,
    /// More than `REQUEST_SIZE_MAX_BYTES` in one request.
    TooLarge,
    /// The backend or its device does not support this kind of request (write zeroes or
    /// deallocate).
    Unsupported,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            SubmitError::QueueFull => "queue full: poll for completions, then retry",
            SubmitError::Misaligned => {
                "offset, buffer address or length not a positive multiple of 4096 bytes"
            }
            SubmitError::OutOfRange => "range ends past the queue pair's capacity",
            SubmitError::TooManyBuffers => "more buffers than IOVECS_PER_REQUEST_MAX (64)",
            SubmitError::TooLarge => "request larger than REQUEST_SIZE_MAX_BYTES (16 MiB)",
            SubmitError::Unsupported => "the device does not support this kind of request",
        };
        f.write_str(text)
    }
}

impl std::error::Error for SubmitError {}

/// Why an accepted request failed, reported by `poll`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The device or kernel failed the request with this errno (EIO for a medium error).
    Io(i32),
    /// The device lost power (`mem` backend's power cut): nothing about the request is known.
    PowerLoss,
    /// The NVMe controller failed a command of the request with this status.
    Nvme(nvme::NvmeStatus),
    /// A command of the request got no completion within `nvme::COMMAND_TIMEOUT`, nor within
    /// as long again after an Abort; the controller was reset to get it back.
    TimedOut,
    /// The controller was reset while the request was out (after a fatal status, a timeout, or
    /// on request): a write may or may not have reached the media, a read's buffer holds
    /// undefined bytes. The queue pair works again afterwards.
    ControllerReset,
    /// The controller failed and could not be reset: nothing more can be done on it.
    DeviceFailed,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Io(errno) => {
                let os = std::io::Error::from_raw_os_error(*errno);
                write!(f, "I/O error (errno {errno}): {os}")
            }
            IoError::PowerLoss => f.write_str("device lost power; request outcome unknown"),
            IoError::Nvme(status) => write!(f, "I/O error: {status}"),
            IoError::TimedOut => f.write_str(
                "device did not complete the request in time, nor after an abort; \
                 the controller was reset",
            ),
            IoError::ControllerReset => f.write_str(
                "the controller was reset while the request was in flight; its outcome is unknown",
            ),
            IoError::DeviceFailed => {
                f.write_str("the controller failed and could not be reset; request not done")
            }
        }
    }
}

impl std::error::Error for IoError {}

/// One buffer of a request: raw, because the device fills or reads it after `submit_*` returns,
/// until `poll` reports the request's completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoVec {
    ptr: *mut u8,
    len: usize,
}

impl IoVec {
    /// Describes `len` bytes at `ptr`. Alignment is checked at submit, not here.
    ///
    /// # Safety
    /// If this `IoVec` is submitted, then from the submit call until `poll` reports the
    /// completion of that request's tag (or the queue pair is dropped), `ptr..ptr + len` stays
    /// allocated and:
    /// - for a read, is valid for writes and neither read nor written by anyone else;
    /// - for a write, is valid for reads and not modified by anyone.
    ///
    /// The queue pair may access the region from whichever thread polls it.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> IoVec {
        IoVec { ptr, len }
    }

    /// Start of the region.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (such a buffer is refused at submit as Misaligned).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Checks a read or write request against the rules every backend shares. Returns its length in
/// bytes. The order of checks is fixed so that every backend reports the same error.
pub fn check_request(
    offset: u64,
    buffers: &[IoVec],
    capacity_bytes: u64,
) -> Result<u64, SubmitError> {
    if buffers.len() > IOVECS_PER_REQUEST_MAX {
        return Err(SubmitError::TooManyBuffers);
    }
    if buffers.is_empty() || offset % BLOCK_SIZE_BYTES as u64 != 0 {
        return Err(SubmitError::Misaligned);
    }
    let mut length: usize = 0;
    for buffer in buffers {
        let aligned = buffer.ptr as usize % BLOCK_SIZE_BYTES == 0
            && buffer.len % BLOCK_SIZE_BYTES == 0
            && buffer.len > 0;
        if !aligned {
            return Err(SubmitError::Misaligned);
        }
        // Each buffer is within the address space, so 64 of them cannot overflow a u128, but
        // they can overflow usize on paper: saturate, then the size check refuses.
        length = length.saturating_add(buffer.len);
    }
    if length > REQUEST_SIZE_MAX_BYTES {
        return Err(SubmitError::TooLarge);
    }
    match offset.checked_add(length as u64) {
        Some(end) if end <= capacity_bytes => Ok(length as u64),
        _ => Err(SubmitError::OutOfRange),
    }
}

/// Checks a write-zeroes or deallocate range: offset and length multiples of
/// `BLOCK_SIZE_BYTES`, length positive, end within `capacity_bytes`.
pub fn check_range(offset: u64, length: u64, capacity_bytes: u64) -> Result<(), SubmitError> {
    let block = BLOCK_SIZE_BYTES as u64;
    if length == 0 || offset % block != 0 || length % block != 0 {
        return Err(SubmitError::Misaligned);
    }
    match offset.checked_add(length) {
        Some(end) if end <= capacity_bytes => Ok(()),
        _ => Err(SubmitError::OutOfRange),
    }
}

/// A block queue pair. One per reactor; never shared between threads, never blocking.
pub trait QueuePair {
    /// Queues a read of `offset..offset + total length` into `buffers`, in order. Completion is
    /// reported by `poll` with `tag` (tags are the caller's: the queue pair never interprets
    /// them, and duplicates are the caller's business).
    fn submit_read(&mut self, offset: u64, buffers: &[IoVec], tag: u64) -> Result<(), SubmitError>;

    /// Queues a write of `buffers`, in order, to `offset..offset + total length`.
    fn submit_write(&mut self, offset: u64, buffers: &[IoVec], tag: u64)
        -> Result<(), SubmitError>;

    /// Queues a flush: it completes once every write that completed before this call is durable.
    fn submit_flush(&mut self, tag: u64) -> Result<(), SubmitError>;

    /// Queues a write of zeroes to `offset..offset + length` (no buffer: the device does it).
    /// Not limited by `REQUEST_SIZE_MAX_BYTES`. `Unsupported` where the backend or device
    /// cannot; checked like `check_range` otherwise.
    fn submit_write_zeroes(
        &mut self,
        offset: u64,
        length: u64,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let _ = (offset, length, tag);
        Err(SubmitError::Unsupported)
    }

    /// Queues a deallocate (trim) of `offset..offset + length`: the device may forget the
    /// data; reading the range afterwards returns undefined bytes unless the device says
    /// deallocated blocks read as zeroes. `Unsupported` where the backend or device cannot.
    fn submit_deallocate(&mut self, offset: u64, length: u64, tag: u64) -> Result<(), SubmitError> {
        let _ = (offset, length, tag);
        Err(SubmitError::Unsupported)
    }

    /// Reports at most `completions_max` completions by calling `complete(tag, result)`, without
    /// waiting. Returns how many were reported.
    fn poll(
        &mut self,
        completions_max: usize,
        complete: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize;

    /// Addressable bytes: requests must end at or before this.
    fn capacity_bytes(&self) -> u64;

    /// Most requests in flight at once (submitted, completion not yet reported).
    fn depth(&self) -> u32;

    /// Requests in flight now.
    fn in_flight(&self) -> u32;

    /// Hands requests queued since the last `poll` to the device now (backends that batch
    /// submissions into `poll` would otherwise keep them until the next one).
    fn submit_queued(&mut self) {}

    /// Maps `regions` for the device once (start-up, nothing in flight), so that requests whose
    /// buffers lie inside them need no copy. Returns whether the backend registered them (the
    /// default does nothing: those requests just take the ordinary path); errors leave nothing
    /// registered.
    ///
    /// # Safety
    /// Every region stays allocated at the same address until the queue pair is dropped or
    /// this is called again.
    unsafe fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> std::io::Result<bool> {
        let _ = regions;
        Ok(false)
    }

    /// Asks the backend to signal eventfd `fd` whenever a completion is ready, so that a
    /// poller may sleep in the kernel while requests are in flight. Returns false when the
    /// backend cannot (it must then be polled); the eventfd must outlive the queue pair.
    fn wake_on_completion(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<bool> {
        let _ = fd;
        Ok(false)
    }
}

/// An owned heap buffer aligned to `BLOCK_SIZE_BYTES`, zero-filled, for callers and tests that
/// do not bring their own memory. Dereferences to `[u8]`. A buffer carved out of a larger one
/// (`carve`, for memory registered with the device once) frees nothing when dropped.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Alignment of the allocation, in bytes (part of its layout, needed to free it).
    align: usize,
    /// Bytes behind `ptr` (`len` may be shrunk below it, `set_len`): what is freed, or what
    /// the arena set aside for this piece.
    capacity: usize,
    /// Freed at drop; false for a piece of an arena, which its arena frees.
    owned: bool,
}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes.
    ///
    /// # Panics
    /// If `len` is not a positive multiple of `BLOCK_SIZE_BYTES` (a caller bug: the size is
    /// never client input), or if the allocation fails.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf::with_alignment(len, BLOCK_SIZE_BYTES)
    }

    /// Allocates `len` zeroed bytes aligned to `align`, a power of two of at least
    /// `BLOCK_SIZE_BYTES` (2 MiB for an arena SPDK must be able to register).
    ///
    /// # Panics
    /// As `new`, or if `align` is not such a power of two.
    pub fn with_alignment(len: usize, align: usize) -> AlignedBuf {
        assert!(
            len > 0 && len % BLOCK_SIZE_BYTES == 0,
            "AlignedBuf length {len} is not a positive multiple of {BLOCK_SIZE_BYTES}"
        );
        assert!(
            align.is_power_of_two() && align >= BLOCK_SIZE_BYTES,
            "AlignedBuf alignment {align} is not a power of two >= {BLOCK_SIZE_BYTES}"
        );
        let layout = AlignedBuf::layout(len, align);
        // SAFETY: `layout` has a nonzero size (asserted above).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf {
            ptr,
            len,
            align,
            capacity: len,
            owned: true,
        }
    }

    /// `len` bytes at `offset` of this buffer as a buffer of their own that frees nothing: a
    /// piece of an arena.
    ///
    /// # Safety
    /// The piece is used only while this buffer lives (it is dropped, or never touched again,
    /// before this one is dropped), and pieces in use never overlap each other, nor are
    /// their bytes accessed through this buffer meanwhile.
    ///
    /// # Panics
    /// If the range is not block aligned, empty, or not inside the buffer.
    pub unsafe fn carve(&mut self, offset: usize, len: usize) -> AlignedBuf {
        let end = offset.checked_add(len).expect("carve range overflow");
        assert!(
            end <= self.len
                && len > 0
                && offset % BLOCK_SIZE_BYTES == 0
                && len % BLOCK_SIZE_BYTES == 0,
            "carve {offset}+{len} of a {}-byte buffer",
            self.len
        );
        AlignedBuf {
            // SAFETY: `offset < len`: inside the allocation, hence not null.
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(offset)) },
            len,
            align: BLOCK_SIZE_BYTES,
            capacity: len,
            owned: false,
        }
    }

    /// Bytes the buffer can hold (`len` is at most this).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes the buffer `len` bytes long, within its capacity: a piece of an arena sized for
    /// the largest request of its class serves smaller ones too. The bytes keep their values.
    ///
    /// # Panics
    /// If `len` is not a positive multiple of `BLOCK_SIZE_BYTES` within the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len > 0 && len % BLOCK_SIZE_BYTES == 0 && len <= self.capacity,
            "AlignedBuf length {len} in a buffer of capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// Whether this buffer frees its memory (false for a piece `carve`d from an arena).
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    fn layout(len: usize, align: usize) -> Layout {
        Layout::from_size_align(len, align).expect("AlignedBuf layout")
    }

    /// The whole buffer as one `IoVec`.
    ///
    /// # Safety
    /// As `IoVec::new`: if the `IoVec` is submitted, this buffer is neither dropped nor accessed
    /// (for a read) or modified (for a write) until the request's completion is reported.
    /// Moving the `AlignedBuf` value is fine: the heap memory does not move.
    pub unsafe fn as_io_vec(&mut self) -> IoVec {
        IoVec {
            ptr: self.ptr.as_ptr(),
            len: self.len,
        }
    }

    /// The whole buffer as a region for `QueuePair::register_buffers`.
    pub fn region(&mut self) -> (*mut u8, usize) {
        (self.ptr.as_ptr(), self.len)
    }

    /// `len` bytes starting at `offset` as one `IoVec`, for scatter-gather out of one buffer.
    ///
    /// # Safety
    /// As `as_io_vec`, for that part of the buffer.
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub unsafe fn io_vec_at(&mut self, offset: usize, len: usize) -> IoVec {
        let end = offset.checked_add(len).expect("io_vec_at range overflow");
        assert!(end <= self.len, "io_vec_at range past the buffer's end");
        IoVec {
            // SAFETY: `offset <= len`, so the result is within (or one past) the allocation.
            ptr: unsafe { self.ptr.as_ptr().add(offset) },
            len,
        }
    }
}

impl core::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is our live, initialized (zeroed at allocation) allocation;
        // `&self` keeps it from being mutated through us meanwhile.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl core::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `deref`, and `&mut self` makes the access exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // SAFETY: allocated in `with_alignment` with this same layout (its length is
        // `capacity`, its alignment `align`), and freed only here.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                AlignedBuf::layout(self.capacity, self.align),
            )
        };
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: an `AlignedBuf` owns its allocation exclusively, like a `Vec<u8>`; nothing in it is
// tied to a thread.
unsafe impl Send for AlignedBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    fn vec_at(ptr: usize, len: usize) -> IoVec {
        // SAFETY: these IoVecs are only checked, never submitted.
        unsafe { IoVec::new(ptr as *mut u8, len) }
    }

    #[test]
    fn check_request_accepts_aligned_ranges() {
        let capacity = 1 << 20;
        let one = [vec_at(4096, 4096)];
        assert_eq!(check_request(0, &one, capacity), Ok(4096));
        assert_eq!(check_request(capacity - 4096, &one, capacity), Ok(4096));
        let two = [vec_at(8192, 8192), vec_at(4096 * 7, 4096)];
        assert_eq!(check_request(4096, &two, capacity), Ok(12288));
        let many = [vec_at(4096, 4096); IOVECS_PER_REQUEST_MAX];
        assert_eq!(check_request(0, &many, capacity), Ok(4096 * 64));
    }

    #[test]
    fn check_request_rejects_bad_input_in_fixed_order() {
        let capacity = 1 << 20;
        let good = vec_at(4096, 4096);
        let too_many = [good; IOVECS_PER_REQUEST_MAX + 1];
        assert_eq!(
            check_request(1, &too_many, capacity),
            Err(SubmitError::TooManyBuffers)
        );
        assert_eq!(
            check_request(0, &[], capacity),
            Err(SubmitError::Misaligned)
        );
        assert_eq!(
            check_request(512, &[good], capacity),
            Err(SubmitError::Misaligned)
        );
        for bad in [
            vec_at(4096 + 512, 4096),
            vec_at(4096, 4000),
            vec_at(4096, 0),
        ] {
            assert_eq!(
                check_request(0, &[good, bad], capacity),
                Err(SubmitError::Misaligned)
            );
        }
        assert_eq!(
            check_request(capacity, &[good], capacity),
            Err(SubmitError::OutOfRange)
        );
        assert_eq!(
            check_request(u64::MAX - 4095, &[good], u64::MAX),
            Err(SubmitError::OutOfRange)
        );
        let big = [vec_at(4096, REQUEST_SIZE_MAX_BYTES), good];
        assert_eq!(check_request(0, &big, u64::MAX), Err(SubmitError::TooLarge));
    }

    #[test]
    fn aligned_buf_is_aligned_zeroed_and_writable() {
        let mut buf = AlignedBuf::new(3 * BLOCK_SIZE_BYTES);
        assert_eq!(buf.as_ptr() as usize % BLOCK_SIZE_BYTES, 0);
        assert_eq!(buf.len(), 3 * BLOCK_SIZE_BYTES);
        assert!(buf.iter().all(|&b| b == 0));
        buf[5] = 7;
        assert_eq!(buf[5], 7);
        // SAFETY: the IoVecs are only inspected, never submitted.
        let (whole, part) = unsafe { (buf.as_io_vec(), buf.io_vec_at(4096, 8192)) };
        assert_eq!(whole.len(), 3 * 4096);
        assert_eq!(part.ptr() as usize - whole.ptr() as usize, 4096);
        assert_eq!(check_request(0, &[whole, part], 1 << 20), Ok(5 * 4096));
    }

    #[test]
    fn carved_pieces_are_views_of_their_arena_and_free_nothing() {
        let mut arena = AlignedBuf::new(4 * BLOCK_SIZE_BYTES);
        let base = arena.region().0 as usize;
        // SAFETY: disjoint pieces, dropped before the arena.
        let (mut first, mut last) = unsafe {
            (
                arena.carve(0, BLOCK_SIZE_BYTES),
                arena.carve(3 * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES),
            )
        };
        assert!(arena.is_owned() && !first.is_owned() && !last.is_owned());
        assert_eq!(
            last.region(),
            ((base + 3 * BLOCK_SIZE_BYTES) as *mut u8, 4096)
        );
        first[0] = 1;
        last[4095] = 2;
        drop(first);
        drop(last);
        // Dropping the pieces freed nothing: the arena still holds what they wrote.
        assert_eq!((arena[0], arena[4 * BLOCK_SIZE_BYTES - 1]), (1, 2));
    }

    #[test]
    fn set_len_shrinks_and_regrows_within_the_capacity() {
        let mut buf = AlignedBuf::new(4 * BLOCK_SIZE_BYTES);
        buf[3 * BLOCK_SIZE_BYTES] = 9;
        buf.set_len(BLOCK_SIZE_BYTES);
        assert_eq!((buf.len(), buf.capacity()), (4096, 4 * 4096));
        // SAFETY: only inspected, never submitted.
        assert_eq!(unsafe { buf.as_io_vec() }.len(), 4096);
        buf.set_len(4 * BLOCK_SIZE_BYTES);
        assert_eq!(buf[3 * BLOCK_SIZE_BYTES], 9, "bytes kept");
        // Dropped shrunk: freed with the layout it was allocated with (capacity).
        buf.set_len(2 * BLOCK_SIZE_BYTES);
    }

    #[test]
    #[should_panic(expected = "capacity")]
    fn set_len_refuses_to_grow_past_the_capacity() {
        AlignedBuf::new(BLOCK_SIZE_BYTES).set_len(2 * BLOCK_SIZE_BYTES);
    }

    #[test]
    #[should_panic(expected = "carve")]
    fn carve_refuses_a_range_outside_the_buffer() {
        let mut arena = AlignedBuf::new(BLOCK_SIZE_BYTES);
        // SAFETY: refused before any piece exists.
        let _ = unsafe { arena.carve(BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES) };
    }

    #[test]
    fn aligned_buf_takes_a_larger_alignment() {
        let two_mib = 2 << 20;
        let mut buf = AlignedBuf::with_alignment(two_mib, two_mib);
        assert_eq!(buf.region().0 as usize % two_mib, 0);
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    #[should_panic(expected = "not a positive multiple")]
    fn aligned_buf_refuses_odd_length() {
        let _ = AlignedBuf::new(100);
    }

    #[test]
    fn errors_display_their_cause() {
        assert!(IoError::Io(5).to_string().contains("errno 5"));
        assert!(IoError::PowerLoss.to_string().contains("power"));
        assert!(SubmitError::QueueFull.to_string().contains("retry"));
        assert!(SubmitError::OutOfRange.to_string().contains("capacity"));
    }
}
