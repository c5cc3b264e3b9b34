//! `status`: the perf dump. Cores publish counters (`SharedCounters`); this renders them, per
//! core and summed, as JSON, with the derived figures an operator asks for first.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::osd::stats::{Counter, SharedCounters, COUNTER_NAMES};

pub struct StatusBoard {
    cores: Vec<Arc<SharedCounters>>,
    /// Classic mode: what thread publishes each entry ("worker-0"); RTC entries are cores.
    labels: Option<Vec<String>>,
    /// Static facts about the server (configuration), rendered as they are.
    pub info: Value,
    started: Instant,
}

impl StatusBoard {
    pub fn new(cores: usize, info: Value) -> StatusBoard {
        StatusBoard {
            cores: (0..cores)
                .map(|_| Arc::new(SharedCounters::new(cores)))
                .collect(),
            labels: None,
            info,
            started: Instant::now(),
        }
    }

    /// A board with one entry per labelled thread (classic mode).
    pub fn with_labels(labels: Vec<String>, info: Value) -> StatusBoard {
        let mut board = StatusBoard::new(labels.len(), info);
        board.labels = Some(labels);
        board
    }

    pub fn core(&self, index: usize) -> Arc<SharedCounters> {
        self.cores[index].clone()
    }
}

fn per_op(numerator: u64, ops: u64) -> Value {
    if ops == 0 {
        Value::Null
    } else {
        json!((numerator as f64 / ops as f64 * 1000.0).round() / 1000.0)
    }
}

/// CPU time used so far by every thread of this process (user + system), in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) } != 0 {
        return 0;
    }
    time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
}

pub fn render(board: &StatusBoard) -> String {
    let mut totals = vec![0u64; COUNTER_NAMES.len()];
    let mut per_core = Vec::with_capacity(board.cores.len());
    for (index, shared) in board.cores.iter().enumerate() {
        let (counters, rings) = shared.snapshot();
        let mut core = Map::new();
        core.insert("core".into(), json!(index));
        if let Some(labels) = &board.labels {
            core.insert("thread".into(), json!(labels[index]));
        }
        for (position, name) in COUNTER_NAMES.iter().enumerate() {
            core.insert((*name).into(), json!(counters.values[position]));
            totals[position] += counters.values[position];
        }
        let ops = counters.get(Counter::ops);
        core.insert(
            "cpu_ns_per_op".into(),
            per_op(counters.get(Counter::busy_ns), ops),
        );
        let occupancy: Map<String, Value> = rings
            .iter()
            .enumerate()
            .filter(|(target, _)| *target != index)
            .map(|(target, n)| (format!("to_core_{target}"), json!(n)))
            .collect();
        core.insert("ring_occupancy".into(), Value::Object(occupancy));
        per_core.push(Value::Object(core));
    }
    let mut total = Map::new();
    for (position, name) in COUNTER_NAMES.iter().enumerate() {
        total.insert((*name).into(), json!(totals[position]));
    }
    let ops = totals[Counter::ops as usize];
    total.insert(
        "cpu_ns_per_op".into(),
        per_op(totals[Counter::busy_ns as usize], ops),
    );
    total.insert("process_cpu_ns".into(), json!(process_cpu_ns()));
    // Device bytes per byte of acknowledged client writes (journal, cleaner copies and
    // checkpoints over payload); null before any write or on a store without a device.
    let device = totals[Counter::store_device_bytes_written as usize];
    let client = totals[Counter::store_client_bytes_written as usize];
    total.insert(
        "write_amplification".into(),
        if client > 0 && device > 0 {
            json!(device as f64 / client as f64)
        } else {
            Value::Null
        },
    );
    // Client ops per journal record: how well group commit batches (null without a journal).
    let records = totals[Counter::store_records_written as usize];
    total.insert(
        "ops_per_record".into(),
        if records > 0 {
            json!(ops as f64 / records as f64)
        } else {
            Value::Null
        },
    );
    total.insert(
        "allocations_per_op".into(),
        per_op(totals[Counter::allocations as usize], ops)
            .as_f64()
            .map_or(Value::Null, |v| json!(v / 1000.0)),
    );
    let errors: Map<String, Value> = COUNTER_NAMES
        .iter()
        .enumerate()
        .filter(|(_, name)| name.starts_with("err_") || name.starts_with("stream_"))
        .map(|(position, name)| {
            (
                name.trim_start_matches("err_").to_string(),
                json!(totals[position]),
            )
        })
        .collect();
    let document = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": board.started.elapsed().as_secs_f64(),
        "config": board.info,
        "cores": board.info.get("cores").cloned().unwrap_or(json!(per_core.len())),
        "totals": total,
        "errors": errors,
        "per_core": per_core,
    });
    document.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::osd::stats::Counters;

    #[test]
    fn renders_totals_and_cost_per_op() {
        let board = StatusBoard::new(2, json!({"store": "memory"}));
        let mut counters = Counters::default();
        counters.set(Counter::ops, 10);
        counters.set(Counter::busy_ns, 20_000);
        counters.set(Counter::err_bad_crc, 1);
        board.core(0).publish(&counters);
        board.core(1).publish(&counters);
        let value: Value = serde_json::from_str(&render(&board)).unwrap();
        assert_eq!(value["totals"]["ops"], 20);
        assert_eq!(value["totals"]["cpu_ns_per_op"], 2000.0);
        assert_eq!(value["errors"]["bad_crc"], 2);
        assert_eq!(value["per_core"][1]["ring_occupancy"]["to_core_0"], 0);
        assert_eq!(value["config"]["store"], "memory");
        assert!(value["totals"]["process_cpu_ns"].as_u64().unwrap() > 0);
        assert_eq!(value["cores"], 2);
    }
}
