use super::*;
use crate::buffers::{PoolSizes, StoredBytes};
use crate::reactor::Waker;
use crate::wire::{Opcode, SubOpSpec};
use std::io::{Read, Write};

/// Runs a behaviour test once on each system-call path: the io_uring transport must keep
/// every rule the epoll one keeps.
macro_rules! on_both_paths {
    ($name:ident) => {
        mod $name {
            #[test]
            fn epoll() {
                super::$name(super::TcpIo::Epoll);
            }
            #[test]
            fn uring() {
                if let Err(why) = super::io_uring_available() {
                    // The transport would run on epoll (the fallback has its own test).
                    eprintln!("SKIP: io_uring unavailable in this environment ({why})");
                    return;
                }
                super::$name(super::TcpIo::Uring);
            }
        }
    };
}

/// Whether this process may set up an io_uring (seccomp profiles and
/// `kernel.io_uring_disabled` refuse it).
fn io_uring_available() -> io::Result<()> {
    io_uring::IoUring::new(1).map(drop)
}

fn transport(io: TcpIo, inflight: u32, connections: u32, waker: &Waker) -> TcpTransport {
    let config = TransportConfig {
        limits: Limits::DEFAULT,
        inflight_per_connection_max: inflight,
        connections_max: connections,
        io,
    };
    let transport = TcpTransport::new(0, config, waker.fd()).unwrap();
    assert_eq!(
        transport.uses_uring(),
        io == TcpIo::Uring,
        "this kernel allows io_uring (tests of the fallback refuse it on purpose)"
    );
    transport
}

fn setup() -> (TcpTransport, CorePools, Waker) {
    setup_on(TcpIo::Epoll)
}

fn setup_on(io: TcpIo) -> (TcpTransport, CorePools, Waker) {
    let waker = Waker::new().unwrap();
    let transport = transport(io, 4, 8, &waker);
    let sizes = PoolSizes {
        small_size_bytes: 64 << 10,
        small_count: 8,
        large_size_bytes: 8 << 20,
        large_count: 2,
    };
    (transport, CorePools::new(0, sizes, false).unwrap(), waker)
}

fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

#[test]
fn a_connection_whose_epoll_edge_was_lost_is_accepted_at_the_second_audit() {
    let (mut transport, _pools, _waker) = setup();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    transport.listen(listener).unwrap();
    assert!(transport.poll_accept().is_none(), "nothing queued yet");
    let _client = TcpStream::connect(address).unwrap();
    // The edge is in the epoll set, but the core never collects it (`poll_events` is not
    // called): as if it were lost. Nothing is accepted without it...
    assert!(transport.poll_accept().is_none());
    let t0 = Instant::now();
    transport.audit_listener(t0);
    assert!(transport.poll_accept().is_none(), "one look proves nothing");
    assert_eq!(transport.stats.accept_rescues, 0);
    // ...until the connection has waited through two looks.
    transport.audit_listener(t0 + crate::listener_audit::AUDIT_INTERVAL);
    assert_eq!(transport.stats.accept_rescues, 1);
    let (stream, _) = transport
        .poll_accept()
        .expect("the audit lets the core accept");
    assert_eq!(stream.peer_addr().unwrap(), _client.local_addr().unwrap());
    assert!(
        transport.poll_accept().is_none(),
        "the queue is empty again"
    );
}

#[test]
fn connections_announced_by_epoll_are_never_counted_as_rescued() {
    let (mut transport, _pools, _waker) = setup();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    transport.listen(listener).unwrap();
    assert!(transport.poll_accept().is_none());
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for round in 0..3u32 {
        clients.push(TcpStream::connect(address).unwrap());
        transport.audit_listener(t0 + round * crate::listener_audit::AUDIT_INTERVAL);
        transport.poll_events(Duration::from_millis(100));
        assert!(transport.poll_accept().is_some(), "epoll announced it");
        assert!(transport.poll_accept().is_none());
    }
    assert_eq!(transport.stats.accept_rescues, 0);
}

