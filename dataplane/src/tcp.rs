//! Kernel TCP transport: non-blocking sockets and one edge-triggered epoll instance per core.
//!
//! Receive: each connection reads into a chunk from the core's small pool; complete frames are
//! handed up as `Lease`s over the chunk (parsed in place, never copied). Only the partial frame
//! left at the end of a full chunk is copied into the next chunk (`rx_copied_bytes` counts it);
//! a frame larger than a chunk is received straight into a large buffer.
//!
//! Send: replies queue per connection (header and result table inline, payload by reference)
//! and go out with one `writev` per connection per pass, so pipelined requests cost a fraction
//! of a system call each.
//!
//! Limits: at most `inflight_per_connection_max` requests per connection are past parsing and not
//! yet answered; beyond that the connection is not read (TCP flow control pushes back on the
//! client). Header limits are enforced before the body is buffered.
//!
//! Map: this file holds the types and a connection's life (accept, adopt, epoll, close);
//! `rx` reads and frames, `tx` queues and writes replies.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::buffers::{Body, CorePools};
use crate::listener_audit::ListenerAudit;
use crate::pool::{Buf, Lease};
use crate::wire::{
    self, Header, HeaderError, Limits, Status, HEADER_SIZE, SUB_OPS_CEILING, SUB_OP_RESULT_SIZE,
};

/// Largest reply head: header plus a result per sub-op.
pub const REPLY_HEAD_MAX_BYTES: usize = HEADER_SIZE + SUB_OPS_CEILING as usize * SUB_OP_RESULT_SIZE;
/// Events taken from epoll per call; more stay queued in the kernel for the next pass.
const EPOLL_EVENTS_MAX: usize = 256;
/// iovecs per writev: enough for 32 replies with a payload each.
const TX_IOVECS_MAX: usize = 64;
/// Bytes of reply heads packed per writev (`TcpTransport::tx_heads`): room for 102 of the
/// largest heads, 409 of a one-sub-op reply's 40 bytes.
const TX_HEADS_BYTES: usize = 16 << 10;
/// A chunk with less free space than this is retired before the next receive, so that one
/// recv call can still bring in many small frames.
const RX_SPARE_MIN_BYTES: usize = 16 << 10;
/// A connection that has held a partial frame (and the buffer under it) this long, counted
/// from when its socket first ran dry mid-frame whatever trickled in since, may be closed
/// when the pool it holds from is empty. Slow-loris clients,
/// each dribbling one frame, would otherwise keep every buffer of a core and stall everyone
/// else (seen: 200 such clients stopped a normal client for 30 s on a test server). Legitimate
/// clients send a frame's bytes back to back; half a second of silence mid-frame while
/// others wait for buffers is not worth keeping a buffer for.
const STALL_EVICT_AFTER: Duration = Duration::from_millis(500);

const TOKEN_WAKER: u64 = u64::MAX;
const TOKEN_LISTENER: u64 = u64::MAX - 1;
const TOKEN_WATCHED: u64 = u64::MAX - 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportConfig {
    pub limits: Limits,
    pub inflight_per_connection_max: u32,
    pub connections_max: u32,
    pub io: TcpIo,
}

/// How the transport talks to the kernel (`serve --tcp-io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcpIo {
    /// Edge-triggered epoll, `recv` and `writev` system calls.
    #[default]
    Epoll,
    /// One io_uring per core (`tcp/uring.rs`); epoll when the kernel refuses it.
    Uring,
}

