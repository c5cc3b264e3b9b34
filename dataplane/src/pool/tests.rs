use super::*;
use proptest::prelude::*;
use std::sync::mpsc;
use std::thread;

const PAGE: usize = BUFFER_ALIGNMENT_BYTES;

fn pool(id: u16, buffer_size: usize, buffer_count: u32) -> BufferPool {
    BufferPool::new(PoolId(id), buffer_size, buffer_count, false).unwrap()
}

fn filled(pool: &mut BufferPool, bytes: &[u8]) -> Buf {
    let mut buf = pool.acquire().unwrap();
    buf.spare_mut()[..bytes.len()].copy_from_slice(bytes);
    buf.seal(bytes.len());
    buf
}

#[test]
fn handles_are_send() {
    fn assert_send<S: Send>() {}
    assert_send::<Buf>();
    assert_send::<Lease>();
    assert_send::<BufferPool>();
    assert_send::<Arc<PoolMemory>>();
}

#[test]
fn new_rejects_invalid_geometry() {
    for (size, count) in [
        (0, 4),
        (PAGE + 1, 4),
        (PAGE / 2, 4),
        (BUFFER_SIZE_MAX_BYTES + PAGE, 1),
        (PAGE, 0),
        (PAGE, BUFFER_COUNT_MAX + 1),
        (BUFFER_SIZE_MAX_BYTES, BUFFER_COUNT_MAX),
    ] {
        let error = BufferPool::new(PoolId(0), size, count, false).err();
        assert_eq!(
            error.map(|e| e.kind()),
            Some(io::ErrorKind::InvalidInput),
            "size {size} count {count}"
        );
    }
}

#[test]
fn lease_within_shares_the_buffer_and_is_released_independently() {
    let mut pool = pool(1, PAGE, 1);
    let buf = filled(&mut pool, b"headerFRAME");
    let datagram = pool.lease(&buf, 0, 11);
    pool.release(buf);
    let frame = pool.lease_within(&datagram, 6, 5);
    assert_eq!(frame.as_slice(), b"FRAME");
    assert_eq!(frame.index(), datagram.index());
    pool.release_lease(datagram);
    assert_eq!(pool.in_use(), 1, "the inner lease keeps the buffer");
    assert_eq!(frame.as_slice(), b"FRAME");
    pool.release_lease(frame);
    assert_eq!(pool.in_use(), 0);
}

#[test]
#[should_panic(expected = "beyond the")]
fn lease_within_refuses_a_range_outside_the_lease() {
    let mut pool = pool(1, PAGE, 1);
    let buf = filled(&mut pool, b"0123456789");
    let lease = pool.lease(&buf, 2, 4);
    let _ = pool.lease_within(&lease, 2, 3);
}

#[test]
fn lease_bytes_finds_the_buffer_and_keeps_it() {
    let mut pool = pool(1, PAGE, 2);
    let _first = pool.acquire().unwrap();
    let buf = filled(&mut pool, b"head|payload");
    let response = pool.lease(&buf, 0, 12);
    pool.release(buf);
    // SAFETY: the bytes are inside `response`, a live lease over sealed bytes.
    let payload = unsafe { pool.lease_bytes(&response.as_slice()[5..]) }.unwrap();
    assert_eq!((payload.index(), payload.as_slice()), (1, &b"payload"[..]));
    pool.release_lease(response);
    assert_eq!(pool.in_use(), 2, "the payload's lease keeps the buffer");
    pool.release_lease(payload);
    assert_eq!(pool.in_use(), 1);
    let elsewhere = [0u8; 8];
    // SAFETY: not this pool's bytes (the contract covers only those): answered None.
    assert!(unsafe { pool.lease_bytes(&elsewhere) }.is_none());
    pool.release(_first);
}

#[test]
fn acquire_until_exhausted_returns_none() {
    let mut pool = pool(1, PAGE, 4);
    let bufs: Vec<Buf> = (0..4).map(|_| pool.acquire().unwrap()).collect();
    assert!(pool.acquire().is_none());
    assert_eq!(pool.free_count(), 0);
    let mut indices: Vec<u32> = bufs.iter().map(Buf::index).collect();
    indices.sort_unstable();
    assert_eq!(indices, [0, 1, 2, 3]);
    for buf in bufs {
        pool.release(buf);
    }
    assert_eq!(pool.in_use(), 0);
}

