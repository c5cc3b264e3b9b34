//! The rooms of an in-place rx pool: mbuf data rooms that are the buffers of the core's `nic`
//! `BufferPool`, so that a received datagram is a pool `Lease` where the driver wrote it (see
//! `net.rs` for the whole path).
//!
//! The port owns every room DPDK has (an owner `Buf` per room, in the mempool or the rx ring).
//! `lease` turns a received mbuf into a lease over its room and keeps the mbuf; `reclaim`
//! takes back, as their owner, the rooms whose every lease came home (free in the `nic` pool)
//! and frees their mbufs, which returns the rooms to DPDK.
//!
//! The rooms are EAL memory (a memzone per queue), not a mapping of our own: a memif peer in
//! zero-copy mode writes into them through its mapping of the EAL's memory, and nothing else.

use super::net::{MBUFS_PER_QUEUE, MBUF_DATA_ROOM};
use super::{DpdkError, Eal, Mbuf, Mempool};
use crate::buffers::{pool_id, CorePools, SizeClass};
use crate::pool::{Buf, BufferPool, Lease, BUFFER_ALIGNMENT_BYTES};

/// Bytes between two rooms: `MBUF_DATA_ROOM` rounded up to the buffer pool's alignment (its
/// buffer size must be a multiple of it).
pub const ROOM_STRIDE_BYTES: usize =
    (MBUF_DATA_ROOM as usize).next_multiple_of(BUFFER_ALIGNMENT_BYTES);

const _: () = assert!(ROOM_STRIDE_BYTES <= u16::MAX as usize);

/// One rx queue's rooms, by buffer index (= room index).
pub(super) struct Rooms {
    /// The rx pool (the mbufs `rx_burst` gives come from it).
    pool: &'static Mempool,
    /// Address of room 0 and how many there are (rooms are `ROOM_STRIDE_BYTES` apart).
    base: usize,
    count: usize,
    /// The `nic` buffer pool over the rooms, until the reactor takes it into its `CorePools`.
    buffers: Option<BufferPool>,
    /// The owner of each room DPDK has (None while ops hold leases over it).
    owners: Vec<Option<Buf>>,
    /// The mbuf of each room ops hold leases over (freed when the room comes back).
    leased: Vec<Option<Mbuf<'static>>>,
    leased_count: usize,
}

impl Rooms {
    /// Queue `q`'s rooms: a `nic` buffer pool of `MBUFS_PER_QUEUE` rooms (id of core `q`),
    /// every room owned here, and a mempool over them (named `name`), for the rx queue.
    pub(super) fn open(eal: &Eal, name: &str, q: u16) -> Result<Rooms, DpdkError> {
        let count = MBUFS_PER_QUEUE as usize;
        let bytes = count * ROOM_STRIDE_BYTES;
        // EAL memory, not an anonymous mapping: a zero-copy memif peer writes frames into our
        // rooms through its mapping of the EAL's memory segments (and only those), and the
        // rooms get an IOVA. Reserved for the process's life, as the mempool needs.
        let memory = eal
            .reserve_memory(
                &format!("{name}-rooms"),
                bytes,
                BUFFER_ALIGNMENT_BYTES as u32,
            )
            .map_err(|e| {
                log::error!(
                    "rx rooms of queue {q}: {} MiB of DPDK memory not available ({e}); give \
                     the EAL more (-m)",
                    bytes >> 20
                );
                e
            })?;
        let base = memory.ptr.as_ptr() as usize;
        // SAFETY: the memzone is `bytes` long, aligned as asked, never freed, and reached only
        // through this pool (and the driver writing the rooms the port hands it, below).
        let mut buffers = unsafe {
            BufferPool::over_memory(
                pool_id(q as usize, SizeClass::Nic),
                ROOM_STRIDE_BYTES,
                MBUFS_PER_QUEUE,
                memory.ptr,
                bytes,
            )
        }
        .map_err(|e| DpdkError {
            call: "BufferPool::over_memory (rx rooms)",
            code: e.raw_os_error().unwrap_or(libc::EINVAL),
        })?;
        let owners: Vec<Option<Buf>> = (0..count)
            .map(|i| {
                let owner = buffers.acquire().expect("a fresh pool has every room");
                assert_eq!(owner.index() as usize, i, "rooms are handed out in order");
                Some(owner)
            })
            .collect();
        // SAFETY: the rooms are `count` buffers of `ROOM_STRIDE_BYTES` from `base`, in a
        // memzone never freed; their owners are held here, and nothing writes
        // through them (rooms are only sealed and leased as the driver wrote them), so only the
        // driver writes a room while its mbuf is DPDK's.
        let pool = unsafe {
            Mempool::with_external_rooms(
                eal,
                name,
                MBUFS_PER_QUEUE,
                MBUF_DATA_ROOM,
                base as *mut u8,
                memory.iova,
                ROOM_STRIDE_BYTES as u16,
            )?
        };
        let mut leased = Vec::with_capacity(count);
        leased.resize_with(count, || None);
        Ok(Rooms {
            pool: Box::leak(Box::new(pool)),
            base,
            count,
            buffers: Some(buffers),
            owners,
            leased,
            leased_count: 0,
        })
    }