impl TcpIo {
    pub fn parse(text: &str) -> Option<TcpIo> {
        match text {
            "epoll" => Some(TcpIo::Epoll),
            "uring" => Some(TcpIo::Uring),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub index: u32,
    pub generation: u32,
}

/// A complete frame received on `conn`, header checked against the limits, crc not yet checked.
pub struct RxFrame {
    pub conn: ConnId,
    pub header: Header,
    pub frame: Lease,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct TransportStats {
    pub accepted: u64,
    pub refused: u64,
    pub closed: u64,
    pub connections: u64,
    pub frames_rx: u64,
    pub replies_tx: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_copied_bytes: u64,
    pub rx_syscalls: u64,
    pub tx_syscalls: u64,
    /// iovecs passed to writev, over all calls (a run of replies without a body is one).
    pub tx_iovecs: u64,
    pub rx_pool_waits: u64,
    pub malformed: u64,
    pub over_limit: u64,
    pub truncated: u64,
    /// Connections closed because they held a partial frame for `STALL_EVICT_AFTER` while
    /// others waited for the buffer under it (also counted in `truncated`).
    pub evicted: u64,
    /// Replies sent from store memory (`Body::Stored`): no copy into a pool buffer and no crc
    /// over the payload.
    pub stored_bodies_tx: u64,
    /// Of those, bodies copied into a pool buffer after all because the store was about to
    /// change before they were written (`copy_stored_bodies`).
    pub stored_bodies_copied: u64,
    /// `epoll_wait` calls that failed (other than EINTR). Each one is a pass in which this
    /// core saw no readiness for its connections, its listener or its waker.
    pub epoll_errors: u64,
    /// `io_uring_enter` calls (`TcpIo::Uring`; 0 on epoll): one per pass with anything to
    /// submit or reap, plus parks.
    pub uring_enters: u64,
    /// Times connections waited in the listener's accept queue at two looks a second apart
    /// with no epoll edge announcing them, and were accepted anyway (`ListenerAudit`).
    pub accept_rescues: u64,
}

struct TxReply {
    /// Where its head is encoded: an index into `Connection::heads`.
    head_slot: usize,
    head_len: u16,
    body: Body,
    /// Bytes of head then body already written to the socket.
    sent: usize,
    /// False for the error reply sent before closing on a broken stream: it answers no frame.
    answers_frame: bool,
}

impl TxReply {
    fn len(&self) -> usize {
        usize::from(self.head_len) + self.body.as_slice().len()
    }
}

struct Connection {
    stream: TcpStream,
    generation: u32,
    /// Receive chunk: bytes [consumed, sealed) are received and not yet parsed.
    rx: Option<Buf>,
    consumed: usize,
    /// A frame larger than a chunk, being received into its own buffer.
    large: Option<(Buf, usize)>,
    inflight: u32,
    tx: VecDeque<TxReply>,
    /// The heads of the replies in `tx`, encoded where they stay until written: the k-th reply
    /// queued on the connection uses `heads[k % heads.len()]`. Replies leave `tx` in queue
    /// order and fewer than `heads.len()` are queued at once, so the queued ones never share a
    /// slot. Kept apart from `TxReply` so that queueing a reply neither zeroes nor moves a
    /// 160-byte head (it did, ~40 instructions per reply), and a `TxReply` stays small.
    heads: Box<[[u8; REPLY_HEAD_MAX_BYTES]]>,
    /// The slot of the next reply queued.
    next_head: usize,
    in_rx_list: bool,
    in_tx_list: bool,
    /// Stop reading; close once the queued replies are written.
    closing: bool,
    /// The peer hung up (EPOLLRDHUP/HUP/ERR): read until recv says EOF, since no further edge
    /// will come to announce it.
    peer_closed: bool,
    /// Since when the socket has been drained with a partial frame buffered (None while
    /// frames complete): how long this connection has held a buffer without using it.
    stalled_since: Option<Instant>,
    /// Replies in `tx` whose body is `Body::Stored` (store memory, see `copy_stored_bodies`).
    stored: u32,
    /// Listed in `TcpTransport::stored_conns`.
    in_stored_list: bool,
    /// io_uring only: what is posted to receive, whether a cancel of that receive is, whether
    /// a POLLOUT is, and how the last receive ended the stream (0: EOF, else an errno).
    rx_op: RxOp,
    /// io_uring only: a POLLIN fired since the last receive was posted (post one now).
    rx_ready: bool,
    cancel_posted: bool,
    tx_poll_posted: bool,
    rx_end: Option<i32>,
}

enum RxOutcome {
    /// The socket has no more bytes for now.
    Drained,
    /// Stopped early (budget, in-flight limit or buffers); stays on the list.
    Paused,
    Closed,
}

pub struct TcpTransport {
    core: usize,
    config: TransportConfig,
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
    listener: Option<TcpListener>,
    accept_ready: bool,
    listener_audit: ListenerAudit,
    /// A watched descriptor (`watch_fd`) reported readiness since `take_watched_ready`.
    watched_ready: bool,
    conns: Vec<Option<Connection>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    rx_list: VecDeque<u32>,
    tx_list: Vec<u32>,
    tx_list_spare: Vec<u32>,
    /// Bodies of replies that were written or dropped and belong to another core.
    foreign: Vec<Body>,
    /// Connections with `stalled_since` set: `evict_stalled` walks the table only when some are.
    stalled_count: u32,
    /// Connections that held `Body::Stored` replies since `copy_stored_bodies` last ran (each
    /// listed once; some may have written them all since), so that it visits only those.
    stored_conns: Vec<u32>,
    /// `Body::Stored` replies queued over all connections.
    stored_bodies: u32,
    /// Where `write_connection` packs the heads of replies without a body back to back, so
    /// that a run of them is one iovec instead of one each (a writev of 32 write
    /// acknowledgements was 32 iovecs of 40 bytes, each a separate copy from user memory in
    /// the kernel). Only read by the writev that follows the packing.
    tx_heads: Box<[u8]>,
    /// The io_uring the transport runs on instead of epoll (`TcpIo::Uring`, when available).
    uring: Option<Box<uring::UringIo>>,
    pub stats: TransportStats,
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

fn token(index: u32, generation: u32) -> u64 {
    u64::from(generation) << 32 | u64::from(index)
}

impl TcpTransport {
    pub fn new(core: usize, config: TransportConfig, waker_fd: RawFd) -> io::Result<TcpTransport> {
        config
            .limits
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: no preconditions; result checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let uring = match config.io {
            TcpIo::Epoll => None,
            TcpIo::Uring => match uring::setup(config.connections_max, waker_fd) {
                Ok(io) => Some(Box::new(io)),
                Err(e) => {
                    // Containers' seccomp profiles often refuse io_uring (Docker's default).
                    log::warn!(
                        "core {core}: io_uring unavailable for TCP ({e}); falling back to epoll"
                    );
                    None
                }
            },
        };
        if uring.is_none() {
            // Edge-triggered: a wakeup that lands after the core drained the eventfd leaves
            // it readable, and a level-triggered registration would report it on every pass,
            // so the core would look busy forever (never park, never see that it has drained).
            epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                waker_fd,
                (libc::EPOLLIN | libc::EPOLLET) as u32,
                TOKEN_WAKER,
            )?;
        }
        let count = config.connections_max as usize;
        Ok(TcpTransport {
            core,
            config,
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EPOLL_EVENTS_MAX],
            listener: None,
            accept_ready: false,
            listener_audit: ListenerAudit::new(),
            watched_ready: true,
            conns: (0..count).map(|_| None).collect(),
            generations: vec![0; count],
            free: (0..count as u32).rev().collect(),
            rx_list: VecDeque::with_capacity(count),
            tx_list: Vec::with_capacity(count),
            tx_list_spare: Vec::with_capacity(count),
            foreign: Vec::with_capacity(1024),
            stalled_count: 0,
            stored_conns: Vec::with_capacity(count),
            stored_bodies: 0,
            tx_heads: vec![0; TX_HEADS_BYTES].into_boxed_slice(),
            uring,
            stats: TransportStats::default(),
        })
    }

    /// Takes over a bound listener (only the accepting core has one).
    pub fn listen(&mut self, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        if self.uring.is_some() {
            self.uring_listen(listener.as_raw_fd())?;
            self.listener = Some(listener);
            self.accept_ready = true;
            return Ok(());
        }
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

    /// Adds one more descriptor (another frontend's epoll set) to the ones this epoll set
    /// watches, so that a parked core wakes for it too. Its readiness is a wakeup, not work:
    /// its owner polls it every pass. (Polling it only when this set reported it readable
    /// lost events under load: reads stalled for seconds. Kept simple until understood.)
    pub fn watch_fd(&mut self, fd: RawFd) -> io::Result<()> {
        if self.uring.is_some() {
            return self.uring_watch(fd);
        }
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            TOKEN_WATCHED,
        )
    }

    /// Whether a watched descriptor became readable since the last call. A watched epoll
    /// descriptor (edge-triggered here) is reported whenever one of its own descriptors gets
    /// an event, so its owner may skip its own `epoll_wait` on passes where this is false,
    /// as long as its last wait did not stop at its event limit.
    pub fn take_watched_ready(&mut self) -> bool {
        std::mem::replace(&mut self.watched_ready, false)
    }

    pub fn connection_count(&self) -> usize {
        // Slots of closed connections whose buffer io_uring still holds are not connections.
        let held = self.uring.as_ref().map_or(0, |uring| uring.held_count());
        self.conns.len() - self.free.len() - held
    }

    /// Accepts one pending connection, if any. The caller decides which core adopts it.
    pub fn poll_accept(&mut self) -> Option<(TcpStream, SocketAddr)> {
        if !self.accept_ready {
            return None;
        }
        let listener = self.listener.as_ref()?;
        match listener.accept() {
            Ok(pair) => {
                self.listener_audit.on_accept();
                Some(pair)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    log::warn!("core {}: accept failed: {e}", self.core);
                }
                self.accept_ready = false;
                None
            }
        }
    }

    /// Makes `stream` one of this core's connections. Refuses (closes) it when the table is full.
    pub fn adopt(&mut self, stream: TcpStream) -> Option<ConnId> {
        let Some(index) = self.free.pop() else {
            self.stats.refused += 1;
            log::warn!(
                "core {}: connection refused: {} connections is the limit",
                self.core,
                self.conns.len()
            );
            return None;
        };
        let generation = self.generations[index as usize].wrapping_add(1);
        self.generations[index as usize] = generation;
        let setup = stream
            .set_nonblocking(true)
            .and_then(|_| stream.set_nodelay(true))
            .and_then(|_| {
                if self.uring.is_some() {
                    return Ok(()); // Polls and receives are posted per pass instead.
                }
                let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
                epoll_ctl(
                    self.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    stream.as_raw_fd(),
                    events as u32,
                    token(index, generation),
                )
            });
        if let Err(e) = setup {
            log::warn!("core {}: cannot set up connection: {e}", self.core);
            self.free.push(index);
            return None;
        }
        let tx_capacity = self.config.inflight_per_connection_max as usize + 1;
        self.conns[index as usize] = Some(Connection {
            stream,
            generation,
            rx: None,
            consumed: 0,
            large: None,
            inflight: 0,
            tx: VecDeque::with_capacity(tx_capacity),
            heads: vec![[0; REPLY_HEAD_MAX_BYTES]; tx_capacity].into_boxed_slice(),
            next_head: 0,
            in_rx_list: true,
            in_tx_list: false,
            closing: false,
            peer_closed: false,
            stalled_since: None,
            stored: 0,
            in_stored_list: false,
            rx_op: RxOp::None,
            rx_ready: false,
            cancel_posted: false,
            tx_poll_posted: false,
            rx_end: None,
        });
        // Bytes may have arrived before registration; look once without waiting for an edge.
        self.rx_list.push_back(index);
        self.stats.accepted += 1;
        self.stats.connections = self.connection_count() as u64;
        Some(ConnId { index, generation })
    }

    /// Accepts without an epoll edge when the listener's accept queue held connections at two
    /// looks `listener_audit::AUDIT_INTERVAL` apart and none was accepted in between (see
    /// `ListenerAudit`). `poll_events` calls it now and then; tests call it with their clock.
    pub fn audit_listener(&mut self, now: Instant) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        if !self.listener_audit.look(listener.as_raw_fd(), now) || self.accept_ready {
            return;
        }
        self.accept_ready = true;
        self.stats.accept_rescues += 1;
        log::warn!(
            "core {}: connections waited over {:?} in the listener's accept queue with no epoll \
             event for them; accepting them anyway (status accept_rescues {})",
            self.core,
            crate::listener_audit::AUDIT_INTERVAL,
            self.stats.accept_rescues
        );
    }

