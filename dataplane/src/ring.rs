//! Bounded, lock-free, single-producer single-consumer rings: the only way cores talk to each other.
//!
//! Why: every core runs its own poll loop and owns its data outright, so the only cross-core
//! traffic is messages (a request for a partition owned elsewhere, a buffer going back home to be
//! released). A ring per ordered pair of cores keeps each ring strictly single-producer and
//! single-consumer, which needs no locks and no read-modify-write atomics: each side writes exactly
//! one index and only reads the other.
//!
//! Invariants:
//! - `head` and `tail` count pops and pushes since construction and wrap around `usize`; the
//!   capacity is a power of two, so `index & mask` stays correct across the wrap.
//! - `head <= tail <= head + capacity` (in wrapping arithmetic): slots `[head, tail)` hold
//!   initialized items owned by the ring, every other slot is uninitialized.
//! - Only the producer writes `tail` and the slot at `tail`; only the consumer writes `head` and
//!   moves items out of the slot at `head`.
//! - The ring allocates once, in `channel`; `push` and `pop` never allocate, never block and never
//!   drop an item: a full ring hands the item back (back-pressure).

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

/// Smallest capacity a ring may be created with, in items. One slot would make every push
/// wait for the consumer, which turns the ring into a rendezvous.
pub const RING_CAPACITY_MIN: usize = 2;

/// Largest capacity a ring may be created with, in items. A ring this deep is already far more
/// latency than any caller should queue; the limit also bounds the memory of a full mesh,
/// which grows with cores².
pub const RING_CAPACITY_MAX: usize = 1 << 16;

/// Most cores a `mesh` may connect, in cores. The mesh holds cores² rings.
pub const MESH_CORES_MAX: usize = 256;

const _: () = assert!(RING_CAPACITY_MIN >= 2);
const _: () = assert!(RING_CAPACITY_MIN <= RING_CAPACITY_MAX);
const _: () = assert!(RING_CAPACITY_MIN.is_power_of_two());
// Rounding a valid capacity up must never exceed the maximum.
const _: () = assert!(RING_CAPACITY_MAX.is_power_of_two());
// `tail - head` must be able to represent a full ring without ambiguity.
const _: () = assert!(RING_CAPACITY_MAX < usize::MAX / 2);

/// State shared by the two sides. `repr(C)` pins the field order so that the two written
/// indices each sit alone on their own cache line(s), and the read-only `slots` pointer lies
/// after both, where no write ever invalidates it.
#[repr(C)]
struct Shared<T> {
    /// Next slot to pop. Written only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Next slot to push. Written only by the producer.
    tail: CachePadded<AtomicUsize>,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Both sides are gone (this is the last `Arc`), so `&mut self` proves no one else
        // touches the indices or slots; both sides published their final index on every operation.
        let head = *self.head.get_mut();
        let tail = *self.tail.get_mut();
        let mask = self.slots.len() - 1;
        assert!(tail.wrapping_sub(head) <= self.slots.len());
        let mut index = head;
        while index != tail {
            // SAFETY: slots in [head, tail) hold initialized items that no side will read again
            // (both sides are dropped), so each is dropped here exactly once.
            unsafe { self.slots[index & mask].get_mut().assume_init_drop() };
            index = index.wrapping_add(1);
        }
    }
}

/// The sending half. Exactly one exists per ring; it is `Send` (it may be built on one thread
/// and moved to the core that uses it) but neither `Clone` nor `Sync`.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    mask: usize,
    /// Authoritative copy of `shared.tail`: only this side writes it.
    tail: usize,
    /// Last observed `shared.head`. Stale values only under-report free space, so it is
    /// refreshed only when it says the ring is full, sparing the consumer's cache line.
    head_cached: usize,
}

/// The receiving half. Exactly one exists per ring; `Send`, neither `Clone` nor `Sync`.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    mask: usize,
    /// Authoritative copy of `shared.head`: only this side writes it.
    head: usize,
    /// Last observed `shared.tail`. Stale values only under-report available items, so it is
    /// refreshed only when it says the ring is empty, sparing the producer's cache line.
    tail_cached: usize,
}

