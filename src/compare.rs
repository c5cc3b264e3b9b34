//! `carmine compare`: classic thread-pool mode against run-to-completion mode, on this machine,
//! in one run. For each store, core count and mode it starts `carmine serve` as a child process
//! (so the server's process CPU time is its own), prefills, and drives each workload with the
//! bundled load generator (pinned to the CPUs the server does not use). It prints a table and
//! writes `compare.json` and `compare.svg` (IOPS, classic vs rtc, per row).
//!
//! CPU per op comes from the server: classic = process CPU time / ops (every thread counts);
//! rtc = reactor busy time / ops (its own counters), plus rtc process CPU time / ops for an
//! apples-to-apples column (it includes polling that found nothing).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::load::{self, LoadArgs, Workload};
use crate::rx_steering::{self, RxSteering};
use crate::units::{parse_duration, parse_size};

/// Stores compared, in order: the segment store runs on a fresh file in `--out` per server.
const STORES: &[&str] = &["memory", "segment"];
const WORKLOADS: [Workload; 2] = [Workload::Randread, Workload::Randwrite];
/// How long a child server has to announce its address, and to exit after SIGINT.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// A side whose CPU use over the run is at least this fraction of what it has is saturated.
const SATURATED_FRACTION: f64 = 0.9;
/// Prefill runs before the timed phases; its own timed part is kept short.
/// The segment store's device file per server: room for the objects and the runs' journal
/// without cleaning in the default durations, and quick to preallocate.
const COMPARE_DEVICE_BYTES: u64 = 2 << 30;
const COMPARE_SEGMENT_BYTES: u64 = 16 << 20;
const PREFILL_TIMED: Duration = Duration::from_millis(100);

#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// Timed length of each workload run.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Directory for compare.json and compare.svg.
    #[arg(long, default_value = "compare-out")]
    pub out: PathBuf,
    /// Server core counts to compare, e.g. "1,2".
    #[arg(long, default_value = "1,2")]
    pub cores_list: String,
    /// Print the JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Block size of every op.
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per client connection.
    #[arg(long, default_value = "32")]
    pub qd: u32,
    /// Client connections.
    #[arg(long, default_value = "4")]
    pub clients: u32,
    /// Objects written and read.
    #[arg(long, default_value = "64")]
    pub objects: u32,
    /// Size of each object.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub object_size: u64,
    /// Idle policy of the rtc server: adaptive (default; yields a CPU it shares with the load
    /// generator) or spin.
    #[arg(long, default_value = "adaptive")]
    pub rtc_idle: String,
    /// Drive the servers with a client that is not shard-aware. By default the generator runs
    /// as `carmine load --route` (each op on a connection owned by its object's core, so no op
    /// crosses the rtc server's rings, as a shard-aware client sends it); classic mode has no
    /// owning cores and is driven unrouted either way.
    #[arg(long)]
    pub unrouted: bool,
    /// Pass coalescing of the rtc server (`serve --coalesce`: auto, off or a pause); the
    /// server's default (auto) when not given.
    #[arg(long)]
    pub rtc_coalesce: Option<String>,
    /// TCP system-call path of the rtc server (`serve --tcp-io`: epoll or uring); the server's
    /// default (epoll) when not given.
    #[arg(long)]
    pub rtc_tcp_io: Option<String>,
    /// Stores to compare, in order (memory, segment or both).
    #[arg(long, default_value = "memory,segment", value_delimiter = ',')]
    pub stores: Vec<String>,
    /// Where the kernel processes loopback's received segments. Over loopback a segment is
    /// delivered in the sender's softirq, so each side would pay the other's TCP receive path on
    /// its own CPUs; `rfs` (receive flow steering) runs it on the CPU of the socket's reader, as
    /// two hosts with NICs would, for the run's length (the previous settings are restored at
    /// exit). auto: rfs when this process may set it (root), else off.
    #[arg(long, value_enum, default_value = "auto")]
    pub rx_steering: RxSteering,
}

