//! `carmine store-bench`: one segment-store shard driven directly, as an operator runs it:
//! randwrite on a new device, then randread on the same device (mount replays the log), and the
//! errors a wrong argument or a foreign file give.

mod common;

use std::process::Command;

use common::{carmine_json, TestDir, CARMINE};

/// The keys of `carmine load --json`: store-bench reports the same ones.
const LOAD_KEYS: [&str; 17] = [
    "op",
    "bs",
    "qd",
    "clients",
    "duration_s",
    "ops",
    "iops",
    "bytes",
    "mib_per_s",
    "errors",
    "errors_by_status",
    "verify_failures",
    "unwritten_reads",
    "latency_us",
    "prefill_ops",
    "prefill_errors",
    "server",
];

fn store_bench(device: &str, op: &str) -> serde_json::Value {
    store_bench_with(device, op, &[])
}

fn store_bench_with(device: &str, op: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "store-bench",
        "--device",
        device,
        "--op",
        op,
        "--duration",
        "1s",
        "--device-size",
        "256MiB",
        "--segment-size",
        "1MiB",
        "--objects",
        "8",
        "--object-size",
        "1MiB",
        "--json",
    ];
    args.extend_from_slice(extra);
    carmine_json(&args)
}

fn check_common(report: &serde_json::Value, op: &str) {
    for key in LOAD_KEYS {
        assert!(report.get(key).is_some(), "no {key:?}: {report}");
    }
    for key in ["p50", "p99", "p999", "max", "mean"] {
        assert!(report["latency_us"][key].is_number(), "{report}");
    }
    assert_eq!(report["op"], op, "{report}");
    assert_eq!(report["clients"], 1, "{report}");
    assert_eq!(report["qd"], 32, "{report}");
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["verify_failures"], 0, "{report}");
    assert_eq!(report["prefill_errors"], 0, "{report}");
    assert!(report["server"]["journal_bytes"].is_u64(), "{report}");
    // The capacity is the usable one: 255 segments of 255 data blocks, less the default 40%
    // spare; the fill is of that.
    let capacity = report["server"]["capacity_bytes"].as_u64().unwrap();
    assert_eq!(capacity, 255 * 255 * 60 / 100 * 4096, "{report}");
    assert_eq!(report["server"]["spare_percent"], 40, "{report}");
    let fill = &report["fill"];
    for at in ["start", "end"] {
        let value = fill[at].as_f64().unwrap();
        // 8 MiB of objects in ~152 MiB usable.
        let expected = (8u64 << 20) as f64 / capacity as f64;
        assert!(
            (value - expected).abs() < 1e-9,
            "fill {at} {value}, expected {expected}: {report}"
        );
    }
}

#[test]
fn randwrite_then_randread_on_one_device() {
    let dir = TestDir::new("store-bench");
    let device = dir.0.join("store.img");
    let device = device.to_str().unwrap();

    let write = store_bench(device, "randwrite");
    check_common(&write, "randwrite");
    assert!(
        write["prefill_ops"].as_u64().unwrap() > 0,
        "a new device is prefilled: {write}"
    );
    let wa = write["write_amplification"].as_f64().unwrap();
    assert!(wa >= 1.0, "write amplification {wa}: {write}");
    assert!(
        write["readback_blocks"].as_u64().unwrap() > 0,
        "written blocks are read back: {write}"
    );

    let read = store_bench(device, "randread");
    check_common(&read, "randread");
    assert_eq!(
        read["prefill_ops"], 0,
        "the objects are complete after a remount: {read}"
    );
    assert!(read["write_amplification"].is_null(), "{read}");
    // Reads journal nothing of their own (the store may still write a checkpoint: the
    // write run's log is replayed at mount and may be long).
    assert_eq!(read["server"]["client_bytes_written"], 0, "{read}");
    assert_eq!(
        read["bytes"],
        read["ops"].as_u64().unwrap() * 4096,
        "{read}"
    );
    assert_eq!(read["reads_verified"], true, "{read}");
    // By default an idle poll waits for the io_uring's eventfd (a 1-2 s run at QD32 always
    // finds a moment with every read in the device).
    assert!(
        read["server"]["idle_waits"].as_u64().unwrap() > 0,
        "an idle poll waits for a completion: {read}"
    );

    // --no-verify (for comparing with fio): reads are counted, not compared.
    let unverified = store_bench_with(device, "randread", &["--no-verify"]);
    check_common(&unverified, "randread");
    assert_eq!(unverified["reads_verified"], false, "{unverified}");
    assert_eq!(
        unverified["bytes"],
        unverified["ops"].as_u64().unwrap() * 4096,
        "{unverified}"
    );

    // --spin: polls without waiting, and reads still verify.
    let spinning = store_bench_with(device, "randread", &["--spin"]);
    check_common(&spinning, "randread");
    assert_eq!(spinning["server"]["idle_waits"], 0, "{spinning}");
}

#[test]
fn mistakes_get_messages_not_panics() {
    let dir = TestDir::new("store-bench-errors");
    let run = |args: &[&str]| {
        let output = Command::new(CARMINE)
            .arg("store-bench")
            .args(args)
            .output()
            .expect("run carmine");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "{args:?} succeeded: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    };
    let device = dir.0.join("never-created.img");
    let device = device.to_str().unwrap();
    let stderr = run(&["--device", device, "--fill", "0.99"]);
    assert!(stderr.contains("--fill must be in [0, 0.95]"), "{stderr}");
    assert!(
        !std::path::Path::new(device).exists(),
        "arguments are checked before the device is touched"
    );

    let foreign = dir.0.join("zeros.img");
    std::fs::File::create(&foreign)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let stderr = run(&["--device", foreign.to_str().unwrap(), "--duration", "1s"]);
    assert!(stderr.contains("cannot mount"), "{stderr}");
    assert!(stderr.contains("carmine mkfs"), "{stderr}");
}
