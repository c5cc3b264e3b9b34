//! The NBD frontend of one core: its NBD connections (negotiation and transmission), and the
//! table of block requests in flight.
//!
//! A block request becomes object ops: the range is split (`image::split`) at object
//! boundaries and at `part_bytes`, and each part is encoded as an ordinary OSD_OP frame (one
//! sub-op on `NAME.<index>`) in this core's frame arena, a receive chunk from the small pool.
//! The core dispatches those frames exactly like frames from the wire (`OsdCore::
//! dispatch_nbd_parts`): placement, the cross-core hop, PG ordering, the store. Each part's
//! completion comes back here (`complete`); the reply is queued when every part has finished.
//!
//! Negotiation needs the store too (`NBD_OPT_LIST` reads the image directory, `NBD_OPT_GO`
//! an image's header): those reads travel the same way, as one-part requests.
//!
//! This file holds the frontend's types and a connection's life (epoll set, accept, close);
//! `rx` reads connections and consumes what arrived, `handshake` is the options phase,
//! `transmission` cuts requests into parts, `completion` finishes parts and requests, `tx`
//! writes replies.
//!
//! Bounded: connections, requests, parts waiting for op slots and per-connection replies are
//! tables sized at start-up (or at accept, for a connection's buffers); a full table stops the
//! reading of requests, never drops one. Write data is copied once, from the connection's
//! receive buffer into the part's frame (the frame must be contiguous behind its header).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use carmine_dataplane::buffers::{Body, CorePools};
use carmine_dataplane::listener_audit::ListenerAudit;
use carmine_dataplane::pool::{Buf, Lease};
use carmine_dataplane::wire::{Header, Opcode, Status, SubOpCode, HEADER_SIZE, SUB_OP_DESC_SIZE};

use crate::nbd::image::{self, ImageHeader, Oid};
use crate::nbd::protocol::{self as nbd, Request as NbdRequest, Verdict, OPTION_BYTES_MAX};
use crate::osd::op_table::{OpRef, OpTable};

mod completion;
mod handshake;
mod rx;
mod transmission;
mod tx;
use completion::*;
use handshake::*;
use rx::*;
use transmission::*;
use tx::*;

/// NBD connections one core serves at once.
pub const CONNECTIONS_PER_CORE_MAX: u32 = 256;
/// Requests of one connection past parsing and not yet answered; beyond, it is not read.
pub const INFLIGHT_PER_CONNECTION_MAX: u32 = 128;
/// Block requests in flight on one core (all its connections).
pub const REQUESTS_PER_CORE_MAX: u32 = 1024;
/// Largest part of a request, in bytes: a part's frame (data plus header, object id and sub-op
/// descriptor) must fit one receive chunk, and its read output one chunk too.
pub const PART_BYTES_MAX: usize = 64 << 10;
/// Parts of one read or write: so the largest request is 32 parts (2 MiB with 64 KiB parts),
/// plus one for a start that is not part-aligned.
pub const REQUEST_PARTS_MAX: usize = 33;
/// Parts built and waiting for op slots on this core.
const PARTS_QUEUED_MAX: usize = 4096;
/// Zero/trim parts of one request in flight at once (a trim of a whole image has thousands).
const ZERO_PARTS_IN_FLIGHT_MAX: u32 = 8;
/// Small buffers kept free for the store's outputs: the frontend takes a new arena chunk only
/// above this, so frames waiting for outputs can never hold every buffer.
const POOL_RESERVE_COUNT: u32 = 4;
/// Events taken from epoll per call.
const EPOLL_EVENTS_MAX: usize = 64;
/// iovecs per writev (a read reply of 33 parts needs up to 67).
const TX_IOVECS_MAX: usize = 256;

const TOKEN_LISTENER: u64 = u64::MAX;

/// Objects one BLOCK_STATUS request asks about (one Stat part each); the reply covers those
/// objects' part of the range (a client asks again for the rest).
pub const BLOCK_STATUS_OBJECTS_MAX: usize = 16;
/// Descriptors of one BLOCK_STATUS reply: at most a data and a hole extent per object.
const BLOCK_EXTENTS_MAX: usize = 2 * BLOCK_STATUS_OBJECTS_MAX;
/// `Request::object_sizes` of an object the store does not have.
const OBJECT_MISSING: u32 = u32::MAX;

