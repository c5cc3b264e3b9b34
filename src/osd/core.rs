//! `OsdCore`: everything one core owns, and its poll loop.
//!
//! An op's path: the connection's core parses the frame in place (`handle_frame`), locates the
//! object's PG and either runs the op itself (`exec_start`) or sends it one hop to the PG's core
//! (`Message::Execute`). The PG's core orders it (`Pg`), applies it to its store (`exec_run`),
//! waits for the null replication hook if configured (a timer), and finishes it (`finish`):
//! the reply is queued on the connection, or sent back one hop (`Message::Done`).
//!
//! Architecture invariant: no locks, no blocking calls except `park`, no allocation per op.
//! Every queue is bounded by a table sized at start-up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carmine_dataplane::buffers::{Body, CorePools, StoredBytes};
use carmine_dataplane::dgram::RequestHandle;
use carmine_dataplane::pool::{Buf, Lease};
use carmine_dataplane::reactor::{Core, LoopCounters, Waker, PARK_TIMEOUT_MAX};
use carmine_dataplane::ring::{Consumer, CoreLinks, Producer};
use carmine_dataplane::tcp::{ConnId, RxFrame, TcpTransport};
use carmine_dataplane::udp::{RpcNet, UdpRequest};
use carmine_dataplane::wire::{
    self as wire, Frame, Header, Opcode, ReadRange, Status, SubOpCode, SubOpView, SubOpsSummary,
    SUB_OPS_CEILING,
};
use carmine_storage::{
    ObjectStore, OutputBuffer, StoreError, SubOp, SubOpResult, Submit, STATUS_OK,
};

use crate::nbd::frontend::NbdFrontend;
use crate::osd::message::{Message, Results};
use crate::osd::network::{Clock, Network};
use crate::osd::op_table::{OpRef, OpTable, SLOT_NONE};
use crate::osd::pg::Pg;
use crate::osd::placement::{Placement, PlacementMode};
use crate::osd::stall::{StallWatch, STALL_REPORT_AFTER};
use crate::osd::stats::{Counter, Counters, SharedCounters};
use crate::osd::timer::TimerQueue;
use crate::status::StatusBoard;

/// Frames taken from the network per pass: bounds a pass so inbox and timers stay responsive.
const RX_FRAMES_PER_PASS_MAX: usize = 256;
/// Store completions taken per pass (bounds the stack array they are gathered in).
const STORE_COMPLETIONS_PER_PASS: usize = 64;

/// One store completion gathered by `poll_store`: tag, outcome, per-sub-op results, their count.
type StoreCompletion = (
    u64,
    Result<(), StoreError>,
    [SubOpResult; SUB_OPS_CEILING as usize],
    usize,
);
/// Messages taken from each inbox ring per pass.
const INBOX_BATCH_MAX: usize = 256;
/// Longest park while the store is busy (its completions wake the core sooner).
const STORE_BUSY_PARK_MAX: Duration = Duration::from_millis(1);
/// How long a core that polls a NIC queue waits before asking an epoll set that had nothing
/// again (`OsdCore::poll_epoll`): at a few hundred ns per `epoll_wait` on a VM, a look every
/// 10 us costs such a core a few percent at most, and adds at most 10 us to a TCP request's
/// latency on it.
const EPOLL_INTERVAL_POLLED_NIC_NS: u64 = 10_000;

/// Simulated costs of the hooks a full OSD would have here (Crimson prototype: null functions
/// with configurable cost).
#[derive(Clone, Copy, Debug)]
pub struct Hooks {
    /// Replica acks each write waits for; the wait is a timer, the reactor never blocks.
    pub replicas: u32,
    pub replication_cost: Duration,
    /// CPU spent per write by the snapshot hook (a busy wait: snapshot work is computation).
    pub snapshot_cost: Duration,
}

/// Where a client's reply goes: a TCP connection or a datagram RPC request of this core.
#[derive(Clone, Copy, Debug)]
enum ReplyTo {
    Tcp(ConnId),
    Udp(RequestHandle),
}

#[derive(Clone, Copy, Debug, Default)]
enum Origin {
    #[default]
    None,
    /// A client of this core (TCP connection or UDP request).
    Local(ReplyTo),
    /// A client op slot on another core.
    Remote { core: usize, op: OpRef },
    /// A part of an NBD request of this core's frontend.
    Nbd { request: OpRef, part: u8 },
}

#[derive(Default)]
struct ExecOp {
    origin: Origin,
    header: Header,
    frame: Option<Lease>,
    local_pg: u32,
    object_hash: u32,
    mutates: bool,
    /// Data bytes its sub-ops carry (`SubOpsSummary::data_bytes`), counted when it finishes.
    data_bytes: u64,
    /// The range of its one Read sub-op, if that is all it is (`SubOpsSummary::single_read`).
    single_read: Option<ReadRange>,
    /// This op counts in its PG's `unacked_writes`.
    holds_pg: bool,
    output: Option<Buf>,
    /// The output as bytes left in the store, instead of `output` (`exec_read_in_place`).
    stored: Option<StoredBytes>,
    results: Results,
    /// Link in the PG's wait queue.
    next: u32,
}

#[derive(Default)]
struct ClientOp {
    conn: Option<ReplyTo>,
    header: Header,
    /// Set instead of `conn` for a part of an NBD request.
    nbd: Option<(OpRef, u8)>,
}

/// Shared between the cores for shutdown: bit n set while core n has nothing in flight.
pub struct Shutdown {
    pub stop: AtomicBool,
    quiet_mask: AtomicU64,
    all_mask: u64,
}

impl Shutdown {
    pub fn new(cores: usize) -> Shutdown {
        assert!(cores <= 64);
        let all_mask = if cores == 64 {
            u64::MAX
        } else {
            (1u64 << cores) - 1
        };
        Shutdown {
            stop: AtomicBool::new(false),
            quiet_mask: AtomicU64::new(0),
            all_mask,
        }
    }

    /// Core `index` failed to start: it has nothing in flight, and the cores that did start
    /// must not wait for it to drain (they would, forever, when start-up is undone).
    pub fn absent(&self, index: usize) {
        self.quiet_mask.fetch_or(1u64 << index, Ordering::AcqRel);
    }
}

pub struct CoreSetup {
    pub index: usize,
    pub cores: usize,
    pub placement: Placement,
    pub exec_slots: u32,
    pub client_slots: u32,
    pub hooks: Hooks,
    pub alloc_counter: fn() -> u64,
}

/// `N`: the network side (`TcpTransport` in the daemon; see `network.rs`).
/// An `Execute` message waiting for an exec slot (see `OsdCore::deferred_remote`).
struct DeferredExecute {
    source: usize,
    origin: OpRef,
    header: Header,
    frame: Lease,
    summary: SubOpsSummary,
    local_pg: u32,
    object_hash: u32,
}

