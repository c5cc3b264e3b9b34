//! The NBD frontend, driven by the standard tools (nbdinfo, qemu-img, fio, nbdcopy) and by a
//! hostile raw client, against the real `carmine serve --nbd` process.
//!
//! Tools come from Debian's libnbd-bin, qemu-utils and fio packages (ci/test.sh installs them);
//! a test whose tool is missing prints SKIP with the reason.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The tools a test needs, or SKIP (printed) and false.
fn tools(test: &str, names: &[&str]) -> bool {
    let missing: Vec<&str> = names.iter().copied().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "SKIP: {test}: {} not installed (apt-get install libnbd-bin qemu-utils fio)",
        missing.join(", ")
    );
    false
}

fn start(extra: &[&str]) -> (ServerProcess, String) {
    let mut args = vec!["--nbd", "127.0.0.1:0", "--cores", "2", "--cpus", "0,1"];
    args.extend_from_slice(extra);
    let server = ServerProcess::start(&args);
    let nbd = server
        .startup_log
        .iter()
        .find_map(|line| line.split("NBD frontend listening on ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the server announces its NBD address")
        .to_string();
    (server, nbd)
}

/// Runs a command; panics with its output unless it succeeds. Returns stdout.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn image(args: &[&str]) -> String {
    run(CARMINE, &[&["image"], args].concat())
}

fn random_file(path: &Path, bytes: usize) {
    // xorshift: random enough that compression or zero detection cannot hide a mistake.
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ bytes as u64;
    let mut data = vec![0u8; bytes];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}

fn uri(nbd: &str, name: &str) -> String {
    format!("nbd://{nbd}/{name}")
}

fn qemu_round_trip(nbd: &str, name: &str, dir: &TestDir) {
    let source = dir.0.join("source.raw");
    let copy = dir.0.join("copy.raw");
    random_file(&source, 64 << 20);
    let (source, copy) = (source.to_str().unwrap(), copy.to_str().unwrap());
    let target = uri(nbd, name);
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", source, &target],
    );
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &target, copy],
    );
    let compared = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", source, copy],
    );
    assert!(compared.contains("identical"), "{compared}");
    // And the image itself against the file, through NBD directly.
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", source, &target],
    );
}

fn fio_verify(nbd: &str, name: &str, offset: &str, size: &str) {
    let uri = format!("--uri={}", uri(nbd, name));
    let offset = format!("--offset={offset}");
    let size = format!("--size={size}");
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            &offset,
            &size,
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    // fio may print notes before its JSON document.
    let json = if out.starts_with('{') {
        &out[..]
    } else {
        &out[out.find("\n{").map_or(0, |at| at + 1)..]
    };
    let report: serde_json::Value = serde_json::from_str(json).expect("fio json");
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(job["write"]["total_ios"].as_u64().unwrap() > 0, "{job}");
    assert!(
        job["read"]["total_ios"].as_u64().unwrap() > 0,
        "verify read back: {job}"
    );
}