/// Zero bytes for the parts of a read that the store did not have (never written, or short).
static ZEROES: [u8; PART_BYTES_MAX] = [0; PART_BYTES_MAX];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    Read,
    Write,
    /// TRIM or WRITE_ZEROES: zero (or remove) each object range.
    Zero,
    /// A negotiation read: the directory (LIST) or an image header (GO, INFO, EXPORT_NAME).
    Option(u32),
    /// BLOCK_STATUS (`base:allocation`): a Stat of each object in the range.
    BlockStatus,
}

/// A built part, waiting for the core to dispatch it.
pub struct PartOp {
    pub request: OpRef,
    pub part: u8,
    pub header: Header,
    pub frame: Lease,
}

struct Request {
    conn: u32,
    conn_generation: u32,
    cookie: u64,
    kind: Kind,
    parts_issued: u32,
    parts_done: u32,
    /// The part of the range not yet issued (image offset and length).
    next_offset: u64,
    remaining: u64,
    /// NBD error of the first failing part (0: none).
    error: u32,
    /// Listed in `Work::pump` (a zero request with ranges left to issue).
    in_pump: bool,
    /// WRITE_ZEROES with NO_HOLE: zero whole objects too, never remove them.
    no_hole: bool,
    /// Reads: each part's length and output (short or missing outputs read as zeroes).
    /// Block status: each object's part of the range.
    lengths: [u32; REQUEST_PARTS_MAX],
    outputs: [Option<Buf>; REQUEST_PARTS_MAX],
    /// Block status: REQ_ONE (one descriptor); each object's size (`OBJECT_MISSING`); the
    /// reply's descriptors, built when every Stat has answered.
    req_one: bool,
    object_sizes: [u32; BLOCK_STATUS_OBJECTS_MAX],
    extents: [u8; BLOCK_EXTENTS_MAX * nbd::BLOCK_DESCRIPTOR_BYTES],
    extent_count: u8,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            conn: 0,
            conn_generation: 0,
            cookie: 0,
            kind: Kind::Read,
            parts_issued: 0,
            parts_done: 0,
            next_offset: 0,
            remaining: 0,
            error: 0,
            in_pump: false,
            no_hole: false,
            lengths: [0; REQUEST_PARTS_MAX],
            outputs: std::array::from_fn(|_| None),
            req_one: false,
            object_sizes: [0; BLOCK_STATUS_OBJECTS_MAX],
            extents: [0; BLOCK_EXTENTS_MAX * nbd::BLOCK_DESCRIPTOR_BYTES],
            extent_count: 0,
        }
    }
}

/// What a new request starts with. A request slot is reset field by field
/// (`Request::start`), never rebuilt whole: `Request` is over a kilobyte (its arrays), and
/// building one, moving it in, and moving it out with a default left behind were three such
/// copies per request.
#[derive(Clone, Copy, Default)]
struct Start {
    conn: u32,
    conn_generation: u32,
    cookie: u64,
    kind: Kind,
    next_offset: u64,
    remaining: u64,
    no_hole: bool,
    req_one: bool,
}

