//! Starting and stopping a server: one pinned reactor thread per core, the rings between
//! them, and the listener on core 0 (which spreads accepted connections over the cores).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use carmine_dataplane::buffers::{CorePools, PoolSizes};
use carmine_dataplane::reactor::{self, Waker};
use carmine_dataplane::ring::{self, CoreLinks};
use carmine_dataplane::tcp::{TcpIo, TcpTransport, TransportConfig};
use carmine_dataplane::udp::{self as udp_transport, RpcNet, UdpRpcTransport};
use carmine_storage::queue_pair::QueuePair;
use carmine_storage::segment::SegmentStore;
use carmine_storage::{MemoryStore, ObjectStore, UringQueuePair};
use serde_json::json;

use crate::config::ServeConfig;
use crate::nbd::frontend::NbdFrontend;
use crate::osd::core::{CoreSetup, Hooks, OsdCore, Shutdown};
use crate::osd::message::Message;
use crate::osd::placement::Placement;
use crate::status::StatusBoard;

/// Messages in flight from one core to another before the sender holds them back.
const RING_CAPACITY: usize = 1024;

pub struct Server {
    pub addr: SocketAddr,
    /// Where the datagram RPC listens (`--transport udp`).
    pub udp_addr: Option<SocketAddr>,
    /// Where the NBD frontend listens, when enabled.
    pub nbd_addr: Option<SocketAddr>,
    pub cpus: Vec<usize>,
    pub board: Arc<StatusBoard>,
    shutdown: Arc<Shutdown>,
    wakers: Arc<[Waker]>,
    threads: Vec<JoinHandle<Result<CorePools, String>>>,
}

pub(crate) fn describe(
    config: &ServeConfig,
    addr: SocketAddr,
    cpus: &[usize],
) -> serde_json::Value {
    json!({
        "mode": config.mode,
        "listen": addr.to_string(),
        "cores": config.cores,
        "cpus": cpus,
        "store": config.store,
        "memory_capacity": config.memory_capacity,
        "device": config.device.display().to_string(),
        "placement": config.placement,
        "pg_count": config.pg_count,
        "idle": config.idle,
        "replicas": config.replicas,
        "replication_cost_us": config.replication_cost.as_micros() as u64,
        "snapshot_cost_us": config.snapshot_cost.as_micros() as u64,
        "max_oid_len": config.max_oid_len,
        "max_payload": config.max_payload,
        "max_sub_ops": config.max_sub_ops,
        "op_slots": config.op_slots,
        "chunk_size": config.chunk_size,
        "chunk_count": config.chunk_count,
        "large_buffer_count": config.large_buffer_count,
        // `tcp-uring` as asked for: a core whose kernel refused io_uring logs that it uses epoll.
        "transport": match config.transport.as_str() {
            "udp" => format!("tcp-{}+udp-rpc", tcp_io_name(config)),
            "dpdk" => format!("tcp-{}+dpdk-rpc", tcp_io_name(config)),
            _ => format!("tcp-{}", tcp_io_name(config)),
        },
        "nbd": config.nbd.map(|a| a.to_string()),
    })
}

fn tcp_io_name(config: &ServeConfig) -> &'static str {
    match config.tcp_io() {
        TcpIo::Epoll => "epoll",
        TcpIo::Uring => "uring",
    }
}

struct CoreParts {
    index: usize,
    links: CoreLinks<Message>,
    listener: Option<TcpListener>,
    nbd_listener: Option<TcpListener>,
    udp_socket: Option<std::net::UdpSocket>,
    /// This core's queue pair of the DPDK port (`--transport dpdk`; core 0 only when the port
    /// has one queue).
    #[cfg(feature = "dpdk")]
    dpdk_queue: Option<carmine_dataplane::dpdk::net::DpdkDatagramPort>,
}