pub struct OsdCore<N: Network = TcpTransport> {
    index: usize,
    transport: N,
    /// The datagram RPC, when `--transport udp` (kernel socket) or `dpdk` (NIC queue pair).
    udp: Option<Box<dyn RpcNet>>,
    udp_batch: Vec<UdpRequest>,
    /// The datagram RPC's port is a polled NIC queue (DPDK): it has no descriptor, the core
    /// never parks, and the kernel's epoll set (TCP, the waker, NBD) is asked only every
    /// `EPOLL_INTERVAL_POLLED_NIC_NS` while it has nothing (`poll_network`).
    nic_polled: bool,
    /// When the epoll set is next asked (with `nic_polled`); 0: on the next pass.
    epoll_next_ns: u64,
    /// `epoll_wait`s of the network step (status `epoll_polls`).
    epoll_polls: u64,
    /// `poll_store`'s gathering array, made once: a fresh one per pass cost a 14 KiB memset
    /// on every poll pass (perf: the hottest instructions of an idle or DPDK-loaded reactor).
    store_completed: Vec<StoreCompletion>,
    /// The NBD frontend, when `--nbd` is set.
    nbd: Option<NbdFrontend>,
    nbd_accept_next: usize,
    pools: CorePools,
    store: Box<dyn ObjectStore>,
    /// The store signals this core's waker on device completions: an adaptive core may park
    /// while it is busy.
    store_wakes: bool,
    exec: OpTable<ExecOp>,
    client: OpTable<ClientOp>,
    pgs: Vec<Pg>,
    ready_pgs: VecDeque<u32>,
    timers: TimerQueue,
    outbox: Vec<Option<Producer<Message>>>,
    inbox: Vec<Option<Consumer<Message>>>,
    /// Messages whose ring was full, in order, per target core. Bounded by the op tables.
    outbound: Vec<VecDeque<Message>>,
    /// Ops other cores sent while every exec slot here was taken, in arrival order; they start
    /// before new network frames as slots free. Bounded: each holds a client slot on its
    /// sender (capacity `client_slots * (cores - 1)`).
    ///
    /// Why not leave them in the ring: the ring also carries `Done` and `Release`, which free
    /// this core's slots and buffers. Stopping at an `Execute` blocked those behind it while
    /// the ops here waited for the buffers they would free (`carmine sim --seed 93
    /// --tight-pools` hung this way).
    deferred_remote: VecDeque<DeferredExecute>,
    wake_pending: Vec<bool>,
    wakers: Arc<[Waker]>,
    placement: Placement,
    hooks: Hooks,
    counters: Counters,
    shared: Arc<SharedCounters>,
    board: Arc<StatusBoard>,
    shutdown: Arc<Shutdown>,
    rx_batch: Vec<RxFrame>,
    clock: Clock,
    accept_next: usize,
    alloc_counter: fn() -> u64,
    alloc_base: u64,
    alloc_excluded: u64,
    stall: StallWatch,
}

pub(crate) fn status_of(error: StoreError) -> Status {
    Status::from_u32(u32::from(error.code())).unwrap_or(Status::Io)
}

pub(crate) fn error_counter(status: Status) -> Counter {
    match status {
        Status::BadCrc => Counter::err_bad_crc,
        Status::Malformed => Counter::err_malformed,
        Status::OverLimit => Counter::err_over_limit,
        Status::UnknownOpcode => Counter::err_unknown_opcode,
        Status::Unsupported => Counter::err_unsupported,
        Status::NotFound => Counter::err_not_found,
        Status::NoData => Counter::err_no_data,
        Status::NoSpace => Counter::err_no_space,
        Status::TooLarge => Counter::err_too_large,
        Status::InvalidArgument => Counter::err_invalid_argument,
        Status::Range => Counter::err_range,
        Status::Io => Counter::err_io,
        Status::Corrupt => Counter::err_corrupt,
        Status::Ok | Status::ShuttingDown => Counter::err_other,
    }
}

/// The store's view of one wire sub-op (borrowing the same bytes: no copy).
pub(crate) fn to_store_op<'a>(view: &SubOpView<'a>) -> SubOp<'a> {
    match view.code {
        SubOpCode::Write => SubOp::Write {
            offset: view.offset,
            data: view.data,
        },
        SubOpCode::WriteFull => SubOp::WriteFull { data: view.data },
        SubOpCode::Read => SubOp::Read {
            offset: view.offset,
            length: view.length,
        },
        SubOpCode::Zero => SubOp::Zero {
            offset: view.offset,
            length: view.length,
        },
        SubOpCode::Truncate => SubOp::Truncate { size: view.offset },
        SubOpCode::Remove => SubOp::Remove,
        SubOpCode::Stat => SubOp::Stat,
        SubOpCode::SetXattr => SubOp::SetXattr {
            name: view.name,
            value: view.data,
        },
        SubOpCode::GetXattr => SubOp::GetXattr { name: view.name },
        SubOpCode::OmapSet => SubOp::OmapSet {
            key: view.name,
            value: view.data,
        },
        SubOpCode::OmapGet => SubOp::OmapGet { key: view.name },
        SubOpCode::OmapRemove => SubOp::OmapRemove { key: view.name },
    }
}

