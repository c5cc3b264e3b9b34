//! Placement group: the unit of ordering. Ops on one PG take versions in arrival order; a PG
//! with writes that are applied but not yet acknowledged (waiting for the store or for the
//! replication hook) holds back later reads, so a read never sees a write that could still be
//! lost, and everything queued behind a held op keeps its order.

use crate::osd::op_table::SLOT_NONE;

/// Entries kept in memory per PG. A real OSD trims the log as peers catch up; with null
/// replication the log is only a bounded record of recent versions.
pub const PG_LOG_ENTRIES_MAX: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgLogEntry {
    pub version: u64,
    pub object_hash: u32,
    /// Bit n set when the op had a mutation of sub-op code n.
    pub sub_op_mask: u16,
}

pub struct PgLog {
    entries: [PgLogEntry; PG_LOG_ENTRIES_MAX],
    appended: u64,
}

impl PgLog {
    fn new() -> PgLog {
        PgLog {
            entries: [PgLogEntry::default(); PG_LOG_ENTRIES_MAX],
            appended: 0,
        }
    }

    fn append(&mut self, entry: PgLogEntry) {
        self.entries[(self.appended % PG_LOG_ENTRIES_MAX as u64) as usize] = entry;
        self.appended += 1;
    }

    /// The newest entries, oldest first (what a peering OSD would exchange).
    #[cfg(test)]
    pub fn recent(&self) -> impl Iterator<Item = &PgLogEntry> {
        let kept = self.appended.min(PG_LOG_ENTRIES_MAX as u64);
        (self.appended - kept..self.appended)
            .map(move |n| &self.entries[(n % PG_LOG_ENTRIES_MAX as u64) as usize])
    }

    pub fn len(&self) -> usize {
        self.appended.min(PG_LOG_ENTRIES_MAX as u64) as usize
    }
}

pub struct Pg {
    pub id: u32,
    pub version: u64,
    pub log: PgLog,
    /// Mutating ops applied to the store whose acknowledgement is still pending.
    pub unacked_writes: u32,
    /// Ops waiting for their turn: an intrusive FIFO through the exec op table's `next` links.
    pub queue_head: u32,
    pub queue_tail: u32,
    pub queued: u32,
    /// Whether the PG is on its core's list of PGs to drain.
    pub ready: bool,
    pub log_enabled: bool,
}

impl Pg {
    pub fn new(id: u32, log_enabled: bool) -> Pg {
        Pg {
            id,
            version: 0,
            log: PgLog::new(),
            unacked_writes: 0,
            queue_head: SLOT_NONE,
            queue_tail: SLOT_NONE,
            queued: 0,
            ready: false,
            log_enabled,
        }
    }

    /// Whether an op arriving now must wait behind earlier ones.
    pub fn must_queue(&self, mutates: bool) -> bool {
        self.queued > 0 || (!mutates && self.unacked_writes > 0)
    }

    /// Whether the op at the head of the queue may run now.
    pub fn head_may_run(&self, mutates: bool) -> bool {
        mutates || self.unacked_writes == 0
    }

    /// Orders a mutating op: returns its version.
    pub fn next_version(&mut self, object_hash: u32, sub_op_mask: u16) -> u64 {
        self.version += 1;
        if self.log_enabled {
            self.log.append(PgLogEntry {
                version: self.version,
                object_hash,
                sub_op_mask,
            });
        }
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keeps_the_newest_entries_in_order() {
        let mut pg = Pg::new(3, true);
        for n in 0..(PG_LOG_ENTRIES_MAX as u32 + 10) {
            assert_eq!(pg.next_version(n, 1), u64::from(n) + 1);
        }
        let versions: Vec<u64> = pg.log.recent().map(|e| e.version).collect();
        assert_eq!(versions.len(), PG_LOG_ENTRIES_MAX);
        assert_eq!(versions[0], 11);
        assert!(versions.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn reads_wait_for_unacknowledged_writes_and_for_the_queue() {
        let mut pg = Pg::new(0, false);
        assert!(!pg.must_queue(false));
        pg.unacked_writes = 1;
        assert!(pg.must_queue(false), "a read waits for the write before it");
        assert!(!pg.must_queue(true), "writes pipeline");
        pg.queued = 1;
        assert!(pg.must_queue(true), "nothing overtakes a queued op");
        assert_eq!(pg.log.len(), 0, "flex mode keeps no log");
    }
}
