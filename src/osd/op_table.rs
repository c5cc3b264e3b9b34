//! Op table: every op in flight on a core is a slot, allocated at start-up. Asynchronous steps
//! (store completions, timers, cross-core replies) carry `OpRef { slot, generation }`, and the
//! generation check turns a stale reference into a loud failure instead of finishing someone
//! else's op.

pub const SLOT_NONE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpRef {
    pub slot: u32,
    pub generation: u32,
}

impl OpRef {
    pub fn tag(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.slot)
    }
    pub fn from_tag(tag: u64) -> OpRef {
        OpRef {
            slot: tag as u32,
            generation: (tag >> 32) as u32,
        }
    }
}

pub struct OpTable<T> {
    slots: Vec<T>,
    generations: Vec<u32>,
    live: Vec<bool>,
    free: Vec<u32>,
}

impl<T: Default> OpTable<T> {
    pub fn new(capacity: u32) -> OpTable<T> {
        assert!(capacity > 0 && capacity < SLOT_NONE);
        OpTable {
            slots: (0..capacity).map(|_| T::default()).collect(),
            generations: vec![0; capacity as usize],
            live: vec![false; capacity as usize],
            free: (0..capacity).rev().collect(),
        }
    }

    /// None when full: the caller stops taking new work until slots come back.
    pub fn alloc(&mut self) -> Option<OpRef> {
        let slot = self.free.pop()?;
        let index = slot as usize;
        debug_assert!(!self.live[index]);
        self.live[index] = true;
        self.generations[index] = self.generations[index].wrapping_add(1);
        Some(OpRef {
            slot,
            generation: self.generations[index],
        })
    }

    /// Frees a slot and hands back its contents (reset to default).
    pub fn free(&mut self, op: OpRef) -> T {
        self.check(op);
        self.live[op.slot as usize] = false;
        self.free.push(op.slot);
        std::mem::take(&mut self.slots[op.slot as usize])
    }

    /// Frees a slot and leaves its contents where they are, for tables of large entries that
    /// their owner resets field by field (moving them out and a default in costs a copy each).
    pub fn release(&mut self, op: OpRef) {
        self.check(op);
        self.live[op.slot as usize] = false;
        self.free.push(op.slot);
    }

    pub fn get(&mut self, op: OpRef) -> &mut T {
        self.check(op);
        &mut self.slots[op.slot as usize]
    }

    /// The op in `slot`, for intrusive lists that link slots by index.
    pub fn at(&mut self, slot: u32) -> (&mut T, OpRef) {
        let index = slot as usize;
        assert!(self.live[index], "intrusive link to a free slot");
        (
            &mut self.slots[index],
            OpRef {
                slot,
                generation: self.generations[index],
            },
        )
    }

    /// A reference from the past must match the slot's current generation.
    pub fn is_current(&self, op: OpRef) -> bool {
        let index = op.slot as usize;
        index < self.slots.len() && self.live[index] && self.generations[index] == op.generation
    }

    fn check(&self, op: OpRef) {
        // A stale tag would finish someone else's op: keep this check in release builds.
        assert!(self.is_current(op), "stale op reference {op:?}");
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_recycle_with_new_generations() {
        let mut table: OpTable<u64> = OpTable::new(2);
        let a = table.alloc().unwrap();
        let b = table.alloc().unwrap();
        assert!(table.alloc().is_none(), "full is a value, not a panic");
        *table.get(a) = 7;
        assert_eq!(table.free(a), 7);
        let c = table.alloc().unwrap();
        assert_eq!(c.slot, a.slot);
        assert_ne!(c.generation, a.generation);
        assert!(!table.is_current(a));
        assert_eq!(*table.get(c), 0, "freed slots are reset");
        assert_eq!(OpRef::from_tag(b.tag()), b);
        assert_eq!(table.in_flight(), 2);
    }

    #[test]
    #[should_panic(expected = "stale op reference")]
    fn stale_reference_panics() {
        let mut table: OpTable<u8> = OpTable::new(1);
        let a = table.alloc().unwrap();
        table.free(a);
        table.get(a);
    }
}
