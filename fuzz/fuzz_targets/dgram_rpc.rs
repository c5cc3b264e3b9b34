//! The datagram RPC under a hostile network: an `RpcServer` and an `RpcClient` joined by a
//! fake in-memory network that the input controls (drops, duplicates, delays), plus forged
//! packets, both raw bytes and well-formed headers with arbitrary fields, from the client's
//! address and from strangers. Must never panic, and:
//! - a request handed up is readable in place until its reply, and a stale handle's reply is
//!   refused;
//! - the server only emits packets that decode, with payloads as long as their headers say,
//!   also when a response is kept in two parts (cut at a fuzzed point) that packets straddle;
//! - the client hands each request up at most once, and, unless something was forged in the
//!   client's name, the response it gets is the server's echo of exactly the bytes it sent.
#![no_main]

use std::collections::HashMap;

use carmine_dataplane::dgram::{
    PacketHeader, PacketKind, RequestHandle, ResponseParts, RpcClient, RpcConfig, RpcServer,
    SessionId, PACKET_HEADER_BYTES,
};
use libfuzzer_sys::fuzz_target;

/// Peer 0 is the honest client (to the server) and the server (to the client).
type Peer = u8;
const HONEST: Peer = 0;

struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let end = (self.at + n).min(self.bytes.len());
        let out = &self.bytes[self.at..end];
        self.at = end;
        out
    }
}

/// A response kept as two parts: `bytes[..at]`, then `bytes[at..]`.
#[derive(Default)]
struct Split {
    bytes: Vec<u8>,
    at: usize,
}

impl ResponseParts for Split {
    fn parts(&self) -> (&[u8], &[u8]) {
        self.bytes.split_at(self.at)
    }
}

fn config() -> RpcConfig {
    RpcConfig {
        // Small packets, so that multi-packet messages (up to 64 x 16 bytes) are easy to reach.
        packet_payload_bytes: 16,
        sessions_max: 3,
        retransmit_timeout_ns: 100,
        retries_max: 3,
    }
}

/// A well-formed header with fuzzed fields, and as many payload bytes as it claims.
fn forged_packet(input: &mut Input<'_>, kind: PacketKind) -> Option<Vec<u8>> {
    let header = PacketHeader {
        kind,
        session: u32::from(input.byte()? % 4),
        request_id: u64::from(input.byte()?),
        message_bytes: u32::from(input.u16()?),
        packet_index: u16::from(input.byte()? % 8),
        packet_count: u16::from(input.byte()? % 8),
        ack_count: u16::from(input.byte()?),
        payload_bytes: u16::from(input.byte()? % 24),
        // A refusal's packet size: the client's own (16, not believed) or another.
        detail: u32::from(input.byte()? % 32),
    };
    let mut packet = vec![0u8; PACKET_HEADER_BYTES];
    header.encode((&mut packet[..]).try_into().unwrap());
    packet.extend_from_slice(input.take(header.payload_bytes as usize));
    Some(packet)
}

