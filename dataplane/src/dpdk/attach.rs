//! Sending bytes of pool memory without copying them into the mbuf: the payload segment of a
//! frame is an mbuf attached to the bytes as an *external buffer* (`rte_pktmbuf_attach_extbuf`),
//! chained behind a small mbuf holding the Ethernet/IPv4/UDP and RPC headers.
//!
//! The bytes must stay as they are until the driver lets go of the frame, which may be after
//! the RPC dropped the response they belong to (a client moving on while the frame waits in
//! the tx queue). So each attached frame holds a `Lease` of its own, in one of a fixed set of
//! slots. DPDK calls `on_free` when the frame's last reference goes (inside `tx_burst`, or when
//! an unsent frame is dropped, always on the thread that owns the queue); the callback only
//! writes the slot's number into the `returned` list, and [`TxAttach::reap`] hands the leases
//! back to the pools outside any DPDK call. Nothing here allocates after start-up.
//!
//! A frame may instead be attached to the store's memory (`Hold::Store`, a zero-copy memif
//! port: `net.rs`): it holds no lease then, only a count ([`TxAttach::store_in_flight`]), and
//! the core lets no mutation reach the store while the count is above zero
//! (`RpcTransport::copy_stored_bodies`), which keeps those bytes as they were sent.

use super::{sys, Mbuf, Mempool};
use crate::buffers::CorePools;
use crate::pool::Lease;
use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr::NonNull;

/// Slot numbers DPDK has freed, written by `on_free`.
struct Returned {
    /// Capacity = slot count: each slot is returned once per use, so pushing never grows it.
    slots: Vec<u32>,
}

/// What an attached frame keeps its payload alive by.
pub enum Hold {
    /// A lease over the payload's bytes in a pool.
    Lease(Lease),
    /// Nothing but a count: the bytes are the store's, which changes nothing while frames
    /// attached to it are in flight (the core's rule, see the module comment).
    Store,
}

/// What `on_free` gets for one slot.
struct Cookie {
    returned: NonNull<Returned>,
    slot: u32,
}

/// Attachment slots of one tx queue: owned by the reactor that owns the queue.
pub struct TxAttach {
    /// The shared-info block DPDK counts references in, one per slot (DPDK writes it).
    /// `infos`, `cookies` and `returned` are leaked: a frame in a driver's ring may outlive
    /// this struct (the port is never closed), and its free callback must still find them.
    infos: &'static [UnsafeCell<sys::rte_mbuf_ext_shared_info>],
    cookies: &'static [Cookie],
    /// What each slot in use holds (None when free).
    held: Vec<Option<Hold>>,
    free: Vec<u32>,
    /// Slots in use that hold store bytes.
    store_in_flight: usize,
    returned: NonNull<Returned>,
}

// SAFETY: the raw pointers point into memory this struct owns (`returned`, `infos`, `cookies`)
// and that only the owning thread touches (DPDK calls `on_free` on the thread freeing the
// frame: this queue's reactor). Moving the struct to the reactor moves all of that with it.
unsafe impl Send for TxAttach {}