#[test]
fn release_makes_buffer_available_again() {
    let mut pool = pool(1, PAGE, 1);
    let buf = pool.acquire().unwrap();
    let index = buf.index();
    assert!(pool.acquire().is_none());
    pool.release(buf);
    let mut again = pool.acquire().expect("released buffer must be reusable");
    assert_eq!(again.index(), index);
    assert_eq!(again.sealed_len(), 0, "a reacquired buffer starts unsealed");
    assert_eq!(again.spare_mut().len(), PAGE);
    pool.release(again);
    assert_eq!(pool.in_use(), 0);
}

#[test]
fn every_buffer_is_aligned_and_disjoint() {
    let mut pool = pool(1, 3 * PAGE, 7);
    let bufs: Vec<Buf> = (0..7).map(|_| pool.acquire().unwrap()).collect();
    let mut addresses: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
    for (buf, &address) in bufs.iter().zip(&addresses) {
        assert_eq!(
            address % BUFFER_ALIGNMENT_BYTES,
            0,
            "buffer {}",
            buf.index()
        );
        assert_eq!(buf.capacity(), 3 * PAGE);
    }
    addresses.sort_unstable();
    for pair in addresses.windows(2) {
        assert!(pair[1] - pair[0] >= 3 * PAGE, "buffers overlap");
    }
    let memory = pool.memory();
    let start = memory.as_ptr() as usize;
    assert!(addresses[0] >= start);
    assert!(addresses[6] + 3 * PAGE <= start + memory.size_bytes());
    for buf in bufs {
        pool.release(buf);
    }
}

#[test]
fn seal_and_spare_mut_are_disjoint() {
    let mut pool = pool(1, PAGE, 1);
    let mut buf = pool.acquire().unwrap();
    assert_eq!(buf.spare_mut().len(), PAGE);

    buf.spare_mut()[..5].copy_from_slice(b"hello");
    assert_eq!(
        buf.sealed(),
        b"",
        "written bytes are not sealed until seal()"
    );
    buf.seal(5);
    assert_eq!(buf.sealed(), b"hello");
    assert_eq!(buf.sealed_len(), 5);

    let start = buf.as_ptr() as usize;
    let spare = buf.spare_mut();
    assert_eq!(spare.len(), PAGE - 5);
    assert_eq!(
        spare.as_ptr() as usize,
        start + 5,
        "spare starts right after sealed"
    );
    spare.fill(0xEE);
    assert_eq!(
        buf.sealed(),
        b"hello",
        "writing spare must not touch sealed bytes"
    );

    buf.seal(PAGE - 5);
    assert_eq!(buf.sealed().len(), PAGE);
    assert!(buf.spare_mut().is_empty());
    assert_eq!(&buf.sealed()[..6], b"hello\xEE");
    pool.release(buf);
}

#[test]
#[should_panic(expected = "spare")]
fn seal_beyond_spare_panics() {
    let mut pool = pool(1, PAGE, 1);
    let mut buf = pool.acquire().unwrap();
    buf.seal(PAGE - 1);
    buf.seal(2);
}

#[test]
fn lease_keeps_buffer_alive_after_owner_release() {
    let mut pool = pool(1, PAGE, 2);
    let receive = filled(&mut pool, b"frame-one|frame-two");
    let first = pool.lease(&receive, 0, 9);
    let second = pool.lease(&receive, 10, 9);

    // The connection moves on to a new receive buffer while ops still read the old one.
    let index = receive.index();
    pool.release(receive);
    assert_eq!(pool.in_use(), 1);
    let next = pool.acquire().unwrap();
    assert_ne!(
        next.index(),
        index,
        "a leased buffer must not be handed out again"
    );
    assert!(pool.acquire().is_none());

    assert_eq!(first.as_slice(), b"frame-one");
    assert_eq!(second.as_slice(), b"frame-two");
    assert_eq!(first.index(), index);
    assert_eq!(first.pool(), PoolId(1));

    pool.release_lease(first);
    assert_eq!(pool.in_use(), 2, "one lease remains");
    assert!(pool.acquire().is_none());
    pool.release_lease(second);
    assert_eq!(pool.in_use(), 1, "freed after the last lease");

    let reused = pool.acquire().expect("buffer freed after last lease");
    assert_eq!(reused.index(), index);
    pool.release(reused);
    pool.release(next);
    assert_eq!(pool.in_use(), 0);
}