impl<N: Network> OsdCore<N> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        setup: CoreSetup,
        transport: N,
        pools: CorePools,
        mut store: Box<dyn ObjectStore>,
        links: CoreLinks<Message>,
        wakers: Arc<[Waker]>,
        board: Arc<StatusBoard>,
        shutdown: Arc<Shutdown>,
    ) -> OsdCore<N> {
        let store_wakes = store
            .wake_on_completion(wakers[setup.index].fd())
            .unwrap_or_else(|e| {
                log::warn!(
                    "core {}: the store cannot signal completions ({e}); an adaptive core keeps polling while it is busy",
                    setup.index
                );
                false
            });
        let pg_count = setup.placement.local_pg_count(setup.index);
        let log_enabled = matches!(
            setup.placement.mode,
            crate::osd::placement::PlacementMode::Pg { .. }
        );
        let pgs = (0..pg_count)
            .map(|local| Pg::new(setup.placement.pg_id(setup.index, local), log_enabled))
            .collect();
        let queue_capacity = (setup.exec_slots + setup.client_slots) as usize;
        OsdCore {
            index: setup.index,
            transport,
            udp: None,
            udp_batch: Vec::with_capacity(RX_FRAMES_PER_PASS_MAX),
            nic_polled: false,
            epoll_next_ns: 0,
            epoll_polls: 0,
            store_completed: vec![
                (
                    0,
                    Ok(()),
                    [SubOpResult::default(); SUB_OPS_CEILING as usize],
                    0
                );
                STORE_COMPLETIONS_PER_PASS
            ],
            nbd: None,
            nbd_accept_next: 0,
            pools,
            store,
            store_wakes,
            exec: OpTable::new(setup.exec_slots),
            client: OpTable::new(setup.client_slots),
            pgs,
            ready_pgs: VecDeque::with_capacity(pg_count as usize),
            timers: TimerQueue::new(setup.exec_slots as usize),
            outbox: links.outbox,
            inbox: links.inbox,
            outbound: (0..setup.cores)
                .map(|_| VecDeque::with_capacity(queue_capacity))
                .collect(),
            wake_pending: vec![false; setup.cores],
            deferred_remote: VecDeque::with_capacity(
                setup.client_slots as usize * (setup.cores - 1),
            ),
            wakers,
            placement: setup.placement,
            hooks: setup.hooks,
            counters: Counters::default(),
            shared: board.core(setup.index),
            board,
            shutdown,
            rx_batch: Vec::with_capacity(RX_FRAMES_PER_PASS_MAX),
            clock: Clock::Monotonic(Instant::now()),
            accept_next: 0,
            alloc_counter: setup.alloc_counter,
            alloc_base: (setup.alloc_counter)(),
            alloc_excluded: 0,
            stall: StallWatch::new(Instant::now()),
        }
    }

    /// Serves NBD on this core too. The frontend's epoll set joins the transport's, so a
    /// parked core wakes for NBD traffic.
    pub fn with_nbd(mut self, nbd: NbdFrontend) -> std::io::Result<OsdCore<N>> {
        self.transport.watch_fd(nbd.epoll_fd())?;
        self.nbd = Some(nbd);
        Ok(self)
    }

    /// Serves the datagram RPC on this core too; a socket joins the transport's epoll set, so
    /// a parked core wakes for datagrams. A port without a descriptor (a DPDK queue) cannot
    /// wake the core: it then never parks (`park_timeout`).
    pub fn with_udp(mut self, udp: Box<dyn RpcNet>) -> std::io::Result<OsdCore<N>> {
        match udp.fd() {
            Some(fd) => self.transport.watch_fd(fd)?,
            None => self.nic_polled = true,
        }
        self.udp = Some(udp);
        Ok(self)
    }

    /// Time from `clock` instead of the monotonic clock (the simulation's).
    pub fn with_clock(mut self, clock: Clock) -> OsdCore<N> {
        self.clock = clock;
        self
    }

    /// The network side, for a simulation to feed frames in and take replies out.
    pub fn network_mut(&mut self) -> &mut N {
        &mut self.transport
    }

    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    fn stopping(&self) -> bool {
        self.shutdown.stop.load(Ordering::Relaxed)
    }

    // ---- network ------------------------------------------------------------------------

    fn poll_network(&mut self, now_ns: u64) -> usize {
        let mut work = self.poll_epoll(now_ns);
        if self.stopping() {
            return work + self.poll_nbd();
        }
        while let Some((stream, peer)) = self.transport.poll_accept() {
            let target = self.accept_next % self.placement.cores;
            self.accept_next += 1;
            log::debug!(
                "core {}: accepted {peer}, owned by core {target}",
                self.index
            );
            if target == self.index {
                self.transport.adopt(stream);
            } else {
                self.send(target, Message::Adopt(stream));
            }
            work += 1;
        }
        let budget = self
            .exec
            .free_count()
            .min(self.client.free_count())
            .min(RX_FRAMES_PER_PASS_MAX);
        let mut batch = std::mem::take(&mut self.rx_batch);
        let delivered = self
            .transport
            .poll_rx(&mut self.pools, budget, &mut |frame| batch.push(frame));
        for RxFrame {
            conn,
            header,
            frame,
        } in batch.drain(..)
        {
            self.handle_frame(ReplyTo::Tcp(conn), header, frame);
        }
        self.rx_batch = batch;
        work + delivered + self.poll_udp(budget - delivered, now_ns) + self.poll_nbd()
    }

    /// The kernel's readiness events (TCP connections and listener, the waker, NBD): one
    /// `epoll_wait` per pass, except on a core that polls a NIC queue. There most passes carry
    /// a few datagram RPC ops, and a system call per pass cost more than the user-space path
    /// of an op (`scripts/dpdk-bench.sh` with `perf stat`: one `epoll_wait` per pass, about
    /// one pass per op under its load); so while the set has nothing the next look waits
    /// `EPOLL_INTERVAL_POLLED_NIC_NS`. That bounds what the look costs such a core, and what it
    /// adds to a TCP client's latency there (status, tools); a look that finds events is made
    /// again on the next pass, so a TCP load on that core is read as before.
    fn poll_epoll(&mut self, now_ns: u64) -> usize {
        if self.nic_polled && now_ns < self.epoll_next_ns {
            return 0;
        }
        self.epoll_polls += 1;
        let work = self.transport.poll_events(Duration::ZERO);
        self.epoll_next_ns = if self.nic_polled && work == 0 {
            now_ns + EPOLL_INTERVAL_POLLED_NIC_NS
        } else {
            0
        };
        work
    }

    /// Datagram RPC requests, down the same path as TCP frames.
    fn poll_udp(&mut self, budget: usize, now_ns: u64) -> usize {
        let Some(udp) = self.udp.as_mut() else {
            return 0;
        };
        let mut batch = std::mem::take(&mut self.udp_batch);
        let delivered = udp.poll_rx(&mut self.pools, budget, now_ns, &mut |request| {
            batch.push(request)
        });
        for request in batch.drain(..) {
            self.handle_frame(ReplyTo::Udp(request.handle), request.header, request.frame);
        }
        self.udp_batch = batch;
        delivered
    }

    fn poll_nbd(&mut self) -> usize {
        if self.nbd.is_none() {
            return 0;
        }
        // The frontend's epoll set is watched by the transport's: skip its epoll_wait (one
        // system call per pass) unless the transport saw it become ready.
        let watched = self.transport.take_watched_ready();
        let nbd = self.nbd.as_mut().expect("checked above");
        let mut work = if watched || nbd.events_may_be_pending() {
            nbd.poll_events()
        } else {
            0
        };
        // Stopping: accept and read nothing more, but finish what was issued.
        let reading = !self.stopping();
        while let Some((stream, peer)) = self
            .nbd
            .as_mut()
            .filter(|_| reading)
            .and_then(|nbd| nbd.poll_accept())
        {
            let target = self.nbd_accept_next % self.placement.cores;
            self.nbd_accept_next += 1;
            log::debug!(
                "core {}: NBD client {peer}, owned by core {target}",
                self.index
            );
            if target == self.index {
                self.nbd.as_mut().expect("present").adopt(stream);
            } else {
                self.send(target, Message::AdoptNbd(stream));
            }
            work += 1;
        }
        let nbd = self.nbd.as_mut().expect("checked above");
        work += nbd.poll_rx(&mut self.pools, reading);
        work + self.dispatch_nbd_parts()
    }

    /// Sends the NBD frontend's parts down the same path as frames from the wire: placement,
    /// then this core's PG or one hop to the owner's. Only while op slots are free; the rest
    /// wait in the frontend's bounded queue.
    fn dispatch_nbd_parts(&mut self) -> usize {
        let mut work = 0;
        while self.exec.free_count() > 0 && self.client.free_count() > 0 {
            let Some(part) = self.nbd.as_mut().and_then(|nbd| nbd.next_part()) else {
                break;
            };
            work += 1;
            let view = Frame::view(part.header, part.frame.as_slice());
            let summary = view.sub_ops_summary();
            let target = self.placement.locate(view.oid);
            if target.core == self.index {
                let origin = Origin::Nbd {
                    request: part.request,
                    part: part.part,
                };
                self.exec_start(
                    origin,
                    part.header,
                    part.frame,
                    summary,
                    target.local_pg,
                    target.hash,
                );
                continue;
            }
            let op = self.client.alloc().expect("free client slot checked");
            *self.client.get(op) = ClientOp {
                conn: None,
                header: part.header,
                nbd: Some((part.request, part.part)),
            };
            self.counters.add(Counter::ops_remote_out, 1);
            let message = Message::Execute {
                origin: op,
                header: part.header,
                frame: part.frame,
                summary,
                local_pg: target.local_pg,
                object_hash: target.hash,
            };
            self.send(target.core, message);
        }
        work
    }

    /// An NBD part finished: its frame goes back to the pool, its outcome to the frontend.
    fn nbd_part_done(
        &mut self,
        (request, part): (OpRef, u8),
        frame: Lease,
        status: Status,
        results: Results,
        output: Option<Buf>,
    ) {
        self.pools.release_lease(frame);
        let sub_status = results.as_slice().first().map(|(status, _)| *status);
        let nbd = self.nbd.as_mut().expect("NBD parts come from the frontend");
        nbd.complete(&mut self.pools, request, part, status, sub_status, output);
    }

    fn handle_frame(&mut self, conn: ReplyTo, header: Header, frame: Lease) {
        let view = Frame::view(header, frame.as_slice());
        if !view.crc_ok(frame.as_slice()) {
            log::info!(
                "core {}: request {} failed its crc",
                self.index,
                header.request_id
            );
            return self.answer_error(conn, header, frame, Status::BadCrc);
        }
        match (header.is_reply(), view.opcode()) {
            (false, Some(Opcode::OsdOp)) => {}
            (false, Some(Opcode::Ping)) => return self.answer_ping(conn, header, frame),
            (false, Some(Opcode::Status)) => return self.answer_status(conn, header, frame),
            (false, Some(Opcode::Hello)) => return self.answer_hello(conn, header, frame),
            _ => return self.answer_error(conn, header, frame, Status::UnknownOpcode),
        }
        let summary = match view.validate_sub_ops() {
            Ok(summary) => summary,
            Err(status) => return self.answer_error(conn, header, frame, status),
        };
        if view.oid.is_empty() {
            return self.answer_error(conn, header, frame, Status::InvalidArgument);
        }
        let target = self.placement.locate(view.oid);
        if target.core == self.index {
            self.exec_start(
                Origin::Local(conn),
                header,
                frame,
                summary,
                target.local_pg,
                target.hash,
            );
            return;
        }
        let op = self
            .client
            .alloc()
            .expect("rx budget counts free client slots");
        *self.client.get(op) = ClientOp {
            conn: Some(conn),
            header,
            nbd: None,
        };
        self.counters.add(Counter::ops_remote_out, 1);
        let message = Message::Execute {
            origin: op,
            header,
            frame,
            summary,
            local_pg: target.local_pg,
            object_hash: target.hash,
        };
        self.send(target.core, message);
    }

    fn answer_error(&mut self, conn: ReplyTo, header: Header, frame: Lease, status: Status) {
        self.counters.add(error_counter(status), 1);
        self.pools.release_lease(frame);
        self.reply(conn, &header, status, &[], Body::None);
    }

    fn answer_ping(&mut self, conn: ReplyTo, header: Header, frame: Lease) {
        self.counters.add(Counter::pings, 1);
        let payload = Frame::view(header, frame.as_slice()).payload;
        let body = match self.pools.acquire_for(payload.len()) {
            Some(mut buf) => {
                buf.spare_mut()[..payload.len()].copy_from_slice(payload);
                buf.seal(payload.len());
                Body::Buf(buf)
            }
            None if payload.is_empty() => Body::None,
            None => {
                self.counters.add(Counter::buffer_waits, 1);
                return self.answer_error(conn, header, frame, Status::OverLimit);
            }
        };
        self.pools.release_lease(frame);
        self.reply(conn, &header, Status::Ok, &[], body);
    }

    /// Tells a shard-aware client which core owns this connection and how objects are placed
    /// (`wire::HelloReply`), so that it can send each op straight to its core.
    fn answer_hello(&mut self, conn: ReplyTo, header: Header, frame: Lease) {
        let hello = wire::HelloReply {
            core: self.index as u32,
            cores: self.placement.cores as u32,
            pg_count: match self.placement.mode {
                PlacementMode::Pg { pg_count } => Some(pg_count),
                PlacementMode::Flex => None,
            },
        }
        .encode();
        let Some(mut buf) = self.pools.acquire_for(hello.len()) else {
            self.counters.add(Counter::buffer_waits, 1);
            return self.answer_error(conn, header, frame, Status::OverLimit);
        };
        buf.spare_mut()[..hello.len()].copy_from_slice(&hello);
        buf.seal(hello.len());
        self.pools.release_lease(frame);
        self.reply(conn, &header, Status::Ok, &[], Body::Buf(buf));
    }

    fn answer_status(&mut self, conn: ReplyTo, header: Header, frame: Lease) {
        // The status document is built with ordinary allocations; they are kept out of the
        // `allocations` counter, which tracks the data path.
        let before = (self.alloc_counter)();
        self.counters.add(Counter::status_requests, 1);
        self.publish_now();
        let json = crate::status::render(&self.board);
        let body = match self.pools.acquire_for(json.len()) {
            Some(mut buf) => {
                buf.spare_mut()[..json.len()].copy_from_slice(json.as_bytes());
                buf.seal(json.len());
                Body::Buf(buf)
            }
            None => Body::None,
        };
        let status = if matches!(body, Body::None) {
            Status::OverLimit
        } else {
            Status::Ok
        };
        drop(json);
        self.pools.release_lease(frame);
        self.reply(conn, &header, status, &[], body);
        self.alloc_excluded += (self.alloc_counter)() - before;
    }

    fn reply(
        &mut self,
        to: ReplyTo,
        header: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    ) {
        let refused = send_reply(
            &mut self.transport,
            &mut self.udp,
            &mut self.pools,
            to,
            header,
            status,
            results,
            body,
        );
        if let Some(body) = refused {
            self.release_body(body); // The client went away; nothing to answer.
        }
    }

    fn release_body(&mut self, body: Body) {
        if let Some(foreign) = self.pools.release_body(body) {
            let home = foreign.home_core().expect("foreign bodies have a home");
            self.send(home, Message::Release(foreign));
        }
    }

    // ---- execution on the PG's core -------------------------------------------------------

    /// `summary` is what `Frame::validate_sub_ops` said of the frame's sub-op table.
    fn exec_start(
        &mut self,
        origin: Origin,
        header: Header,
        frame: Lease,
        summary: SubOpsSummary,
        local_pg: u32,
        object_hash: u32,
    ) {
        let mutates = summary.mutates;
        let op = self
            .exec
            .alloc()
            .expect("callers check for a free exec slot");
        // Field by field: the slot was released in place (`finish`), owning nothing, and the
        // result table keeps the last op's items (only the first `count` are ever read), so
        // its 128 bytes are not zeroed per op as `..ExecOp::default()` did.
        let slot = self.exec.get(op);
        debug_assert!(slot.frame.is_none() && slot.output.is_none() && slot.stored.is_none());
        slot.origin = origin;
        slot.header = header;
        slot.frame = Some(frame);
        slot.local_pg = local_pg;
        slot.object_hash = object_hash;
        slot.mutates = mutates;
        slot.data_bytes = summary.data_bytes;
        slot.single_read = summary.single_read;
        slot.holds_pg = false;
        slot.results.count = 0;
        slot.next = SLOT_NONE;
        if self.pgs[local_pg as usize].must_queue(mutates) {
            self.counters.add(Counter::pg_queued, 1);
            self.enqueue(op);
            return;
        }
        if !self.exec_run(op) {
            self.enqueue(op);
            self.mark_ready(local_pg);
        }
    }

    fn enqueue(&mut self, op: OpRef) {
        let local_pg = self.exec.get(op).local_pg;
        let pg = &mut self.pgs[local_pg as usize];
        let tail = pg.queue_tail;
        pg.queue_tail = op.slot;
        if tail == SLOT_NONE {
            pg.queue_head = op.slot;
        } else {
            self.exec.at(tail).0.next = op.slot;
        }
        pg.queued += 1;
    }

    fn mark_ready(&mut self, local_pg: u32) {
        let pg = &mut self.pgs[local_pg as usize];
        if !pg.ready {
            pg.ready = true;
            self.ready_pgs.push_back(local_pg);
        }
    }

    /// Runs queued ops of PGs that may have become runnable, in queue order.
    fn drain_ready_pgs(&mut self) -> usize {
        let mut work = 0;
        for _ in 0..self.ready_pgs.len() {
            let local_pg = self.ready_pgs.pop_front().expect("counted");
            self.pgs[local_pg as usize].ready = false;
            loop {
                let head = self.pgs[local_pg as usize].queue_head;
                if head == SLOT_NONE {
                    break;
                }
                let (op, op_ref) = self.exec.at(head);
                let (mutates, next) = (op.mutates, op.next);
                if !self.pgs[local_pg as usize].head_may_run(mutates) {
                    break;
                }
                let pg = &mut self.pgs[local_pg as usize];
                pg.queue_head = next;
                if next == SLOT_NONE {
                    pg.queue_tail = SLOT_NONE;
                }
                pg.queued -= 1;
                self.exec.get(op_ref).next = SLOT_NONE;
                if !self.exec_run(op_ref) {
                    self.requeue_front(op_ref);
                    self.mark_ready(local_pg);
                    break;
                }
                work += 1;
            }
        }
        work
    }

    fn requeue_front(&mut self, op: OpRef) {
        let local_pg = self.exec.get(op).local_pg;
        let pg = &mut self.pgs[local_pg as usize];
        let head = pg.queue_head;
        pg.queue_head = op.slot;
        if head == SLOT_NONE {
            pg.queue_tail = op.slot;
        }
        pg.queued += 1;
        self.exec.get(op).next = head;
    }

    /// Applies the op to the store. False when no output buffer is free (the op waits).
    fn exec_run(&mut self, op_ref: OpRef) -> bool {
        let op = self.exec.get(op_ref);
        if op.mutates && !self.copy_stored_bodies() {
            // Replies still send from store memory this op may change or free: copying
            // them ran out of buffers, or a DPDK port still has frames sent from it in
            // flight (`udp_stored_frames_waits`). The next pass tries again.
            self.counters.add(Counter::buffer_waits, 1);
            return false;
        }
        if self.exec_read_in_place(op_ref) {
            return true;
        }
        let op = self.exec.get(op_ref);
        let frame = op
            .frame
            .as_ref()
            .expect("an op holds its frame until it finishes");
        let view = Frame::view(op.header, frame.as_slice());
        let mut store_ops = [SubOp::Stat; SUB_OPS_CEILING as usize];
        let mut count = 0;
        let mut output_len: u64 = 0;
        let mut sub_op_mask: u16 = 0;
        for sub_op in view.sub_ops() {
            let store_op = to_store_op(&sub_op);
            output_len = output_len.saturating_add(store_op.output_len_max().unwrap_or(0));
            if sub_op.code.is_mutation() {
                sub_op_mask |= 1 << (sub_op.code as u16);
            }
            store_ops[count] = store_op;
            count += 1;
        }
        let mut output = None;
        if output_len > 0 {
            if output_len > self.pools.large.buffer_size() as u64 {
                return self.finish_early(op_ref, Status::OverLimit);
            }
            match self.pools.acquire_for(output_len as usize) {
                Some(buf) => output = Some(buf),
                None => {
                    self.counters.add(Counter::buffer_waits, 1);
                    // A slow-loris client may be sitting on the buffer this op needs.
                    let want_large = output_len > self.pools.small.buffer_size() as u64;
                    self.transport
                        .evict_stalled_for(&mut self.pools, want_large);
                    return false;
                }
            }
        }
        if op.mutates {
            if !self.hooks.snapshot_cost.is_zero() {
                spin_for(self.hooks.snapshot_cost);
            }
            self.pgs[op.local_pg as usize].next_version(op.object_hash, sub_op_mask);
        }
        let mut results = [SubOpResult::default(); SUB_OPS_CEILING as usize];
        let submitted = {
            let mut out = match output.as_mut() {
                Some(buf) => {
                    let spare = buf.spare_mut();
                    // SAFETY: the region is a pool buffer that this op owns (`op.output`) until
                    // it finishes, and nothing reads or writes it before the store reports the
                    // op complete (from `submit` or from `poll`). Moving the `Buf` handle into
                    // the op does not move the pool memory it points to.
                    unsafe { OutputBuffer::from_raw(spare.as_mut_ptr(), spare.len()) }
                }
                None => OutputBuffer::empty(),
            };
            self.store.submit(
                op_ref.tag(),
                view.oid,
                &store_ops[..count],
                &mut out,
                &mut results[..count],
            )
        };
        let op = self.exec.get(op_ref);
        op.results.count = count as u8;
        op.output = output;
        match submitted {
            Ok(Submit::Done) => {
                self.take_results(op_ref, &results[..count]);
                self.after_store(op_ref)
            }
            Ok(Submit::Pending) => self.hold_pg(op_ref),
            Err(error) => {
                // Failed as a whole: nothing was applied, so no per-sub-op results and no output.
                let op = self.exec.get(op_ref);
                op.results.count = 0;
                if let Some(buf) = op.output.take() {
                    self.pools.release(buf);
                }
                self.finish(op_ref, status_of(error));
            }
        }
        true
    }

    /// Has both transports copy every reply body still in store memory (`Body::Stored`) into
    /// pool buffers, before a mutation may change or free that memory. False when a pool ran
    /// out of buffers first (the mutation waits).
    fn copy_stored_bodies(&mut self) -> bool {
        if self.transport.has_stored_bodies() && !self.transport.copy_stored_bodies(&mut self.pools)
        {
            return false;
        }
        match self.udp.as_mut() {
            Some(udp) if udp.has_stored_bodies() => udp.copy_stored_bodies(&mut self.pools),
            _ => true,
        }
    }

    /// Serves an op of one whole-block read for a client of this core (TCP or the datagram
    /// RPC) from the store's memory, if the store can (`ObjectStore::read_in_place`): the
    /// reply then carries the stored bytes with their kept crc, no copy into an output buffer
    /// and no hashing here (TCP sends them from the store; the datagram RPC keeps its response
    /// as the head and these bytes, copied once, into each packet, when sent). The bytes may
    /// stay queued past this pass, and the RPC keeps them until the client's next request on
    /// the slot; `exec_run` has them copied before any mutation reaches the store, which is
    /// what makes the view sound. True when served.
    fn exec_read_in_place(&mut self, op_ref: OpRef) -> bool {
        let op = self.exec.get(op_ref);
        // Said by the sub-op table's check (`SubOpsSummary::single_read`): no second walk.
        let Some(ReadRange { offset, length }) = op.single_read else {
            return false;
        };
        debug_assert!(!op.mutates && op.header.sub_op_count == 1);
        // TCP's kernel copy waits on memory without the hint (see `StoredBytes::prefetch`).
        // The RPC copies into its packets at the end of the pass too, but whether the hint
        // pays there is unmeasured (no hardware counters here; callgrind counts only its cost).
        let prefetch = match op.origin {
            Origin::Local(ReplyTo::Tcp(_)) => true,
            Origin::Local(ReplyTo::Udp(_)) => false,
            _ => return false,
        };
        let frame = op
            .frame
            .as_ref()
            .expect("an op holds its frame until it finishes");
        let oid = Frame::oid_of(&op.header, frame.as_slice());
        // Within what the usual path could answer, and what a pool buffer holds should it
        // have to be copied after all.
        if length > self.pools.small.buffer_size() as u64 {
            return false;
        }
        let Some(read) = self.store.read_in_place(oid, offset, length) else {
            return false;
        };
        assert_eq!(read.len as u64, length, "a whole read or none");
        // SAFETY: the store keeps these bytes unchanged until its next mutating submit, and
        // this core submits none while a reply holds them: `exec_run` has the transport copy
        // every `Body::Stored` first (and the view stays on this core).
        let stored = unsafe { StoredBytes::new(read.ptr, read.len, read.crc) };
        if prefetch {
            stored.prefetch();
        }
        let op = self.exec.get(op_ref);
        op.results.count = 1;
        op.results.items[0] = (u32::from(STATUS_OK), read.len as u32);
        op.stored = Some(stored);
        self.after_store(op_ref);
        true
    }

    /// Records the store's per-sub-op results and seals the output they describe.
    fn take_results(&mut self, op_ref: OpRef, results: &[SubOpResult]) {
        let op = self.exec.get(op_ref);
        debug_assert_eq!(results.len(), usize::from(op.results.count));
        let mut output_used = 0;
        for (item, result) in op.results.items.iter_mut().zip(results) {
            debug_assert!(
                result.out_len == 0 || result.out_offset as usize == output_used,
                "outputs back to back"
            );
            *item = (u32::from(result.status), result.out_len);
            output_used += result.out_len as usize;
        }
        if let Some(buf) = op.output.as_mut() {
            buf.seal(output_used);
        }
    }

    /// An op that fails before reaching the store.
    fn finish_early(&mut self, op_ref: OpRef, status: Status) -> bool {
        self.finish(op_ref, status);
        true
    }

    fn hold_pg(&mut self, op_ref: OpRef) {
        let op = self.exec.get(op_ref);
        if op.mutates && !op.holds_pg {
            op.holds_pg = true;
            let local_pg = op.local_pg;
            self.pgs[local_pg as usize].unacked_writes += 1;
        }
    }

    /// The store has the op: acknowledge now, or after the replication hook's simulated acks.
    fn after_store(&mut self, op_ref: OpRef) {
        let op = self.exec.get(op_ref);
        if op.mutates && self.hooks.replicas > 0 {
            self.hold_pg(op_ref);
            let deadline = self.now_ns() + self.hooks.replication_cost.as_nanos() as u64;
            self.timers.arm(deadline, op_ref.tag());
        } else {
            let status = first_failure(&op.results);
            self.finish(op_ref, status);
        }
    }

    fn finish(&mut self, op_ref: OpRef, status: Status) {
        count_op(&mut self.counters, self.exec.get(op_ref), status);
        // The slot is released with its contents in place (`OpTable::release`): only what
        // the op owns is taken out. Moving the whole entry out and a default in
        // (`OpTable::free`) copied it twice, ~140 instructions per op; `exec_start` writes
        // every field of the next op anyway.
        let op = self.exec.get(op_ref);
        let frame = op
            .frame
            .take()
            .expect("an op holds its frame until it finishes");
        let (output, stored) = (op.output.take(), op.stored.take());
        let (origin, holds_pg, local_pg) = (op.origin, op.holds_pg, op.local_pg);
        if holds_pg {
            let pg = &mut self.pgs[local_pg as usize];
            pg.unacked_writes -= 1;
            if pg.unacked_writes == 0 && pg.queued > 0 {
                self.mark_ready(local_pg);
            }
        }
        if let Origin::Local(to) = origin {
            // The common case, answered from the slot's header and results in place
            // (`send_reply` takes the fields it needs, so the slot stays borrowed; copying
            // them out first for `reply` was a 132-byte memcpy per op).
            self.pools.release_lease(frame);
            let body = match stored {
                Some(stored) => Body::Stored(stored),
                None => output.map_or(Body::None, Body::Buf),
            };
            let op = self.exec.get(op_ref);
            let refused = send_reply(
                &mut self.transport,
                &mut self.udp,
                &mut self.pools,
                to,
                &op.header,
                status,
                op.results.as_slice(),
                body,
            );
            self.exec.release(op_ref);
            if let Some(body) = refused {
                self.release_body(body); // The client went away; nothing to answer.
            }
            return;
        }
        let op = self.exec.get(op_ref);
        let results = op.results;
        self.exec.release(op_ref);
        match origin {
            Origin::Local(_) => unreachable!("answered in place above"),
            Origin::Remote { core, op: origin } => {
                self.send(
                    core,
                    Message::Done {
                        origin,
                        status,
                        results,
                        output,
                        frame,
                    },
                );
            }
            Origin::Nbd { request, part } => {
                self.nbd_part_done((request, part), frame, status, results, output);
            }
            Origin::None => unreachable!("exec ops always have an origin"),
        }
    }

    // ---- store completions and timers -----------------------------------------------------

    fn poll_store(&mut self) -> usize {
        // Gathered first, handled after: handling needs `&mut self`, which `store.poll` holds.
        let mut completed = std::mem::take(&mut self.store_completed);
        let mut count = 0;
        self.store.poll(completed.len(), &mut |tag, result| {
            let (slot_tag, slot_result, slot_results, slot_count) = &mut completed[count];
            count += 1;
            *slot_tag = tag;
            *slot_result = result.map(|results| {
                slot_results[..results.len()].copy_from_slice(results);
                *slot_count = results.len();
            });
        });
        for (tag, result, results, results_count) in &completed[..count] {
            let op_ref = OpRef::from_tag(*tag);
            match result {
                Ok(()) => {
                    self.take_results(op_ref, &results[..*results_count]);
                    self.after_store(op_ref)
                }
                Err(error) => {
                    let op = self.exec.get(op_ref);
                    op.results.count = 0;
                    if let Some(buf) = op.output.take() {
                        self.pools.release(buf);
                    }
                    self.finish(op_ref, status_of(*error))
                }
            }
        }
        self.store_completed = completed;
        count
    }

    /// Fires the timers due at `now` (the pass's time: a timer fires at most one pass late).
    fn poll_timers(&mut self, now: u64) -> usize {
        let mut fired = 0;
        while let Some(tag) = self.timers.pop_due(now) {
            let op_ref = OpRef::from_tag(tag);
            let status = first_failure(&self.exec.get(op_ref).results);
            self.finish(op_ref, status);
            fired += 1;
        }
        fired
    }

    // ---- cross-core messages --------------------------------------------------------------

    fn send(&mut self, target: usize, message: Message) {
        debug_assert_ne!(target, self.index);
        if !self.outbound[target].is_empty() {
            self.outbound[target].push_back(message);
            return;
        }
        let producer = self.outbox[target]
            .as_mut()
            .expect("a ring to every other core");
        match producer.push(message) {
            Ok(()) => self.wake_pending[target] = true,
            Err(message) => {
                // Back-pressure: the message waits here, in order; nothing is dropped.
                self.counters.add(Counter::ring_full_waits, 1);
                self.outbound[target].push_back(message);
            }
        }
    }

    fn flush_outbound(&mut self) -> usize {
        let mut work = 0;
        for target in 0..self.outbound.len() {
            while let Some(message) = self.outbound[target].pop_front() {
                let producer = self.outbox[target]
                    .as_mut()
                    .expect("a ring to every other core");
                match producer.push(message) {
                    Ok(()) => {
                        self.wake_pending[target] = true;
                        work += 1;
                    }
                    Err(message) => {
                        self.outbound[target].push_front(message);
                        break;
                    }
                }
            }
            if self.wake_pending[target] {
                self.wake_pending[target] = false;
                self.wakers[target].wake_if_sleeping();
            }
        }
        work
    }

    /// Starts deferred remote ops while exec slots are free, oldest first.
    fn start_deferred_remote(&mut self) -> usize {
        let mut work = 0;
        while self.exec.free_count() > 0 {
            let Some(op) = self.deferred_remote.pop_front() else {
                break;
            };
            self.exec_start(
                Origin::Remote {
                    core: op.source,
                    op: op.origin,
                },
                op.header,
                op.frame,
                op.summary,
                op.local_pg,
                op.object_hash,
            );
            work += 1;
        }
        work
    }

    fn poll_inbox(&mut self) -> usize {
        let mut work = 0;
        for source in 0..self.inbox.len() {
            for _ in 0..INBOX_BATCH_MAX {
                let Some(consumer) = self.inbox[source].as_mut() else {
                    break;
                };
                let Some(message) = consumer.pop() else { break };
                work += 1;
                self.on_message(source, message);
            }
        }
        work
    }

    fn on_message(&mut self, source: usize, message: Message) {
        match message {
            Message::Adopt(stream) => {
                self.transport.adopt(stream);
            }
            Message::AdoptNbd(stream) => match self.nbd.as_mut() {
                Some(nbd) => nbd.adopt(stream),
                None => log::warn!("core {}: NBD connection without a frontend", self.index),
            },
            Message::Execute {
                origin,
                header,
                frame,
                summary,
                local_pg,
                object_hash,
            } => {
                self.counters.add(Counter::ops_remote_in, 1);
                if self.exec.free_count() == 0 || !self.deferred_remote.is_empty() {
                    assert!(
                        self.deferred_remote.len() < self.deferred_remote.capacity(),
                        "more remote ops than the senders' client slots"
                    );
                    self.deferred_remote.push_back(DeferredExecute {
                        source,
                        origin,
                        header,
                        frame,
                        summary,
                        local_pg,
                        object_hash,
                    });
                    return;
                }
                self.exec_start(
                    Origin::Remote {
                        core: source,
                        op: origin,
                    },
                    header,
                    frame,
                    summary,
                    local_pg,
                    object_hash,
                );
            }
            Message::Done {
                origin,
                status,
                results,
                output,
                frame,
            } => {
                let client = self.client.free(origin);
                if let Some(part) = client.nbd {
                    self.nbd_part_done(part, frame, status, results, output);
                    return;
                }
                self.pools.release_lease(frame);
                let body = output.map_or(Body::None, Body::Buf);
                let conn = client.conn.expect("client ops record their connection");
                self.reply(conn, &client.header, status, results.as_slice(), body);
            }
            Message::Release(body) => {
                let leftover = self.pools.release_body(body);
                assert!(
                    leftover.is_none(),
                    "a buffer was sent to a core that is not its home"
                );
            }
        }
    }

    fn route_foreign_bodies(&mut self) -> usize {
        let mut work = 0;
        while let Some(body) = self.transport.take_foreign() {
            let home = body.home_core().expect("foreign bodies have a home");
            self.send(home, Message::Release(body));
            work += 1;
        }
        while let Some(body) = self.udp.as_mut().and_then(|udp| udp.take_foreign()) {
            let home = body.home_core().expect("foreign bodies have a home");
            self.send(home, Message::Release(body));
            work += 1;
        }
        while let Some(body) = self.nbd.as_mut().and_then(|nbd| nbd.take_foreign()) {
            let home = body.home_core().expect("foreign bodies have a home");
            self.send(home, Message::Release(body));
            work += 1;
        }
        work
    }

    // ---- counters -----------------------------------------------------------------------

    fn publish_now(&mut self) {
        let transport = self.transport.stats();
        let store = self.store.stats();
        let c = &mut self.counters;
        c.set(Counter::conn_accepted, transport.accepted);
        c.set(Counter::conn_closed, transport.closed);
        c.set(Counter::conn_refused, transport.refused);
        c.set(Counter::accept_rescues, transport.accept_rescues);
        c.set(Counter::connections, transport.connections);
        c.set(Counter::conn_truncated, transport.truncated);
        c.set(Counter::conn_evicted, transport.evicted);
        c.set(Counter::rx_bytes, transport.rx_bytes);
        c.set(Counter::tx_bytes, transport.tx_bytes);
        c.set(Counter::rx_copied_bytes, transport.rx_copied_bytes);
        c.set(Counter::tx_stored_bodies, transport.stored_bodies_tx);
        c.set(
            Counter::tx_stored_bodies_copied,
            transport.stored_bodies_copied,
        );
        c.set(Counter::rx_syscalls, transport.rx_syscalls);
        c.set(Counter::epoll_polls, self.epoll_polls);
        c.set(Counter::epoll_errors, transport.epoll_errors);
        c.set(Counter::uring_enters, transport.uring_enters);
        c.set(Counter::tx_syscalls, transport.tx_syscalls);
        c.set(Counter::tx_iovecs, transport.tx_iovecs);
        c.set(Counter::rx_pool_waits, transport.rx_pool_waits);
        c.set(
            Counter::ops_in_flight,
            (self.exec.in_flight() + self.client.in_flight()) as u64,
        );
        c.set(Counter::buffers_in_use, u64::from(self.pools.in_use()));
        c.set(Counter::stalls, self.stall.stalls);
        c.set(Counter::timers_armed, self.timers.len() as u64);
        c.set(Counter::pgs, self.pgs.len() as u64);
        c.set(
            Counter::pg_log_entries,
            self.pgs.iter().map(|pg| pg.log.len() as u64).sum(),
        );
        c.set(
            Counter::pg_version_max,
            self.pgs.iter().map(|pg| pg.version).max().unwrap_or(0),
        );
        c.set(
            Counter::pg_id_max,
            self.pgs
                .iter()
                .map(|pg| u64::from(pg.id))
                .max()
                .unwrap_or(0),
        );
        c.set(Counter::store_objects, store.objects);
        c.set(Counter::store_bytes, store.bytes_stored);
        c.set(Counter::store_capacity_bytes, store.capacity_bytes);
        c.set(
            Counter::store_device_bytes_written,
            store.device_bytes_written,
        );
        c.set(
            Counter::store_client_bytes_written,
            store.client_bytes_written,
        );
        c.set(Counter::store_records_written, store.records_written);
        let allocations = (self.alloc_counter)() - self.alloc_base - self.alloc_excluded;
        c.set(Counter::allocations, allocations);
        c.set(Counter::stream_malformed, transport.malformed);
        c.set(Counter::stream_over_limit, transport.over_limit);
        if let Some(udp) = self.udp.as_ref() {
            publish_udp(c, &udp.stats());
        }
        if let Some(nbd) = self.nbd.as_ref() {
            let stats = nbd.stats();
            c.set(Counter::nbd_requests, stats.requests);
            c.set(Counter::nbd_errors, stats.errors);
            c.set(Counter::nbd_accept_rescues, stats.accept_rescues);
            c.set(Counter::nbd_protocol_errors, stats.protocol_errors);
            c.set(Counter::nbd_connections, nbd.connection_count() as u64);
        }
        self.shared.publish(&self.counters);
        for (target, producer) in self.outbox.iter().enumerate() {
            if let Some(producer) = producer {
                self.shared
                    .publish_ring(target, producer.len() + self.outbound[target].len());
            }
        }
    }

    /// Logs what the core waits on when ops in flight made no progress for a while.
    fn watch_for_stall(&mut self) {
        let progress = self.counters.get(Counter::ops) + self.transport.stats().tx_bytes;
        let in_flight = self.exec.in_flight() + self.client.in_flight();
        if !self.stall.check(Instant::now(), progress, in_flight) {
            return;
        }
        let pgs = self
            .pgs
            .iter()
            .filter(|pg| pg.queued > 0 || pg.unacked_writes > 0);
        let pg_text: Vec<String> = pgs
            .take(8)
            .map(|pg| {
                format!(
                    "pg {} queued {} unacked {}",
                    pg.id, pg.queued, pg.unacked_writes
                )
            })
            .collect();
        log::warn!(
            "core {}: no op finished for {} s with {} exec and {} client ops in flight; ready pgs {}, timers {}, outbound {:?}, pending tx {}; {}; store: busy {}, {}",
            self.index,
            STALL_REPORT_AFTER.as_secs(),
            self.exec.in_flight(),
            self.client.in_flight(),
            self.ready_pgs.len(),
            self.timers.len(),
            self.outbound.iter().map(|q| q.len()).collect::<Vec<_>>(),
            self.transport.has_pending_tx(),
            pg_text.join(", "),
            self.store.busy(),
            self.store.debug_state()
        );
    }

    fn locally_quiet(&self) -> bool {
        self.exec.in_flight() == 0
            && self.client.in_flight() == 0
            && self.deferred_remote.is_empty()
            && self.outbound.iter().all(|q| q.is_empty())
            && !self.transport.has_pending_tx()
            && self.udp.as_ref().is_none_or(|udp| !udp.has_pending_tx())
            && self.nbd.as_ref().is_none_or(|nbd| nbd.is_quiet())
            && self.inbox.iter().flatten().all(|c| c.is_empty())
    }

    /// Closes connections and hands back the pools; called on the core's thread after the loop.
    pub fn into_pools(mut self) -> CorePools {
        self.transport.close_all(&mut self.pools);
        if let Some(udp) = self.udp.as_mut() {
            udp.close_all(&mut self.pools);
        }
        if let Some(nbd) = self.nbd.as_mut() {
            nbd.close_all(&mut self.pools);
        }
        self.pools
    }
}

