//! Per-core pools of fixed-size, 4 KiB-aligned buffers, with single-owner handles (`Buf`) and
//! read-only leases (`Lease`) over their sealed bytes.
//!
//! Why: the data path must not allocate. Every receive buffer, every frame an op reads and every
//! block handed to the disk comes from a pool that took all its memory once, at start, from one
//! anonymous mapping (huge pages when available): aligned for O_DIRECT and NVMe DMA, and never
//! returned to the allocator. A frame parsed in place must stay readable while the connection that
//! received it moves on to a new buffer, so a buffer is reference counted: the owner holds one
//! count and every lease one more; the buffer is free only when all are gone.
//!
//! Invariants:
//! - A buffer is exactly one of: free (refcount 0, its index on the free list once), or in use
//!   (refcount >= 1: the owner's count while a `Buf` is live, plus one per live `Lease`).
//! - Refcounts and the free list belong to the home core: only `BufferPool` methods touch them,
//!   through `&mut self`. Handles may travel to other cores, but must come back home (by a ring
//!   message) to be released.
//! - Bytes `[0, sealed)` of a buffer are immutable while any handle exists: leases cover only
//!   sealed bytes, and `Buf::spare_mut` only `[sealed, capacity)`. `sealed` only grows until the
//!   buffer is free again.
//! - Handles hold a raw pointer, not an `Arc`, to keep them small and free of atomic traffic. The
//!   memory must outlive every handle. The contract is that every core keeps every pool's
//!   `memory()` alive until all cores stopped. As a backstop, a pool dropped while any buffer is
//!   in use leaks its mapping rather than unmapping memory a handle still points into.
//! - Dropping a `Buf` or `Lease` instead of releasing it leaks that buffer (its refcount never
//!   reaches 0). There is no `Drop` check: a panic in `drop` aborts, and a handle on another core
//!   cannot be released from there anyway. Tests check `in_use()` returns to 0.

use core::ptr::NonNull;
use std::io;
use std::sync::Arc;

/// Alignment of every buffer, in bytes: what O_DIRECT needs for 4 KiB-sector devices and the
/// memory page size NVMe PRP entries describe.
pub const BUFFER_ALIGNMENT_BYTES: usize = 4096;

/// Largest buffer a pool may hold, in bytes. Room for a receive buffer holding a whole frame
/// with a maximal payload; and `Buf` stores its capacity as `u32`.
pub const BUFFER_SIZE_MAX_BYTES: usize = 1 << 30;

/// Most buffers one pool may hold, in buffers.
pub const BUFFER_COUNT_MAX: u32 = 1 << 20;

/// Largest mapping one pool may take, in bytes.
pub const POOL_MEMORY_MAX_BYTES: usize = 1 << 36;

/// Size of the huge pages requested (explicitly, with `MAP_HUGE_2MB`), in bytes. A hugetlb
/// mapping's length must be a multiple of it for `munmap` to accept it.
const HUGE_PAGE_SIZE_BYTES: usize = 2 << 20;

// Pool sizes are tens of GiB per core; pointer offsets into a mapping must fit `isize`.
const _: () = assert!(usize::BITS >= 64);
const _: () = assert!(BUFFER_ALIGNMENT_BYTES.is_power_of_two());
const _: () = assert!(is_aligned(BUFFER_SIZE_MAX_BYTES, BUFFER_ALIGNMENT_BYTES));
const _: () = assert!(BUFFER_SIZE_MAX_BYTES <= u32::MAX as usize);
// Buffer indices are `u32`, and `u32::MAX` is never a valid index.
const _: () = assert!(BUFFER_COUNT_MAX < u32::MAX);
const _: () = assert!(is_aligned(POOL_MEMORY_MAX_BYTES, HUGE_PAGE_SIZE_BYTES));
const _: () = assert!(POOL_MEMORY_MAX_BYTES <= isize::MAX as usize);
// Buffers are carved at multiples of `buffer_size` from a page-aligned base; huge pages keep that.
const _: () = assert!(is_aligned(HUGE_PAGE_SIZE_BYTES, BUFFER_ALIGNMENT_BYTES));