// `Shared` is deliberately not `Sync` (its slots are `UnsafeCell`s), so `Arc<Shared>` is neither
// `Send` nor `Sync` and both sides are `!Sync` automatically: one thread per side. Moving a side
// to another thread is what these impls allow.
//
// SAFETY: exactly two threads ever reach a `Shared`: the one holding the `Producer` and the one
// holding the `Consumer`. Only the producer writes `tail` and the slot at `tail`, and moving it to
// another thread moves that role with it. Slots change hands only through the Release store /
// Acquire load of `tail` (producer to consumer) and of `head` (consumer to producer). Items cross
// threads, and the last side to go drops leftovers wherever it is, so `T: Send` is required;
// `T: Sync` is not, as no `&T` is ever shared between the sides.
unsafe impl<T: Send> Send for Producer<T> {}
// SAFETY: symmetric to `Producer`: the sole reader of slots and writer of `head` moves with it.
unsafe impl<T: Send> Send for Consumer<T> {}

/// Creates a ring of at least `capacity` items (rounded up to a power of two).
///
/// Panics if `capacity` is outside `[RING_CAPACITY_MIN, RING_CAPACITY_MAX]`: ring sizes come
/// from code and validated configuration, so a bad one is a bug.
pub fn channel<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(
        capacity >= RING_CAPACITY_MIN,
        "ring capacity {capacity} below {RING_CAPACITY_MIN}"
    );
    assert!(
        capacity <= RING_CAPACITY_MAX,
        "ring capacity {capacity} above {RING_CAPACITY_MAX}"
    );
    let capacity = capacity.next_power_of_two();
    assert!(capacity <= RING_CAPACITY_MAX);

    let slots: Box<[UnsafeCell<MaybeUninit<T>>]> = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    assert_eq!(slots.len(), capacity);

    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        slots,
    });
    let mask = capacity - 1;
    let producer = Producer {
        shared: Arc::clone(&shared),
        mask,
        tail: 0,
        head_cached: 0,
    };
    let consumer = Consumer {
        shared,
        mask,
        head: 0,
        tail_cached: 0,
    };
    (producer, consumer)
}

impl<T> Producer<T> {
    /// Appends `item`, or hands it back in `Err` when the ring is full: the caller keeps it and
    /// retries later. Never blocks, never allocates, never drops.
    #[inline]
    pub fn push(&mut self, item: T) -> Result<(), T> {
        let capacity = self.mask + 1;
        let tail = self.tail;
        debug_assert!(tail.wrapping_sub(self.head_cached) <= capacity);
        if tail.wrapping_sub(self.head_cached) == capacity {
            // Acquire pairs with the consumer's Release store of `head`: its move out of every
            // slot before `head` happens-before the write below reuses that slot.
            self.head_cached = self.shared.head.load(Ordering::Acquire);
            debug_assert!(tail.wrapping_sub(self.head_cached) <= capacity);
            if tail.wrapping_sub(self.head_cached) == capacity {
                return Err(item);
            }
        }

        let slot = &self.shared.slots[tail & self.mask];
        // SAFETY: `tail - head < capacity`, so the slot at `tail` is outside `[head, tail)`: it
        // holds no item (nothing to leak by overwriting) and the consumer does not read it until
        // the Release store below publishes it. Only the producer writes slots.
        unsafe { (*slot.get()).write(item) };

        self.tail = tail.wrapping_add(1);
        // Release pairs with the consumer's Acquire load of `tail`: the slot write above
        // happens-before the consumer reads the item.
        self.shared.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Items in the ring right now. A snapshot: the consumer may pop concurrently, so the true
    /// value is at most this.
    pub fn len(&self) -> usize {
        // Relaxed: this synchronizes nothing; the value read is some `head` the consumer
        // published, which never passes our `tail`.
        let head = self.shared.head.load(Ordering::Relaxed);
        let len = self.tail.wrapping_sub(head);
        debug_assert!(len <= self.capacity());
        len
    }

    /// Total slots (a power of two).
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Whether a push would fail right now (the consumer may free a slot at any moment).
    pub fn is_full(&self) -> bool {
        self.len() == self.capacity()
    }

    /// Whether the consumer has taken everything pushed so far.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Consumer<T> {
    /// Removes the oldest item, or returns `None` when the ring is empty. Never blocks, never
    /// allocates.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        let head = self.head;
        debug_assert!(self.tail_cached.wrapping_sub(head) <= self.mask + 1);
        if head == self.tail_cached {
            // Acquire pairs with the producer's Release store of `tail`: its write of every slot
            // before `tail` happens-before the read below.
            self.tail_cached = self.shared.tail.load(Ordering::Acquire);
            debug_assert!(self.tail_cached.wrapping_sub(head) <= self.mask + 1);
            if head == self.tail_cached {
                return None;
            }
        }

        let slot = &self.shared.slots[head & self.mask];
        // SAFETY: `head != tail`, so the slot at `head` is in `[head, tail)` and holds an
        // initialized item that the producer published (Acquire above) and will not touch until
        // the Release store below. Moving it out leaves the slot logically uninitialized,
        // matching `head + 1`.
        let item = unsafe { (*slot.get()).assume_init_read() };

        self.head = head.wrapping_add(1);
        // Release pairs with the producer's Acquire load of `head`: the move out above
        // happens-before the producer overwrites the slot.
        self.shared.head.store(self.head, Ordering::Release);
        Some(item)
    }