/// The UDP transport's counters. `udp_payload_copies` counts copies of request bytes between
/// the socket and the store: one per multi-packet request (reassembly), none for a request in
/// one datagram.
fn publish_udp(c: &mut Counters, udp: &carmine_dataplane::udp::UdpStats) {
    c.set(Counter::udp_datagrams_rx, udp.datagrams_rx);
    c.set(Counter::udp_datagrams_tx, udp.datagrams_tx);
    c.set(Counter::udp_rx_bytes, udp.rx_bytes);
    c.set(Counter::udp_tx_bytes, udp.tx_bytes);
    c.set(Counter::udp_sessions, udp.sessions);
    c.set(Counter::udp_frames_in_place, udp.frames_in_place);
    c.set(Counter::udp_payload_copies, udp.frames_copied);
    c.set(Counter::udp_rx_copied_bytes, udp.rx_copied_bytes);
    c.set(Counter::udp_tx_copied_bytes, udp.tx_copied_bytes);
    // Whole-block reads answered from the store's memory: the output copied once, straight
    // into the response, with the store's crc (and how many first waited in a pool buffer).
    c.set(Counter::udp_replies_from_store, udp.replies_from_store);
    c.set(Counter::udp_stored_bodies_copied, udp.stored_bodies_copied);
    c.set(
        Counter::udp_stored_responses_copied,
        udp.stored_responses_copied,
    );
    // Ops about to change the store that waited for the port's frames sent from store
    // memory to be let go of (zero-copy memif).
    c.set(Counter::udp_stored_frames_waits, udp.stored_frames_waits);
    c.set(
        Counter::udp_malformed,
        udp.malformed_frames + udp.rpc.malformed,
    );
    c.set(Counter::udp_duplicates, udp.rpc.duplicates);
    c.set(Counter::udp_retransmits, udp.rpc.retransmits);
    c.set(
        Counter::udp_pool_waits,
        udp.rx_pool_waits + udp.tx_pool_waits,
    );
    c.set(Counter::udp_dropped_injected, udp.dropped_injected);
    c.set(Counter::udp_sessions_refused, udp.rpc.sessions_refused);
    c.set(Counter::udp_refusals, udp.rpc.refusals);
    // A kernel socket's system calls (zero over DPDK): each recvmmsg / sendmmsg carries up to
    // 32 datagrams.
    c.set(Counter::udp_rx_syscalls, udp.port.recv_calls);
    c.set(Counter::udp_tx_syscalls, udp.port.send_calls);
    // The port's own counters (zero on a kernel socket): over DPDK a received datagram is
    // leased in the mbuf's room (`dpdk_rx_in_place`), or copied once from its mbuf into a pool
    // chunk when the port cannot (`dpdk_rx_copies`).
    c.set(Counter::dpdk_rx_copies, udp.port.rx_copies);
    c.set(Counter::dpdk_rx_copied_bytes, udp.port.rx_copied_bytes);
    c.set(Counter::dpdk_rx_in_place, udp.port.rx_in_place);
    c.set(Counter::dpdk_rx_rooms_leased, udp.port.rx_rooms_leased);
    // Replies: payloads of 1 KiB and more are sent from the response chunk in place
    // (`dpdk_tx_in_place`), smaller ones copied into the frame (`dpdk_tx_copied_bytes`).
    c.set(Counter::dpdk_tx_in_place, udp.port.tx_in_place);
    // Of those, read replies sent from the store's own memory (zero-copy memif).
    c.set(Counter::dpdk_tx_from_store, udp.port.tx_from_store);
    c.set(Counter::dpdk_tx_copied_bytes, udp.port.tx_copied_bytes);
    c.set(Counter::dpdk_tx_attached_held, udp.port.tx_attached_held);
    c.set(Counter::dpdk_arp_replies, udp.port.arp_replies);
    c.set(Counter::dpdk_ignored, udp.port.ignored);
    c.set(Counter::dpdk_tx_full, udp.port.tx_full);
    c.set(Counter::dpdk_tx_dropped, udp.port.tx_dropped);
}

