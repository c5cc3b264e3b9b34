//! `carmine load`'s command line: workloads, transports and their arguments.

use super::*;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Randwrite,
    Randread,
    Seqwrite,
    Seqread,
    Mixed,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Randwrite => "randwrite",
            Workload::Randread => "randread",
            Workload::Seqwrite => "seqwrite",
            Workload::Seqread => "seqread",
            Workload::Mixed => "mixed",
        }
    }

    pub(super) fn sequential(self) -> bool {
        matches!(self, Workload::Seqwrite | Workload::Seqread)
    }
}

/// How requests reach the server.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP connections (the wire frames as a stream).
    Tcp,
    /// The datagram RPC over kernel UDP sockets (`serve --transport udp`).
    Udp,
    /// The datagram RPC over a DPDK port (needs a build with --features dpdk).
    Dpdk,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server address (with --transport udp: the server's --udp address).
    #[arg(long, default_value = "127.0.0.1:6800")]
    pub target: String,
    /// tcp (default), udp (one UDP socket per client, the datagram RPC), or dpdk.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// --transport udp and dpdk: the link MTU the RPC's packets are sized for (1280 to 9000),
    /// the same as the server's `serve --rpc-mtu`.
    #[arg(long, default_value = "9000", value_parser = carmine_dataplane::udp::parse_rpc_mtu)]
    pub rpc_mtu: u16,
    /// Workload: random or sequential writes or reads, or a random read/write mix.
    #[arg(long, value_enum, default_value = "randwrite")]
    pub op: Workload,
    /// Block size of every request, e.g. 4096, 4k, 4KiB, 1MiB.
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per client connection.
    #[arg(long, default_value = "32")]
    pub qd: u32,
    /// TCP connections.
    #[arg(long, default_value = "4")]
    pub clients: u32,
    /// Generator threads; clients and objects are spread over them.
    #[arg(long, default_value = "1")]
    pub threads: u32,
    /// Length of the timed run, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Objects, named "{prefix}.{index}".
    #[arg(long, default_value = "64")]
    pub objects: u32,
    /// Size of each object (a multiple of --bs).
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub object_size: u64,
    /// Write every block of every object once before the timed run.
    #[arg(long)]
    pub prefill: bool,
    /// Check the content of every read against what was written. Over the datagram RPC
    /// (`--transport udp`/`dpdk`) the reply frames' crc32c is checked only with it (their
    /// headers always).
    #[arg(long)]
    pub verify: bool,
    /// Shard-aware client (TCP): ask each connection which server core owns it (HELLO) and send
    /// each timed op only on a connection owned by the core of the op's object, so that no op
    /// crosses the server's rings. Each connection then works on the objects of its core. Needs a
    /// connection on every core the thread's objects live on; otherwise, or against a server
    /// without HELLO (classic mode), the thread runs unrouted and says so.
    #[arg(long)]
    pub route: bool,
    /// Percentage of reads in the mixed workload.
    #[arg(long, default_value = "70")]
    pub read_pct: u8,
    /// Seed of block selection.
    #[arg(long, default_value = "1")]
    pub seed: u64,
    /// Object name prefix.
    #[arg(long, default_value = "obj")]
    pub prefix: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Pin generator threads to these CPUs, e.g. "0" or "0,1".
    #[arg(long)]
    pub cpus: Option<String>,
    /// Append every write sent and every write acknowledged to FILE (the crash tests' oracle;
    /// keeps one write per block in flight, as --verify does).
    #[arg(long, value_name = "FILE")]
    pub ack_log: Option<std::path::PathBuf>,
    /// Run no workload: read back every block FILE (an --ack-log) names and check that each
    /// holds its last acknowledged write (or one sent after it). Exit status 1 on any loss.
    #[arg(long, value_name = "FILE", conflicts_with = "ack_log")]
    pub check: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub dpdk: DpdkArgs,
}

/// `--transport dpdk` settings (the target is the server's --udp address on the DPDK link).
#[derive(clap::Args, Debug, Clone)]
pub struct DpdkArgs {
    /// EAL arguments with --transport dpdk, split at spaces, e.g. --dpdk-args="--no-huge --no-pci -m 256 --file-prefix load --vdev net_memif0,role=client,socket=/run/m.sock".
    #[arg(long = "dpdk-args", default_value = "", allow_hyphen_values = true)]
    pub dpdk_args: String,
    /// The DPDK port (ethdev id) to send from.
    #[arg(long = "dpdk-port", default_value = "0")]
    pub dpdk_port: u16,
    /// This generator's IPv4 address on the DPDK link (the server learns the MAC from frames).
    #[arg(long = "dpdk-ip", default_value = "10.77.0.2")]
    pub dpdk_ip: std::net::Ipv4Addr,
    /// With --transport dpdk: the server's TCP address (--listen) to fetch its STATUS from after the run (without it the report has no server section).
    #[arg(long = "status-target")]
    pub status_target: Option<String>,
}

impl Default for DpdkArgs {
    fn default() -> Self {
        DpdkArgs {
            dpdk_args: String::new(),
            dpdk_port: 0,
            dpdk_ip: std::net::Ipv4Addr::new(10, 77, 0, 2),
            status_target: None,
        }
    }
}
