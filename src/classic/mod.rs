//! Classic mode (`carmine serve --mode classic`): the same wire protocol, placement, PG logic
//! and store as RTC mode, executed the way the classic Ceph OSD does it, as a baseline:
//!
//! ```text
//!  client ──TCP──> messenger thread (epoll set of its connections; messenger.rs)
//!                    parse + check frame (wire.rs), copy it into an Op
//!                    push to op queue shard  pg % shards  (Mutex + Condvar; op_queue.rs)
//!                  worker thread of that shard (worker.rs)
//!                    pop PG token, lock PG (Mutex<ClassicPg>), take the PG's oldest op
//!                    order it (pg.rs), lock the shard's store, submit (memory.rs)
//!                    [replicas > 0: timer thread waits replication_cost; replication.rs]
//!                  finisher thread (finisher.rs): batch of replies, one writev per connection
//! ```
//!
//! Every thread is pinned to the same CPU set RTC mode would use (`--cores`, `--cpus`), and
//! the scheduler shares those CPUs among them. The thread counts are options with defaults
//! derived from `--cores` (see `config.rs`); `ARCHITECTURE.md` says why this is a fair baseline.

pub mod buffers;
pub mod connection;
pub mod finisher;
pub mod messenger;
pub mod op_queue;
pub mod replication;
pub mod store;
pub mod worker;

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use carmine_dataplane::wire::Limits;
use carmine_storage::MemoryStore;
use serde_json::json;

use crate::config::ServeConfig;
use crate::osd::core::Hooks;
use crate::osd::pg::Pg;
use crate::osd::placement::{Placement, PlacementMode};
use crate::osd::stats::{Counter, Counters};
use crate::status::StatusBoard;

use finisher::Finisher;
use messenger::{Messenger, MessengerHandle};
use op_queue::OpQueue;
use replication::Replication;
use store::ShardStore;
use worker::ClassicPg;

/// How long a stopping server waits for in-flight ops to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Gauges shared by all threads (relaxed atomics; `status` reads them).
#[derive(Default)]
pub struct Gauges {
    /// Ops enqueued and not yet handed to a socket by the finisher.
    pub ops_in_flight: AtomicU64,
    pub connections: AtomicU64,
}

/// Where each thread publishes its counters on the status board.
#[derive(Clone, Copy)]
struct Layout {
    workers: usize,
    messengers: usize,
    /// Store threads: one per shard for an asynchronous store, else none.
    stores: usize,
}

impl Layout {
    fn messenger(&self, index: usize) -> usize {
        self.workers + index
    }
    fn store(&self, shard: usize) -> usize {
        self.workers + self.messengers + shard
    }
    fn finisher(&self) -> usize {
        self.workers + self.messengers + self.stores
    }
    /// Written only while rendering status (under `status_lock`).
    fn gauges(&self) -> usize {
        self.finisher() + 1
    }
    fn entries(&self) -> usize {
        self.finisher() + 2
    }
}

/// Everything the threads share.
pub struct Shared {
    pub limits: Limits,
    pub placement: Placement,
    pub hooks: Hooks,
    /// Largest op output accepted (as RTC: what one large buffer holds).
    pub output_len_max: u64,
    pub inflight_per_connection: u32,
    pub connections_max: u64,
    pub queue: OpQueue,
    /// Per shard, its PGs (index: local PG).
    pub pgs: Vec<Vec<Mutex<ClassicPg>>>,
    /// One store per shard: a share of the memory store (capacity split like RTC's per-core
    /// stores) or a shard of the segment store.
    pub stores: Vec<ShardStore>,
    pub finisher: Finisher,
    pub buffers: buffers::BufferPool,
    pub replication: Option<Arc<Replication>>,
    pub board: Arc<StatusBoard>,
    pub gauges: Gauges,
    pub stop_reading: AtomicBool,
    status_lock: Mutex<()>,
    layout: Layout,
}

pub struct ClassicServer {
    pub addr: SocketAddr,
    pub cpus: Vec<usize>,
    pub board: Arc<StatusBoard>,
    shared: Arc<Shared>,
    handles: Arc<[MessengerHandle]>,
    messengers: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    /// Store threads (asynchronous stores only), stopped after the workers.
    stores: Vec<JoinHandle<()>>,
    others: Vec<JoinHandle<()>>,
}