/// DPDK's free callback for an attached payload: records the slot as returned.
unsafe extern "C" fn on_free(_addr: *mut c_void, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Cookie` of this slot (set in `attach`), alive as long as the
    // `TxAttach`; DPDK calls this on the queue owner's thread, outside any Rust borrow of
    // `returned` (it is only borrowed in `reap`, which makes no DPDK call while it holds it).
    unsafe {
        let cookie = &*(opaque as *const Cookie);
        let returned = &mut *cookie.returned.as_ptr();
        assert!(
            returned.slots.len() < returned.slots.capacity(),
            "a slot returned twice"
        );
        returned.slots.push(cookie.slot);
    }
}

impl TxAttach {
    /// `count` slots: at most that many attached frames in flight.
    pub fn new(count: u32) -> TxAttach {
        assert!(count > 0);
        let returned = NonNull::from(Box::leak(Box::new(Returned {
            slots: Vec::with_capacity(count as usize),
        })));
        let infos = (0..count)
            .map(|_| UnsafeCell::new(sys::rte_mbuf_ext_shared_info::default()))
            .collect::<Vec<_>>()
            .leak();
        let cookies = (0..count)
            .map(|slot| Cookie { returned, slot })
            .collect::<Vec<_>>()
            .leak();
        let mut held = Vec::with_capacity(count as usize);
        held.resize_with(count as usize, || None);
        TxAttach {
            infos,
            cookies,
            held,
            free: (0..count).rev().collect(),
            store_in_flight: 0,
            returned,
        }
    }

    /// Frames in flight that hold a lease or store bytes.
    pub fn in_use(&self) -> usize {
        self.held.len() - self.free.len()
    }

    /// Frames in flight attached to store bytes (`Hold::Store`) that the driver has not
    /// freed, as of the last [`TxAttach::reap`].
    pub fn store_in_flight(&self) -> usize {
        self.store_in_flight
    }

    /// A frame of `head` (headers, copied) followed by `payload` (a lease over exactly those
    /// bytes) sent in place, holding the lease until the driver frees the frame. Err gives the
    /// lease back when no slot or mbuf is free or the frame does not fit.
    pub fn frame<'p>(
        &mut self,
        pool: &'p Mempool,
        head: &[&[u8]],
        payload: Lease,
    ) -> Result<Mbuf<'p>, Lease> {
        // SAFETY: the lease keeps the bytes valid and unchanged until the slot comes back.
        let bytes: *const [u8] = payload.as_slice();
        match unsafe { self.frame_of(pool, head, &*bytes, Hold::Lease(payload)) } {
            Ok(frame) => Ok(frame),
            Err(Hold::Lease(lease)) => Err(lease),
            Err(Hold::Store) => unreachable!("a lease was held"),
        }
    }

    /// `frame` for store bytes: the frame holds only a count (`store_in_flight`). None when no
    /// slot or mbuf is free or the frame does not fit (the caller copies instead).
    ///
    /// # Safety
    /// `payload` stays valid and unchanged while `store_in_flight()` (after any later `reap`)
    /// counts this frame, and the caller makes sure the driver's peer can read it.
    pub unsafe fn frame_from_store<'p>(
        &mut self,
        pool: &'p Mempool,
        head: &[&[u8]],
        payload: &[u8],
    ) -> Option<Mbuf<'p>> {
        // SAFETY: the caller's promise.
        let frame = unsafe { self.frame_of(pool, head, payload, Hold::Store) }.ok()?;
        self.store_in_flight += 1;
        Some(frame)
    }

    /// # Safety
    /// `payload` stays valid and unchanged until the slot comes back (`hold` sees to it).
    unsafe fn frame_of<'p>(
        &mut self,
        pool: &'p Mempool,
        head: &[&[u8]],
        payload: &[u8],
        hold: Hold,
    ) -> Result<Mbuf<'p>, Hold> {
        let Ok(len) = u16::try_from(payload.len()) else {
            return Err(hold);
        };
        let Some(&slot) = self.free.last() else {
            return Err(hold);
        };
        let (Some(mut first), Some(mut tail)) = (pool.alloc(), pool.alloc()) else {
            return Err(hold);
        };
        if !first.extend_from_slices(head) {
            return Err(hold);
        }
        let info = self.infos[slot as usize].get();
        let cookie: *const Cookie = &self.cookies[slot as usize];
        // SAFETY: `info` is this slot's block, not referenced by any frame (the slot is free);
        // DPDK reads it from the attached mbuf until `on_free`, and it lives as long as self,
        // leaked: it outlives every frame. The payload bytes stay valid and unchanged until
        // `on_free` returns the slot (the caller's promise, kept by `hold`).
        unsafe {
            (*info).free_cb = Some(on_free);
            (*info).fcb_opaque = cookie as *mut c_void;
            (*info).refcnt = 1;
            tail.attach_external(payload.as_ptr().cast_mut(), len, info);
        }
        if !first.chain(tail) {
            // The tail's drop already returned the slot through `on_free`; `reap` finds it
            // holding nothing and leaves it free.
            return Err(hold);
        }
        self.free.pop();
        self.held[slot as usize] = Some(hold);
        Ok(first)
    }

    /// Gives the leases of frames the driver freed back to the pools.
    pub fn reap(&mut self, pools: &mut CorePools) {
        // SAFETY: no DPDK call runs while this borrow lives (so `on_free` cannot write); the
        // allocation is alive (leaked in `new`).
        let returned = unsafe { &mut *self.returned.as_ptr() };
        for slot in returned.slots.drain(..) {
            match self.held[slot as usize].take() {
                Some(Hold::Lease(lease)) => pools.release_lease(lease),
                Some(Hold::Store) => self.store_in_flight -= 1,
                None => continue,
            }
            self.free.push(slot);
        }
    }
}