/// One workload run against one server.
#[derive(Clone, Debug, Default)]
struct Measure {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    wall_s: f64,
    server_ops: u64,
    server_busy_ns: u64,
    /// Reactor threads' CPU time booked to busy passes (rtc; preemption excluded).
    server_busy_cpu_ns: u64,
    server_cpu_ns: u64,
    client_cpu_ns: u64,
    /// Load connections that sent every op to its object's core (see `--unrouted`).
    routed_connections: u32,
}

impl Measure {
    fn per_op(&self, ns: u64) -> f64 {
        ns as f64 / self.server_ops.max(1) as f64
    }
    /// Fraction of the server's CPUs it used: busy time (rtc) or process CPU time (classic).
    fn server_load(&self, mode: &str, cores: u32) -> f64 {
        let used = if mode == "rtc" {
            self.server_busy_ns
        } else {
            self.server_cpu_ns
        };
        used as f64 / (self.wall_s * 1e9 * f64::from(cores)).max(1.0)
    }
    /// Fraction of one CPU the load generator (one thread) used.
    fn client_load(&self) -> f64 {
        self.client_cpu_ns as f64 / (self.wall_s * 1e9).max(1.0)
    }
    fn limit(&self, mode: &str, cores: u32) -> &'static str {
        if self.server_load(mode, cores) >= SATURATED_FRACTION {
            "server"
        } else if self.client_load() >= SATURATED_FRACTION {
            "load-gen"
        } else {
            "neither"
        }
    }
    fn to_json(&self, mode: &str, cores: u32) -> Value {
        json!({
            "iops": self.iops.round(),
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "errors": self.errors,
            "server_ops": self.server_ops,
            "cpu_ns_per_op": if mode == "rtc" { self.per_op(self.server_busy_ns) } else { self.per_op(self.server_cpu_ns) },
            "process_cpu_ns_per_op": self.per_op(self.server_cpu_ns),
            "busy_ns_per_op": if mode == "rtc" { json!(self.per_op(self.server_busy_ns)) } else { Value::Null },
            "busy_cpu_ns_per_op": if mode == "rtc" { json!(self.per_op(self.server_busy_cpu_ns)) } else { Value::Null },
            "server_cpu_fraction": (self.server_load(mode, cores) * 1000.0).round() / 1000.0,
            "load_gen_cpu_fraction": (self.client_load() * 1000.0).round() / 1000.0,
            "limit": self.limit(mode, cores),
            "routed_connections": self.routed_connections,
        })
    }
}

struct Row {
    store: String,
    cores: u32,
    workload: Workload,
    shared_cpus: bool,
    classic: Measure,
    rtc: Measure,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.rtc.iops / self.classic.iops.max(1.0)
    }
    /// Classic's process CPU per op over rtc's: the IOPS ratio two saturated servers would
    /// show, measured whichever side limits. Process CPU on both sides, so rtc's includes
    /// polling that found nothing (it can only lower this ratio).
    fn cpu_ratio(&self) -> f64 {
        self.classic.per_op(self.classic.server_cpu_ns)
            / self.rtc.per_op(self.rtc.server_cpu_ns).max(1.0)
    }
    fn to_json(&self) -> Value {
        json!({
            "store": self.store,
            "cores": self.cores,
            "workload": self.workload.name(),
            "shared_cpus_with_load_gen": self.shared_cpus,
            "ratio_rtc_over_classic": (self.ratio() * 100.0).round() / 100.0,
            "cpu_ratio_classic_over_rtc": (self.cpu_ratio() * 100.0).round() / 100.0,
            "classic": self.classic.to_json("classic", self.cores),
            "rtc": self.rtc.to_json("rtc", self.cores),
        })
    }
}

/// Where the server and the load generator run.
struct CpuPlan {
    server: Vec<usize>,
    load: Vec<usize>,
    shared: bool,
}

