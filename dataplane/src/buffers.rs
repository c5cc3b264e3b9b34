//! A core's buffers: two pools of fixed-size buffers (small chunks for receive streams and
//! ordinary outputs, large ones for frames or outputs that do not fit a chunk), and `Body`, the
//! payload of a reply, which may live in this core's pools or in another core's.
//!
//! Pool ids encode the home core: `PoolId(core * 3 + class)`. A buffer is released only by its
//! home core; `release_body` hands back the ones that must travel home first.
//!
//! A core that owns a NIC queue whose receive buffers are carved from Carmine's memory (DPDK,
//! `dpdk::net`) has a third pool, `nic`: its buffers are the mbufs' data rooms. The port holds
//! an owner `Buf` for every room the NIC has (in the mempool or the rx ring); a received frame
//! becomes a `Lease` over its room, and once every lease is back the room is free here, which
//! tells the port to give the mbuf back to DPDK. So ops read NIC buffers as any other lease.

use crate::pool::{Buf, BufferPool, Lease, PoolId};

/// Size class of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeClass {
    Small = 0,
    Large = 1,
    /// Data rooms of a NIC queue's receive buffers (see the module comment).
    Nic = 2,
}

/// Size classes per core, for pool ids.
const CLASSES: usize = 3;

pub fn pool_id(core: usize, class: SizeClass) -> PoolId {
    PoolId(u16::try_from(core * CLASSES + class as usize).expect("core count fits u16 pool ids"))
}

pub fn home_core(pool: PoolId) -> usize {
    usize::from(pool.0) / CLASSES
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSizes {
    pub small_size_bytes: usize,
    pub small_count: u32,
    pub large_size_bytes: usize,
    pub large_count: u32,
}

/// The reply payload queued behind a reply header.
pub enum Body {
    None,
    Buf(Buf),
    Lease(Lease),
    /// Bytes that stay in the store that holds them, sent from there (no copy into a pool
    /// buffer), with their crc32c kept by the store (not computed again).
    Stored(StoredBytes),
}

impl Body {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Body::None => &[],
            Body::Buf(buf) => buf.sealed(),
            Body::Lease(lease) => lease.as_slice(),
            Body::Stored(stored) => stored.as_slice(),
        }
    }

    /// Moves stored bytes into a pool buffer, for a store about to change or free them: true
    /// when the body holds no store memory (any more), false when no buffer was free (the
    /// body is unchanged). The bytes are the same, so a crc computed over them still holds.
    pub fn copy_stored(&mut self, pools: &mut CorePools) -> bool {
        let Body::Stored(stored) = self else {
            return true;
        };
        let bytes = stored.as_slice();
        let Some(mut buf) = pools.acquire_for(bytes.len()) else {
            return false;
        };
        buf.spare_mut()[..bytes.len()].copy_from_slice(bytes);
        buf.seal(bytes.len());
        *self = Body::Buf(buf);
        true
    }

    /// The core whose pool the body must go back to; None when there is nothing to release.
    pub fn home_core(&self) -> Option<usize> {
        match self {
            Body::None | Body::Stored(_) => None,
            Body::Buf(buf) => Some(home_core(buf.pool())),
            Body::Lease(lease) => Some(home_core(lease.pool())),
        }
    }
}

/// A read-only view of bytes owned by a store on this core, and their crc32c.
///
/// Why a raw view: the store's memory outlives the op, but not every later op (an overwrite
/// changes the bytes, growing or removing an object moves or frees them), and no lifetime can
/// say "until the next mutation". So the core keeps the rule instead: before it lets the store
/// mutate anything, the transport copies every stored body not yet written into a pool buffer
/// (`TcpTransport::copy_stored_bodies`). A view never leaves its core (`home_core` is None, so
/// it never travels in a message) and releasing it is dropping it.
pub struct StoredBytes {
    ptr: *const u8,
    len: usize,
    crc: u32,
}

// SAFETY: `Body` is a field of the messages cores exchange, so it must be `Send`; a
// `StoredBytes` itself never leaves the core that made it: it has no home core, so
// `release_body` drops it rather than handing it back to travel, and the core only puts it
// in its own transport's queues (and the simulation's, on the one thread that runs it).
unsafe impl Send for StoredBytes {}

impl StoredBytes {
    /// # Safety
    /// `ptr..ptr + len` must stay readable and unchanged for as long as the value exists:
    /// the caller drops it or replaces it with a copy before the bytes can change.
    /// `crc` must be the crc32c of those bytes.
    pub unsafe fn new(ptr: *const u8, len: usize, crc: u32) -> StoredBytes {
        assert!(!ptr.is_null());
        StoredBytes { ptr, len, crc }
    }

