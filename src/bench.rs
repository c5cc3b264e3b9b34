//! `carmine bench`: Carmine's main job in one command. Starts an embedded server on loopback
//! (the default store), drives it with the bundled load generator (random writes over
//! prefilled objects, then random reads, every byte verified), and prints one row per phase
//! with the server's own CPU cost per op, measured from its busy-time counters.

use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{ServeArgs, ServeConfig};
use crate::load::{self, LoadArgs, LoadReport, Workload};
use crate::server::Server;
use crate::units::{parse_duration, parse_size};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Timed length of each phase.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Server reactors (pinned to the highest-numbered CPUs; the load generator takes CPU 0).
    #[arg(long, default_value = "1")]
    pub cores: u32,
    /// Server idle policy: spin or adaptive.
    #[arg(long, default_value = "spin")]
    pub idle: String,
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
    /// Store: segment (the log-structured store on --device, through io_uring and O_DIRECT) or memory.
    #[arg(long, default_value = "segment", value_parser = ["segment", "memory"])]
    pub store: String,
    /// Segment store: scratch device file, created and formatted for this run and removed
    /// after it (an existing file at this path is replaced). Must be on a filesystem with
    /// O_DIRECT (ext4, xfs, btrfs; not tmpfs).
    #[arg(long, default_value = "carmine-bench.img")]
    pub device: std::path::PathBuf,
    /// Segment store: size of the scratch device file (sparse).
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    pub device_size: u64,
    /// Print the rows as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Row {
    phase: &'static str,
    report: LoadReport,
    server_ops: u64,
    server_busy_ns: u64,
    server_allocations: u64,
}

impl Row {
    fn cpu_ns_per_op(&self) -> f64 {
        self.server_busy_ns as f64 / self.server_ops.max(1) as f64
    }
    fn allocations_per_op(&self) -> f64 {
        self.server_allocations as f64 / self.server_ops.max(1) as f64
    }
}

fn totals(target: &str) -> Result<(u64, u64, u64), String> {
    let status = crate::client::fetch_status(target)?;
    let totals = &status["totals"];
    let get = |name: &str| totals[name].as_u64().unwrap_or(0);
    Ok((get("ops"), get("busy_ns"), get("allocations")))
}

fn run_phase(phase: &'static str, target: &str, load_args: &LoadArgs) -> Result<Row, String> {
    let before = totals(target)?;
    let report = load::run(load_args)?;
    let after = totals(target)?;
    Ok(Row {
        phase,
        report,
        server_ops: after.0 - before.0,
        server_busy_ns: after.1 - before.1,
        server_allocations: after.2 - before.2,
    })
}

fn print_table(rows: &[Row], cpus: &[usize], addr: &str, store: &str) {
    println!("carmine bench: embedded server, {} core(s) on CPU(s) {cpus:?}, {store} store, kernel TCP on {addr}", cpus.len());
    println!(
        "{:<10} {:>10} {:>9} {:>8} {:>8} {:>8} {:>13} {:>10} {:>7} {:>8}",
        "phase",
        "IOPS",
        "MiB/s",
        "p50_us",
        "p99_us",
        "p999_us",
        "server_ns/op",
        "allocs/op",
        "errors",
        "verify"
    );
    for row in rows {
        let r = &row.report;
        println!(
            "{:<10} {:>10.0} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>13.0} {:>10.4} {:>7} {:>8}",
            row.phase,
            r.iops,
            r.mib_per_s,
            r.latency_us.p50,
            r.latency_us.p99,
            r.latency_us.p999,
            row.cpu_ns_per_op(),
            row.allocations_per_op(),
            r.errors,
            if r.verify_failures == 0 {
                "ok".to_string()
            } else {
                format!("{} BAD", r.verify_failures)
            },
        );
    }
    println!("server_ns/op: reactor busy time per op from the server's counters (CPU cost, whatever the client's speed).");
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    let serve_args = ServeArgs {
        listen: Some("127.0.0.1:0".into()),
        cores: Some(args.cores.to_string()),
        idle: Some(args.idle.clone()),
        store: Some(args.store.clone()),
        device: Some(args.device.display().to_string()),
        device_size: Some(args.device_size.to_string()),
        ..ServeArgs::default()
    };
    let config = ServeConfig::resolve(&serve_args)?;
    let needed = u64::from(args.objects) * args.object_size;
    if args.store == "segment" {
        // A scratch device: formatted fresh for this run, so earlier runs cannot fill it.
        match std::fs::remove_file(&args.device) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", args.device.display())),
        }
        if needed * 2 > args.device_size {
            return Err(format!(
                "objects x object_size = {needed} bytes needs a --device-size of at least twice that"
            ));
        }
    } else if needed > config.memory_capacity {
        return Err(format!(
            "objects x object_size = {needed} bytes exceeds the memory store capacity {}",
            config.memory_capacity
        ));
    }
    let server = Server::start(&config, crate::thread_allocations)?;
    let target = server.addr.to_string();
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let client_cpus = if online > server.cpus.len() {
        Some("0".to_string())
    } else {
        None
    };
    let base = LoadArgs {
        target: target.clone(),
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
        prefill: true,
        verify: true,
        route: false,
        read_pct: 70,
        seed: 1,
        prefix: "bench".into(),
        json: true,
        cpus: client_cpus,
        ack_log: None,
        check: None,
        dpdk: Default::default(),
    };
    let result = (|| {
        let write = run_phase("randwrite", &target, &base)?;
        let read_args = LoadArgs {
            op: Workload::Randread,
            prefill: false,
            ..base.clone()
        };
        let read = run_phase("randread", &target, &read_args)?;
        Ok::<_, String>(vec![write, read])
    })();
    let cpus = server.cpus.clone();
    server.stop();
    let joined = server.join();
    if args.store == "segment" {
        let _ = std::fs::remove_file(&args.device);
    }
    joined?;
    let rows = result?;
    if args.json {
        let value: Vec<Value> = rows
            .iter()
            .map(|row| json!({"phase": row.phase, "load": row.report, "server_ops": row.server_ops, "server_cpu_ns_per_op": row.cpu_ns_per_op(), "server_allocations_per_op": row.allocations_per_op()}))
            .collect();
        println!("{}", Value::Array(value));
    } else {
        let store = if args.store == "segment" {
            format!("segment ({})", args.device.display())
        } else {
            "memory".to_string()
        };
        print_table(&rows, &cpus, &target, &store);
    }
    let failures: u64 = rows
        .iter()
        .map(|r| r.report.verify_failures + r.report.errors)
        .sum();
    if failures > 0 {
        return Err(format!(
            "{failures} errors or verification failures: the data path is broken"
        ));
    }
    Ok(())
}
