//! Classic mode (`serve --mode classic`): the same verified runs and hostile basics as RTC
//! mode, a clean exit on SIGINT, and a short `carmine compare`.

mod common;

use common::*;

const OP_OSD: u8 = 1;
const OP_PING: u8 = 2;
const WRITE: u8 = 1;
const READ: u8 = 3;
const STATUS_BAD_CRC: u32 = 16;
const STATUS_UNKNOWN_OPCODE: u32 = 17;
const STATUS_MALFORMED: u32 = 18;
const STATUS_NOT_FOUND: u32 = 1;

fn write_read_mixed(server_args: &[&str]) {
    let mut args = vec!["--mode", "classic"];
    args.extend_from_slice(server_args);
    let mut server = ServerProcess::start(&args);
    let common = [
        "--duration",
        "1s",
        "--objects",
        "16",
        "--object-size",
        "256KiB",
        "--clients",
        "4",
        "--qd",
        "8",
        "--verify",
    ];
    for (op, prefill) in [("randwrite", true), ("randread", false), ("mixed", false)] {
        let mut load_args = vec!["--op", op];
        if prefill {
            load_args.push("--prefill");
        }
        load_args.extend_from_slice(&common);
        assert_clean(&load(&server.addr, &load_args), op);
    }
    // A shard-aware client (`--route`) meets a server without HELLO: it runs unrouted.
    let mut routed = vec!["--op", "randwrite", "--route"];
    routed.extend_from_slice(&common);
    let report = load(&server.addr, &routed);
    assert_clean(&report, "randwrite --route");
    assert_eq!(
        report["routed_connections"], 0,
        "classic has no owning cores"
    );
    let status = status(&server.addr);
    assert_eq!(status["config"]["mode"], "classic");
    assert!(total(&status, "ops") >= 16 * 64, "prefill and runs counted");
    assert_eq!(total(&status, "ops_in_flight"), 0);
    assert!(total(&status, "process_cpu_ns") > 0);
    assert!(server.stop().success(), "clean exit on SIGINT");
}

#[test]
fn classic_one_core_write_read_mixed_verify() {
    write_read_mixed(&["--cores", "1"]);
}

#[test]
fn classic_two_cores_two_workers_per_shard_verify() {
    write_read_mixed(&[
        "--cores",
        "2",
        "--cpus",
        "0,1",
        "--classic-workers-per-shard",
        "2",
    ]);
}

#[test]
fn classic_replication_hook_keeps_reads_behind_writes() {
    write_read_mixed(&[
        "--cores",
        "2",
        "--cpus",
        "0,1",
        "--replicas",
        "2",
        "--replication-cost",
        "200us",
        "--snapshot-cost",
        "2us",
    ]);
}

/// The segment store in classic mode: workers submit, the store thread completes. Verified
/// runs (reads held behind in-flight writes, two workers per shard, the replication hook),
/// then a clean restart and a kill in the middle of writing: every acknowledged block reads
/// back.
#[test]
fn classic_segment_store_verify_restart_and_kill() {
    let dir = TestDir::new("classic-segment");
    let device = dir.0.join("classic.img");
    let device = device.to_str().unwrap();
    let store = segment_args(device);
    let mut args = store.to_vec();
    args.extend(["--classic-workers-per-shard", "2"]);
    write_read_mixed(&args);
    let mut args = store.to_vec();
    args.extend(["--replicas", "2", "--replication-cost", "200us"]);
    write_read_mixed(&args);

    let mut args = vec!["--mode", "classic"];
    args.extend_from_slice(&store);
    let shape = ["--objects", "16", "--object-size", "256KiB", "--qd", "8"];
    let mut server = ServerProcess::start(&args);
    let status_doc = status(&server.addr);
    assert_eq!(status_doc["config"]["store"], "segment");
    assert_eq!(
        total(&status_doc, "store_objects"),
        16,
        "restarted: {status_doc}"
    );
    read_back_everything(&server.addr, &shape);

    let mut write = vec!["--json", "--duration", "3s"];
    write.extend_from_slice(&shape);
    server.kill_under_load(&write, std::time::Duration::from_millis(800));
    let mut server = ServerProcess::start(&args);
    assert_eq!(total(&status(&server.addr), "store_objects"), 16);
    read_back_everything(&server.addr, &shape);
    assert!(server.stop().success());
}

