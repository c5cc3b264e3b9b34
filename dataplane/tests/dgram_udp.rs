//! The datagram RPC over kernel UDP sockets on 127.0.0.1: the same endpoints as on a DPDK
//! port, with the RPC header at offset 0 of each datagram. Bounded in count and time.

use carmine_dataplane::dgram::{RpcClient, RpcConfig, RpcServer};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const REQUESTS: u64 = 400;
const RUN_LIMIT: Duration = Duration::from_secs(30);

fn body(i: u64) -> Vec<u8> {
    let len = (i * 7919 % 20_000) as usize; // up to 14 packets of 1440 bytes
    (0..len).map(|b| (b as u64 ^ i) as u8).collect()
}

fn send(socket: &UdpSocket, to: &SocketAddr, header: &[u8], payload: &[u8]) -> bool {
    let mut datagram = [0u8; 1500];
    let n = header.len() + payload.len();
    datagram[..header.len()].copy_from_slice(header);
    datagram[header.len()..n].copy_from_slice(payload);
    match socket.send_to(&datagram[..n], to) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("send_to: {e}"),
    }
}

fn recv(socket: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 1500];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => {
            buf.truncate(n);
            Some((buf, from))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("recv_from: {e}"),
    }
}

#[test]
fn kernel_udp_round_trips() {
    let cfg = RpcConfig::for_mtu(1500);
    let server_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    server_socket.set_nonblocking(true).unwrap();
    let server_addr = server_socket.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_server = stop.clone();
    let server = std::thread::spawn(move || {
        let mut rpc: RpcServer<SocketAddr, Vec<u8>, Vec<u8>> = RpcServer::new(cfg);
        let mut replies = Vec::new();
        let clock = Instant::now();
        while !stop_server.load(std::sync::atomic::Ordering::Relaxed) {
            let mut idle = true;
            while let Some((buf, from)) = recv(&server_socket) {
                idle = false;
                rpc.receive(
                    from,
                    buf,
                    0,
                    clock.elapsed().as_nanos() as u64,
                    &mut |handle, message| {
                        let mut r = message.to_vec();
                        r.reverse();
                        replies.push((handle, r));
                    },
                );
            }
            for (handle, r) in replies.drain(..) {
                rpc.reply(handle, r).unwrap();
            }
            rpc.flush_tx(&mut |to, h, p| send(&server_socket, to, h, p));
            if idle {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        rpc.stats()
    });

    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut rpc: RpcClient<SocketAddr, Vec<u8>, Vec<u8>> = RpcClient::new(cfg, std::process::id());
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
        rpc.flush_tx(&mut |to, h, p| send(&socket, to, h, p));
        while let Some((buf, from)) = recv(&socket) {
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let server_stats = server.join().unwrap();
    assert_eq!(
        server_stats.messages_delivered, REQUESTS,
        "each request ran once"
    );
    println!(
        "client {:?}\nserver {server_stats:?} in {:?}",
        rpc.stats(),
        start.elapsed()
    );
}
