//! The datagram RPC over a simulated network that drops, reorders and duplicates packets:
//! every request still runs exactly once on the server and every response arrives exactly once,
//! intact. The clock is simulated, so the test is deterministic and fast.

// `u64::is_multiple_of` is newer than the workspace's rust-version (1.80).
#![allow(clippy::manual_is_multiple_of)]

use carmine_dataplane::dgram::{
    RpcClient, RpcConfig, RpcError, RpcServer, SessionId, CREDITS_PER_SESSION,
};
use std::collections::HashMap;

const CLIENT: u8 = 0;
const SERVER: u8 = 1;

/// A deterministic xorshift: the test needs repeatable "randomness", not quality.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct InFlight {
    to: u8,
    from: u8,
    bytes: Vec<u8>,
    deliver_at_ns: u64,
}

/// A lossy network: drops every `drop_every`-th packet, duplicates every `dup_every`-th, and
/// delays each by a random 0..`jitter_ns` (so packets overtake each other).
struct Net {
    rng: Rng,
    packets: Vec<InFlight>,
    count: u64,
    drop_every: u64,
    dup_every: u64,
    jitter_ns: u64,
    dropped: u64,
    black_hole: bool,
}

impl Net {
    fn send(&mut self, from: u8, to: u8, header: &[u8], payload: &[u8], now: u64) {
        self.count += 1;
        if self.black_hole || (self.drop_every > 0 && self.count % self.drop_every == 0) {
            self.dropped += 1;
            return;
        }
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(payload);
        let copies = if self.dup_every > 0 && self.count % self.dup_every == 0 {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1_000 + self.rng.next() % self.jitter_ns.max(1);
            self.packets.push(InFlight {
                to,
                from,
                bytes: bytes.clone(),
                deliver_at_ns: now + delay,
            });
        }
    }

    fn due(&mut self, now: u64) -> Vec<InFlight> {
        let (due, later): (Vec<_>, Vec<_>) =
            self.packets.drain(..).partition(|p| p.deliver_at_ns <= now);
        self.packets = later;
        due
    }
}

fn request_body(i: u64) -> Vec<u8> {
    // Sizes 0..3000: with 100-byte packets, up to 30 packets per request.
    let len = (i * 397 % 3000) as usize;
    (0..len).map(|b| (i as usize * 7 + b) as u8).collect()
}

/// What the server answers: depends on the whole request, and is often several packets.
fn response_for(request: &[u8]) -> Vec<u8> {
    let mut r: Vec<u8> = request.iter().rev().map(|b| b ^ 0x5a).collect();
    r.extend_from_slice(&(request.len() as u32).to_le_bytes());
    r
}

fn config() -> RpcConfig {
    RpcConfig {
        packet_payload_bytes: 100,
        sessions_max: 8,
        retransmit_timeout_ns: 2_000_000,
        retries_max: 50,
    }
}