#[test]
fn owner_released_after_leases_frees_buffer() {
    let mut pool = pool(1, PAGE, 1);
    let buf = filled(&mut pool, b"abc");
    let lease = pool.lease(&buf, 1, 2);
    assert_eq!(lease.as_slice(), b"bc");
    pool.release_lease(lease);
    assert_eq!(pool.in_use(), 1, "the owner still holds it");
    pool.release(buf);
    assert_eq!(pool.in_use(), 0);
}

#[test]
fn empty_lease_at_end_of_sealed() {
    let mut pool = pool(1, PAGE, 1);
    let mut buf = pool.acquire().unwrap();
    buf.seal(PAGE);
    let lease = pool.lease(&buf, PAGE, 0);
    assert!(lease.is_empty());
    assert_eq!(lease.len(), 0);
    assert_eq!(lease.as_slice(), b"");
    pool.release(buf);
    pool.release_lease(lease);
    assert_eq!(pool.in_use(), 0);
}

#[test]
#[should_panic(expected = "beyond sealed")]
fn lease_beyond_sealed_panics() {
    let mut pool = pool(1, PAGE, 1);
    let mut buf = pool.acquire().unwrap();
    buf.spare_mut()[..4].copy_from_slice(b"abcd");
    buf.seal(3);
    let _ = pool.lease(&buf, 1, 3);
}

#[test]
#[should_panic(expected = "beyond sealed")]
fn lease_with_overflowing_range_panics() {
    let mut pool = pool(1, PAGE, 1);
    let buf = filled(&mut pool, b"abcd");
    let _ = pool.lease(&buf, 2, usize::MAX);
}

#[test]
fn buf_sent_to_another_thread_and_back() {
    let mut pool = pool(1, PAGE, 2);
    let buf = filled(&mut pool, b"home:");
    let (to_home, from_remote) = mpsc::channel();
    let remote = thread::spawn(move || {
        let mut buf = buf;
        assert_eq!(buf.sealed(), b"home:");
        buf.spare_mut()[..6].copy_from_slice(b"remote");
        buf.seal(6);
        to_home.send(buf).unwrap();
    });
    remote.join().unwrap();
    let buf = from_remote.recv().unwrap();
    assert_eq!(buf.sealed(), b"home:remote");
    assert_eq!(pool.in_use(), 1);
    pool.release(buf);
    assert_eq!(pool.in_use(), 0);
    assert_eq!(pool.free_count(), 2);
}

#[test]
fn lease_read_on_another_thread_then_released_at_home() {
    let mut pool = pool(1, PAGE, 1);
    let buf = filled(&mut pool, b"payload");
    let lease = pool.lease(&buf, 0, 7);
    pool.release(buf);
    let lease = thread::spawn(move || {
        assert_eq!(lease.as_slice(), b"payload");
        lease
    })
    .join()
    .unwrap();
    assert_eq!(pool.in_use(), 1);
    pool.release_lease(lease);
    assert_eq!(pool.in_use(), 0);
}

#[test]
#[should_panic(expected = "returned to pool")]
fn release_to_wrong_pool_panics() {
    let mut home = pool(1, PAGE, 1);
    let mut other = pool(2, PAGE, 1);
    let buf = home.acquire().unwrap();
    other.release(buf);
}

#[test]
#[should_panic(expected = "another pool")]
fn release_to_pool_with_same_id_panics() {
    let mut home = pool(1, PAGE, 1);
    let mut impostor = pool(1, PAGE, 1);
    let buf = home.acquire().unwrap();
    let _held = impostor.acquire().unwrap();
    impostor.release(buf);
}

#[test]
#[should_panic(expected = "returned to pool")]
fn release_lease_to_wrong_pool_panics() {
    let mut home = pool(1, PAGE, 1);
    let mut other = pool(2, PAGE, 1);
    let buf = filled(&mut home, b"x");
    let lease = home.lease(&buf, 0, 1);
    other.release_lease(lease);
}