on_both_paths!(connections_stalled_mid_frame_give_up_their_chunks_when_the_pool_is_empty);
fn connections_stalled_mid_frame_give_up_their_chunks_when_the_pool_is_empty(io: TcpIo) {
    let waker = Waker::new().unwrap();
    let mut transport = transport(io, 4, 16, &waker);
    let (_, mut pools, _) = setup();
    // Receive may take all but the chunks it leaves for op outputs.
    let chunks = pools.small.free_count() - crate::buffers::RX_LEAVES_FREE;
    let mut frame = Vec::new();
    wire::encode_request(
        &mut frame,
        Opcode::OsdOp,
        7,
        b"obj",
        &[SubOpSpec::write(0, &[1; 100])],
        b"",
    );
    // Slow-loris clients: one partial frame each, one per chunk receive may take.
    let mut stallers = Vec::new();
    for _ in 0..chunks {
        let (mut client, server) = pair();
        transport.adopt(server).unwrap();
        client.write_all(&frame[..10]).unwrap();
        stallers.push(client);
    }
    for _ in 0..100 {
        transport.poll_events(Duration::from_millis(10));
        transport.poll_rx(&mut pools, 16, &mut |_| panic!("no frame is complete"));
        if transport.stalled_count == chunks && transport.rx_list.is_empty() {
            break;
        }
    }
    assert_eq!(
        pools.small.free_count(),
        crate::buffers::RX_LEAVES_FREE,
        "every chunk but the output reserve holds a partial frame"
    );
    assert_eq!(transport.stalled_count, chunks);
    // A client with a whole frame, before the eviction age: it waits.
    let (mut good, server) = pair();
    let good_conn = transport.adopt(server).unwrap();
    good.write_all(&frame).unwrap();
    let mut frames = Vec::new();
    // (io_uring: a few passes, since the readiness is a POLL completion before the receive.)
    for _ in 0..10 {
        transport.poll_events(Duration::from_millis(10));
        transport.poll_rx(&mut pools, 16, &mut |frame| frames.push(frame));
        if transport.stats.rx_pool_waits > 0 {
            break;
        }
    }
    assert!(frames.is_empty() && transport.stats.evicted == 0);
    assert!(transport.stats.rx_pool_waits > 0);
    // Past it: the oldest staller is closed, and the frame comes in on its chunk.
    std::thread::sleep(STALL_EVICT_AFTER);
    for _ in 0..100 {
        transport.poll_events(Duration::from_millis(10));
        transport.poll_rx(&mut pools, 16, &mut |frame| frames.push(frame));
        if !frames.is_empty() {
            break;
        }
    }
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].conn, good_conn);
    assert_eq!(
        transport.stats.evicted, 1,
        "one chunk was needed, one staller closed"
    );
    assert_eq!(transport.stalled_count, chunks - 1);
    let mut byte = [0u8; 1];
    let closed = stallers
        .iter_mut()
        .filter(|staller| {
            let mut staller: &TcpStream = staller;
            staller
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            match staller.read(&mut byte) {
                Ok(n) => n == 0,
                Err(e) => !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
            }
        })
        .count();
    assert_eq!(
        closed, 1,
        "only the evicted staller sees its connection closed"
    );
    for frame in frames {
        pools.release_lease(frame.frame);
    }
}

#[test]
fn a_late_wakeup_is_not_work_forever() {
    let (mut transport, _pools, waker) = setup();
    waker.prepare_park();
    waker.wake_if_sleeping(); // Lands after the core decided not to park: nobody drains it.
    assert_eq!(transport.poll_events(Duration::ZERO), 0);
    assert_eq!(
        transport.poll_events(Duration::ZERO),
        0,
        "a readable eventfd is reported once, and never as work"
    );
}

/// Sends three OSD_OP requests on "obj" (ids 0..3, one sub-op each, made by `sub_op`) and
/// polls until the transport has handed all three up.
fn send_three<'a>(
    transport: &mut TcpTransport,
    pools: &mut CorePools,
    client: &mut TcpStream,
    sub_op: impl Fn(u64) -> SubOpSpec<'a>,
) -> Vec<RxFrame> {
    let mut requests = Vec::new();
    for id in 0..3 {
        wire::encode_request(&mut requests, Opcode::OsdOp, id, b"obj", &[sub_op(id)], b"");
    }
    client.write_all(&requests).unwrap();
    let mut frames = Vec::new();
    for _ in 0..100 {
        transport.poll_events(Duration::from_millis(10));
        transport.poll_rx(pools, 16, &mut |frame| frames.push(frame));
        if frames.len() == 3 {
            break;
        }
    }
    assert_eq!(frames.len(), 3);
    frames
}