/// Whether `value` is a multiple of `alignment`, a power of two. (`usize::is_multiple_of` would
/// need Rust 1.87; the workspace supports 1.80.)
const fn is_aligned(value: usize, alignment: usize) -> bool {
    assert!(alignment.is_power_of_two());
    value & (alignment - 1) == 0
}

/// Identity of a pool. The reactor encodes the core and the size class in it, so it is unique
/// across the process.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PoolId(pub u16);

/// One anonymous mapping holding every buffer of one pool; unmapped on drop (unless the memory
/// is someone else's: `BufferPool::over_memory`).
///
/// Shared through an `Arc` so that every core can keep every pool's memory alive until all cores
/// stopped, whatever order they stop in (handles on other cores point into it), and so that the
/// region can later be registered for DMA for as long as it exists.
pub struct PoolMemory {
    base: NonNull<u8>,
    size: usize,
    hugepage_backed: bool,
    /// Mapped here (and so unmapped on drop), rather than lent for the process's life.
    owned: bool,
}

// SAFETY: `PoolMemory` only records where the mapping is; it never reads or writes the bytes
// (access goes through `BufferPool` and its handles, which uphold their own invariants), and
// `munmap` may be called from any thread.
unsafe impl Send for PoolMemory {}
// SAFETY: as above; `&PoolMemory` exposes only the address, size and backing.
unsafe impl Sync for PoolMemory {}

impl PoolMemory {
    /// Maps `size` bytes, trying 2 MiB huge pages first when asked and falling back to normal
    /// pages (huge pages are a reservation the host may not have made).
    fn map(size: usize, hugepages: bool) -> io::Result<PoolMemory> {
        assert!(size > 0);
        assert!(is_aligned(size, BUFFER_ALIGNMENT_BYTES));
        assert!(size <= POOL_MEMORY_MAX_BYTES);

        if hugepages {
            let size_huge = size.next_multiple_of(HUGE_PAGE_SIZE_BYTES);
            match mmap_anonymous(size_huge, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB) {
                Ok(base) => {
                    return Ok(PoolMemory {
                        base,
                        size: size_huge,
                        hugepage_backed: true,
                        owned: true,
                    })
                }
                Err(error) => log::info!(
                    "huge pages unavailable for a {size_huge} byte pool ({error}), using normal pages"
                ),
            }
        }
        let base = mmap_anonymous(size, 0)?;
        Ok(PoolMemory {
            base,
            size,
            hugepage_backed: false,
            owned: true,
        })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *const u8 {
        self.base.as_ptr()
    }

    /// Length of the mapping, in bytes: at least `buffer_size * buffer_count`, rounded up to the
    /// huge page size when huge-page backed.
    pub fn size_bytes(&self) -> usize {
        self.size
    }

    pub fn hugepage_backed(&self) -> bool {
        self.hugepage_backed
    }
}

impl Drop for PoolMemory {
    fn drop(&mut self) {
        if !self.owned {
            return; // lent for the process's life (`BufferPool::over_memory`)
        }
        // SAFETY: `base` and `size` are exactly what `mmap` returned and was given; this is the
        // last reference to the mapping (the `Arc` is gone), and no handle points into it: a pool
        // with buffers in use leaks its `Arc` instead of letting it reach here.
        let result = unsafe { libc::munmap(self.base.as_ptr().cast(), self.size) };
        // Fails only if (base, size) is not our mapping, i.e. this struct was corrupted.
        assert_eq!(result, 0, "munmap: {}", io::Error::last_os_error());
    }
}

/// Maps `size` bytes of zeroed, populated, private anonymous memory.
fn mmap_anonymous(size: usize, flags_extra: libc::c_int) -> io::Result<NonNull<u8>> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | flags_extra;
    // SAFETY: an anonymous mapping at an address of the kernel's choosing (null hint, no
    // MAP_FIXED) cannot overlap or alter any memory that Rust code already references.
    let base = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = NonNull::new(base.cast::<u8>()).expect("mmap returned null without MAP_FIXED");
    assert!(is_aligned(base.as_ptr() as usize, BUFFER_ALIGNMENT_BYTES));
    Ok(base)
}