/// Counts a finished op (before its slot gives up the frame and output it counts by).
fn count_op(counters: &mut Counters, op: &ExecOp, status: Status) {
    counters.add(Counter::ops, 1);
    if op.mutates {
        counters.add(Counter::ops_write, 1);
        counters.add(Counter::bytes_written, op.data_bytes);
    } else {
        counters.add(Counter::ops_read, 1);
    }
    if let Some(buf) = op.output.as_ref() {
        counters.add(Counter::bytes_read, buf.sealed_len() as u64);
    }
    if let Some(stored) = op.stored.as_ref() {
        counters.add(Counter::bytes_read, stored.as_slice().len() as u64);
    }
    if status != Status::Ok {
        counters.add(error_counter(status), 1);
    }
}

pub(crate) fn first_failure(results: &Results) -> Status {
    results
        .as_slice()
        .iter()
        .find(|(status, _)| *status != 0)
        .map_or(Status::Ok, |(status, _)| {
            Status::from_u32(*status).unwrap_or(Status::Io)
        })
}

pub(crate) fn spin_for(duration: Duration) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

impl<N: Network> Core for OsdCore<N> {
    fn poll_once(&mut self) -> usize {
        // The order matters: (1) the inbox first, because completions from other cores free the
        // op slots that (2) the network poller needs for new frames (remote ops that waited for
        // an exec slot go before those); (3) store completions and
        // (4) timers finish ops, which (5) may unblock PG queues; (6) replies go out in one
        // writev per connection, and (7) messages, including buffers going home, go last so
        // that every message produced by this pass leaves in it.
        // One clock read per pass, for the network step (the RPC's and epoll's clocks) and the
        // timers.
        let now_ns = self.now_ns();
        let mut work = self.poll_inbox();
        work += self.start_deferred_remote();
        work += self.poll_network(now_ns);
        work += self.poll_store();
        work += self.poll_timers(now_ns);
        work += self.drain_ready_pgs();
        work += self.transport.flush_tx(&mut self.pools);
        if let Some(udp) = self.udp.as_mut() {
            work += udp.flush_tx(&mut self.pools);
        }
        if let Some(nbd) = self.nbd.as_mut() {
            work += nbd.flush_tx(&mut self.pools);
        }
        work += self.route_foreign_bodies();
        work += self.flush_outbound();
        work
    }