    /// Asks the CPU to start loading the bytes into its caches, without waiting for them.
    /// For a body sent later in the pass (TCP), not for one copied at once (the datagram RPC
    /// copies it into its response when the op finishes: 64 hints per 4 KiB for nothing).
    ///
    /// Why: the kernel copies them when the reply is written, at the end of the core's pass;
    /// with a data set larger than the caches that copy waits on memory at every cache line,
    /// one block after another (40% of a 1-core memory-store randread server's cycles, in
    /// `_copy_from_iter`). Asked for when the op runs, the lines of all the pass's blocks
    /// load together while the core handles its other ops.
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            const CACHE_LINE_BYTES: usize = 64;
            // Eight lines per loop step: a one-line loop spent three bookkeeping instructions
            // per hint (267 instructions per 4 KiB block under callgrind, 10% of a read op's
            // user-space path); the hints themselves are what the loop is for.
            const LINES_PER_STEP: usize = 8;
            const STEP_BYTES: usize = CACHE_LINE_BYTES * LINES_PER_STEP;
            let mut offset = 0;
            while offset < self.len {
                let step = self.ptr.wrapping_add(offset);
                for line in 0..LINES_PER_STEP {
                    // SAFETY: SSE is part of x86-64's baseline, and a prefetch is a hint that
                    // reads nothing architecturally and never faults (the bytes are readable;
                    // a hint past their end, in the last step of a length that is not a
                    // multiple of STEP_BYTES, is a hint about an address, not a read).
                    unsafe {
                        _mm_prefetch::<_MM_HINT_T1>(
                            step.wrapping_add(line * CACHE_LINE_BYTES).cast(),
                        )
                    };
                }
                offset += STEP_BYTES;
            }
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `new`'s caller promised the bytes stay readable and unchanged while `self`
        // exists, and the returned slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn crc(&self) -> u32 {
        self.crc
    }
}

/// Buffers of each class that receive paths leave free for op outputs.
///
/// Why: a received frame holds its buffer until its op finishes, and an op at a PG's head
/// may need an output buffer of the same class before it can run. Were receive allowed the
/// last buffer, the frames queued behind such an op could hold every one, and nothing would
/// ever free one (`carmine sim --seed 93 --tight-pools` hung this way). With one left over,
/// some op can always take an output buffer; ops holding outputs are in the store or
/// replying, and finish without needing another buffer, so the reserve comes back.
pub const RX_LEAVES_FREE: u32 = 1;

pub struct CorePools {
    pub core: usize,
    pub small: BufferPool,
    pub large: BufferPool,
    /// A NIC queue's receive rooms, when this core owns such a queue.
    pub nic: Option<BufferPool>,
}

impl CorePools {
    pub fn new(core: usize, sizes: PoolSizes, hugepages: bool) -> std::io::Result<CorePools> {
        assert!(sizes.small_size_bytes <= sizes.large_size_bytes);
        assert!(
            sizes.small_count > RX_LEAVES_FREE && sizes.large_count > RX_LEAVES_FREE,
            "receive needs a buffer of each class beyond the output reserve: {sizes:?}"
        );
        Ok(CorePools {
            core,
            small: BufferPool::new(
                pool_id(core, SizeClass::Small),
                sizes.small_size_bytes,
                sizes.small_count,
                hugepages,
            )?,
            large: BufferPool::new(
                pool_id(core, SizeClass::Large),
                sizes.large_size_bytes,
                sizes.large_count,
                hugepages,
            )?,
            nic: None,
        })
    }

    /// Adds the receive rooms of this core's NIC queue (pool id `pool_id(core, Nic)`).
    pub fn attach_nic(&mut self, nic: BufferPool) {
        assert_eq!(nic.id(), pool_id(self.core, SizeClass::Nic));
        assert!(self.nic.is_none(), "one NIC pool per core");
        self.nic = Some(nic);
    }

    /// A buffer of at least `len` bytes from the smallest class that fits. None: exhausted or too big.
    pub fn acquire_for(&mut self, len: usize) -> Option<Buf> {
        self.acquire_leaving(len, 0)
    }

    /// `acquire_for`, unless no more than `keep` buffers of the class are free.
    fn acquire_leaving(&mut self, len: usize, keep: u32) -> Option<Buf> {
        if len <= self.small.buffer_size() {
            self.small.acquire_leaving(keep)
        } else if len <= self.large.buffer_size() {
            self.large.acquire_leaving(keep)
        } else {
            None
        }
    }

    /// A chunk for received bytes, unless only `RX_LEAVES_FREE` chunks are left.
    pub fn acquire_rx_small(&mut self) -> Option<Buf> {
        self.small.acquire_leaving(RX_LEAVES_FREE)
    }

    /// A large buffer for a received frame, unless only `RX_LEAVES_FREE` are left.
    pub fn acquire_rx_large(&mut self) -> Option<Buf> {
        self.large.acquire_leaving(RX_LEAVES_FREE)
    }