fn build_core(
    config: &ServeConfig,
    #[allow(unused_mut)] mut parts: CoreParts, // a DPDK queue gives up its rooms below
    wakers: Arc<[Waker]>,
    board: Arc<StatusBoard>,
    shutdown: Arc<Shutdown>,
    alloc_counter: fn() -> u64,
) -> Result<OsdCore, String> {
    let index = parts.index;
    let cores = config.cores as usize;
    let transport_config = TransportConfig {
        limits: config.limits(),
        inflight_per_connection_max: config.inflight_per_connection,
        connections_max: config.max_connections,
        io: config.tcp_io(),
    };
    let mut transport = TcpTransport::new(index, transport_config, wakers[index].fd())
        .map_err(|e| format!("core {index}: transport: {e}"))?;
    if let Some(listener) = parts.listener {
        transport
            .listen(listener)
            .map_err(|e| format!("core {index}: listener: {e}"))?;
    }
    let sizes = PoolSizes {
        small_size_bytes: config.chunk_size as usize,
        small_count: config.chunk_count,
        large_size_bytes: config.large_buffer_size(),
        large_count: config.large_buffer_count,
    };
    #[allow(unused_mut)] // mutated only with feature dpdk
    let mut pools = CorePools::new(index, sizes, config.hugepages)
        .map_err(|e| format!("core {index}: buffer pools: {e}"))?;
    #[cfg(feature = "dpdk")]
    if let Some(nic) = parts.dpdk_queue.as_mut().and_then(|q| q.take_nic_pool()) {
        pools.attach_nic(nic); // the rooms this core's rx queue receives into
    }
    if config.hugepages && !pools.small.hugepage_backed() {
        log::warn!("core {index}: hugepages requested but not reserved; buffers use normal pages");
    }
    let store = open_store(config, index)?;
    let nbd = match config.nbd {
        None => None,
        Some(_) => {
            let mut nbd =
                NbdFrontend::new(index, cores, config.chunk_size as usize, config.chunk_count)
                    .map_err(|e| format!("core {index}: NBD frontend: {e}"))?;
            if let Some(listener) = parts.nbd_listener {
                nbd.listen(listener)
                    .map_err(|e| format!("core {index}: NBD listener: {e}"))?;
            }
            Some(nbd)
        }
    };
    let setup = CoreSetup {
        index,
        cores,
        placement: Placement::new(config.placement_mode(), cores),
        exec_slots: config.op_slots,
        client_slots: config.op_slots,
        hooks: Hooks {
            replicas: config.replicas,
            replication_cost: config.replication_cost,
            snapshot_cost: config.snapshot_cost,
        },
        alloc_counter,
    };
    let core = OsdCore::new(
        setup,
        transport,
        pools,
        store,
        parts.links,
        wakers,
        board,
        shutdown,
    );
    let rpc: Option<Box<dyn RpcNet>> = match parts.udp_socket {
        None => None,
        Some(socket) => Some(Box::new(
            UdpRpcTransport::new(
                index,
                socket,
                config.limits(),
                config.udp_drop_every,
                config.rpc_mtu,
            )
            .map_err(|e| format!("core {index}: UDP transport: {e}"))?,
        )),
    };
    #[cfg(feature = "dpdk")]
    let rpc: Option<Box<dyn RpcNet>> = match parts.dpdk_queue {
        None => rpc,
        Some(queue) => {
            match carmine_dataplane::dpdk::register_current_thread() {
                Ok(lcore) => log::debug!("core {index}: DPDK lcore {lcore}"),
                Err(e) => log::warn!("core {index}: {e}; its mbuf pool runs without a cache"),
            }
            Some(Box::new(carmine_dataplane::udp::RpcTransport::with_port(
                index,
                queue,
                config.limits(),
                config.udp_drop_every,
                config.rpc_mtu,
            )))
        }
    };
    let core = match rpc {
        None => core,
        Some(rpc) => core
            .with_udp(rpc)
            .map_err(|e| format!("core {index}: datagram transport: {e}"))?,
    };
    match nbd {
        None => Ok(core),
        Some(nbd) => core
            .with_nbd(nbd)
            .map_err(|e| format!("core {index}: NBD frontend: {e}")),
    }
}