#[test]
fn tools_on_the_memory_store() {
    if !tools(
        "tools_on_the_memory_store",
        &["nbdinfo", "nbdcopy", "qemu-img", "fio"],
    ) {
        return;
    }
    let dir = TestDir::new("nbd-memory");
    let (mut server, nbd) = start(&["--memory-capacity", "1GiB"]);
    image(&[
        "create",
        "disk",
        "--size",
        "64MiB",
        "--target",
        &server.addr,
    ]);
    image(&[
        "create",
        "small",
        "--size",
        "1MiB",
        "--object-size",
        "64KiB",
        "--target",
        &server.addr,
    ]);
    let listed: serde_json::Value =
        serde_json::from_str(&image(&["list", "--json", "--target", &server.addr])).unwrap();
    assert_eq!(listed["images"][0]["name"], "disk", "{listed}");
    assert_eq!(listed["images"][0]["size"], 64 << 20, "{listed}");
    assert_eq!(listed["images"][1]["object_size"], 64 << 10, "{listed}");

    // nbdinfo lists the images and describes one.
    let list = run("nbdinfo", &["--list", "--json", &format!("nbd://{nbd}")]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk", "small"], "{list}");
    let info = run("nbdinfo", &["--json", &uri(&nbd, "small")]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 1 << 20, "{info}");
    assert_eq!(export["can_flush"], true, "{info}");
    assert_eq!(export["can_trim"], true, "{info}");
    assert_eq!(export["can_multi_conn"], true, "{info}");
    // An unknown image is refused.
    let missing = Command::new("nbdinfo")
        .arg(uri(&nbd, "nope"))
        .output()
        .unwrap();
    assert!(!missing.status.success());

    qemu_round_trip(&nbd, "disk", &dir);

    // nbdcopy out of the image matches what qemu-img put in.
    let copied = dir.0.join("nbdcopy.raw");
    run("nbdcopy", &[&uri(&nbd, "disk"), copied.to_str().unwrap()]);
    let source = std::fs::read(dir.0.join("source.raw")).unwrap();
    assert!(
        std::fs::read(&copied).unwrap() == source,
        "nbdcopy read back other bytes"
    );

    // fio verifies a region it writes (the image's objects exist already: steady state).
    let before = status(&server.addr);
    fio_verify(&nbd, "disk", "8M", "8M");
    let after = status(&server.addr);
    let requests = total(&after, "nbd_requests") - total(&before, "nbd_requests");
    let allocations = total(&after, "allocations") - total(&before, "allocations");
    assert!(requests >= 4096, "{requests} requests");
    // Connection set-up allocates (buffers at accept); requests must not.
    assert!(
        allocations < 200,
        "{allocations} allocations for {requests} NBD requests"
    );
    // The other 56 MiB are still qemu's bytes: fio wrote only its region.
    let tail = dir.0.join("tail.raw");
    run("nbdcopy", &[&uri(&nbd, "disk"), tail.to_str().unwrap()]);
    let tail = std::fs::read(&tail).unwrap();
    assert!(tail[..8 << 20] == source[..8 << 20] && tail[16 << 20..] == source[16 << 20..]);

    // Removing an image removes it from the export list.
    image(&["rm", "small", "--target", &server.addr]);
    let list = run("nbdinfo", &["--list", &format!("nbd://{nbd}")]);
    assert!(!list.contains("small") && list.contains("disk"), "{list}");
    assert_eq!(total(&status(&server.addr), "nbd_errors"), 0);
    assert!(server.stop().success());
}

#[test]
fn segment_store_images_survive_a_restart() {
    if !tools(
        "segment_store_images_survive_a_restart",
        &["qemu-img", "fio", "nbdcopy"],
    ) {
        return;
    }
    let dir = TestDir::new("nbd-segment");
    let device = dir.0.join("carmine.img");
    let args = [
        "--store",
        "segment",
        "--device",
        device.to_str().unwrap(),
        "--device-size",
        "1GiB",
    ];
    let (mut server, nbd) = start(&args);
    // Small objects: the segment store serializes writes within one object.
    image(&[
        "create",
        "disk",
        "--size",
        "64MiB",
        "--object-size",
        "256KiB",
        "--target",
        &server.addr,
    ]);
    qemu_round_trip(&nbd, "disk", &dir);
    fio_verify(&nbd, "disk", "0", "2M");
    let before = dir.0.join("before.raw");
    run("nbdcopy", &[&uri(&nbd, "disk"), before.to_str().unwrap()]);
    assert!(server.stop().success());

    let (mut server, nbd) = start(&args);
    let listed = image(&["list", "--target", &server.addr]);
    assert!(
        listed.contains("disk") && listed.contains("64MiB"),
        "{listed}"
    );
    let after = dir.0.join("after.raw");
    run("nbdcopy", &[&uri(&nbd, "disk"), after.to_str().unwrap()]);
    assert!(
        std::fs::read(&before).unwrap() == std::fs::read(&after).unwrap(),
        "the image read back after a restart differs"
    );
    assert!(server.stop().success());
}

// ---- a raw NBD client, independent of the server's code ----

const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

fn handshake(nbd: &str) -> TcpStream {
    let mut stream = connect(nbd);
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    send(&mut stream, &3u32.to_be_bytes()); // fixed newstyle, no zeroes
    stream
}

fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) {
    let mut out = OPT_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    send(stream, &out);
}

/// (reply type, data) of one option reply.
fn option_reply(stream: &mut TcpStream, option: u32) -> (u32, Vec<u8>) {
    let mut head = [0u8; 20];
    stream.read_exact(&mut head).expect("option reply");
    assert_eq!(
        u64::from_be_bytes(head[..8].try_into().unwrap()),
        REPLY_MAGIC
    );
    assert_eq!(u32::from_be_bytes(head[8..12].try_into().unwrap()), option);
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let mut data = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
    stream.read_exact(&mut data).unwrap();
    (kind, data)
}