on_both_paths!(frames_arrive_as_leases_and_replies_go_out);
fn frames_arrive_as_leases_and_replies_go_out(io: TcpIo) {
    let (mut transport, mut pools, _waker) = setup_on(io);
    let (mut client, server) = pair();
    let conn = transport.adopt(server).unwrap();
    let data: Vec<[u8; 1000]> = (0..3).map(|id| [id as u8; 1000]).collect();
    let frames = send_three(&mut transport, &mut pools, &mut client, |id| {
        SubOpSpec::write(0, &data[id as usize])
    });
    assert_eq!(
        pools.small.in_use(),
        1,
        "three frames, one receive chunk: parsed in place"
    );
    assert_eq!(transport.stats.rx_copied_bytes, 0);
    for frame in frames {
        assert_eq!(frame.conn, conn);
        let view = wire::Frame::view(frame.header, frame.frame.as_slice());
        assert!(view.crc_ok(frame.frame.as_slice()));
        transport
            .reply(conn, &frame.header, Status::Ok, &[(0, 0)], Body::None)
            .ok()
            .unwrap();
        pools.release_lease(frame.frame);
    }
    assert_eq!(transport.flush_tx(&mut pools), 3);
    assert_eq!(
        (transport.stats.tx_syscalls, transport.stats.tx_iovecs),
        (1, 1),
        "three replies without a body: their heads packed into one iovec"
    );
    let reply_len = HEADER_SIZE + SUB_OP_RESULT_SIZE;
    let mut replies = vec![0u8; 3 * reply_len];
    client.read_exact(&mut replies).unwrap();
    for (id, reply) in replies.chunks(reply_len).enumerate() {
        let header = wire::parse_header(reply, &Limits::CEILING)
            .unwrap()
            .unwrap();
        assert!(header.is_reply());
        assert_eq!(header.request_id, id as u64, "in order, each whole");
        assert!(wire::Frame::view(header, reply).crc_ok(reply));
    }
    drop(client);
    for _ in 0..100 {
        transport.poll_events(Duration::from_millis(10));
        transport.poll_rx(&mut pools, 16, &mut |_| panic!("no more frames"));
        if transport.connection_count() == 0 {
            break;
        }
    }
    assert_eq!(transport.connection_count(), 0, "EOF closes the connection");
    assert_eq!(pools.in_use(), 0, "every buffer came back");
}

on_both_paths!(runs_of_bodiless_replies_are_one_iovec);
/// Heads of replies without a body are packed into one iovec per run; a reply with a
/// body breaks the run (its head and body go by reference), and the bytes on the wire are
/// the replies in order either way.
fn runs_of_bodiless_replies_are_one_iovec(io: TcpIo) {
    let (_, mut pools, waker) = setup();
    let mut transport = transport(io, 8, 2, &waker);
    let (mut client, server) = pair();
    let conn = transport.adopt(server).unwrap();
    let mut frames = send_three(&mut transport, &mut pools, &mut client, |_| {
        SubOpSpec::read(0, 100)
    });
    frames.extend(send_three(&mut transport, &mut pools, &mut client, |_| {
        SubOpSpec::read(0, 100)
    }));
    let requests: Vec<Header> = frames.iter().map(|f| f.header).collect();
    for frame in frames {
        pools.release_lease(frame.frame);
    }
    // Replies to requests 0, 1 (no body), 2 (a body), 0, 1 (no body) of the second batch.
    let mut expected = Vec::new();
    for (index, request) in requests.iter().enumerate().take(5) {
        let body = if index == 2 {
            let mut buf = pools.acquire_for(100).unwrap();
            buf.spare_mut()[..100].fill(0x5A);
            buf.seal(100);
            Body::Buf(buf)
        } else {
            Body::None
        };
        let results = [(0, body.as_slice().len() as u32)];
        let mut head = [0u8; REPLY_HEAD_MAX_BYTES];
        let len = wire::encode_reply(&mut head, request, Status::Ok, &results, &[body.as_slice()]);
        expected.extend_from_slice(&head[..len]);
        expected.extend_from_slice(body.as_slice());
        assert!(transport
            .reply(conn, request, Status::Ok, &results, body)
            .is_ok());
    }
    assert_eq!(transport.flush_tx(&mut pools), 5);
    assert_eq!(
        (transport.stats.tx_syscalls, transport.stats.tx_iovecs),
        (1, 4),
        "two packed runs of two heads, and the head and body of the reply between"
    );
    let mut received = vec![0u8; expected.len()];
    client.read_exact(&mut received).unwrap();
    assert_eq!(received, expected);
    transport
        .reply(conn, &requests[5], Status::Ok, &[(0, 0)], Body::None)
        .ok()
        .unwrap();
    assert_eq!(transport.flush_tx(&mut pools), 1);
    settle(&mut transport, &mut pools);
    assert_eq!(pools.in_use(), 0, "every buffer came back");
}

