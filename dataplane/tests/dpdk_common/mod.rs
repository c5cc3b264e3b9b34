//! Shared by the DPDK test binaries (each its own process: the EAL starts once per process).
#![allow(dead_code)]

/// EAL arguments for a test: no hugepages, no PCI scan, 256 MiB, one lcore, and a file prefix of
/// its own (a root EAL keeps its runtime files under /var/run/dpdk/<prefix>; two tests sharing
/// one would clash). `--in-memory` would avoid the files but cannot be combined with `--no-huge`.
pub fn eal_args(prefix: &str, vdev: &str) -> Vec<String> {
    eal_args_floating(prefix, vdev)
}

/// As [`eal_args`], for one of two polling processes: the main lcore may run on any CPU
/// (`--lcores 0@(0-N)`). Pinning each process to one CPU starves it on a shared machine where
/// other pinned pollers run (seen here: a process held off its CPU for seconds).
pub fn eal_args_floating(prefix: &str, vdev: &str) -> Vec<String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let lcores = format!("0@(0-{})", cpus - 1);
    let args = [
        "--no-huge",
        "--no-pci",
        "-m",
        "256",
        "--lcores",
        &lcores,
        "--file-prefix",
        prefix,
        "--vdev",
        vdev,
        "--log-level",
        "lib.eal:error",
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// A file prefix unique to this process.
pub fn file_prefix(test: &str) -> String {
    format!("carmine-test-{test}-{}", std::process::id())
}

/// Removes the EAL's runtime directory for `prefix` (best effort: the test outcome is decided).
pub fn remove_runtime_dir(prefix: &str) {
    let base = if is_root() {
        std::path::PathBuf::from("/var/run/dpdk")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| std::path::PathBuf::from(d).join("dpdk"))
            .unwrap_or_else(|| std::path::PathBuf::from("/tmp/dpdk"))
    };
    let _ = std::fs::remove_dir_all(base.join(prefix));
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Starts this test binary again as the other end of a pair (`role_env` set, the socket path
/// passed in `socket_env`).
pub fn spawn_self(role_env: &str, socket_env: &str, socket: &str) -> std::process::Child {
    let exe = std::env::current_exe().expect("own path");
    std::process::Command::new(exe)
        .env(role_env, "client")
        .env(socket_env, socket)
        .spawn()
        .expect("start the client process")
}

/// The core pools a port test gives a `DpdkDatagramPort` (small: a few chunks).
#[cfg(feature = "dpdk")]
pub fn core_pools() -> carmine_dataplane::buffers::CorePools {
    use carmine_dataplane::buffers::{CorePools, PoolSizes};
    CorePools::new(
        0,
        PoolSizes {
            small_size_bytes: 128 << 10,
            small_count: 8,
            large_size_bytes: 1 << 20,
            large_count: 2,
        },
        false,
    )
    .expect("core pools")
}

/// EAL arguments for both ends of a memif pair in one process over `socket`: `net_memif0`
/// (server) and `net_memif1` (client, with `client_extra` devargs, e.g. "zero-copy=yes,"),
/// with single-file segments (what memif's zero-copy client needs; harmless otherwise).
pub fn memif_pair_args(prefix: &str, socket: &str, client_extra: &str) -> Vec<String> {
    let mut args = eal_args(
        prefix,
        &format!("net_memif0,role=server,id=0,socket={socket},bsize=9216"),
    );
    args.push("--vdev".into());
    args.push(format!(
        "net_memif1,role=client,id=0,{client_extra}socket={socket},bsize=9216"
    ));
    args.push("--single-file-segments".into());
    args
}

/// Both ends of a memif pair in this process, over a socket of its own (`memif_pair_args`).
#[cfg(feature = "dpdk")]
pub struct MemifPair {
    pub eal: carmine_dataplane::dpdk::Eal,
    socket: String,
    prefix: String,
}

/// Starts the EAL with a memif pair for `test` (`client_extra`: the client's extra devargs).
/// None, with a SKIP line that says why, where the EAL does not start (CI runs these as root,
/// where it does).
#[cfg(feature = "dpdk")]
pub fn start_memif_pair(test: &str, client_extra: &str) -> Option<MemifPair> {
    let socket = format!("/run/carmine-{test}-{}.sock", std::process::id());
    let prefix = file_prefix(test);
    let args = memif_pair_args(&prefix, &socket, client_extra);
    match carmine_dataplane::dpdk::Eal::init(&args) {
        Ok(eal) => {
            assert_eq!(eal.port_count(), 2, "the memif server and client ports");
            Some(MemifPair {
                eal,
                socket,
                prefix,
            })
        }
        Err(e) => {
            eprintln!("SKIP: EAL does not start here ({e}); args {args:?}");
            None
        }
    }
}

#[cfg(feature = "dpdk")]
impl MemifPair {
    /// Removes the socket and the EAL's runtime files (best effort: the outcome is decided).
    pub fn remove_files(&self) {
        let _ = std::fs::remove_file(&self.socket);
        remove_runtime_dir(&self.prefix);
    }
}