fn go(stream: &mut TcpStream, name: &str) -> u32 {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(stream, 7, &data);
    loop {
        let (kind, _) = option_reply(stream, 7);
        if kind != 3 {
            return kind; // ACK (1) or an error; INFO (3) replies come first.
        }
    }
}

fn request(
    stream: &mut TcpStream,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) {
    let mut out = 0x2560_9513u32.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    send(stream, &out);
}

/// (error, cookie) of a simple reply.
fn reply(stream: &mut TcpStream) -> Option<(u32, u64)> {
    let mut head = [0u8; 16];
    stream.read_exact(&mut head).ok()?;
    assert_eq!(
        u32::from_be_bytes(head[..4].try_into().unwrap()),
        0x6744_6698
    );
    Some((
        u32::from_be_bytes(head[4..8].try_into().unwrap()),
        u64::from_be_bytes(head[8..16].try_into().unwrap()),
    ))
}

fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

#[test]
fn bad_input_gets_errors_and_the_server_carries_on() {
    let (mut server, nbd) = start(&[]);
    image(&["create", "disk", "--size", "8MiB", "--target", &server.addr]);

    // Negotiation: unknown option, oversized option, malformed GO, unknown image, then a good GO.
    let mut stream = handshake(&nbd);
    send_option(&mut stream, 999, b"");
    assert_eq!(
        option_reply(&mut stream, 999).0,
        (1 << 31) | 1,
        "unsupported"
    );
    send_option(&mut stream, 7, &vec![0u8; 10_000]);
    assert_eq!(option_reply(&mut stream, 7).0, (1 << 31) | 9, "too big");
    send_option(&mut stream, 7, &[0, 0, 0, 200, b'x']);
    assert_eq!(option_reply(&mut stream, 7).0, (1 << 31) | 3, "invalid");
    assert_eq!(go(&mut stream, "nope"), (1 << 31) | 6, "unknown export");
    assert_eq!(go(&mut stream, "../etc"), (1 << 31) | 6, "bad name");
    send_option(&mut stream, 3, b"x");
    assert_eq!(
        option_reply(&mut stream, 3).0,
        (1 << 31) | 3,
        "LIST takes no data"
    );
    assert_eq!(go(&mut stream, "disk"), 1);

    // Transmission: out of range, oversized, bad flags get errors; the connection stays usable.
    request(&mut stream, 0, 0, 1, 8 << 20, 4096);
    assert_eq!(
        reply(&mut stream),
        Some((22, 1)),
        "read past the end: EINVAL"
    );
    request(&mut stream, 1, 0, 2, (8 << 20) - 512, 4096);
    send(&mut stream, &[7u8; 4096]);
    assert_eq!(
        reply(&mut stream),
        Some((28, 2)),
        "write past the end: ENOSPC"
    );
    request(&mut stream, 1, 0, 3, 0, 3 << 20);
    send(&mut stream, &vec![1u8; 3 << 20]);
    assert_eq!(reply(&mut stream), Some((22, 3)), "oversized write: EINVAL");
    request(&mut stream, 0, 0, 4, 0, 64 << 20);
    assert_eq!(reply(&mut stream), Some((22, 4)), "oversized read: EINVAL");
    request(&mut stream, 0, 0x80, 5, 0, 4096);
    assert_eq!(reply(&mut stream), Some((22, 5)), "unknown flag: EINVAL");
    request(&mut stream, 4, 0, 6, u64::MAX - 10, 4096);
    assert_eq!(reply(&mut stream), Some((22, 6)), "offset overflow: EINVAL");
    // Still usable: a write spanning two objects (4 MiB each), read back, flushed.
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    request(&mut stream, 1, 1, 7, (4 << 20) - 4096, 8192);
    send(&mut stream, &data);
    assert_eq!(reply(&mut stream), Some((0, 7)), "FUA write across objects");
    request(&mut stream, 0, 0, 8, (4 << 20) - 4096, 8192);
    assert_eq!(reply(&mut stream), Some((0, 8)));
    let mut back = vec![0u8; 8192];
    stream.read_exact(&mut back).unwrap();
    assert!(back == data, "read back across the object boundary");
    request(&mut stream, 3, 0, 9, 0, 0);
    assert_eq!(reply(&mut stream), Some((0, 9)), "flush");
    // Unknown command: EINVAL, then the server closes (its payload cannot be known).
    request(&mut stream, 77, 0, 10, 0, 0);
    assert_eq!(reply(&mut stream), Some((22, 10)));
    assert!(closed(&mut stream));

    // A bad request magic closes the connection.
    let mut stream = handshake(&nbd);
    assert_eq!(go(&mut stream, "disk"), 1);
    send(&mut stream, &[0xffu8; 28]);
    assert!(closed(&mut stream));

    // Clients that vanish: mid-negotiation, mid-header, mid-payload.
    let mut stream = handshake(&nbd);
    send(&mut stream, &OPT_MAGIC.to_be_bytes());
    drop(stream);
    let mut stream = handshake(&nbd);
    assert_eq!(go(&mut stream, "disk"), 1);
    request(&mut stream, 1, 0, 11, 0, 1 << 20);
    send(&mut stream, &vec![9u8; 300 << 10]);
    drop(stream);
    let mut stream = handshake(&nbd);
    assert_eq!(go(&mut stream, "disk"), 1);
    for cookie in 0..64 {
        request(&mut stream, 0, 0, cookie, 0, 65536);
    }
    drop(stream); // With 64 reads in flight, their replies unread.

    // ABORT is acknowledged, then the connection closes.
    let mut stream = handshake(&nbd);
    send_option(&mut stream, 2, b"");
    assert_eq!(option_reply(&mut stream, 2).0, 1);
    assert!(closed(&mut stream));

    // The server is unaffected: a fresh client reads what the good write put there, and
    // nothing is left in flight.
    std::thread::sleep(Duration::from_millis(300));
    let mut stream = handshake(&nbd);
    assert_eq!(go(&mut stream, "disk"), 1);
    request(&mut stream, 0, 0, 12, (4 << 20) - 4096, 8192);
    assert_eq!(reply(&mut stream), Some((0, 12)));
    stream.read_exact(&mut back).unwrap();
    assert!(back == data);
    // WRITE_ZEROES on part of object 0, TRIM of all of object 1: both read back as zeroes.
    request(&mut stream, 6, 0, 20, (4 << 20) - 4096, 4096);
    assert_eq!(reply(&mut stream), Some((0, 20)));
    request(&mut stream, 0, 0, 21, (4 << 20) - 4096, 8192);
    assert_eq!(reply(&mut stream), Some((0, 21)));
    stream.read_exact(&mut back).unwrap();
    assert!(back[..4096].iter().all(|b| *b == 0) && back[4096..] == data[4096..]);
    request(&mut stream, 4, 0, 22, 4 << 20, 4 << 20);
    assert_eq!(reply(&mut stream), Some((0, 22)));
    request(&mut stream, 0, 0, 23, (4 << 20) - 4096, 8192);
    assert_eq!(reply(&mut stream), Some((0, 23)));
    stream.read_exact(&mut back).unwrap();
    assert!(
        back.iter().all(|b| *b == 0),
        "trimmed and zeroed ranges read as zeroes"
    );
    request(&mut stream, 2, 0, 13, 0, 0); // DISC
    assert!(closed(&mut stream));
    std::thread::sleep(Duration::from_millis(300));
    let status = status(&server.addr);
    assert_eq!(total(&status, "ops_in_flight"), 0, "{status}");
    assert_eq!(total(&status, "nbd_connections"), 0, "{status}");
    assert!(total(&status, "nbd_protocol_errors") >= 3, "{status}");
    assert!(server.is_running());
    // A client that stops sending halfway through a write, and stays: shutdown still drains.
    let mut stream = handshake(&nbd);
    assert_eq!(go(&mut stream, "disk"), 1);
    request(&mut stream, 1, 0, 14, 0, 1 << 20);
    send(&mut stream, &vec![5u8; 200 << 10]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(server.stop().success());
    drop(stream);
}

#[test]
fn image_tool_checks_its_input() {
    let (mut server, _nbd) = start(&[]);
    let fails = |args: &[&str]| {
        let output = Command::new(CARMINE)
            .args([&["image"], args].concat())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let target = server.addr.clone();
    assert!(
        fails(&["create", "a.b", "--size", "1MiB", "--target", &target]).contains("image name")
    );
    assert!(fails(&[
        "create",
        "a",
        "--size",
        "1MiB",
        "--object-size",
        "3MiB",
        "--target",
        &target
    ])
    .contains("power of two"));
    assert!(fails(&["create", "a", "--size", "0", "--target", &target]).contains("size"));
    image(&["create", "a", "--size", "1MiB", "--target", &target]);
    assert!(
        fails(&["create", "a", "--size", "1MiB", "--target", &target]).contains("already exists")
    );
    assert!(fails(&["rm", "b", "--target", &target]).contains("does not exist"));
    image(&["rm", "a", "--target", &target]);
    let listed: serde_json::Value =
        serde_json::from_str(&image(&["list", "--json", "--target", &target])).unwrap();
    assert_eq!(listed["images"], serde_json::json!([]));
    assert!(server.stop().success());
}

/// One write then a read of it back through `stream` (4 KiB at `offset`); the round trip's time.
fn write_read(stream: &mut TcpStream, cookie: u64, offset: u64) -> Duration {
    let started = std::time::Instant::now();
    let data: Vec<u8> = (0..4096u32).map(|i| (i as u64 ^ cookie) as u8).collect();
    request(stream, 1, 0, cookie, offset, 4096);
    send(stream, &data);
    assert_eq!(reply(stream), Some((0, cookie)));
    request(stream, 0, 0, cookie + 1, offset, 4096);
    assert_eq!(reply(stream), Some((0, cookie + 1)));
    let mut back = vec![0u8; 4096];
    stream.read_exact(&mut back).unwrap();
    assert!(back == data, "read back what was written");
    started.elapsed()
}

/// The 99th percentile of `rounds` write-read round trips.
fn round_trip_p99(stream: &mut TcpStream, rounds: u64) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|i| write_read(stream, 1000 + 2 * i, (i % 64) * 4096))
        .collect();
    times.sort();
    times[(times.len() * 99 / 100).min(times.len() - 1)]
}