on_both_paths!(reply_heads_reuse_their_slots_in_queue_order);
/// Reply heads live in a ring of slots per connection (`Connection::heads`, in-flight limit
/// + 1 of them): four rounds of three queued replies wrap a 5-slot ring twice, and the bytes
/// on the wire are still each reply's own head, in order.
fn reply_heads_reuse_their_slots_in_queue_order(io: TcpIo) {
    let (mut transport, mut pools, _waker) = setup_on(io);
    let (mut client, server) = pair();
    let conn = transport.adopt(server).unwrap();
    for round in 0..4u32 {
        let frames = send_three(&mut transport, &mut pools, &mut client, |_| {
            SubOpSpec::read(0, 100)
        });
        let mut expected = Vec::new();
        for (index, frame) in frames.iter().enumerate() {
            // Different results per reply, so a head written into another's slot shows.
            let results = [(round * 3 + index as u32, 0)];
            let mut head = [0u8; REPLY_HEAD_MAX_BYTES];
            let len = wire::encode_reply(&mut head, &frame.header, Status::Ok, &results, &[]);
            expected.extend_from_slice(&head[..len]);
            assert!(transport
                .reply(conn, &frame.header, Status::Ok, &results, Body::None)
                .is_ok());
        }
        for frame in frames {
            pools.release_lease(frame.frame);
        }
        assert_eq!(transport.flush_tx(&mut pools), 3, "round {round}");
        let mut received = vec![0u8; expected.len()];
        client.read_exact(&mut received).unwrap();
        assert_eq!(received, expected, "round {round}");
    }
    settle(&mut transport, &mut pools);
    assert_eq!(pools.in_use(), 0, "every buffer came back");
}

/// Runs passes until no buffer is in use (at most 20). On epoll a written reply's chunk comes
/// back in the same pass; on io_uring a receive posted under it is cancelled first, and the
/// cancellation completes in the next pass's enter.
fn settle(transport: &mut TcpTransport, pools: &mut CorePools) {
    for _ in 0..20 {
        if pools.in_use() == 0 {
            return;
        }
        transport.poll_events(Duration::from_millis(1));
        transport.poll_rx(pools, 16, &mut |_| panic!("no frame was sent"));
        transport.flush_tx(pools);
    }
}