fuzz_target!(|bytes: &[u8]| {
    let config = config();
    let mut input = Input { bytes, at: 0 };
    let mut server: RpcServer<Peer, Vec<u8>, Split> = RpcServer::new(config);
    // The client's wire session ids start at 0, so forged session ids 0..4 can hit it.
    let mut client: RpcClient<Peer, Vec<u8>, Vec<u8>> = RpcClient::new(config, 0);
    let sessions = [
        client.open_session(HONEST).unwrap(),
        client.open_session(HONEST).unwrap(),
    ];
    let mut handles: Vec<RequestHandle> = Vec::new();
    let mut expected: HashMap<(SessionId, u64), Vec<u8>> = HashMap::new();
    // Packets in flight on the fake network: (to the server?, bytes).
    let mut network: Vec<(bool, Vec<u8>)> = Vec::new();
    let mut forged_for_client = false;
    let mut now = 0u64;
    let mut steps = 0;
    while let Some(op) = input.byte() {
        steps += 1;
        if steps > 512 {
            break;
        }
        now += u64::from(op >> 4) * 10;
        let mut on_request = |handle: RequestHandle, message: &carmine_dataplane::dgram::Message<'_, Vec<u8>>| {
            assert!(message.len() <= config.message_bytes_max());
            assert_eq!(message.to_vec().len(), message.len());
            handles.push(handle);
        };
        match op % 10 {
            // Raw bytes to the server from anyone.
            0 => {
                let peer = input.byte().unwrap_or(0) % 4;
                let len = usize::from(input.byte().unwrap_or(0));
                let offset = usize::from(input.byte().unwrap_or(0) % 4);
                let packet = input.take(len).to_vec();
                forged_for_client |= peer == HONEST;
                server.receive(peer, packet, offset, now, &mut on_request);
            }
            // A well-formed request packet with fuzzed fields to the server.
            1 => {
                let peer = input.byte().unwrap_or(0) % 4;
                let Some(packet) = forged_packet(&mut input, PacketKind::Request) else { break };
                forged_for_client |= peer == HONEST;
                server.receive(peer, packet, 0, now, &mut on_request);
            }
            // A well-formed response or ack (or raw bytes) to the client, "from the server".
            2 => {
                let kind = match input.byte().unwrap_or(0) % 4 {
                    0 => PacketKind::Response,
                    1 => PacketKind::Ack,
                    2 => PacketKind::Refuse,
                    _ => PacketKind::Request,
                };
                let Some(packet) = forged_packet(&mut input, kind) else { break };
                forged_for_client = true;
                client.receive(HONEST, packet, 0, now, &mut |session, id, result| {
                    assert!(expected.remove(&(session, id)).is_some(), "handed up once");
                    let _ = result;
                });
            }
            // The server answers its oldest request with the request's own bytes.
            3 => {
                if handles.is_empty() {
                    continue;
                }
                let handle = handles.remove(0);
                let body = server.request(handle).map(|m| m.to_vec());
                let bytes = body.clone().unwrap_or_default();
                let at = usize::from(input.u16().unwrap_or(0)) % (bytes.len() + 1);
                let outcome = server.reply(handle, Split { bytes, at });
                assert_eq!(outcome.is_ok(), body.is_some(), "a stale handle is refused");
            }
            // The client sends a request.
            4 => {
                let session = sessions[usize::from(input.byte().unwrap_or(0) % 2)];
                let len = usize::from(input.u16().unwrap_or(0)) % (config.message_bytes_max() + 1);
                let body = input.take(len).to_vec();
                if let Ok(id) = client.request(session, body.clone(), now) {
                    assert!(expected.insert((session, id), body).is_none());
                }
            }
            // Both ends flush onto the network; the input picks what is lost.
            5 => {
                let mut sent = Vec::new();
                server.flush_parts(&mut |peer, head, payload, tail| {
                    let mut packet = head.to_vec();
                    packet.extend_from_slice(payload);
                    packet.extend_from_slice(tail);
                    let header = PacketHeader::decode(&packet).expect("the server's packets decode");
                    assert_ne!(header.kind, PacketKind::Request);
                    assert_eq!(usize::from(header.payload_bytes), payload.len() + tail.len());
                    if *peer == HONEST {
                        sent.push((false, packet));
                    }
                    true
                });
                client.flush_tx(&mut |peer, head, payload| {
                    assert_eq!(*peer, HONEST);
                    let mut packet = head.to_vec();
                    packet.extend_from_slice(payload);
                    let header = PacketHeader::decode(&packet).expect("the client's packets decode");
                    assert_eq!(header.kind, PacketKind::Request);
                    sent.push((true, packet));
                    true
                });
                let loss = input.byte().unwrap_or(0);
                for (i, packet) in sent.into_iter().enumerate() {
                    if loss & (1 << (i % 8)) == 0 {
                        network.push(packet);
                    }
                }
            }
            // Deliver the network's packets, in an order the input picks (and maybe twice).
            6 => {
                let rotate = usize::from(input.byte().unwrap_or(0));
                let duplicate = input.byte().unwrap_or(0) & 1 == 1;
                if !network.is_empty() {
                    let len = network.len();
                    network.rotate_left(rotate % len);
                }
                let batch: Vec<_> = network.drain(..).collect();
                for (to_server, packet) in batch {
                    let copies = if duplicate { 2 } else { 1 };
                    for _ in 0..copies {
                        if to_server {
                            server.receive(HONEST, packet.clone(), 0, now, &mut on_request);
                        } else {
                            client.receive(HONEST, packet.clone(), 0, now, &mut |session, id, result| {
                                let body = expected.remove(&(session, id));
                                assert!(body.is_some(), "handed up once");
                                if !forged_for_client {
                                    // Ends of one packet size never refuse each other.
                                    let message = result.expect("an honest exchange succeeds");
                                    assert_eq!(message.to_vec(), body.unwrap(), "the echo of the request");
                                }
                            });
                        }
                    }
                }
            }
            // The client's timers: resends and timeouts.
            7 => {
                now += 100;
                client.poll_timers(now, &mut |session, id, _| {
                    assert!(expected.remove(&(session, id)).is_some(), "handed up once");
                });
            }
            // Idle sessions expire.
            8 => {
                now += 1_000;
                server.expire_idle(now, 500);
            }
            _ => now += 1,
        }
        assert!(server.session_count() <= config.sessions_max as usize);
    }
});
