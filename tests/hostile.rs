//! Bad input: every kind of broken client gets an error or a closed connection, is counted,
//! and never disturbs the well-behaved client running beside it.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const OP_OSD: u8 = 1;
const OP_PING: u8 = 2;
const WRITE: u8 = 1;
const READ: u8 = 3;
const STATUS_BAD_CRC: u32 = 16;
const STATUS_UNKNOWN_OPCODE: u32 = 17;
const STATUS_MALFORMED: u32 = 18;
const STATUS_OVER_LIMIT: u32 = 19;
const STATUS_NOT_FOUND: u32 = 1;

fn expect_closed(stream: &mut std::net::TcpStream) {
    assert!(
        read_reply(stream).is_none(),
        "the server closes a connection whose stream it cannot trust"
    );
}

on_both_tcp_paths!(broken_clients_are_answered_counted_and_isolated);
fn broken_clients_are_answered_counted_and_isolated(tcp_io: &[&str]) {
    let mut server = ServerProcess::start(&args_with(
        &["--cores", "2", "--cpus", "0,1", "--max-oid-len", "64"],
        tcp_io,
    ));
    let addr = server.addr.clone();
    // A well-behaved client keeps running the whole time.
    let good = std::thread::spawn(move || {
        load(
            &addr,
            &[
                "--op",
                "mixed",
                "--duration",
                "2s",
                "--objects",
                "8",
                "--object-size",
                "64KiB",
                "--clients",
                "2",
                "--qd",
                "4",
                "--verify",
                "--prefill",
            ],
        )
    });
    std::thread::sleep(Duration::from_millis(200));

    // Bad crc: answered, connection stays usable.
    let mut stream = connect(&server.addr);
    let mut frame = raw_frame(OP_OSD, 7, b"victim", &[(WRITE, b"", b"data", 0, 0)]);
    *frame.last_mut().unwrap() ^= 0xff;
    send(&mut stream, &frame);
    let reply = read_reply(&mut stream).expect("answered");
    assert_eq!((reply.request_id, reply.status), (7, STATUS_BAD_CRC));
    // Nothing was written by the corrupted request.
    send(
        &mut stream,
        &raw_frame(OP_OSD, 8, b"victim", &[(READ, b"", b"", 0, 4)]),
    );
    assert_eq!(read_reply(&mut stream).unwrap().status, STATUS_NOT_FOUND);
    // Unknown opcode and a malformed sub-op table: answered, connection stays usable.
    send(&mut stream, &raw_frame(42, 9, b"x", &[]));
    assert_eq!(
        read_reply(&mut stream).unwrap().status,
        STATUS_UNKNOWN_OPCODE
    );
    send(
        &mut stream,
        &raw_frame(OP_OSD, 10, b"x", &[(READ, b"", b"zz", 0, 1)]),
    );
    assert_eq!(read_reply(&mut stream).unwrap().status, STATUS_MALFORMED);
    send(&mut stream, &raw_frame(OP_PING, 11, b"", &[]));
    assert_eq!(
        read_reply(&mut stream).unwrap().status,
        0,
        "still serving after errors"
    );
    drop(stream);

    // Garbage: answered once, then closed.
    let mut stream = connect(&server.addr);
    send(&mut stream, &[0x55u8; 64]);
    assert_eq!(read_reply(&mut stream).unwrap().status, STATUS_MALFORMED);
    expect_closed(&mut stream);

    // Oversized object id and payload: refused from the header alone, before any buffering.
    let mut stream = connect(&server.addr);
    send(
        &mut stream,
        &raw_frame(OP_OSD, 12, &[b'o'; 100], &[(READ, b"", b"", 0, 1)]),
    );
    assert_eq!(read_reply(&mut stream).unwrap().status, STATUS_OVER_LIMIT);
    expect_closed(&mut stream);
    let mut stream = connect(&server.addr);
    let mut header = raw_frame(OP_OSD, 13, b"o", &[]);
    header[20..24].copy_from_slice(&(1u32 << 30).to_le_bytes());
    send(&mut stream, &header[..32]);
    assert_eq!(read_reply(&mut stream).unwrap().status, STATUS_OVER_LIMIT);
    expect_closed(&mut stream);

    // Truncated frames and clients vanishing mid-frame, mid-header, byte by byte.
    for cut in [1usize, 10, 31, 32, 40, 100] {
        let mut stream = connect(&server.addr);
        let frame = raw_frame(OP_OSD, 14, b"partial", &[(WRITE, b"", &[7u8; 200], 0, 0)]);
        for byte in &frame[..cut.min(frame.len() - 1)] {
            stream.write_all(std::slice::from_ref(byte)).unwrap();
        }
        drop(stream);
    }
    // Many connections that come and go.
    for _ in 0..200 {
        let mut stream = connect(&server.addr);
        send(&mut stream, &raw_frame(OP_PING, 1, b"", &[]));
        assert_eq!(read_reply(&mut stream).unwrap().status, 0);
    }

    let report = good.join().unwrap();
    assert_eq!(
        report["errors"], 0,
        "the good client saw no errors: {report}"
    );
    assert_eq!(report["verify_failures"], 0);
    assert!(report["ops"].as_u64().unwrap() > 0);

    std::thread::sleep(Duration::from_millis(100));
    let status = status(&server.addr);
    assert!(total(&status, "err_bad_crc") >= 1);
    assert!(total(&status, "err_unknown_opcode") >= 1);
    assert!(total(&status, "err_malformed") >= 1);
    assert!(total(&status, "stream_malformed") >= 1);
    assert!(total(&status, "stream_over_limit") >= 2);
    assert!(
        total(&status, "conn_truncated") >= 1,
        "clients vanishing mid-frame are counted"
    );
    assert_eq!(
        total(&status, "connections"),
        1,
        "every broken connection was closed: only the status request's own remains"
    );
    assert_eq!(total(&status, "ops_in_flight"), 0);
    assert!(server.is_running());
    let log = server.log_lines().join("\n");
    assert!(
        log.contains("bad magic") && log.contains("exceeds limit"),
        "one log line per rejection: {log}"
    );
    assert!(server.stop().success());
}

