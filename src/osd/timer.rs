//! Timers of one core: a binary heap of (deadline, op tag), capacity fixed at start-up (one
//! timer per op slot at most), so arming a timer never allocates.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

pub struct TimerQueue {
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    capacity: usize,
}

impl TimerQueue {
    pub fn new(capacity: usize) -> TimerQueue {
        TimerQueue {
            heap: BinaryHeap::with_capacity(capacity),
            capacity,
        }
    }

    pub fn arm(&mut self, deadline_ns: u64, tag: u64) {
        assert!(self.heap.len() < self.capacity, "more timers than op slots");
        self.heap.push(Reverse((deadline_ns, tag)));
    }

    /// Pops one timer due at `now_ns`.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<u64> {
        match self.heap.peek() {
            Some(Reverse((deadline, _))) if *deadline <= now_ns => {
                self.heap.pop().map(|Reverse((_, tag))| tag)
            }
            _ => None,
        }
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((deadline, _))| *deadline)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_deadline_order_and_not_early() {
        let mut timers = TimerQueue::new(4);
        timers.arm(30, 3);
        timers.arm(10, 1);
        timers.arm(20, 2);
        assert_eq!(timers.pop_due(5), None);
        assert_eq!(timers.next_deadline(), Some(10));
        assert_eq!(timers.pop_due(25), Some(1));
        assert_eq!(timers.pop_due(25), Some(2));
        assert_eq!(timers.pop_due(25), None);
        assert_eq!(timers.pop_due(30), Some(3));
        assert_eq!(timers.len(), 0);
    }
}
