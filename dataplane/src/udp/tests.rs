//! The transport over loopback sockets: requests in place or copied once, replies inline,
//! from the store's memory or from a chunk, resends, and every buffer back in its pool.

use super::*;
use crate::buffers::PoolSizes;
use crate::dgram::RpcClient;
use crate::wire::{Frame, Opcode, SubOpSpec};

fn pools() -> CorePools {
    let sizes = PoolSizes {
        small_size_bytes: 128 << 10,
        small_count: 16,
        large_size_bytes: 1 << 20,
        large_count: 2,
    };
    CorePools::new(0, sizes, false).unwrap()
}

/// A transport of core 0 on a loopback socket, default limits and RPC MTU.
fn loopback_server() -> UdpRpcTransport {
    let socket = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1).unwrap();
    UdpRpcTransport::new(
        0,
        socket.into_iter().next().unwrap(),
        Limits::DEFAULT,
        0,
        RPC_MTU_DEFAULT,
    )
    .unwrap()
}

/// Sends `frame` from a kernel-UDP RPC client and polls the transport until it hands the
/// request up; returns it with the client pieces.
fn exchange(
    server: &mut UdpRpcTransport,
    pools: &mut CorePools,
    frame: Vec<u8>,
) -> (UdpRequest, crate::dgram::socket::UdpSocketPort) {
    use crate::dgram::socket::UdpSocketPort;
    let to = server.local_addr().unwrap();
    let mut client_port = UdpSocketPort::bind("127.0.0.1:0", 8, DATAGRAM_BYTES_MAX).unwrap();
    let mut client: RpcClient<SocketAddr, crate::dgram::socket::RecvBuf, Vec<u8>> =
        RpcClient::new(rpc_config(RPC_MTU_DEFAULT), 7);
    let session = client.open_session(to).unwrap();
    client.request(session, frame, 0).unwrap();
    client.flush_tx(&mut |peer, h, p| client_port.send(peer, h, p).unwrap());
    client_port.flush().unwrap();
    for _ in 0..100_000 {
        let mut got = None;
        server.poll_rx(pools, 16, 1, &mut |r| got = Some(r));
        if let Some(request) = got {
            return (request, client_port);
        }
        std::thread::yield_now();
    }
    panic!("request never arrived");
}

fn write_frame(data_len: usize) -> Vec<u8> {
    let data = vec![0x5a; data_len];
    let mut frame = Vec::new();
    let ops = [SubOpSpec::write(0, &data)];
    wire::encode_request(&mut frame, Opcode::OsdOp, 42, b"obj.1", &ops, b"");
    frame
}

#[test]
fn one_packet_request_is_leased_in_place_and_several_are_copied_once() {
    let mut pools = pools();
    let mut server = loopback_server();
    let frame = write_frame(4096);
    let (request, _client) = exchange(&mut server, &mut pools, frame.clone());
    assert_eq!(request.frame.as_slice(), &frame[..]);
    assert_eq!(request.header.request_id, 42);
    let stats = server.stats();
    assert_eq!((stats.frames_in_place, stats.frames_copied), (1, 0));
    assert_eq!(stats.rx_copied_bytes, 0, "a one-packet write is not copied");
    assert_eq!(
        server.held, 0,
        "the RPC handed its lease over the packet up as the frame (no second lease)"
    );
    pools.release_lease(request.frame);

    let big = write_frame(20_000); // three packets of 8940 bytes
    let (request, _client) = exchange(&mut server, &mut pools, big.clone());
    assert_eq!(request.frame.as_slice(), &big[..]);
    let stats = server.stats();
    assert_eq!((stats.frames_in_place, stats.frames_copied), (1, 1));
    assert_eq!(stats.rx_copied_bytes, big.len() as u64);
    assert_eq!(
        server.held, 3,
        "the RPC keeps a request's packets until the reply"
    );
    pools.release_lease(request.frame);
    server.close_all(&mut pools);
    assert_eq!(pools.in_use(), 0, "every buffer came back");
}

#[test]
fn datagrams_that_are_not_packets_are_counted_malformed_and_hold_nothing() {
    let mut pools = pools();
    let mut server = loopback_server();
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = server.local_addr().unwrap();
    sender.send_to(b"short", to).unwrap(); // under a packet header
    sender.send_to(&[0x5a; 64], to).unwrap(); // a header's length, not a header
    let mut seen = 0;
    for _ in 0..100_000 {
        server.poll_rx(&mut pools, 16, 1, &mut |_| panic!("nothing to hand up"));
        seen = server.stats().rpc.packets_rx;
        if seen == 2 {
            break;
        }
        std::thread::yield_now();
    }
    assert_eq!(seen, 2, "both datagrams arrived");
    let stats = server.stats();
    assert_eq!((stats.datagrams_rx, stats.rpc.malformed), (2, 2));
    assert_eq!(server.held, 0, "neither is kept");
    server.close_all(&mut pools);
    assert_eq!(pools.in_use(), 0, "every buffer came back");
}

