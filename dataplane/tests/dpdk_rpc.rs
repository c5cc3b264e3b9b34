//! The datagram RPC over DPDK: a `net_memif` pair between two processes, Ethernet/IPv4/UDP
//! frames built and parsed by `dgram::ipv4`, ARP answered by the server. The server keeps each
//! received request in the mbufs it arrived in (no copy on receive) and answers with the
//! request's bytes reversed; the client checks every response.
//! This binary is the server; it starts a copy of itself as the client (EAL once per process).
//! Run: `cargo test -p carmine-dataplane --features dpdk --test dpdk_rpc`.

mod dpdk_common;

#[cfg(not(feature = "dpdk"))]
fn main() {
    eprintln!("SKIP: dpdk_rpc needs `--features dpdk` (and libdpdk-dev, clang: see ci/test.sh)");
}

#[cfg(feature = "dpdk")]
mod run {
    use super::dpdk_common;
    use carmine_dataplane::dgram::ipv4::{self, Endpoint, Parsed};
    use carmine_dataplane::dgram::{RpcClient, RpcConfig, RpcServer};
    use carmine_dataplane::dpdk::{udp, Eal, Mbuf, Mempool, Port, PortConfig, RxQueue, TxQueue};
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    /// Requests the client sends (sizes up to 14 packets each).
    pub const REQUESTS: u64 = 3000;