/// Starts the EAL (once per process) and the DPDK port of `--transport dpdk`: one rx/tx queue
/// pair per core when the port spreads IPv4/UDP flows by RSS and has the queues, else one queue
/// (core 0's; the other cores get another core's PGs' ops over the one-hop ring).
#[cfg(feature = "dpdk")]
fn open_dpdk(
    config: &ServeConfig,
) -> Result<Vec<carmine_dataplane::dpdk::net::DpdkDatagramPort>, String> {
    use carmine_dataplane::dpdk::{net, Eal, Port};
    let args: Vec<&str> = config.dpdk_args.split_whitespace().collect();
    let eal = Eal::init(&args).map_err(|e| format!("DPDK EAL ({args:?}): {e}"))?;
    let port = config.dpdk_port;
    let (queues_max, rss) = Port::queue_capabilities(&eal, port).map_err(|e| {
        format!(
            "DPDK port {port} ({} ports found; pass one with --dpdk-args \"--vdev ...\" or a \
             bound NIC): {e}",
            eal.port_count()
        )
    })?;
    let cores = config.cores as u16;
    let queue_count = if cores > 1 && rss && queues_max >= cores {
        cores
    } else {
        1
    };
    if queue_count < cores {
        log::info!(
            "DPDK port {port}: one queue (RSS for IPv4/UDP: {rss}, queues: {queues_max}); core 0 \
             receives every request, other cores' PGs are reached over the rings"
        );
    }
    let std::net::SocketAddr::V4(addr) = config.udp else {
        return Err("--udp must be IPv4 for --transport dpdk".into());
    };
    // A zero-copy memif client's peer reads replies where they lie: the memory store's
    // objects then come from the EAL's heap (large allocations, `dpdk::heap`), so that
    // reads are sent from them in place.
    let zero_copy = config.memif_zero_copy();
    if zero_copy {
        carmine_dataplane::dpdk::heap::enable(&eal);
        log::info!(
            "DPDK port {port}: zero-copy memif: replies from the memory store are sent where \
             they lie (objects in the EAL's memory: size -m for them)"
        );
    }
    let opened = net::open(
        &eal,
        port,
        queue_count,
        *addr.ip(),
        addr.port(),
        "carmine-rx",
        net::InPlace {
            rx: true, // requests are read from the mbufs' rooms
            tx: config.dpdk_tx_in_place,
            tx_store: zero_copy,
        },
        config.rpc_mtu,
    )
    .map_err(|e| {
        // memif's client role connects to its server's socket when the port starts, once.
        let hint = if config.dpdk_args.contains("role=client") {
            " (a memif client port connects to its server's socket when it starts: is the \
             peer up, with its port started?)"
        } else {
            ""
        };
        format!("DPDK port {port}: {e}{hint}")
    })?;
    let mac = opened.mac.0;
    log::info!(
        "DPDK port {port}: {queue_count} queue(s), MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, \
         MTU {} (RPC packets sized for {}), answering for {addr}",
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        opened.mtu,
        config.rpc_mtu
    );
    Ok(opened.queues)
}

/// Core `index`'s store: its share of the memory store, or its shard of the segment store.
fn open_store(config: &ServeConfig, index: usize) -> Result<Box<dyn ObjectStore>, String> {
    if config.store != "segment" {
        let cores = config.cores as u64;
        return Ok(Box::new(MemoryStore::new(config.memory_capacity / cores)));
    }
    let path = &config.device;
    if let Some(address) = crate::device::nvme_address(path) {
        // Carmine's NVMe driver: one I/O queue pair per core on a controller shared by all.
        let qp = crate::device::nvme_queue_pair(address, config.queue_depth)
            .map_err(|e| format!("core {index}: {e}"))?;
        let store = SegmentStore::mount(qp, index as u32)
            .map_err(|e| format!("core {index}: mounting {}: {e}", path.display()))?;
        check_mounted_shard(&store, config, index, config.cores)?;
        return Ok(Box::new(store));
    }
    if let Some(transport_id) = crate::device::spdk_transport_id(path) {
        // SPDK's NVMe driver: one I/O queue pair per core on a controller shared by all.
        #[cfg(feature = "spdk")]
        {
            let qp = crate::device::spdk_queue_pair(transport_id, config.queue_depth)
                .map_err(|e| format!("core {index}: {e}"))?;
            let store = SegmentStore::mount(qp, index as u32)
                .map_err(|e| format!("core {index}: mounting {}: {e}", path.display()))?;
            check_mounted_shard(&store, config, index, config.cores)?;
            return Ok(Box::new(store));
        }
        #[cfg(not(feature = "spdk"))]
        return Err(crate::device::spdk_not_built(transport_id));
    }
    Ok(Box::new(open_segment_shard(config, index, config.cores)?))
}

