//! The Aborts out on a controller's admin queue, which every queue pair of the controller
//! shares, and when a timed-out command gets one.
//!
//! An Abort is asynchronous: a queue pair submits it (`NvmeController::try_abort`, which never
//! waits for the admin lock) and goes on polling its I/O queue. Whoever holds the admin lock
//! next reaps the admin completion queue (the owner at its next timeout scan, or any admin
//! command another core runs meanwhile) and leaves the answer in the Abort's slot of this
//! table; the owner, the queue pair holding the `AbortTicket`, takes it from there at its next
//! scan. A controller reset empties the table: tickets of an earlier generation are `Lost`.
//!
//! The table holds at most `ABORTS_IN_FLIGHT_MAX` Aborts (and no more than the controller's
//! Abort Command Limit): a queue pair that finds it full tries again at its next scan, and
//! each queue pair has at most one Abort out.

use super::spec::{CompletionEntry, NvmeStatus};

/// Aborts out at once on one controller, for all its queue pairs. The spec recommends an
/// Abort Command Limit of at least 4; this keeps the admin queue (32 entries) far from full.
pub const ABORTS_IN_FLIGHT_MAX: usize = 4;

/// What a queue pair holds for the Abort it sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortTicket {
    slot: u8,
    admin_command_id: u16,
    generation: u64,
}

/// How an Abort ended, as its owner learns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortOutcome {
    /// No answer yet (or the admin lock was busy: look again later).
    Pending,
    /// The controller aborted the command: it completes as "command abort requested".
    Aborted,
    /// The controller did not abort it: the command may still complete on its own.
    Declined,
    /// The Abort itself failed with this status (e.g. Abort Command Limit Exceeded).
    Failed(NvmeStatus),
    /// A controller reset came first: the command is gone with every other.
    Lost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    /// Submitted, not answered. `orphaned`: its owner went away; the answer frees the slot.
    Pending {
        admin_command_id: u16,
        orphaned: bool,
    },
    Answered(AbortOutcome),
}

/// The Aborts of one controller; see the module docs. Lives in the controller's `Admin`,
/// under its mutex.
pub struct AbortTable {
    slots: [Slot; ABORTS_IN_FLIGHT_MAX],
    /// Aborts out at once: `ABORTS_IN_FLIGHT_MAX`, or fewer if the controller allows fewer.
    limit: usize,
    /// The controller generation the slots belong to.
    generation: u64,
}

impl AbortTable {
    /// A table for a controller whose Abort Command Limit (ACL, zero-based) is `acl`.
    pub fn new(acl: u8) -> AbortTable {
        AbortTable {
            slots: [Slot::Free; ABORTS_IN_FLIGHT_MAX],
            limit: (usize::from(acl) + 1).min(ABORTS_IN_FLIGHT_MAX),
            generation: 0,
        }
    }

    /// Takes a slot for an Abort about to be submitted as admin command `admin_command_id`.
    /// None when `limit` Aborts are out (the caller submits nothing and tries again later).
    pub fn start(&mut self, admin_command_id: u16) -> Option<AbortTicket> {
        debug_assert!(!self.holds(admin_command_id), "admin command id in use");
        if self.in_use() >= self.limit {
            return None;
        }
        let slot = self.slots.iter().position(|s| *s == Slot::Free)?;
        self.slots[slot] = Slot::Pending {
            admin_command_id,
            orphaned: false,
        };
        Some(AbortTicket {
            slot: slot as u8,
            admin_command_id,
            generation: self.generation,
        })
    }

    /// Whether an unanswered Abort uses admin command identifier `admin_command_id` (the
    /// admin queue must not reuse it until answered).
    pub fn holds(&self, admin_command_id: u16) -> bool {
        self.slots.iter().any(
            |s| matches!(*s, Slot::Pending { admin_command_id: id, .. } if id == admin_command_id),
        )
    }

    /// Files an admin completion if it answers an Abort: returns whether it did.
    pub fn answer(&mut self, done: &CompletionEntry) -> bool {
        let Some(index) = self.slots.iter().position(|s| {
            matches!(*s, Slot::Pending { admin_command_id, .. } if admin_command_id == done.command_id)
        }) else {
            return false;
        };
        let Slot::Pending { orphaned, .. } = self.slots[index] else {
            unreachable!("matched above");
        };
        let status = done.nvme_status();
        // Completion dword 0, bit 0: 1 if the command was not aborted.
        let outcome = if !status.is_success() {
            AbortOutcome::Failed(status)
        } else if done.dw0 & 1 == 0 {
            AbortOutcome::Aborted
        } else {
            AbortOutcome::Declined
        };
        self.slots[index] = if orphaned {
            Slot::Free
        } else {
            Slot::Answered(outcome)
        };
        true
    }

    /// The outcome of `ticket`'s Abort; anything but `Pending` frees its slot (a ticket is
    /// answered once).
    pub fn take(&mut self, ticket: AbortTicket) -> AbortOutcome {
        if ticket.generation != self.generation {
            return AbortOutcome::Lost;
        }
        let slot = &mut self.slots[usize::from(ticket.slot)];
        match *slot {
            Slot::Pending {
                admin_command_id, ..
            } => {
                debug_assert_eq!(admin_command_id, ticket.admin_command_id);
                AbortOutcome::Pending
            }
            Slot::Answered(outcome) => {
                *slot = Slot::Free;
                outcome
            }
            Slot::Free => unreachable!("an abort ticket's slot is freed only by its owner"),
        }
    }