impl Request {
    /// Resets a freed slot for a new request. The arrays need no reset: `lengths` and
    /// `object_sizes` are written per part before they are read, `extents` when the reply is
    /// built, and `outputs` are all `None` once a request is freed (`free_request`).
    fn start(&mut self, start: Start) {
        debug_assert!(self.outputs.iter().all(|o| o.is_none()));
        self.conn = start.conn;
        self.conn_generation = start.conn_generation;
        self.cookie = start.cookie;
        self.kind = start.kind;
        self.parts_issued = 0;
        self.parts_done = 0;
        self.next_offset = start.next_offset;
        self.remaining = start.remaining;
        self.error = 0;
        self.in_pump = false;
        self.no_hole = start.no_hole;
        self.req_one = start.req_one;
        self.extent_count = 0;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the client's 4 flag bytes.
    ClientFlags,
    Options,
    Transmission,
}

struct TxReply {
    head: [u8; nbd::REPLY_HEAD_MAX_BYTES],
    head_len: u8,
    /// A successful read or block status: its request holds the payload (outputs or
    /// descriptors, `payload`); freed once sent.
    body: Option<OpRef>,
    sent: usize,
}

/// The export a connection chose.
#[derive(Clone, Copy)]
struct Export {
    name: [u8; image::NAME_BYTES_MAX],
    name_len: usize,
    header: ImageHeader,
}

struct Conn {
    stream: TcpStream,
    generation: u32,
    phase: Phase,
    no_zeroes: bool,
    /// The client asked for structured replies (NBD_OPT_STRUCTURED_REPLY).
    structured: bool,
    /// `base:allocation` was selected (NBD_OPT_SET_META_CONTEXT) for the export named
    /// `meta_export`; a GO for another export drops it.
    meta_allocation: bool,
    meta_export: [u8; image::NAME_BYTES_MAX],
    meta_export_len: usize,
    /// Received bytes `[in_start, in_end)` not yet consumed.
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// Bytes still to drop (an oversized option or write).
    discard: u64,
    /// A write whose data is still arriving.
    write: Option<OpRef>,
    /// A negotiation read in flight: no more options are read until it answers.
    option_pending: bool,
    /// The name of the option being answered (GO/INFO/EXPORT_NAME).
    pending: Option<Export>,
    export: Option<Export>,
    /// Negotiation output, sent before any transmission reply.
    ctl: Vec<u8>,
    ctl_sent: usize,
    tx: VecDeque<TxReply>,
    inflight: u32,
    in_rx_list: bool,
    in_tx_list: bool,
    peer_closed: bool,
    /// Read nothing more; close once every request is answered and sent.
    closing: bool,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct NbdStats {
    pub accepted: u64,
    pub closed: u64,
    pub requests: u64,
    pub errors: u64,
    pub protocol_errors: u64,
    /// Connections accepted without an epoll edge (`ListenerAudit`, as the TCP transport's).
    pub accept_rescues: u64,
}

/// Everything but the connections, so that a connection and the rest borrow separately.
struct Work {
    core: usize,
    part_bytes: usize,
    /// Parts a read may have (and so the largest request: one less, times `part_bytes`).
    request_parts_max: usize,
    /// Read outputs this core's requests may hold at once, and how many they hold. A read
    /// keeps every part's output until its reply is sent, so reads that each hold some and
    /// wait for more could otherwise take every buffer of a pool and wait forever. All cores'
    /// budgets together are half of one core's small pool (outputs come from the pool of the
    /// core that runs the part, which may be any core).
    read_parts_budget: usize,
    read_parts_held: usize,
    /// Parts built and not yet completed (queued, or in the op path).
    parts_outstanding: usize,
    requests: OpTable<Request>,
    parts: VecDeque<PartOp>,
    /// Zero/trim requests with parts left to issue.
    pump: VecDeque<OpRef>,
    arena: Option<Buf>,
    foreign: Vec<Body>,
    stats: NbdStats,
}

pub struct NbdFrontend {
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
    listener: Option<TcpListener>,
    accept_ready: bool,
    listener_audit: ListenerAudit,
    /// The last `epoll_wait` stopped at its event limit: more may be ready, and the nested
    /// set's readiness (which the transport reports) will not fire again for them.
    events_full: bool,
    conns: Vec<Option<Conn>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    rx_list: VecDeque<u32>,
    tx_list: Vec<u32>,
    tx_list_spare: Vec<u32>,
    work: Work,
}

fn epoll_ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: `event` is a valid epoll_event for the duration of the call; fds are checked by the kernel.
    let rc = unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The part size for receive chunks of `chunk_bytes`: the largest power of two that leaves
/// room for a frame's header, object id and descriptor, at most `PART_BYTES_MAX`.
pub fn part_bytes_for(chunk_bytes: usize) -> usize {
    let room = chunk_bytes - 4096;
    let power = 1usize << (usize::BITS - 1 - room.leading_zeros());
    power.min(PART_BYTES_MAX)
}

impl NbdFrontend {
    /// `chunk_bytes` and `chunk_count`: each core's small pool; `cores`: how many cores.
    pub fn new(
        core: usize,
        cores: usize,
        chunk_bytes: usize,
        chunk_count: u32,
    ) -> io::Result<NbdFrontend> {
        let read_parts_budget = (chunk_count as usize / 2 / cores).max(2);
        // SAFETY: no preconditions; result checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let count = CONNECTIONS_PER_CORE_MAX as usize;
        Ok(NbdFrontend {
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EPOLL_EVENTS_MAX],
            listener: None,
            accept_ready: false,
            listener_audit: ListenerAudit::new(),
            events_full: true,
            conns: (0..count).map(|_| None).collect(),
            generations: vec![0; count],
            free: (0..count as u32).rev().collect(),
            rx_list: VecDeque::with_capacity(count),
            tx_list: Vec::with_capacity(count),
            tx_list_spare: Vec::with_capacity(count),
            work: Work {
                core,
                part_bytes: part_bytes_for(chunk_bytes),
                request_parts_max: read_parts_budget.min(REQUEST_PARTS_MAX),
                read_parts_budget,
                read_parts_held: 0,
                parts_outstanding: 0,
                requests: OpTable::new(REQUESTS_PER_CORE_MAX),
                parts: VecDeque::with_capacity(PARTS_QUEUED_MAX),
                pump: VecDeque::with_capacity(REQUESTS_PER_CORE_MAX as usize),
                arena: None,
                foreign: Vec::with_capacity(1024),
                stats: NbdStats::default(),
            },
        })
    }