/// Mounts shard `index` of the segment store on `config.device` and locks it for this
/// process; `shards` is how many shards this server runs (the device must have been formatted
/// for as many).
pub(crate) fn open_segment_shard(
    config: &ServeConfig,
    index: usize,
    shards: u32,
) -> Result<SegmentStore<UringQueuePair>, String> {
    let path = &config.device;
    if crate::device::is_user_space_device(path) {
        return Err(format!(
            "{}: classic mode drives files and block devices only (its store threads sleep on \
             an io_uring eventfd; NVMe and SPDK queue pairs are polled): use --mode rtc",
            path.display()
        ));
    }
    let size = crate::device::device_size(path)?;
    let qp = UringQueuePair::open(path, 0, size, config.queue_depth)
        .map_err(|e| format!("core {index}: {}: {e}", path.display()))?;
    let mut store = SegmentStore::mount(qp, index as u32)
        .map_err(|e| format!("core {index}: mounting {}: {e}", path.display()))?;
    let sb = *store.superblock();
    crate::device::lock_shard(store.queue_pair(), &sb, index as u32)?;
    check_mounted_shard(&store, config, index, shards)?;
    Ok(store)
}

/// Checks a mounted shard against the server's shard count and logs it.
fn check_mounted_shard<Q: QueuePair>(
    store: &SegmentStore<Q>,
    config: &ServeConfig,
    index: usize,
    shards: u32,
) -> Result<(), String> {
    let path = &config.device;
    let sb = *store.superblock();
    if sb.shard_count != shards {
        return Err(format!(
            "{} was formatted for {} core(s), this server runs {}: use --cores {} (or mkfs it again, losing its data)",
            path.display(),
            sb.shard_count,
            shards,
            sb.shard_count
        ));
    }
    let stats = store.segment_stats();
    log::info!(
        "core {index}: mounted shard {index} of {}: {} objects, {} free segments of {} MiB",
        path.display(),
        store.metadata().object_count(),
        stats.free_segments,
        sb.segment_size >> 20
    );
    Ok(())
}

/// Raises the open-file soft limit to the hard limit: each connection is a descriptor, and the
/// usual soft default (1024) is far below `max_connections`.
pub(crate) fn raise_open_file_limit(config: &ServeConfig) {
    let wanted = u64::from(config.max_connections) * u64::from(config.cores) + 64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= wanted {
            return;
        }
        limit.rlim_cur = limit.rlim_max.min(wanted);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    if limit.rlim_cur < wanted {
        log::warn!(
            "open-file limit {} is below the {wanted} descriptors max_connections may need; raise it (ulimit -n)",
            limit.rlim_cur
        );
    }
}