fn plan_cpus(cores: u32, online: usize) -> CpuPlan {
    let cores = cores as usize;
    let server: Vec<usize> = (online - cores..online).collect();
    if cores < online {
        CpuPlan {
            server,
            load: (0..online - cores).collect(),
            shared: false,
        }
    } else {
        // No CPU left: the generator shares CPU 0 with the server's first thread(s).
        CpuPlan {
            server,
            load: vec![0],
            shared: true,
        }
    }
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A `carmine serve` child process.
struct ChildServer {
    child: Child,
    addr: String,
    _log: mpsc::Receiver<String>,
}

impl ChildServer {
    fn start(args: &[String]) -> Result<ChildServer, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut child = Command::new(exe)
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn carmine serve: {e}"))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, log) = mpsc::channel();
        std::thread::spawn(move || {
            // Keeps draining the pipe so the server never blocks on a log line.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = log.recv_timeout(wait) else {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "carmine serve {args:?} did not announce its address"
                ));
            };
            if let Some(rest) = line.split(" serving on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                return Ok(ChildServer {
                    child,
                    addr,
                    _log: log,
                });
            }
        }
    }

    fn stop(mut self) -> Result<(), String> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("server exited with {status}"))
                };
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err("server did not stop within 15 s of SIGINT".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn server_totals(addr: &str) -> Result<(u64, u64, u64, u64), String> {
    let status = crate::client::fetch_status(addr)?;
    let totals = &status["totals"];
    let get = |name: &str| totals[name].as_u64().unwrap_or(0);
    Ok((
        get("ops"),
        get("busy_ns"),
        get("process_cpu_ns"),
        get("busy_cpu_ns"),
    ))
}

fn measure(load_args: &LoadArgs) -> Result<Measure, String> {
    let before = server_totals(&load_args.target)?;
    let client_before = crate::status::process_cpu_ns();
    let started = Instant::now();
    let report = load::run(load_args)?;
    let wall_s = started.elapsed().as_secs_f64();
    let client_cpu_ns = crate::status::process_cpu_ns() - client_before;
    let after = server_totals(&load_args.target)?;
    Ok(Measure {
        iops: report.iops,
        routed_connections: report.routed_connections,
        p50_us: report.latency_us.p50,
        p99_us: report.latency_us.p99,
        errors: report.errors,
        wall_s,
        server_ops: after.0 - before.0,
        server_busy_ns: after.1 - before.1,
        server_busy_cpu_ns: after.3 - before.3,
        server_cpu_ns: after.2 - before.2,
        client_cpu_ns,
    })
}

fn parse_cores_list(text: &str, online: usize) -> Result<Vec<u32>, String> {
    let mut list = Vec::new();
    for item in text.split(',') {
        let cores: u32 = item
            .trim()
            .parse()
            .map_err(|_| format!("--cores-list: expected numbers like 1,2, got {text:?}"))?;
        if cores == 0 || cores as usize > online {
            return Err(format!(
                "--cores-list: {cores} cores, but this machine has {online} CPUs"
            ));
        }
        list.push(cores);
    }
    Ok(list)
}

fn base_load(args: &CompareArgs, target: &str, plan: &CpuPlan) -> LoadArgs {
    LoadArgs {
        target: target.to_string(),
        transport: crate::load::Transport::Tcp,
        rpc_mtu: carmine_dataplane::udp::RPC_MTU_DEFAULT,
        op: Workload::Randwrite,
        bs: args.bs,
        qd: args.qd,
        clients: args.clients,
        threads: 1,
        duration: args.duration,
        objects: args.objects,
        object_size: args.object_size,
        prefill: false,
        verify: false,
        route: !args.unrouted,
        read_pct: 70,
        seed: 1,
        prefix: "compare".into(),
        json: true,
        cpus: Some(cpu_list(&plan.load)),
        ack_log: None,
        check: None,
        dpdk: Default::default(),
    }
}

/// One server (store, cores, mode): prefill, then each workload. Returns one Measure per workload.
fn run_server(
    args: &CompareArgs,
    store: &str,
    cores: u32,
    mode: &str,
    plan: &CpuPlan,
) -> Result<Vec<Measure>, String> {
    let mut serve_args: Vec<String> = ["--mode", mode, "--store", store, "--listen", "127.0.0.1:0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    serve_args.extend(["--cores".into(), cores.to_string()]);
    serve_args.extend(["--cpus".into(), cpu_list(&plan.server)]);
    if mode == "rtc" {
        serve_args.extend(["--idle".into(), args.rtc_idle.clone()]);
        if let Some(coalesce) = &args.rtc_coalesce {
            serve_args.extend(["--coalesce".into(), coalesce.clone()]);
        }
        if let Some(tcp_io) = &args.rtc_tcp_io {
            serve_args.extend(["--tcp-io".into(), tcp_io.clone()]);
        }
    }
    // A fresh device per server: formatted for its shard count, and no run sees another's data.
    let device = args.out.join(format!("compare-{store}-{mode}-{cores}.img"));
    if store == "segment" {
        let _ = std::fs::remove_file(&device);
        // Written whole first (as fio lays out its file): a sparse file's first writes make
        // the kernel allocate blocks, in io_uring worker threads on the server's CPUs, and the
        // table would measure that rather than the two designs.
        // Both modes run one store shard per core (classic: one per op-queue shard, auto).
        let shards = cores;
        if let Err(error) = crate::device::create_and_format(
            &device,
            COMPARE_DEVICE_BYTES,
            shards,
            COMPARE_SEGMENT_BYTES,
            carmine_storage::segment::format::SPARE_PERCENT_DEFAULT,
            true,
        ) {
            let _ = std::fs::remove_file(&device);
            return Err(error);
        }
        serve_args.extend(["--device".into(), device.display().to_string()]);
    }
    let server = ChildServer::start(&serve_args);
    let server = match server {
        Ok(server) => server,
        Err(error) => {
            let _ = std::fs::remove_file(&device);
            return Err(error);
        }
    };
    let base = base_load(args, &server.addr, plan);
    let result = (|| {
        let prefill = LoadArgs {
            prefill: true,
            duration: PREFILL_TIMED,
            ..base.clone()
        };
        load::run(&prefill)?;
        let mut measures = Vec::new();
        for workload in WORKLOADS {
            let load_args = LoadArgs {
                op: workload,
                ..base.clone()
            };
            let measured = measure(&load_args)?;
            eprintln!(
                "compare: {store} {cores} core(s) {mode:<7} {:<9} {:>9.0} IOPS",
                workload.name(),
                measured.iops
            );
            measures.push(measured);
        }
        Ok::<_, String>(measures)
    })();
    let stopped = server.stop();
    let _ = std::fs::remove_file(&device);
    let measures = result?;
    stopped?;
    Ok(measures)
}

pub fn run(args: &CompareArgs) -> Result<(), String> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores_list = parse_cores_list(&args.cores_list, online)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    // Held until the table is written: restores the kernel's settings when dropped.
    let steering_guard = rx_steering::apply(args.rx_steering, online)?;
    let steering = if steering_guard.is_some() {
        "rfs"
    } else {
        "off"
    };
    notes.push(format!(
        "rx steering: {steering} ({})",
        if steering == "rfs" {
            "each side's TCP receive path ran on its own CPUs, as between two hosts"
        } else {
            "over loopback each side's CPUs also ran the other side's TCP receive path"
        }
    ));
    for store in &args.stores {
        if !STORES.contains(&store.as_str()) {
            return Err(format!(
                "--stores: unknown store {store:?}: expected {STORES:?}"
            ));
        }
    }
    for store in args.stores.iter().map(String::as_str) {
        for &cores in &cores_list {
            let plan = plan_cpus(cores, online);
            if plan.shared {
                notes.push(format!(
                    "{store}, {cores} core(s): the server has every CPU ({:?}), so the load generator shares CPU {:?} with it; IOPS and busy-time CPU/op at this size are bounded by that sharing",
                    plan.server, plan.load
                ));
            }
            let classic = run_server(args, store, cores, "classic", &plan)?;
            let rtc = run_server(args, store, cores, "rtc", &plan)?;
            for ((workload, classic), rtc) in WORKLOADS.into_iter().zip(classic).zip(rtc) {
                rows.push(Row {
                    store: store.to_string(),
                    cores,
                    workload,
                    shared_cpus: plan.shared,
                    classic,
                    rtc,
                });
            }
        }
    }
    let goals = evaluate_goals(&rows);
    let document = json!({
        "machine": { "online_cpus": online },
        "settings": {
            "duration_s": args.duration.as_secs_f64(),
            "bs": args.bs, "qd": args.qd, "clients": args.clients,
            "objects": args.objects, "object_size": args.object_size,
            "rtc_idle": args.rtc_idle, "rtc_coalesce": args.rtc_coalesce.as_deref().unwrap_or("auto"), "rtc_tcp_io": args.rtc_tcp_io.as_deref().unwrap_or("epoll"),
            "load_gen_threads": 1,
            "rx_steering": steering,
        },
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "goals": goals,
        "notes": notes,
    });
    let json_path = args.out.join("compare.json");
    let svg_path = args.out.join("compare.svg");
    let text = serde_json::to_string_pretty(&document).expect("serialises");
    std::fs::write(&json_path, text)
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
    std::fs::write(&svg_path, render_svg(&rows))
        .map_err(|e| format!("cannot write {}: {e}", svg_path.display()))?;
    if args.json {
        println!("{document}");
    } else {
        print_table(&rows, &notes, &goals);
        println!("wrote {} and {}", json_path.display(), svg_path.display());
    }
    let errors: u64 = rows.iter().map(|r| r.classic.errors + r.rtc.errors).sum();
    if errors > 0 {
        return Err(format!("{errors} ops failed during the comparison"));
    }
    Ok(())
}

fn find(rows: &[Row], cores: u32, workload: Workload) -> Option<&Row> {
    rows.iter()
        .find(|r| r.store == "memory" && r.cores == cores && r.workload == workload)
}

/// The goals, each with the measured value and whether it was met.
fn evaluate_goals(rows: &[Row]) -> Value {
    let mut goals = Vec::new();
    for (workload, target) in [(Workload::Randread, 2.0), (Workload::Randwrite, 1.6)] {
        if let Some(row) = find(rows, 1, workload) {
            goals.push(json!({
                "goal": format!("1 core, memory, {}: rtc/classic IOPS >= {target}", workload.name()),
                "measured": (row.ratio() * 100.0).round() / 100.0,
                "met": row.ratio() >= target,
            }));
            // The same goal in CPU per op, which a generator that limits (or a neighbour on a
            // shared machine) does not move as it moves IOPS.
            goals.push(json!({
                "goal": format!("1 core, memory, {}: classic/rtc process CPU per op >= {target}", workload.name()),
                "measured": (row.cpu_ratio() * 100.0).round() / 100.0,
                "met": row.cpu_ratio() >= target,
            }));
        }
    }
    for workload in WORKLOADS {
        if let (Some(one), Some(two)) = (find(rows, 1, workload), find(rows, 2, workload)) {
            for (column, one_ns, two_ns) in [
                (
                    "busy",
                    one.rtc.per_op(one.rtc.server_busy_ns),
                    two.rtc.per_op(two.rtc.server_busy_ns),
                ),
                (
                    "busy CPU",
                    one.rtc.per_op(one.rtc.server_busy_cpu_ns),
                    two.rtc.per_op(two.rtc.server_busy_cpu_ns),
                ),
                (
                    "process",
                    one.rtc.per_op(one.rtc.server_cpu_ns),
                    two.rtc.per_op(two.rtc.server_cpu_ns),
                ),
            ] {
                let scale = two_ns / one_ns.max(1.0);
                goals.push(json!({
                    "goal": format!("rtc {} CPU/op ({column} time), 2 reactors within 1.1x of 1", workload.name()),
                    "measured": (scale * 100.0).round() / 100.0,
                    "met": scale <= 1.1,
                    "shared_cpus_with_load_gen": two.shared_cpus,
                }));
            }
        }
    }
    Value::Array(goals)
}

fn print_table(rows: &[Row], notes: &[String], goals: &Value) {
    println!(
        "| store  | cores | workload  | classic IOPS | rtc IOPS | ratio | CPU/op classic | rtc busy | rtc busy CPU | rtc process | CPU ratio | p99 classic | p99 rtc | limit classic/rtc |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let (c, r) = (&row.classic, &row.rtc);
        println!(
            "| {:<6} | {:>5}{} | {:<9} | {:>12.0} | {:>8.0} | {:>4.2}x | {:>11.0} ns | {:>5.0} ns | {:>9.0} ns | {:>8.0} ns | {:>8.2}x | {:>8.0} us | {:>4.0} us | {} / {} |",
            row.store,
            row.cores,
            if row.shared_cpus { "*" } else { " " },
            row.workload.name(),
            c.iops,
            r.iops,
            row.ratio(),
            c.per_op(c.server_cpu_ns),
            r.per_op(r.server_busy_ns),
            r.per_op(r.server_busy_cpu_ns),
            r.per_op(r.server_cpu_ns),
            row.cpu_ratio(),
            c.p99_us,
            r.p99_us,
            c.limit("classic", row.cores),
            r.limit("rtc", row.cores),
        );
    }
    println!("CPU/op classic: server process CPU time / ops. rtc busy: reactor busy time (wall clock) / ops. rtc busy CPU: the reactor threads' CPU time booked to busy passes / ops (time a reactor was preempted, e.g. by the load generator on a shared CPU, excluded). rtc process: server process CPU time / ops (includes polling). CPU ratio: CPU/op classic / rtc process.");
    println!("limit: 'server' = the server used >= 90% of its CPUs; 'load-gen' = the generator's thread used >= 90% of its CPU; '*' = the generator shares a CPU with the server.");
    for note in notes {
        println!("note: {note}");
    }
    for goal in goals.as_array().into_iter().flatten() {
        println!(
            "goal: {} -> {} ({})",
            goal["goal"].as_str().unwrap_or(""),
            goal["measured"],
            if goal["met"].as_bool() == Some(true) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}

/// A horizontal bar chart: per row, classic IOPS (grey) over rtc IOPS (red).
fn render_svg(rows: &[Row]) -> String {
    const LABEL_W: f64 = 230.0;
    const BAR_W: f64 = 520.0;
    const BAR_H: f64 = 14.0;
    const ROW_H: f64 = 44.0;
    let max = rows
        .iter()
        .map(|r| r.classic.iops.max(r.rtc.iops))
        .fold(1.0, f64::max);
    let height = 60.0 + ROW_H * rows.len().max(1) as f64;
    let width = LABEL_W + BAR_W + 140.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">carmine compare: IOPS, classic (grey) vs rtc (red)</text>\n"
    );
    if rows.is_empty() {
        svg.push_str("<text x=\"10\" y=\"50\">no rows</text>\n");
    }
    for (index, row) in rows.iter().enumerate() {
        let y = 40.0 + ROW_H * index as f64;
        svg.push_str(&format!(
            "<text x=\"10\" y=\"{:.1}\">{} {} core{} {}</text>\n",
            y + BAR_H + 4.0,
            row.store,
            row.cores,
            if row.cores == 1 { "" } else { "s" },
            row.workload.name()
        ));
        for (offset, iops, colour) in [
            (0.0, row.classic.iops, "#999999"),
            (BAR_H + 2.0, row.rtc.iops, "#c0392b"),
        ] {
            let w = (iops / max * BAR_W).max(1.0);
            svg.push_str(&format!(
                "<rect x=\"{LABEL_W}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{BAR_H}\" fill=\"{colour}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\">{iops:.0}</text>\n",
                y + offset,
                LABEL_W + w + 6.0,
                y + offset + BAR_H - 3.0
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#555\">{:.2}x</text>\n",
            LABEL_W + BAR_W + 80.0,
            y + BAR_H + 4.0,
            row.ratio()
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
