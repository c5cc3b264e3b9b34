//! `SpdkQueuePair` (feature `spdk`): one SPDK NVMe I/O queue pair per reactor, on a controller
//! attached once per process (`SpdkController`, shared through an `Arc` like
//! `NvmeController`). The C side is `carmine_ffi::spdk` (bindgen over `spdk/nvme.h` and
//! `spdk/env.h`); in CI it is linked against the stand-in in `ci/spdk-stub/`, not SPDK.
//!
//! **Requests and commands.** A request takes one of `depth` preallocated slots and has at
//! most one SPDK command out at a time. Buffers inside a region given to `register_buffers`
//! are used in place; the others are *staged* in the slot's bounce buffer (`spdk_dma_zmalloc`'d
//! at construction): copied in before a write, out after a read. When everything is in place
//! or the staged buffers fit one bounce buffer, the request is one command:
//! `spdk_nvme_ns_cmd_read` / `_write` for one registered buffer, else `_readv` / `_writev` whose
//! scatter-gather callbacks walk the slot's `IoVec`s, each in place or at its staging offset
//! (SPDK splits the command at the device's transfer limit itself). So a journal record, a
//! small unregistered head plus registered data blocks, copies only its head. A request with
//! more unregistered bytes than that goes through the bounce buffer whole, in chunks of at most
//! `BOUNCE_BYTES` issued one after the other. `zero_copy_requests`, `bounced_requests` (any
//! copy) and `bounced_bytes` count them.
//!
//! **Registration.** SPDK translates payload addresses through its own maps, which hold
//! `spdk_dma_zmalloc` memory and ranges given to `spdk_mem_register`, and the latter must be
//! 2 MiB aligned in address and length. `register_buffers` registers the regions that are and
//! leaves the others to the bounce path (logged): the segment store's block arena is allocated
//! 2 MiB aligned for this; its journal buffers are not, and are staged.
//!
//! **Completions.** `poll` calls `spdk_nvme_qpair_process_completions`; SPDK calls
//! `on_complete` for each finished command, which records the slot's NVMe status and pushes
//! the slot onto a ring bounded by `depth` (a slot has at most one command out, so it cannot
//! overflow). `poll` then takes slots off the ring: a bounced request with chunks left issues
//! its next chunk; others are reported, an NVMe error status as `IoError::Nvme`, a submission
//! SPDK refused after the request was accepted as `IoError::Io(errno)`.
//!
//! Not handled (real SPDK only): controller reset and hot removal (a failed queue pair is
//! logged; SPDK completes its commands with an abort status, which is reported), command
//! timeouts (SPDK's own timeout callback is not registered).

mod controller;
mod slot;

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use carmine_ffi::spdk as ffi;

use self::controller::io_error;
pub use self::controller::SpdkController;
use self::slot::{
    copy_bounce, copy_staged, next_sge, on_complete, reset_sgl, Kind, Ring, Slot, IN_PLACE,
    IOVEC_NONE,
};
use super::{
    check_request, IoError, IoVec, QueuePair, SubmitError, BLOCK_SIZE_BYTES, DEPTH_MAX,
    IOVECS_PER_REQUEST_MAX, REQUEST_SIZE_MAX_BYTES,
};

/// Largest bounced chunk, in bytes: each slot's bounce buffer (depth x 128 KiB of DMA memory).
pub const BOUNCE_BYTES: usize = 128 * 1024;

/// Most regions `register_buffers` keeps registered, a count: the zero-copy check scans them.
pub const REGISTERED_REGIONS_MAX: usize = 64;

/// What SPDK's `spdk_mem_register` needs of a region's address and length.
pub const REGISTRATION_ALIGN_BYTES: usize = 2 * 1024 * 1024;

/// Most request objects asked of SPDK per queue pair: bounds its preallocation.
const IO_QUEUE_REQUESTS_MAX: u32 = 65536;