#[test]
fn classic_hostile_basics() {
    let mut server = ServerProcess::start(&["--mode", "classic", "--cores", "1"]);
    let mut stream = connect(&server.addr);
    let mut frame = raw_frame(OP_OSD, 7, b"victim", &[(WRITE, b"", b"data", 0, 0)]);
    *frame.last_mut().unwrap() ^= 0xff;
    send(&mut stream, &frame);
    let reply = read_reply(&mut stream).expect("answered");
    assert_eq!((reply.request_id, reply.status), (7, STATUS_BAD_CRC));
    send(
        &mut stream,
        &raw_frame(OP_OSD, 8, b"victim", &[(READ, b"", b"", 0, 4)]),
    );
    assert_eq!(read_reply(&mut stream).unwrap().status, STATUS_NOT_FOUND);
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
    assert_eq!(read_reply(&mut stream).unwrap().status, 0, "still serving");

    let mut garbage = connect(&server.addr);
    send(&mut garbage, &[0x55u8; 64]);
    assert_eq!(read_reply(&mut garbage).unwrap().status, STATUS_MALFORMED);
    assert!(
        read_reply(&mut garbage).is_none(),
        "garbage closes the connection"
    );

    send(&mut stream, &raw_frame(OP_PING, 12, b"", &[]));
    assert_eq!(
        read_reply(&mut stream).unwrap().status,
        0,
        "others unaffected"
    );
    drop(stream);
    drop(garbage);
    let status = status(&server.addr);
    assert!(total(&status, "err_bad_crc") >= 1);
    assert!(total(&status, "stream_malformed") >= 1);
    assert!(server.is_running());
    assert!(server.log_lines().join("\n").contains("bad magic"));
    assert!(server.stop().success());
}

#[test]
fn compare_writes_json_and_svg() {
    let out = std::env::temp_dir().join(format!("carmine-compare-{}", std::process::id()));
    let out_text = out.to_str().unwrap().to_string();
    // compare's default `--rx-steering auto` turns RFS on for loopback when it may (root) and
    // must leave the kernel's settings as it found them.
    let steering_files = [
        "/proc/sys/net/core/rps_sock_flow_entries",
        "/sys/class/net/lo/queues/rx-0/rps_flow_cnt",
        "/sys/class/net/lo/queues/rx-0/rps_cpus",
    ];
    let read_steering = || steering_files.map(|f| std::fs::read_to_string(f).unwrap_or_default());
    let steering_before = read_steering();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let output = std::process::Command::new(CARMINE)
        .args([
            "compare",
            "--duration",
            "1s",
            "--cores-list",
            "1",
            "--objects",
            "8",
            "--object-size",
            "256KiB",
            "--out",
            &out_text,
        ])
        .output()
        .expect("run carmine compare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "compare failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("| segment"),
        "table has segment rows: {stdout}"
    );
    let document: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let rows = document["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        4,
        "{{memory, segment}} x 1 core x {{randread, randwrite}}"
    );
    for row in rows {
        assert!(row["classic"]["iops"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["rtc"]["iops"].as_f64().unwrap() > 0.0, "{row}");
        assert!(
            row["classic"]["cpu_ns_per_op"].as_f64().unwrap() > 0.0,
            "{row}"
        );
        let cpu_ratio = row["cpu_ratio_classic_over_rtc"].as_f64().unwrap();
        let expected = row["classic"]["process_cpu_ns_per_op"].as_f64().unwrap()
            / row["rtc"]["process_cpu_ns_per_op"].as_f64().unwrap();
        assert!(
            cpu_ratio > 0.0 && (cpu_ratio - expected).abs() <= 0.01 + expected * 0.001,
            "{row}"
        );
        // The generator is shard-aware against rtc (4 connections routed); classic has no
        // owning cores.
        assert_eq!(row["rtc"]["routed_connections"], 4, "{row}");
        assert_eq!(row["classic"]["routed_connections"], 0, "{row}");
    }
    assert!(
        rows.iter().any(|row| row["store"] == "segment"),
        "segment rows: {document}"
    );
    let leftover: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "img"))
        .collect();
    assert!(leftover.is_empty(), "devices removed: {leftover:?}");
    let svg = std::fs::read_to_string(out.join("compare.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<rect"));
    let steering = document["settings"]["rx_steering"].as_str().unwrap();
    if root && std::path::Path::new(steering_files[2]).exists() {
        assert_eq!(steering, "rfs", "root may steer loopback: {document}");
    } else {
        eprintln!("not root (or no loopback rx queue): compare ran with rx steering {steering}");
        assert_eq!(steering, "off", "{document}");
    }
    assert_eq!(
        read_steering(),
        steering_before,
        "compare restored the loopback steering settings"
    );
    assert!(
        stdout.contains(&format!("rx steering: {steering}")),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