    fn park(&mut self, timeout: Duration) {
        let waker = &self.wakers[self.index];
        waker.prepare_park();
        if self.inbox.iter().flatten().any(|c| !c.is_empty()) {
            waker.finish_park();
            return;
        }
        self.transport.poll_events(timeout);
        self.wakers[self.index].finish_park();
    }

    fn park_timeout(&self) -> Duration {
        let mut longest = PARK_TIMEOUT_MAX;
        if self.nic_polled {
            // A polled NIC queue signals nothing: sleeping would leave its packets waiting.
            return Duration::ZERO;
        }
        if self.store.busy() {
            if !self.store_wakes {
                // Device completions would not wake a parked core: keep polling.
                return Duration::ZERO;
            }
            // Completions signal this core's waker; the cap bounds how late store work that
            // waits on no I/O (the cleaner short of space, say) is picked up again.
            longest = STORE_BUSY_PARK_MAX;
        }
        match self.timers.next_deadline() {
            Some(deadline) => {
                Duration::from_nanos(deadline.saturating_sub(self.now_ns())).min(longest)
            }
            None => longest,
        }
    }

    fn publish(&mut self, loop_counters: &LoopCounters) {
        self.watch_for_stall();
        self.counters.set(Counter::busy_ns, loop_counters.busy_ns);
        self.counters
            .set(Counter::busy_cpu_ns, loop_counters.busy_cpu_ns);
        self.counters.set(Counter::cpu_ns, loop_counters.cpu_ns);
        self.counters.set(Counter::idle_ns, loop_counters.idle_ns);
        self.counters.set(Counter::passes, loop_counters.passes);
        self.counters
            .set(Counter::busy_passes, loop_counters.busy_passes);
        self.counters.set(Counter::parks, loop_counters.parks);
        self.counters
            .set(Counter::coalesce_pauses, loop_counters.coalesce_pauses);
        self.counters.set(
            Counter::coalesce_windows_on,
            loop_counters.coalesce_windows_on,
        );
        self.counters.set(
            Counter::coalesce_tries_failed,
            loop_counters.coalesce_tries_failed,
        );
        self.publish_now();
    }