/// Receives on `client_port` until `client` hands up a response; returns its bytes.
fn await_response(
    client: &mut RpcClient<SocketAddr, crate::dgram::socket::RecvBuf, Vec<u8>>,
    client_port: &mut crate::dgram::socket::UdpSocketPort,
) -> Vec<u8> {
    for _ in 0..100_000 {
        if let Some((buf, peer)) = client_port.recv().unwrap() {
            let mut got = None;
            client.receive(peer, buf, 0, 1, &mut |_, _, response| {
                let message = response.expect("a response, not an error");
                let mut bytes = vec![0; message.len()];
                message.copy_to(&mut bytes);
                got = Some(bytes);
            });
            if let Some(bytes) = got {
                return bytes;
            }
        }
        std::thread::yield_now();
    }
    panic!("response never arrived");
}

/// The reply to `request` must be a valid frame (its crc over what was sent) whose output
/// is `expected`.
fn assert_reply(response: &[u8], expected: &[u8]) {
    let header = wire::parse_header(response, &Limits::DEFAULT)
        .unwrap()
        .expect("a whole frame");
    assert_eq!(header.frame_len(), response.len());
    assert!(
        Frame::view(header, response).crc_ok(response),
        "the reply crc covers the bytes sent"
    );
    assert_eq!(&response[response.len() - expected.len()..], expected);
}

type TestClient = RpcClient<SocketAddr, crate::dgram::socket::RecvBuf, Vec<u8>>;

/// Answers `request` as a write is answered: OK, one result, no output (kept inline).
fn reply_one_result(
    server: &mut UdpRpcTransport,
    pools: &mut CorePools,
    handle: RequestHandle,
    header: &Header,
) {
    let results = [(0, 0)];
    server.reply(pools, handle, header, Status::Ok, &results, Body::None);
}

/// A kernel-UDP RPC client of `server` with packets sized for `mtu`.
fn client_of(
    server: &UdpRpcTransport,
    mtu: u16,
) -> (
    TestClient,
    crate::dgram::socket::UdpSocketPort,
    crate::dgram::SessionId,
) {
    let port =
        crate::dgram::socket::UdpSocketPort::bind("127.0.0.1:0", 8, DATAGRAM_BYTES_MAX).unwrap();
    let mut client: TestClient = RpcClient::new(rpc_config(mtu), 7);
    let session = client.open_session(server.local_addr().unwrap()).unwrap();
    (client, port, session)
}

/// Sends a 4 KiB read from `client` and polls `server` until it hands the request up.
fn read_request(
    (client, client_port, session): (
        &mut TestClient,
        &mut crate::dgram::socket::UdpSocketPort,
        crate::dgram::SessionId,
    ),
    server: &mut UdpRpcTransport,
    pools: &mut CorePools,
    now_ns: u64,
) -> UdpRequest {
    let mut frame = Vec::new();
    let ops = [SubOpSpec::read(0, 4096)];
    wire::encode_request(&mut frame, Opcode::OsdOp, 9, b"obj.1", &ops, b"");
    client.request(session, frame, now_ns).unwrap();
    client.flush_tx(&mut |peer, h, p| client_port.send(peer, h, p).unwrap());
    client_port.flush().unwrap();
    for _ in 0..100_000 {
        let mut got = None;
        server.poll_rx(pools, 16, now_ns, &mut |r| got = Some(r));
        if let Some(request) = got {
            return request;
        }
        std::thread::yield_now();
    }
    panic!("request never arrived");
}

/// Answers `request` with `store`'s bytes as a read in place would (`Body::Stored`).
///
/// # Safety
/// `store` stays unchanged until `copy_stored_bodies` returned true (or the reply went).
unsafe fn reply_stored(
    server: &mut UdpRpcTransport,
    pools: &mut CorePools,
    request: &UdpRequest,
    store: &[u8],
) {
    use crate::buffers::StoredBytes;
    let crc = carmine_crc::crc32c(store);
    // SAFETY: the caller's promise.
    let stored = unsafe { StoredBytes::new(store.as_ptr(), store.len(), crc) };
    let results = [(0, store.len() as u32)];
    let body = Body::Stored(stored);
    server.reply(
        pools,
        request.handle,
        &request.header,
        Status::Ok,
        &results,
        body,
    );
}

