//! `SpdkQueuePair` against Carmine's SPDK stand-in (`ci/spdk-stub/`): a test double with
//! SPDK's API, not SPDK. It completes commands only when polled, in random order; it fails a
//! payload SPDK could not translate for DMA; it keeps writes in a volatile cache until a flush;
//! and it fails reads of a sector stored with its read-error marker and writes carrying its
//! write-fault marker. What this proves and what it does not: ARCHITECTURE.md, "SPDK backend".
//! Run: `PKG_CONFIG_PATH=$(ci/spdk-stub/build.sh) cargo test -p carmine-storage --features spdk
//! --test spdk`. Against real SPDK every test prints SKIP: they rely on the stand-in's
//! emulated controllers (any `traddr`) and its injectable errors.
#![cfg(feature = "spdk")]

use std::alloc::Layout;
use std::sync::{Arc, Once};

use carmine_storage::queue_pair::spdk::{BOUNCE_BYTES, REGISTRATION_ALIGN_BYTES};
use carmine_storage::queue_pair::{
    AlignedBuf, IoError, IoVec, QueuePair, SpdkController, SpdkQueuePair, SubmitError,
};

const BLOCK: usize = 4096;
/// The stand-in's markers (ci/spdk-stub/nvme.c): at a sector's start they inject an error.
const READ_ERROR_MAGIC: &[u8; 16] = b"CARMINE-STUB-EIO";
const WRITE_FAULT_MAGIC: &[u8; 16] = b"CARMINE-STUB-WFT";