    /// For measuring (not asserted): `CARMINE_RPC_REQUESTS=N CARMINE_RPC_BYTES=B` sends N
    /// requests of B bytes each instead of the varied default mix. Both processes read them.
    fn requests() -> u64 {
        std::env::var("CARMINE_RPC_REQUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(REQUESTS)
    }

    fn fixed_bytes() -> Option<usize> {
        std::env::var("CARMINE_RPC_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
    }
    /// Bound on each side's run.
    const RUN_LIMIT: Duration = Duration::from_secs(120);
    const ROLE_ENV: &str = "CARMINE_RPC_ROLE";
    const SOCKET_ENV: &str = "CARMINE_RPC_SOCKET";
    const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const SERVER_PORT: u16 = 7000;
    const CLIENT_PORT: u16 = 7001;

    /// 5 ms resends, and patience for 10 s without progress: two busy-polling processes on a
    /// shared 2-CPU machine can be held off the CPU for long stretches.
    fn config() -> RpcConfig {
        RpcConfig {
            retries_max: 2000,
            ..RpcConfig::for_mtu(1500)
        }
    }

    fn body(i: u64, fixed: Option<usize>) -> Vec<u8> {
        let len = fixed.unwrap_or((i * 7919 % 20_000) as usize);
        (0..len).map(|b| (b as u64 ^ (i * 3)) as u8).collect()
    }

    /// Sends what fits; false when the tx ring is full (the caller keeps the rest).
    fn push<'p>(
        out: &mut Vec<Mbuf<'p>>,
        tx: &mut TxQueue<'_, 'p>,
        frame: Option<Mbuf<'p>>,
    ) -> bool {
        if out.len() == out.capacity() {
            tx.tx_burst(out);
            if out.len() == out.capacity() {
                return false;
            }
        }
        match frame {
            Some(m) => {
                out.push(m);
                true
            }
            None => false, // pool empty: try again next pass
        }
    }

    pub fn main() {
        let client = std::env::var(ROLE_ENV).is_ok();
        let socket = std::env::var(SOCKET_ENV)
            .unwrap_or_else(|_| format!("/run/carmine-rpc-{}.sock", std::process::id()));
        let role = if client { "client" } else { "server" };
        let prefix = dpdk_common::file_prefix(&format!("rpc-{role}"));
        let vdev = format!("net_memif0,role={role},socket={socket}");
        let args = dpdk_common::eal_args_floating(&prefix, &vdev);
        let eal = match Eal::init(&args) {
            Ok(eal) => eal,
            Err(e) => {
                eprintln!("SKIP: EAL does not start here ({e}); args {args:?}");
                return;
            }
        };
        // The client starts once this EAL has probed memif (that creates the listening socket).
        let child = (!client).then(|| dpdk_common::spawn_self(ROLE_ENV, SOCKET_ENV, &socket));
        let pool = Mempool::new(&eal, role, 8191, 2176).expect("mempool");
        let port = Port::start(&eal, 0, &PortConfig::default(), &[&pool]).expect("memif port");
        let mut queues = port.queues();
        let (rx, tx) = &mut queues[0];
        let mac = port.mac().0;
        if client {
            run_client(
                Endpoint {
                    mac,
                    ip: CLIENT_IP,
                    port: CLIENT_PORT,
                },
                &pool,
                rx,
                tx,
            );
        } else {
            run_server(
                Endpoint {
                    mac,
                    ip: SERVER_IP,
                    port: SERVER_PORT,
                },
                &pool,
                rx,
                tx,
                child.unwrap(),
            );
        }
        drop(queues);
        drop(port);
        assert_eq!(
            pool.in_use_count(),
            0,
            "{role}: every mbuf went back to its pool"
        );
        dpdk_common::remove_runtime_dir(&prefix);
    }

    fn run_server<'a>(
        local: Endpoint,
        pool: &'a Mempool,
        rx: &mut RxQueue<'_, 'a>,
        tx: &mut TxQueue<'_, 'a>,
        mut child: std::process::Child,
    ) {
        let start = Instant::now();
        let mut rpc: RpcServer<Endpoint, Mbuf<'a>, Vec<u8>> = RpcServer::new(config());
        let mut got = Vec::with_capacity(64);
        let mut out: Vec<Mbuf<'a>> = Vec::with_capacity(64);
        let mut replies = Vec::with_capacity(1024);
        let (mut arp_answered, mut single_packet_in_place) = (0u64, 0u64);
        loop {
            if let Some(status) = child.try_wait().expect("wait for client") {
                assert!(status.success(), "rpc client failed: {status}");
                break;
            }
            assert!(
                start.elapsed() < RUN_LIMIT * 2,
                "server: client did not finish; {:?}; pool in use {}",
                rpc.stats(),
                pool.in_use_count()
            );
            rx.rx_burst(&mut got);
            for m in got.drain(..) {
                match ipv4::parse(m.data(), local.ip) {
                    Parsed::ArpRequest { mac, ip } => {
                        arp_answered += 1;
                        let reply = udp::arp_frame(pool, |f| {
                            ipv4::build_arp_reply(f, local.mac, local.ip, mac, ip)
                        });
                        push(&mut out, tx, reply);
                    }
                    Parsed::Udp {
                        source,
                        target_port: SERVER_PORT,
                        payload_offset,
                        ..
                    } => {
                        let frame_start = m.data().as_ptr() as usize;
                        let frame_end = frame_start + m.len();
                        let now = start.elapsed().as_nanos() as u64;
                        rpc.receive(source, m, payload_offset, now, &mut |handle, message| {
                            if let Some(bytes) = message.as_single() {
                                // Handed up where it was received: inside the mbuf, not a copy.
                                let at = bytes.as_ptr() as usize;
                                assert!(at >= frame_start && at + bytes.len() <= frame_end);
                                single_packet_in_place += 1;
                            }
                            let mut r = message.to_vec();
                            r.reverse();
                            replies.push((handle, r));
                        });
                    }
                    _ => {}
                }
            }
            for (handle, r) in replies.drain(..) {
                rpc.reply(handle, r).expect("current");
            }
            rpc.flush_tx(&mut |to, h, p| {
                push(&mut out, tx, udp::udp_frame(pool, &local, to, h, p))
            });
            tx.tx_burst(&mut out);
        }
        let s = rpc.stats();
        assert_eq!(
            s.messages_delivered,
            requests(),
            "each request ran exactly once"
        );
        assert!(arp_answered >= 1, "the client resolved the server with ARP");
        // The default mix has one-packet requests; a fixed size may not.
        let one_packet = config().packet_payload_bytes as usize;
        if !matches!(fixed_bytes(), Some(b) if b > one_packet) {
            assert!(single_packet_in_place > 0);
        }
        println!("server {s:?}, {arp_answered} ARP answered, {single_packet_in_place} single-packet requests read in place");
        println!("test memif_rpc_{}_requests ... ok", requests());
        println!("\ndpdk_rpc: 1 passed, 0 failed");
    }

