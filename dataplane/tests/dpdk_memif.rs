//! DPDK between two processes over a `net_memif` pair (shared memory, no NIC, no hugepages).
//!
//! This binary is the memif server: it starts a copy of itself as the client (the EAL starts
//! once per process, so each side needs its own), then echoes every frame it receives by
//! handing the received mbuf straight back to tx (no copy). The client sends frames of varied
//! sizes and checks that each comes back intact and in order.
//! Run: `cargo test -p carmine-dataplane --features dpdk --test dpdk_memif`.

mod dpdk_common;

#[cfg(not(feature = "dpdk"))]
fn main() {
    eprintln!("SKIP: dpdk_memif needs `--features dpdk` (and libdpdk-dev, clang: see ci/test.sh)");
}

/// Frames the client sends and expects back.
#[cfg(feature = "dpdk")]
const FRAMES: usize = 20_000;
/// Bound on each side's run: a hung link fails the test instead of hanging CI.
#[cfg(feature = "dpdk")]
const RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);
#[cfg(feature = "dpdk")]
const ROLE_ENV: &str = "CARMINE_MEMIF_ROLE";
#[cfg(feature = "dpdk")]
const SOCKET_ENV: &str = "CARMINE_MEMIF_SOCKET";

#[cfg(feature = "dpdk")]
fn frame(i: usize) -> Vec<u8> {
    let len = 60 + (i * 53) % 1440;
    (0..len).map(|b| (i.wrapping_mul(131) ^ b) as u8).collect()
}

#[cfg(feature = "dpdk")]
fn main() {
    use std::time::Instant;
    let client = std::env::var(ROLE_ENV).is_ok();
    let socket = std::env::var(SOCKET_ENV)
        .unwrap_or_else(|_| format!("/run/carmine-memif-{}.sock", std::process::id()));
    let role = if client { "client" } else { "server" };
    let prefix = dpdk_common::file_prefix(&format!("memif-{role}"));
    let vdev = format!("net_memif0,role={role},socket={socket}");
    let args = dpdk_common::eal_args_floating(&prefix, &vdev);

    use carmine_dataplane::dpdk::{Eal, Mempool, Port, PortConfig};
    let eal = match Eal::init(&args) {
        Ok(eal) => eal,
        Err(e) => {
            eprintln!("SKIP: EAL does not start here ({e}); args {args:?}");
            return;
        }
    };
    // The client starts once this EAL has probed memif, which creates the listening socket: a
    // memif client whose connect fails cannot start its port (rte_eth_dev_start: EPERM).
    let child = (!client).then(|| dpdk_common::spawn_self(ROLE_ENV, SOCKET_ENV, &socket));
    let pool = Mempool::new(&eal, role, 4095, 2176).expect("mempool");
    let port = Port::start(&eal, 0, &PortConfig::default(), &[&pool]).expect("memif port");
    let mut queues = port.queues();
    let (rx, tx) = &mut queues[0];
    let mut got = Vec::with_capacity(64);
    let start = Instant::now();

    if client {
        let mut out = Vec::with_capacity(64);
        let (mut sent, mut received) = (0usize, 0usize);
        while received < FRAMES {
            assert!(
                start.elapsed() < RUN_LIMIT,
                "client: {received}/{FRAMES} frames back after {RUN_LIMIT:?}"
            );
            // At most 256 frames in flight: the rings are bounded and a frame sent before the
            // link is up would be dropped on the floor by neither side (tx keeps it).
            while sent < FRAMES && out.len() < out.capacity() && sent - received < 256 {
                let mut m = pool.alloc().expect("pool sized for the window");
                assert!(m.extend_from_slice(&frame(sent)));
                out.push(m);
                sent += 1;
            }
            tx.tx_burst(&mut out);
            rx.rx_burst(&mut got);
            for m in got.drain(..) {
                assert_eq!(m.data(), &frame(received)[..], "client: frame {received}");
                received += 1;
            }
        }
        println!(
            "memif client: {received} frames echoed intact in {:?}",
            start.elapsed()
        );
    } else {
        let mut echoed = 0usize;
        let mut child = child.unwrap();
        loop {
            if let Some(status) = child.try_wait().expect("wait for client") {
                assert!(status.success(), "memif client failed: {status}");
                break;
            }
            assert!(
                start.elapsed() < RUN_LIMIT * 2,
                "server: client did not finish ({echoed} echoed)"
            );
            rx.rx_burst(&mut got);
            while !got.is_empty() {
                echoed += tx.tx_burst(&mut got);
            }
        }
        assert_eq!(echoed, FRAMES, "server echoed each frame once");
        println!("test memif_pair_echo_{FRAMES}_frames ... ok");
        println!("\ndpdk_memif: 1 passed, 0 failed");
    }
    drop(got);
    drop(queues);
    drop(port);
    assert_eq!(
        pool.in_use_count(),
        0,
        "{role}: every mbuf went back to its pool"
    );
    dpdk_common::remove_runtime_dir(&prefix);
}