#[test]
#[should_panic(expected = "another pool")]
fn lease_of_foreign_buf_panics() {
    let mut home = pool(1, PAGE, 1);
    let mut impostor = pool(1, PAGE, 1);
    let buf = filled(&mut home, b"x");
    let _ = impostor.lease(&buf, 0, 1);
}

#[test]
fn in_use_accounting() {
    let mut pool = pool(1, PAGE, 3);
    assert_eq!((pool.in_use(), pool.free_count()), (0, 3));
    let a = filled(&mut pool, b"a");
    let b = pool.acquire().unwrap();
    assert_eq!((pool.in_use(), pool.free_count()), (2, 1));
    // Leases do not take buffers of their own.
    let leases: Vec<Lease> = (0..5).map(|_| pool.lease(&a, 0, 1)).collect();
    assert_eq!((pool.in_use(), pool.free_count()), (2, 1));
    pool.release(a);
    assert_eq!(pool.in_use(), 2);
    pool.release(b);
    assert_eq!(pool.in_use(), 1);
    for lease in leases {
        assert_eq!(pool.in_use(), 1);
        pool.release_lease(lease);
    }
    assert_eq!((pool.in_use(), pool.free_count()), (0, 3));
    assert_eq!(pool.buffer_count(), 3);
    assert_eq!(pool.buffer_size(), PAGE);
    assert_eq!(pool.id(), PoolId(1));
}

#[test]
fn hugepage_request_maps_huge_or_falls_back() {
    let mut pool = BufferPool::new(PoolId(9), PAGE, 3, true).unwrap();
    let memory = pool.memory();
    assert_eq!(pool.hugepage_backed(), memory.hugepage_backed());
    if pool.hugepage_backed() {
        assert_eq!(memory.size_bytes() % HUGE_PAGE_SIZE_BYTES, 0);
    } else {
        assert_eq!(memory.size_bytes(), 3 * PAGE);
    }
    let buf = filled(&mut pool, b"works either way");
    assert_eq!(buf.as_ptr() as usize % BUFFER_ALIGNMENT_BYTES, 0);
    assert_eq!(buf.sealed(), b"works either way");
    pool.release(buf);
    assert!(!BufferPool::new(PoolId(9), PAGE, 3, false)
        .unwrap()
        .hugepage_backed());
}

#[test]
fn memory_outlives_pool_through_arc() {
    let pool = pool(1, PAGE, 2);
    let memory = pool.memory();
    assert_eq!(Arc::strong_count(&memory), 2);
    drop(pool);
    assert_eq!(
        Arc::strong_count(&memory),
        1,
        "a pool with nothing in use lets go"
    );
    assert_eq!(memory.size_bytes(), 2 * PAGE);
}

#[test]
fn pool_dropped_with_handle_outstanding_keeps_memory_mapped() {
    let mut pool = pool(1, PAGE, 1);
    let memory = pool.memory();
    let buf = filled(&mut pool, b"still here");
    drop(pool);
    // The pool leaked its reference instead of letting the mapping go.
    assert_eq!(Arc::strong_count(&memory), 2);
    drop(memory);
    assert_eq!(buf.sealed(), b"still here");
    // `buf` goes out of scope unreleased: a leak, by design.
}

#[derive(Debug, Clone)]
enum Op {
    Acquire { fill: u8, len: u16 },
    Lease { slot: usize, offset: u16, len: u16 },
    ReleaseOwner { slot: usize },
    ReleaseLease { slot: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u8>(), 0..=PAGE as u16).prop_map(|(fill, len)| Op::Acquire { fill, len }),
        (any::<usize>(), any::<u16>(), any::<u16>()).prop_map(|(slot, offset, len)| Op::Lease {
            slot,
            offset,
            len
        }),
        any::<usize>().prop_map(|slot| Op::ReleaseOwner { slot }),
        any::<usize>().prop_map(|slot| Op::ReleaseLease { slot }),
    ]
}