/// One SPDK I/O queue pair on a namespace range; see the module docs.
pub struct SpdkQueuePair {
    qpair: NonNull<ffi::spdk_nvme_qpair>,
    /// The completion ring. Owned: `Box::into_raw` at construction, `Box::from_raw` in
    /// `Drop`; reached through raw pointers only, because SPDK's callbacks push onto it while
    /// `poll` runs.
    done: NonNull<Ring>,
    /// `depth` slots, owned the same way (a boxed slice turned into a raw pointer).
    slots: NonNull<Slot>,
    /// Idle slots (a stack), capacity `depth`.
    free: Vec<u32>,
    in_flight: u32,
    depth: u32,
    /// One allocation holding every slot's bounce buffer.
    bounce_memory: NonNull<u8>,
    /// Regions registered with `spdk_mem_register` (address, length).
    registered: Vec<(usize, usize)>,
    offset_base: u64,
    length: u64,
    sector_shift: u32,
    /// Largest bounced chunk: `BOUNCE_BYTES`, or less if the device transfers less.
    chunk_max: u64,
    bounced_requests: u64,
    bounced_bytes: u64,
    zero_copy_requests: u64,
    failed_logged: bool,
    controller: Arc<SpdkController>,
}

// SAFETY: the SPDK queue pair is used by whichever single thread owns this value (SPDK allows
// a queue pair to move between threads when not in use); the raw pointers are into memory this
// value owns, or into the caller's submitted buffers, which `IoVec::new`'s contract makes valid
// from the polling thread.
unsafe impl Send for SpdkQueuePair {}

impl SpdkQueuePair {
    /// Allocates an I/O queue pair of `depth` requests on `controller` for the namespace bytes
    /// `offset_base..offset_base + length`.
    ///
    /// Errors: InvalidInput for a misaligned, empty or too-long range or a depth outside
    /// `1..=DEPTH_MAX`; SPDK's refusal to allocate the queue pair or its DMA memory otherwise.
    pub fn new(
        controller: &Arc<SpdkController>,
        offset_base: u64,
        length: u64,
        depth: u32,
    ) -> io::Result<SpdkQueuePair> {
        let block = BLOCK_SIZE_BYTES as u64;
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
        if offset_base % block != 0 || length % block != 0 || length == 0 {
            return Err(invalid(format!(
                "range {offset_base}+{length} is not a nonempty range of 4096-byte blocks"
            )));
        }
        if !matches!(offset_base.checked_add(length), Some(end) if end <= controller.capacity_bytes())
        {
            return Err(invalid(format!(
                "range {offset_base}+{length} ends past the namespace's {} bytes",
                controller.capacity_bytes()
            )));
        }
        if !(1..=DEPTH_MAX).contains(&depth) {
            return Err(invalid(format!("depth {depth} not in 1..={DEPTH_MAX}")));
        }
        let chunk_max = (BOUNCE_BYTES.min(controller.transfer_max_bytes as usize)
            / BLOCK_SIZE_BYTES
            * BLOCK_SIZE_BYTES) as u64;

        let mut opts = ffi::spdk_nvme_io_qpair_opts::default();
        // SAFETY: the controller is attached and `opts` is a live options struct of this size.
        unsafe {
            ffi::spdk_nvme_ctrlr_get_default_io_qpair_opts(
                controller.ctrlr.as_ptr(),
                &mut opts,
                std::mem::size_of::<ffi::spdk_nvme_io_qpair_opts>(),
            )
        };
        // Enough request objects that a full queue of the largest zero-copy requests (split
        // by SPDK into pieces of the transfer limit, plus a parent each) never runs out;
        // beyond the cap, SPDK's -ENOMEM is back-pressure (QueueFull).
        let pieces = (REQUEST_SIZE_MAX_BYTES as u32).div_ceil(controller.transfer_max_bytes) + 1;
        let wanted = depth.saturating_mul(pieces).min(IO_QUEUE_REQUESTS_MAX);
        opts.io_queue_size = opts.io_queue_size.max(depth + 1);
        opts.io_queue_requests = opts.io_queue_requests.max(wanted).max(opts.io_queue_size);
        // SAFETY: as above; SPDK copies the options.
        let qpair = unsafe {
            ffi::spdk_nvme_ctrlr_alloc_io_qpair(
                controller.ctrlr.as_ptr(),
                &opts,
                std::mem::size_of::<ffi::spdk_nvme_io_qpair_opts>(),
            )
        };
        let qpair = NonNull::new(qpair).ok_or_else(|| {
            io_error(format!(
                "spdk {}: cannot allocate an I/O queue pair of {} entries",
                controller.transport_id, opts.io_queue_size
            ))
        })?;
        let bounce_bytes = depth as usize * BOUNCE_BYTES;
        // SAFETY: plain allocation; null is checked below.
        let bounce =
            unsafe { ffi::spdk_dma_zmalloc(bounce_bytes, BLOCK_SIZE_BYTES, std::ptr::null_mut()) };
        let Some(bounce_memory) = NonNull::new(bounce.cast::<u8>()) else {
            // SAFETY: allocated above, no command submitted on it.
            unsafe { ffi::spdk_nvme_ctrlr_free_io_qpair(qpair.as_ptr()) };
            return Err(io_error(format!(
                "spdk {}: cannot allocate {} KiB of DMA memory for bounce buffers",
                controller.transport_id,
                bounce_bytes >> 10
            )));
        };
        let done = NonNull::from(Box::leak(Box::new(Ring {
            entries: vec![0; depth as usize].into_boxed_slice(),
            head: 0,
            len: 0,
        })));
        let slots: Box<[Slot]> = (0..depth)
            .map(|index| Slot {
                busy: false,
                kind: Kind::Flush,
                tag: 0,
                lba: 0,
                length: 0,
                done_bytes: 0,
                chunk: 0,
                bounced: false,
                staged: [IN_PLACE; IOVECS_PER_REQUEST_MAX],
                staged_bytes: 0,
                failed: None,
                refused: 0,
                iovecs: [IOVEC_NONE; IOVECS_PER_REQUEST_MAX],
                iovec_count: 0,
                sge_index: 0,
                sge_offset: 0,
                index,
                // SAFETY: `index < depth`: inside the allocation.
                bounce: unsafe { bounce_memory.as_ptr().add(index as usize * BOUNCE_BYTES) },
                done: done.as_ptr(),
            })
            .collect();
        let slots = NonNull::from(Box::leak(slots)).cast::<Slot>();
        log::info!(
            "spdk {}: I/O queue pair, depth {depth}, {length} bytes at {offset_base}, {} request objects, {} KiB bounce memory",
            controller.transport_id,
            opts.io_queue_requests,
            bounce_bytes >> 10
        );
        Ok(SpdkQueuePair {
            qpair,
            done,
            slots,
            free: (0..depth).rev().collect(),
            in_flight: 0,
            depth,
            bounce_memory,
            registered: Vec::with_capacity(REGISTERED_REGIONS_MAX),
            offset_base,
            length,
            sector_shift: controller.sector_size.trailing_zeros(),
            chunk_max,
            bounced_requests: 0,
            bounced_bytes: 0,
            zero_copy_requests: 0,
            failed_logged: false,
            controller: Arc::clone(controller),
        })
    }