/// Restricts the calling thread (and the threads it starts later) to `cpus`.
pub fn pin_to_cpus(cpus: &[usize]) -> bool {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it; sched_setaffinity reads
    // it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// One store per shard. A segment-store device is created and formatted on first use, for as
/// many shards as this server runs.
fn open_stores(config: &ServeConfig) -> Result<Vec<ShardStore>, String> {
    let shards = config.classic_shard_count();
    if config.store != "segment" {
        let capacity = config.memory_capacity / shards as u64;
        return Ok((0..shards)
            .map(|_| ShardStore::memory(MemoryStore::new(capacity)))
            .collect());
    }
    crate::device::prepare(config)?;
    (0..shards)
        .map(|shard| {
            let store = crate::server::open_segment_shard(config, shard, shards as u32)?;
            ShardStore::segment(store).map_err(|e| format!("shard {shard}: {e}"))
        })
        .collect()
}

fn build_shared(
    config: &ServeConfig,
    info: serde_json::Value,
    layout: Layout,
    stores: Vec<ShardStore>,
) -> Shared {
    let shards = config.classic_shard_count();
    let placement = Placement::new(config.placement_mode(), shards);
    let log_enabled = matches!(placement.mode, PlacementMode::Pg { .. });
    let pgs_per_shard: Vec<u32> = (0..shards).map(|s| placement.local_pg_count(s)).collect();
    let pgs = pgs_per_shard
        .iter()
        .enumerate()
        .map(|(shard, &count)| {
            (0..count)
                .map(|local| {
                    Mutex::new(ClassicPg {
                        pg: Pg::new(placement.pg_id(shard, local), log_enabled),
                        waiting: VecDeque::new(),
                    })
                })
                .collect()
        })
        .collect();
    let hooks = Hooks {
        replicas: config.replicas,
        replication_cost: config.replication_cost,
        snapshot_cost: config.snapshot_cost,
    };
    Shared {
        limits: config.limits(),
        placement,
        hooks,
        output_len_max: config.large_buffer_size() as u64,
        inflight_per_connection: config.inflight_per_connection,
        connections_max: u64::from(config.max_connections) * u64::from(config.cores),
        queue: OpQueue::new(&pgs_per_shard, config.op_slots as usize),
        pgs,
        stores,
        finisher: Finisher::new(),
        buffers: buffers::BufferPool::new(),
        replication: (config.replicas > 0)
            .then(|| Arc::new(Replication::new(config.replication_cost))),
        board: Arc::new(StatusBoard::with_labels(thread_labels(layout), info)),
        gauges: Gauges::default(),
        stop_reading: AtomicBool::new(false),
        status_lock: Mutex::new(()),
        layout,
    }
}

fn thread_labels(layout: Layout) -> Vec<String> {
    let mut labels: Vec<String> = (0..layout.workers).map(|i| format!("worker-{i}")).collect();
    labels.extend((0..layout.messengers).map(|i| format!("messenger-{i}")));
    labels.extend((0..layout.stores).map(|i| format!("store-{i}")));
    labels.push("finisher".into());
    labels.push("shared".into());
    labels
}

fn spawn(
    name: String,
    cpus: &[usize],
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, String> {
    let cpus = cpus.to_vec();
    let thread_name = name.clone();
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            if !pin_to_cpus(&cpus) {
                log::warn!("{name}: could not pin to CPUs {cpus:?}; running unpinned");
            }
            body()
        })
        .map_err(|e| format!("cannot start a thread: {e}"))
}

impl ClassicServer {
    /// Binds, starts every thread and returns once they are running.
    pub fn start(config: &ServeConfig) -> Result<ClassicServer, String> {
        config.validate()?;
        crate::server::raise_open_file_limit(config);
        let listener = TcpListener::bind(config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let cpus = config.reactor_cpus();
        let stores = open_stores(config)?;
        let layout = Layout {
            workers: config.classic_shard_count() * config.classic_workers_per_shard as usize,
            messengers: config.classic_messenger_count(),
            stores: stores.iter().filter(|s| s.asynchronous()).count(),
        };
        let mut info = crate::server::describe(config, addr, &cpus);
        info["transport"] = json!("tcp-epoll-threads");
        info["classic"] = json!({
            "messengers": layout.messengers,
            "shards": config.classic_shard_count(),
            "workers_per_shard": config.classic_workers_per_shard,
            "store_threads": layout.stores,
            "finisher": 1,
            "replication_timer": config.replicas > 0,
        });
        let shared = Arc::new(build_shared(config, info, layout, stores));
        let handles: Vec<MessengerHandle> = (0..layout.messengers)
            .map(|_| MessengerHandle::new())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("epoll: {e}"))?;
        let handles: Arc<[MessengerHandle]> = handles.into();
        let mut server = ClassicServer {
            addr,
            cpus: cpus.clone(),
            board: shared.board.clone(),
            shared: shared.clone(),
            handles: handles.clone(),
            messengers: Vec::new(),
            workers: Vec::new(),
            stores: Vec::new(),
            others: Vec::new(),
        };
        if let Err(error) = server.spawn_all(config, listener) {
            server.stop();
            let _ = server.join();
            return Err(error);
        }
        Ok(server)
    }