/// Unique owner of one buffer. Not `Clone`/`Copy`; `Send`: moving it moves ownership to another
/// core. Must go back to its pool's `release`; dropping it leaks the buffer.
#[must_use = "a Buf must be returned with BufferPool::release; dropping it leaks the buffer"]
#[derive(Debug)]
pub struct Buf {
    ptr: NonNull<u8>,
    capacity: u32,
    sealed: u32,
    pool: PoolId,
    index: u32,
}

// SAFETY: a `Buf` is the only handle that may write its buffer (`spare_mut`, through `&mut self`),
// and what it shares with leases (`[0, sealed)`) is immutable, so moving it to another thread
// moves the exclusive write access with it. The memory outlives it (module invariant). It never
// touches the pool's refcounts: only the home pool does, once the handle is back.
unsafe impl Send for Buf {}

impl Buf {
    pub fn pool(&self) -> PoolId {
        self.pool
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Bytes `[0, sealed)`: immutable from now on, may be leased to readers.
    #[inline]
    pub fn sealed(&self) -> &[u8] {
        debug_assert!(self.sealed <= self.capacity);
        // SAFETY: `ptr` is valid for `capacity` initialized bytes (anonymous mappings start
        // zeroed) while the memory lives, which it does while this handle exists; bytes below
        // `sealed` are never written while any handle exists, so shared access is sound.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.sealed as usize) }
    }

    pub fn sealed_len(&self) -> usize {
        self.sealed as usize
    }

    /// Bytes `[sealed, capacity)`: writable only through the unique owner. Disjoint from every
    /// lease (leases cover only sealed bytes), so handing out `&mut` here is sound.
    #[inline]
    pub fn spare_mut(&mut self) -> &mut [u8] {
        debug_assert!(self.sealed <= self.capacity);
        // SAFETY: `[sealed, capacity)` lies inside the buffer, which is valid and initialized
        // while this handle exists. No lease covers it (leases are taken only over sealed bytes
        // and `sealed` never shrinks while the buffer is in use), no other `Buf` for this buffer
        // exists (acquire hands out a buffer only at refcount 0), and `&mut self` excludes
        // `sealed()` borrows of this handle: the slice is exclusive.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(self.sealed as usize),
                (self.capacity - self.sealed) as usize,
            )
        }
    }

    /// Marks `n` more bytes (written into `spare_mut`) as sealed: from now on they are immutable
    /// and may be leased.
    #[inline]
    pub fn seal(&mut self, n: usize) {
        let spare = (self.capacity - self.sealed) as usize;
        assert!(n <= spare, "sealing {n} bytes with only {spare} spare");
        // Cannot overflow: n <= spare <= capacity <= u32::MAX.
        self.sealed += n as u32;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

/// A read-only view of a sealed range of a buffer, holding one reference count. Not `Clone`;
/// `Send`. Must go back to its pool's `release_lease`; dropping it leaks the buffer.
#[must_use = "a Lease must be returned with BufferPool::release_lease; dropping it leaks the buffer"]
#[derive(Debug)]
pub struct Lease {
    ptr: NonNull<u8>,
    len: u32,
    pool: PoolId,
    index: u32,
}

// SAFETY: a lease only reads bytes that are sealed, hence never written while it exists, and its
// count keeps the buffer from being reused; the memory outlives it (module invariant). It never
// touches the pool's refcounts: only the home pool does, once the lease is back.
unsafe impl Send for Lease {}

impl Lease {
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `[ptr, ptr + len)` was checked to lie within the sealed bytes of a live buffer
        // when the lease was made; those bytes are immutable and the buffer is not reused while
        // this lease holds its count.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len as usize) }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pool(&self) -> PoolId {
        self.pool
    }

    pub fn index(&self) -> u32 {
        self.index
    }
}

/// The buffers of one size class on one core. Owned and used by its home core only; the handles
/// it gives out may travel.
pub struct BufferPool {
    id: PoolId,
    /// Copy of `memory.base`, so the hot path does not chase the `Arc`.
    base: NonNull<u8>,
    buffer_size: u32,
    buffer_count: u32,
    /// Indexed by buffer index: 0 when free, else 1 (owner, while live) + live leases.
    refcounts: Vec<u32>,
    /// Stack of free buffer indices, preallocated to `buffer_count` so pushing never allocates.
    /// LIFO, so the most recently released (cache-warm) buffer is reused first.
    free: Vec<u32>,
    memory: Arc<PoolMemory>,
}