/// Runs `total` requests over two sessions through `net` and checks that each ran once on the
/// server and was answered once, with the right bytes.
fn run(net: &mut Net, total: u64) {
    let cfg = config();
    let mut server: RpcServer<u8, Vec<u8>, Vec<u8>> = RpcServer::new(cfg);
    let mut client: RpcClient<u8, Vec<u8>, Vec<u8>> = RpcClient::new(cfg, 1000);
    let sessions = [
        client.open_session(SERVER).unwrap(),
        client.open_session(SERVER).unwrap(),
    ];
    let mut issued = 0u64;
    // request (session, id) -> request index
    let mut outstanding: HashMap<(SessionId, u64), u64> = HashMap::new();
    let mut executions: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut answered = vec![0u32; total as usize];
    let mut pending_replies = Vec::new();
    let mut now = 0u64;
    let mut steps = 0u64;
    while answered.contains(&0) {
        steps += 1;
        assert!(
            steps < 2_000_000,
            "no progress: {} of {total} answered",
            answered.iter().filter(|&&a| a > 0).count()
        );
        now += 50_000;
        // Client issues while slots are free.
        while issued < total {
            let session = sessions[(issued % 2) as usize];
            match client.request(session, request_body(issued), now) {
                Ok(id) => {
                    outstanding.insert((session, id), issued);
                    issued += 1;
                }
                Err(_) => break,
            }
        }
        client.flush_tx(&mut |_, h, p| {
            net.send(CLIENT, SERVER, h, p, now);
            true
        });
        for packet in net.due(now) {
            if packet.to == SERVER {
                server.receive(packet.from, packet.bytes, 0, now, &mut |handle, message| {
                    let body = message.to_vec();
                    *executions.entry(body.clone()).or_default() += 1;
                    pending_replies.push((handle, response_for(&body)));
                });
            } else {
                client.receive(
                    packet.from,
                    packet.bytes,
                    0,
                    now,
                    &mut |session, id, result| {
                        let message = result.expect("no request times out at this loss rate");
                        let index = outstanding
                            .remove(&(session, id))
                            .expect("a response matches a request in flight");
                        assert_eq!(
                            message.to_vec(),
                            response_for(&request_body(index)),
                            "response {index}"
                        );
                        answered[index as usize] += 1;
                    },
                );
            }
        }
        // Replies after the receive pass, the way a reactor answers after executing. The
        // request is still readable in place until then.
        for (handle, response) in pending_replies.drain(..) {
            let kept = server.request(handle).expect("kept until reply").to_vec();
            assert_eq!(response_for(&kept), response);
            server.reply(handle, response).expect("request is current");
            assert!(server.request(handle).is_none(), "released by the reply");
        }
        server.flush_tx(&mut |&to, h, p| {
            net.send(SERVER, to, h, p, now);
            true
        });
        client.poll_timers(now, &mut |_, _, r| {
            panic!("unexpected failure {:?}", r.err())
        });
    }
    assert!(
        answered.iter().all(|&a| a == 1),
        "each response handed up exactly once"
    );
    assert_eq!(executions.len() as u64, total, "every request ran");
    assert_eq!(
        (client.stats().refusals, server.stats().refusals),
        (0, 0),
        "ends of one size refuse nothing, whatever the network does"
    );
    assert!(executions.values().all(|&n| n == 1), "no request ran twice");
    let (cs, ss) = (client.stats(), server.stats());
    println!(
        "client {cs:?}\nserver {ss:?}\nnet dropped {} of {}",
        net.dropped, net.count
    );
}

fn net(drop_every: u64, dup_every: u64, jitter_ns: u64) -> Net {
    Net {
        rng: Rng(0x9e37_79b9_7f4a_7c15),
        packets: Vec::new(),
        count: 0,
        drop_every,
        dup_every,
        jitter_ns,
        dropped: 0,
        black_hole: false,
    }
}

// The execution count keys on the request body: lengths `i * 397 % 3000` differ for every
// i < 3000 (397 is prime to 3000), so 600 requests have distinct bodies.
const REQUESTS: u64 = 600;

#[test]
fn clean_network_in_order() {
    let mut n = net(0, 0, 1);
    run(&mut n, REQUESTS);
}

#[test]
fn loss_every_7th_packet() {
    let mut n = net(7, 0, 1);
    run(&mut n, REQUESTS);
    assert!(n.dropped > 100);
}

#[test]
fn reordering_and_duplicates() {
    // Up to 3 ms of jitter against 50 us steps: packets overtake each other all the time, and
    // past the 2 ms retransmit timeout some resends cross their originals.
    let mut n = net(0, 5, 3_000_000);
    run(&mut n, REQUESTS);
}

#[test]
fn loss_reordering_and_duplicates_together() {
    let mut n = net(11, 13, 1_500_000);
    run(&mut n, REQUESTS);
}

#[test]
fn credit_window_bounds_unacked_packets() {
    let cfg = config();
    let mut client: RpcClient<u8, Vec<u8>, Vec<u8>> = RpcClient::new(cfg, 0);
    let s = client.open_session(SERVER).unwrap();
    client.request(s, vec![1; 64 * 100], 0).unwrap(); // 64 packets
    client.request(s, vec![2; 10], 0).unwrap();
    let mut sent = 0;
    client.flush_tx(&mut |_, _, _| {
        sent += 1;
        true
    });
    assert_eq!(
        sent, CREDITS_PER_SESSION as usize,
        "no more than the credits before an ack"
    );
    let mut again = 0;
    client.flush_tx(&mut |_, _, _| {
        again += 1;
        true
    });
    assert_eq!(again, 0, "nothing more without acks");
}