/// Points the stand-in at a fresh directory for file-backed namespaces (16 MiB each), once,
/// before any test attaches a controller: the stand-in reads its environment at attach.
fn stand_in() -> bool {
    static SETUP: Once = Once::new();
    if !carmine_ffi::spdk::IS_STAND_IN {
        eprintln!("SKIP: these tests need Carmine's SPDK stand-in (ci/spdk-stub), not real SPDK");
        return false;
    }
    SETUP.call_once(|| {
        let dir = std::env::temp_dir().join(format!("carmine-spdk-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        // Set before any thread calls into C (every test passes through this Once first).
        std::env::set_var("SPDK_STUB_DIR", &dir);
        std::env::set_var("SPDK_STUB_NS_MIB", "16");
    });
    true
}

fn controller(slot: u8) -> Arc<SpdkController> {
    SpdkController::connect(&format!("trtype=PCIe traddr=0000:00:{slot:02x}.0"))
        .expect("attach the stand-in's controller")
}

fn queue_pair(controller: &Arc<SpdkController>, depth: u32) -> SpdkQueuePair {
    let capacity = controller.capacity_bytes();
    SpdkQueuePair::new(controller, 0, capacity, depth).expect("queue pair")
}

fn pattern(buf: &mut [u8], seed: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64;
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
}

/// Polls until every tag in `tags` is reported; returns the outcomes in completion order.
fn wait_all(qp: &mut SpdkQueuePair, tags: &[u64]) -> Vec<(u64, Result<(), IoError>)> {
    let mut seen = Vec::new();
    for _ in 0..1_000_000 {
        qp.poll(64, &mut |tag, result| seen.push((tag, result)));
        if seen.len() == tags.len() {
            let mut got: Vec<u64> = seen.iter().map(|&(tag, _)| tag).collect();
            got.sort_unstable();
            let mut want = tags.to_vec();
            want.sort_unstable();
            assert_eq!(got, want, "each tag reported exactly once");
            return seen;
        }
    }
    panic!("completions missing: {} of {} seen", seen.len(), tags.len());
}

fn write(qp: &mut SpdkQueuePair, offset: u64, buffers: &[IoVec], tag: u64) -> Result<(), IoError> {
    qp.submit_write(offset, buffers, tag).expect("submit write");
    wait_all(qp, &[tag])[0].1
}

fn read(qp: &mut SpdkQueuePair, offset: u64, buffers: &[IoVec], tag: u64) -> Result<(), IoError> {
    qp.submit_read(offset, buffers, tag).expect("submit read");
    wait_all(qp, &[tag])[0].1
}

fn flush(qp: &mut SpdkQueuePair, tag: u64) -> Result<(), IoError> {
    qp.submit_flush(tag).expect("submit flush");
    wait_all(qp, &[tag])[0].1
}

/// Memory SPDK can register: 2 MiB aligned, 2 MiB long.
struct HugeRegion {
    ptr: *mut u8,
}

impl HugeRegion {
    const LAYOUT: Layout =
        match Layout::from_size_align(REGISTRATION_ALIGN_BYTES, REGISTRATION_ALIGN_BYTES) {
            Ok(layout) => layout,
            Err(_) => panic!("2 MiB layout"),
        };

    fn new() -> HugeRegion {
        // SAFETY: nonzero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) };
        assert!(!ptr.is_null());
        HugeRegion { ptr }
    }

    /// `len` bytes at `offset` as an IoVec.
    fn io_vec(&self, offset: usize, len: usize) -> IoVec {
        assert!(offset + len <= REGISTRATION_ALIGN_BYTES);
        // SAFETY: inside the allocation, which outlives every request in these tests (the
        // queue pair is dropped first).
        unsafe { IoVec::new(self.ptr.add(offset), len) }
    }

    fn bytes(&mut self, offset: usize, len: usize) -> &mut [u8] {
        // SAFETY: inside the allocation; tests touch it only while no request is out.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

impl Drop for HugeRegion {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, Self::LAYOUT) };
    }
}

#[test]
fn read_after_write_through_bounce_buffers() {
    if !stand_in() {
        return;
    }
    let controller = controller(0x10);
    let mut qp = queue_pair(&controller, 8);
    let mut out = AlignedBuf::new(2 * BLOCK);
    pattern(&mut out, 1);
    let mut back = AlignedBuf::new(2 * BLOCK);
    // SAFETY: each buffer outlives its request, which completes before the next access.
    let (out_vec, back_vec) = unsafe { (out.as_io_vec(), back.as_io_vec()) };
    for offset in [
        0,
        8 * BLOCK as u64,
        controller.capacity_bytes() - 2 * BLOCK as u64,
    ] {
        write(&mut qp, offset, &[out_vec], 1).expect("write");
        read(&mut qp, offset, &[back_vec], 2).expect("read");
        assert_eq!(
            &back[..],
            &out[..],
            "read at {offset} returns what was written"
        );
        back.fill(0);
    }
    // Heap memory SPDK cannot translate went through the bounce buffers, every request.
    assert_eq!((qp.bounced_requests(), qp.zero_copy_requests()), (6, 0));
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn a_request_larger_than_a_bounce_buffer_moves_in_chunks() {
    if !stand_in() {
        return;
    }
    let controller = controller(0x11);
    let mut qp = queue_pair(&controller, 4);
    // Three buffers, 2.5 bounce buffers' worth, so chunks straddle buffer boundaries.
    let sizes = [BOUNCE_BYTES / 2, BOUNCE_BYTES + BLOCK, BOUNCE_BYTES - BLOCK];
    let mut outs: Vec<AlignedBuf> = sizes.iter().map(|&n| AlignedBuf::new(n)).collect();
    let mut backs: Vec<AlignedBuf> = sizes.iter().map(|&n| AlignedBuf::new(n)).collect();
    for (i, buf) in outs.iter_mut().enumerate() {
        pattern(buf, 10 + i as u64);
    }
    // SAFETY: buffers outlive their requests.
    let out_vecs: Vec<IoVec> = outs.iter_mut().map(|b| unsafe { b.as_io_vec() }).collect();
    let back_vecs: Vec<IoVec> = backs.iter_mut().map(|b| unsafe { b.as_io_vec() }).collect();
    write(&mut qp, 64 * BLOCK as u64, &out_vecs, 1).expect("write");
    read(&mut qp, 64 * BLOCK as u64, &back_vecs, 2).expect("read");
    for (out, back) in outs.iter().zip(&backs) {
        assert_eq!(&back[..], &out[..]);
    }
    assert_eq!(qp.bounced_requests(), 2);
}

#[test]
fn registered_memory_moves_in_place_with_scatter_gather() {
    if !stand_in() {
        return;
    }
    let controller = controller(0x12);
    let mut qp = queue_pair(&controller, 8);
    let mut region = HugeRegion::new();
    let unaligned = AlignedBuf::new(BLOCK);
    let regions = [
        (region.ptr, REGISTRATION_ALIGN_BYTES),
        (unaligned.as_ptr() as *mut u8, BLOCK),
    ];
    // SAFETY: both regions outlive the queue pair (dropped at the end of the test, qp first).
    let registered = unsafe { qp.register_buffers(&regions) }.expect("register");
    assert!(registered, "the 2 MiB-aligned region registers");
    assert_eq!(
        qp.registered_regions(),
        1,
        "the 4 KiB-aligned one is left to bouncing"
    );

    pattern(region.bytes(0, 3 * BLOCK), 7);
    // Gather out of three pieces in a shuffled order, scatter back into two others.
    let out = [
        region.io_vec(2 * BLOCK, BLOCK),
        region.io_vec(0, BLOCK),
        region.io_vec(BLOCK, BLOCK),
    ];
    write(&mut qp, 0, &out, 1).expect("gather write");
    let back = [
        region.io_vec(16 * BLOCK, 2 * BLOCK),
        region.io_vec(40 * BLOCK, BLOCK),
    ];
    read(&mut qp, 0, &back, 2).expect("scatter read");
    let written: Vec<u8> = [2, 0, 1]
        .iter()
        .flat_map(|&i| region.bytes(i * BLOCK, BLOCK).to_vec())
        .collect();
    let mut got = region.bytes(16 * BLOCK, 2 * BLOCK).to_vec();
    got.extend_from_slice(region.bytes(40 * BLOCK, BLOCK));
    assert_eq!(got, written);
    // One buffer inside and one outside the registered region: only the outside one is
    // staged in the bounce buffer (the stand-in would fail a payload SPDK cannot translate, so
    // this also checks that the staged piece really went through DMA memory).
    let mut outside = AlignedBuf::new(BLOCK);
    pattern(&mut outside, 8);
    // SAFETY: outlives the request.
    let mixed = [region.io_vec(0, BLOCK), unsafe { outside.as_io_vec() }];
    write(&mut qp, 100 * BLOCK as u64, &mixed, 3).expect("mixed write");
    read(
        &mut qp,
        100 * BLOCK as u64,
        &[region.io_vec(64 * BLOCK, 2 * BLOCK)],
        4,
    )
    .expect("read");
    assert_eq!(region.bytes(65 * BLOCK, BLOCK), &outside[..]);
    assert_eq!((qp.zero_copy_requests(), qp.bounced_requests()), (3, 1));
    assert_eq!(
        qp.bounced_bytes(),
        BLOCK as u64,
        "only the unregistered block was copied"
    );
    // The same, read: an unregistered buffer between two registered ones is filled too.
    let mut middle = AlignedBuf::new(BLOCK);
    // SAFETY: outlives the request.
    let scatter = [
        region.io_vec(128 * BLOCK, BLOCK),
        unsafe { middle.as_io_vec() },
        region.io_vec(129 * BLOCK, BLOCK),
    ];
    read(&mut qp, 99 * BLOCK as u64, &scatter, 5).expect("mixed read");
    // Blocks 99 (never written), 100 (the registered piece above), 101 (the staged one).
    assert!(region.bytes(128 * BLOCK, BLOCK).iter().all(|&b| b == 0));
    let first = region.bytes(0, BLOCK).to_vec();
    assert_eq!(
        &middle[..],
        &first[..],
        "the staged buffer was filled from the bounce buffer"
    );
    assert_eq!(region.bytes(129 * BLOCK, BLOCK), &outside[..]);
    assert_eq!(qp.bounced_bytes(), 2 * BLOCK as u64);
    drop(qp);
}

#[test]
fn many_requests_in_flight_complete_once_each_in_any_order() {
    if !stand_in() {
        return;
    }
    let controller = controller(0x13);
    let depth = 64;
    let mut qp = queue_pair(&controller, depth);
    let mut outs: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(BLOCK)).collect();
    for (i, buf) in outs.iter_mut().enumerate() {
        pattern(buf, 100 + i as u64);
    }
    let tags: Vec<u64> = (0..depth as u64).collect();
    for (i, buf) in outs.iter_mut().enumerate() {
        // SAFETY: buffers outlive their requests.
        let vec = unsafe { buf.as_io_vec() };
        qp.submit_write(i as u64 * BLOCK as u64, &[vec], i as u64)
            .expect("submit");
    }
    assert_eq!(qp.in_flight(), depth);
    let mut spare = AlignedBuf::new(BLOCK);
    // SAFETY: refused, never submitted.
    let spare_vec = unsafe { spare.as_io_vec() };
    assert_eq!(
        qp.submit_write(0, &[spare_vec], 999),
        Err(SubmitError::QueueFull)
    );
    // Nothing completes without a poll.
    assert_eq!(qp.in_flight(), depth);
    let order = wait_all(&mut qp, &tags);
    assert!(order.iter().all(|(_, r)| r.is_ok()));
    let in_order = order.windows(2).all(|w| w[0].0 < w[1].0);
    assert!(
        !in_order,
        "the stand-in reorders 64 completions (odds of order: 1 in 64!)"
    );

    let mut backs: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(BLOCK)).collect();
    for (i, buf) in backs.iter_mut().enumerate() {
        // SAFETY: buffers outlive their requests.
        let vec = unsafe { buf.as_io_vec() };
        qp.submit_read(i as u64 * BLOCK as u64, &[vec], i as u64)
            .expect("submit");
    }
    // A small completion budget is honoured.
    let mut first = 0;
    while first == 0 {
        first = qp.poll(3, &mut |_, result| result.expect("read"));
    }
    assert!(first <= 3);
    let rest: Vec<u64> = wait_all_remaining(&mut qp, depth as usize - first);
    assert_eq!(rest.len(), depth as usize - first);
    for (out, back) in outs.iter().zip(&backs) {
        assert_eq!(&back[..], &out[..]);
    }
}

