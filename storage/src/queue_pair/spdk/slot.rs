//! A request slot and the completion ring, and the callbacks SPDK calls with a slot's address:
//! completion, and the scatter-gather walk over the slot's buffers (in place or staged in its
//! bounce buffer); plus the copies in and out of the bounce buffer.

use std::ffi::{c_int, c_void};

use carmine_ffi::spdk as ffi;

use super::super::nvme::NvmeStatus;
use super::super::{IoVec, IOVECS_PER_REQUEST_MAX};
use super::BOUNCE_BYTES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Read,
    Write,
    Flush,
}

/// `Slot::staged` for a buffer the device uses in place.
pub(super) const IN_PLACE: u32 = u32::MAX;

pub(super) const IOVEC_NONE: IoVec = IoVec {
    ptr: core::ptr::null_mut(),
    len: 0,
};

/// A request slot. SPDK's callbacks get a pointer to it (`cb_arg`), so slots never move: they
/// are one allocation made at construction, reached only through raw pointers.
pub(super) struct Slot {
    pub(super) busy: bool,
    pub(super) kind: Kind,
    pub(super) tag: u64,
    /// First sector of the request on the namespace.
    pub(super) lba: u64,
    pub(super) length: u64,
    /// Bytes of a bounced request done (completed chunks).
    pub(super) done_bytes: u64,
    /// Bytes of the chunk out now (bounced requests).
    pub(super) chunk: u64,
    /// Goes through the bounce buffer whole, chunk after chunk.
    pub(super) bounced: bool,
    /// Per buffer: its offset in the bounce buffer when staged there, else `IN_PLACE`.
    pub(super) staged: [u32; IOVECS_PER_REQUEST_MAX],
    /// Bytes of staged buffers (0: every buffer is used in place, or the request is bounced).
    pub(super) staged_bytes: u64,
    /// Set by `on_complete`: the command's NVMe status when it failed.
    pub(super) failed: Option<NvmeStatus>,
    /// Set when SPDK refused a command of an accepted request: its negative return.
    pub(super) refused: i32,
    pub(super) iovecs: [IoVec; IOVECS_PER_REQUEST_MAX],
    pub(super) iovec_count: usize,
    /// Scatter-gather cursor for `next_sge`: buffer index and byte offset in it.
    pub(super) sge_index: usize,
    pub(super) sge_offset: usize,
    /// This slot's index, pushed onto `done` at completion.
    pub(super) index: u32,
    /// This slot's bounce buffer (`BOUNCE_BYTES` of SPDK DMA memory).
    pub(super) bounce: *mut u8,
    pub(super) done: *mut Ring,
}

/// A FIFO of slot indices, bounded by the slots there are.
pub(super) struct Ring {
    pub(super) entries: Box<[u32]>,
    pub(super) head: usize,
    pub(super) len: usize,
}

impl Ring {
    pub(super) fn push(&mut self, index: u32) {
        // A slot is pushed at most once per command, and has at most one command out.
        assert!(self.len < self.entries.len(), "completion ring overflow");
        let at = (self.head + self.len) % self.entries.len();
        self.entries[at] = index;
        self.len += 1;
    }

    pub(super) fn pop(&mut self) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let index = self.entries[self.head];
        self.head = (self.head + 1) % self.entries.len();
        self.len -= 1;
        Some(index)
    }
}

/// SPDK's completion callback: records the outcome and queues the slot for `poll`.
///
/// # Safety
/// `arg` is the `Slot` the command was submitted with, alive (its queue pair is polling), and
/// no Rust reference into the slots or the ring is live during `process_completions`.
pub(super) unsafe extern "C" fn on_complete(arg: *mut c_void, cpl: *const ffi::spdk_nvme_cpl) {
    let slot = arg.cast::<Slot>();
    // SAFETY: `cpl` is SPDK's completion entry for this command, valid during the call.
    let failed = unsafe { ffi::carmine_spdk_cpl_is_error(cpl) };
    // SAFETY: as above.
    let status = unsafe { ffi::carmine_spdk_cpl_status(cpl) };
    // SAFETY: the function's contract: `slot` is live and nothing else references it now.
    unsafe {
        (*slot).failed = failed.then_some(NvmeStatus(status));
        (*(*slot).done).push((*slot).index);
    }
}