    pub fn controller(&self) -> &Arc<SpdkController> {
        &self.controller
    }

    /// Requests of which some or all data went through a bounce buffer (one copy).
    pub fn bounced_requests(&self) -> u64 {
        self.bounced_requests
    }

    /// Bytes copied through bounce buffers (each copied once, in or out).
    pub fn bounced_bytes(&self) -> u64 {
        self.bounced_bytes
    }

    /// Requests whose data the device accessed entirely in place (registered regions).
    pub fn zero_copy_requests(&self) -> u64 {
        self.zero_copy_requests
    }

    /// Regions `register_buffers` registered with SPDK (the 2 MiB-aligned ones).
    pub fn registered_regions(&self) -> usize {
        self.registered.len()
    }

    fn slot_ptr(&self, index: u32) -> *mut Slot {
        assert!(index < self.depth);
        // SAFETY: `slots` points at `depth` slots that live as long as we do.
        unsafe { self.slots.as_ptr().add(index as usize) }
    }

    fn in_registered(&self, iovec: &IoVec) -> bool {
        let start = iovec.ptr as usize;
        self.registered
            .iter()
            .any(|&(base, len)| start >= base && start + iovec.len <= base + len)
    }

    fn unregister_all(&mut self) {
        for (base, len) in self.registered.drain(..) {
            // SAFETY: registered by us with exactly this range; nothing is in flight.
            let rc = unsafe { ffi::spdk_mem_unregister(base as *mut c_void, len) };
            if rc != 0 {
                log::warn!("spdk: unregistering {len} bytes at {base:#x} failed ({rc})");
            }
        }
    }

