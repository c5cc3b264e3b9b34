//! End-to-end: `carmine serve` as a process, driven by `carmine load --verify` and raw clients.

mod common;

use common::*;

fn write_then_read(server_args: &[&str]) {
    let mut server = ServerProcess::start(server_args);
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
    let mut write = vec!["--op", "randwrite", "--prefill"];
    write.extend_from_slice(&common);
    let report = load(&server.addr, &write);
    assert_clean(&report, "randwrite");
    assert!(
        report["prefill_ops"].as_u64().unwrap() >= 16 * 64,
        "every block prefilled: {report}"
    );
    let mut read = vec!["--op", "randread"];
    read.extend_from_slice(&common);
    let report = load(&server.addr, &read);
    assert_clean(&report, "randread");
    let mut mixed = vec!["--op", "mixed"];
    mixed.extend_from_slice(&common);
    assert_clean(&load(&server.addr, &mixed), "mixed");
    let status = status(&server.addr);
    assert!(total(&status, "ops") >= report["ops"].as_u64().unwrap());
    assert_eq!(total(&status, "ops_in_flight"), 0);
    assert_tcp_io(&status, server_args);
    assert!(server.stop().success(), "clean exit on SIGINT");
}

/// The TCP path the server was asked for is the one that ran: io_uring enters counted on
/// every core with `--tcp-io uring`, none without.
fn assert_tcp_io(status: &serde_json::Value, server_args: &[&str]) {
    let enters = total(status, "uring_enters");
    if server_args.contains(&"uring") {
        assert!(enters > 0, "--tcp-io uring ran on io_uring");
    } else {
        assert_eq!(enters, 0, "epoll by default");
    }
}

/// Where the kernel refuses io_uring (here a seccomp filter on the server process, as a
/// container's profile would), `--tcp-io uring` says so in the log and serves on epoll.
#[test]
fn tcp_io_uring_refused_by_seccomp_falls_back_to_epoll() {
    use std::os::unix::process::CommandExt;
    let args = ["--cores", "1", "--tcp-io", "uring"];
    let mut server = ServerProcess::start_with(&args, |command| {
        // SAFETY: the closure runs in the forked child before exec and only makes prctl
        // system calls on a filter array on its own stack (no allocation, no locks).
        unsafe {
            command.pre_exec(|| refuse_io_uring_setup());
        }
    });
    let report = load(
        &server.addr,
        &[
            "--op",
            "mixed",
            "--prefill",
            "--duration",
            "1s",
            "--objects",
            "4",
            "--object-size",
            "64KiB",
            "--verify",
        ],
    );
    assert_clean(&report, "mixed on the fallback");
    let status = status(&server.addr);
    assert_eq!(total(&status, "uring_enters"), 0, "epoll served");
    let mut log = server.startup_log.clone();
    log.extend(server.log_lines());
    assert!(
        log.iter()
            .any(|line| line.contains("io_uring unavailable for TCP")
                && line.contains("falling back to epoll")),
        "the fallback is logged: {log:?}"
    );
    assert!(server.stop().success(), "clean exit on SIGINT");
}

on_both_tcp_paths!(one_core_write_read_verify);
fn one_core_write_read_verify(tcp_io: &[&str]) {
    write_then_read(&args_with(&["--cores", "1"], tcp_io));
}

on_both_tcp_paths!(two_cores_cross_core_ops_verify);
fn two_cores_cross_core_ops_verify(tcp_io: &[&str]) {
    write_then_read(&args_with(&["--cores", "2", "--cpus", "0,1"], tcp_io));
}

#[test]
fn flex_placement_verify() {
    write_then_read(&["--cores", "2", "--cpus", "0,1", "--placement", "flex"]);
}

