//! The crash loop: `carmine serve --store segment` is killed (SIGKILL) at a random moment while
//! `carmine load --ack-log` writes, restarted, and `carmine load --check` reads every block the
//! log names: every acknowledged write must be there, whole, and nothing may be corrupt.
//!
//! CARMINE_CRASH_LOOP_CYCLES sets the cycle count (CI: the default; the goal: 100), and
//! CARMINE_CRASH_LOOP_SEED replays a run's kill moments (printed at start).

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{ServerProcess, TestDir, CARMINE};

const CYCLES_DEFAULT: u64 = 6;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|text| {
        text.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {text:?}"))
    })
}

/// splitmix64, enough to spread kill moments.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn check(addr: &str, log: &str, cycle: u64) -> serde_json::Value {
    let output = Command::new(CARMINE)
        .args(["load", "--target", addr, "--check", log, "--json"])
        .output()
        .expect("run carmine load --check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "cycle {cycle}: no report: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(
        output.status.success(),
        "cycle {cycle}: acknowledged writes lost or corrupt: {report:#}"
    );
    for key in ["lost", "corrupt", "read_errors"] {
        assert_eq!(report[key], 0, "cycle {cycle}: {key}: {report:#}");
    }
    report
}

#[test]
fn acknowledged_writes_survive_kill_9_at_random_moments() {
    let cycles = env_u64("CARMINE_CRASH_LOOP_CYCLES").unwrap_or(CYCLES_DEFAULT);
    let seed = env_u64("CARMINE_CRASH_LOOP_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("crash loop: {cycles} cycles, CARMINE_CRASH_LOOP_SEED={seed}");
    let mut rng = seed;
    let dir = TestDir::new("crash-loop");
    let device = dir.0.join("carmine.img");
    let device = device.to_str().unwrap();
    let log = dir.0.join("acked.log");
    let log = log.to_str().unwrap();
    let args = [
        "--store",
        "segment",
        "--device",
        device,
        "--device-size",
        "512MiB",
        "--segment-size",
        "4MiB",
        "--cores",
        "2",
        "--cpus",
        "0,1",
    ];
    let mut acked_total = 0;
    for cycle in 0..cycles {
        let mut server = ServerProcess::start(&args);
        if cycle > 0 {
            let report = check(&server.addr, log, cycle);
            acked_total = report["acked_blocks"].as_u64().unwrap();
        }
        let workload = ["randwrite", "mixed", "seqwrite"][(cycle % 3) as usize];
        let seed = (cycle + 1).to_string();
        let addr = server.addr.clone();
        let load_args = [
            "load",
            "--target",
            &addr,
            "--ack-log",
            log,
            "--op",
            workload,
            "--seed",
            &seed,
            "--duration",
            "20s",
            "--objects",
            "16",
            "--object-size",
            "1MiB",
            "--qd",
            "16",
            "--clients",
            "2",
            "--json",
        ]
        .map(String::from);
        let writer = std::thread::spawn(move || {
            // The load fails when the server dies under it: that is the point.
            let _ = Command::new(CARMINE).args(&load_args).output();
        });
        let kill_after = Duration::from_millis(300 + next(&mut rng) % 1500);
        std::thread::sleep(kill_after);
        server.kill();
        writer.join().unwrap();
    }
    let mut server = ServerProcess::start(&args);
    let report = check(&server.addr, log, cycles);
    let acked = report["acked_blocks"].as_u64().unwrap();
    assert!(
        acked > 0 && acked >= acked_total,
        "the log grew: {report:#}"
    );
    eprintln!("crash loop: {cycles} kills, {acked} acknowledged blocks, all intact: {report}");
    assert!(server.stop().success());
}