    /// The mempool the rx queue fills from.
    pub(super) fn mempool(&self) -> &'static Mempool {
        self.pool
    }

    /// The `nic` buffer pool, for the reactor's `CorePools`; taken once.
    pub(super) fn take_buffers(&mut self) -> Option<BufferPool> {
        self.buffers.take()
    }

    /// Rooms ops hold leases over now.
    pub(super) fn leased_count(&self) -> usize {
        self.leased_count
    }

    /// The datagram at `[offset, offset + len)` of `m`'s data, leased in place; `m` back when
    /// it is not one of these rooms (the caller copies it).
    pub(super) fn lease(
        &mut self,
        pools: &mut CorePools,
        m: Mbuf<'static>,
        offset: usize,
        len: usize,
    ) -> Result<Lease, Mbuf<'static>> {
        let Some(index) = self.index_of(&m) else {
            return Err(m);
        };
        let mut owner = self.owners[index]
            .take()
            .expect("a room the driver filled is owned by the port");
        let start = m.room().1 + offset; // data_off: the headroom before the frame
        let end = start + len;
        assert!(end <= MBUF_DATA_ROOM as usize, "a datagram within its room");
        // The driver wrote [data_off, data_off + frame) while DPDK had the room: sealed, it
        // stays as written while leased.
        owner.seal(end);
        let lease = pools.lease(&owner, start, len);
        pools.release(owner);
        assert!(self.leased[index].is_none(), "room {index} leased twice");
        self.leased[index] = Some(m);
        self.leased_count += 1;
        Ok(lease)
    }

    /// Rooms whose every lease came back: owned again, their mbufs freed to DPDK.
    pub(super) fn reclaim(&mut self, nic: &mut BufferPool) {
        while let Some(owner) = nic.acquire() {
            let index = owner.index() as usize;
            let mbuf = self.leased[index].take();
            assert!(
                mbuf.is_some(),
                "room {index} came back without being leased"
            );
            drop(mbuf); // the mbuf, and its room with it, back to the rx pool
            assert!(self.owners[index].is_none(), "room {index} owned twice");
            self.owners[index] = Some(owner);
            self.leased_count -= 1;
        }
    }

    /// After the reactor stopped: every room back to the `nic` pool, so that it is found empty
    /// when the core's pools are dropped. The driver writes no room again (memif writes only in
    /// `rx_burst`, which nobody calls any more; the mapping stays in any case).
    pub(super) fn release_all(&mut self, nic: &mut BufferPool) {
        self.reclaim(nic);
        for owner in self.owners.iter_mut().filter_map(Option::take) {
            nic.release(owner);
        }
    }

    /// The room `m` was received into, if it is one of these.
    fn index_of(&self, m: &Mbuf<'_>) -> Option<usize> {
        if m.pool_ptr() != self.pool.as_ptr().cast_const() {
            return None;
        }
        let offset = (m.room().0 as usize).checked_sub(self.base)?;
        let index = offset / ROOM_STRIDE_BYTES;
        (offset % ROOM_STRIDE_BYTES == 0 && index < self.count).then_some(index)
    }
}