    /// Items in the ring right now. A snapshot: the producer may push concurrently, so the true
    /// value is at least this.
    pub fn len(&self) -> usize {
        // Relaxed: this synchronizes nothing (`pop` does its own Acquire before reading a slot).
        let tail = self.shared.tail.load(Ordering::Relaxed);
        let len = tail.wrapping_sub(self.head);
        debug_assert!(len <= self.capacity());
        len
    }

    /// Total slots (a power of two).
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Whether a pop would fail right now (the producer may push at any moment).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rings between every ordered pair of distinct cores: `links[i].outbox[j]` sends i->j,
/// `links[j].inbox[i]` receives it. Each core takes its own `CoreLinks` to its thread.
pub struct CoreLinks<T> {
    /// Indexed by destination core; `None` at the owning core's index.
    pub outbox: Vec<Option<Producer<T>>>,
    /// Indexed by source core; `None` at the owning core's index.
    pub inbox: Vec<Option<Consumer<T>>>,
}

/// Builds the full mesh of `cores * (cores - 1)` rings, each of `capacity` items (rounded up to a
/// power of two). Allocates everything up front; nothing is allocated once cores run.
pub fn mesh<T: Send>(cores: usize, capacity: usize) -> Vec<CoreLinks<T>> {
    assert!(cores >= 1, "a mesh needs at least one core");
    assert!(
        cores <= MESH_CORES_MAX,
        "mesh of {cores} cores above {MESH_CORES_MAX}"
    );

    let mut links: Vec<CoreLinks<T>> = (0..cores)
        .map(|_| CoreLinks {
            outbox: (0..cores).map(|_| None).collect(),
            inbox: (0..cores).map(|_| None).collect(),
        })
        .collect();

    for from in 0..cores {
        for to in 0..cores {
            if from == to {
                continue;
            }
            let (producer, consumer) = channel(capacity);
            assert!(links[from].outbox[to].is_none());
            assert!(links[to].inbox[from].is_none());
            links[from].outbox[to] = Some(producer);
            links[to].inbox[from] = Some(consumer);
        }
    }
    links
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;
    use std::thread;

    /// Moves both sides' indices to `start`, as if `start` items had already passed through,
    /// so that tests can cross the `usize` wrap without pushing 2^64 items.
    fn channel_starting_at<T: Send>(capacity: usize, start: usize) -> (Producer<T>, Consumer<T>) {
        let (mut producer, mut consumer) = channel(capacity);
        producer.shared.head.store(start, Ordering::Relaxed);
        producer.shared.tail.store(start, Ordering::Relaxed);
        producer.tail = start;
        producer.head_cached = start;
        consumer.head = start;
        consumer.tail_cached = start;
        (producer, consumer)
    }

    #[test]
    fn sides_are_send() {
        fn assert_send<S: Send>() {}
        assert_send::<Producer<Box<u64>>>();
        assert_send::<Consumer<Box<u64>>>();
        assert_send::<CoreLinks<Box<u64>>>();
    }

    #[test]
    fn fifo_order() {
        let (mut producer, mut consumer) = channel::<u32>(8);
        for value in 0..8 {
            producer.push(value).unwrap();
        }
        for value in 0..8 {
            assert_eq!(consumer.pop(), Some(value));
        }
        assert_eq!(consumer.pop(), None);
    }

    #[test]
    fn capacity_rounds_up_to_power_of_two() {
        let (producer, consumer) = channel::<u8>(5);
        assert_eq!(producer.capacity(), 8);
        assert_eq!(consumer.capacity(), 8);
        let (producer, _) = channel::<u8>(RING_CAPACITY_MIN);
        assert_eq!(producer.capacity(), RING_CAPACITY_MIN);
        let (producer, _) = channel::<u8>(RING_CAPACITY_MAX);
        assert_eq!(producer.capacity(), RING_CAPACITY_MAX);
    }

    #[test]
    #[should_panic(expected = "below")]
    fn capacity_below_min_panics() {
        let _ = channel::<u8>(RING_CAPACITY_MIN - 1);
    }

    #[test]
    #[should_panic(expected = "above")]
    fn capacity_above_max_panics() {
        let _ = channel::<u8>(RING_CAPACITY_MAX + 1);
    }

    #[test]
    fn full_returns_err_with_same_item() {
        let (mut producer, mut consumer) = channel::<String>(4);
        for i in 0..4 {
            producer.push(format!("item-{i}")).unwrap();
        }
        assert!(producer.is_full());
        assert_eq!(producer.len(), 4);
        let rejected = producer.push("late".to_string()).unwrap_err();
        assert_eq!(rejected, "late");
        // The rejected push must not have disturbed what is queued.
        assert_eq!(consumer.pop().as_deref(), Some("item-0"));
        assert!(!producer.is_full());
        producer.push(rejected).unwrap();
        for expected in ["item-1", "item-2", "item-3", "late"] {
            assert_eq!(consumer.pop().as_deref(), Some(expected));
        }
        assert!(consumer.is_empty());
    }

    #[test]
    fn len_tracks_both_sides() {
        let (mut producer, mut consumer) = channel::<u8>(4);
        assert!(consumer.is_empty());
        assert!(producer.is_empty());
        assert_eq!(producer.len(), 0);
        producer.push(1).unwrap();
        producer.push(2).unwrap();
        assert_eq!(producer.len(), 2);
        assert_eq!(consumer.len(), 2);
        assert!(!consumer.is_empty());
        assert!(!producer.is_empty());
        consumer.pop().unwrap();
        assert_eq!(producer.len(), 1);
        assert_eq!(consumer.len(), 1);
    }

    #[test]
    fn wraparound_many_times() {
        let (mut producer, mut consumer) = channel::<u64>(4);
        let mut next_push = 0u64;
        let mut next_pop = 0u64;
        // Three at a time against four slots: the boundary lands on every slot in turn.
        for _ in 0..10_000 {
            for _ in 0..3 {
                producer.push(next_push).unwrap();
                next_push += 1;
            }
            for _ in 0..3 {
                assert_eq!(consumer.pop(), Some(next_pop));
                next_pop += 1;
            }
        }
        assert_eq!(next_pop, 30_000);
        assert!(consumer.is_empty());
    }

    #[test]
    fn wraparound_across_usize_max() {
        let (mut producer, mut consumer) = channel_starting_at::<u64>(4, usize::MAX - 5);
        let mut next_pop = 0;
        for value in 0..64u64 {
            if producer.push(value).is_err() {
                while let Some(popped) = consumer.pop() {
                    assert_eq!(popped, next_pop);
                    next_pop += 1;
                }
                producer.push(value).unwrap();
            }
            assert!(producer.len() <= 4);
        }
        while let Some(popped) = consumer.pop() {
            assert_eq!(popped, next_pop);
            next_pop += 1;
        }
        assert_eq!(next_pop, 64);
        assert!(producer.tail < 64, "indices must actually have wrapped");
    }

    #[test]
    fn two_thread_stress_in_order() {
        const COUNT: u64 = 1_000_000;
        let (mut producer, mut consumer) = channel::<u64>(256);

        let sender = thread::spawn(move || {
            let mut value = 0;
            let mut backoff = 0u32;
            while value < COUNT {
                match producer.push(value) {
                    Ok(()) => {
                        value += 1;
                        backoff = 0;
                    }
                    Err(returned) => {
                        assert_eq!(returned, value);
                        backoff += 1;
                        // Yield eventually so the test also passes on a single available CPU.
                        if backoff == 64 {
                            backoff = 0;
                            thread::yield_now();
                        } else {
                            core::hint::spin_loop();
                        }
                    }
                }
            }
        });

        let mut expected = 0;
        let mut backoff = 0u32;
        while expected < COUNT {
            match consumer.pop() {
                Some(value) => {
                    assert_eq!(value, expected);
                    expected += 1;
                    backoff = 0;
                }
                None => {
                    backoff += 1;
                    if backoff == 64 {
                        backoff = 0;
                        thread::yield_now();
                    } else {
                        core::hint::spin_loop();
                    }
                }
            }
        }
        sender.join().unwrap();
        assert_eq!(consumer.pop(), None);
    }

    struct DropCounter<'a> {
        drops: &'a AtomicUsize,
    }

