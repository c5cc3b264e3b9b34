//! End-to-end: `carmine serve --transport udp` (the datagram RPC on kernel UDP sockets) driven
//! by `carmine load --transport udp --verify`, on one and two cores, under injected loss, and
//! the copy counters of the receive path.

mod common;

use common::*;

/// Starts a memory-store server with the datagram RPC on a free port; returns it and the UDP
/// address it logged.
fn udp_server(extra: &[&str]) -> (ServerProcess, String) {
    let mut args = vec!["--transport", "udp", "--udp", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = ServerProcess::start(&args);
    let udp = server
        .startup_log
        .iter()
        .find_map(|line| line.split("datagram RPC listening on udp ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the server logs its UDP address before the banner")
        .to_string();
    (server, udp)
}

fn udp_load(udp: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--transport", "udp"];
    full.extend_from_slice(args);
    load(udp, &full)
}

const SHAPE: [&str; 10] = [
    "--duration",
    "1s",
    "--objects",
    "16",
    "--object-size",
    "256KiB",
    "--clients",
    "4",
    "--qd",
    "16",
];

/// Prefilled random writes, then random reads and a mix, all verified; returns the writes the
/// client saw acknowledged.
fn write_read_mixed(udp: &str, extra: &[&str]) -> u64 {
    let mut write = vec!["--op", "randwrite", "--prefill", "--verify"];
    write.extend_from_slice(&SHAPE);
    write.extend_from_slice(extra);
    let report = udp_load(udp, &write);
    assert_clean(&report, "randwrite");
    assert_eq!(
        report["prefill_ops"],
        16 * 64,
        "every block prefilled: {report}"
    );
    assert!(
        report["server"]["totals"].is_object(),
        "the status document came back over UDP: {report}"
    );
    let writes = report["prefill_ops"].as_u64().unwrap() + report["ops"].as_u64().unwrap();
    for op in ["randread", "seqread"] {
        let mut read = vec!["--op", op, "--verify"];
        read.extend_from_slice(&SHAPE);
        read.extend_from_slice(extra);
        assert_clean(&udp_load(udp, &read), op);
    }
    writes
}

#[test]
fn one_core_write_read_verify_without_copies() {
    let (mut server, udp) = udp_server(&["--cores", "1"]);
    let writes = write_read_mixed(&udp, &[]);
    let status = status(&server.addr);
    // Exactly once: every write the client saw acknowledged ran once, none ran twice.
    assert_eq!(total(&status, "ops_write"), writes, "{status}");
    // 4 KiB writes fit one datagram: each request reaches the store as a lease inside it.
    assert_eq!(total(&status, "udp_payload_copies"), 0, "{status}");
    assert_eq!(total(&status, "udp_rx_copied_bytes"), 0, "{status}");
    assert!(total(&status, "udp_frames_in_place") >= total(&status, "ops"));
    // Every read (whole 4 KiB blocks of the memory store) was answered from the store's
    // memory with the crc it keeps, its bytes copied once into the response (or first into a
    // pool buffer, when it had to wait while a write came), and verified by the client.
    assert_eq!(
        total(&status, "udp_replies_from_store") + total(&status, "udp_stored_bodies_copied"),
        total(&status, "ops_read"),
        "{status}"
    );
    assert!(total(&status, "udp_replies_from_store") > 0, "{status}");
    // ... and kept by the RPC as the head and the store's bytes, copied once, into the
    // packet: no read's payload was copied into a response buffer. What `udp_tx_copied_bytes`
    // counts: replies' heads (a write's or a read's: 40 bytes) and the three STATUS documents
    // the loads fetched over UDP. No write came while read responses were kept (the reads
    // ran last), so none was moved out of the store.
    assert_eq!(total(&status, "udp_stored_responses_copied"), 0, "{status}");
    let documents = 3 * 2 * status.to_string().len() as u64;
    let copied = total(&status, "udp_tx_copied_bytes");
    let bound = 40 * total(&status, "ops") + documents;
    assert!(
        copied <= bound,
        "{copied} bytes copied into responses, over {bound}: a read payload was: {status}"
    );
    assert_eq!(total(&status, "ops_in_flight"), 0);
    assert!(server.stop().success(), "clean exit on SIGINT");
}

#[test]
fn two_cores_cross_core_ops_verify() {
    let (mut server, udp) = udp_server(&["--cores", "2", "--cpus", "0,1"]);
    let mut mixed = vec!["--op", "mixed", "--verify"];
    mixed.extend_from_slice(&SHAPE);
    let writes = write_read_mixed(&udp, &[]);
    let report = udp_load(&udp, &mixed);
    assert_clean(&report, "mixed");
    let status = status(&server.addr);
    // Each core receives its clients' datagrams (SO_REUSEPORT) and sends ops for the other
    // core's PGs over the ring; with 4 clients and 128 PGs some always cross.
    assert!(total(&status, "ops_remote_out") > 0, "{status}");
    assert!(total(&status, "ops_write") >= writes);
    // Under the mix, writes came while read responses from the store's memory were kept for
    // resends: those were moved out of the store first (and verified by the client).
    assert!(
        total(&status, "udp_stored_responses_copied") > 0,
        "{status}"
    );
    assert_eq!(total(&status, "ops_in_flight"), 0);
    assert!(server.stop().success(), "clean exit on SIGINT");
}

#[test]
fn lost_datagrams_are_resent_and_every_op_completes_once() {
    let (mut server, udp) = udp_server(&["--cores", "1", "--udp-drop-every", "7"]);
    let writes = write_read_mixed(&udp, &[]);
    let status = status(&server.addr);
    assert!(total(&status, "udp_dropped_injected") > 0, "{status}");
    // A dropped request packet is recovered by the client's resend (which is then the first
    // copy to arrive, not a duplicate); the load above completed every op without an error.
    assert_eq!(
        total(&status, "ops_write"),
        writes,
        "a resent write never runs twice: {status}"
    );
    assert!(server.stop().success(), "clean exit on SIGINT");
}

#[test]
fn multi_packet_writes_are_copied_once_and_counted() {
    let (mut server, udp) = udp_server(&["--cores", "1"]);
    // 16 KiB blocks: a write frame spans two packets of 8940 bytes; reads fit one.
    let report = udp_load(
        &udp,
        &[
            "--op",
            "randwrite",
            "--verify",
            "--bs",
            "16KiB",
            "--object-size",
            "256KiB",
            "--objects",
            "8",
            "--clients",
            "2",
            "--qd",
            "8",
            "--duration",
            "1s",
        ],
    );
    assert_clean(&report, "16 KiB writes");
    let status = status(&server.addr);
    let writes = total(&status, "ops_write");
    assert_eq!(writes, report["ops"].as_u64().unwrap());
    assert_eq!(
        total(&status, "udp_payload_copies"),
        writes,
        "one copy per write: {status}"
    );
    // frame = 32 header + "obj.N" + 24 descriptor + 16384 data
    let copied = total(&status, "udp_rx_copied_bytes");
    assert!(
        copied >= writes * (32 + 5 + 24 + 16384) && copied <= writes * (32 + 6 + 24 + 16384),
        "{copied} bytes copied for {writes} writes"
    );
    assert!(server.stop().success(), "clean exit on SIGINT");
}

/// `--rpc-mtu 1500` on both ends (an ordinary Ethernet link): a 4 KiB write takes three
/// packets, reassembled and copied once; reads and writes verify; a value out of range is
/// refused at start.
#[test]
fn standard_ethernet_mtu_splits_requests_and_verifies() {
    let (mut server, udp) = udp_server(&["--cores", "1", "--rpc-mtu", "1500"]);
    let writes = write_read_mixed(&udp, &["--rpc-mtu", "1500"]);
    let status = status(&server.addr);
    assert_eq!(total(&status, "ops_write"), writes, "{status}");
    // 1500 - 20 (IPv4) - 8 (UDP) - 32 (RPC header) = 1440 bytes a packet: a write frame of
    // 4 KiB and its head is three packets, copied once into one buffer.
    assert!(
        total(&status, "udp_datagrams_rx") >= 3 * writes,
        "three packets per write: {status}"
    );
    assert_eq!(
        total(&status, "udp_payload_copies"),
        writes,
        "each multi-packet write copied once: {status}"
    );
    assert!(server.stop().success(), "clean exit on SIGINT");

    for bad in ["9001", "1279", "jumbo"] {
        let output = std::process::Command::new(CARMINE)
            .args([
                "serve",
                "--transport",
                "udp",
                "--store",
                "memory",
                "--rpc-mtu",
                bad,
            ])
            .output()
            .expect("run carmine");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "--rpc-mtu {bad} accepted");
        assert!(stderr.contains("1280 to 9000"), "{stderr}");
        let output = std::process::Command::new(CARMINE)
            .args(["load", "--transport", "udp", "--rpc-mtu", bad])
            .output()
            .expect("run carmine");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "load --rpc-mtu {bad} accepted");
        assert!(stderr.contains("1280 to 9000"), "{stderr}");
    }
}

