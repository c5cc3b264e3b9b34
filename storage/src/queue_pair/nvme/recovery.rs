//! Error recovery for `NvmeQueuePair`: the timeout scan (Abort, then controller reset), and
//! what a queue pair does after a reset (its own or another's): take the completions posted
//! before it, settle every other request as failed exactly once, re-create its I/O queue.
//! See the module docs of `nvme` for the policy.

use std::time::Instant;

use super::abort::{timeout_step, AbortOutcome, TimeoutStep};
use super::controller::IoQueueCreated;
use super::controller::ResetPhase;
use super::queue::Queue;
use super::vfio::DmaMemory;
use super::{NvmeQueuePair, PendingAbort, COMMAND_IDLE};
use crate::queue_pair::IoError;

impl NvmeQueuePair {
    /// The timeout scan: takes the answer to our Abort if it came; gives a command out past
    /// `command_timeout` an Abort (sent without waiting; one out at a time, others past their
    /// deadline get none, only the same grace); resets the controller for one still out
    /// `abort_timeout` after that, or on fatal status. Reports nothing itself: a reset settles
    /// requests into `ready`.
    pub(super) fn scan_timeouts(&mut self) {
        if self.controller.fatal() {
            log::error!(
                "nvme {}: controller fatal status (CSTS.CFS)",
                self.controller.pci_address()
            );
            self.reset_controller();
            return;
        }
        if self.abort.is_some() {
            self.take_abort_answer();
        }
        let now = Instant::now();
        let mut reset = false;
        for command_id in 0..self.commands.len() {
            let command = self.commands[command_id];
            if !command.busy {
                continue;
            }
            match timeout_step(command.deadline, command.abort_sent, now) {
                TimeoutStep::Wait => {}
                TimeoutStep::StartClock => {
                    self.commands[command_id].deadline = Some(now + self.command_timeout);
                }
                TimeoutStep::Reset => {
                    log::error!(
                        "nvme {} queue {}: command {command_id} still out {:?} after it was due an abort",
                        self.controller.pci_address(),
                        self.qid,
                        self.abort_timeout
                    );
                    let request = &mut self.requests[command.request as usize];
                    request.error.get_or_insert(IoError::TimedOut);
                    reset = true;
                }
                TimeoutStep::Abort => {
                    let slot = &mut self.commands[command_id];
                    slot.abort_sent = true;
                    slot.deadline = Some(now + self.abort_timeout);
                    self.send_abort(command_id as u16);
                }
            }
        }
        if reset {
            self.reset_controller();
        }
    }

    /// Submits an Abort for `command_id` if we have none out and the admin queue takes it
    /// now; never waits. Without one the command still gets `abort_timeout` before a reset.
    fn send_abort(&mut self, command_id: u16) {
        let address = self.controller.pci_address();
        let ticket = match self.abort {
            None => self.controller.try_abort(self.qid, command_id),
            Some(_) => None,
        };
        let Some(ticket) = ticket else {
            log::error!(
                "nvme {address} queue {}: command {command_id} out for over {:?}: no abort \
                 sent now (one is out, or the admin queue is busy)",
                self.qid,
                self.command_timeout
            );
            return;
        };
        self.aborts_sent += 1;
        self.abort = Some(PendingAbort {
            ticket,
            command_id,
            holds_slot: false,
        });
        log::error!(
            "nvme {address} queue {}: command {command_id} out for over {:?}: abort sent",
            self.qid,
            self.command_timeout
        );
    }

    /// Takes the answer to our Abort if it came (or a reset lost it); then the command slot
    /// it held can be used again.
    fn take_abort_answer(&mut self) {
        let Some(abort) = self.abort else { return };
        let outcome = self.controller.poll_abort(abort.ticket);
        if outcome == AbortOutcome::Pending {
            return;
        }
        log::warn!(
            "nvme {} queue {}: abort of command {}: {}",
            self.controller.pci_address(),
            self.qid,
            abort.command_id,
            match outcome {
                AbortOutcome::Aborted => "accepted".to_string(),
                AbortOutcome::Declined => "declined (the command may still complete)".into(),
                AbortOutcome::Failed(status) => format!("failed: {status}"),
                AbortOutcome::Lost => "lost to a controller reset".into(),
                AbortOutcome::Pending => unreachable!("returned above"),
            }
        );
        self.release_abort();
    }

    /// Forgets our Abort (answered, or lost to a reset) and frees the command slot it held.
    fn release_abort(&mut self) {
        let Some(abort) = self.abort.take() else {
            return;
        };
        self.aborts_answered += 1;
        if abort.holds_slot {
            debug_assert!(!self.commands[usize::from(abort.command_id)].busy);
            self.free_commands.push(abort.command_id);
        }
    }

    /// Starts a controller reset (unless another queue pair just did; with the admin lock
    /// held elsewhere, the next scan tries again). The polls that follow step it and recover
    /// from it (`recover`); none of them waits for the controller.
    fn reset_controller(&mut self) {
        if !self.controller.start_reset(self.generation) {
            log::warn!(
                "nvme {} queue {}: admin queue busy, the reset starts at a later scan",
                self.controller.pci_address(),
                self.qid
            );
        }
    }