    /// `acquire_for` for received bytes: leaves `RX_LEAVES_FREE` of the class for outputs.
    pub fn acquire_rx_for(&mut self, len: usize) -> Option<Buf> {
        self.acquire_leaving(len, RX_LEAVES_FREE)
    }

    fn pool_of(&mut self, id: PoolId) -> &mut BufferPool {
        assert_eq!(
            home_core(id),
            self.core,
            "buffer released on a core that is not its home"
        );
        if id == self.small.id() {
            &mut self.small
        } else if id == self.large.id() {
            &mut self.large
        } else {
            self.nic
                .as_mut()
                .expect("a NIC lease comes home to its NIC pool")
        }
    }

    pub fn release(&mut self, buf: Buf) {
        self.pool_of(buf.pool()).release(buf);
    }

    pub fn release_lease(&mut self, lease: Lease) {
        self.pool_of(lease.pool()).release_lease(lease);
    }

    pub fn lease(&mut self, buf: &Buf, offset: usize, len: usize) -> Lease {
        self.pool_of(buf.pool()).lease(buf, offset, len)
    }

    /// A second lease over part of `lease` (see `BufferPool::lease_within`).
    pub fn lease_within(&mut self, lease: &Lease, offset: usize, len: usize) -> Lease {
        self.pool_of(lease.pool()).lease_within(lease, offset, len)
    }

    /// A lease over `bytes` in this core's small or large pool (see `BufferPool::lease_bytes`).
    ///
    /// # Safety
    /// As `BufferPool::lease_bytes`: bytes in this core's pools lie within sealed bytes of a
    /// live handle.
    pub unsafe fn lease_bytes(&mut self, bytes: &[u8]) -> Option<Lease> {
        // SAFETY: the caller's promise, passed on; each pool checks the bytes are its own.
        unsafe {
            self.small
                .lease_bytes(bytes)
                .or_else(|| self.large.lease_bytes(bytes))
        }
    }

    /// Releases a body that lives here; returns it when it must go back to its home core.
    pub fn release_body(&mut self, body: Body) -> Option<Body> {
        match body.home_core() {
            None => None,
            Some(core) if core != self.core => Some(body),
            Some(_) => {
                match body {
                    Body::Buf(buf) => self.release(buf),
                    Body::Lease(lease) => self.release_lease(lease),
                    Body::None | Body::Stored(_) => unreachable!("no home core"),
                }
                None
            }
        }
    }

    /// Buffers of the small and large pools in use. The NIC pool is left out: its rooms are
    /// in use by design while the NIC holds them (the port counts the ones ops hold).
    pub fn in_use(&self) -> u32 {
        self.small.in_use() + self.large.in_use()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(core: usize) -> CorePools {
        let sizes = PoolSizes {
            small_size_bytes: 4096,
            small_count: 2,
            large_size_bytes: 8192,
            large_count: 2,
        };
        CorePools::new(core, sizes, false).unwrap()
    }

    #[test]
    fn pool_ids_name_their_core_and_class() {
        for core in [0, 1, 7] {
            for class in [SizeClass::Small, SizeClass::Large, SizeClass::Nic] {
                assert_eq!(home_core(pool_id(core, class)), core, "{class:?}");
            }
        }
        assert_ne!(pool_id(1, SizeClass::Small), pool_id(0, SizeClass::Nic));
    }

    /// A NIC room leased to an op comes back to the `nic` pool (not small or large), and the
    /// room is free there once its last lease is back: what tells the port to return the mbuf.
    #[test]
    fn nic_leases_come_home_to_the_nic_pool() {
        let mut pools = pools(1);
        let mut nic = BufferPool::new(pool_id(1, SizeClass::Nic), 12288, 2, false).unwrap();
        let mut owner = nic.acquire().unwrap();
        owner.spare_mut()[..9].copy_from_slice(b"hdr+frame");
        pools.attach_nic(nic);
        owner.seal(9);
        let datagram = pools.lease(&owner, 0, 9);
        let frame = pools.lease_within(&datagram, 4, 5);
        pools.release(owner);
        assert_eq!(frame.as_slice(), b"frame");
        pools.release_lease(datagram);
        let nic = pools.nic.as_ref().unwrap();
        assert_eq!(nic.in_use(), 1, "the frame's lease keeps the room");
        pools.release_lease(frame);
        assert_eq!(
            pools.nic.as_ref().unwrap().in_use(),
            0,
            "free: the port may reclaim it"
        );
        assert_eq!(pools.in_use(), 0, "small and large untouched");
    }

    #[test]
    #[should_panic(expected = "NIC pool")]
    fn a_nic_lease_without_a_nic_pool_panics() {
        let mut pools = pools(0);
        let mut nic = BufferPool::new(pool_id(0, SizeClass::Nic), 4096, 1, false).unwrap();
        let mut owner = nic.acquire().unwrap();
        owner.seal(1);
        let lease = nic.lease(&owner, 0, 1);
        pools.release_lease(lease);
    }
}