/// Receives the datagrams of one response on `client_port` without giving them to the
/// client (a reply lost on the way): their bytes, in order.
fn lose_response(
    client_port: &mut crate::dgram::socket::UdpSocketPort,
    packets: usize,
) -> Vec<Vec<u8>> {
    let mut lost = Vec::new();
    for _ in 0..100_000 {
        if let Some((buf, _)) = client_port.recv().unwrap() {
            lost.push(buf.as_ref().to_vec());
            if lost.len() == packets {
                return lost;
            }
        }
        std::thread::yield_now();
    }
    panic!("response never arrived");
}

/// A read answered from store memory (`Body::Stored`) is kept by the RPC as its head and
/// the store's bytes: no response buffer is taken and nothing but the head is copied here
/// (the payload is copied once, into each packet), and the client gets a valid frame, in
/// one packet or (at a 1280-byte MTU) in four that each take bytes of both parts. Before
/// the store may change, `copy_stored_bodies` moves the kept response into a pool chunk.
#[test]
fn read_replies_are_sent_from_the_store_with_one_copy_of_the_payload() {
    for mtu in [RPC_MTU_DEFAULT, RPC_MTU_MIN] {
        let mut pools = pools();
        let socket = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let mut server = UdpRpcTransport::new(
            0,
            socket.into_iter().next().unwrap(),
            Limits::DEFAULT,
            0,
            mtu,
        )
        .unwrap();
        let (mut client, mut client_port, session) = client_of(&server, mtu);
        let store: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 256) as u8).collect();
        let request = read_request(
            (&mut client, &mut client_port, session),
            &mut server,
            &mut pools,
            1,
        );
        // SAFETY: `store` is not changed in this test.
        unsafe { reply_stored(&mut server, &mut pools, &request, &store) };
        pools.release_lease(request.frame);
        assert!(
            server.tx_chunk.is_none(),
            "no buffer taken for the response"
        );
        let head_len = (wire::HEADER_SIZE + wire::SUB_OP_RESULT_SIZE) as u64;
        let stats = server.stats();
        assert_eq!(stats.replies_from_store, 1);
        assert_eq!(
            stats.tx_copied_bytes, head_len,
            "only the head copied: mtu {mtu}"
        );
        assert!(
            server.has_stored_bodies(),
            "kept in store memory for resends"
        );
        let packets = server.flush_tx(&mut pools);
        assert_eq!(packets, if mtu == RPC_MTU_MIN { 4 } else { 1 }, "mtu {mtu}");
        let response = await_response(&mut client, &mut client_port);
        assert_reply(&response, &store);
        assert!(server.copy_stored_bodies(&mut pools));
        assert!(!server.has_stored_bodies());
        let stats = server.stats();
        assert_eq!(stats.stored_responses_copied, 1);
        assert_eq!(stats.tx_copied_bytes, head_len + head_len + 4096);
        server.close_all(&mut pools);
        assert_eq!(pools.in_use(), 0, "every buffer came back");
    }
}