/// A client started with another `--rpc-mtu` than the server is told so at once, with both
/// MTUs, whichever end notices: the server refuses requests laid out for another size (a
/// 4 KiB write), the client refuses responses laid out for another size (a 4 KiB read answered
/// in the server's packets). Before the refusal existed, both waited 30 s and guessed.
#[test]
fn a_client_with_another_rpc_mtu_fails_at_once_naming_both() {
    let (mut server, udp) = udp_server(&["--cores", "1", "--rpc-mtu", "1500"]);
    // The objects exist (written with the right MTU), so reads answer 4 KiB.
    let prefill = udp_load(
        &udp,
        &args_with(&["--op", "randwrite", "--rpc-mtu", "1500"], &SHAPE),
    );
    assert_clean(&prefill, "prefill at the server's MTU");
    for (op, client_mtu, noticed_by) in [
        ("randwrite", "9000", "server"),
        ("randread", "1280", "client"),
    ] {
        let started = std::time::Instant::now();
        let output = std::process::Command::new(CARMINE)
            .args([
                "load",
                "--transport",
                "udp",
                "--target",
                &udp,
                "--op",
                op,
                "--rpc-mtu",
                client_mtu,
                "--duration",
                "5s",
                "--objects",
                "16",
                "--object-size",
                "256KiB",
                "--clients",
                "1",
                "--qd",
                "4",
                "--status-target",
                &server.addr,
            ])
            .output()
            .expect("run carmine load");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{op} at MTU {client_mtu} succeeded: {stderr}"
        );
        assert!(
            stderr.contains("MTU 1500")
                && stderr.contains(&format!("MTU {client_mtu}"))
                && stderr.contains("same --rpc-mtu"),
            "{op} ({noticed_by} notices): the error names both MTUs: {stderr}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(4),
            "{op}: failed after {:?}, not at once (a resend timeout is 30 s)",
            started.elapsed()
        );
    }
    let status = status(&server.addr);
    assert!(
        total(&status, "udp_refusals") >= 1,
        "the server counts its refusals: {status}"
    );
    assert!(server.stop().success(), "clean exit on SIGINT");
}