    /// The epoll descriptor, for the core to sleep on with its own (nested epoll).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn stats(&self) -> NbdStats {
        self.work.stats
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    pub fn listen(&mut self, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            TOKEN_LISTENER,
        )?;
        self.listener = Some(listener);
        self.accept_ready = true;
        Ok(())
    }

    pub fn poll_accept(&mut self) -> Option<(TcpStream, SocketAddr)> {
        let listener = self.listener.as_ref()?;
        if !self.accept_ready
            && self.listener_audit.tick()
            && self
                .listener_audit
                .look(listener.as_raw_fd(), std::time::Instant::now())
        {
            self.accept_ready = true;
            self.work.stats.accept_rescues += 1;
            log::warn!(
                "core {}: NBD connections waited in the accept queue with no epoll event for \
                 them; accepting them anyway (status nbd_accept_rescues {})",
                self.work.core,
                self.work.stats.accept_rescues
            );
        }
        if !self.accept_ready {
            return None;
        }
        match listener.accept() {
            Ok(pair) => {
                self.listener_audit.on_accept();
                Some(pair)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    log::warn!("core {}: NBD accept failed: {e}", self.work.core);
                }
                self.accept_ready = false;
                None
            }
        }
    }

    /// Makes `stream` one of this core's NBD connections and greets the client.
    pub fn adopt(&mut self, stream: TcpStream) {
        let Some(index) = self.free.pop() else {
            log::warn!(
                "core {}: NBD connection refused: {CONNECTIONS_PER_CORE_MAX} is the limit",
                self.work.core
            );
            return;
        };
        let generation = self.generations[index as usize].wrapping_add(1);
        self.generations[index as usize] = generation;
        let setup = stream
            .set_nonblocking(true)
            .and_then(|_| stream.set_nodelay(true))
            .and_then(|_| {
                let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
                epoll_ctl(
                    self.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    stream.as_raw_fd(),
                    events as u32,
                    u64::from(generation) << 32 | u64::from(index),
                )
            });
        if let Err(e) = setup {
            log::warn!("core {}: cannot set up NBD connection: {e}", self.work.core);
            self.free.push(index);
            return;
        }
        // Per-connection buffers are allocated here, at accept, never per request.
        let mut ctl = Vec::with_capacity(1024);
        ctl.extend_from_slice(&nbd::greeting());
        self.conns[index as usize] = Some(Conn {
            stream,
            generation,
            phase: Phase::ClientFlags,
            no_zeroes: false,
            structured: false,
            meta_allocation: false,
            meta_export: [0; image::NAME_BYTES_MAX],
            meta_export_len: 0,
            inbuf: vec![0u8; 2 * self.work.part_bytes + 4096].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            discard: 0,
            write: None,
            option_pending: false,
            pending: None,
            export: None,
            ctl,
            ctl_sent: 0,
            tx: VecDeque::with_capacity(INFLIGHT_PER_CONNECTION_MAX as usize + 1),
            inflight: 0,
            in_rx_list: true,
            in_tx_list: true,
            peer_closed: false,
            closing: false,
        });
        self.rx_list.push_back(index);
        self.tx_list.push(index);
        self.work.stats.accepted += 1;
    }

    /// Whether `poll_events` must run even though the transport did not see the set ready.
    pub fn events_may_be_pending(&self) -> bool {
        self.events_full
    }

    /// Collects readiness; never blocks.
    pub fn poll_events(&mut self) -> usize {
        // SAFETY: `events` holds EPOLL_EVENTS_MAX initialised entries the kernel may overwrite.
        let count = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                EPOLL_EVENTS_MAX as i32,
                0,
            )
        };
        self.events_full = count == EPOLL_EVENTS_MAX as i32;
        if count <= 0 {
            return 0;
        }
        for event_index in 0..count as usize {
            let libc::epoll_event { events, u64: token } = self.events[event_index];
            if token == TOKEN_LISTENER {
                self.accept_ready = true;
                continue;
            }
            let index = token as u32;
            let Some(conn) = self.conns.get_mut(index as usize).and_then(|c| c.as_mut()) else {
                continue;
            };
            if conn.generation != (token >> 32) as u32 {
                continue;
            }
            let hangup = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
            if events & hangup != 0 {
                conn.peer_closed = true;
            }
            if events & (libc::EPOLLIN as u32 | hangup) != 0 && !conn.in_rx_list {
                conn.in_rx_list = true;
                self.rx_list.push_back(index);
            }
            if events & libc::EPOLLOUT as u32 != 0 && !conn.in_tx_list {
                conn.in_tx_list = true;
                self.tx_list.push(index);
            }
        }
        count as usize
    }

    /// The next part for the core to dispatch (it calls this only with op slots free).
    pub fn next_part(&mut self) -> Option<PartOp> {
        self.work.parts.pop_front()
    }

    /// Bodies of other cores' pools this core finished with: they must travel home.
    pub fn take_foreign(&mut self) -> Option<Body> {
        self.work.foreign.pop()
    }

    /// Nothing issued is unfinished and nothing answered is unsent. (A write whose client
    /// stopped sending its data midway issues nothing more and does not hold up shutdown.)
    pub fn is_quiet(&self) -> bool {
        self.work.parts_outstanding == 0 && self.work.pump.is_empty() && self.tx_list.is_empty()
    }

    fn close(&mut self, index: u32, pools: &mut CorePools) {
        let conn = self.conns[index as usize]
            .take()
            .expect("closing an open connection");
        // A write still receiving its data will issue nothing more.
        if let Some(request_ref) = conn.write {
            let request = self.work.requests.get(request_ref);
            request.remaining = 0;
            if request.parts_done == request.parts_issued {
                free_request(&mut self.work, pools, request_ref);
            }
        }
        for reply in conn.tx {
            if let Some(body) = reply.body {
                free_request(&mut self.work, pools, body);
            }
        }
        // Other requests of this connection finish in the store and are dropped then.
        self.rx_list.retain(|&i| i != index);
        self.tx_list.retain(|&i| i != index);
        self.free.push(index);
        self.work.stats.closed += 1;
    }

    /// Closes every connection (shutdown), releasing what they hold.
    pub fn close_all(&mut self, pools: &mut CorePools) {
        for index in 0..self.conns.len() as u32 {
            if self.conns[index as usize].is_some() {
                self.close(index, pools);
            }
        }
        if let Some(arena) = self.work.arena.take() {
            pools.release(arena);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_fits_a_chunk() {
        assert_eq!(part_bytes_for(128 << 10), 64 << 10);
        assert_eq!(part_bytes_for(64 << 10), 32 << 10);
        assert_eq!(part_bytes_for(1 << 20), PART_BYTES_MAX);
        for chunk in [64 << 10, 68 << 10, 128 << 10, 192 << 10] {
            let part = part_bytes_for(chunk);
            let oid = [b'x'; image::OID_BYTES_MAX];
            assert!(frame_bytes(&oid, &ZEROES[..part]) <= chunk);
            assert!(part.is_power_of_two());
            assert_eq!(image::OBJECT_SIZE_MIN_BYTES % part as u64, 0);
        }
    }
}