    fn run_client<'a>(
        local: Endpoint,
        pool: &'a Mempool,
        rx: &mut RxQueue<'_, 'a>,
        tx: &mut TxQueue<'_, 'a>,
    ) {
        let start = Instant::now();
        let now = || start.elapsed().as_nanos() as u64;
        let mut got = Vec::with_capacity(64);
        let mut out: Vec<Mbuf<'a>> = Vec::with_capacity(64);
        // ARP for the server, once a millisecond until it answers (the memif link comes up on
        // its own schedule; frames before that are lost).
        let mut server = None;
        let mut last_ask = None::<Instant>;
        while server.is_none() {
            assert!(start.elapsed() < RUN_LIMIT, "client: no ARP reply");
            let due = match last_ask {
                None => true,
                Some(t) => t.elapsed() > Duration::from_millis(1),
            };
            if due {
                last_ask = Some(Instant::now());
                let ask = udp::arp_frame(pool, |f| {
                    ipv4::build_arp_request(f, local.mac, local.ip, SERVER_IP)
                });
                push(&mut out, tx, ask);
            }
            tx.tx_burst(&mut out);
            rx.rx_burst(&mut got);
            for m in got.drain(..) {
                if let Some((mac, ip)) = ipv4::parse_arp_reply(m.data(), local.ip) {
                    assert_eq!(ip, SERVER_IP);
                    server = Some(Endpoint {
                        mac,
                        ip,
                        port: SERVER_PORT,
                    });
                }
            }
        }
        out.clear();
        let server = server.unwrap();
        let resolved = start.elapsed();
        let mut rpc: RpcClient<Endpoint, Mbuf<'a>, Vec<u8>> =
            RpcClient::new(config(), std::process::id());
        let session = rpc.open_session(server).unwrap();
        let mut ids = std::collections::HashMap::new();
        let (mut issued, mut answered) = (0u64, 0u64);
        let total = requests();
        let fixed = fixed_bytes();
        while answered < total {
            assert!(
                start.elapsed() < RUN_LIMIT,
                "client: {answered}/{total} answered; {:?}; in flight {}; pool in use {}",
                rpc.stats(),
                rpc.in_flight(session),
                pool.in_use_count()
            );
            while issued < total {
                match rpc.request(session, body(issued, fixed), now()) {
                    Ok(id) => {
                        ids.insert(id, issued);
                        issued += 1;
                    }
                    Err(_) => break,
                }
            }
            rpc.flush_tx(&mut |to, h, p| {
                push(&mut out, tx, udp::udp_frame(pool, &local, to, h, p))
            });
            tx.tx_burst(&mut out);
            rx.rx_burst(&mut got);
            for m in got.drain(..) {
                if let Parsed::Udp {
                    source,
                    target_port: CLIENT_PORT,
                    payload_offset,
                    ..
                } = ipv4::parse(m.data(), local.ip)
                {
                    rpc.receive(source, m, payload_offset, now(), &mut |_, id, result| {
                        let index = ids.remove(&id).expect("matches a request in flight");
                        let mut want = body(index, fixed);
                        want.reverse();
                        assert_eq!(result.expect("answered").to_vec(), want, "response {index}");
                        answered += 1;
                    });
                }
            }
            rpc.poll_timers(now(), &mut |_, id, r| {
                panic!("request {id} failed: {:?}", r.err())
            });
        }
        let elapsed = start.elapsed() - resolved;
        println!(
            "client: ARP resolved in {resolved:?}; {total} requests of {fixed:?} bytes answered in {elapsed:?} ({:.0}/s); {:?}",
            total as f64 / elapsed.as_secs_f64(),
            rpc.stats()
        );
    }
}

#[cfg(feature = "dpdk")]
fn main() {
    run::main();
}
