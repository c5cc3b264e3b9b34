//! DPDK in-process loopback over the `net_ring0` vdev: no NIC, no hugepages.
//!
//! Its own test binary (`harness = false`) because the EAL initialises once per process.
//! Built without feature `dpdk` (or without DPDK's run-time files) it prints SKIP and why.
//! Run: `cargo test -p carmine-dataplane --features dpdk --test dpdk_ring`.

mod dpdk_common;

#[cfg(not(feature = "dpdk"))]
fn main() {
    eprintln!("SKIP: dpdk_ring needs `--features dpdk` (and libdpdk-dev, clang: see ci/test.sh)");
}

#[cfg(feature = "dpdk")]
fn main() {
    use carmine_dataplane::dpdk::{Eal, Mempool, Port, PortConfig};

    let prefix = dpdk_common::file_prefix("ring");
    let args = dpdk_common::eal_args(&prefix, "net_ring0");
    let eal = match Eal::init(&args) {
        Ok(eal) => eal,
        Err(e) => {
            eprintln!("SKIP: EAL does not start here ({e}); args {args:?}");
            return;
        }
    };
    assert!(
        Eal::init(&args).is_err(),
        "a second EAL init in one process is refused"
    );
    assert_eq!(eal.port_count(), 1, "net_ring0 is the only port");

    let pool = Mempool::new(&eal, "ring_test", 2047, 2176).expect("mempool");
    let mut passed = 0;

    // 1. Drop returns an mbuf to its pool.
    {
        let before = pool.in_use_count();
        let held: Vec<_> = (0..10)
            .map(|_| pool.alloc().expect("pool has buffers"))
            .collect();
        assert_eq!(pool.in_use_count(), before + 10);
        drop(held);
        assert_eq!(pool.in_use_count(), before);
        println!("test mbuf_drop_returns_to_pool ... ok");
        passed += 1;
    }

    // 2. Append, data view, truncate, tailroom.
    {
        let mut m = pool.alloc().unwrap();
        assert!(m.is_empty());
        let room = m.tailroom();
        assert_eq!(room, 2176 - 128);
        assert!(m.extend_from_slice(b"hello dpdk"));
        assert_eq!(m.data(), b"hello dpdk");
        m.data_mut()[0] = b'H';
        m.truncate(5);
        assert_eq!(m.data(), b"Hello");
        assert!(
            m.append(room).is_none(),
            "over tailroom is refused, unchanged"
        );
        assert_eq!(m.len(), 5);
        println!("test mbuf_data_area ... ok");
        passed += 1;
    }

    // Closing a vdev port releases it (a second start finds no port 0), so 3 and 4 share one.
    let port = Port::start(&eal, 0, &PortConfig::default(), &[&pool]).expect("port start");
    let mut queues = port.queues();
    let (rx, tx) = &mut queues[0];

    // 3. Loopback: net_ring0's tx queue 0 feeds its rx queue 0. Send N frames of varied sizes
    //    in bursts, receive them all, in order, byte for byte.
    {
        const FRAMES: usize = 5000;
        let mut out = Vec::with_capacity(64);
        let mut got = Vec::with_capacity(64);
        let (mut sent, mut received) = (0usize, 0usize);
        let frame = |i: usize| -> Vec<u8> {
            let len = 60 + (i * 37) % 1440;
            (0..len).map(|b| (i.wrapping_mul(31) ^ b) as u8).collect()
        };
        let in_use_start = pool.in_use_count();
        while received < FRAMES {
            while sent < FRAMES && out.len() < out.capacity() {
                let mut m = pool.alloc().expect("pool sized for a burst in flight");
                assert!(m.extend_from_slice(&frame(sent)));
                out.push(m);
                sent += 1;
            }
            tx.tx_burst(&mut out);
            rx.rx_burst(&mut got);
            for m in got.drain(..) {
                assert_eq!(m.data(), &frame(received)[..], "frame {received}");
                received += 1;
            }
        }
        assert!(out.is_empty());
        assert_eq!(
            pool.in_use_count(),
            in_use_start,
            "every frame went back to the pool"
        );
        let stats = port.stats().unwrap();
        assert_eq!(stats.rx_frames, FRAMES as u64);
        assert_eq!(stats.tx_frames, FRAMES as u64);
        println!("test ring_loopback_{FRAMES}_frames ... ok");
        passed += 1;
    }

    // 4. A full rx side: tx without rx fills the ring; unsent frames stay with the caller.
    {
        let mut out = Vec::with_capacity(64);
        let mut total = 0;
        let mut refused = false;
        for _ in 0..64 {
            while out.len() < out.capacity() {
                let mut m = pool.alloc().expect("buffers");
                m.extend_from_slice(&[0xab; 64]);
                out.push(m);
            }
            let n = tx.tx_burst(&mut out);
            total += n;
            if n < 64 {
                refused = true;
                break;
            }
        }
        assert!(
            refused,
            "the ring is bounded: tx_burst stops taking frames when full"
        );
        assert!(!out.is_empty());
        drop(out); // unsent frames are ours and go back to the pool
        let mut got = Vec::with_capacity(64);
        let mut drained = 0;
        while rx.rx_burst(&mut got) > 0 {
            drained += got.len();
            got.clear();
        }
        assert_eq!(drained, total);
        println!("test ring_full_keeps_unsent ... ok");
        passed += 1;
    }
    // 5. The tx handle and its frames move to another thread (a reactor) while this thread
    //    receives: both ends of the ring at once, as two cores would use a port.
    {
        let (rx, tx) = &mut queues[0];
        const FRAMES: usize = 20_000;
        let pool = &pool;
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let mut out = Vec::with_capacity(32);
                let mut sent = 0;
                while sent < FRAMES || !out.is_empty() {
                    while sent < FRAMES && out.len() < out.capacity() {
                        let Some(mut m) = pool.alloc() else { break };
                        m.extend_from_slice(&(sent as u32).to_le_bytes());
                        out.push(m);
                        sent += 1;
                    }
                    tx.tx_burst(&mut out);
                }
            });
            let mut got = Vec::with_capacity(64);
            let mut next = 0u32;
            let start = std::time::Instant::now();
            while (next as usize) < FRAMES {
                assert!(
                    start.elapsed().as_secs() < 30,
                    "only {next} of {FRAMES} frames arrived"
                );
                rx.rx_burst(&mut got);
                for m in got.drain(..) {
                    assert_eq!(m.data(), &next.to_le_bytes());
                    next += 1;
                }
            }
        });
        println!("test queue_used_from_another_thread ... ok");
        passed += 1;
    }

    drop(queues);
    drop(port);
    assert_eq!(pool.in_use_count(), 0);
    dpdk_common::remove_runtime_dir(&prefix);
    println!("\ndpdk_ring: {passed} passed, 0 failed");
}