/// Raises this process's open-file limit to its hard limit; the server child inherits it.
fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = limit.rlim_max.min(wanted.max(limit.rlim_cur));
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    assert!(
        limit.rlim_cur >= wanted,
        "need {wanted} open files, the hard limit is {}",
        limit.rlim_max
    );
}

on_both_tcp_paths!(a_thousand_connections_are_all_served_with_bounded_buffers);
fn a_thousand_connections_are_all_served_with_bounded_buffers(tcp_io: &[&str]) {
    const CLIENTS: usize = 1000;
    raise_fd_limit(2 * CLIENTS as u64 + 256);
    let server = ServerProcess::start(&args_with(&["--cores", "2", "--cpus", "0,1"], tcp_io));
    let mut streams: Vec<_> = (0..CLIENTS).map(|_| connect(&server.addr)).collect();
    for (index, stream) in streams.iter_mut().enumerate() {
        send(stream, &raw_frame(OP_PING, index as u64, b"", &[]));
    }
    for (index, stream) in streams.iter_mut().enumerate() {
        let reply = read_reply(stream).expect("every client is answered");
        assert_eq!((reply.request_id, reply.status), (index as u64, 0));
    }
    let snapshot = status(&server.addr);
    assert_eq!(total(&snapshot, "connections"), CLIENTS as u64 + 1);
    // Idle connections hold no receive buffers: only the status request's own are in use.
    // A core retires a connection's chunk on the pass after its reply is written, and the
    // board is a snapshot, so allow the cores a moment to get there (they may be preempted
    // by this very test on a 2-CPU machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut held = total(&snapshot, "buffers_in_use");
    while held > 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "buffers held by idle connections: {held}"
        );
        std::thread::sleep(Duration::from_millis(20));
        held = total(&status(&server.addr), "buffers_in_use");
    }
    drop(streams);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let connections = total(&status(&server.addr), "connections");
        if connections == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{connections} connections still open after the clients left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The arguments of the well-behaved client run beside hostile ones.
