//! A full device, through the network: writes past the end get `no_space` (nothing else), the
//! server keeps serving, every acknowledged write stays readable, removes give the space back
//! (the cleaner does not deadlock on its reserve), and a restart and fsck find it all intact.

mod common;

use std::process::Command;

use common::*;

const OP_OSD: u8 = 1;
const REMOVE: u8 = 6;

fn fill(addr: &str, prefix: &str, log: Option<&str>) -> serde_json::Value {
    let mut args = vec![
        "--prefix",
        prefix,
        "--prefill",
        "--objects",
        "12",
        "--object-size",
        "4MiB",
        "--bs",
        "64KiB",
        "--qd",
        "8",
        "--duration",
        "1s",
    ];
    if let Some(log) = log {
        args.extend(["--ack-log", log]);
    }
    load(addr, &args)
}

#[test]
fn a_full_device_says_no_space_keeps_acked_data_and_recovers_after_removes() {
    let dir = TestDir::new("full-device");
    let device = dir.0.join("small.img");
    let device = device.to_str().unwrap();
    let log = dir.0.join("acked.log");
    let log = log.to_str().unwrap();
    let args = [
        "--store",
        "segment",
        "--device",
        device,
        "--device-size",
        "104MiB",
        "--segment-size",
        "4MiB",
        "--cores",
        "1",
    ];
    let mut server = ServerProcess::start(&args);
    // 48 MiB of filler, then 48 MiB of data on a device with 25 segments of 4 MiB, of which
    // the default spare (40%) leaves ~60 MiB usable: the data does not fit beside the filler,
    // and fits once the filler is removed.
    fill(&server.addr, "filler", None);
    let report = fill(&server.addr, "data", Some(log));
    let errors = report["errors"].as_u64().unwrap();
    assert!(errors > 0, "the device filled up: {report}");
    let by_status = report["errors_by_status"].as_object().unwrap();
    assert_eq!(
        by_status.keys().collect::<Vec<_>>(),
        vec!["no_space"],
        "a full device answers no_space and nothing else: {report}"
    );
    let status_doc = status(&server.addr);
    assert!(total(&status_doc, "err_no_space") >= errors);
    check_ack_log(&server.addr, log, "full");

    // Remove the filler: its space comes back once the cleaner has run.
    let mut stream = connect(&server.addr);
    for index in 0..12 {
        let oid = format!("filler.{index}");
        send(
            &mut stream,
            &raw_frame(OP_OSD, index, oid.as_bytes(), &[(REMOVE, b"", b"", 0, 0)]),
        );
        let reply = read_reply(&mut stream).expect("remove answered");
        assert!(
            reply.status == 0 || reply.status == 1,
            "remove {oid}: status {} (ok, or not_found for an object never created)",
            reply.status
        );
    }
    drop(stream);
    let report = fill(&server.addr, "data", Some(log));
    assert_eq!(
        report["errors"], 0,
        "after the removes every data block fits: {report}"
    );
    check_ack_log(&server.addr, log, "after removes");
    assert!(server.stop().success());

    let mut server = ServerProcess::start(&args);
    check_ack_log(&server.addr, log, "after a restart");
    assert!(server.stop().success());
    let fsck = Command::new(CARMINE)
        .args(["fsck", "--device", device])
        .output()
        .expect("run carmine fsck");
    assert!(
        fsck.status.success(),
        "fsck after the run: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}