on_both_paths!(stored_bodies_are_sent_by_their_crc_and_copied_before_the_store_changes);
/// Stored bodies go out with the crc they came with, and `copy_stored_bodies` leaves the
/// replies independent of the store's memory: what is sent is what was there when the
/// reply was queued, even after the memory changes.
fn stored_bodies_are_sent_by_their_crc_and_copied_before_the_store_changes(io: TcpIo) {
    let (mut transport, mut pools, _waker) = setup_on(io);
    let (mut client, server) = pair();
    let conn = transport.adopt(server).unwrap();
    // Three read requests to answer (the transport counts replies against frames).
    let frames = send_three(&mut transport, &mut pools, &mut client, |_| {
        SubOpSpec::read(0, 4096)
    });
    let request = frames[0].header;
    for frame in frames {
        pools.release_lease(frame.frame);
    }
    let mut store_memory = vec![0xA5u8; 8192];
    let crcs = [
        carmine_crc::crc32c(&store_memory[..4096]),
        carmine_crc::crc32c(&store_memory[4096..]),
    ];
    for (index, crc) in crcs.into_iter().enumerate() {
        // SAFETY: `store_memory` is only changed after `copy_stored_bodies` succeeded.
        let stored = unsafe { StoredBytes::new(store_memory[index * 4096..].as_ptr(), 4096, crc) };
        let replied = transport.reply(
            conn,
            &request,
            Status::Ok,
            &[(0, 4096)],
            Body::Stored(stored),
        );
        assert!(replied.is_ok());
    }
    assert!(transport.has_stored_bodies());
    let in_use_before = pools.small.in_use(); // The receive chunk, perhaps.
    assert!(transport.copy_stored_bodies(&mut pools));
    assert!(!transport.has_stored_bodies());
    assert_eq!(transport.stats.stored_bodies_tx, 2);
    assert_eq!(transport.stats.stored_bodies_copied, 2);
    assert_eq!(
        pools.small.in_use(),
        in_use_before + 2,
        "each copy in a pool buffer"
    );
    store_memory.fill(0); // The store overwrites the blocks.
    assert_eq!(transport.flush_tx(&mut pools), 2);
    assert!(
        pools.small.in_use() <= in_use_before,
        "the copies went back once written"
    );
    let reply_len = HEADER_SIZE + SUB_OP_RESULT_SIZE + 4096;
    let mut replies = vec![0u8; 2 * reply_len];
    client.read_exact(&mut replies).unwrap();
    for reply in replies.chunks(reply_len) {
        let header = wire::parse_header(reply, &Limits::CEILING)
            .unwrap()
            .unwrap();
        let view = wire::Frame::view(header, reply);
        assert!(view.crc_ok(reply), "the kept crc covers the bytes sent");
        assert!(reply[reply_len - 4096..].iter().all(|&b| b == 0xA5));
    }
    // Without a copy, the reply is written straight from the store's memory.
    let crc = carmine_crc::crc32c(&store_memory[..4096]);
    // SAFETY: `store_memory` is not changed again.
    let stored = unsafe { StoredBytes::new(store_memory.as_ptr(), 4096, crc) };
    let in_use_before = pools.in_use();
    let replied = transport.reply(
        conn,
        &request,
        Status::Ok,
        &[(0, 4096)],
        Body::Stored(stored),
    );
    assert!(replied.is_ok());
    assert_eq!(pools.in_use(), in_use_before, "no buffer for a stored body");
    assert_eq!(transport.flush_tx(&mut pools), 1);
    assert!(!transport.has_stored_bodies(), "written, so no longer held");
    let mut reply = vec![0u8; reply_len];
    client.read_exact(&mut reply).unwrap();
    let header = wire::parse_header(&reply, &Limits::CEILING)
        .unwrap()
        .unwrap();
    assert!(wire::Frame::view(header, &reply).crc_ok(&reply));
    assert_eq!(transport.stats.stored_bodies_copied, 2);
}

on_both_paths!(data_and_hangup_in_one_edge_still_close);
fn data_and_hangup_in_one_edge_still_close(io: TcpIo) {
    let (mut transport, mut pools, _waker) = setup_on(io);
    let (mut client, server) = pair();
    transport.adopt(server).unwrap();
    let mut request = Vec::new();
    wire::encode_request(&mut request, Opcode::Ping, 1, b"", &[], b"");
    // A partial second frame, then FIN: the short recv must not hide the hang-up.
    request.extend_from_slice(&[0x43, 0x52]);
    client.write_all(&request).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let mut frames = Vec::new();
    for _ in 0..100 {
        transport.poll_events(Duration::from_millis(10));
        transport.poll_rx(&mut pools, 16, &mut |frame| frames.push(frame));
        if transport.connection_count() == 0 {
            break;
        }
    }
    assert_eq!(frames.len(), 1, "the complete frame is delivered");
    assert_eq!(
        transport.connection_count(),
        0,
        "EOF after a short read closes the connection"
    );
    assert_eq!(transport.stats.truncated, 1, "the partial frame is counted");
    for frame in frames {
        pools.release_lease(frame.frame);
    }
    assert_eq!(pools.in_use(), 0);
}

on_both_paths!(frame_larger_than_a_chunk_uses_a_large_buffer);
fn frame_larger_than_a_chunk_uses_a_large_buffer(io: TcpIo) {
    let (mut transport, mut pools, _waker) = setup_on(io);
    let (mut client, server) = pair();
    transport.adopt(server).unwrap();
    let data = vec![0xA5u8; 200 << 10];
    let mut request = Vec::new();
    wire::encode_request(
        &mut request,
        Opcode::OsdOp,
        9,
        b"big",
        &[SubOpSpec::write(0, &data)],
        b"",
    );
    let writer = std::thread::spawn(move || {
        client.write_all(&request).unwrap();
        client
    });
    let mut frames = Vec::new();
    for _ in 0..500 {
        transport.poll_events(Duration::from_millis(10));
        transport.poll_rx(&mut pools, 16, &mut |frame| frames.push(frame));
        if !frames.is_empty() {
            break;
        }
    }
    let _client = writer.join().unwrap();
    assert_eq!(frames.len(), 1);
    let frame = frames.pop().unwrap();
    assert_eq!(frame.frame.pool(), pools.large.id());
    let view = wire::Frame::view(frame.header, frame.frame.as_slice());
    assert!(view.crc_ok(frame.frame.as_slice()));
    view.validate_sub_ops().unwrap();
    assert_eq!(view.sub_ops().next().unwrap().data, &data[..]);
    pools.release_lease(frame.frame);
}