/// Slow-loris NBD clients (negotiating and sending requests one byte at a time with pauses,
/// never finishing) and floods of oversized requests, beside a normal client: its round trips
/// stay within a generous bound of its own baseline, the server's memory stays bounded, and
/// once the hostile clients are gone every connection and op is gone too.
#[test]
fn slow_and_oversized_nbd_clients_leave_others_alone() {
    let (mut server, nbd) = start(&[]);
    image(&["create", "disk", "--size", "8MiB", "--target", &server.addr]);
    let mut good = handshake(&nbd);
    assert_eq!(go(&mut good, "disk"), 1);
    let baseline = round_trip_p99(&mut good, 200);

    // 96 slow clients: a third dribble the negotiation, a third a GO option, a third a write
    // request and its payload; none finishes.
    let mut go_option = OPT_MAGIC.to_be_bytes().to_vec();
    go_option.extend_from_slice(&7u32.to_be_bytes());
    go_option.extend_from_slice(&10u32.to_be_bytes());
    go_option.extend_from_slice(&[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0]);
    let mut write = 0x2560_9513u32.to_be_bytes().to_vec();
    write.extend_from_slice(&[0, 0, 0, 1]);
    write.extend_from_slice(&[0; 8]);
    write.extend_from_slice(&0u64.to_be_bytes());
    write.extend_from_slice(&65536u32.to_be_bytes());
    write.resize(28 + 65536, 0xab);
    let mut slow: Vec<(TcpStream, Vec<u8>, usize)> = Vec::new();
    for i in 0..96 {
        let (stream, dribble) = match i % 3 {
            0 => {
                let mut stream = connect(&nbd);
                let mut greeting = [0u8; 18];
                stream.read_exact(&mut greeting).unwrap();
                let mut bytes = 3u32.to_be_bytes().to_vec();
                bytes.extend_from_slice(&go_option);
                (stream, bytes)
            }
            1 => (handshake(&nbd), go_option.clone()),
            _ => {
                let mut stream = handshake(&nbd);
                assert_eq!(go(&mut stream, "disk"), 1);
                (stream, write.clone())
            }
        };
        // All but the last byte, one at a time, happen during the measured run below.
        let keep = dribble.len() - 1;
        slow.push((stream, dribble[..keep].to_vec(), 0));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_slow = stop.clone();
    let dribbler = std::thread::spawn(move || {
        while !stop_slow.load(std::sync::atomic::Ordering::Relaxed) {
            for (stream, bytes, sent) in slow.iter_mut() {
                if *sent < bytes.len() {
                    send(stream, &bytes[*sent..*sent + 1]);
                    *sent += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        slow
    });
    std::thread::sleep(Duration::from_millis(200));
    let beside = round_trip_p99(&mut good, 200);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let slow = dribbler.join().unwrap();
    let bound = (baseline * 10).max(Duration::from_millis(50));
    eprintln!("NBD slow clients: good p99 round trip {baseline:?} alone, {beside:?} beside 96 slow clients");
    assert!(
        beside < bound,
        "p99 {beside:?} beside slow clients, {baseline:?} alone"
    );

    // Oversized requests, many times over: writes over the limit are answered EINVAL and their
    // payload dropped (the connection stays usable), writes over 32 MiB close the connection,
    // reads over the limit are answered EINVAL; the good client keeps working throughout.
    let rss_before = server.rss_kib();
    let mut flood = handshake(&nbd);
    assert_eq!(go(&mut flood, "disk"), 1);
    let payload = vec![0x5au8; 3 << 20];
    for cookie in 0..20 {
        request(&mut flood, 1, 0, cookie, 0, 3 << 20);
        send(&mut flood, &payload);
        assert_eq!(
            reply(&mut flood),
            Some((22, cookie)),
            "oversized write: EINVAL"
        );
        request(&mut flood, 0, 0, cookie, 0, u32::MAX);
        assert_eq!(
            reply(&mut flood),
            Some((22, cookie)),
            "oversized read: EINVAL"
        );
    }
    for cookie in 0..50 {
        let mut stream = handshake(&nbd);
        assert_eq!(go(&mut stream, "disk"), 1);
        request(&mut stream, 1, 0, cookie, 0, u32::MAX);
        assert!(
            closed(&mut stream),
            "a write too large to drop closes the connection"
        );
        write_read(&mut good, 5000 + 2 * cookie, 0);
    }
    let rss_after = server.rss_kib();
    eprintln!("NBD oversized floods: VmRSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "memory grew with the flood: {rss_before} KiB -> {rss_after} KiB"
    );
    drop((slow, flood, good));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = status(&server.addr);
        if total(&status, "nbd_connections") == 0 && total(&status, "ops_in_flight") == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "NBD connections or ops left behind: {}",
            status["totals"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.stop().success());
}

/// (flags, type, cookie, payload) of one structured reply chunk.
fn structured_chunk(stream: &mut TcpStream) -> (u16, u16, u64, Vec<u8>) {
    let mut head = [0u8; 20];
    stream.read_exact(&mut head).expect("a structured chunk");
    assert_eq!(
        u32::from_be_bytes(head[..4].try_into().unwrap()),
        0x668e_33ef,
        "structured reply magic"
    );
    let mut payload = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
    stream.read_exact(&mut payload).unwrap();
    (
        u16::from_be_bytes(head[4..6].try_into().unwrap()),
        u16::from_be_bytes(head[6..8].try_into().unwrap()),
        u64::from_be_bytes(head[8..16].try_into().unwrap()),
        payload,
    )
}

/// With NBD_OPT_STRUCTURED_REPLY negotiated, every reply is one final chunk: OFFSET_DATA for a
/// read (offset, then the data), NONE for other successes, ERROR with the errno for failures.
#[test]
fn structured_replies_carry_offsets_data_and_errors() {
    let (mut server, nbd) = start(&[]);
    image(&["create", "disk", "--size", "8MiB", "--target", &server.addr]);
    let mut stream = handshake(&nbd);
    send_option(&mut stream, 8, b"x");
    assert_eq!(
        option_reply(&mut stream, 8).0,
        (1 << 31) | 3,
        "takes no data"
    );
    send_option(&mut stream, 8, b"");
    assert_eq!(
        option_reply(&mut stream, 8).0,
        1,
        "structured replies acknowledged"
    );
    assert_eq!(go(&mut stream, "disk"), 1);
    const DONE: u16 = 1;
    let data: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
    let offset = (4 << 20) - 5000; // Across two objects and several parts.
    request(&mut stream, 1, 0, 1, offset, data.len() as u32);
    send(&mut stream, &data);
    assert_eq!(
        structured_chunk(&mut stream),
        (DONE, 0, 1, vec![]),
        "write: NONE"
    );
    request(&mut stream, 0, 0, 2, offset, data.len() as u32);
    let (flags, kind, cookie, payload) = structured_chunk(&mut stream);
    assert_eq!((flags, kind, cookie), (DONE, 1, 2), "read: OFFSET_DATA");
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), offset);
    assert!(payload[8..] == data[..], "the data follows the offset");
    request(&mut stream, 0, 0, 3, 8 << 20, 4096);
    let (flags, kind, cookie, payload) = structured_chunk(&mut stream);
    assert_eq!(
        (flags, kind, cookie),
        (DONE, (1 << 15) | 1, 3),
        "error chunk"
    );
    assert_eq!(payload, [0, 0, 0, 22, 0, 0], "EINVAL, no message");
    request(&mut stream, 0, 0, 4, 0, 0);
    assert_eq!(
        structured_chunk(&mut stream),
        (DONE, 0, 4, vec![]),
        "empty read: NONE"
    );
    request(&mut stream, 3, 0, 5, 0, 0);
    assert_eq!(structured_chunk(&mut stream), (DONE, 0, 5, vec![]), "flush");
    request(&mut stream, 2, 0, 6, 0, 0);
    assert!(closed(&mut stream));
    assert!(server.stop().success());
}

/// The option replies to a meta context option, up to its ACK (or first error): (type, data).
fn meta_replies(
    stream: &mut TcpStream,
    option: u32,
    name: &str,
    queries: &[&str],
) -> Vec<(u32, Vec<u8>)> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    send_option(stream, option, &data);
    let mut replies = Vec::new();
    loop {
        let (kind, data) = option_reply(stream, option);
        replies.push((kind, data));
        if kind != 4 {
            return replies; // ACK (1) or an error end the list; META_CONTEXT (4) replies come first.
        }
    }
}

/// (length, flags) descriptors of a BLOCK_STATUS reply for `base:allocation` (context id 1).
fn block_status(
    stream: &mut TcpStream,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> Vec<(u32, u32)> {
    request(stream, 7, flags, cookie, offset, length);
    let (chunk_flags, kind, got_cookie, payload) = structured_chunk(stream);
    assert_eq!(
        (chunk_flags, kind, got_cookie),
        (1, 5, cookie),
        "one final BLOCK_STATUS chunk"
    );
    assert_eq!(
        &payload[..4],
        &[0, 0, 0, 1],
        "the base:allocation context id"
    );
    payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect()
}

/// Meta context negotiation and NBD_CMD_BLOCK_STATUS: objects never written (or trimmed
/// whole) are holes that read as zeroes, written objects are data up to their size.
#[test]
fn block_status_reports_unwritten_objects_as_holes() {
    let (mut server, nbd) = start(&[]);
    image(&[
        "create",
        "disk",
        "--size",
        "24MiB",
        "--target",
        &server.addr,
    ]);
    const HOLE: u32 = 3; // NBD_STATE_HOLE | NBD_STATE_ZERO
    let context = {
        let mut c = 1u32.to_be_bytes().to_vec();
        c.extend_from_slice(b"base:allocation");
        c
    };

    // Without structured replies: LIST works, SET is refused, BLOCK_STATUS is EINVAL.
    let mut plain = handshake(&nbd);
    assert_eq!(
        meta_replies(&mut plain, 9, "disk", &[]),
        [(4, context.clone()), (1, vec![])],
        "LIST with no query lists every context"
    );
    assert_eq!(
        meta_replies(&mut plain, 10, "disk", &["base:allocation"])[0].0,
        (1 << 31) | 3
    );
    assert_eq!(go(&mut plain, "disk"), 1);
    request(&mut plain, 7, 0, 1, 0, 4096);
    assert_eq!(
        reply(&mut plain),
        Some((22, 1)),
        "no context negotiated: EINVAL"
    );

    let mut stream = handshake(&nbd);
    send_option(&mut stream, 8, b"");
    assert_eq!(option_reply(&mut stream, 8).0, 1);
    send_option(&mut stream, 10, &[0, 0, 0, 9]);
    assert_eq!(option_reply(&mut stream, 10).0, (1 << 31) | 3, "malformed");
    assert_eq!(
        meta_replies(&mut stream, 9, "disk", &["base:", "qemu:dirty-bitmap:a"]),
        [(4, context.clone()), (1, vec![])],
        "LIST of the base: namespace"
    );
    assert_eq!(
        meta_replies(&mut stream, 10, "disk", &["qemu:allocation-depth"]),
        [(1, vec![])],
        "an unknown context is not selected"
    );
    assert_eq!(
        meta_replies(&mut stream, 10, "disk", &["nope", "base:allocation"]),
        [(4, context.clone()), (1, vec![])]
    );
    assert_eq!(go(&mut stream, "disk"), 1);

    // Nothing written: one hole over all six objects.
    assert_eq!(
        block_status(&mut stream, 0, 2, 0, 24 << 20),
        [(24 << 20, HOLE)]
    );
    // Write 4 KiB at 4 MiB + 8 KiB: object 1 exists, 12 KiB long.
    request(&mut stream, 1, 0, 3, (4 << 20) + 8192, 4096);
    send(&mut stream, &[7u8; 4096]);
    assert_eq!(structured_chunk(&mut stream), (1, 0, 3, vec![]));
    assert_eq!(
        block_status(&mut stream, 0, 4, 0, 24 << 20),
        [(4 << 20, HOLE), (12288, 0), ((20 << 20) - 12288, HOLE)]
    );
    // A range starting inside object 1, ending inside object 2.
    assert_eq!(
        block_status(&mut stream, 0, 5, (4 << 20) + 4096, 5 << 20),
        [(8192, 0), ((5 << 20) - 8192, HOLE)]
    );
    // REQ_ONE: only the first extent.
    assert_eq!(
        block_status(&mut stream, 8, 6, 0, 24 << 20),
        [(4 << 20, HOLE)]
    );
    assert_eq!(block_status(&mut stream, 8, 7, 4 << 20, 1), [(1, 0)]);
    // Bad requests: past the end, empty.
    request(&mut stream, 7, 0, 8, 24 << 20, 1);
    assert_eq!(
        structured_chunk(&mut stream).1,
        (1 << 15) | 1,
        "past the end: error"
    );
    request(&mut stream, 7, 0, 9, 0, 0);
    assert_eq!(
        structured_chunk(&mut stream).1,
        (1 << 15) | 1,
        "empty: error"
    );
    // Trimming the whole object makes it a hole again.
    request(&mut stream, 4, 0, 10, 4 << 20, 4 << 20);
    assert_eq!(structured_chunk(&mut stream), (1, 0, 10, vec![]));
    assert_eq!(
        block_status(&mut stream, 0, 11, 0, 24 << 20),
        [(24 << 20, HOLE)]
    );

    // A context selected for another export does not carry over to this one.
    image(&[
        "create",
        "other",
        "--size",
        "4MiB",
        "--target",
        &server.addr,
    ]);
    let mut switched = handshake(&nbd);
    send_option(&mut switched, 8, b"");
    assert_eq!(option_reply(&mut switched, 8).0, 1);
    assert_eq!(
        meta_replies(&mut switched, 10, "disk", &["base:allocation"]).len(),
        2
    );
    assert_eq!(go(&mut switched, "other"), 1);
    request(&mut switched, 7, 0, 1, 0, 4096);
    assert_eq!(structured_chunk(&mut switched).1, (1 << 15) | 1, "EINVAL");

    // nbdinfo --map agrees (when installed).
    if tools("block_status nbdinfo --map", &["nbdinfo"]) {
        request(&mut stream, 1, 0, 12, 9 << 20, 4096);
        send(&mut stream, &[7u8; 4096]);
        assert_eq!(structured_chunk(&mut stream), (1, 0, 12, vec![]));
        let map = run("nbdinfo", &["--map", "--json", &uri(&nbd, "disk")]);
        let map: serde_json::Value = serde_json::from_str(&map).unwrap();
        let extents: Vec<(u64, u64, u64)> = map
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["offset"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["type"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            extents,
            [
                (0, 8 << 20, 3),
                (8 << 20, (1 << 20) + 4096, 0),
                ((9 << 20) + 4096, (15 << 20) - 4096, 3)
            ],
            "{map}"
        );
    }
    assert_eq!(total(&status(&server.addr), "nbd_protocol_errors"), 0);
    assert!(server.stop().success());
}

/// Pass coalescing (`--coalesce`) changes when the reactor polls, not what it answers: fio
/// verifies what it wrote, the allocation map is right, and requests still allocate nothing.
#[test]
fn coalescing_server_serves_the_same_bytes() {
    if !tools(
        "coalescing_server_serves_the_same_bytes",
        &["fio", "nbdinfo"],
    ) {
        return;
    }
    let (mut server, nbd) = start(&["--coalesce", "20us"]);
    image(&[
        "create",
        "disk",
        "--size",
        "32MiB",
        "--target",
        &server.addr,
    ]);
    fio_verify(&nbd, "disk", "0", "4M");
    let before = status(&server.addr);
    fio_verify(&nbd, "disk", "8M", "4M");
    let after = status(&server.addr);
    let requests = total(&after, "nbd_requests") - total(&before, "nbd_requests");
    let allocations = total(&after, "allocations") - total(&before, "allocations");
    assert!(requests >= 2048, "{requests} requests");
    assert!(
        allocations < 200,
        "{allocations} allocations for {requests} NBD requests"
    );
    let map = run("nbdinfo", &["--map", "--json", &uri(&nbd, "disk")]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let types: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect();
    // Objects 0 and 2 written (4 MiB objects), 1 and 3..7 never.
    assert_eq!(
        types,
        [(4 << 20, 0), (4 << 20, 3), (4 << 20, 0), (20 << 20, 3)],
        "{map}"
    );
    assert_eq!(total(&after, "nbd_errors"), 0);
    assert!(server.stop().success());
}