/// `--rpc-mtu 9000` on both ends over a link of MTU 1500 (a network namespace whose
/// loopback has that MTU): the server sends with Don't Fragment set (cheaper for the kernel),
/// finds a reply too long for the route, says so once and sends fragmented from then on; every
/// verified op completes. Needs root and `unshare` (util-linux) for the namespace: says so and
/// passes vacuously without them (CI runs as root).
#[test]
fn an_rpc_mtu_over_the_links_mtu_still_works_fragmented() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root (a network namespace with a 1500-byte loopback)");
        return;
    }
    let script = format!(
        "set -e
        ip link set lo up mtu 1500
        {carmine} serve --store memory --cores 1 --listen 127.0.0.1:16990 --transport udp \
          --udp 127.0.0.1:16991 --rpc-mtu 9000 --nbd off >serve.log 2>&1 &
        server=$!
        for _ in $(seq 100); do grep -q 'serving on' serve.log && break; sleep 0.1; done
        {carmine} load --transport udp --target 127.0.0.1:16991 --status-target 127.0.0.1:16990 \
          --rpc-mtu 9000 --op mixed --verify --prefill --duration 1s --objects 8 \
          --object-size 64KiB --clients 2 --qd 8 --json >load.json
        kill -INT $server; wait $server || true
        cat serve.log >&2",
        carmine = CARMINE
    );
    let dir = TestDir::new("udp-fragmented");
    let output = std::process::Command::new("unshare")
        .args(["-n", "bash", "-c", &script])
        .current_dir(&dir.0)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) => {
            eprintln!("SKIP: unshare (util-linux) is not available: {e}");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.0.join("load.json")).unwrap()).unwrap();
    assert_clean(&report, "verified ops over fragmented datagrams");
    assert!(
        stderr.contains("sending fragmented from now on"),
        "the server says it stopped setting Don't Fragment: {stderr}"
    );
}

#[test]
fn dpdk_transport_without_the_feature_says_how_to_build_it() {
    if cfg!(feature = "dpdk") {
        println!("SKIP: this build has the dpdk feature");
        return;
    }
    for args in [
        &["serve", "--transport", "dpdk", "--store", "memory"][..],
        &["load", "--transport", "dpdk"][..],
    ] {
        let output = std::process::Command::new(CARMINE)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains("--features dpdk"), "{args:?}: {stderr}");
    }
}

