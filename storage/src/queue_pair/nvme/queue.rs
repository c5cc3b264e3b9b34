//! One NVMe submission queue and its completion queue in DMA memory, with their doorbells.
//! Used for the admin queue and for each I/O queue pair.
//!
//! The owner keeps at most `entries - 1` commands in flight, so the submission queue never
//! overflows: a command occupies a submission slot only until the controller fetches it, which
//! is before it completes. Completions are found by the phase tag, which the controller flips
//! on each pass through the completion queue.

use core::sync::atomic::{fence, Ordering};

use super::spec::{CompletionEntry, SubmissionEntry};

/// A submission/completion queue pair; see the module docs.
pub struct Queue {
    submissions: *mut SubmissionEntry,
    completions: *const CompletionEntry,
    /// Entries in each queue (both are the same size here).
    entries: u16,
    sq_tail: u16,
    /// The tail last written to the doorbell.
    sq_tail_rung: u16,
    cq_head: u16,
    /// The phase tag a new completion carries.
    phase: u16,
    /// Completions consumed since the head doorbell was last written.
    cq_unrung: u16,
    sq_doorbell: *mut u32,
    cq_doorbell: *mut u32,
}

impl Queue {
    /// A queue over `entries` submission entries at `submissions` and as many completion entries
    /// at `completions` (both zeroed), with the given doorbell registers.
    ///
    /// # Safety
    /// Both areas are zeroed, page aligned, sized for `entries`, mapped for the device's DMA,
    /// and live (with the doorbells' BAR mapping) as long as this `Queue`; nothing else
    /// writes them except the controller.
    pub unsafe fn new(
        submissions: *mut SubmissionEntry,
        completions: *const CompletionEntry,
        entries: u16,
        sq_doorbell: *mut u32,
        cq_doorbell: *mut u32,
    ) -> Queue {
        assert!(entries >= 2);
        Queue {
            submissions,
            completions,
            entries,
            sq_tail: 0,
            sq_tail_rung: 0,
            cq_head: 0,
            phase: 1,
            cq_unrung: 0,
            sq_doorbell,
            cq_doorbell,
        }
    }

    /// Writes `entry` at the tail. The doorbell is not rung: see `ring_submissions`.
    #[inline]
    pub fn push(&mut self, entry: &SubmissionEntry) {
        // SAFETY: `sq_tail < entries`, inside the submission area (`new`'s contract); the
        // owner keeps fewer than `entries` commands in flight, so the controller is not
        // reading this slot.
        unsafe {
            self.submissions
                .add(usize::from(self.sq_tail))
                .write_volatile(*entry)
        };
        self.sq_tail = if self.sq_tail + 1 == self.entries {
            0
        } else {
            self.sq_tail + 1
        };
    }

    /// Tells the controller about every entry pushed since the last call: one MMIO write for
    /// a whole batch.
    #[inline]
    pub fn ring_submissions(&mut self) {
        if self.sq_tail == self.sq_tail_rung {
            return;
        }
        // The entries must be in memory before the controller sees the new tail. On x86 stores
        // are not reordered with each other, so a compiler barrier is enough.
        fence(Ordering::Release);
        // SAFETY: the doorbell register lives as long as the queue (`new`'s contract).
        unsafe { self.sq_doorbell.write_volatile(u32::from(self.sq_tail)) };
        self.sq_tail_rung = self.sq_tail;
    }

    /// The next completion, if the controller has posted one. The head doorbell is written by
    /// `ring_completions`, once per batch.
    #[inline]
    pub fn next_completion(&mut self) -> Option<CompletionEntry> {
        // SAFETY: `cq_head < entries`, inside the completion area (`new`'s contract); the
        // controller writes it, so read it volatile.
        let slot = unsafe { self.completions.add(usize::from(self.cq_head)) };
        // SAFETY: as above; `status` is the entry's last 16 bits.
        let status = unsafe { core::ptr::addr_of!((*slot).status).read_volatile() };
        if status & 1 != self.phase {
            return None;
        }
        // Read the rest of the entry only after seeing its phase tag.
        fence(Ordering::Acquire);
        // SAFETY: as above.
        let entry = unsafe { slot.read_volatile() };
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase ^= 1;
        }
        self.cq_unrung += 1;
        Some(entry)
    }

    /// Gives the consumed completion slots back to the controller (one MMIO write).
    #[inline]
    pub fn ring_completions(&mut self) {
        if self.cq_unrung == 0 {
            return;
        }
        // SAFETY: the doorbell register lives as long as the queue (`new`'s contract).
        unsafe { self.cq_doorbell.write_volatile(u32::from(self.cq_head)) };
        self.cq_unrung = 0;
    }
}
