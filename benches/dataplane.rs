//! Data-plane micro-benchmarks: cross-core rings, buffer pools (and, below, the wire format).
//!
//! Kept quick (20 samples, 2 s each) so they can run on every change; they exist to catch
//! regressions in the per-message costs the poll loops pay, not to publish numbers.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use carmine_dataplane::pool::{BufferPool, PoolId};
use carmine_dataplane::ring;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Items pushed then popped per iteration of the same-thread ring benchmark, in messages:
/// the size of a poll loop's drain batch.
const RING_BATCH: usize = 64;

/// Capacity of the benchmarked rings, in messages.
const RING_CAPACITY: usize = 1024;

/// Messages per iteration of the cross-thread ring benchmark, in messages.
const RING_PING_MESSAGES: u64 = 1_000_000;

/// Geometry of the benchmarked pool.
const POOL_BUFFER_SIZE_BYTES: usize = 64 << 10;
const POOL_BUFFER_COUNT: u32 = 64;

const _: () = assert!(RING_BATCH <= RING_CAPACITY);
const _: () = assert!(RING_CAPACITY <= ring::RING_CAPACITY_MAX);

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
}

fn ring_push_pop_batch(c: &mut Criterion) {
    let (mut producer, mut consumer) = ring::channel::<u64>(RING_CAPACITY);
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(RING_BATCH as u64));
    group.bench_function("push_pop_same_thread_batch_64", |b| {
        b.iter(|| {
            for i in 0..RING_BATCH as u64 {
                producer.push(black_box(i)).unwrap();
            }
            let mut sum = 0u64;
            while let Some(value) = consumer.pop() {
                sum += value;
            }
            black_box(sum)
        })
    });
    group.finish();
}

fn ring_ping_two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(RING_PING_MESSAGES));
    group.bench_function("cross_thread_1m_messages", |b| {
        b.iter_custom(|iters| {
            let total = iters * RING_PING_MESSAGES;
            let (mut producer, mut consumer) = ring::channel::<u64>(RING_CAPACITY);
            // Both threads start together, so thread start-up is not timed.
            let start = Arc::new(Barrier::new(2));
            let receiver = {
                let start = Arc::clone(&start);
                thread::spawn(move || {
                    start.wait();
                    let mut received = 0u64;
                    while received < total {
                        match consumer.pop() {
                            Some(value) => {
                                debug_assert_eq!(value, received);
                                received += 1;
                            }
                            None => core::hint::spin_loop(),
                        }
                    }
                })
            };
            start.wait();
            let began = Instant::now();
            let mut value = 0u64;
            while value < total {
                match producer.push(value) {
                    Ok(()) => value += 1,
                    Err(_) => core::hint::spin_loop(),
                }
            }
            receiver.join().unwrap();
            began.elapsed()
        })
    });
    group.finish();
}

fn pool_acquire_release(c: &mut Criterion) {
    let mut pool =
        BufferPool::new(PoolId(0), POOL_BUFFER_SIZE_BYTES, POOL_BUFFER_COUNT, false).unwrap();
    c.benchmark_group("pool")
        .bench_function("acquire_release", |b| {
            b.iter(|| {
                let buf = pool.acquire().unwrap();
                black_box(buf.as_ptr());
                pool.release(buf);
            })
        });
    assert_eq!(pool.in_use(), 0);
}

fn pool_lease_release(c: &mut Criterion) {
    let mut pool =
        BufferPool::new(PoolId(0), POOL_BUFFER_SIZE_BYTES, POOL_BUFFER_COUNT, false).unwrap();
    let mut buf = pool.acquire().unwrap();
    buf.spare_mut()[..4096].fill(0xAB);
    buf.seal(4096);
    c.benchmark_group("pool")
        .bench_function("lease_release_lease", |b| {
            b.iter(|| {
                let lease = pool.lease(&buf, black_box(32), black_box(1024));
                black_box(lease.as_slice().as_ptr());
                pool.release_lease(lease);
            })
        });
    pool.release(buf);
    assert_eq!(pool.in_use(), 0);
}

/// The server's per-request parse cost for a 4 KiB write: header and limits, crc32c over
/// the whole frame (the dominant part), sub-op table validation and iteration, all in place.
fn frame_parse(c: &mut Criterion) {
    use carmine_dataplane::wire::{self, Frame, Limits, Opcode, SubOpSpec};
    let data = vec![0x5Au8; 4096];
    let mut frame = Vec::new();
    wire::encode_request(
        &mut frame,
        Opcode::OsdOp,
        1,
        b"bench.42",
        &[SubOpSpec::write(8192, &data)],
        b"",
    );
    let mut group = c.benchmark_group("wire");
    group.throughput(criterion::Throughput::Bytes(frame.len() as u64));
    group.bench_function("frame_parse_4k_write", |b| {
        b.iter(|| {
            let bytes = black_box(&frame[..]);
            let header = wire::parse_header(bytes, &Limits::DEFAULT)
                .unwrap()
                .unwrap();
            let view = Frame::view(header, bytes);
            assert!(view.crc_ok(bytes));
            view.validate_sub_ops().unwrap();
            black_box(view.sub_ops().map(|op| op.data.len()).sum::<usize>())
        })
    });
    group.bench_function("header_only", |b| {
        b.iter(|| black_box(wire::parse_header(black_box(&frame[..]), &Limits::DEFAULT).unwrap()))
    });
    group.finish();
}

criterion_group! {
    name = dataplane;
    config = config();
    targets =
        ring_push_pop_batch,
        ring_ping_two_threads,
        pool_acquire_release,
        pool_lease_release,
        frame_parse,
}
criterion_main!(dataplane);
