//! Bad input: every kind of broken client gets an error or a closed connection, is counted,
//! and never disturbs the well-behaved client running beside it.

mod common;

use std::io::Write;
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

#[test]
fn broken_clients_are_answered_counted_and_isolated() {
    let mut server =
        ServerProcess::start(&["--cores", "2", "--cpus", "0,1", "--max-oid-len", "64"]);
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

#[test]
fn a_thousand_connections_are_all_served_with_bounded_buffers() {
    const CLIENTS: usize = 1000;
    raise_fd_limit(2 * CLIENTS as u64 + 256);
    let server = ServerProcess::start(&["--cores", "2", "--cpus", "0,1"]);
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
