//! Replies sent from the store's memory where it lies, on a zero-copy memif client port: the
//! frame holds only a count (`stored_in_flight`) until the peer has copied it out, and the core
//! lets no mutation reach the store before that count reads zero (`RpcTransport`); bytes that
//! are not EAL memory are copied instead.
//!
//! One process, both ends of a memif pair: `net_memif1` (client, `zero-copy=yes`) is the
//! `DpdkDatagramPort` `carmine serve` uses, `net_memif0` (server) a plain port standing for
//! the generator. `--single-file-segments`: memif's zero-copy mode needs it.
//! Run: `cargo test -p carmine-dataplane --features dpdk --test dpdk_store_tx` (as root).

mod dpdk_common;

#[cfg(not(feature = "dpdk"))]
fn main() {
    eprintln!(
        "SKIP: dpdk_store_tx needs `--features dpdk` (and libdpdk-dev, clang: see ci/test.sh)"
    );
}

#[cfg(feature = "dpdk")]
fn main() {
    use carmine_dataplane::dgram::ipv4::Endpoint;
    use carmine_dataplane::dpdk::{heap, net, Mbuf, Mempool, Port, PortConfig};
    use carmine_dataplane::udp::DatagramPort;
    use std::time::{Duration, Instant};

    let Some(pair) = dpdk_common::start_memif_pair("store-tx", "zero-copy=yes,") else {
        return;
    };
    let eal = &pair.eal;

    // The peer first (a memif client connects when its port starts).
    let peer_pool = Mempool::new(&eal, "store-tx-peer", 1023, 128 + 9216).unwrap();
    let peer = Port::start(&eal, 0, &PortConfig::default(), &[&peer_pool]).expect("peer port");
    let mut peer_queues = peer.queues();
    let (peer_rx, peer_tx) = &mut peer_queues[0];

    heap::enable(&eal);
    let ip = "10.78.1.1".parse().unwrap();
    let in_place = net::InPlace {
        rx: true,
        tx: false,
        tx_store: true,
    };
    let mut opened = net::open(
        &eal,
        1,
        1,
        ip,
        6800,
        "store-tx",
        in_place,
        carmine_dataplane::udp::RPC_MTU_DEFAULT,
    )
    .expect("open the zero-copy client port");
    let mut port = opened.queues.pop().expect("one queue");
    let mut pools = dpdk_common::core_pools();
    pools.attach_nic(port.take_nic_pool().expect("memif receives in place"));

    let start = Instant::now();
    while !peer_tx.link_up() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "memif link down after 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let to = Endpoint {
        mac: [2, 0, 0, 0, 0, 1],
        ip: "10.78.1.2".parse().unwrap(),
        port: 40000,
    };
    // "Store" bytes in the EAL's memory, as the memory store's objects are with the heap on.
    const LEN: usize = 4096;
    // SAFETY: the heap is enabled; 64 is a power of two.
    let stored = unsafe { heap::alloc(LEN, 64) };
    assert!(!stored.is_null() && heap::owns(stored));
    // SAFETY: LEN bytes just allocated, written before any read.
    let stored = unsafe {
        for i in 0..LEN {
            stored.add(i).write((i * 13) as u8);
        }
        std::slice::from_raw_parts(stored, LEN)
    };
    fn receive_one<'p>(rx: &mut carmine_dataplane::dpdk::RxQueue<'_, 'p>) -> Mbuf<'p> {
        let mut got = Vec::with_capacity(32);
        let start = Instant::now();
        while got.is_empty() {
            assert!(start.elapsed() < Duration::from_secs(10), "nothing arrived");
            rx.rx_burst(&mut got);
        }
        assert_eq!(got.len(), 1);
        got.pop().unwrap()
    }

    // 1. Sent where it lies: counted in flight until the peer copied it out.
    // SAFETY: `stored` is not changed (or freed) before stored_in_flight reads 0 below.
    let sent = unsafe { port.send_stored(&to, b"rpc-head", b"reply-head", stored) };
    assert!(matches!(sent, Ok(true)));
    port.flush(&mut pools);
    let stats = port.stats();
    assert_eq!((stats.tx_from_store, stats.tx_in_place), (1, 1));
    assert_eq!(stats.tx_copied_bytes, 10, "only the reply head was copied");
    assert_eq!(
        port.stored_in_flight(&mut pools),
        1,
        "the peer has not copied the frame out yet"
    );
    assert!(port.holds_stored());
    let frame = receive_one(peer_rx);
    let data = frame.data();
    let udp_payload = &data[data.len() - (8 + 10 + LEN)..];
    assert_eq!(&udp_payload[..8], b"rpc-head");
    assert_eq!(&udp_payload[8..18], b"reply-head");
    assert_eq!(&udp_payload[18..], stored, "the peer read the stored bytes");
    drop(frame);
    assert_eq!(
        port.stored_in_flight(&mut pools),
        0,
        "copied out: the driver let go of the frame"
    );
    assert!(!port.holds_stored());
    println!("test store_bytes_held_until_the_peer_copied_them ... ok");

    // 2. Bytes outside the EAL's memory (the system allocator's) are copied: nothing held.
    let plain = vec![7u8; LEN];
    // SAFETY: `plain` outlives the send and the flush.
    let sent = unsafe { port.send_stored(&to, b"rpc-head", b"reply-head", &plain) };
    assert!(matches!(sent, Ok(true)));
    port.flush(&mut pools);
    let stats = port.stats();
    assert_eq!(stats.tx_from_store, 1, "not sent in place");
    assert_eq!(stats.tx_copied_bytes, 10 + 10 + LEN as u64);
    assert_eq!(port.stored_in_flight(&mut pools), 0);
    let frame = receive_one(peer_rx);
    assert!(frame.data().ends_with(&plain));
    drop(frame);
    println!("test other_bytes_copied ... ok");

    println!("\ndpdk_store_tx: 2 passed, 0 failed");
    drop(peer_queues);
    pair.remove_files();
}