// SAFETY: the pool exclusively owns its refcounts and free list; `base` points into the mapping
// that its own `Arc<PoolMemory>` keeps alive. Moving the pool moves its home to the new thread
// (e.g. built at start-up, then handed to its core).
unsafe impl Send for BufferPool {}

impl BufferPool {
    /// Takes all memory the pool will ever use: `buffer_count` buffers of `buffer_size` bytes.
    /// `buffer_size` must be a non-zero multiple of `BUFFER_ALIGNMENT_BYTES` up to
    /// `BUFFER_SIZE_MAX_BYTES`, and `buffer_count` in `1..=BUFFER_COUNT_MAX`; these come from
    /// configuration, so a violation is `InvalidInput` rather than a panic.
    pub fn new(
        id: PoolId,
        buffer_size: usize,
        buffer_count: u32,
        hugepages: bool,
    ) -> io::Result<BufferPool> {
        let size = Self::memory_bytes(buffer_size, buffer_count)?;
        let memory = PoolMemory::map(size, hugepages)?;
        Ok(Self::over(id, buffer_size, buffer_count, memory))
    }

    /// A pool over memory someone else keeps for the rest of the process (DPDK's, for rx
    /// rooms a zero-copy memif peer writes into: see `dpdk::rooms`), which must hold
    /// `buffer_count` buffers of `buffer_size` bytes and start `BUFFER_ALIGNMENT_BYTES`-aligned.
    /// Shape errors as in [`BufferPool::new`].
    ///
    /// # Safety
    /// `[base, base + len)` must be readable and writable for the rest of the process and
    /// reached by nothing but this pool and its handles (and a driver writing rooms the caller
    /// hands it, under the caller's own protocol).
    pub unsafe fn over_memory(
        id: PoolId,
        buffer_size: usize,
        buffer_count: u32,
        base: NonNull<u8>,
        len: usize,
    ) -> io::Result<BufferPool> {
        let size = Self::memory_bytes(buffer_size, buffer_count)?;
        if len < size || !is_aligned(base.as_ptr() as usize, BUFFER_ALIGNMENT_BYTES) {
            return Err(invalid_input(format!(
                "{len} bytes at {base:p} cannot hold {buffer_count} aligned buffers of \
                 {buffer_size} bytes"
            )));
        }
        let memory = PoolMemory {
            base,
            size: len,
            hugepage_backed: false,
            owned: false,
        };
        Ok(Self::over(id, buffer_size, buffer_count, memory))
    }

    /// Bytes of memory `buffer_count` buffers of `buffer_size` take, or why that shape is
    /// refused.
    fn memory_bytes(buffer_size: usize, buffer_count: u32) -> io::Result<usize> {
        if buffer_size == 0
            || !is_aligned(buffer_size, BUFFER_ALIGNMENT_BYTES)
            || buffer_size > BUFFER_SIZE_MAX_BYTES
        {
            return Err(invalid_input(format!(
                "buffer size {buffer_size} must be a non-zero multiple of {BUFFER_ALIGNMENT_BYTES} \
                 up to {BUFFER_SIZE_MAX_BYTES} bytes"
            )));
        }
        if buffer_count == 0 || buffer_count > BUFFER_COUNT_MAX {
            return Err(invalid_input(format!(
                "buffer count {buffer_count} must be in 1..={BUFFER_COUNT_MAX}"
            )));
        }
        // Cannot overflow on 64 bits: both factors are bounded far below 2^32.
        let size = buffer_size * buffer_count as usize;
        if size > POOL_MEMORY_MAX_BYTES {
            return Err(invalid_input(format!(
                "pool of {size} bytes exceeds {POOL_MEMORY_MAX_BYTES} bytes"
            )));
        }
        Ok(size)
    }

    fn over(id: PoolId, buffer_size: usize, buffer_count: u32, memory: PoolMemory) -> BufferPool {
        let memory = Arc::new(memory);
        let size = buffer_size * buffer_count as usize;

        assert!(memory.size_bytes() >= size);
        let mut free = Vec::with_capacity(buffer_count as usize);
        // Reversed so that buffer 0 is handed out first.
        free.extend((0..buffer_count).rev());
        assert_eq!(free.len(), free.capacity());

        BufferPool {
            id,
            base: memory.base,
            buffer_size: buffer_size as u32,
            buffer_count,
            refcounts: vec![0; buffer_count as usize],
            free,
            memory,
        }
    }