    fn may_coalesce(&self) -> bool {
        !self.store.busy()
    }

    fn waits_on_device(&self) -> bool {
        // As `park_timeout`: a parked core hears of completions only when the store signals.
        !self.nic_polled && self.store_wakes && self.store.busy()
    }

    fn drained(&self) -> bool {
        let bit = 1u64 << self.index;
        if self.locally_quiet() {
            let mask = self.shutdown.quiet_mask.fetch_or(bit, Ordering::AcqRel) | bit;
            mask == self.shutdown.all_mask
        } else {
            self.shutdown.quiet_mask.fetch_and(!bit, Ordering::AcqRel);
            false
        }
    }
}

/// Sends a reply on the transport `to` names; gives the body back when the client went away
/// (TCP). Over the fields it needs rather than `&mut self`, so that `finish` can pass the op
/// slot's header and results in place.
#[allow(clippy::too_many_arguments)]
fn send_reply<N: Network>(
    transport: &mut N,
    udp: &mut Option<Box<dyn RpcNet>>,
    pools: &mut CorePools,
    to: ReplyTo,
    header: &Header,
    status: Status,
    results: &[(u32, u32)],
    body: Body,
) -> Option<Body> {
    match to {
        ReplyTo::Tcp(conn) => transport.reply(conn, header, status, results, body).err(),
        ReplyTo::Udp(handle) => {
            let udp = udp
                .as_mut()
                .expect("UDP requests come from the UDP transport");
            udp.reply(pools, handle, header, status, results, body);
            None
        }
    }
}