    /// Maps caller memory for SPDK once (nothing in flight), replacing earlier registrations.
    /// Regions that are not 2 MiB aligned in address and length, which SPDK refuses, are left
    /// to the bounce path. Returns whether any region was registered.
    ///
    /// Errors: InvalidInput with requests in flight or more than `REGISTERED_REGIONS_MAX`
    /// regions; SPDK's refusal otherwise. On error nothing is registered.
    ///
    /// # Safety
    /// Every region stays allocated at the same address until the queue pair is dropped or
    /// this is called again.
    pub unsafe fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> io::Result<bool> {
        if self.in_flight > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "register_buffers with I/O in flight",
            ));
        }
        if regions.len() > REGISTERED_REGIONS_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {REGISTERED_REGIONS_MAX} regions"),
            ));
        }
        self.unregister_all();
        let mut skipped = 0;
        for &(ptr, len) in regions {
            let aligned = len > 0
                && len % REGISTRATION_ALIGN_BYTES == 0
                && ptr as usize % REGISTRATION_ALIGN_BYTES == 0;
            if !aligned {
                skipped += 1;
                continue;
            }
            // SAFETY: the region stays valid while registered (our caller's contract).
            let rc = unsafe { ffi::spdk_mem_register(ptr.cast(), len) };
            if rc != 0 {
                self.unregister_all();
                return Err(io_error(format!(
                    "spdk_mem_register of {len} bytes at {ptr:p}: {}",
                    io::Error::from_raw_os_error(-rc)
                )));
            }
            self.registered.push((ptr as usize, len));
        }
        if skipped > 0 {
            log::info!(
                "spdk {}: {skipped} of {} regions not 2 MiB aligned: their requests are bounced",
                self.controller.transport_id,
                regions.len()
            );
        }
        Ok(!self.registered.is_empty())
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
            Kind::Read | Kind::Write => check_request(offset, buffers, self.length)?,
        };
        let index = self.free.pop().ok_or(SubmitError::QueueFull)?;
        // Stage the unregistered buffers back to back in the bounce buffer if they fit it;
        // else the whole request is bounced in chunks.
        let mut staged = [IN_PLACE; IOVECS_PER_REQUEST_MAX];
        let mut staged_bytes: u64 = 0;
        for (place, buffer) in staged.iter_mut().zip(buffers) {
            if !self.in_registered(buffer) {
                *place = u32::try_from(staged_bytes).unwrap_or(IN_PLACE - 1);
                staged_bytes += buffer.len as u64;
            }
        }
        let bounced = staged_bytes > self.chunk_max;
        if bounced {
            staged = [IN_PLACE; IOVECS_PER_REQUEST_MAX];
        }
        let lba = (self.offset_base + offset) >> self.sector_shift;
        {
            // SAFETY: the slot is idle (it was on the free stack): SPDK holds no pointer use
            // of it, and this reference ends before any SPDK call.
            let slot = unsafe { &mut *self.slot_ptr(index) };
            debug_assert!(!slot.busy);
            slot.busy = true;
            slot.kind = kind;
            slot.tag = tag;
            slot.lba = lba;
            slot.length = length;
            slot.done_bytes = 0;
            slot.chunk = 0;
            slot.bounced = bounced;
            slot.staged = staged;
            slot.staged_bytes = if bounced { 0 } else { staged_bytes };
            slot.failed = None;
            slot.refused = 0;
            slot.iovecs[..buffers.len()].copy_from_slice(buffers);
            slot.iovec_count = buffers.len();
        }
        let rc = self.issue(index);
        if rc == -libc::ENOMEM {
            // SPDK is out of request objects: back-pressure, nothing queued.
            // SAFETY: as above; the command was not queued, so SPDK holds no pointer to it.
            unsafe { (*self.slot_ptr(index)).busy = false };
            self.free.push(index);
            return Err(SubmitError::QueueFull);
        }
        self.in_flight += 1;
        if bounced {
            self.bounced_requests += 1;
            self.bounced_bytes += length;
        } else if staged_bytes > 0 {
            self.bounced_requests += 1;
            self.bounced_bytes += staged_bytes;
        } else if kind != Kind::Flush {
            self.zero_copy_requests += 1;
        }
        if rc != 0 {
            // Accepted, and failed at the next poll like any I/O error.
            self.refuse(index, rc);
        }
        Ok(())
    }

    /// Records that SPDK refused slot `index`'s command and queues it to be reported.
    fn refuse(&mut self, index: u32, rc: i32) {
        // SAFETY: SPDK refused the command, so it holds no pointer to the slot; the ring has
        // room (this slot has no command out).
        unsafe {
            let slot = self.slot_ptr(index);
            (*slot).refused = rc;
            (*(*slot).done).push(index);
        }
    }

    /// Issues slot `index`'s next command: its next bounced chunk, or the whole request (in
    /// place, staged buffers copied in first).
    /// Returns SPDK's return code (0, or a negative errno: nothing was queued).
    fn issue(&mut self, index: u32) -> i32 {
        let ns = self.controller.ns.as_ptr();
        let qpair = self.qpair.as_ptr();
        let slot_ptr = self.slot_ptr(index);
        let arg = slot_ptr.cast::<c_void>();
        let callback: ffi::spdk_nvme_cmd_cb = Some(on_complete);
        // SAFETY: the slot is busy and has no command out; the reference ends before SPDK is
        // called (SPDK's callbacks take the slot through `arg`).
        let (kind, lba, bounced, chunk_at, chunk, single) = unsafe {
            let slot = &mut *slot_ptr;
            if slot.bounced {
                slot.chunk = (slot.length - slot.done_bytes).min(self.chunk_max);
                if slot.kind == Kind::Write {
                    copy_bounce(
                        &slot.iovecs[..slot.iovec_count],
                        slot.done_bytes,
                        slot.bounce,
                        slot.chunk as usize,
                        true,
                    );
                }
            }
            if slot.staged_bytes > 0 && slot.kind == Kind::Write {
                copy_staged(
                    &slot.iovecs[..slot.iovec_count],
                    &slot.staged[..slot.iovec_count],
                    slot.bounce,
                    true,
                );
            }
            // One buffer used in place: the plain command; anything else walks the SGL.
            let single =
                (slot.iovec_count == 1 && slot.staged_bytes == 0).then(|| slot.iovecs[0].ptr);
            (
                slot.kind,
                slot.lba,
                slot.bounced,
                slot.done_bytes,
                slot.chunk,
                single,
            )
        };
        let shift = self.sector_shift;
        // SAFETY (all calls below): `ns` and `qpair` are live; payloads (direct, or handed out
        // by `next_sge`) are the slot's bounce buffer (SPDK DMA memory) or the caller's
        // registered buffers, valid until the completion (`IoVec::new`); `arg` is the slot,
        // which outlives its command.
        unsafe {
            match kind {
                Kind::Flush => ffi::spdk_nvme_ns_cmd_flush(ns, qpair, callback, arg),
                _ if bounced => {
                    let lba = lba + (chunk_at >> shift);
                    let count = (chunk >> shift) as u32;
                    let buf = (*slot_ptr).bounce.cast::<c_void>();
                    if kind == Kind::Read {
                        ffi::spdk_nvme_ns_cmd_read(ns, qpair, buf, lba, count, callback, arg, 0)
                    } else {
                        ffi::spdk_nvme_ns_cmd_write(ns, qpair, buf, lba, count, callback, arg, 0)
                    }
                }
                _ => {
                    let count = ((*slot_ptr).length >> shift) as u32;
                    match (kind, single) {
                        (Kind::Read, Some(buf)) => ffi::spdk_nvme_ns_cmd_read(
                            ns,
                            qpair,
                            buf.cast(),
                            lba,
                            count,
                            callback,
                            arg,
                            0,
                        ),
                        (_, Some(buf)) => ffi::spdk_nvme_ns_cmd_write(
                            ns,
                            qpair,
                            buf.cast(),
                            lba,
                            count,
                            callback,
                            arg,
                            0,
                        ),
                        (Kind::Read, None) => ffi::spdk_nvme_ns_cmd_readv(
                            ns,
                            qpair,
                            lba,
                            count,
                            callback,
                            arg,
                            0,
                            Some(reset_sgl),
                            Some(next_sge),
                        ),
                        (_, None) => ffi::spdk_nvme_ns_cmd_writev(
                            ns,
                            qpair,
                            lba,
                            count,
                            callback,
                            arg,
                            0,
                            Some(reset_sgl),
                            Some(next_sge),
                        ),
                    }
                }
            }
        }
    }

    /// Takes one finished command's slot off the ring: returns the request's outcome when it
    /// is complete, or None when a bounced request issued its next chunk.
    fn finish(&mut self, index: u32) -> Option<(u64, Result<(), IoError>)> {
        // SAFETY: the slot's command completed (or was refused): SPDK holds no pointer to it
        // until `issue` below, and the reference ends before that.
        let (tag, outcome, more) = unsafe {
            let slot = &mut *self.slot_ptr(index);
            debug_assert!(slot.busy);
            let outcome = if slot.refused != 0 {
                Err(IoError::Io(-slot.refused))
            } else if let Some(status) = slot.failed {
                Err(IoError::Nvme(status))
            } else {
                Ok(())
            };
            let mut more = false;
            if outcome.is_ok() && slot.staged_bytes > 0 && slot.kind == Kind::Read {
                copy_staged(
                    &slot.iovecs[..slot.iovec_count],
                    &slot.staged[..slot.iovec_count],
                    slot.bounce,
                    false,
                );
            }
            if outcome.is_ok() && slot.bounced {
                if slot.kind == Kind::Read {
                    copy_bounce(
                        &slot.iovecs[..slot.iovec_count],
                        slot.done_bytes,
                        slot.bounce,
                        slot.chunk as usize,
                        false,
                    );
                }
                slot.done_bytes += slot.chunk;
                more = slot.done_bytes < slot.length;
            }
            (slot.tag, outcome, more)
        };
        if more {
            let rc = self.issue(index);
            if rc == 0 {
                return None;
            }
            // The slot's previous command freed its request object, so this is not
            // back-pressure: report it.
            self.refuse(index, rc);
            return None;
        }
        // SAFETY: as above.
        unsafe { (*self.slot_ptr(index)).busy = false };
        self.free.push(index);
        self.in_flight -= 1;
        Some((tag, outcome))
    }
}