on_both_paths!(replies_larger_than_the_socket_buffer_go_out_in_pieces);
/// Short writes: replies far larger than the socket's send buffer, to a client that reads
/// slowly. Each write takes what fits; a full socket waits for writability (EPOLLOUT, or a
/// POLLOUT on io_uring) and the rest follows in order, every byte once, every buffer back.
fn replies_larger_than_the_socket_buffer_go_out_in_pieces(io: TcpIo) {
    let (mut transport, mut pools, _waker) = setup_on(io);
    let (client, server) = pair();
    let fd = server.as_raw_fd();
    let small: libc::c_int = 16 << 10;
    // SAFETY: sets an int option on a socket this test owns, from a live int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let conn = transport.adopt(server).unwrap();
    let mut client = client;
    let frames = send_three(&mut transport, &mut pools, &mut client, |_| {
        SubOpSpec::read(0, 60_000)
    });
    let mut expected = Vec::new();
    for (index, frame) in frames.iter().enumerate() {
        let mut buf = pools.acquire_for(60_000).unwrap();
        buf.spare_mut()[..60_000].fill(index as u8 + 1);
        buf.seal(60_000);
        let body = Body::Buf(buf);
        let results = [(0, 60_000)];
        let mut head = [0u8; REPLY_HEAD_MAX_BYTES];
        let len = wire::encode_reply(
            &mut head,
            &frame.header,
            Status::Ok,
            &results,
            &[body.as_slice()],
        );
        expected.extend_from_slice(&head[..len]);
        expected.extend_from_slice(body.as_slice());
        assert!(transport
            .reply(conn, &frame.header, Status::Ok, &results, body)
            .is_ok());
    }
    for frame in frames {
        pools.release_lease(frame.frame);
    }
    let total = expected.len();
    // Nobody reads yet: the first write cannot take everything.
    let mut completed = transport.flush_tx(&mut pools);
    assert!(
        completed < 3,
        "a 16 KiB send buffer cannot take 180 KB at once"
    );
    assert!(transport.stats.tx_bytes < total as u64);
    let reader = std::thread::spawn(move || {
        let mut received = vec![0u8; total];
        let mut at = 0;
        while at < total {
            std::thread::sleep(Duration::from_millis(1));
            let n = client
                .read(&mut received[at..(at + 8192).min(total)])
                .unwrap();
            assert!(n > 0, "the server closed early");
            at += n;
        }
        (client, received)
    });
    for _ in 0..10_000 {
        if completed == 3 {
            break;
        }
        transport.poll_events(Duration::from_millis(5));
        transport.poll_rx(&mut pools, 16, &mut |_| panic!("no request was sent"));
        completed += transport.flush_tx(&mut pools);
    }
    assert_eq!(completed, 3, "every reply went out");
    let (_client, received) = reader.join().unwrap();
    assert!(
        received == expected,
        "the bytes on the wire are the replies, in order"
    );
    assert_eq!(
        transport.stats.tx_bytes, total as u64,
        "each byte written once"
    );
    assert!(
        transport.stats.tx_syscalls > 3,
        "the replies took several writes: {}",
        transport.stats.tx_syscalls
    );
    settle(&mut transport, &mut pools);
    assert_eq!(pools.in_use(), 0, "every buffer came back");
}

