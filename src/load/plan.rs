//! The plan: arguments validated, and the objects, connections and CPUs split over threads.

use super::*;

/// What every thread needs to know, validated.
#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) target: String,
    pub(super) transport: Transport,
    pub(super) rpc_mtu: u16,
    pub(super) workload: Workload,
    pub(super) bs: u64,
    pub(super) qd: u32,
    pub(super) duration: Duration,
    pub(super) blocks_per_object: u64,
    pub(super) prefill: bool,
    pub(super) verify: bool,
    pub(super) route: bool,
    pub(super) read_pct: u8,
    pub(super) seed: u64,
    pub(super) ack_log: Option<AckLog>,
}

pub(super) struct ThreadPlan {
    pub(super) index: usize,
    pub(super) clients: usize,
    /// Global object indices owned by this thread.
    pub(super) objects: Vec<u64>,
    pub(super) cpu: Option<usize>,
}

pub(super) fn validate(args: &LoadArgs) -> Result<(Config, Vec<ThreadPlan>), String> {
    if args.bs < BLOCK_HEADER_BYTES as u64 || args.bs > BS_MAX_BYTES {
        return Err(format!(
            "--bs must be {BLOCK_HEADER_BYTES}..={BS_MAX_BYTES} bytes (blocks start with a {BLOCK_HEADER_BYTES}-byte header), got {}",
            args.bs
        ));
    }
    let blocks_per_object = args.object_size / args.bs;
    if blocks_per_object == 0 || blocks_per_object * args.bs != args.object_size {
        return Err(format!(
            "--object-size ({}) must be a non-zero multiple of --bs ({})",
            args.object_size, args.bs
        ));
    }
    if args.qd == 0 || args.qd > QD_MAX {
        return Err(format!("--qd must be 1..={QD_MAX}, got {}", args.qd));
    }
    if args.clients == 0 || args.threads == 0 || args.objects == 0 {
        return Err("--clients, --threads and --objects must be at least 1".to_string());
    }
    if args.objects > OBJECTS_MAX {
        return Err(format!(
            "--objects must be at most {OBJECTS_MAX}, got {}",
            args.objects
        ));
    }
    if args.duration > DURATION_MAX {
        return Err(format!(
            "--duration must be at most {} days",
            DURATION_MAX.as_secs() / 86_400
        ));
    }
    if args.threads > args.clients || args.threads > args.objects {
        return Err(format!(
            "--threads ({}) must not exceed --clients ({}) or --objects ({}): each thread needs its own of both",
            args.threads, args.clients, args.objects
        ));
    }
    if args.read_pct > 100 {
        return Err(format!("--read-pct must be 0..=100, got {}", args.read_pct));
    }
    let blocks = blocks_per_object.saturating_mul(u64::from(args.objects));
    if blocks > BLOCKS_MAX {
        return Err(format!(
            "{blocks} blocks (objects * object-size / bs) exceed the {BLOCKS_MAX} the generator tracks: \
             use fewer or smaller objects or a larger --bs"
        ));
    }
    let longest_name = object_name(&args.prefix, u64::from(args.objects - 1)).len();
    if longest_name > usize::from(wire::OID_LEN_CEILING) {
        return Err(format!(
            "object names of {longest_name} bytes exceed the wire limit of {}",
            wire::OID_LEN_CEILING
        ));
    }
    let cpus = match &args.cpus {
        Some(text) => Some(checked_cpus(text)?),
        None => None,
    };
    match args.transport {
        Transport::Tcp => {}
        Transport::Udp => udp::validate(args)?,
        #[cfg(feature = "dpdk")]
        Transport::Dpdk => dpdk::validate(args)?,
        #[cfg(not(feature = "dpdk"))]
        Transport::Dpdk => {
            return Err(if cfg!(feature = "dpdk") {
                "--transport dpdk: the DPDK client is not wired into load yet (issue 5); use --transport udp".to_string()
            } else {
                "--transport dpdk: this carmine was built without DPDK; install libdpdk-dev and clang and build with `cargo build --release --features dpdk`".to_string()
            })
        }
    }
    let config = Config {
        target: args.target.clone(),
        transport: args.transport,
        rpc_mtu: args.rpc_mtu,
        workload: args.op,
        bs: args.bs,
        qd: args.qd,
        duration: args.duration,
        blocks_per_object,
        prefill: args.prefill,
        verify: args.verify,
        route: args.route,
        read_pct: args.read_pct,
        seed: args.seed,
        ack_log: match &args.ack_log {
            Some(path) => Some(AckLog::open(path)?),
            None => None,
        },
    };
    Ok((config, split_threads(args, cpus.as_deref())))
}

fn checked_cpus(text: &str) -> Result<Vec<usize>, String> {
    let cpus = crate::units::parse_cpu_list(text)?;
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|c| c.id)
        .collect();
    match cpus.iter().find(|cpu| !available.contains(cpu)) {
        Some(cpu) => Err(format!(
            "--cpus: CPU {cpu} is not available to this process (available: {available:?})"
        )),
        None => Ok(cpus),
    }
}

fn split_threads(args: &LoadArgs, cpus: Option<&[usize]>) -> Vec<ThreadPlan> {
    let threads = args.threads as usize;
    (0..threads)
        .map(|index| ThreadPlan {
            index,
            clients: (0..args.clients as usize)
                .filter(|c| c % threads == index)
                .count(),
            objects: (0..u64::from(args.objects))
                .filter(|o| *o as usize % threads == index)
                .collect(),
            cpu: cpus.map(|list| list[index % list.len()]),
        })
        .collect()
}

pub(crate) fn object_name(prefix: &str, index: u64) -> String {
    format!("{prefix}.{index}")
}
