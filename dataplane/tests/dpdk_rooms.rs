//! Zero-copy receive at the port: a datagram that arrives on a `net_memif` port opened with
//! in-place receive is handed up as a `Lease` over the very mbuf room the driver wrote, in the
//! core's `nic` pool; when the lease is released the room goes back to DPDK.
//!
//! One process, both ends of a memif pair (`net_memif0` server, `net_memif1` client, same
//! socket): the client port sends UDP frames built with `dpdk::udp`; the server side is the
//! `DpdkDatagramPort` that `carmine serve --transport dpdk` uses.
//! Run: `cargo test -p carmine-dataplane --features dpdk --test dpdk_rooms` (as root).

mod dpdk_common;

#[cfg(not(feature = "dpdk"))]
fn main() {
    eprintln!("SKIP: dpdk_rooms needs `--features dpdk` (and libdpdk-dev, clang: see ci/test.sh)");
}

#[cfg(feature = "dpdk")]
fn main() {
    use carmine_dataplane::buffers::{pool_id, SizeClass};
    use carmine_dataplane::dgram::ipv4::Endpoint;
    use carmine_dataplane::dpdk::{net, udp, Mempool, Port, PortConfig};
    use carmine_dataplane::udp::{DatagramPort, Received};
    use std::time::{Duration, Instant};

    const DATAGRAMS: usize = 200;
    let Some(pair) = dpdk_common::start_memif_pair("rooms", "") else {
        return;
    };
    let eal = &pair.eal;

    let server_ip = "10.78.0.1".parse().unwrap();
    let in_place = net::InPlace {
        rx: true,
        tx: false,
        tx_store: false,
    };
    let mut opened = net::open(
        &eal,
        0,
        1,
        server_ip,
        6800,
        "rooms",
        in_place,
        carmine_dataplane::udp::RPC_MTU_DEFAULT,
    )
    .expect("open");
    let mut server = opened.queues.pop().expect("one queue");
    let mut pools = dpdk_common::core_pools();
    pools.attach_nic(server.take_nic_pool().expect("memif receives in place"));
    let rooms = pools.nic.as_ref().unwrap().memory();
    let rooms_start = rooms.as_ptr() as usize;
    let rooms_end = rooms_start + rooms.size_bytes();

    let client_pool = Mempool::new(&eal, "rooms-client", 1023, 128 + 9216).unwrap();
    let client = Port::start(&eal, 1, &PortConfig::default(), &[&client_pool]).expect("client");
    let mut queues = client.queues();
    let (_, tx) = &mut queues[0];
    let from = Endpoint {
        mac: client.mac().0,
        ip: "10.78.0.2".parse().unwrap(),
        port: 40000,
    };
    let to = Endpoint {
        mac: opened.mac.0,
        ip: server_ip,
        port: 6800,
    };
    let payload = |i: usize| -> Vec<u8> { (0..4096 + i).map(|b| (b ^ i * 7) as u8).collect() };

    let start = Instant::now();
    let mut out = Vec::with_capacity(64);
    let mut chunk = None;
    let (mut sent, mut received) = (0, 0);
    let mut leases = Vec::new();
    while received < DATAGRAMS {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{received}/{DATAGRAMS} datagrams after 30 s (memif link down?)"
        );
        while sent < DATAGRAMS && sent - received < 32 && out.len() < out.capacity() {
            let frame = udp::udp_frame(&client_pool, &from, &to, b"rpc-head", &payload(sent));
            out.push(frame.expect("client mbuf"));
            sent += 1;
        }
        tx.tx_burst(&mut out);
        match server.recv(&mut pools, &mut chunk).expect("recv") {
            Received::Datagram {
                header,
                payload: lease,
                peer,
            } => {
                assert_eq!(peer, from);
                // The first 32 bytes (the RPC packet header's room) come copied out, the rest
                // as the lease.
                let sent = [&b"rpc-head"[..], &payload(received)].concat();
                assert_eq!(&header[..], &sent[..32], "datagram {received}'s header");
                let bytes = lease.as_slice();
                assert_eq!(bytes, &sent[32..], "datagram {received}");
                let at = bytes.as_ptr() as usize;
                assert!(
                    lease.pool() == pool_id(0, SizeClass::Nic)
                        && at >= rooms_start
                        && at < rooms_end,
                    "datagram {received} is read where the driver wrote it, in a room"
                );
                received += 1;
                leases.push(lease); // ops hold them a while
            }
            Received::Empty => {}
            Received::NoBuffer => panic!("in-place receive needs no chunk"),
            Received::Runt => panic!("every datagram sent is longer than a packet header"),
        }
    }
    assert!(chunk.is_none(), "no chunk was taken to copy into");
    let stats = server.stats();
    assert_eq!((stats.rx_in_place, stats.rx_copies), (DATAGRAMS as u64, 0));
    assert_eq!(stats.rx_copied_bytes, 0);
    assert_eq!(
        stats.rx_rooms_leased, DATAGRAMS as u64,
        "held by the leases"
    );
    let held = server.mbufs_in_use();
    for lease in leases {
        pools.release_lease(lease); // home: the room is free in the nic pool
    }
    assert!(matches!(
        server.recv(&mut pools, &mut chunk).unwrap(),
        Received::Empty
    ));
    assert_eq!(server.stats().rx_rooms_leased, 0, "every room back to DPDK");
    assert!(
        server.mbufs_in_use() + DATAGRAMS as u32 <= held,
        "the rooms' mbufs went back to the rx pool ({} in use, {held} before)",
        server.mbufs_in_use()
    );
    println!("test memif_datagrams_leased_in_their_rooms ... ok");
    println!("\ndpdk_rooms: 1 passed, 0 failed");
    drop(queues);
    pair.remove_files();
}
