//! `carmine mkfs / serve / load / fsck --device spdk:...` end to end, against Carmine's SPDK
//! stand-in (`ci/spdk-stub/`, a test double, not SPDK): the namespace lives in a file, writes
//! sit in the stand-in's volatile cache until a flush, and a killed server loses that cache,
//! as a device loses power. So acknowledged writes that survive a `kill -9` here were flushed
//! through the SPDK queue pair before they were acknowledged.
//! Run: `PKG_CONFIG_PATH=$(ci/spdk-stub/build.sh) cargo test --features spdk --test spdk_serve`.
//! Prints SKIP without the feature, or when built against real SPDK (it needs the stand-in's
//! emulated controller).

mod common;

/// Without the feature, an `spdk:` device is refused by mkfs, serve and fsck with the fix.
#[cfg(not(feature = "spdk"))]
#[test]
fn spdk_serve() {
    eprintln!("SKIP: spdk_serve needs `--features spdk` (and the stand-in: ci/spdk-stub/build.sh)");
    let device = "spdk:trtype=PCIe traddr=0000:00:04.0";
    for args in [
        &["mkfs", "--device", device][..],
        &["fsck", "--device", device][..],
        &["serve", "--listen", "127.0.0.1:0", "--device", device][..],
    ] {
        let output = std::process::Command::new(common::CARMINE)
            .args(args)
            .output()
            .expect("run carmine");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {text}");
        assert!(text.contains("built without SPDK"), "{args:?}: {text}");
        assert!(text.contains("--features spdk"), "{args:?}: {text}");
    }
}

#[cfg(feature = "spdk")]
#[test]
fn spdk_serve() {
    if !carmine_ffi::spdk::IS_STAND_IN {
        eprintln!("SKIP: spdk_serve runs against Carmine's SPDK stand-in, not real SPDK");
        return;
    }
    run::mkfs_serve_kill_restart_fsck();
}

#[cfg(feature = "spdk")]
mod run {
    use super::common::*;
    use std::process::Command;
    use std::time::Duration;

    const DEVICE: &str = "spdk:trtype=PCIe traddr=0000:00:04.0";

    const LOAD_SHAPE: [&str; 8] = [
        "--objects",
        "16",
        "--object-size",
        "256KiB",
        "--qd",
        "8",
        "--cpus",
        "0",
    ];

    fn serve_args() -> Vec<&'static str> {
        let mut args = segment_args(DEVICE).to_vec();
        args.extend(["--queue-depth", "32"]);
        args
    }

    pub fn mkfs_serve_kill_restart_fsck() {
        let dir = TestDir::new("spdk-serve");
        // The only test in this binary: nothing else reads the environment meanwhile, and
        // every carmine process started below inherits it.
        std::env::set_var("SPDK_STUB_DIR", &dir.0);
        std::env::set_var("SPDK_STUB_NS_MIB", "128");
        let log = dir.0.join("acked.log");
        let log = log.to_str().unwrap();

        let made = Command::new(CARMINE)
            .args([
                "mkfs",
                "--device",
                DEVICE,
                "--cores",
                "2",
                "--segment-size",
                "4MiB",
            ])
            .output()
            .expect("run carmine mkfs");
        let text = String::from_utf8_lossy(&made.stderr);
        assert!(made.status.success(), "mkfs: {text}");
        assert!(
            dir.0.join("0000:00:04.0.img").exists(),
            "the stand-in's namespace file"
        );

        let mut server = ServerProcess::start(&serve_args());
        let startup = server.startup_log.join("\n");
        assert!(
            startup.contains("spdk trtype=PCIe traddr=0000:00:04.0: I/O queue pair"),
            "{startup}"
        );
        let mut write = vec!["--prefill", "--verify", "--duration", "2s"];
        write.extend_from_slice(&LOAD_SHAPE);
        let report = load(&server.addr, &write);
        assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(report["verify_failures"], 0, "{report}");
        assert_eq!(total(&status(&server.addr), "store_objects"), 16);
        assert!(server.stop().success());

        // Clean restart: the log replays from the namespace, every block reads back intact.
        let mut server = ServerProcess::start(&serve_args());
        read_back_everything(&server.addr, &LOAD_SHAPE);
        // Killed while writing: the stand-in's unflushed cache is gone with the process.
        let load_args = [
            "--ack-log",
            log,
            "--prefix",
            "acked",
            "--op",
            "randwrite",
            "--duration",
            "10s",
            "--objects",
            "16",
            "--object-size",
            "256KiB",
            "--qd",
            "16",
            "--json",
        ];
        server.kill_under_load(&load_args, Duration::from_millis(1500));
        let mut server = ServerProcess::start(&serve_args());
        let report = check_ack_log(&server.addr, log, "after kill -9");
        assert!(report["acked_blocks"].as_u64().unwrap() > 0, "{report:#}");
        assert!(server.stop().success());

        let checked = Command::new(CARMINE)
            .args(["fsck", "--device", DEVICE, "--json"])
            .output()
            .expect("run carmine fsck");
        let stdout = String::from_utf8_lossy(&checked.stdout);
        assert!(
            checked.status.success(),
            "fsck: {stdout} {}",
            String::from_utf8_lossy(&checked.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("fsck JSON");
        assert_eq!(report["clean"], true, "{report:#}");
    }
}