    fn spawn_all(&mut self, config: &ServeConfig, listener: TcpListener) -> Result<(), String> {
        let (shared, cpus) = (self.shared.clone(), self.cpus.clone());
        let per_shard = config.classic_workers_per_shard as usize;
        for index in 0..shared.layout.workers {
            let (shared, shard) = (shared.clone(), index / per_shard);
            let body = move || worker::run(&shared, shard, index);
            self.workers
                .push(spawn(format!("carmine-worker-{index}"), &cpus, body)?);
        }
        for shard in 0..shared.layout.stores {
            let (store_shared, entry) = (shared.clone(), shared.layout.store(shard));
            let body = move || store::run(&store_shared, shard, entry);
            self.stores
                .push(spawn(format!("carmine-store-{shard}"), &cpus, body)?);
        }
        let entry = shared.layout.finisher();
        let finisher_shared = shared.clone();
        let body = move || finisher::run(&finisher_shared, entry);
        self.others
            .push(spawn("carmine-finisher".into(), &cpus, body)?);
        if let Some(replication) = shared.replication.clone() {
            let timer_shared = shared.clone();
            let body = move || replication::run(&timer_shared, &replication);
            self.others
                .push(spawn("carmine-replication".into(), &cpus, body)?);
        }
        let mut listener = Some(listener);
        for index in 0..shared.layout.messengers {
            let listener = if index == 0 { listener.take() } else { None };
            let entry = shared.layout.messenger(index);
            let mut messenger =
                Messenger::new(index, shared.clone(), self.handles.clone(), listener, entry)
                    .map_err(|e| format!("messenger {index}: {e}"))?;
            let body = move || messenger.run();
            self.messengers
                .push(spawn(format!("carmine-msgr-{index}"), &cpus, body)?);
        }
        Ok(())
    }

    /// Stops reading new requests; `join` finishes what is in flight.
    pub fn stop(&self) {
        self.shared.stop_reading.store(true, Ordering::Release);
        for handle in self.handles.iter() {
            handle.wake();
        }
    }

    /// Waits for the messengers, lets in-flight ops finish (answered), then stops the workers,
    /// the replication timer and the finisher, in that order.
    pub fn join(self) -> Result<(), String> {
        let mut panicked = false;
        for thread in self.messengers {
            panicked |= thread.join().is_err();
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.shared.gauges.ops_in_flight.load(Ordering::Acquire) > 0 && !panicked {
            if Instant::now() > deadline {
                log::warn!("classic: in-flight ops not answered within {DRAIN_TIMEOUT:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.shared.queue.stop();
        for thread in self.workers {
            panicked |= thread.join().is_err();
        }
        for store in &self.shared.stores {
            store.stop();
        }
        for thread in self.stores {
            panicked |= thread.join().is_err();
        }
        if let Some(replication) = self.shared.replication.as_ref() {
            replication.stop();
        }
        self.shared.finisher.stop();
        for thread in self.others {
            panicked |= thread.join().is_err();
        }
        if panicked {
            return Err("a classic-mode thread panicked".into());
        }
        Ok(())
    }
}

/// The status document: every thread's published counters, plus gauges read now.
pub fn render_status(shared: &Shared) -> String {
    let _one_writer = shared.status_lock.lock().expect("status lock");
    let mut c = Counters::default();
    let gauges = &shared.gauges;
    c.set(
        Counter::ops_in_flight,
        gauges.ops_in_flight.load(Ordering::Relaxed),
    );
    c.set(
        Counter::connections,
        gauges.connections.load(Ordering::Relaxed),
    );
    let mut pgs = 0;
    for shard in &shared.pgs {
        for pg in shard {
            let pg = &pg.lock().expect("PG lock").pg;
            pgs += 1;
            c.add(Counter::pg_log_entries, pg.log.len() as u64);
            let version_max = c.get(Counter::pg_version_max).max(pg.version);
            c.set(Counter::pg_version_max, version_max);
            let id_max = c.get(Counter::pg_id_max).max(u64::from(pg.id));
            c.set(Counter::pg_id_max, id_max);
        }
    }
    c.set(Counter::pgs, pgs);
    for store in &shared.stores {
        let stats = store.lock().stats();
        c.add(Counter::store_objects, stats.objects);
        c.add(Counter::store_bytes, stats.bytes_stored);
        c.add(Counter::store_capacity_bytes, stats.capacity_bytes);
        c.add(
            Counter::store_device_bytes_written,
            stats.device_bytes_written,
        );
        c.add(
            Counter::store_client_bytes_written,
            stats.client_bytes_written,
        );
        c.add(Counter::store_records_written, stats.records_written);
    }
    shared.board.core(shared.layout.gauges()).publish(&c);
    debug_assert_eq!(shared.layout.entries(), thread_labels(shared.layout).len());
    crate::status::render(&shared.board)
}