on_both_paths!(many_connections_each_get_their_own_replies);
/// Many connections at once (more than a send pass's slots on io_uring, 64), each with
/// pipelined requests: every connection gets exactly its replies, and closing them all (the
/// clients hang up) gives every slot and buffer back.
fn many_connections_each_get_their_own_replies(io: TcpIo) {
    const CLIENTS: usize = 100;
    let waker = Waker::new().unwrap();
    let mut transport = transport(io, 4, CLIENTS as u32, &waker);
    let (_, _, _) = setup();
    let sizes = PoolSizes {
        small_size_bytes: 64 << 10,
        small_count: 2 * CLIENTS as u32,
        large_size_bytes: 8 << 20,
        large_count: 2,
    };
    let mut pools = CorePools::new(0, sizes, false).unwrap();
    let mut clients = Vec::new();
    for index in 0..CLIENTS {
        let (mut client, server) = pair();
        let conn = transport.adopt(server).unwrap();
        let mut requests = Vec::new();
        for id in 0..2u64 {
            let request_id = index as u64 * 10 + id;
            wire::encode_request(&mut requests, Opcode::Ping, request_id, b"", &[], b"");
        }
        client.write_all(&requests).unwrap();
        clients.push((client, conn));
    }
    let mut answered = 0;
    for _ in 0..1000 {
        if answered == 2 * CLIENTS {
            break;
        }
        transport.poll_events(Duration::from_millis(1));
        let mut frames = Vec::new();
        transport.poll_rx(&mut pools, 256, &mut |frame| frames.push(frame));
        for frame in frames {
            transport
                .reply(frame.conn, &frame.header, Status::Ok, &[], Body::None)
                .ok()
                .unwrap();
            pools.release_lease(frame.frame);
        }
        answered += transport.flush_tx(&mut pools);
    }
    assert_eq!(answered, 2 * CLIENTS);
    for (index, (client, _)) in clients.iter_mut().enumerate() {
        let mut replies = vec![0u8; 2 * HEADER_SIZE];
        client.read_exact(&mut replies).unwrap();
        for (id, reply) in replies.chunks(HEADER_SIZE).enumerate() {
            let header = wire::parse_header(reply, &Limits::CEILING)
                .unwrap()
                .unwrap();
            assert_eq!(header.request_id, index as u64 * 10 + id as u64);
        }
    }
    drop(clients);
    for _ in 0..1000 {
        if transport.connection_count() == 0 && pools.in_use() == 0 {
            break;
        }
        transport.poll_events(Duration::from_millis(1));
        transport.poll_rx(&mut pools, 256, &mut |_| panic!("no more frames"));
        transport.flush_tx(&mut pools);
    }
    assert_eq!(
        transport.connection_count(),
        0,
        "every hang-up closed its connection"
    );
    assert_eq!(transport.stats.closed, CLIENTS as u64);
    assert_eq!(pools.in_use(), 0, "every buffer came back");
    assert_eq!(transport.free.len(), CLIENTS, "every slot is free again");
}

/// Makes `io_uring_setup` fail with ENOSYS on the calling thread (and threads it starts), as
/// a container's seccomp profile does (Docker's default refuses io_uring). Seccomp filters and
/// no_new_privs are per thread, so a test thread may do this to itself alone.
fn refuse_io_uring_on_this_thread() {
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let filter = [
        // Load seccomp_data.nr (offset 0).
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with plain integer arguments, then with a pointer to a filter program that
    // lives across the call (the kernel copies it); results checked.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog
            ),
            0,
            "seccomp filter: {}",
            io::Error::last_os_error()
        );
    }
}

/// The kernel refusing io_uring is not fatal: the transport says so (a warning) and runs on
/// epoll. The refusal is real: a seccomp filter on the test's own thread.
#[test]
fn a_refused_io_uring_falls_back_to_epoll() {
    std::thread::spawn(|| {
        refuse_io_uring_on_this_thread();
        let waker = Waker::new().unwrap();
        let config = TransportConfig {
            limits: Limits::DEFAULT,
            inflight_per_connection_max: 4,
            connections_max: 8,
            io: TcpIo::Uring,
        };
        let mut transport = TcpTransport::new(0, config, waker.fd()).unwrap();
        assert!(!transport.uses_uring(), "the filter refused io_uring_setup");
        let (_, mut pools, _) = setup();
        let (mut client, server) = pair();
        transport.adopt(server).unwrap();
        let frames = send_three(&mut transport, &mut pools, &mut client, |_| {
            SubOpSpec::read(0, 10)
        });
        assert_eq!(frames.len(), 3, "served on epoll");
        for frame in frames {
            pools.release_lease(frame.frame);
        }
        assert_eq!(transport.stats.uring_enters, 0);
    })
    .join()
    .unwrap();
}