#[test]
fn black_hole_times_out_once() {
    let mut cfg = config();
    cfg.retries_max = 3;
    let mut client: RpcClient<u8, Vec<u8>, Vec<u8>> = RpcClient::new(cfg, 0);
    let s = client.open_session(SERVER).unwrap();
    let id = client.request(s, vec![7; 250], 0).unwrap();
    let mut failures = Vec::new();
    let mut packets = 0;
    for step in 0..100u64 {
        let now = step * 1_000_000;
        client.flush_tx(&mut |_, _, _| {
            packets += 1;
            true
        });
        client.poll_timers(now, &mut |session, rid, r| {
            failures.push((session, rid, r.err()))
        });
    }
    assert_eq!(failures, vec![(s, id, Some(RpcError::TimedOut))]);
    assert_eq!(
        packets,
        3 + 3 * 3,
        "3 first sends, then 3 resends of the 3 unacked packets"
    );
    assert_eq!(client.in_flight(s), 0);
    assert_eq!(client.stats().timeouts, 1);
}

#[test]
fn server_refuses_sessions_past_the_limit_and_stale_ids() {
    let mut cfg = config();
    cfg.sessions_max = 1;
    let mut server: RpcServer<u8, Vec<u8>, Vec<u8>> = RpcServer::new(cfg);
    let mut clients: Vec<RpcClient<u8, Vec<u8>, Vec<u8>>> =
        (0..2).map(|i| RpcClient::new(cfg, i * 100)).collect();
    let mut delivered = 0;
    for (peer, c) in clients.iter_mut().enumerate() {
        let s = c.open_session(SERVER).unwrap();
        c.request(s, vec![peer as u8; 10], 0).unwrap();
        let mut out = Vec::new();
        c.flush_tx(&mut |_, h, p| {
            out.push([h, p].concat());
            true
        });
        for b in out {
            server.receive(peer as u8, b, 0, 0, &mut |_, _| delivered += 1);
        }
    }
    assert_eq!(delivered, 1);
    assert_eq!(server.session_count(), 1);
    assert_eq!(server.stats().sessions_refused, 1);
}

#[test]
fn idle_sessions_expire_and_their_handles_go_stale() {
    let mut cfg = config();
    cfg.sessions_max = 1;
    let resend_span_ns = cfg.retransmit_timeout_ns * cfg.retries_max as u64;
    let mut server: RpcServer<u8, Vec<u8>, Vec<u8>> = RpcServer::new(cfg);
    let packets_of = |c: &mut RpcClient<u8, Vec<u8>, Vec<u8>>| {
        let mut out = Vec::new();
        c.flush_tx(&mut |_, h, p| {
            out.push([h, p].concat());
            true
        });
        out
    };
    // Client 0 sends a request; the server hands it up but never replies.
    let mut a: RpcClient<u8, Vec<u8>, Vec<u8>> = RpcClient::new(cfg, 0);
    let sa = a.open_session(SERVER).unwrap();
    a.request(sa, vec![1; 10], 0).unwrap();
    let mut handles = Vec::new();
    for b in packets_of(&mut a) {
        server.receive(0, b, 0, 0, &mut |h, _| handles.push(h));
    }
    assert_eq!(handles.len(), 1);
    // Busy sessions (a request being executed) are kept however idle.
    assert_eq!(
        server.expire_idle(10 * resend_span_ns, resend_span_ns + 1),
        0
    );
    // Once answered and idle past the clients' resend span, the session goes.
    server.reply(handles[0], vec![2; 3]).unwrap();
    assert_eq!(
        server.expire_idle(resend_span_ns, resend_span_ns + 1),
        0,
        "not idle long enough"
    );
    assert_eq!(
        server.expire_idle(10 * resend_span_ns, resend_span_ns + 1),
        1
    );
    assert_eq!(server.session_count(), 0);
    // Client 1 now gets the slot in the table; the old handle names nothing.
    let mut b: RpcClient<u8, Vec<u8>, Vec<u8>> = RpcClient::new(cfg, 100);
    let sb = b.open_session(SERVER).unwrap();
    b.request(sb, vec![3; 10], 0).unwrap();
    let mut new_handles = Vec::new();
    for p in packets_of(&mut b) {
        server.receive(1, p, 0, 10 * resend_span_ns, &mut |h, _| {
            new_handles.push(h)
        });
    }
    assert_eq!(
        new_handles.len(),
        1,
        "a new client is served once the idle one expired"
    );
    assert_eq!(server.stats().sessions_refused, 0);
    assert!(server.request(handles[0]).is_none());
    assert!(
        server.reply(handles[0], vec![9]).is_err(),
        "a stale handle cannot answer the new session"
    );
    assert!(server.reply(new_handles[0], vec![4]).is_ok());
}