/// A read reply lost on the way is sent again, byte for byte the same and with a crc the
/// client accepts: once straight from the store, and once after the store changed, from
/// the copy `copy_stored_bodies` made of the bytes the op read.
#[test]
fn a_lost_read_reply_is_resent_byte_identical_even_after_the_store_changed() {
    let mut pools = pools();
    let mut server = loopback_server();
    let (mut client, mut client_port, session) = client_of(&server, RPC_MTU_DEFAULT);
    let mut store = vec![0x11u8; 4096];
    let timeout_ns = rpc_config(RPC_MTU_DEFAULT).retransmit_timeout_ns;
    for (round, change_store) in [false, true].into_iter().enumerate() {
        let start = round as u64 * 10 * timeout_ns;
        let request = read_request(
            (&mut client, &mut client_port, session),
            &mut server,
            &mut pools,
            start,
        );
        // SAFETY: `store` changes below only after `copy_stored_bodies` returned true.
        unsafe { reply_stored(&mut server, &mut pools, &request, &store) };
        pools.release_lease(request.frame);
        let before = store.clone();
        assert_eq!(server.flush_tx(&mut pools), 1);
        let lost = lose_response(&mut client_port, 1);
        if change_store {
            assert!(server.copy_stored_bodies(&mut pools));
            store.fill(0x22);
        }
        // The client's timer resends the request's last packet; the server answers it with
        // the response it kept (the request does not run again).
        let now = start + 2 * timeout_ns;
        client.poll_timers(now, &mut |_, _, _| panic!("no response was received"));
        client.flush_tx(&mut |peer, h, p| client_port.send(peer, h, p).unwrap());
        client_port.flush().unwrap();
        let retransmits = server.stats().rpc.retransmits;
        for _ in 0..100_000 {
            server.poll_rx(&mut pools, 16, now, &mut |_| panic!("executed twice"));
            if server.stats().rpc.retransmits > retransmits {
                break;
            }
            std::thread::yield_now();
        }
        assert_eq!(server.stats().rpc.retransmits, retransmits + 1);
        assert_eq!(server.flush_tx(&mut pools), 1);
        // The client takes it: the same bytes as the lost one, a frame whose crc covers
        // the bytes the op read.
        let (buf, peer) = loop {
            if let Some(got) = client_port.recv().unwrap() {
                break got;
            }
            std::thread::yield_now();
        };
        assert_eq!(
            buf.as_ref(),
            &lost[0][..],
            "round {round}: the resent reply is the lost one"
        );
        let mut got = None;
        client.receive(peer, buf, 0, now, &mut |_, _, response| {
            let message = response.expect("a response, not an error");
            let mut bytes = vec![0; message.len()];
            message.copy_to(&mut bytes);
            got = Some(bytes);
        });
        assert_reply(&got.expect("handed up"), &before);
    }
    assert_eq!(server.stats().stored_responses_copied, 1);
    server.close_all(&mut pools);
    assert_eq!(pools.in_use(), 0, "every buffer came back");
}

/// A reply from store memory queued behind one waiting for a buffer waits too (in order),
/// still pointing into the store; `copy_stored_bodies` (which a mutation of the store
/// waits for) copies it into a pool buffer, and it sends the bytes as they were when the
/// op read them.
#[test]
fn waiting_stored_bodies_are_copied_out_of_the_store_before_it_changes() {
    let mut pools = pools();
    let mut server = loopback_server();
    let (mut client, mut client_port, session) = client_of(&server, RPC_MTU_DEFAULT);
    let mut store = vec![0x11u8; 4096];
    let first = read_request(
        (&mut client, &mut client_port, session),
        &mut server,
        &mut pools,
        1,
    );
    let second = read_request(
        (&mut client, &mut client_port, session),
        &mut server,
        &mut pools,
        1,
    );
    if let Some(chunk) = server.tx_chunk.take() {
        pools.release(chunk);
    }
    let mut taken = Vec::new();
    while let Some(buf) = pools.small.acquire() {
        taken.push(buf);
    }
    while let Some(buf) = pools.large.acquire() {
        taken.push(buf);
    }
    // The first reply's output is a pool buffer: it needs a response chunk, and waits.
    let mut output = taken.pop().expect("a buffer");
    output.spare_mut()[..4096].fill(0x33);
    output.seal(4096);
    server.reply(
        &mut pools,
        first.handle,
        &first.header,
        Status::Ok,
        &[(0, 4096)],
        Body::Buf(output),
    );
    // SAFETY: `store` changes only after `copy_stored_bodies` returned true below.
    unsafe { reply_stored(&mut server, &mut pools, &second, &store) };
    pools.release_lease(first.frame);
    pools.release_lease(second.frame);
    assert!(
        server.has_stored_bodies(),
        "waiting for a buffer, still in the store"
    );
    assert!(
        !server.copy_stored_bodies(&mut pools),
        "no buffer to copy into either: the mutation must wait"
    );
    for buf in taken {
        pools.release(buf);
    }
    assert!(server.copy_stored_bodies(&mut pools));
    assert!(!server.has_stored_bodies());
    assert_eq!(server.stats().stored_bodies_copied, 1);
    let before = store.clone();
    store.fill(0x22); // the store changes: the waiting reply has its own copy
    server.flush_tx(&mut pools);
    let mut responses = [
        await_response(&mut client, &mut client_port),
        await_response(&mut client, &mut client_port),
    ];
    responses.sort_by_key(|r| r[r.len() - 1]);
    assert_reply(&responses[0], &before);
    assert_reply(&responses[1], &[0x33; 4096]);
    assert_eq!(
        server.stats().replies_from_store,
        0,
        "the second went out from its pool copy"
    );
    server.close_all(&mut pools);
    assert_eq!(pools.in_use(), 0, "every buffer came back");
}

