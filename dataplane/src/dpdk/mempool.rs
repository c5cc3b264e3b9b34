//! A pool of packet buffers (`rte_pktmbuf_pool_create`), sized at start-up.

use super::{sys, DpdkError, Eal, Mbuf};
use std::ffi::CString;
use std::ptr::NonNull;

/// Per-lcore cache of the pool. Must stay below `RTE_MEMPOOL_CACHE_MAX_SIZE` (512) and
/// `count / 1.5`; 256 lets a whole rx burst be refilled without touching the shared ring.
pub const MEMPOOL_CACHE_COUNT: u32 = 256;

/// A DPDK packet-buffer pool. Freed on drop; every [`Mbuf`] from it must be dropped first
/// (enforced by the borrow: an `Mbuf<'pool>` borrows its pool).
#[derive(Debug)]
pub struct Mempool {
    raw: NonNull<sys::rte_mempool>,
    data_room_bytes: u16,
}

impl Mempool {
    /// Creates a pool of `count` buffers, each with `data_room_bytes` of data room (headroom
    /// included: `RTE_MBUF_DEFAULT_BUF_SIZE` gives 2048 bytes after the 128-byte headroom).
    pub fn new(
        _eal: &Eal,
        name: &str,
        count: u32,
        data_room_bytes: u16,
    ) -> Result<Mempool, DpdkError> {
        assert!(count > 0);
        assert!(data_room_bytes as u32 > sys::RTE_PKTMBUF_HEADROOM);
        let cname = CString::new(name).map_err(|_| DpdkError {
            call: "rte_pktmbuf_pool_create (name has a NUL byte)",
            code: libc::EINVAL,
        })?;
        let cache = MEMPOOL_CACHE_COUNT.min(count * 2 / 3);
        // SAFETY: the EAL is running (`_eal`); name is a valid C string copied by DPDK.
        let raw = unsafe {
            sys::rte_pktmbuf_pool_create(
                cname.as_ptr(),
                count,
                cache,
                0,
                data_room_bytes,
                sys::SOCKET_ID_ANY,
            )
        };
        let raw =
            NonNull::new(raw).ok_or_else(|| DpdkError::from_errno("rte_pktmbuf_pool_create"))?;
        Ok(Mempool {
            raw,
            data_room_bytes,
        })
    }

    /// Creates a pool of `count` mbufs whose data rooms are `count` consecutive
    /// `room_stride`-byte pieces of `rooms` (`rte_pktmbuf_pool_create_extbuf`), at device address
    /// `rooms_iova`: mbuf `k`'s data area is pinned for life to one piece, so a frame the driver
    /// receives into it is in a Carmine buffer pool's memory (see `net.rs`: a received mbuf
    /// becomes a pool `Lease`). Each piece holds `data_room_bytes` (headroom included) at its
    /// start.
    ///
    /// # Safety
    /// `rooms` must stay mapped, readable and writable for the rest of the process (the pool is
    /// never freed while it might be used, and the driver writes there), and nothing else may
    /// write a piece while its mbuf is in the pool or in the driver's hands.
    pub unsafe fn with_external_rooms(
        _eal: &Eal,
        name: &str,
        count: u32,
        data_room_bytes: u16,
        rooms: *mut u8,
        rooms_iova: u64,
        room_stride: u16,
    ) -> Result<Mempool, DpdkError> {
        assert!(count > 0);
        assert!(data_room_bytes as u32 > sys::RTE_PKTMBUF_HEADROOM);
        assert!(data_room_bytes <= room_stride);
        assert!(!rooms.is_null());
        let cname = CString::new(name).map_err(|_| DpdkError {
            call: "rte_pktmbuf_pool_create_extbuf (name has a NUL byte)",
            code: libc::EINVAL,
        })?;
        let extmem = sys::rte_pktmbuf_extmem {
            buf_ptr: rooms.cast(),
            buf_iova: rooms_iova,
            buf_len: count as usize * room_stride as usize,
            elt_size: room_stride,
        };
        let cache = MEMPOOL_CACHE_COUNT.min(count * 2 / 3);
        // SAFETY: the EAL is running; name is a valid C string copied by DPDK; `extmem`
        // describes `count` pieces of memory the caller keeps mapped for the process's life;
        // DPDK copies the descriptor array during the call.
        let raw = unsafe {
            sys::rte_pktmbuf_pool_create_extbuf(
                cname.as_ptr(),
                count,
                cache,
                0,
                data_room_bytes,
                sys::SOCKET_ID_ANY,
                &extmem,
                1,
            )
        };
        let raw = NonNull::new(raw)
            .ok_or_else(|| DpdkError::from_errno("rte_pktmbuf_pool_create_extbuf"))?;
        Ok(Mempool {
            raw,
            data_room_bytes,
        })
    }

    /// Takes one buffer, reset (empty data, default headroom), or `None` when the pool is empty.
    pub fn alloc(&self) -> Option<Mbuf<'_>> {
        // SAFETY: raw is a live pktmbuf pool (created above, freed only in drop).
        let m = unsafe { sys::rte_pktmbuf_alloc(self.raw.as_ptr()) };
        // SAFETY: a non-null m is a fresh buffer from this pool, owned by nobody else.
        NonNull::new(m).map(|m| unsafe { Mbuf::from_raw(m) })
    }

    /// Buffers in the pool now (including per-lcore caches).
    pub fn available_count(&self) -> u32 {
        // SAFETY: raw is live; the call only reads counters.
        unsafe { sys::rte_mempool_avail_count(self.raw.as_ptr()) }
    }

    /// Buffers taken from the pool and not yet returned.
    pub fn in_use_count(&self) -> u32 {
        // SAFETY: raw is live; the call only reads counters.
        unsafe { sys::rte_mempool_in_use_count(self.raw.as_ptr()) }
    }

    /// Data room of each buffer, headroom included.
    pub fn data_room_bytes(&self) -> u16 {
        self.data_room_bytes
    }

    /// The raw pool, for `rte_eth_rx_queue_setup`.
    pub(crate) fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.raw.as_ptr()
    }
}

// A pool may be created on the main thread and moved to the reactor that uses it, and buffers
// freed on another core go back to it from there.
// SAFETY: pktmbuf pools are created multi-producer/multi-consumer (default flags). The only
// per-thread state is the per-lcore cache, indexed by the calling thread's lcore id, which is
// unique per thread (EAL threads, registered threads); unregistered threads use no cache.
unsafe impl Send for Mempool {}
// SAFETY: as for Send: concurrent gets and puts from different threads are what DPDK's
// multi-producer/multi-consumer pool is for; no two threads share an lcore cache.
unsafe impl Sync for Mempool {}

impl Drop for Mempool {
    fn drop(&mut self) {
        // SAFETY: no Mbuf borrows self any more (lifetimes), and ports using this pool for rx
        // borrow it too (`RxQueue<'pool>`), so nothing references the pool's memory.
        unsafe { sys::rte_mempool_free(self.raw.as_ptr()) }
    }
}
