//! The load report: what a run measured, printed for people or as JSON.

use super::*;

#[derive(serde::Serialize, Debug, Clone, Default, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(serde::Serialize, Debug, Clone)]
pub struct LoadReport {
    pub op: String,
    pub bs: u64,
    pub qd: u32,
    pub clients: u32,
    /// From the start of the timed run to its last reply.
    pub duration_s: f64,
    /// Completed requests of the timed run, failed ones included.
    pub ops: u64,
    pub iops: f64,
    /// Bytes written or read back by successful requests.
    pub bytes: u64,
    pub mib_per_s: f64,
    pub errors: u64,
    pub errors_by_status: BTreeMap<String, u64>,
    pub verify_failures: u64,
    /// Reads of blocks nobody had written (not found, empty or zeros) in a run without --prefill.
    pub unwritten_reads: u64,
    pub latency_us: Latency,
    pub prefill_ops: u64,
    /// Prefill writes answered with an error (kept out of `errors`, which describes the timed run).
    pub prefill_errors: u64,
    /// Connections that sent each timed op to its object's server core (--route; 0 without it,
    /// or when the server or the connection spread did not allow it).
    pub routed_connections: u32,
    /// A busy-polling generator's (`--transport dpdk`) wall time in passes that received or
    /// sent something, over the timed run: with `duration_s`, how much of its CPU the work took
    /// (a poller uses all of its CPU either way). 0 for the others, which sleep in epoll.
    pub generator_busy_s: f64,
    pub server: Option<serde_json::Value>,
}

/// Prints a short human summary to stdout.
pub fn print_human(report: &LoadReport) {
    println!(
        "{}  bs={}  qd={}  clients={}  duration={:.2}s",
        report.op, report.bs, report.qd, report.clients, report.duration_s
    );
    println!(
        "  ops          {:>12}   {:.0} IOPS",
        report.ops, report.iops
    );
    println!(
        "  throughput   {:>12.1} MiB/s   ({} bytes)",
        report.mib_per_s, report.bytes
    );
    let l = &report.latency_us;
    println!(
        "  latency (us) p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
        l.p50, l.p99, l.p999, l.max, l.mean
    );
    let by_status: Vec<String> = report
        .errors_by_status
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    println!(
        "  errors       {:>12}   {}",
        report.errors,
        by_status.join(" ")
    );
    println!(
        "  verify       {:>12} failures   {} unwritten reads",
        report.verify_failures, report.unwritten_reads
    );
    if report.prefill_ops > 0 {
        println!(
            "  prefill      {:>12} ops   {} errors",
            report.prefill_ops, report.prefill_errors
        );
    }
    if report.unwritten_reads > 0 && report.unwritten_reads == report.ops {
        println!("  note: every read found no data; write the objects first (--prefill)");
    }
}
