//! `carmine serve --store segment` end to end: verified load, clean restart, crash restart,
//! and the errors an operator meets (a device made for another core count).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    load, read_back_everything, segment_args, status, total, ServerProcess, TestDir, CARMINE,
};

const LOAD_SHAPE: [&str; 8] = [
    "--objects",
    "32",
    "--object-size",
    "256KiB",
    "--qd",
    "8",
    "--cpus",
    "0",
];

#[test]
fn data_survives_a_clean_restart_and_a_kill() {
    let dir = TestDir::new("segment-restart");
    let device = dir.0.join("carmine.img");
    let device = device.to_str().unwrap();
    let args = segment_args(device);
    let mut server = ServerProcess::start(&args);
    let mut write = vec!["--prefill", "--verify", "--duration", "2s"];
    write.extend_from_slice(&LOAD_SHAPE);
    let report = load(&server.addr, &write);
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["verify_failures"], 0, "{report}");
    let written = status(&server.addr);
    assert_eq!(total(&written, "store_objects"), 32);
    // Every acknowledged byte went to the device once, plus record heads: at least 1.
    let amplification = written["totals"]["write_amplification"].as_f64();
    assert!(
        amplification.is_some_and(|wa| (1.0..3.0).contains(&wa)),
        "write amplification {amplification:?}: {written}"
    );
    assert!(server.stop().success());

    // Clean restart: the log replays, every block reads back intact.
    let mut server = ServerProcess::start(&args);
    assert_eq!(total(&status(&server.addr), "store_objects"), 32);
    read_back_everything(&server.addr, &LOAD_SHAPE);

    // Killed in the middle of writing: the torn tail is dropped, nothing else.
    let mut write = vec!["--json", "--duration", "3s"];
    write.extend_from_slice(&LOAD_SHAPE);
    server.kill_under_load(&write, Duration::from_millis(800));
    let mut server = ServerProcess::start(&args);
    assert_eq!(total(&status(&server.addr), "store_objects"), 32);
    read_back_everything(&server.addr, &LOAD_SHAPE);
    assert!(server.stop().success());
}

#[test]
fn a_device_made_for_other_cores_is_refused_with_the_fix() {
    let dir = TestDir::new("segment-cores");
    let device = dir.0.join("one-core.img");
    let device = device.to_str().unwrap();
    let made = Command::new(CARMINE)
        .args([
            "mkfs",
            "--device",
            device,
            "--size",
            "64MiB",
            "--segment-size",
            "4MiB",
        ])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let served = Command::new(CARMINE)
        .args([
            "serve",
            "--store",
            "segment",
            "--device",
            device,
            "--cores",
            "2",
            "--cpus",
            "0,1",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert!(!served.status.success());
    assert!(
        // Core 1 finds no shard 1, or core 0 finds a 1-shard device: whichever reports first,
        // the error gives the fix.
        (stderr.contains("shard 1") || stderr.contains("formatted for 1 core(s)"))
            && stderr.contains("--cores 1"),
        "the error names the device's core count: {stderr}"
    );
    let not_a_device = dir.0.join("zeros.img");
    std::fs::write(&not_a_device, vec![0u8; 8 << 20]).unwrap();
    let served = Command::new(CARMINE)
        .args([
            "serve",
            "--store",
            "segment",
            "--device",
            not_a_device.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert!(!served.status.success());
    assert!(stderr.contains("carmine mkfs"), "{stderr}");
}