#[test]
fn replication_hook_delays_but_preserves_order() {
    // Reads wait behind unacknowledged writes of their PG, so verification still holds.
    write_then_read(&[
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

#[test]
fn cross_core_traffic_is_counted_and_one_hop() {
    let server = ServerProcess::start(&["--cores", "2", "--cpus", "0,1"]);
    let report = load(
        &server.addr,
        &[
            "--op",
            "randwrite",
            "--duration",
            "500ms",
            "--objects",
            "32",
            "--object-size",
            "64KiB",
            "--clients",
            "2",
        ],
    );
    assert_clean(&report, "randwrite");
    let status = status(&server.addr);
    let out = total(&status, "ops_remote_out");
    let inbound = total(&status, "ops_remote_in");
    assert!(
        out > 0,
        "with 2 cores and 2 connections some ops cross cores"
    );
    assert_eq!(
        out, inbound,
        "every op sent to another core arrives there exactly once"
    );
}

on_both_tcp_paths!(memory_store_reads_are_sent_from_the_store_and_copied_before_writes);
fn memory_store_reads_are_sent_from_the_store_and_copied_before_writes(tcp_io: &[&str]) {
    // One core, so every op is local: each 4 KiB read is answered from the store's memory
    // with its kept crc (`tx_stored_bodies`). Under a mixed load, writes find such replies
    // still queued and copy them first (`tx_stored_bodies_copied`); `--verify` and the
    // client's crc check prove the bytes sent are the ones read, not the overwrite's.
    let server = ServerProcess::start(&args_with(&["--cores", "1"], tcp_io));
    let args = [
        "--duration",
        "1s",
        "--objects",
        "8",
        "--object-size",
        "256KiB",
        "--clients",
        "4",
        "--qd",
        "8",
        "--verify",
    ];
    let prefill = args_with(&["--op", "randwrite", "--prefill"], &args);
    assert_clean(&load(&server.addr, &prefill), "prefill");
    let before = status(&server.addr);
    let read = args_with(&["--op", "randread"], &args);
    assert_clean(&load(&server.addr, &read), "randread");
    let after = status(&server.addr);
    let reads = total(&after, "ops_read") - total(&before, "ops_read");
    let stored = total(&after, "tx_stored_bodies") - total(&before, "tx_stored_bodies");
    assert!(reads > 100, "enough reads: {reads}");
    assert_eq!(stored, reads, "every whole-block read sent from the store");
    assert_eq!(
        total(&after, "tx_stored_bodies_copied"),
        0,
        "no write, no copy"
    );
    let mixed = args_with(&["--op", "mixed"], &args);
    assert_clean(&load(&server.addr, &mixed), "mixed");
    let after_mixed = status(&server.addr);
    assert!(
        total(&after_mixed, "tx_stored_bodies_copied") > 0,
        "writes queued behind reads in a pass copy them: {after_mixed}"
    );
}

on_both_tcp_paths!(routed_load_sends_every_op_to_its_core);
fn routed_load_sends_every_op_to_its_core(tcp_io: &[&str]) {
    // `load --route` asks each connection's core (HELLO) and sends each timed op on a
    // connection of its object's core: none crosses a ring, and verification still holds.
    let server = ServerProcess::start(&args_with(&["--cores", "2", "--cpus", "0,1"], tcp_io));
    let args = [
        "--duration",
        "500ms",
        "--objects",
        "32",
        "--object-size",
        "64KiB",
        "--clients",
        "4",
        "--verify",
        "--route",
    ];
    for op in ["randwrite", "randread", "seqwrite", "mixed"] {
        let before = total(&status(&server.addr), "ops_remote_out");
        let with_op = args_with(&["--op", op], &args);
        let report = load(&server.addr, &with_op);
        assert_clean(&report, op);
        assert_eq!(report["routed_connections"], 4, "{op}: {report}");
        let after = total(&status(&server.addr), "ops_remote_out");
        assert_eq!(after, before, "{op}: routed ops never cross cores");
    }
    // The same load unrouted does cross: the assertion above can fail.
    let before = total(&status(&server.addr), "ops_remote_out");
    let unrouted: Vec<&str> = ["--op", "randwrite"]
        .into_iter()
        .chain(
            args.iter()
                .copied()
                .filter(|a| !matches!(*a, "--route" | "--verify")),
        )
        .collect();
    let report = load(&server.addr, &unrouted);
    assert_eq!(report["routed_connections"], 0);
    assert!(total(&status(&server.addr), "ops_remote_out") > before);
}

on_both_tcp_paths!(steady_state_data_path_does_not_allocate);
fn steady_state_data_path_does_not_allocate(tcp_io: &[&str]) {
    let server = ServerProcess::start(&args_with(&["--cores", "2", "--cpus", "0,1"], tcp_io));
    let args = [
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
    let prefill = args_with(&["--op", "randwrite", "--prefill"], &args);
    assert_clean(&load(&server.addr, &prefill), "prefill");
    let before = status(&server.addr);
    let steady = args_with(&["--op", "mixed"], &args);
    let report = load(&server.addr, &steady);
    assert_clean(&report, "mixed");
    let after = status(&server.addr);
    let ops = total(&after, "ops") - total(&before, "ops");
    let allocations = total(&after, "allocations") - total(&before, "allocations");
    // Objects exist already, so writes overwrite in place. What may allocate is connection
    // set-up (two connections for the load and one per status call), never an op.
    let connection_setup_budget = 4 * 16;
    assert!(ops > 1000, "enough ops to see a per-op allocation: {ops}");
    assert!(
        allocations <= connection_setup_budget,
        "{allocations} allocations over {ops} ops: the data path allocates"
    );
    assert_tcp_io(&after, tcp_io);
}

#[test]
fn status_reports_per_core_counters() {
    let server = ServerProcess::start(&["--cores", "2", "--cpus", "0,1", "--pg-count", "64"]);
    // Cores publish their counters every millisecond of loop time, or when they wake from a
    // park (at most 10 ms): poll until both have.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        let status = status(&server.addr);
        let published = status["per_core"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["idle_ns"].as_u64().unwrap() > 0);
        if published || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status["cores"], 2);
    assert_eq!(status["config"]["pg_count"], 64);
    let per_core = status["per_core"].as_array().unwrap();
    assert_eq!(per_core.len(), 2);
    let pgs: u64 = per_core.iter().map(|c| c["pgs"].as_u64().unwrap()).sum();
    assert_eq!(pgs, 64, "the PGs are split over the cores");
    for core in per_core {
        assert!(
            core["idle_ns"].as_u64().unwrap() > 0,
            "each reactor counts its idle time"
        );
        assert!(core["ring_occupancy"].is_object());
    }
}

on_both_tcp_paths!(coalescing_switches_itself_on_under_load_only);
/// `--coalesce auto` (the default) pauses under load and leaves a client with one request in
/// flight alone: its tries fail and back off (at most one paused window in a second, see
/// `dataplane/src/coalesce.rs`), while 4 x 32 in flight keep it on.
fn coalescing_switches_itself_on_under_load_only(tcp_io: &[&str]) {
    let mut server = ServerProcess::start(&args_with(&["--cores", "1"], tcp_io));
    let args = |qd: &'static str, clients: &'static str| {
        [
            "--op",
            "randwrite",
            "--duration",
            "2s",
            "--objects",
            "8",
            "--object-size",
            "256KiB",
            "--clients",
            clients,
            "--qd",
            qd,
        ]
    };
    let before = status(&server.addr);
    let report = load(&server.addr, &args("1", "1"));
    assert_clean(&report, "QD1");
    let after = status(&server.addr);
    let delta = |name: &str| total(&after, name) - total(&before, name);
    let (ops, pauses, on) = (
        report["ops"].as_u64().unwrap(),
        delta("coalesce_pauses"),
        delta("coalesce_windows_on"),
    );
    // Tries at windows 1, 10, 28, 62, 128, 258, 516, 1028, 2052: at most 9 failures in 2 s (a
    // window is at least a millisecond). A try ends after its first judged window (4 pauses);
    // on a loaded machine a descheduled core may leave a window or two unjudged, which keeps
    // the state, so the on-windows are bounded per try, not exactly one each.
    let tries_failed = delta("coalesce_tries_failed");
    assert!(
        tries_failed <= 9,
        "QD1 failed {tries_failed} tries in 2 s: the hold-off does not double"
    );
    assert!(
        on <= 4 * (tries_failed + 1),
        "QD1 had coalescing on in {on} windows over {ops} ops, {tries_failed} tries failed"
    );
    assert!(
        pauses * 10 <= ops,
        "QD1 paused {pauses} times over {ops} ops"
    );
    // Up to three 2 s runs: on a CI machine whose two CPUs the other tests of this file load
    // too, a reactor preempted for most of a run sees only heavy passes (60% of its busy time
    // lost once, 26k IOPS), and pausing after a heavy pass is rightly never tried.
    let mut on = 0;
    let mut report = serde_json::Value::Null;
    for _ in 0..3 {
        let before = status(&server.addr);
        report = load(&server.addr, &args("32", "4"));
        assert_clean(&report, "4 x QD32");
        let after = status(&server.addr);
        on = total(&after, "coalesce_windows_on") - total(&before, "coalesce_windows_on");
        if on > 0 || !tcp_io.is_empty() {
            break;
        }
    }
    if tcp_io.is_empty() {
        assert!(
            on > 0,
            "4 x QD32 never turned coalescing on in three runs: {report}"
        );
    } else {
        // On io_uring a pass's one enter both sends and reaps, so passes carry about half the
        // ops they carry on epoll and a paused window may not beat an unpaused one: whether
        // `auto` turns on under load there is not a property the path keeps (a CI run in
        // debug on 2 CPUs saw it stay off). What this test holds io_uring to is the QD1 half
        // above: it must not pause for a lone client.
        eprintln!(
            "note: io_uring path, 4 x QD32 turned coalescing on in {on} windows (not asserted)"
        );
    }
    // Passes with work are counted apart (ops per busy pass: how far per-pass costs spread).
    let busy_passes = total(&after, "busy_passes") - total(&before, "busy_passes");
    let passes = total(&after, "passes") - total(&before, "passes");
    assert!(
        busy_passes > 0 && busy_passes <= passes,
        "{busy_passes} busy passes of {passes}"
    );
    assert!(server.stop().success(), "clean exit on SIGINT");
}
