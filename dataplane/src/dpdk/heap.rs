//! The EAL's heap (`rte_malloc`), for memory a zero-copy memif peer must be able to read: the
//! memory store's objects, when replies are sent from them in place (`net.rs`, "Send").
//!
//! Why it is a process-wide switch: the memory store allocates its objects through the global
//! allocator, and Carmine's (`src/main.rs`) sends large allocations here once [`enable`] was
//! called, so no store code knows about DPDK. Large only: what a reply can be sent from, and
//! few enough calls that DPDK's heap lock is not on any per-op path.

use super::{sys, Eal};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once the EAL runs and a zero-copy port wants store memory it can send from.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Set when an allocation here failed (the heap is full): later ones go to the system too.
static EXHAUSTED: AtomicBool = AtomicBool::new(false);

/// Allocations of at least this many bytes are the EAL heap's (when enabled).
pub const LARGE_ALLOCATION_BYTES: usize = 256 << 10;

/// From now on, large allocations come from the EAL heap while it has room.
pub fn enable(_eal: &Eal) {
    ENABLED.store(true, Ordering::Release);
}

/// Whether large allocations may come from the EAL heap now.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire) && !EXHAUSTED.load(Ordering::Relaxed)
}

/// `size` bytes aligned to `align` from the EAL heap, or null (full: the caller uses the
/// system allocator, and so do later calls, with one log line).
///
/// # Safety
/// [`enable`] was called (the EAL runs); `align` is a power of two.
pub unsafe fn alloc(size: usize, align: usize) -> *mut u8 {
    debug_assert!(align.is_power_of_two());
    // SAFETY: the EAL runs (caller); a null type name is allowed; the heap is thread-safe.
    let p = unsafe { sys::rte_malloc(std::ptr::null(), size, align as u32) };
    if p.is_null() && !EXHAUSTED.swap(true, Ordering::Relaxed) {
        // Not `log`: this runs inside the global allocator, which logging may call.
        eprintln!(
            "carmine: the EAL heap has no {size} bytes left: large allocations use the system \
             allocator from now on (replies from them are copied; give the EAL more with -m)"
        );
    }
    p.cast()
}

/// Whether `ptr` is EAL memory (and so was allocated here, if it came from the global
/// allocator). Cheap: a look through the EAL's few memory-segment lists.
pub fn owns(ptr: *const u8) -> bool {
    if !ENABLED.load(Ordering::Acquire) {
        return false;
    }
    // SAFETY: the EAL runs (enabled); the call only reads its memory configuration.
    !unsafe { sys::rte_mem_virt2memseg_list(ptr.cast()) }.is_null()
}

/// Gives back what [`alloc`] returned.
///
/// # Safety
/// `ptr` came from [`alloc`] and is not used again.
pub unsafe fn free(ptr: *mut u8) {
    // SAFETY: the caller's promise.
    unsafe { sys::rte_free(ptr.cast()) }
}

/// Whether `a` and `b` lie in one memory-segment list of the EAL (so in one memif region of a
/// zero-copy port: memif maps the EAL's memory list by list).
pub fn same_memory(a: *const u8, b: *const u8) -> bool {
    if !ENABLED.load(Ordering::Acquire) {
        return false;
    }
    // SAFETY: the EAL runs (enabled); the calls only read its memory configuration.
    let (la, lb) = unsafe {
        (
            sys::rte_mem_virt2memseg_list(a.cast()),
            sys::rte_mem_virt2memseg_list(b.cast()),
        )
    };
    !la.is_null() && la == lb
}
