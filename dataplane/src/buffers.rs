//! A core's buffers: two pools of fixed-size buffers (small chunks for receive streams and
//! ordinary outputs, large ones for frames or outputs that do not fit a chunk), and `Body`, the
//! payload of a reply, which may live in this core's pools or in another core's.
//!
//! Pool ids encode the home core: `PoolId(core * 2 + class)`. A buffer is released only by its
//! home core; `release_body` hands back the ones that must travel home first.

use crate::pool::{Buf, BufferPool, Lease, PoolId};

/// Size class of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeClass {
    Small = 0,
    Large = 1,
}

pub fn pool_id(core: usize, class: SizeClass) -> PoolId {
    PoolId(u16::try_from(core * 2 + class as usize).expect("core count fits u16 pool ids"))
}

pub fn home_core(pool: PoolId) -> usize {
    usize::from(pool.0) / 2
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
}

impl Body {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Body::None => &[],
            Body::Buf(buf) => buf.sealed(),
            Body::Lease(lease) => lease.as_slice(),
        }
    }

    pub fn home_core(&self) -> Option<usize> {
        match self {
            Body::None => None,
            Body::Buf(buf) => Some(home_core(buf.pool())),
            Body::Lease(lease) => Some(home_core(lease.pool())),
        }
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
        })
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
        } else {
            &mut self.large
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

    /// Releases a body that lives here; returns it when it must go back to its home core.
    pub fn release_body(&mut self, body: Body) -> Option<Body> {
        match body.home_core() {
            None => None,
            Some(core) if core != self.core => Some(body),
            Some(_) => {
                match body {
                    Body::Buf(buf) => self.release(buf),
                    Body::Lease(lease) => self.release_lease(lease),
                    Body::None => unreachable!(),
                }
                None
            }
        }
    }

    pub fn in_use(&self) -> u32 {
        self.small.in_use() + self.large.in_use()
    }
}