fn wait_all_remaining(qp: &mut SpdkQueuePair, count: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.len() < count {
        qp.poll(64, &mut |tag, result| {
            result.expect("request");
            seen.push(tag);
        });
    }
    assert_eq!(qp.in_flight(), 0);
    seen
}

#[test]
fn only_flushed_writes_survive_a_detach() {
    if !stand_in() {
        return;
    }
    let mut blocks: Vec<AlignedBuf> = (0..3).map(|_| AlignedBuf::new(BLOCK)).collect();
    for (i, buf) in blocks.iter_mut().enumerate() {
        pattern(buf, 200 + i as u64);
    }
    // SAFETY: buffers outlive their requests.
    let vecs: Vec<IoVec> = blocks
        .iter_mut()
        .map(|b| unsafe { b.as_io_vec() })
        .collect();
    {
        let controller = controller(0x14);
        let mut qp = queue_pair(&controller, 4);
        write(&mut qp, 0, &[vecs[0]], 1).expect("write a");
        write(&mut qp, BLOCK as u64, &[vecs[1]], 2).expect("write b");
        flush(&mut qp, 3).expect("flush");
        write(&mut qp, 2 * BLOCK as u64, &[vecs[2]], 4).expect("write c");
        // Dropped without a flush: the stand-in's volatile cache loses c.
    }
    let controller = controller(0x14);
    let mut qp = queue_pair(&controller, 4);
    let mut back = AlignedBuf::new(3 * BLOCK);
    // SAFETY: outlives the request.
    let back_vec = unsafe { back.as_io_vec() };
    read(&mut qp, 0, &[back_vec], 5).expect("read");
    assert_eq!(&back[..BLOCK], &blocks[0][..], "flushed write a survives");
    assert_eq!(
        &back[BLOCK..2 * BLOCK],
        &blocks[1][..],
        "flushed write b survives"
    );
    assert!(
        back[2 * BLOCK..].iter().all(|&b| b == 0),
        "unflushed write c is gone"
    );
}