    /// A reset started since our queue was created (the generation moved): steps it, and
    /// once the controller is disabled settles every request (`settle_all`), and once it is
    /// ready again re-creates our I/O queue. Returns whether our queue works again; while
    /// not, the caller keeps out of it (no doorbell) and calls again at its next poll.
    pub(super) fn recover(&mut self) -> bool {
        debug_assert_ne!(self.controller.generation(), self.generation);
        self.controller.step_reset();
        let phase = self.controller.reset_phase();
        if phase == ResetPhase::Disabling {
            // The controller may still read or write our memory and the caller's buffers:
            // nothing can be settled yet.
            return false;
        }
        self.settle_all();
        match phase {
            ResetPhase::Disabling | ResetPhase::Enabling => false,
            ResetPhase::Failed => {
                self.resets_recovered += 1;
                self.generation = self.controller.generation();
                self.failed = true;
                false
            }
            ResetPhase::Ready => self.recreate_queue(),
        }
    }

    /// The controller is disabled: takes the completions it posted before, settles every
    /// other request (those submitted during the reset too) as failed into `ready`, each
    /// exactly once. Nothing of ours is in the controller's hands afterwards.
    fn settle_all(&mut self) {
        // Completions posted before the controller was disabled are real: report them as such.
        // (No doorbell: the queue no longer exists on the controller.) Once only: afterwards
        // the queue's memory is zeroed for its re-creation.
        if !self.queue_settled {
            self.queue_settled = true;
            while let Some(done) = self.queue.next_completion() {
                if let Some(index) = self.complete_command(&done) {
                    self.requests[index as usize].settled = true;
                    self.ready.push_back(index);
                }
            }
        }
        let failure = if self.controller.failed() {
            IoError::DeviceFailed
        } else {
            IoError::ControllerReset
        };
        for command_id in 0..self.commands.len() {
            let command = self.commands[command_id];
            if !command.busy {
                continue;
            }
            self.commands[command_id] = COMMAND_IDLE;
            self.free_commands.push(command_id as u16);
            let request = &mut self.requests[command.request as usize];
            request.error.get_or_insert(failure);
            request.outstanding -= 1;
        }
        self.waiting.clear();
        // The reset took our Abort with it (the controller's table is cleared).
        self.release_abort();
        for index in 0..self.requests.len() {
            let request = &mut self.requests[index];
            if !request.busy || request.settled {
                continue;
            }
            debug_assert_eq!(request.outstanding, 0);
            request.error.get_or_insert(failure);
            request.issued = request.length;
            request.settled = true;
            self.ready.push_back(index as u32);
        }
        debug_assert_eq!(self.ready.len(), self.in_flight as usize);
        debug_assert_eq!(self.free_commands.len(), self.commands.len());
    }

    /// Re-creates our I/O queue on the controller, ready after a reset. Returns whether it
    /// works (false: another reset began or the admin lock was busy, try at the next poll;
    /// or the controller refused, and the queue pair has failed).
    fn recreate_queue(&mut self) -> bool {
        // SAFETY: the SQ and CQ are the first `sq_bytes` + CQ bytes of our DMA memory; the
        // controller was disabled (reset) and our queue is not re-created yet: nobody reads
        // or writes them (the old `queue` is not read again: `queue_settled`).
        unsafe { core::ptr::write_bytes(self.memory.ptr(), 0, self.prp_lists_offset) };
        let created = self.controller.recreate_io_queue(
            self.qid,
            self.entries,
            self.memory.iova(),
            self.memory.iova() + self.sq_bytes as u64,
        );
        match created {
            Ok(None) => false,
            Ok(Some(created)) => {
                // SAFETY: as in `new`: the queue memory is ours, zeroed, sized for `entries`.
                self.queue =
                    unsafe { queue_over(&self.memory, self.sq_bytes, self.entries, &created) };
                self.generation = created.generation;
                self.queue_settled = false;
                self.resets_recovered += 1;
                log::warn!(
                    "nvme {} queue {}: re-created after a controller reset; {} requests settled",
                    self.controller.pci_address(),
                    self.qid,
                    self.ready.len()
                );
                true
            }
            Err(e) => {
                log::error!(
                    "nvme {} queue {}: cannot re-create the queue after a reset: {e}",
                    self.controller.pci_address(),
                    self.qid
                );
                // What is settled keeps its outcome (completions taken above are real); what
                // is submitted from now on fails with DeviceFailed.
                self.resets_recovered += 1;
                self.generation = self.controller.generation();
                self.failed = true;
                false
            }
        }
    }

    /// Reports up to `completions_max` settled requests from `ready`.
    pub(super) fn report_ready(
        &mut self,
        completions_max: usize,
        complete: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        let mut reported = 0;
        while reported < completions_max {
            let Some(index) = self.ready.pop_front() else {
                break;
            };
            debug_assert!(self.requests[index as usize].settled);
            let (tag, result) = self.finish_request(index);
            complete(tag, result);
            reported += 1;
        }
        reported
    }
}

/// The `Queue` over our DMA memory's SQ (first `sq_bytes`) and CQ (after it).
///
/// # Safety
/// `memory` holds a zeroed SQ and CQ of `entries` entries there, mapped for the controller's
/// DMA, and outlives the returned queue; the doorbells are in a BAR that outlives it too.
pub(super) unsafe fn queue_over(
    memory: &DmaMemory,
    sq_bytes: usize,
    entries: u16,
    created: &IoQueueCreated,
) -> Queue {
    // SAFETY: our caller's contract.
    unsafe {
        Queue::new(
            memory.ptr().cast(),
            memory.ptr().add(sq_bytes).cast(),
            entries,
            created.sq_doorbell,
            created.cq_doorbell,
        )
    }
}
