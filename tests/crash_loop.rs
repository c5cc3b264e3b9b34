//! The crash loop: `carmine serve --store segment` is killed (SIGKILL) at a random moment while
//! `carmine load --ack-log` writes, restarted, and `carmine load --check` reads every block the
//! log names: every acknowledged write must be there, whole, and nothing may be corrupt.
//!
//! CARMINE_CRASH_LOOP_CYCLES sets the cycle count (CI: the default; the goal: 100), and
//! CARMINE_CRASH_LOOP_SEED replays a run's kill moments (printed at start).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{check_ack_log, segment_args, ServerProcess, TestDir};

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
    let args = segment_args(device);
    let mut acked_total = 0;
    for cycle in 0..cycles {
        let mut server = ServerProcess::start(&args);
        if cycle > 0 {
            let report = check_ack_log(&server.addr, log, &format!("cycle {cycle}"));
            acked_total = report["acked_blocks"].as_u64().unwrap();
        }
        let workload = ["randwrite", "mixed", "seqwrite"][(cycle % 3) as usize];
        let seed = (cycle + 1).to_string();
        let load_args = [
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
        ];
        let kill_after = Duration::from_millis(300 + next(&mut rng) % 1500);
        server.kill_under_load(&load_args, kill_after);
    }
    let mut server = ServerProcess::start(&args);
    let report = check_ack_log(&server.addr, log, "after the last kill");
    let acked = report["acked_blocks"].as_u64().unwrap();
    assert!(
        acked > 0 && acked >= acked_total,
        "the log grew: {report:#}"
    );
    eprintln!("crash loop: {cycles} kills, {acked} acknowledged blocks, all intact: {report}");
    assert!(server.stop().success());
}