proptest! {
    /// Against a model of who references what: accounting matches, exhaustion happens exactly
    /// when the model says, and leased bytes never change while leased.
    #[test]
    fn matches_reference_model(ops in proptest::collection::vec(op(), 0..256)) {
        const COUNT: u32 = 4;
        let mut pool = pool(7, PAGE, COUNT);
        let mut owners: Vec<(Buf, u8)> = Vec::new();
        let mut leases: Vec<(Lease, u8)> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire { fill, len } => {
                    let mut referenced: Vec<u32> = owners.iter().map(|(b, _)| b.index())
                        .chain(leases.iter().map(|(l, _)| l.index())).collect();
                    referenced.sort_unstable();
                    referenced.dedup();
                    match pool.acquire() {
                        Some(mut buf) => {
                            prop_assert!(!referenced.contains(&buf.index()));
                            prop_assert_eq!(buf.sealed_len(), 0);
                            buf.spare_mut()[..len as usize].fill(fill);
                            buf.seal(len as usize);
                            owners.push((buf, fill));
                        }
                        None => prop_assert_eq!(referenced.len(), COUNT as usize),
                    }
                }
                Op::Lease { slot, offset, len } => {
                    if owners.is_empty() { continue; }
                    let (buf, fill) = &owners[slot % owners.len()];
                    let sealed = buf.sealed_len();
                    let offset = offset as usize % (sealed + 1);
                    let len = len as usize % (sealed - offset + 1);
                    let lease = pool.lease(buf, offset, len);
                    leases.push((lease, *fill));
                }
                Op::ReleaseOwner { slot } => {
                    if owners.is_empty() { continue; }
                    let (buf, _) = owners.swap_remove(slot % owners.len());
                    pool.release(buf);
                }
                Op::ReleaseLease { slot } => {
                    if leases.is_empty() { continue; }
                    let (lease, _) = leases.swap_remove(slot % leases.len());
                    pool.release_lease(lease);
                }
            }
            for (lease, fill) in &leases {
                prop_assert!(lease.as_slice().iter().all(|byte| byte == fill));
            }
            let mut referenced: Vec<u32> = owners.iter().map(|(b, _)| b.index())
                .chain(leases.iter().map(|(l, _)| l.index())).collect();
            referenced.sort_unstable();
            referenced.dedup();
            prop_assert_eq!(pool.in_use() as usize, referenced.len());
        }
        for (buf, _) in owners { pool.release(buf); }
        for (lease, _) in leases { pool.release_lease(lease); }
        prop_assert_eq!(pool.in_use(), 0);
        prop_assert_eq!(pool.free_count(), COUNT);
    }
}

#[test]
fn over_memory_uses_lent_memory_and_leaves_it_mapped() {
    use std::alloc::{alloc_zeroed, dealloc, Layout};
    let layout = Layout::from_size_align(4 * PAGE, PAGE).unwrap();
    // SAFETY: a non-zero size; freed below with the same layout.
    let raw = unsafe { alloc_zeroed(layout) };
    let base = NonNull::new(raw).expect("allocation");
    // Too short for the shape, or misaligned: refused, nothing taken.
    // SAFETY (each call): the memory is ours, alive until the dealloc below, used only here.
    let short = unsafe { BufferPool::over_memory(PoolId(7), PAGE, 5, base, 4 * PAGE) };
    assert_eq!(short.err().unwrap().kind(), io::ErrorKind::InvalidInput);
    let skewed = NonNull::new(raw.wrapping_add(64)).unwrap();
    let misaligned = unsafe { BufferPool::over_memory(PoolId(7), PAGE, 2, skewed, 3 * PAGE) };
    assert_eq!(
        misaligned.err().unwrap().kind(),
        io::ErrorKind::InvalidInput
    );

    let mut pool = unsafe { BufferPool::over_memory(PoolId(7), PAGE, 4, base, 4 * PAGE) }.unwrap();
    let buf = filled(&mut pool, b"lent");
    assert_eq!(
        buf.as_ptr(),
        raw.cast_const(),
        "buffer 0 is the lent memory's start"
    );
    let second = pool.acquire().unwrap();
    assert_eq!(second.as_ptr() as usize, raw as usize + PAGE);
    pool.release(second);
    pool.release(buf);
    drop(pool);
    // Dropping the pool left the memory to its owner: still ours to read and free.
    // SAFETY: raw holds 4 pages, initialised (zeroed, then written through the pool).
    assert_eq!(unsafe { std::slice::from_raw_parts(raw, 4) }, b"lent");
    // SAFETY: allocated above with this layout and no longer used.
    unsafe { dealloc(raw, layout) };
}