/// Client and server started with different MTUs: every request fails at once with an error
/// naming both packet sizes, whichever end notices, instead of timing out after every resend.
#[test]
fn mismatched_packet_sizes_fail_at_once_with_both_sizes() {
    use carmine_dataplane::dgram::{PacketHeader, PacketKind, PACKET_HEADER_BYTES};
    let server_cfg = config(); // 100 bytes a packet
    let mut client_cfg = config();
    client_cfg.packet_payload_bytes = 60;
    let mut server: RpcServer<u8, Vec<u8>, Vec<u8>> = RpcServer::new(server_cfg);
    let mut client: RpcClient<u8, Vec<u8>, Vec<u8>> = RpcClient::new(client_cfg, 500);
    let s = client.open_session(SERVER).unwrap();
    let size_error = RpcError::PacketSize {
        client_packet_bytes: 60,
        server_packet_bytes: Some(100),
    };
    let to_server = |c: &mut RpcClient<u8, Vec<u8>, Vec<u8>>| {
        let mut out = Vec::new();
        c.flush_tx(&mut |_, h, p| {
            out.push([h, p].concat());
            true
        });
        out
    };
    let to_client = |srv: &mut RpcServer<u8, Vec<u8>, Vec<u8>>| {
        let mut out = Vec::new();
        srv.flush_tx(&mut |_, h, p| {
            out.push([h, p].concat());
            true
        });
        out
    };

    // A request of several packets: the server refuses it and never runs it.
    let big = client.request(s, vec![1; 250], 0).unwrap();
    let mut delivered = 0;
    for packet in to_server(&mut client) {
        server.receive(CLIENT, packet, 0, 0, &mut |_, _| delivered += 1);
    }
    assert_eq!(
        delivered, 0,
        "a request laid out for another size never runs"
    );
    assert!(server.stats().refusals >= 1);
    // What the client hands up of the server's packets: (session, id, error).
    let answers = |srv: &mut RpcServer<u8, Vec<u8>, Vec<u8>>,
                   c: &mut RpcClient<u8, Vec<u8>, Vec<u8>>| {
        let mut results = Vec::new();
        for packet in to_client(srv) {
            c.receive(SERVER, packet, 0, 0, &mut |session, id, r| {
                results.push((session, id, r.err()))
            });
        }
        results
    };
    assert_eq!(
        answers(&mut server, &mut client),
        vec![(s, big, Some(size_error))],
        "one failure, no wait"
    );
    assert_eq!(client.in_flight(s), 0);
    assert!(size_error
        .to_string()
        .contains("start both with the same --rpc-mtu"));

    // A one-packet request runs, but its response comes in the server's larger packets.
    let small = client.request(s, vec![2; 10], 0).unwrap();
    let mut handles = Vec::new();
    for packet in to_server(&mut client) {
        server.receive(CLIENT, packet, 0, 0, &mut |h, _| handles.push(h));
    }
    assert_eq!(handles.len(), 1, "a request that fits both sizes runs");
    server.reply(handles[0], vec![3; 250]).unwrap();
    assert_eq!(
        answers(&mut server, &mut client),
        vec![(s, small, Some(size_error))],
        "the first (full) response packet shows the server's size; the rest are stale"
    );

    // A refusal that names the client's own size is not believed: the request stays.
    let kept = client.request(s, vec![4; 10], 0).unwrap();
    let mut refusal = [0u8; PACKET_HEADER_BYTES];
    PacketHeader {
        kind: PacketKind::Refuse,
        session: 500 + s.0,
        request_id: kept,
        message_bytes: 0,
        packet_index: 0,
        packet_count: 0,
        ack_count: 0,
        payload_bytes: 0,
        detail: 60,
    }
    .encode(&mut refusal);
    client.receive(SERVER, refusal.to_vec(), 0, 0, &mut |_, _, r| {
        panic!(
            "a refusal naming the client's own size failed a request: {r:?}",
            r = r.err()
        )
    });
    assert_eq!(client.in_flight(s), 1);
    assert_eq!(client.stats().refusals, 2);
}
