//! The controller reset as a state machine that the queue pairs step from their polls, so
//! that waiting for the controller (CSTS.RDY following CC.EN, up to CAP.TO each way) never
//! stalls a reactor:
//!
//! `Ready` -> (`start`: CC.EN = 0, generation bumped) -> `Disabling` -> (CSTS.RDY = 0: the
//! controller touches no host memory any more; a fresh admin queue is programmed, CC.EN = 1)
//! -> `Enabling` -> (CSTS.RDY = 1; Set Features, number of queues) -> `Ready`. A step past
//! CAP.TO, fatal status, or a refused Set Features ends in `Failed`, for good.
//!
//! Every step runs under the admin lock, taken with `try_lock` from the poll path (a queue
//! pair that finds it held steps at its next poll) and with `lock` by the blocking `reset`.
//! The phase is published in an atomic for the queue pairs: they settle their requests only
//! once the controller is disabled (not `Disabling`), and re-create their I/O queue once it
//! is `Ready` (see `recovery.rs`).

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{error, program_admin_queue, Admin, NvmeController};
use crate::queue_pair::nvme::spec::{
    CC_ENABLE, CSTS_FATAL, CSTS_READY, PAGE_SIZE_BYTES, REG_CC, REG_CSTS,
};

/// Where the controller is in a reset; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ResetPhase {
    /// Enabled, admin queue usable, I/O queues may be created.
    Ready = 0,
    /// CC.EN cleared, CSTS.RDY not yet: the controller may still be reading or writing.
    Disabling = 1,
    /// Disabled (nothing of ours is in its hands); enabled again, not yet ready.
    Enabling = 2,
    /// A reset failed: the controller is unusable until the process reopens it.
    Failed = 3,
}

impl ResetPhase {
    pub(super) fn from_u8(value: u8) -> ResetPhase {
        match value {
            0 => ResetPhase::Ready,
            1 => ResetPhase::Disabling,
            2 => ResetPhase::Enabling,
            3 => ResetPhase::Failed,
            _ => unreachable!("reset phase {value}"),
        }
    }
}

impl NvmeController {
    /// Resets the controller now and waits until it is done (for tests and operators; the
    /// poll path uses `start_reset` and `step_reset`). Every queue pair on it fails what it
    /// has in flight (`IoError::ControllerReset`) and re-creates its queue at a later poll.
    pub fn reset(&self) -> io::Result<()> {
        let mut admin = self.admin.lock().expect("admin queue lock");
        self.start_locked(&mut admin, self.generation());
        while matches!(
            self.reset_phase(),
            ResetPhase::Disabling | ResetPhase::Enabling
        ) {
            std::thread::sleep(Duration::from_millis(1));
            self.step_locked(&mut admin);
        }
        match self.reset_phase() {
            ResetPhase::Failed => Err(error(format!(
                "{}: reset failed, the controller is unusable (see the log)",
                self.pci_address()
            ))),
            _ => Ok(()),
        }
    }

    /// Where the controller is in a reset (lock-free: one shared, rarely written byte).
    pub fn reset_phase(&self) -> ResetPhase {
        ResetPhase::from_u8(self.reset_phase.load(Ordering::Acquire))
    }

    /// Starts a reset unless one started since `seen_generation` (another queue pair got
    /// there first) or the admin lock is held (returns false: try again later). Never waits.
    pub(in crate::queue_pair::nvme) fn start_reset(&self, seen_generation: u64) -> bool {
        let Some(mut admin) = self.try_admin() else {
            return false;
        };
        self.start_locked(&mut admin, seen_generation);
        true
    }

    /// Advances a reset in progress as far as the controller allows now. Never waits: not
    /// for the admin lock (held elsewhere: nothing done), not for the controller.
    pub(in crate::queue_pair::nvme) fn step_reset(&self) {
        if !matches!(
            self.reset_phase(),
            ResetPhase::Disabling | ResetPhase::Enabling
        ) {
            return;
        }
        if let Some(mut admin) = self.try_admin() {
            self.step_locked(&mut admin);
        }
    }

    fn start_locked(&self, admin: &mut Admin, seen_generation: u64) {
        if self.generation() != seen_generation || self.reset_phase() != ResetPhase::Ready {
            return;
        }
        log::warn!("nvme {}: resetting the controller", self.pci_address());
        self.bar
            .write32(REG_CC, self.bar.read32(REG_CC) & !CC_ENABLE);
        admin.phase_since = Instant::now();
        self.reset_phase
            .store(ResetPhase::Disabling as u8, Ordering::Release);
        // Bumped now: every queue pair stops ringing its doorbells at once, and settles its
        // requests when the controller is disabled. The Aborts on the old admin queue are
        // gone: their tickets read `Lost`.
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        admin.aborts.clear(generation);
        self.step_locked(admin);
    }

    fn step_locked(&self, admin: &mut Admin) {
        let address = self.pci_address();
        let csts = self.bar.read32(REG_CSTS);
        let elapsed = admin.phase_since.elapsed();
        match self.reset_phase() {
            ResetPhase::Ready | ResetPhase::Failed => {}
            ResetPhase::Disabling if csts & CSTS_READY == 0 => {
                // Disabled: the controller no longer reads or writes any queue. Start the
                // admin queue over from zeroed memory.
                // SAFETY: the first two pages of `admin.memory` are the admin SQ and CQ,
                // which nobody else accesses now (we hold the lock; the controller is
                // disabled; `admin.queue` is replaced below before any use).
                unsafe { core::ptr::write_bytes(admin.memory.ptr(), 0, 2 * PAGE_SIZE_BYTES) };
                admin.queue = program_admin_queue(&self.bar, &admin.memory);
                admin.next_command_id = 0;
                admin.phase_since = Instant::now();
                self.reset_phase
                    .store(ResetPhase::Enabling as u8, Ordering::Release);
            }
            ResetPhase::Disabling => {
                if elapsed > self.ready_timeout {
                    self.fail_reset(format!(
                        "not disabled after {:?} (CSTS {csts:#x})",
                        self.ready_timeout
                    ));
                }
            }
            ResetPhase::Enabling if csts & CSTS_FATAL != 0 => {
                self.fail_reset(format!("fatal status while enabling (CSTS {csts:#x})"));
            }
            ResetPhase::Enabling if csts & CSTS_READY != 0 => {
                // Ready: one admin command, answered at once by a working controller.
                match admin.set_number_of_queues() {
                    Ok(granted) if granted >= self.io_queues_granted => {
                        log::warn!("nvme {address}: controller reset done");
                        self.reset_phase
                            .store(ResetPhase::Ready as u8, Ordering::Release);
                    }
                    Ok(granted) => self.fail_reset(format!(
                        "after the reset the controller grants {granted} I/O queues, not {}",
                        self.io_queues_granted
                    )),
                    Err(e) => self.fail_reset(e.to_string()),
                }
            }
            ResetPhase::Enabling => {
                if elapsed > self.ready_timeout {
                    self.fail_reset(format!(
                        "not ready after {:?} (CSTS {csts:#x})",
                        self.ready_timeout
                    ));
                }
            }
        }
    }

    fn fail_reset(&self, why: String) {
        log::error!(
            "nvme {}: reset failed, the controller is unusable: {why}",
            self.pci_address()
        );
        self.failed.store(true, Ordering::Release);
        self.reset_phase
            .store(ResetPhase::Failed as u8, Ordering::Release);
    }
}