    pub fn id(&self) -> PoolId {
        self.id
    }

    pub fn buffer_size(&self) -> usize {
        self.buffer_size as usize
    }

    pub fn buffer_count(&self) -> u32 {
        self.buffer_count
    }

    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    /// Buffers with an owner or at least one lease.
    pub fn in_use(&self) -> u32 {
        self.buffer_count - self.free_count()
    }

    pub fn hugepage_backed(&self) -> bool {
        self.memory.hugepage_backed()
    }

    /// The mapping behind this pool. Every core keeps a clone of every pool's memory until all
    /// cores stopped, because handles into it may be anywhere.
    pub fn memory(&self) -> Arc<PoolMemory> {
        Arc::clone(&self.memory)
    }

    /// A free buffer with refcount 1 and nothing sealed, or `None` when exhausted: the caller
    /// applies back-pressure. Never allocates.
    #[inline]
    pub fn acquire(&mut self) -> Option<Buf> {
        let index = self.free.pop()?;
        assert!(
            index < self.buffer_count,
            "free list corrupt: index {index}"
        );
        let refcount = &mut self.refcounts[index as usize];
        // A free-listed buffer still referenced would be handed to a second owner.
        assert_eq!(
            *refcount, 0,
            "free list corrupt: buffer {index} is referenced"
        );
        *refcount = 1;
        Some(Buf {
            ptr: self.buffer_ptr(index),
            capacity: self.buffer_size,
            sealed: 0,
            pool: self.id,
            index,
        })
    }

    /// `acquire`, unless no more than `keep` buffers are free (they stay for other uses).
    #[inline]
    pub fn acquire_leaving(&mut self, keep: u32) -> Option<Buf> {
        if self.free_count() <= keep {
            return None;
        }
        self.acquire()
    }

    /// Drops the owner's reference; the buffer returns to the free list when no lease remains.
    #[inline]
    pub fn release(&mut self, buf: Buf) {
        self.assert_owns(buf.pool, buf.index);
        assert_eq!(
            buf.ptr,
            self.buffer_ptr(buf.index),
            "buffer {} of another pool",
            buf.index
        );
        assert_eq!(buf.capacity, self.buffer_size);
        assert!(buf.sealed <= buf.capacity);
        self.unref(buf.index);
    }

