//! The datagram RPC over kernel UDP sockets on 127.0.0.1: the same endpoints as on a DPDK
//! port, with the RPC header at offset 0 of each datagram, received into `UdpSocketPort`'s
//! fixed buffers. Bounded in count and time.

use carmine_dataplane::dgram::socket::{RecvBuf, UdpSocketPort};
use carmine_dataplane::dgram::{RpcClient, RpcConfig, RpcServer, SLOTS_PER_SESSION};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REQUESTS: u64 = 400;
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Receive buffers per socket: every packet of a session's 8 largest messages (14 packets each)
/// can sit in reassembly, with room left for a burst.
const BUFFERS: usize = SLOTS_PER_SESSION * 14 + 64;

fn body(i: u64) -> Vec<u8> {
    let len = (i * 7919 % 20_000) as usize; // up to 14 packets of 1440 bytes
    (0..len).map(|b| (b as u64 ^ i) as u8).collect()
}

fn send(port: &mut UdpSocketPort, to: &SocketAddr, header: &[u8], payload: &[u8]) -> bool {
    port.send(to, header, payload).expect("send_to")
}

#[test]
fn kernel_udp_round_trips() {
    let cfg = RpcConfig::for_mtu(1500);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_server = stop.clone();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        // Made on its own thread: a socket port and its buffers belong to one core.
        let mut port = UdpSocketPort::bind("127.0.0.1:0", BUFFERS, 1500).unwrap();
        addr_tx.send(port.local_addr().unwrap()).unwrap();
        let mut rpc: RpcServer<SocketAddr, RecvBuf, Vec<u8>> = RpcServer::new(cfg);
        let mut replies = Vec::new();
        let clock = Instant::now();
        while !stop_server.load(Ordering::Relaxed) {
            let mut idle = true;
            while let Some((buf, from)) = port.recv().unwrap() {
                idle = false;
                let now = clock.elapsed().as_nanos() as u64;
                rpc.receive(from, buf, 0, now, &mut |handle, message| {
                    let mut r = message.to_vec();
                    r.reverse();
                    replies.push((handle, r));
                });
            }
            for (handle, r) in replies.drain(..) {
                rpc.reply(handle, r).unwrap();
            }
            rpc.flush_tx(&mut |to, h, p| send(&mut port, to, h, p));
            port.flush().expect("sendmmsg");
            if idle {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        (rpc.stats(), port.free_buffer_count())
    });
    let server_addr = addr_rx.recv().unwrap();

    let mut port = UdpSocketPort::bind("127.0.0.1:0", BUFFERS, 1500).unwrap();
    let mut rpc: RpcClient<SocketAddr, RecvBuf, Vec<u8>> = RpcClient::new(cfg, std::process::id());
    let session = rpc.open_session(server_addr).unwrap();
    let start = Instant::now();
    let now = || start.elapsed().as_nanos() as u64;
    let (mut issued, mut answered) = (0u64, 0u64);
    let mut ids = std::collections::HashMap::new();
    while answered < REQUESTS {
        assert!(
            start.elapsed() < RUN_LIMIT,
            "{answered}/{REQUESTS} answered"
        );
        while issued < REQUESTS {
            match rpc.request(session, body(issued), now()) {
                Ok(id) => {
                    ids.insert(id, issued);
                    issued += 1;
                }
                Err(_) => break,
            }
        }
        rpc.flush_tx(&mut |to, h, p| send(&mut port, to, h, p));
        port.flush().expect("sendmmsg");
        while let Some((buf, from)) = port.recv().unwrap() {
            rpc.receive(from, buf, 0, now(), &mut |_, id, result| {
                let index = ids.remove(&id).expect("matches a request");
                let mut want = body(index);
                want.reverse();
                assert_eq!(result.expect("answered").to_vec(), want);
                answered += 1;
            });
        }
        rpc.poll_timers(now(), &mut |_, id, r| {
            panic!("request {id} failed: {:?}", r.err())
        });
    }
    stop.store(true, Ordering::Relaxed);
    let (server_stats, server_free) = server.join().unwrap();
    assert_eq!(
        server_stats.messages_delivered, REQUESTS,
        "each request ran once"
    );
    assert_eq!(
        port.free_buffer_count(),
        BUFFERS,
        "client: every receive buffer came back"
    );
    assert_eq!(
        server_free, BUFFERS,
        "server: replied requests let their buffers go"
    );
    println!(
        "client {:?}\nserver {server_stats:?} in {:?}",
        rpc.stats(),
        start.elapsed()
    );
}