/// A write's reply (a head with one result, no output) is kept inline in the RPC: no
/// response chunk is taken, and the client gets a valid frame.
#[test]
fn small_replies_are_kept_inline() {
    let mut pools = pools();
    let mut server = loopback_server();
    let to = server.local_addr().unwrap();
    let mut client_port =
        crate::dgram::socket::UdpSocketPort::bind("127.0.0.1:0", 8, DATAGRAM_BYTES_MAX).unwrap();
    let mut client: RpcClient<SocketAddr, crate::dgram::socket::RecvBuf, Vec<u8>> =
        RpcClient::new(rpc_config(RPC_MTU_DEFAULT), 7);
    let session = client.open_session(to).unwrap();
    client.request(session, write_frame(4096), 0).unwrap();
    client.flush_tx(&mut |peer, h, p| client_port.send(peer, h, p).unwrap());
    client_port.flush().unwrap();
    let mut request = None;
    for _ in 0..100_000 {
        server.poll_rx(&mut pools, 16, 1, &mut |r| request = Some(r));
        if request.is_some() {
            break;
        }
        std::thread::yield_now();
    }
    let request = request.expect("request never arrived");
    pools.release_lease(request.frame);
    let in_use = pools.in_use();
    reply_one_result(&mut server, &mut pools, request.handle, &request.header);
    assert_eq!(pools.in_use(), in_use, "no buffer taken for the response");
    server.flush_tx(&mut pools);
    let response = await_response(&mut client, &mut client_port);
    assert_eq!(response.len(), wire::HEADER_SIZE + wire::SUB_OP_RESULT_SIZE);
    assert!(response.len() <= INLINE_RESPONSE_MAX_BYTES);
    assert_reply(&response, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(server.stats().tx_copied_bytes, response.len() as u64);
    server.close_all(&mut pools);
    assert_eq!(pools.in_use(), 0, "every buffer came back");
}

#[test]
fn reuseport_sockets_share_one_port() {
    let sockets = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3).unwrap();
    let port = sockets[0].local_addr().unwrap().port();
    assert_ne!(port, 0);
    assert!(sockets
        .iter()
        .all(|s| s.local_addr().unwrap().port() == port));
}

/// A burst of requests costs the server one `recvmmsg` (and one to find the socket empty),
/// and the burst of replies one `sendmmsg`; every request arrives intact, each reply as sent,
/// and the chunk slots given to the kernel come back with the leases.
#[test]
fn a_burst_is_received_and_answered_in_one_system_call_each() {
    let mut pools = pools();
    let mut server = loopback_server();
    let (mut client, mut client_port, session) = client_of(&server, RPC_MTU_DEFAULT);
    let burst = crate::dgram::SLOTS_PER_SESSION;
    let frames: Vec<Vec<u8>> = (0..burst).map(|i| write_frame(100 + 500 * i)).collect();
    for frame in &frames {
        client.request(session, frame.clone(), 0).unwrap();
    }
    client.flush_tx(&mut |peer, h, p| client_port.send(peer, h, p).unwrap());
    assert_eq!(client_port.queued_tx(), burst);
    client_port.flush().unwrap();
    assert_eq!(
        client_port.send_calls(),
        1,
        "the client's burst is one sendmmsg"
    );
    // Let the whole burst land before the server looks, so one call can take it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut requests = Vec::new();
    for _ in 0..100 {
        server.poll_rx(&mut pools, 64, 1, &mut |r| requests.push(r));
        if requests.len() == burst {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(requests.len(), burst, "every request arrived");
    let port = server.stats().port;
    assert!(
        port.recv_calls <= 3,
        "{burst} datagrams took {} recvmmsg calls",
        port.recv_calls
    );
    for request in &requests {
        let id = request.header.request_id;
        assert!(
            frames.iter().any(|f| f == request.frame.as_slice()),
            "request {id} intact"
        );
    }
    for request in requests {
        reply_one_result(&mut server, &mut pools, request.handle, &request.header);
        pools.release_lease(request.frame);
    }
    server.flush_tx(&mut pools);
    assert_eq!(
        server.stats().port.send_calls,
        1,
        "the replies are one sendmmsg"
    );
    assert!(!server.has_pending_tx());
    for _ in 0..burst {
        let response = await_response(&mut client, &mut client_port);
        assert_reply(&response, &[0, 0, 0, 0, 0, 0, 0, 0]);
    }
    server.close_all(&mut pools);
    assert_eq!(
        pools.in_use(),
        0,
        "every buffer came back, the unused slots too"
    );
}