/// SPDK's scatter-gather rewind: position the slot's cursor at byte `offset` of its buffers.
///
/// # Safety
/// As `on_complete`: `arg` is a live slot no Rust reference points into.
pub(super) unsafe extern "C" fn reset_sgl(arg: *mut c_void, offset: u32) {
    // SAFETY: the function's contract.
    let slot = unsafe { &mut *arg.cast::<Slot>() };
    let mut left = offset as usize;
    slot.sge_index = 0;
    while slot.sge_index < slot.iovec_count && left >= slot.iovecs[slot.sge_index].len {
        left -= slot.iovecs[slot.sge_index].len;
        slot.sge_index += 1;
    }
    slot.sge_offset = left;
}

/// SPDK's scatter-gather step: the rest of the buffer under the cursor, then the next one.
///
/// # Safety
/// As `reset_sgl`; `address` and `length` are SPDK's out-parameters.
pub(super) unsafe extern "C" fn next_sge(
    arg: *mut c_void,
    address: *mut *mut c_void,
    length: *mut u32,
) -> c_int {
    // SAFETY: the function's contract.
    let slot = unsafe { &mut *arg.cast::<Slot>() };
    if slot.sge_index >= slot.iovec_count {
        return -1;
    }
    let iovec = slot.iovecs[slot.sge_index];
    let staged = slot.staged[slot.sge_index];
    // SAFETY: `sge_offset < iovec.len`, so the result stays inside the caller's buffer, or
    // inside its staging place in the bounce buffer (`staged + iovec.len <= BOUNCE_BYTES`); the
    // out-parameters are SPDK's, valid for writes.
    unsafe {
        let start = if staged == IN_PLACE {
            iovec.ptr
        } else {
            slot.bounce.add(staged as usize)
        };
        *address = start.add(slot.sge_offset).cast();
        *length = (iovec.len - slot.sge_offset) as u32;
    }
    slot.sge_index += 1;
    slot.sge_offset = 0;
    0
}

/// Copies the staged buffers of a request into the bounce buffer (`to_bounce`) or back out.
///
/// # Safety
/// The buffers are the request's (valid per `IoVec::new`), and each staged one fits the bounce
/// buffer at its offset.
pub(super) unsafe fn copy_staged(
    iovecs: &[IoVec],
    staged: &[u32],
    bounce: *mut u8,
    to_bounce: bool,
) {
    for (iovec, &at) in iovecs.iter().zip(staged) {
        if at == IN_PLACE {
            continue;
        }
        debug_assert!(at as usize + iovec.len <= BOUNCE_BYTES);
        // SAFETY: the function's contract; the bounce buffer is not the caller's memory.
        unsafe {
            let place = bounce.add(at as usize);
            if to_bounce {
                core::ptr::copy_nonoverlapping(iovec.ptr, place, iovec.len);
            } else {
                core::ptr::copy_nonoverlapping(place, iovec.ptr, iovec.len);
            }
        }
    }
}

/// Copies `len` bytes between the request's buffers, from byte `offset` of the request on,
/// and `bounce`: into `bounce` when `to_bounce`, else out of it.
///
/// # Safety
/// The buffers are the request's (valid per `IoVec::new`), `bounce` holds `len` bytes, and
/// `offset + len` is within the request.
pub(super) unsafe fn copy_bounce(
    iovecs: &[IoVec],
    offset: u64,
    bounce: *mut u8,
    len: usize,
    to_bounce: bool,
) {
    let mut skip = offset as usize;
    let mut copied = 0;
    for iovec in iovecs {
        if copied == len {
            break;
        }
        if skip >= iovec.len {
            skip -= iovec.len;
            continue;
        }
        let n = (iovec.len - skip).min(len - copied);
        // SAFETY: both ranges are inside their buffers (the function's contract) and do not
        // overlap (the bounce buffer is SPDK memory, not the caller's).
        unsafe {
            let user = iovec.ptr.add(skip);
            let staged = bounce.add(copied);
            if to_bounce {
                core::ptr::copy_nonoverlapping(user, staged, n);
            } else {
                core::ptr::copy_nonoverlapping(staged, user, n);
            }
        }
        copied += n;
        skip = 0;
    }
    debug_assert_eq!(copied, len);
}
