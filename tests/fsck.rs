//! `carmine fsck` as an operator runs it: exit status 0 on a clean device (fresh, and after a
//! store-bench run), 1 with every problem named, 2 for a file it cannot check; `--json` parses.
//! (Corruption of data and log blocks is injected in `storage/tests/fsck.rs`.)

mod common;

use std::process::{Command, Output};

use common::{TestDir, CARMINE};

fn fsck(device: &str, json: bool) -> Output {
    let mut command = Command::new(CARMINE);
    command.args(["fsck", "--device", device]);
    if json {
        command.arg("--json");
    }
    command.output().expect("run carmine fsck")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json_of(output: &Output) -> serde_json::Value {
    let stdout = text(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

fn mkfs(device: &str) {
    let output = Command::new(CARMINE)
        .args([
            "mkfs",
            "--device",
            device,
            "--size",
            "64MiB",
            "--segment-size",
            "1MiB",
            "--cores",
            "2",
        ])
        .output()
        .expect("run carmine mkfs");
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// `mkfs --spare` is kept in the superblock (fsck shows it); a spare out of range is refused
/// with the range in the message, and nothing is formatted.
#[test]
fn mkfs_spare_is_kept_and_checked() {
    let dir = TestDir::new("fsck-spare");
    let device = dir.0.join("spare.img");
    let device = device.to_str().unwrap();
    let mkfs_spare = |spare: &str| {
        Command::new(CARMINE)
            .args(["mkfs", "--device", device, "--size", "32MiB"])
            .args(["--segment-size", "1MiB", "--spare", spare])
            .output()
            .expect("run carmine mkfs")
    };
    let refused = mkfs_spare("91");
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("0..=90"),
        "{}",
        text(&refused.stderr)
    );
    assert!(!std::path::Path::new(device).exists(), "nothing was made");
    let made = mkfs_spare("20%");
    assert!(made.status.success(), "{}", text(&made.stderr));
    let output = fsck(device, true);
    assert_eq!(output.status.code(), Some(0));
    let report = json_of(&output);
    assert_eq!(report["spare_percent"], 20, "{report}");
    assert!(text(&fsck(device, false).stdout).contains("20% spare"));
}

#[test]
fn a_fresh_device_is_clean() {
    let dir = TestDir::new("fsck-fresh");
    let device = dir.0.join("fresh.img");
    let device = device.to_str().unwrap();
    mkfs(device);

    let output = fsck(device, false);
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        text(&output.stderr)
    );
    assert_eq!(stdout.lines().last(), Some("clean"), "{stdout}");
    assert!(stdout.contains("shard 0: 0 objects"), "{stdout}");
    assert!(stdout.contains("shard 1: 0 objects"), "{stdout}");

    let output = fsck(device, true);
    assert_eq!(output.status.code(), Some(0));
    let report = json_of(&output);
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["problems"], 0, "{report}");
    assert_eq!(report["device"], device, "{report}");
    assert_eq!(report["shard_count"], 2, "{report}");
    assert_eq!(
        report["spare_percent"],
        carmine_storage::segment::format::SPARE_PERCENT_DEFAULT,
        "mkfs keeps the default spare: {report}"
    );
    let shards = report["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2, "{report}");
    for shard in shards {
        assert_eq!(shard["objects"], 0, "{report}");
        assert_eq!(shard["records"], 0, "{report}");
        assert_eq!(shard["problems"].as_array().unwrap().len(), 0, "{report}");
        assert_eq!(
            shard["free_segments"], shard["segments"],
            "nothing written: every segment is free: {report}"
        );
    }
}

#[test]
fn a_device_written_by_the_store_is_clean_and_counted() {
    let dir = TestDir::new("fsck-store-bench");
    let device = dir.0.join("bench.img");
    let device = device.to_str().unwrap();
    let output = Command::new(CARMINE)
        .args([
            "store-bench",
            "--device",
            device,
            "--device-size",
            "64MiB",
            "--segment-size",
            "1MiB",
            "--objects",
            "8",
            "--object-size",
            "1MiB",
            "--op",
            "randwrite",
            "--duration",
            "1s",
            "--json",
        ])
        .output()
        .expect("run carmine store-bench");
    assert!(output.status.success(), "{}", text(&output.stderr));

    let output = fsck(device, true);
    let report = json_of(&output);
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert_eq!(report["clean"], true, "{report}");
    let shard = &report["shards"][0];
    assert_eq!(shard["objects"], 8, "{report}");
    assert_eq!(
        shard["live_blocks"],
        8 * 256,
        "8 objects of 1 MiB: {report}"
    );
    assert_eq!(shard["bytes_verified"], 8 << 20, "{report}");
    assert!(shard["records"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn a_damaged_superblock_copy_is_a_problem() {
    let dir = TestDir::new("fsck-superblock");
    let device = dir.0.join("damaged.img");
    let device_str = device.to_str().unwrap();
    mkfs(device_str);
    let mut bytes = std::fs::read(&device).unwrap();
    bytes[40] ^= 1; // Inside copy A's device size field: its crc no longer matches.
    std::fs::write(&device, &bytes).unwrap();

    let output = fsck(device_str, false);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("problem: superblock copy at offset 0"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("1 problem(s)"), "{stdout}");

    let output = fsck(device_str, true);
    assert_eq!(output.status.code(), Some(1));
    let report = json_of(&output);
    assert_eq!(report["clean"], false, "{report}");
    assert_eq!(report["problems"], 1, "{report}");
    assert_eq!(report["device_problems"].as_array().unwrap().len(), 1);
}

#[test]
fn a_file_it_cannot_check_is_exit_status_2() {
    let dir = TestDir::new("fsck-foreign");
    let foreign = dir.0.join("zeros.img");
    std::fs::File::create(&foreign)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let output = fsck(foreign.to_str().unwrap(), false);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a Carmine"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let output = fsck(foreign.to_str().unwrap(), true);
    assert_eq!(output.status.code(), Some(2));
    let report = json_of(&output);
    assert_eq!(report["clean"], false, "{report}");
    assert_eq!(report["error_kind"], "not_formatted", "{report}");

    let missing = dir.0.join("missing.img");
    let output = fsck(missing.to_str().unwrap(), false);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot read the device"), "{stderr}");
}

/// `mkfs --preallocate` writes the whole file (every block allocated, nothing sparse) and the
/// result is a clean device; on a block device or a missing size it says what it needs.
#[test]
fn mkfs_preallocate_allocates_every_block_and_is_clean() {
    use std::os::unix::fs::MetadataExt;
    let dir = TestDir::new("fsck-prealloc");
    let sparse = dir.0.join("sparse.img");
    let full = dir.0.join("full.img");
    for (path, preallocate) in [(&sparse, false), (&full, true)] {
        let mut command = Command::new(CARMINE);
        command.args([
            "mkfs",
            "--device",
            path.to_str().unwrap(),
            "--size",
            "32MiB",
        ]);
        command.args(["--segment-size", "1MiB"]);
        if preallocate {
            command.arg("--preallocate");
        }
        let output = command.output().expect("run carmine mkfs");
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let allocated = |path: &std::path::Path| std::fs::metadata(path).unwrap().blocks() * 512;
    assert_eq!(
        allocated(&full),
        32 << 20,
        "every block of the file is allocated"
    );
    assert!(
        allocated(&sparse) < 32 << 20,
        "without the flag the file stays sparse"
    );
    let output = fsck(full.to_str().unwrap(), false);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stdout));

    let output = Command::new(CARMINE)
        .args(["mkfs", "--device", "/dev/null", "--preallocate"])
        .output()
        .expect("run carmine mkfs");
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("regular files"),
        "{}",
        text(&output.stderr)
    );
}
