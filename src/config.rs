//! `carmine serve` configuration: defaults, then a TOML file (`--config`), then flags.
//! Every option exists in all three places under one name (`pg_count` in TOML, `--pg-count`
//! as a flag), declared once below.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use carmine_dataplane::reactor::{Coalesce, IdlePolicy};
use carmine_dataplane::tcp::TcpIo;
use carmine_dataplane::udp::parse_rpc_mtu;
use carmine_dataplane::wire::Limits;

use crate::osd::placement::PlacementMode;
use crate::units::{parse_cpu_list, parse_duration, parse_size};

/// Classic mode: most threads of one kind (messengers, shards, workers in all).
const CLASSIC_THREADS_MAX: usize = 64;

fn parse_u32(text: &str) -> Result<u32, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("expected a whole number, got {text:?}"))
}
fn parse_path(text: &str) -> Result<PathBuf, String> {
    match text.trim() {
        "" => Err("expected a path".into()),
        path => Ok(PathBuf::from(path)),
    }
}
fn parse_text(text: &str) -> Result<String, String> {
    Ok(text.to_string())
}

fn parse_u16(text: &str) -> Result<u16, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a number from 0 to 65535"))
}

fn parse_bool(text: &str) -> Result<bool, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("expected true or false, got {text:?}"))
}
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("expected IP:PORT (e.g. 127.0.0.1:6800), got {text:?}"))
}
fn parse_optional_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.trim() == "off" {
        return Ok(None);
    }
    parse_addr(text).map(Some)
}
fn parse_cpus(text: &str) -> Result<Option<Vec<usize>>, String> {
    if text.trim() == "auto" {
        return Ok(None);
    }
    parse_cpu_list(text).map(Some)
}
/// "auto" (0: derived from --cores) or a whole number.
fn parse_auto_u32(text: &str) -> Result<u32, String> {
    if text.trim() == "auto" {
        return Ok(0);
    }
    parse_u32(text)
}
fn parse_coalesce(text: &str) -> Result<Coalesce, String> {
    Coalesce::parse(text, parse_duration)
}
fn parse_choice<'a>(choices: &'a [&'a str]) -> impl Fn(&str) -> Result<String, String> + 'a {
    move |text| {
        if choices.contains(&text) {
            Ok(text.to_string())
        } else {
            Err(format!("expected one of {choices:?}, got {text:?}"))
        }
    }
}

macro_rules! serve_options {
    ($( #[doc = $doc:literal] $name:ident : $ty:ty = $default:expr, $parse:expr; )*) => {
        /// The resolved configuration of `carmine serve`.
        #[derive(Clone, Debug)]
        pub struct ServeConfig { $( #[doc = $doc] pub $name: $ty, )* }

        impl Default for ServeConfig {
            fn default() -> Self {
                ServeConfig { $( $name: ($parse)($default).expect("default parses"), )* }
            }
        }

        /// Flags of `carmine serve`. Each overrides the same key of the `--config` file.
        #[derive(clap::Args, Clone, Debug, Default)]
        pub struct ServeArgs {
            /// TOML file with any of the options below (keys in snake_case, e.g. pg_count = 256).
            #[arg(long)]
            pub config: Option<PathBuf>,
            $( #[doc = $doc] #[doc = concat!("[default: ", $default, "]")] #[arg(long, value_name = "VALUE")] pub $name: Option<String>, )*
        }

        impl ServeConfig {
            fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
                match key {
                    $( stringify!($name) => {
                        self.$name = ($parse)(value).map_err(|e| format!("{}: {e}", stringify!($name)))?;
                        Ok(())
                    } )*
                    other => Err(format!("unknown option {other:?}")),
                }
            }

            fn apply_args(&mut self, args: &ServeArgs) -> Result<(), String> {
                $( if let Some(value) = args.$name.as_deref() { self.set(stringify!($name), value)?; } )*
                Ok(())
            }
        }
    };
}

serve_options! {
    /// Execution model: rtc (one pinned run-to-completion thread per core) or classic (messenger threads, a sharded op queue, worker threads with PG locks, a finisher: the classic OSD's shape, as a baseline).
    mode: String = "rtc", parse_choice(&["rtc", "classic"]);
    /// Address to accept clients on (loopback by default: expose deliberately).
    listen: SocketAddr = "127.0.0.1:6800", parse_addr;
    /// Client transport besides TCP (which always serves --listen): tcp (only that), udp (the datagram RPC on kernel UDP sockets at --udp, one SO_REUSEPORT socket per core), or dpdk (the datagram RPC on a DPDK port, answering for --udp's IPv4 address and port; needs a build with --features dpdk).
    transport: String = "tcp", parse_choice(&["tcp", "udp", "dpdk"]);
    /// How the reactors' TCP talks to the kernel (mode rtc): epoll (edge-triggered epoll, recv and writev calls) or uring (one io_uring per core, no SQPOLL: receives and sends posted per pass and one io_uring_enter per pass submits and reaps them; falls back to epoll, with a log line, where the kernel or a seccomp profile refuses io_uring). uring made fewer system calls but cost more CPU per op on loopback than epoll (ARCHITECTURE.md, "Choices and why"): an experiment, off by default.
    tcp_io: String = "epoll", parse_choice(&["epoll", "uring"]);
    /// Address of the datagram RPC with --transport udp (port 0: any free port, logged at start), or the IPv4 address and UDP port the DPDK port answers for (ARP included) with --transport dpdk.
    udp: SocketAddr = "127.0.0.1:6800", parse_addr;
    /// Link MTU the datagram RPC's packets are sized for (--transport udp and dpdk), 1280 to 9000: 9000 (jumbo frames, loopback, memif) makes a 4 KiB request one packet; 1500 suits an ordinary Ethernet link or net_tap (three packets per 4 KiB). Clients must be given the same (`carmine load --rpc-mtu`). With dpdk, the port's MTU is raised to it.
    rpc_mtu: u16 = "9000", parse_rpc_mtu;
    /// Test knob for --transport udp and dpdk: drop every Nth datagram received (0: none), so that loss and resends run end to end.
    udp_drop_every: u32 = "0", parse_u32;
    /// EAL arguments for --transport dpdk, split at spaces, e.g. "--no-huge --no-pci -m 256 --file-prefix srv --vdev net_memif0,role=server,socket=/run/m.sock". With `role=client,zero-copy=yes` the memif peer (which must be up first: a memif client connects once, at start) writes requests straight into this server's rx rooms and reads replies from its memory, as a NIC's DMA would: the server copies no frame, and 4 KiB reads of the memory store go out from the store's own bytes (its objects then come from the EAL's heap: size -m for them; scripts/dpdk-bench.sh, MEMIF_ZC=1).
    dpdk_args: String = "", parse_text;
    /// The DPDK port (ethdev id) --transport dpdk serves on.
    dpdk_port: u16 = "0", parse_u16;
    /// --transport dpdk: send reply payloads of 1 KiB and more from the response buffer, attached to the frame, instead of copying them into the mbuf. Only on ports that receive in place (memif, net_ring). Off by default: memif copies every frame into its ring anyway and takes a slower path for two-segment frames, so on memif it costs more instructions than the copy it saves; it is for NICs that gather by DMA (once pool memory is registered for DMA, which is not wired).
    dpdk_tx_in_place: bool = "false", parse_bool;
    /// Serve block images over NBD on this address as well ("off": not at all).
    nbd: Option<SocketAddr> = "off", parse_optional_addr;
    /// Reactors (one pinned thread per core).
    cores: u32 = "1", parse_u32;
    /// CPUs to pin reactors to, e.g. "2,3" or "2-3"; "auto" takes the highest-numbered CPUs, leaving CPU 0 to the OS and load generators.
    cpus: Option<Vec<usize>> = "auto", parse_cpus;
    /// Object store: segment (SeaStore's role: a log-structured store on --device, one shard per core, or per classic shard), memory (CyanStore's role: RAM only, lost at exit), or auto (segment).
    store: String = "auto", parse_choice(&["auto", "memory", "segment"]);
    /// Memory store capacity, split evenly over the cores.
    memory_capacity: u64 = "4GiB", parse_size;
    /// Segment store: file or block device (a missing file is created sparse, of --device-size, and formatted), or nvme:PCI_ADDRESS (Carmine's NVMe driver over VFIO; run carmine mkfs on it first), or spdk:TRANSPORT_ID (SPDK's NVMe driver, feature spdk; e.g. "spdk:trtype=PCIe traddr=0000:00:04.0").
    device: PathBuf = "carmine.img", parse_path;
    /// Segment store: size of a device file created on first run.
    device_size: u64 = "4GiB", parse_size;
    /// Segment store: segment size when formatting a new device file.
    segment_size: u64 = "16MiB", parse_size;
    /// Segment store: io_uring queue depth per core.
    queue_depth: u32 = "256", parse_u32;
    /// Placement: pg (object -> PG -> core, ordered by PG) or flex (object -> core, no PG log).
    placement: String = "pg", parse_choice(&["pg", "flex"]);
    /// Placement groups (pg placement).
    pg_count: u32 = "128", parse_u32;
    /// Idle policy: spin (poll forever; the appliance default) or adaptive (park in the kernel when idle).
    idle: String = "spin", parse_choice(&["spin", "adaptive"]);
    /// Adaptive idle: how long a core polls without work before it parks.
    park_after: Duration = "200us", parse_duration;
    /// Pass coalescing: after a pass with a little work (under 64 units), sleep a short pause so that requests and replies accumulate; fewer system calls per op for that much added latency. auto: pause 20us, but only while the load detector sees pauses bring back batches (many requests in flight; never for a client waiting on each reply) and, on a core that spins (--idle spin), only while pausing does not slow the core's work down; a duration such as 20us: always that pause; off (or 0us): never.
    coalesce: Coalesce = "auto", parse_coalesce;
    /// Null replication hook: replica acks every write waits for.
    replicas: u32 = "0", parse_u32;
    /// Null replication hook: time until the simulated replica acks arrive (a timer; the core keeps working).
    replication_cost: Duration = "0us", parse_duration;
    /// Null snapshot hook: CPU time spent per write (busy work on the reactor).
    snapshot_cost: Duration = "0us", parse_duration;
    /// Largest object id accepted, in bytes (checked from the header, before buffering).
    max_oid_len: u64 = "256", parse_size;
    /// Largest request payload accepted (checked from the header, before buffering).
    max_payload: u64 = "4160KiB", parse_size;
    /// Most sub-ops in one request (at most 16).
    max_sub_ops: u32 = "16", parse_u32;
    /// Connections per core; more are refused.
    max_connections: u32 = "4096", parse_u32;
    /// Requests per connection past parsing and not yet answered; beyond it the connection is not read.
    inflight_per_connection: u32 = "128", parse_u32;
    /// Op slots per core (ops executing here, and ops sent to other cores: each this many).
    op_slots: u32 = "4096", parse_u32;
    /// Size of receive chunks and ordinary output buffers.
    chunk_size: u64 = "128KiB", parse_size;
    /// Receive chunks / output buffers per core, allocated at start-up.
    chunk_count: u32 = "512", parse_u32;
    /// Large buffers per core (frames or outputs bigger than a chunk), each max_payload + headers.
    large_buffer_count: u32 = "8", parse_u32;
    /// Back buffer pools with hugepages when reserved (falls back to normal pages).
    hugepages: bool = "false", parse_bool;
    /// Classic mode: messenger threads, each with its own epoll set of connections ("auto": min(cores, 3), Ceph's ms_async_op_threads).
    classic_messengers: u32 = "auto", parse_auto_u32;
    /// Classic mode: op queue shards, each a locked queue with its own workers and store ("auto": cores).
    classic_shards: u32 = "auto", parse_auto_u32;
    /// Classic mode: worker threads per shard (Ceph's osd_op_num_threads_per_shard).
    classic_workers_per_shard: u32 = "1", parse_u32;
}

impl ServeConfig {
    /// Defaults, then the file named by `--config`, then the flags.
    pub fn resolve(args: &ServeArgs) -> Result<ServeConfig, String> {
        let mut config = ServeConfig::default();
        if let Some(path) = &args.config {
            config.apply_file(path)?;
        }
        config.apply_args(args)?;
        if config.store == "auto" {
            config.store = "segment".into();
        }
        config.validate()?;
        Ok(config)
    }

    fn apply_file(&mut self, path: &PathBuf) -> Result<(), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        for (key, value) in &table {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "{}: {key}: unsupported value {other}",
                        path.display()
                    ))
                }
            };
            self.set(key, &text)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.cores == 0 || self.cores > 64 {
            return Err("cores must be 1..=64".into());
        }
        if let Some(cpus) = &self.cpus {
            if cpus.len() < self.cores as usize {
                return Err(format!(
                    "cpus lists {} CPUs for {} cores",
                    cpus.len(),
                    self.cores
                ));
            }
        }
        if self.placement == "pg" && self.pg_count < self.cores {
            return Err(format!(
                "pg_count {} is less than cores {}: every core needs a PG",
                self.pg_count, self.cores
            ));
        }
        self.limits().validate()?;
        if self.chunk_size % 4096 != 0 || self.chunk_size < 64 << 10 {
            return Err("chunk_size must be a multiple of 4KiB and at least 64KiB".into());
        }
        if self.op_slots == 0 || self.chunk_count < 4 || self.large_buffer_count < 2 {
            // Receive leaves one buffer of each class for op outputs (`RX_LEAVES_FREE`).
            return Err(
                "op_slots must be positive, chunk_count >= 4 and large_buffer_count >= 2".into(),
            );
        }
        if self.inflight_per_connection == 0 || self.max_connections == 0 {
            return Err("inflight_per_connection and max_connections must be positive".into());
        }
        if self.tcp_io != "epoll" && self.mode == "classic" {
            return Err(
                "tcp_io uring: the io_uring TCP path runs on the reactors (mode rtc) only".into(),
            );
        }
        if self.transport != "tcp" && self.mode == "classic" {
            return Err("transport: udp and dpdk run on the reactors (mode rtc) only".into());
        }
        if self.transport == "dpdk" {
            if !cfg!(feature = "dpdk") {
                return Err("transport dpdk: this carmine was built without DPDK; install libdpdk-dev and clang and build with `cargo build --release --features dpdk`".into());
            }
            if !self.udp.is_ipv4() || self.udp.port() == 0 {
                return Err(format!(
                    "transport dpdk: --udp {} must be an IPv4 address with a port (the DPDK port answers for it)",
                    self.udp
                ));
            }
            if self.dpdk_tx_in_place && self.memif_zero_copy() {
                return Err(
                    "dpdk_tx_in_place: a zero-copy memif client (zero-copy=yes) sends \
                    only from DPDK's own memory, and attached payloads lie in Carmine's pools; \
                    leave --dpdk-tx-in-place off"
                        .into(),
                );
            }
        }
        if self.nbd.is_some() && self.mode == "classic" {
            return Err("nbd: the NBD frontend runs on the reactors (mode rtc) only".into());
        }
        self.validate_classic()
    }

    fn validate_classic(&self) -> Result<(), String> {
        let (messengers, shards) = (self.classic_messenger_count(), self.classic_shard_count());
        if messengers > CLASSIC_THREADS_MAX || shards > CLASSIC_THREADS_MAX {
            return Err(format!(
                "classic_messengers and classic_shards must be at most {CLASSIC_THREADS_MAX}"
            ));
        }
        let workers = self.classic_workers_per_shard as usize;
        if workers == 0 || workers * shards > CLASSIC_THREADS_MAX {
            return Err(format!(
                "classic_workers_per_shard must be 1.. with at most {CLASSIC_THREADS_MAX} workers in all"
            ));
        }
        if self.placement == "pg" && self.pg_count < shards as u32 {
            return Err(format!(
                "pg_count {} is less than classic_shards {shards}: every shard needs a PG",
                self.pg_count
            ));
        }
        Ok(())
    }

    /// The DPDK port is a zero-copy memif client (`zero-copy=yes` in its devargs): its peer
    /// reads replies in place, from EAL memory only.
    pub fn memif_zero_copy(&self) -> bool {
        self.dpdk_args.contains("zero-copy=yes")
    }

    pub fn limits(&self) -> Limits {
        Limits {
            oid_len_max: u16::try_from(self.max_oid_len).unwrap_or(u16::MAX),
            payload_len_max: u32::try_from(self.max_payload).unwrap_or(u32::MAX),
            sub_ops_max: u16::try_from(self.max_sub_ops).unwrap_or(u16::MAX),
        }
    }

    /// Classic mode: messenger threads (auto: one per core, at most 3 as in Ceph).
    pub fn classic_messenger_count(&self) -> usize {
        match self.classic_messengers {
            0 => self.cores.min(3) as usize,
            n => n as usize,
        }
    }

    /// Classic mode: op queue shards (auto: one per core).
    /// Store shards this server runs: one per reactor, or one per classic op-queue shard. A
    /// segment-store device is formatted for (and must match) this count.
    pub fn store_shard_count(&self) -> u32 {
        if self.mode == "classic" {
            self.classic_shard_count() as u32
        } else {
            self.cores
        }
    }

    pub fn classic_shard_count(&self) -> usize {
        match self.classic_shards {
            0 => self.cores as usize,
            n => n as usize,
        }
    }

    pub fn placement_mode(&self) -> PlacementMode {
        match self.placement.as_str() {
            "flex" => PlacementMode::Flex,
            _ => PlacementMode::Pg {
                pg_count: self.pg_count,
            },
        }
    }

    pub fn idle_policy(&self) -> IdlePolicy {
        IdlePolicy::parse(&self.idle, self.park_after).expect("validated choice")
    }

    pub fn coalesce(&self) -> Coalesce {
        self.coalesce
    }

    pub fn tcp_io(&self) -> TcpIo {
        TcpIo::parse(&self.tcp_io).expect("validated choice")
    }

    /// Large buffers hold the largest frame the limits admit, rounded up to 4 KiB.
    pub fn large_buffer_size(&self) -> usize {
        self.limits().frame_len_max().div_ceil(4096) * 4096
    }

    /// CPUs for the reactors: the configured list, or the highest-numbered ones.
    pub fn reactor_cpus(&self) -> Vec<usize> {
        let cores = self.cores as usize;
        match &self.cpus {
            Some(cpus) => cpus[..cores].to_vec(),
            None => {
                let online = std::thread::available_parallelism().map_or(1, |n| n.get());
                (0..cores)
                    .map(|i| (online + i).saturating_sub(cores) % online)
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory removed when the test ends, pass or fail.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
        fn join(&self, file: &str) -> std::path::PathBuf {
            self.0.join(file)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn tcp_io_is_epoll_by_default_uring_on_request_and_refused_in_classic_mode() {
        let resolve = |mode: &str, tcp_io: Option<&str>| {
            ServeConfig::resolve(&ServeArgs {
                mode: Some(mode.into()),
                tcp_io: tcp_io.map(Into::into),
                ..ServeArgs::default()
            })
        };
        assert_eq!(resolve("rtc", None).unwrap().tcp_io(), TcpIo::Epoll);
        assert_eq!(
            resolve("rtc", Some("uring")).unwrap().tcp_io(),
            TcpIo::Uring
        );
        let error = resolve("classic", Some("uring")).unwrap_err();
        assert!(error.contains("rtc) only"), "{error}");
        let error = resolve("rtc", Some("io_uring")).unwrap_err();
        assert!(
            error.contains("epoll") && error.contains("uring"),
            "{error}"
        );
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = TempDir::new("carmine-config");
        let path = dir.join("carmine.toml");
        std::fs::write(
            &path,
            "pg_count = 256\ncores = 2\nidle = \"adaptive\"\nmemory_capacity = \"1GiB\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            cores: Some("1".into()),
            ..ServeArgs::default()
        };
        let config = ServeConfig::resolve(&args).unwrap();
        assert_eq!(config.pg_count, 256, "from the file");
        assert_eq!(config.cores, 1, "the flag wins");
        assert_eq!(config.memory_capacity, 1 << 30);
        assert_eq!(
            config.idle_policy(),
            IdlePolicy::Adaptive {
                park_after: Duration::from_micros(200)
            }
        );
        assert_eq!(config.listen, "127.0.0.1:6800".parse().unwrap(), "default");
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let args = ServeArgs {
            placement: Some("random".into()),
            ..ServeArgs::default()
        };
        let error = ServeConfig::resolve(&args).unwrap_err();
        assert!(
            error.contains("placement") && error.contains("random"),
            "{error}"
        );
        let args = ServeArgs {
            max_sub_ops: Some("64".into()),
            ..ServeArgs::default()
        };
        assert!(ServeConfig::resolve(&args)
            .unwrap_err()
            .contains("sub_ops_max"));
        let dir = TempDir::new("carmine-config-bad");
        let path = dir.join("typo.toml");
        std::fs::write(&path, "pg_cuont = 3\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        assert!(ServeConfig::resolve(&args)
            .unwrap_err()
            .contains("unknown option \"pg_cuont\""));
    }

    #[test]
    fn coalescing_is_auto_by_default_and_off_or_fixed_on_request() {
        assert_eq!(
            ServeConfig::default().coalesce(),
            Coalesce::Auto(Coalesce::AUTO_PAUSE)
        );
        let with = |value: &str| {
            ServeConfig::resolve(&ServeArgs {
                coalesce: Some(value.into()),
                ..ServeArgs::default()
            })
            .map(|config| config.coalesce())
        };
        assert_eq!(with("off"), Ok(Coalesce::Off));
        assert_eq!(with("0us"), Ok(Coalesce::Off));
        assert_eq!(with("20us"), Ok(Coalesce::Fixed(Duration::from_micros(20))));
        let error = with("sometimes").unwrap_err();
        assert!(
            error.contains("coalesce") && error.contains("off, auto"),
            "{error}"
        );
    }

    #[test]
    fn auto_cpus_take_the_highest() {
        let config = ServeConfig::default();
        let cpus = config.reactor_cpus();
        let online = std::thread::available_parallelism().unwrap().get();
        assert_eq!(cpus, vec![online - 1]);
        assert!(config.large_buffer_size() >= config.limits().frame_len_max());
    }
}