impl Server {
    /// Binds, starts every reactor and returns once all of them are serving.
    pub fn start(config: &ServeConfig, alloc_counter: fn() -> u64) -> Result<Server, String> {
        config.validate()?;
        if config.store == "segment" {
            crate::device::prepare(config)?;
        }
        raise_open_file_limit(config);
        let listener = TcpListener::bind(config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let nbd_listener = match config.nbd {
            None => None,
            Some(nbd) => Some(
                TcpListener::bind(nbd)
                    .map_err(|e| format!("cannot listen for NBD on {nbd}: {e}"))?,
            ),
        };
        let nbd_addr = match nbd_listener.as_ref() {
            None => None,
            Some(l) => Some(l.local_addr().map_err(|e| e.to_string())?),
        };
        let mut nbd_listener = nbd_listener;
        let cores = config.cores as usize;
        // One socket per core on the same port (SO_REUSEPORT): the kernel keeps each client
        // on one core; ops for other cores' PGs take the one-hop ring, as TCP ones do.
        let mut udp_sockets = match config.transport.as_str() {
            "udp" => udp_transport::bind_reuseport(config.udp, cores)
                .map_err(|e| format!("cannot bind UDP {}: {e}", config.udp))?,
            _ => Vec::new(),
        };
        let udp_addr = match udp_sockets.first() {
            None => None,
            Some(s) => Some(s.local_addr().map_err(|e| e.to_string())?),
        };
        udp_sockets.reverse(); // popped in core order below
        #[cfg(feature = "dpdk")]
        let mut dpdk_queues = match config.transport.as_str() {
            "dpdk" => open_dpdk(config)?,
            _ => Vec::new(),
        };
        #[cfg(feature = "dpdk")]
        dpdk_queues.reverse(); // popped in core order below
        let cpus = config.reactor_cpus();
        let wakers: Vec<Waker> = (0..cores)
            .map(|_| Waker::new())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("eventfd: {e}"))?;
        let wakers: Arc<[Waker]> = wakers.into();
        let board = Arc::new(StatusBoard::new(cores, describe(config, addr, &cpus)));
        let shutdown = Arc::new(Shutdown::new(cores));
        let (ready_sender, ready) = mpsc::channel::<Result<usize, String>>();
        let mut listener = Some(listener);
        let mut threads = Vec::with_capacity(cores);
        for (index, links) in ring::mesh::<Message>(cores, RING_CAPACITY)
            .into_iter()
            .enumerate()
        {
            let parts = CoreParts {
                index,
                links,
                listener: if index == 0 { listener.take() } else { None },
                nbd_listener: if index == 0 {
                    nbd_listener.take()
                } else {
                    None
                },
                udp_socket: udp_sockets.pop(),
                #[cfg(feature = "dpdk")]
                dpdk_queue: dpdk_queues.pop(),
            };
            let (config, wakers, board, shutdown, ready_sender) = (
                config.clone(),
                wakers.clone(),
                board.clone(),
                shutdown.clone(),
                ready_sender.clone(),
            );
            let cpu = cpus[index];
            let thread = std::thread::Builder::new()
                .name(format!("carmine-core-{index}"))
                .spawn(move || {
                    if !reactor::pin_current_thread(cpu) {
                        log::warn!("core {index}: could not pin to CPU {cpu}; running unpinned");
                    }
                    let stop = shutdown.clone();
                    let mut core =
                        match build_core(&config, parts, wakers, board, shutdown, alloc_counter) {
                            Ok(core) => core,
                            Err(error) => {
                                stop.absent(index);
                                let _ = ready_sender.send(Err(error.clone()));
                                return Err(error);
                            }
                        };
                    let _ = ready_sender.send(Ok(index));
                    drop(ready_sender);
                    reactor::run_coalesced(
                        &mut core,
                        config.idle_policy(),
                        config.coalesce(),
                        &stop.stop,
                    );
                    Ok(core.into_pools())
                })
                .map_err(|e| format!("cannot start core {index}: {e}"))?;
            threads.push(thread);
        }
        drop(ready_sender);
        let server = Server {
            addr,
            udp_addr,
            nbd_addr,
            cpus,
            board,
            shutdown,
            wakers,
            threads,
        };
        for _ in 0..cores {
            match ready.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    server.stop();
                    let _ = server.join();
                    return Err(error);
                }
                Err(_) => {
                    server.stop();
                    let _ = server.join();
                    return Err("a core exited during start-up".into());
                }
            }
        }
        Ok(server)
    }

    /// Asks every core to finish what is in flight and exit.
    pub fn stop(&self) {
        self.shutdown.stop.store(true, Ordering::Relaxed);
        for waker in self.wakers.iter() {
            waker.wake_if_sleeping();
        }
    }

    /// Waits for every core; the pools' memory is released only after all have exited, since
    /// a core may hold leases on another core's buffers until the end.
    pub fn join(self) -> Result<(), String> {
        let mut pools = Vec::with_capacity(self.threads.len());
        let mut first_error = None;
        for thread in self.threads {
            match thread.join() {
                Ok(Ok(core_pools)) => pools.push(core_pools),
                Ok(Err(error)) => first_error = first_error.or(Some(error)),
                Err(_) => first_error = first_error.or(Some("a core panicked".to_string())),
            }
        }
        drop(pools);
        first_error.map_or(Ok(()), Err)
    }
}