    /// Collects readiness from the kernel. `timeout` zero never blocks (the polling case).
    pub fn poll_events(&mut self, timeout: Duration) -> usize {
        if self.listener.is_some() && self.listener_audit.tick() {
            self.audit_listener(Instant::now());
        }
        if self.uring.is_some() {
            return self.uring_poll_events(timeout);
        }
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `events` holds EPOLL_EVENTS_MAX initialised entries the kernel may overwrite.
        let count = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                EPOLL_EVENTS_MAX as i32,
                timeout_ms,
            )
        };
        if count < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                // Never silent: a failing epoll set means this core's connections and listener
                // are not served (a server that "hangs" with clients waiting to be accepted).
                self.stats.epoll_errors += 1;
                if self.stats.epoll_errors.is_power_of_two() {
                    log::error!(
                        "core {}: epoll_wait failed ({} times so far): {error}; this core's TCP \
                         connections and listener get no readiness while it fails",
                        self.core,
                        self.stats.epoll_errors
                    );
                }
            }
            return 0;
        }
        let mut work = 0;
        for event_index in 0..count as usize {
            let libc::epoll_event { events, u64: token } = self.events[event_index];
            if token != TOKEN_WAKER && token != TOKEN_WATCHED {
                work += 1; // A wakeup is not work: the inbox it announces is polled anyway.
            }
            match token {
                TOKEN_WAKER => {}
                TOKEN_WATCHED => self.watched_ready = true,
                TOKEN_LISTENER => self.accept_ready = true,
                _ => self.on_conn_event(token, events),
            }
        }
        work
    }

    fn on_conn_event(&mut self, token: u64, events: u32) {
        let index = token as u32;
        let Some(conn) = self.conns.get_mut(index as usize).and_then(|c| c.as_mut()) else {
            return;
        };
        if conn.generation != (token >> 32) as u32 {
            return; // A stale event for a slot that was closed and reused.
        }
        let readable = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let hangup = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if events & hangup != 0 {
            conn.peer_closed = true;
        }
        if events & readable != 0 && !conn.in_rx_list {
            conn.in_rx_list = true;
            self.rx_list.push_back(index);
        }
        if events & libc::EPOLLOUT as u32 != 0 && !conn.tx.is_empty() && !conn.in_tx_list {
            conn.in_tx_list = true;
            self.tx_list.push(index);
        }
    }

    fn close(&mut self, index: u32, pools: &mut CorePools) {
        let mut conn = self.conns[index as usize]
            .take()
            .expect("closing an open connection");
        // On io_uring, a buffer under a posted receive (and the slot) waits for its completion.
        let slot_held = self.uring.is_some() && self.uring_close(index, &mut conn);
        if conn.stalled_since.is_some() {
            self.stalled_count -= 1;
        }
        self.stored_bodies -= conn.stored;
        if conn.in_stored_list {
            self.stored_conns.retain(|&i| i != index);
        }
        if let Some(buf) = conn.rx {
            pools.release(buf);
        }
        if let Some((buf, _)) = conn.large {
            pools.release(buf);
        }
        for reply in conn.tx {
            if let Some(foreign) = pools.release_body(reply.body) {
                self.foreign.push(foreign);
            }
        }
        self.rx_list.retain(|&i| i != index);
        self.tx_list.retain(|&i| i != index);
        if !slot_held {
            self.free.push(index);
        }
        self.stats.closed += 1;
        self.stats.connections = self.connection_count() as u64;
        // Dropping the stream closes the socket, which also removes it from the epoll set.
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&mut self, pools: &mut CorePools) {
        for index in 0..self.conns.len() as u32 {
            if self.conns[index as usize].is_some() {
                self.close(index, pools);
            }
        }
        if self.uring.is_some() {
            self.uring_drain(pools);
        }
    }
}

mod rx;
#[cfg(test)]
mod tests;
mod tx;
mod uring;

use uring::RxOp;
