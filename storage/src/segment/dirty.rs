//! `DirtyBlocks`: the blocks one op gives its object, by logical block index.
//!
//! A sorted vector rather than a `BTreeMap`: an op touches a handful of blocks, mostly in
//! increasing order (an append is a push), lookups are binary searches, and a cleared vector
//! keeps its capacity, so a recycled plan makes a steady stream of writes allocate nothing. A
//! map's nodes would be freed by `clear` and allocated again by the next op.

use crate::segment::exec::Dirty;

#[derive(Debug, Default)]
pub struct DirtyBlocks {
    /// (logical block index, what it becomes), sorted by index, indexes unique.
    entries: Vec<(u64, Dirty)>,
}

impl DirtyBlocks {
    pub fn new() -> DirtyBlocks {
        DirtyBlocks::default()
    }

    fn position(&self, index: u64) -> Result<usize, usize> {
        // The common case: blocks of a write arrive in increasing order.
        match self.entries.last() {
            Some(&(last, _)) if last < index => Err(self.entries.len()),
            None => Err(0),
            _ => self.entries.binary_search_by_key(&index, |&(i, _)| i),
        }
    }

    pub fn get(&self, index: u64) -> Option<&Dirty> {
        self.position(index).ok().map(|at| &self.entries[at].1)
    }

    pub fn contains_key(&self, index: u64) -> bool {
        self.position(index).is_ok()
    }

    /// Sets block `index` to `dirty`, replacing what an earlier sub-op of the op gave it.
    pub fn insert(&mut self, index: u64, dirty: Dirty) {
        match self.position(index) {
            Ok(at) => self.entries[at].1 = dirty,
            Err(at) => self.entries.insert(at, (index, dirty)),
        }
        debug_assert!(self.entries.windows(2).all(|w| w[0].0 < w[1].0));
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Every entry, by increasing index.
    pub fn entries(&self) -> &[(u64, Dirty)] {
        &self.entries
    }

    /// Entries with an index in `first..=last`, by increasing index.
    pub fn range(&self, first: u64, last: u64) -> &[(u64, Dirty)] {
        let start = self.entries.partition_point(|&(i, _)| i < first);
        let end = self.entries.partition_point(|&(i, _)| i <= last);
        &self.entries[start..end.max(start)]
    }

    pub fn values(&self) -> impl Iterator<Item = &Dirty> {
        self.entries.iter().map(|(_, d)| d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn dirty(n: u32) -> Dirty {
        if n % 3 == 0 {
            Dirty::Hole
        } else {
            Dirty::Data { buf: n, at: n % 7 }
        }
    }

    proptest! {
        /// Same answers as a BTreeMap under any sequence of inserts, lookups and ranges.
        #[test]
        fn behaves_as_a_btree_map(
            inserts in proptest::collection::vec((0u64..64, 0u32..100), 0..80),
            probes in proptest::collection::vec((0u64..70, 0u64..70), 0..20),
        ) {
            let mut ours = DirtyBlocks::new();
            let mut model = BTreeMap::new();
            for &(index, n) in &inserts {
                ours.insert(index, dirty(n));
                model.insert(index, dirty(n));
            }
            let all: Vec<_> = model.iter().map(|(&i, &d)| (i, d)).collect();
            prop_assert_eq!(ours.entries(), &all[..]);
            for &(a, b) in &probes {
                prop_assert_eq!(ours.get(a), model.get(&a));
                prop_assert_eq!(ours.contains_key(a), model.contains_key(&a));
                let (first, last) = (a.min(b), a.max(b));
                let expected: Vec<_> = model.range(first..=last).map(|(&i, &d)| (i, d)).collect();
                prop_assert_eq!(ours.range(first, last), &expected[..]);
            }
        }
    }

    #[test]
    fn clear_keeps_capacity() {
        let mut ours = DirtyBlocks::new();
        for index in 0..32 {
            ours.insert(index, Dirty::Hole);
        }
        let capacity = ours.entries.capacity();
        ours.clear();
        assert!(ours.entries().is_empty());
        assert_eq!(ours.entries.capacity(), capacity);
    }
}