impl QueuePair for SpdkQueuePair {
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
        // SAFETY: reading the ring's length through the raw pointer; no reference is held.
        let queued = unsafe { (*self.done.as_ptr()).len };
        if self.in_flight > 0 && queued < completions_max {
            // SAFETY: `qpair` is live and polled by this thread only; the callbacks reach the
            // slots and the ring through raw pointers while no Rust reference to them exists.
            let rc = unsafe { ffi::spdk_nvme_qpair_process_completions(self.qpair.as_ptr(), 0) };
            if rc < 0 && !self.failed_logged {
                self.failed_logged = true;
                log::error!(
                    "spdk {}: queue pair failed ({}); its commands complete as aborted",
                    self.controller.transport_id,
                    io::Error::from_raw_os_error(-rc)
                );
            }
        }
        let mut reported = 0;
        while reported < completions_max {
            // SAFETY: as above: a short-lived access through the raw pointer.
            let Some(index) = (unsafe { (*self.done.as_ptr()).pop() }) else {
                break;
            };
            if let Some((tag, outcome)) = self.finish(index) {
                complete(tag, outcome);
                reported += 1;
            }
        }
        reported
    }

    fn capacity_bytes(&self) -> u64 {
        self.length
    }

    fn depth(&self) -> u32 {
        self.depth
    }

    fn in_flight(&self) -> u32 {
        self.in_flight
    }

    unsafe fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> io::Result<bool> {
        // SAFETY: the caller's contract is the inherent method's.
        unsafe { SpdkQueuePair::register_buffers(self, regions) }
    }
}

impl Drop for SpdkQueuePair {
    fn drop(&mut self) {
        // SAFETY: the queue pair is ours; freeing it drops any command still out without a
        // callback, so after this SPDK holds no pointer into the slots, the ring or the bounce
        // memory.
        let rc = unsafe { ffi::spdk_nvme_ctrlr_free_io_qpair(self.qpair.as_ptr()) };
        if rc != 0 {
            log::warn!(
                "spdk {}: freeing the I/O queue pair failed ({rc})",
                self.controller.transport_id
            );
        }
        self.unregister_all();
        // SAFETY: allocated with spdk_dma_zmalloc in `new`, freed only here, unused by SPDK now.
        unsafe { ffi::spdk_dma_free(self.bounce_memory.as_ptr().cast()) };
        // SAFETY: both leaked from Boxes in `new` (the slots as a slice of `depth`), freed only
        // here; no pointer into them is used again.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.slots.as_ptr(),
                self.depth as usize,
            )));
            drop(Box::from_raw(self.done.as_ptr()));
        }
    }
}
