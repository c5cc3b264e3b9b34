//! An owned packet buffer: returns to its pool on drop.

use super::sys;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// One packet buffer, owned: a single segment, except the frames Carmine sends with their
/// payload attached in place (`chain`, `attach_external`), whose data beyond the first segment
/// only the driver reads. Dropping it returns it to its pool
/// (`rte_pktmbuf_free`); handing it to [`TxQueue::tx_burst`](super::TxQueue::tx_burst) passes
/// ownership to the driver, which frees it once sent. The data area is a byte slice.
#[derive(Debug)]
#[repr(transparent)]
pub struct Mbuf<'pool> {
    raw: NonNull<sys::rte_mbuf>,
    _pool: PhantomData<&'pool super::Mempool>,
}

impl<'pool> Mbuf<'pool> {
    /// # Safety
    /// `raw` is a valid mbuf that nobody else owns (fresh from its pool or from rx_burst), and
    /// its pool outlives `'pool`.
    pub(crate) unsafe fn from_raw(raw: NonNull<sys::rte_mbuf>) -> Mbuf<'pool> {
        Mbuf {
            raw,
            _pool: PhantomData,
        }
    }

    fn raw(&self) -> &sys::rte_mbuf {
        // SAFETY: we own a valid mbuf for our lifetime; shared access through &self.
        unsafe { self.raw.as_ref() }
    }

    /// Bytes of data in this (first and only) segment.
    pub fn len(&self) -> usize {
        self.raw().data_len as usize
    }

    /// True when the buffer holds no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Segments in the packet. Carmine accepts single-segment packets only.
    pub fn segment_count(&self) -> u16 {
        self.raw().nb_segs
    }

    /// Where this segment's data room starts (`buf_addr`) and where its data starts within it
    /// (`data_off`): for a pool over external rooms, which room the driver wrote.
    pub fn room(&self) -> (*const u8, usize) {
        let raw = self.raw();
        (raw.buf_addr as *const u8, raw.data_off as usize)
    }

    /// The pool this mbuf returns to when freed.
    pub fn pool_ptr(&self) -> *const sys::rte_mempool {
        self.raw().pool
    }

    /// Bytes that can still be appended.
    pub fn tailroom(&self) -> usize {
        // SAFETY: valid owned mbuf; the call only reads fields.
        unsafe { sys::rte_pktmbuf_tailroom(self.raw.as_ptr()) as usize }
    }

    /// The data area.
    pub fn data(&self) -> &[u8] {
        // SAFETY: mtod points at data_len initialised bytes of this segment's buffer, which we
        // own for the borrow's duration.
        unsafe {
            std::slice::from_raw_parts(
                sys::carmine_pktmbuf_mtod(self.raw.as_ptr()) as *const u8,
                self.len(),
            )
        }
    }

    /// The data area, writable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `data`, and &mut self makes the access exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(
                sys::carmine_pktmbuf_mtod(self.raw.as_ptr()) as *mut u8,
                self.len(),
            )
        }
    }

    /// Grows the data by `len` bytes at the end and returns them, or `None` if the tailroom is
    /// too small (the buffer is unchanged then).
    pub fn append(&mut self, len: usize) -> Option<&mut [u8]> {
        let len16 = u16::try_from(len).ok()?;
        // SAFETY: valid owned mbuf; append returns NULL and changes nothing if it does not fit.
        let p = unsafe { sys::rte_pktmbuf_append(self.raw.as_ptr(), len16) };
        if p.is_null() {
            return None;
        }
        // SAFETY: append made [p, p+len) part of the data area; the new bytes are uninitialised
        // in C terms but mbuf memory is plain bytes allocated by DPDK, so reading stale bytes is
        // defined; we zero them anyway so callers never see another packet's data.
        let bytes = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) };
        bytes.fill(0);
        Some(bytes)
    }

    /// Appends a copy of `bytes`; false (unchanged) when they do not fit.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> bool {
        match self.append(bytes.len()) {
            Some(target) => {
                target.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }

    /// Appends `parts` back to back, each copied once, without zeroing the room first (every
    /// appended byte is written from `parts`); false (unchanged) when they do not fit.
    pub fn extend_from_slices(&mut self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let Ok(len16) = u16::try_from(len) else {
            return false;
        };
        // SAFETY: valid owned mbuf; append returns NULL and changes nothing if it does not fit.
        let p = unsafe { sys::rte_pktmbuf_append(self.raw.as_ptr(), len16) };
        if p.is_null() {
            return false;
        }
        let mut at = p as *mut u8;
        for part in parts.iter().filter(|p| !p.is_empty()) {
            // (An empty part is skipped: a memcpy call for nothing, per packet.)
            // SAFETY: append made [p, p+len) part of this mbuf's data area, which we own
            // exclusively (&mut self); the parts' lengths sum to len, so each copy stays inside
            // it, and a caller's slice cannot overlap an mbuf we own mutably.
            unsafe {
                std::ptr::copy_nonoverlapping(part.as_ptr(), at, part.len());
                at = at.add(part.len());
            }
        }
        true
    }

    /// Points this (empty, direct) mbuf's data at `len` bytes at `bytes` outside its pool, as
    /// an external buffer whose references DPDK counts in `info` (it calls `info`'s free
    /// callback when the last goes); the data is those `len` bytes.
    ///
    /// # Safety
    /// `bytes` stay valid and unchanged, and `info` valid with its callback set, until DPDK
    /// calls that callback.
    pub unsafe fn attach_external(
        &mut self,
        bytes: *mut u8,
        len: u16,
        info: *mut sys::rte_mbuf_ext_shared_info,
    ) {
        assert!(self.is_empty() && self.segment_count() == 1);
        // With IOVA as VA the device address is the virtual one (the only case this is used
        // on: software drivers, see `net.rs`).
        // SAFETY: we own the mbuf; the caller keeps `bytes` and `info` valid as required.
        unsafe {
            sys::rte_pktmbuf_attach_extbuf(
                self.raw.as_ptr(),
                bytes.cast(),
                bytes as u64,
                len,
                info,
            );
            let p = sys::rte_pktmbuf_append(self.raw.as_ptr(), len);
            assert!(!p.is_null(), "an attached buffer holds its own length");
        }
    }

    /// Appends `tail` as the following segment(s) (`rte_pktmbuf_chain`); false (the tail
    /// dropped) when the chain would have too many segments.
    pub fn chain(&mut self, tail: Mbuf<'pool>) -> bool {
        let tail_raw = tail.raw.as_ptr();
        // SAFETY: both mbufs are ours; on success the head owns the tail (freed with it), so
        // the tail handle is forgotten; on failure nothing changed and the tail is dropped.
        let rc = unsafe { sys::rte_pktmbuf_chain(self.raw.as_ptr(), tail_raw) };
        if rc == 0 {
            std::mem::forget(tail);
            true
        } else {
            drop(tail);
            false
        }
    }

    /// Shortens the data to `len` bytes (no-op when already shorter or equal).
    pub fn truncate(&mut self, len: usize) {
        let cur = self.len();
        if len >= cur {
            return;
        }
        // SAFETY: valid owned single-segment mbuf; trimming at most data_len bytes cannot fail.
        let rc = unsafe { sys::rte_pktmbuf_trim(self.raw.as_ptr(), (cur - len) as u16) };
        debug_assert_eq!(rc, 0);
    }
}

impl AsRef<[u8]> for Mbuf<'_> {
    fn as_ref(&self) -> &[u8] {
        self.data()
    }
}

impl Drop for Mbuf<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the mbuf (never handed out twice: into_raw forgets self) and its pool
        // is alive ('pool); free returns every segment to its pool.
        unsafe { sys::rte_pktmbuf_free(self.raw.as_ptr()) }
    }
}

// An Mbuf may move to another thread (ring hop to the PG's core); DPDK mbufs carry no
// thread affinity, and freeing from another lcore goes through the pool's shared ring.
// SAFETY: exclusive ownership of the buffer, no shared interior state touched without &mut.
unsafe impl Send for Mbuf<'_> {}