    impl Drop for DropCounter<'_> {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn drop_counts_consumer_dropped_last() {
        let drops = AtomicUsize::new(0);
        let (mut producer, mut consumer) = channel(8);
        for _ in 0..6 {
            assert!(producer.push(DropCounter { drops: &drops }).is_ok());
        }
        // A rejected item is handed back, not dropped by the ring.
        for _ in 0..2 {
            assert!(producer.push(DropCounter { drops: &drops }).is_ok());
        }
        let rejected = producer.push(DropCounter { drops: &drops }).unwrap_err();
        assert_eq!(drops.load(Ordering::Relaxed), 0);
        drop(rejected);
        assert_eq!(drops.load(Ordering::Relaxed), 1);

        drop(consumer.pop().unwrap());
        drop(consumer.pop().unwrap());
        assert_eq!(drops.load(Ordering::Relaxed), 3);

        drop(producer);
        // The consumer still owns the ring, so the queued items are still alive.
        assert_eq!(drops.load(Ordering::Relaxed), 3);
        drop(consumer);
        assert_eq!(drops.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn drop_counts_producer_dropped_last_after_wrap() {
        let drops = AtomicUsize::new(0);
        let (mut producer, mut consumer) = channel_starting_at(4, usize::MAX - 1);
        for _ in 0..4 {
            assert!(producer.push(DropCounter { drops: &drops }).is_ok());
        }
        drop(consumer.pop().unwrap());
        assert!(producer.push(DropCounter { drops: &drops }).is_ok());
        drop(consumer);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        drop(producer);
        assert_eq!(drops.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn mesh_three_cores_every_pair_delivers() {
        const CORES: usize = 3;
        let mut links = mesh::<(usize, usize)>(CORES, 4);
        assert_eq!(links.len(), CORES);
        for (core, link) in links.iter().enumerate() {
            assert_eq!(link.outbox.len(), CORES);
            assert_eq!(link.inbox.len(), CORES);
            assert!(link.outbox[core].is_none());
            assert!(link.inbox[core].is_none());
        }

        for (from, link) in links.iter_mut().enumerate() {
            for (to, outbox) in link.outbox.iter_mut().enumerate() {
                if from != to {
                    outbox.as_mut().unwrap().push((from, to)).unwrap();
                }
            }
        }
        for (to, link) in links.iter_mut().enumerate() {
            for (from, inbox) in link.inbox.iter_mut().enumerate() {
                if from != to {
                    let inbox = inbox.as_mut().unwrap();
                    assert_eq!(inbox.pop(), Some((from, to)));
                    assert_eq!(inbox.pop(), None);
                }
            }
        }
    }

    #[test]
    fn mesh_delivers_across_threads() {
        const CORES: usize = 3;
        let links = mesh::<usize>(CORES, 4);
        let handles: Vec<_> = links
            .into_iter()
            .enumerate()
            .map(|(core, mut link)| {
                thread::spawn(move || {
                    for outbox in link.outbox.iter_mut().flatten() {
                        outbox.push(core).unwrap();
                    }
                    let mut received = Vec::new();
                    for (from, inbox) in link.inbox.iter_mut().enumerate() {
                        let Some(inbox) = inbox else { continue };
                        loop {
                            if let Some(value) = inbox.pop() {
                                assert_eq!(value, from);
                                received.push(value);
                                break;
                            }
                            thread::yield_now();
                        }
                    }
                    received
                })
            })
            .collect();
        for (core, handle) in handles.into_iter().enumerate() {
            let received = handle.join().unwrap();
            let expected: Vec<usize> = (0..CORES).filter(|&c| c != core).collect();
            assert_eq!(received, expected);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u16),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![any::<u16>().prop_map(Op::Push), Just(Op::Pop)]
    }

    proptest! {
        #[test]
        fn matches_vecdeque_model(
            capacity in RING_CAPACITY_MIN..=16usize,
            start in prop_oneof![Just(0usize), Just(usize::MAX - 7), any::<usize>()],
            ops in proptest::collection::vec(op(), 0..512),
        ) {
            let (mut producer, mut consumer) = channel_starting_at::<u16>(capacity, start);
            let capacity = producer.capacity();
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Op::Push(value) => {
                        let result = producer.push(value);
                        if model.len() == capacity {
                            prop_assert_eq!(result, Err(value));
                        } else {
                            prop_assert_eq!(result, Ok(()));
                            model.push_back(value);
                        }
                    }
                    Op::Pop => prop_assert_eq!(consumer.pop(), model.pop_front()),
                }
                prop_assert_eq!(producer.len(), model.len());
                prop_assert_eq!(consumer.len(), model.len());
                prop_assert_eq!(producer.is_full(), model.len() == capacity);
                prop_assert_eq!(consumer.is_empty(), model.is_empty());
                prop_assert_eq!(producer.is_empty(), model.is_empty());
            }
        }
    }
}