#[test]
fn device_errors_become_nvme_statuses() {
    if !stand_in() {
        return;
    }
    let controller = controller(0x15);
    let mut qp = queue_pair(&controller, 4);
    let mut good = AlignedBuf::new(BLOCK);
    pattern(&mut good, 300);
    let mut bad = AlignedBuf::new(BLOCK);
    bad[..16].copy_from_slice(READ_ERROR_MAGIC);
    let mut fault = AlignedBuf::new(BLOCK);
    fault[512..528].copy_from_slice(WRITE_FAULT_MAGIC);
    let mut back = AlignedBuf::new(BLOCK);
    // SAFETY: buffers outlive their requests.
    let (good_vec, bad_vec, fault_vec, back_vec) = unsafe {
        (
            good.as_io_vec(),
            bad.as_io_vec(),
            fault.as_io_vec(),
            back.as_io_vec(),
        )
    };
    // A medium error on read: status code type 2 (media), code 0x81 (unrecovered read).
    write(&mut qp, 0, &[bad_vec], 1).expect("write the marked block");
    match read(&mut qp, 0, &[back_vec], 2) {
        Err(IoError::Nvme(status)) => {
            assert_eq!((status.code_type(), status.code()), (2, 0x81), "{status}");
            assert!(IoError::Nvme(status)
                .to_string()
                .contains("unrecovered read"));
        }
        other => panic!("expected an unrecovered read error, got {other:?}"),
    }
    // Rewriting the block clears it, as on a real device.
    write(&mut qp, 0, &[good_vec], 3).expect("rewrite");
    read(&mut qp, 0, &[back_vec], 4).expect("read after rewrite");
    assert_eq!(&back[..], &good[..]);
    // A write fault (type 2, code 0x80) applies nothing: the old bytes stay.
    match write(&mut qp, 0, &[fault_vec], 5) {
        Err(IoError::Nvme(status)) => {
            assert_eq!((status.code_type(), status.code()), (2, 0x80), "{status}")
        }
        other => panic!("expected a write fault, got {other:?}"),
    }
    read(&mut qp, 0, &[back_vec], 6).expect("read");
    assert_eq!(&back[..], &good[..]);
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    if !stand_in() {
        return;
    }
    let error = SpdkController::connect("trtype=PCIe bogus=1")
        .err()
        .expect("refused");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    assert!(error.to_string().contains("transport ID"), "{error}");
    let controller = controller(0x16);
    let capacity = controller.capacity_bytes();
    assert!(SpdkQueuePair::new(&controller, 0, capacity + 4096, 4).is_err());
    assert!(SpdkQueuePair::new(&controller, 512, 4096, 4).is_err());
    assert!(SpdkQueuePair::new(&controller, 0, capacity, 0).is_err());
    let mut qp = SpdkQueuePair::new(&controller, 4096, 8 * 4096, 2).expect("partition");
    assert_eq!(qp.capacity_bytes(), 8 * 4096);
    let mut buf = AlignedBuf::new(BLOCK);
    // SAFETY: these requests are refused, never queued... except the accepted ones below.
    let vec = unsafe { buf.as_io_vec() };
    assert_eq!(qp.submit_read(512, &[vec], 1), Err(SubmitError::Misaligned));
    assert_eq!(
        qp.submit_read(8 * 4096, &[vec], 1),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(
        qp.submit_write_zeroes(0, 4096, 1),
        Err(SubmitError::Unsupported)
    );
    // The partition's offset is applied: block 0 of the queue pair is block 1 of the namespace.
    pattern(&mut buf, 400);
    write(&mut qp, 0, &[vec], 2).expect("write");
    let mut whole = queue_pair(&controller, 2);
    let mut back = AlignedBuf::new(BLOCK);
    // SAFETY: outlives the request.
    let back_vec = unsafe { back.as_io_vec() };
    read(&mut whole, 4096, &[back_vec], 3).expect("read");
    assert_eq!(&back[..], &buf[..]);
    // Registering with I/O in flight is refused.
    qp.submit_flush(4).expect("flush");
    // SAFETY: refused before anything is registered.
    assert!(unsafe { qp.register_buffers(&[]) }.is_err());
    wait_all(&mut qp, &[4]);
}

/// The segment store on the SPDK queue pair: it registers its 2 MiB-aligned block arena at
/// mount, so 4 KiB overwrites copy only their journal record's head (its buffer is not a
/// 2 MiB multiple) and 4 KiB reads copy nothing.
#[test]
fn segment_store_moves_its_block_buffers_in_place() {
    use carmine_storage::segment::{mkfs, SegmentStore};
    use carmine_storage::{ObjectStore, OutputBuffer, SubOp, SubOpResult, Submit};

    if !stand_in() {
        return;
    }
    fn wait(store: &mut SegmentStore<SpdkQueuePair>) {
        let mut done = false;
        while !done {
            store.poll(8, &mut |_, result| {
                assert!(result.is_ok_and(|r| r.iter().all(|r| r.result().is_ok())));
                done = true;
            });
        }
    }
    fn run(store: &mut SegmentStore<SpdkQueuePair>, ops: &[SubOp<'_>], out: &mut [u8]) {
        let mut results = [SubOpResult::default(); 1];
        // SAFETY: `out` is not touched until `wait` has seen the op complete.
        let mut output = unsafe { OutputBuffer::from_raw(out.as_mut_ptr(), out.len()) };
        match store.submit(1, b"obj", ops, &mut output, &mut results) {
            Ok(Submit::Pending) => wait(store),
            Ok(Submit::Done) => assert!(results[0].result().is_ok()),
            other => panic!("{other:?}"),
        }
    }
    let controller = controller(0x17);
    let mut qp = queue_pair(&controller, 32);
    mkfs(&mut qp, 1 << 20, 1, 0, *b"spdk-zero-copy!!").expect("mkfs");
    let mut store = SegmentStore::mount(qp, 0).expect("mount");
    assert_eq!(
        store.queue_pair().registered_regions(),
        1,
        "the block arena"
    );
    let mut block = vec![0u8; BLOCK];
    pattern(&mut block, 500);
    run(
        &mut store,
        &[SubOp::WriteFull {
            data: &vec![3u8; 16 * BLOCK],
        }],
        &mut [],
    );
    let before = (
        store.queue_pair().zero_copy_requests(),
        store.queue_pair().bounced_requests(),
        store.queue_pair().bounced_bytes(),
    );
    for n in 0..16u64 {
        run(
            &mut store,
            &[SubOp::Write {
                offset: n * BLOCK as u64,
                data: &block,
            }],
            &mut [],
        );
    }
    let qp = store.queue_pair();
    let (zero_copy, bounced, bytes) = (
        qp.zero_copy_requests() - before.0,
        qp.bounced_requests() - before.1,
        qp.bounced_bytes() - before.2,
    );
    // Each overwrite is one record (head staged, data block in place) and its flush.
    eprintln!(
        "16 overwrites of 4 KiB: {bounced} requests staged {bytes} bytes, {zero_copy} in place"
    );
    assert_eq!(
        bounced, 16,
        "one record per overwrite, zero copy {zero_copy}"
    );
    // A record is a 4 KiB head plus the 4 KiB data block: copying both would be 128 KiB.
    assert_eq!(
        bytes,
        16 * BLOCK as u64,
        "only record heads were copied, never the data blocks"
    );
    let (bytes_before, in_place_before) = (qp.bounced_bytes(), qp.zero_copy_requests());
    let mut out = vec![0u8; BLOCK];
    let read = [SubOp::Read {
        offset: 5 * BLOCK as u64,
        length: BLOCK as u64,
    }];
    run(&mut store, &read, &mut out);
    assert_eq!(out, block);
    let qp = store.queue_pair();
    assert_eq!(
        qp.bounced_bytes(),
        bytes_before,
        "a 4 KiB read copies nothing"
    );
    assert_eq!(qp.zero_copy_requests(), in_place_before + 1);
}