const GOOD_CLIENT: [&str; 14] = [
    "--op",
    "mixed",
    "--duration",
    "2s",
    "--objects",
    "8",
    "--object-size",
    "16KiB",
    "--clients",
    "2",
    "--qd",
    "4",
    "--verify",
    "--prefill",
];

/// Connections that each send their frame one byte per round (5 ms apart), reading the reply
/// when a frame is complete, until `stop`. A connection the server closes is dropped. Returns
/// the connections (each mid-frame or closed) and the frames answered.
fn spawn_loris(
    addr: &str,
    frames: Vec<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<Option<std::net::TcpStream>>, u64)> {
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let mut streams: Vec<_> = frames.iter().map(|_| Some(connect(&addr))).collect();
        let mut sent = vec![0usize; frames.len()];
        let mut frames_done = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for (i, slot) in streams.iter_mut().enumerate() {
                let Some(stream) = slot.as_mut() else {
                    continue;
                };
                // The server may close a stalled connection: it is gone, not an error here.
                if stream.write_all(&frames[i][sent[i]..sent[i] + 1]).is_err() {
                    *slot = None;
                    continue;
                }
                sent[i] += 1;
                if sent[i] == frames[i].len() {
                    sent[i] = 0;
                    match read_reply(stream) {
                        Some(reply) => {
                            assert_eq!(reply.status, 0, "a slow frame is served");
                            frames_done += 1;
                        }
                        None => *slot = None,
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (streams, frames_done)
    })
}

fn p99_us(report: &serde_json::Value) -> f64 {
    report["latency_us"]["p99"]
        .as_f64()
        .expect("p99 in the report")
}

fn assert_clean(report: &serde_json::Value) {
    assert_eq!(
        report["errors"], 0,
        "the good client saw no errors: {report}"
    );
    assert_eq!(report["verify_failures"], 0, "{report}");
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
}

/// Waits until the server is back to its idle baseline: only the status request's connection,
/// no op in flight, at most `buffers` buffers in use (a snapshot; cores may lag a pass).
fn wait_for_baseline(server: &ServerProcess, buffers: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = status(&server.addr);
        let idle = total(&snapshot, "connections") == 1
            && total(&snapshot, "ops_in_flight") == 0
            && total(&snapshot, "buffers_in_use") <= buffers;
        if idle {
            return snapshot;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not return to its baseline: {}",
            snapshot["totals"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

on_both_tcp_paths!(slow_loris_clients_do_not_starve_a_normal_client);
/// Slow-loris clients: many connections dribbling frames a byte at a time with pauses. Some
/// finish their frames (slowly); most never do. Each holds a partial frame, and the receive
/// chunk under it, most of the time: together more chunks than a core has (64 per core on a
/// test server). A normal client running beside them completes every op, and its p99 latency
/// stays within a generous bound of its own p99 measured alone just before: isolation, not
/// speed, is checked. The server gets its buffers back by closing the connections stalled
/// mid-frame the longest (`conn_evicted`).
fn slow_loris_clients_do_not_starve_a_normal_client(tcp_io: &[&str]) {
    const DRIBBLERS: usize = 32;
    const STALLERS: usize = 192;
    let server = ServerProcess::start(&args_with(&["--cores", "2", "--cpus", "0,1"], tcp_io));
    let baseline = load(&server.addr, &GOOD_CLIENT);
    assert_clean(&baseline);

    let stop = Arc::new(AtomicBool::new(false));
    // Dribblers send a 32-byte ping frame, then read its reply, over and over (a frame takes
    // them about 0.2 s, under the eviction age); stallers send a header that promises 60 KB
    // and then one byte of it per round, forever. Each group runs its own rounds.
    let ping: Vec<Vec<u8>> = (0..DRIBBLERS)
        .map(|i| raw_frame(OP_PING, i as u64, b"", &[]))
        .collect();
    let mut stall = raw_frame(OP_OSD, 0, b"stall", &[]);
    stall[20..24].copy_from_slice(&60_000u32.to_le_bytes());
    stall.resize(32 + 60_000, 0);
    let dribblers = spawn_loris(&server.addr, ping, stop.clone());
    let stallers = spawn_loris(&server.addr, vec![stall; STALLERS], stop.clone());
    // Let the stallers take the chunks and sit on them past the eviction age.
    std::thread::sleep(Duration::from_millis(1000));
    let beside = load(&server.addr, &GOOD_CLIENT);
    stop.store(true, Ordering::Relaxed);
    let (mut streams, frames_done) = dribblers.join().unwrap();
    streams.extend(stallers.join().unwrap().0);
    assert_clean(&beside);
    let bound = (10.0 * p99_us(&baseline)).max(50_000.0);
    let snapshot = status(&server.addr);
    eprintln!(
        "slow-loris: {DRIBBLERS} dribblers ({frames_done} frames answered) and {STALLERS} \
         stallers; good client p99 {} us alone, {} us beside them; {} evicted, {} pool waits",
        p99_us(&baseline),
        p99_us(&beside),
        total(&snapshot, "conn_evicted"),
        total(&snapshot, "rx_pool_waits")
    );
    assert!(
        p99_us(&beside) < bound,
        "p99 beside slow-loris clients {} us, alone {} us (bound {bound} us)",
        p99_us(&beside),
        p99_us(&baseline)
    );
    assert!(frames_done > 0, "the dribblers were served too");
    assert!(
        total(&snapshot, "conn_evicted") > 0,
        "the stallers held more chunks than a core has: some were closed"
    );
    drop(streams); // Mid-frame: counted as truncated, their buffers come back.
    let after = wait_for_baseline(&server, 4);
    assert!(
        total(&after, "conn_truncated") >= STALLERS as u64,
        "every staller ended mid-frame, closed by the server or by the test"
    );
}

on_both_tcp_paths!(oversized_frame_floods_are_refused_and_memory_stays_bounded);
/// Floods of oversized frames: headers that claim a payload over the limit (answered
/// OVER_LIMIT and closed, before any byte of the body is buffered), and frames at exactly the
/// limit (served through the large buffers). The server keeps serving a normal client, its
/// memory stays bounded (no growth from a second, longer flood after a first one warmed the
/// pools) and every buffer comes back.
fn oversized_frame_floods_are_refused_and_memory_stays_bounded(tcp_io: &[&str]) {
    const PAYLOAD_MAX: usize = 256 << 10;
    let server = ServerProcess::start(&args_with(
        &["--cores", "2", "--cpus", "0,1", "--max-payload", "256KiB"],
        tcp_io,
    ));
    let flood = |connections: usize, frames_at_limit: usize| {
        let addr = server.addr.clone();
        let handles: Vec<_> = (0..4)
            .map(|worker| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    // Over the limit: one header each, the connection is closed after the reply.
                    for i in 0..connections / 4 {
                        let mut stream = connect(&addr);
                        let mut header = raw_frame(OP_OSD, i as u64, b"big", &[]);
                        let claim = PAYLOAD_MAX as u32 + 1 + (i as u32 % 3) * (1 << 30);
                        header[20..24].copy_from_slice(&claim.to_le_bytes());
                        send(&mut stream, &header[..32]);
                        // The body the header promised starts to arrive: the server must not
                        // buffer it (it may reset the connection while this is written).
                        let _ = stream.write_all(&[0u8; 4096]);
                        let reply = read_reply(&mut stream).expect("refused with a reply");
                        assert_eq!(reply.status, STATUS_OVER_LIMIT);
                        expect_closed(&mut stream);
                    }
                    // At the limit: a write whose payload is exactly the maximum, pipelined.
                    let mut stream = connect(&addr);
                    let data = vec![worker as u8; PAYLOAD_MAX - 24];
                    let oid = format!("limit-{worker}");
                    let frame = raw_frame(OP_OSD, 0, oid.as_bytes(), &[(WRITE, b"", &data, 0, 0)]);
                    assert_eq!(frame.len(), 32 + oid.len() + PAYLOAD_MAX);
                    for _ in 0..frames_at_limit {
                        send(&mut stream, &frame);
                        let reply = read_reply(&mut stream).expect("answered");
                        assert_eq!(reply.status, 0, "a frame at the limit is served");
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
    };
    flood(200, 20); // Warm-up: touches the pools' pages and the objects' memory.
    let rss_warm = server.rss_kib();
    let addr = server.addr.clone();
    let good = std::thread::spawn(move || load(&addr, &GOOD_CLIENT));
    flood(1000, 100);
    let report = good.join().unwrap();
    assert_clean(&report);
    let rss_after = server.rss_kib();
    eprintln!(
        "oversized floods: VmRSS {rss_warm} KiB after the warm-up, {rss_after} KiB after 5x more"
    );
    assert!(
        rss_after < rss_warm + 16 * 1024,
        "memory grew with the flood: {rss_warm} KiB -> {rss_after} KiB"
    );
    let snapshot = wait_for_baseline(&server, 4);
    assert!(total(&snapshot, "stream_over_limit") >= 1200);
}

on_both_tcp_paths!(clients_vanishing_mid_frame_leak_nothing);
/// Clients that vanish mid-frame, over and over, at every kind of cut (in the header, in the
/// object id, in a small body, in a body bigger than a receive chunk): each is counted, and
/// nothing they started stays held: op slots, receive chunks and large buffers all return.
fn clients_vanishing_mid_frame_leak_nothing(tcp_io: &[&str]) {
    let server = ServerProcess::start(&args_with(&["--cores", "2", "--cpus", "0,1"], tcp_io));
    let before = wait_for_baseline(&server, 4);
    let small = raw_frame(OP_OSD, 1, b"vanish", &[(WRITE, b"", &[3u8; 300], 0, 0)]);
    let large = raw_frame(
        OP_OSD,
        2,
        b"vanish-large",
        &[(WRITE, b"", &vec![4u8; 1 << 20], 0, 0)],
    );
    let mut vanished = 0u64;
    for round in 0..25 {
        // Several at once, so that some cuts land while others hold buffers.
        let mut streams = Vec::new();
        for cut in [1usize, 20, 33, 40, 200, small.len() - 1] {
            let mut stream = connect(&server.addr);
            send(&mut stream, &small[..cut]);
            streams.push(stream);
        }
        for cut in [200 << 10, large.len() - 1 - round] {
            let mut stream = connect(&server.addr);
            send(&mut stream, &large[..cut]);
            streams.push(stream);
        }
        // And one that completes a frame first, then vanishes with the reply unread.
        let mut stream = connect(&server.addr);
        send(&mut stream, &small);
        send(&mut stream, &large[..100]);
        streams.push(stream);
        vanished += streams.len() as u64;
        std::thread::sleep(Duration::from_millis(20));
        drop(streams);
    }
    let after = wait_for_baseline(&server, total(&before, "buffers_in_use").max(4));
    let truncated = total(&after, "conn_truncated") - total(&before, "conn_truncated");
    assert!(
        truncated + 25 >= vanished,
        "vanishing clients are counted: {truncated} of {vanished}"
    );
    // Still serving, and the one complete write happened.
    let mut stream = connect(&server.addr);
    send(
        &mut stream,
        &raw_frame(OP_OSD, 9, b"vanish", &[(READ, b"", b"", 0, 300)]),
    );
    let reply = read_reply(&mut stream).expect("answered");
    assert_eq!(reply.status, 0);
    assert!(
        reply.payload.ends_with(&[3u8; 300]),
        "the completed write is there"
    );
}
