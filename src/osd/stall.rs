//! The stall watch: a core that holds ops in flight but has finished none for a while logs
//! what it is waiting on, once per stall. An operator (or a test) then sees which layer holds
//! the ops (PG queues, the store, timers, rings) instead of only a client's timeout.
//!
//! Checked when the core publishes its counters (about every millisecond, and before it
//! parks), so it costs nothing per op.

use std::time::{Duration, Instant};

/// How long ops may sit in flight with no progress before the core says so.
pub const STALL_REPORT_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct StallWatch {
    /// The progress figure last seen to move, and when.
    progress: u64,
    since: Instant,
    /// Whether the current stall was logged (one report per stall).
    reported: bool,
    /// Stalls reported since start.
    pub stalls: u64,
}

impl StallWatch {
    pub fn new(now: Instant) -> StallWatch {
        StallWatch {
            progress: 0,
            since: now,
            reported: false,
            stalls: 0,
        }
    }

    /// `progress` grows whenever an op finishes; `in_flight` counts ops the core holds.
    /// Returns true exactly once per stall: when the caller should log its state.
    pub fn check(&mut self, now: Instant, progress: u64, in_flight: usize) -> bool {
        if progress != self.progress || in_flight == 0 {
            if self.reported {
                log::info!(
                    "stall ended after {:.1} s",
                    now.duration_since(self.since).as_secs_f64()
                );
            }
            self.progress = progress;
            self.since = now;
            self.reported = false;
            return false;
        }
        if self.reported || now.duration_since(self.since) < STALL_REPORT_AFTER {
            return false;
        }
        self.reported = true;
        self.stalls += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_once_per_stall_and_rearms_on_progress() {
        let start = Instant::now();
        let mut watch = StallWatch::new(start);
        assert!(!watch.check(start, 5, 3));
        let later = start + STALL_REPORT_AFTER;
        assert!(watch.check(later, 5, 3), "no progress for the whole window");
        assert!(
            !watch.check(later + Duration::from_secs(1), 5, 3),
            "reported once"
        );
        assert!(
            !watch.check(later + Duration::from_secs(2), 6, 3),
            "progress rearms"
        );
        let again = later + Duration::from_secs(2) + STALL_REPORT_AFTER;
        assert!(watch.check(again, 6, 3));
        assert_eq!(watch.stalls, 2);
    }

    #[test]
    fn an_idle_core_never_stalls() {
        let start = Instant::now();
        let mut watch = StallWatch::new(start);
        assert!(!watch.check(start + STALL_REPORT_AFTER * 3, 0, 0));
        assert!(!watch.check(start + STALL_REPORT_AFTER * 6, 0, 0));
        assert_eq!(watch.stalls, 0);
    }
}