    /// The owner of `ticket` goes away without its answer: the slot is freed now, or when
    /// the answer comes.
    pub fn forget(&mut self, ticket: AbortTicket) {
        if ticket.generation != self.generation {
            return;
        }
        let slot = &mut self.slots[usize::from(ticket.slot)];
        *slot = match *slot {
            Slot::Pending {
                admin_command_id, ..
            } => Slot::Pending {
                admin_command_id,
                orphaned: true,
            },
            _ => Slot::Free,
        };
    }

    /// The controller was reset into `generation`: its admin queue is new, every Abort gone.
    pub fn clear(&mut self, generation: u64) {
        self.slots = [Slot::Free; ABORTS_IN_FLIGHT_MAX];
        self.generation = generation;
    }

    /// Aborts out (submitted, or answered and not yet taken).
    pub fn in_use(&self) -> usize {
        self.slots.iter().filter(|s| **s != Slot::Free).count()
    }
}

/// What the timeout scan does about one busy command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutStep {
    /// First seen by a scan: its clock starts.
    StartClock,
    /// Within its deadline.
    Wait,
    /// Past its deadline, never aborted: send an Abort.
    Abort,
    /// Past the deadline its Abort gave it: reset the controller.
    Reset,
}

/// The timeout policy for one busy command: `deadline` as the scans set it, `abort_sent`
/// whether it was given its Abort (or its chance of one) already.
pub fn timeout_step(
    deadline: Option<std::time::Instant>,
    abort_sent: bool,
    now: std::time::Instant,
) -> TimeoutStep {
    match deadline {
        None => TimeoutStep::StartClock,
        Some(deadline) if now < deadline => TimeoutStep::Wait,
        Some(_) if abort_sent => TimeoutStep::Reset,
        Some(_) => TimeoutStep::Abort,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn completion(command_id: u16, dw0: u32, status: u16) -> CompletionEntry {
        CompletionEntry {
            dw0,
            command_id,
            // Phase tag 1, status field above it.
            status: (status << 1) | 1,
            ..CompletionEntry::default()
        }
    }

    #[test]
    fn an_abort_is_answered_once_to_its_owner() {
        let mut table = AbortTable::new(3);
        let a = table.start(10).unwrap();
        let b = table.start(11).unwrap();
        assert!(table.holds(10) && table.holds(11) && !table.holds(12));
        assert_eq!(table.take(a), AbortOutcome::Pending);
        // Not an abort's completion: left to the caller.
        assert!(!table.answer(&completion(12, 0, 0)));
        assert!(table.answer(&completion(11, 0, 0)));
        assert!(table.answer(&completion(10, 1, 0)));
        assert!(!table.holds(10), "an answered id may be reused");
        assert_eq!(table.take(a), AbortOutcome::Declined);
        assert_eq!(table.take(b), AbortOutcome::Aborted);
        assert_eq!(table.in_use(), 0);
    }

    #[test]
    fn a_failed_abort_reports_its_status() {
        let mut table = AbortTable::new(3);
        let a = table.start(1).unwrap();
        // Abort Command Limit Exceeded: type 1, code 0x03.
        assert!(table.answer(&completion(1, 0, 0x103)));
        assert_eq!(
            table.take(a),
            AbortOutcome::Failed(NvmeStatus(0x103)),
            "status kept"
        );
    }

    #[test]
    fn the_limit_is_the_smaller_of_ours_and_the_controllers() {
        let mut table = AbortTable::new(1);
        let a = table.start(1).unwrap();
        table.start(2).unwrap();
        assert_eq!(table.start(3), None, "ACL 1 (zero-based): two aborts");
        assert!(table.answer(&completion(1, 1, 0)));
        // Answered but not taken still counts: its owner has not seen it.
        assert_eq!(table.start(3), None);
        table.take(a);
        assert!(table.start(3).is_some());
        let mut wide = AbortTable::new(255);
        let started = (0..10).filter_map(|id| wide.start(id)).count();
        assert_eq!(started, ABORTS_IN_FLIGHT_MAX);
    }

    #[test]
    fn a_reset_loses_every_abort_and_old_tickets_stay_lost() {
        let mut table = AbortTable::new(3);
        let a = table.start(5).unwrap();
        table.clear(1);
        assert_eq!(table.in_use(), 0);
        assert!(!table.holds(5));
        // The new admin queue reuses the id: the old ticket must not see its answer.
        let b = table.start(5).unwrap();
        assert!(table.answer(&completion(5, 0, 0)));
        assert_eq!(table.take(a), AbortOutcome::Lost);
        assert_eq!(table.take(b), AbortOutcome::Aborted);
        table.forget(a);
        assert_eq!(table.in_use(), 0);
    }

    #[test]
    fn an_orphaned_abort_frees_its_slot_when_answered() {
        let mut table = AbortTable::new(0);
        let a = table.start(7).unwrap();
        table.forget(a);
        assert_eq!(table.start(8), None, "still out on the controller");
        assert!(table.holds(7));
        assert!(table.answer(&completion(7, 0, 0)));
        assert_eq!(table.in_use(), 0);
        let b = table.start(8).unwrap();
        assert!(table.answer(&completion(8, 0, 0)));
        table.forget(b);
        assert_eq!(table.in_use(), 0, "forgetting an answered abort frees it");
    }

    #[test]
    fn a_command_is_aborted_once_then_reset() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        assert_eq!(timeout_step(None, false, now), TimeoutStep::StartClock);
        assert_eq!(timeout_step(Some(later), false, now), TimeoutStep::Wait);
        assert_eq!(timeout_step(Some(now), false, now), TimeoutStep::Abort);
        assert_eq!(timeout_step(Some(later), true, now), TimeoutStep::Wait);
        assert_eq!(timeout_step(Some(now), true, later), TimeoutStep::Reset);
    }
}