#[test]
fn steady_state_udp_data_path_does_not_allocate() {
    let (server, udp) = udp_server(&["--cores", "1"]);
    let shape = [
        "--duration",
        "1s",
        "--objects",
        "8",
        "--object-size",
        "256KiB",
        "--clients",
        "2",
        "--qd",
        "16",
    ];
    let prefill = args_with(&["--op", "randwrite", "--prefill"], &shape);
    assert_clean(&udp_load(&udp, &prefill), "prefill");
    let before = status(&server.addr);
    let mixed = args_with(&["--op", "mixed"], &shape);
    assert_clean(&udp_load(&udp, &mixed), "mixed");
    let after = status(&server.addr);
    let ops = total(&after, "ops") - total(&before, "ops");
    let allocations = total(&after, "allocations") - total(&before, "allocations");
    // What may allocate is session set-up (2 clients x 2 sessions, one for the status fetch:
    // each session's slots and reassembly tables), never an op.
    let session_setup_budget = 5 * 16;
    assert!(ops > 500, "enough ops to see a per-op allocation: {ops}");
    assert!(
        allocations <= session_setup_budget,
        "{allocations} allocations over {ops} ops: the UDP data path allocates"
    );
}

/// A datagram RPC request packet by hand (the layout of `dgram::packet`), carrying `message`
/// whole in one packet.
fn rpc_packet(session: u32, request_id: u64, message: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0x4352u16.to_le_bytes());
    p.push(1); // version
    p.push(1); // request
    p.extend_from_slice(&session.to_le_bytes());
    p.extend_from_slice(&request_id.to_le_bytes());
    p.extend_from_slice(&(message.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes()); // index
    p.extend_from_slice(&1u16.to_le_bytes()); // count
    p.extend_from_slice(&0u16.to_le_bytes()); // ack count
    p.extend_from_slice(&(message.len() as u16).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(message);
    p
}

/// Waits for the response to `request_id` (acks skipped) and returns its message.
fn rpc_response(socket: &std::net::UdpSocket, request_id: u64) -> Vec<u8> {
    let mut buf = [0u8; 9000];
    loop {
        let n = socket
            .recv(&mut buf)
            .expect("a response within the timeout");
        let kind = buf[3];
        let id = u64::from_le_bytes(buf[8..16].try_into().unwrap());
        if kind == 2 && id == request_id {
            return buf[32..n].to_vec();
        }
    }
}

fn status_of(reply: &[u8]) -> u32 {
    assert!(reply.len() >= 32, "a wire reply: {reply:?}");
    u32::from_le_bytes(reply[24..28].try_into().unwrap())
}

#[test]
fn hostile_datagrams_get_errors_or_are_dropped_and_the_server_keeps_serving() {
    let (mut server, udp) = udp_server(&["--cores", "1"]);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(&udp).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    // Not an RPC packet at all: dropped and counted.
    socket
        .send(b"garbage that is not a packet header at all....")
        .unwrap();
    socket.send(&[0xff; 3]).unwrap();
    // An RPC message that is not a wire frame: an empty response ends the request.
    socket
        .send(&rpc_packet(9, 0, b"hello, not a frame"))
        .unwrap();
    assert!(rpc_response(&socket, 0).is_empty());
    // A frame whose crc is wrong: bad_crc.
    let mut frame = raw_frame(1, 77, b"obj", &[(1, b"", b"data", 0, 0)]);
    let last = frame.len() - 1;
    frame[last] ^= 0xff;
    socket.send(&rpc_packet(9, 1, &frame)).unwrap();
    assert_eq!(status_of(&rpc_response(&socket, 1)), 16, "bad_crc");
    // A frame longer than its header says: malformed.
    let mut long = raw_frame(1, 78, b"obj", &[(1, b"", b"data", 0, 0)]);
    long.extend_from_slice(b"trailing");
    socket.send(&rpc_packet(9, 2, &long)).unwrap();
    assert_eq!(status_of(&rpc_response(&socket, 2)), 18, "malformed");
    // An object id over the server's limit, refused from the header: over_limit.
    let oid = vec![b'x'; 300];
    let over = raw_frame(1, 79, &oid, &[(1, b"", b"data", 0, 0)]);
    socket.send(&rpc_packet(9, 3, &over)).unwrap();
    assert_eq!(status_of(&rpc_response(&socket, 3)), 19, "over_limit");
    // Still serving, and every odd datagram was counted.
    let mut write = vec!["--op", "randwrite", "--prefill", "--verify"];
    write.extend_from_slice(&SHAPE);
    assert_clean(&udp_load(&udp, &write), "after hostile datagrams");
    let status = status(&server.addr);
    assert!(total(&status, "udp_malformed") >= 4, "{status}");
    assert!(server.stop().success(), "clean exit on SIGINT");
}