    /// A lease over sealed bytes `[offset, offset + len)` of `buf`; adds one reference.
    #[inline]
    pub fn lease(&mut self, buf: &Buf, offset: usize, len: usize) -> Lease {
        self.assert_owns(buf.pool, buf.index);
        assert_eq!(
            buf.ptr,
            self.buffer_ptr(buf.index),
            "buffer {} of another pool",
            buf.index
        );
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|end| end <= buf.sealed_len()),
            "lease [{offset}, +{len}) beyond sealed length {}",
            buf.sealed_len()
        );

        let refcount = &mut self.refcounts[buf.index as usize];
        // The owner's live `Buf` holds a count, so 0 means the handle is stale.
        assert!(*refcount > 0, "lease of free buffer {}", buf.index);
        *refcount = refcount.checked_add(1).expect("refcount overflow");

        Lease {
            // SAFETY: offset + len <= sealed <= capacity, so the result stays within the buffer
            // (or one past its end for an empty lease at the end), and so non-null.
            ptr: unsafe { buf.ptr.add(offset) },
            // Cannot truncate: len <= capacity <= u32::MAX.
            len: len as u32,
            pool: self.id,
            index: buf.index,
        }
    }

    /// A lease over bytes `[offset, offset + len)` of an existing lease (a frame inside a
    /// received datagram, say); adds one reference to the same buffer. The two are released
    /// independently.
    #[inline]
    pub fn lease_within(&mut self, lease: &Lease, offset: usize, len: usize) -> Lease {
        self.assert_owns(lease.pool, lease.index);
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|end| end <= lease.len()),
            "lease [{offset}, +{len}) beyond the {}-byte lease it is taken from",
            lease.len
        );
        let refcount = &mut self.refcounts[lease.index as usize];
        assert!(*refcount > 0, "lease of free buffer {}", lease.index);
        *refcount = refcount.checked_add(1).expect("refcount overflow");
        Lease {
            // SAFETY: offset + len <= lease.len, and the lease lies within sealed bytes of its
            // live buffer, so the result does too (or is one past its end when empty).
            ptr: unsafe { lease.ptr.add(offset) },
            // Cannot truncate: len <= lease.len, a u32.
            len: len as u32,
            pool: self.id,
            index: lease.index,
        }
    }

    /// A lease over `bytes`, which lie in one of this pool's buffers (None when they do not):
    /// for a sender that has only a slice of a response it holds and must keep those bytes
    /// alive past the response's own lease (a NIC sending them in place). Adds one reference.
    ///
    /// # Safety
    /// If `bytes` lie in one of this pool's buffers, they must lie within sealed bytes of a live
    /// handle (`Buf` or `Lease`) of it, so that they stay immutable while the new lease exists.
    #[inline]
    pub unsafe fn lease_bytes(&mut self, bytes: &[u8]) -> Option<Lease> {
        let start = bytes.as_ptr() as usize;
        let base = self.base.as_ptr() as usize;
        let offset = start.checked_sub(base)?;
        let index = offset / self.buffer_size as usize;
        if index >= self.buffer_count as usize {
            return None;
        }
        let within = offset % self.buffer_size as usize;
        assert!(
            within + bytes.len() <= self.buffer_size as usize,
            "{} bytes at {within} cross the end of buffer {index}",
            bytes.len()
        );
        let refcount = &mut self.refcounts[index];
        assert!(*refcount > 0, "bytes of free buffer {index}");
        *refcount = refcount.checked_add(1).expect("refcount overflow");
        Some(Lease {
            // SAFETY: (caller) the bytes are a live slice inside buffer `index`: non-null.
            ptr: unsafe { NonNull::new_unchecked(bytes.as_ptr().cast_mut()) },
            // Cannot truncate: within a buffer, whose size is a u32.
            len: bytes.len() as u32,
            pool: self.id,
            index: index as u32,
        })
    }

    /// Drops one lease's reference; frees the buffer at 0.
    #[inline]
    pub fn release_lease(&mut self, lease: Lease) {
        self.assert_owns(lease.pool, lease.index);
        let start = self.buffer_ptr(lease.index).as_ptr() as usize;
        let lease_start = lease.ptr.as_ptr() as usize;
        assert!(
            lease_start >= start
                && lease_start + lease.len as usize <= start + self.buffer_size as usize,
            "lease of buffer {} of another pool",
            lease.index
        );
        self.unref(lease.index);
    }

    #[inline]
    fn assert_owns(&self, pool: PoolId, index: u32) {
        assert_eq!(
            pool, self.id,
            "handle of pool {pool:?} returned to pool {:?}",
            self.id
        );
        assert!(
            index < self.buffer_count,
            "buffer index {index} out of range"
        );
    }

    #[inline]
    fn unref(&mut self, index: u32) {
        let refcount = &mut self.refcounts[index as usize];
        assert!(*refcount > 0, "double release of buffer {index}");
        *refcount -= 1;
        if *refcount == 0 {
            // Each buffer is on the free list at most once, so there is always room and the
            // push never reallocates.
            assert!(
                self.free.len() < self.buffer_count as usize,
                "free list overflow"
            );
            debug_assert_eq!(self.free.capacity(), self.buffer_count as usize);
            self.free.push(index);
        }
    }

    #[inline]
    fn buffer_ptr(&self, index: u32) -> NonNull<u8> {
        debug_assert!(index < self.buffer_count);
        // SAFETY: index < buffer_count, so the offset is below buffer_size * buffer_count <=
        // mapping size <= isize::MAX: it stays within the mapping.
        unsafe { self.base.add(index as usize * self.buffer_size as usize) }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        let in_use = self.in_use();
        if in_use > 0 {
            // A handle somewhere still points into the mapping: unmapping it would turn a leak
            // into a use-after-free. Keep the mapping forever instead.
            log::warn!(
                "pool {:?} dropped with {in_use} buffers in use; leaking its memory",
                self.id
            );
            core::mem::forget(Arc::clone(&self.memory));
        }
    }
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests;
