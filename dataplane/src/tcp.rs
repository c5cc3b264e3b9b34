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
    /// Times connections waited in the listener's accept queue at two looks a second apart
    /// with no epoll edge announcing them, and were accepted anyway (`ListenerAudit`).
    pub accept_rescues: u64,
}

struct TxReply {
    head: [u8; REPLY_HEAD_MAX_BYTES],
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
        // Edge-triggered: a wakeup that lands after the core drained the eventfd leaves it
        // readable, and a level-triggered registration would report it on every pass, so the
        // core would look busy forever (never park, never see that it has drained).
        epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            waker_fd,
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            TOKEN_WAKER,
        )?;
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
            stats: TransportStats::default(),
        })
    }

    /// Takes over a bound listener (only the accepting core has one).
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

    /// Adds one more descriptor (another frontend's epoll set) to the ones this epoll set
    /// watches, so that a parked core wakes for it too. Its readiness is a wakeup, not work:
    /// its owner polls it every pass. (Polling it only when this set reported it readable
    /// lost events under load: reads stalled for seconds. Kept simple until understood.)
    pub fn watch_fd(&mut self, fd: RawFd) -> io::Result<()> {
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
        self.conns.len() - self.free.len()
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
            in_rx_list: true,
            in_tx_list: false,
            closing: false,
            peer_closed: false,
            stalled_since: None,
            stored: 0,
            in_stored_list: false,
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

    /// Reads from connections with pending bytes and hands up to `budget` complete frames to
    /// `on_frame`. Returns the number of frames delivered.
    pub fn poll_rx(
        &mut self,
        pools: &mut CorePools,
        budget: usize,
        on_frame: &mut dyn FnMut(RxFrame),
    ) -> usize {
        let mut delivered = 0;
        let mut visits = self.rx_list.len();
        while visits > 0 && delivered < budget {
            visits -= 1;
            // An eviction (`evict_stalled`) may take a listed connection out of the list.
            let Some(index) = self.rx_list.pop_front() else {
                break;
            };
            let outcome =
                self.read_connection(index, pools, budget - delivered, &mut delivered, on_frame);
            match outcome {
                RxOutcome::Paused => self.rx_list.push_back(index),
                RxOutcome::Drained => {
                    if let Some(conn) = self.conns[index as usize].as_mut() {
                        conn.in_rx_list = false;
                    }
                }
                RxOutcome::Closed => {}
            }
        }
        delivered
    }

    fn read_connection(
        &mut self,
        index: u32,
        pools: &mut CorePools,
        budget: usize,
        delivered: &mut usize,
        on_frame: &mut dyn FnMut(RxFrame),
    ) -> RxOutcome {
        let limits = self.config.limits;
        let inflight_max = self.config.inflight_per_connection_max;
        let mut local_delivered = 0;
        let mut socket_drained = false;
        loop {
            let conn = self.conns[index as usize]
                .as_mut()
                .expect("listed connections are open");
            if conn.closing {
                return RxOutcome::Drained;
            }
            // 1. Hand up every complete frame already received.
            let pending_len = loop {
                if local_delivered == budget || conn.inflight >= inflight_max {
                    *delivered += local_delivered;
                    return RxOutcome::Paused;
                }
                match next_frame(conn, pools, &limits) {
                    Ok(FrameStep::Frame(header, frame)) => {
                        if conn.stalled_since.take().is_some() {
                            self.stalled_count -= 1;
                        }
                        conn.inflight += 1;
                        local_delivered += 1;
                        self.stats.frames_rx += 1;
                        on_frame(RxFrame {
                            conn: ConnId {
                                index,
                                generation: conn.generation,
                            },
                            header,
                            frame,
                        });
                    }
                    Ok(FrameStep::NeedMore(len)) => break len,
                    Err((error, request_id)) => {
                        *delivered += local_delivered;
                        self.reject_stream(index, error, request_id);
                        return RxOutcome::Drained;
                    }
                }
            };
            // 2. Make room for the rest of the pending frame, then receive.
            let conn = self.conns[index as usize].as_mut().expect("still open");
            if socket_drained && !conn.peer_closed {
                // The last recv returned less than it could take: the socket is empty, and
                // edge-triggered epoll reports the next arrival. Saves one EAGAIN recv per
                // connection per pass.
                *delivered += local_delivered;
                retire_idle_chunk(conn, pools);
                self.stalled_count = note_stall(conn, self.stalled_count);
                return RxOutcome::Drained;
            }
            if !make_room(conn, pools, pending_len, &mut self.stats) {
                let want_large = pending_len > pools.small.buffer_size();
                let conn = if self.evict_stalled(index, pools, want_large) {
                    self.conns[index as usize]
                        .as_mut()
                        .expect("not the evicted one")
                } else {
                    self.stats.rx_pool_waits += 1;
                    *delivered += local_delivered;
                    return RxOutcome::Paused;
                };
                if !make_room(conn, pools, pending_len, &mut self.stats) {
                    // The evicted connection's buffer is still leased by ops in flight.
                    self.stats.rx_pool_waits += 1;
                    *delivered += local_delivered;
                    return RxOutcome::Paused;
                }
            }
            let conn = self.conns[index as usize].as_mut().expect("still open");
            let (target, is_large) = match conn.large.as_mut() {
                Some((buf, frame_len)) => {
                    let want = *frame_len - buf.sealed_len();
                    (&mut buf.spare_mut()[..want], true)
                }
                None => (
                    conn.rx
                        .as_mut()
                        .expect("make_room provides a chunk")
                        .spare_mut(),
                    false,
                ),
            };
            self.stats.rx_syscalls += 1;
            let target_len = target.len();
            // SAFETY: `target` is a live, exclusively borrowed byte slice; recv writes at most its length.
            let received = unsafe {
                libc::recv(
                    conn.stream.as_raw_fd(),
                    target.as_mut_ptr().cast(),
                    target.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if received > 0 {
                let received = received as usize;
                socket_drained = received < target_len;
                self.stats.rx_bytes += received as u64;
                match conn.large.as_mut() {
                    Some((buf, _)) if is_large => buf.seal(received),
                    _ => conn.rx.as_mut().expect("chunk").seal(received),
                }
                continue;
            }
            *delivered += local_delivered;
            let error = io::Error::last_os_error();
            if received < 0 && error.kind() == io::ErrorKind::WouldBlock {
                retire_idle_chunk(conn, pools);
                self.stalled_count = note_stall(conn, self.stalled_count);
                return RxOutcome::Drained;
            }
            if received < 0 && error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let partial = conn.large.is_some()
                || conn
                    .rx
                    .as_ref()
                    .is_some_and(|b| b.sealed_len() > conn.consumed);
            if partial {
                self.stats.truncated += 1;
                log::info!("core {}: connection closed mid-frame", self.core);
            }
            self.close(index, pools);
            return RxOutcome::Closed;
        }
    }

    /// The pool `want_large` names is empty: closes the connection (not `except`) that has
    /// held a partial frame in a buffer of that pool the longest, if for `STALL_EVICT_AFTER`
    /// or more. Walks the connection table, but only when a pool is empty.
    fn evict_stalled(&mut self, except: u32, pools: &mut CorePools, want_large: bool) -> bool {
        if self.stalled_count == 0 {
            return false;
        }
        let now = Instant::now();
        let mut oldest: Option<(Instant, u32)> = None;
        for (index, slot) in self.conns.iter().enumerate() {
            let Some(conn) = slot.as_ref() else { continue };
            let Some(since) = conn.stalled_since else {
                continue;
            };
            let holds = if want_large {
                conn.large.is_some()
            } else {
                conn.rx.is_some()
            };
            if index as u32 == except || !holds || now.duration_since(since) < STALL_EVICT_AFTER {
                continue;
            }
            if oldest.map_or(true, |(first, _)| since < first) {
                oldest = Some((since, index as u32));
            }
        }
        let Some((since, victim)) = oldest else {
            return false;
        };
        self.stats.evicted += 1;
        self.stats.truncated += 1;
        log::info!(
            "core {}: closing a connection stalled mid-frame for {:?}: its buffer is needed",
            self.core,
            now.duration_since(since)
        );
        self.close(victim, pools);
        true
    }

    /// The core found the pool it needs (`want_large`: the large one) empty, for an op's
    /// output: frees a buffer held by a connection stalled mid-frame, if there is one.
    pub fn evict_stalled_for(&mut self, pools: &mut CorePools, want_large: bool) -> bool {
        self.evict_stalled(u32::MAX, pools, want_large)
    }

    /// The byte stream can no longer be trusted: answer once, then close after the answer is sent.
    fn reject_stream(&mut self, index: u32, error: HeaderError, request_id: u64) {
        let status = error.status();
        if status == Status::OverLimit {
            self.stats.over_limit += 1;
        } else {
            self.stats.malformed += 1;
        }
        log::info!("core {}: closing connection: {error}", self.core);
        let request = Header {
            opcode: 0,
            request_id,
            ..Header::default()
        };
        let conn = self.conns[index as usize].as_mut().expect("open");
        conn.closing = true;
        self.queue(index, &request, status, &[], Body::None, false);
    }

    /// Queues the reply to a frame delivered on `conn`. A connection that has gone away gets
    /// nothing and the body comes back to the caller to release.
    pub fn reply(
        &mut self,
        conn: ConnId,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    ) -> Result<(), Body> {
        let open = self
            .conns
            .get(conn.index as usize)
            .and_then(|c| c.as_ref())
            .is_some_and(|c| c.generation == conn.generation);
        if !open {
            return Err(body);
        }
        self.queue(conn.index, request, status, results, body, true);
        Ok(())
    }

    fn queue(
        &mut self,
        index: u32,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
        answers_frame: bool,
    ) {
        let conn = self.conns[index as usize].as_mut().expect("open");
        // The in-flight limit bounds the queue: it never grows past its start-up capacity.
        assert!(
            conn.tx.len() < conn.tx.capacity(),
            "tx queue overflow: in-flight limit not enforced"
        );
        // Queued first and encoded where it sits: building the reply on the stack and moving
        // it in copied its 160-byte head buffer once more per reply.
        conn.tx.push_back(TxReply {
            head: [0; REPLY_HEAD_MAX_BYTES],
            head_len: 0,
            body,
            sent: 0,
            answers_frame,
        });
        let reply = conn.tx.back_mut().expect("just queued");
        let head_len = match &reply.body {
            // The store kept the crc of these bytes: the payload is not read here at all.
            Body::Stored(stored) => {
                if !conn.in_stored_list {
                    conn.in_stored_list = true;
                    self.stored_conns.push(index);
                }
                conn.stored += 1;
                self.stored_bodies += 1;
                self.stats.stored_bodies_tx += 1;
                wire::encode_reply_with_output_crc(
                    &mut reply.head,
                    request,
                    status,
                    results,
                    stored.as_slice().len(),
                    stored.crc(),
                )
            }
            body => wire::encode_reply(
                &mut reply.head,
                request,
                status,
                results,
                &[body.as_slice()],
            ),
        };
        reply.head_len = head_len as u16;
        if !conn.in_tx_list {
            conn.in_tx_list = true;
            self.tx_list.push(index);
        }
    }

    /// Writes queued replies, one writev per connection. Returns the replies completed.
    pub fn flush_tx(&mut self, pools: &mut CorePools) -> usize {
        // Iterate over a swapped-out list: writing may close a connection, and closing edits
        // the list. Both vectors keep their start-up capacity, so the swap never allocates.
        let mut pending = std::mem::take(&mut self.tx_list_spare);
        std::mem::swap(&mut pending, &mut self.tx_list);
        let mut completed = 0;
        for &index in &pending {
            let (done, keep) = self.write_connection(index, pools);
            completed += done;
            if keep {
                self.tx_list.push(index);
            }
        }
        pending.clear();
        self.tx_list_spare = pending;
        completed
    }

    /// Returns (replies completed, stay on the tx list).
    fn write_connection(&mut self, index: u32, pools: &mut CorePools) -> (usize, bool) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            return (0, false);
        };
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; TX_IOVECS_MAX];
        let mut iovec_count = 0;
        // Bytes of `tx_heads` in use, and whether the last iovec ends there (a packed head
        // that the next one may extend).
        let mut heads_used = 0;
        let mut last_is_packed = false;
        for reply in conn.tx.iter() {
            if iovec_count + 2 > TX_IOVECS_MAX {
                break;
            }
            let head = &reply.head[..usize::from(reply.head_len)];
            let body = reply.body.as_slice();
            let mut skip = reply.sent;
            if skip < head.len() {
                let piece = &head[skip..];
                if body.is_empty() {
                    if heads_used + piece.len() > TX_HEADS_BYTES {
                        break;
                    }
                    let packed = &mut self.tx_heads[heads_used..heads_used + piece.len()];
                    packed.copy_from_slice(piece);
                    if last_is_packed {
                        iovecs[iovec_count - 1].iov_len += piece.len();
                    } else {
                        iovecs[iovec_count] = libc::iovec {
                            iov_base: packed.as_mut_ptr().cast(),
                            iov_len: piece.len(),
                        };
                        iovec_count += 1;
                    }
                    heads_used += piece.len();
                    last_is_packed = true;
                } else {
                    iovecs[iovec_count] = libc::iovec {
                        iov_base: piece.as_ptr() as *mut _,
                        iov_len: piece.len(),
                    };
                    iovec_count += 1;
                    last_is_packed = false;
                }
                skip = 0;
            } else {
                skip -= head.len();
            }
            if skip < body.len() {
                iovecs[iovec_count] = libc::iovec {
                    iov_base: body[skip..].as_ptr() as *mut _,
                    iov_len: body.len() - skip,
                };
                iovec_count += 1;
                last_is_packed = false;
            }
        }
        debug_assert!(iovec_count <= TX_IOVECS_MAX && heads_used <= TX_HEADS_BYTES);
        if iovec_count == 0 {
            conn.in_tx_list = false;
            return (0, false);
        }
        self.stats.tx_syscalls += 1;
        self.stats.tx_iovecs += iovec_count as u64;
        // SAFETY: every iovec points into a reply head or body owned by `conn.tx`, or into
        // `tx_heads`, none of which is touched until writev returns; writev only reads them.
        let written =
            unsafe { libc::writev(conn.stream.as_raw_fd(), iovecs.as_ptr(), iovec_count as i32) };
        if written < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                conn.in_tx_list = false; // EPOLLOUT puts it back.
                return (0, false);
            }
            if error.kind() == io::ErrorKind::Interrupted {
                return (0, true);
            }
            log::info!(
                "core {}: write failed, closing connection: {error}",
                self.core
            );
            self.close(index, pools);
            return (0, false);
        }
        self.stats.tx_bytes += written as u64;
        let mut remaining = written as usize;
        let mut completed = 0;
        while let Some(front) = conn.tx.front_mut() {
            let left = front.len() - front.sent;
            if remaining < left {
                front.sent += remaining;
                break;
            }
            remaining -= left;
            let reply = conn.tx.pop_front().expect("front exists");
            if reply.answers_frame {
                conn.inflight -= 1;
            }
            if matches!(reply.body, Body::Stored(_)) {
                conn.stored -= 1;
                self.stored_bodies -= 1;
            }
            completed += 1;
            if let Some(foreign) = pools.release_body(reply.body) {
                self.foreign.push(foreign);
            }
        }
        self.stats.replies_tx += completed as u64;
        let conn = self.conns[index as usize].as_mut().expect("open");
        // A connection that stopped reading at the in-flight limit (or the budget, or an
        // empty pool) stayed on the rx list (`Paused`); one off the list drained its socket,
        // and edge-triggered epoll reports its next bytes. So it is not listed again to be
        // read (that cost a recv per write that found nothing, EAGAIN); only its receive chunk,
        // kept while the frames it answered were leased, goes back to the pool now if idle
        // (1,000 idle connections must not hold 1,000 chunks).
        if !conn.in_rx_list {
            retire_idle_chunk(conn, pools);
        }
        if conn.tx.is_empty() {
            conn.in_tx_list = false;
            if conn.closing {
                self.close(index, pools);
            }
            return (completed, false);
        }
        (completed, true)
    }

    fn close(&mut self, index: u32, pools: &mut CorePools) {
        let conn = self.conns[index as usize]
            .take()
            .expect("closing an open connection");
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
        self.free.push(index);
        self.stats.closed += 1;
        self.stats.connections = self.connection_count() as u64;
        // Dropping the stream closes the socket, which also removes it from the epoll set.
    }

    /// Whether replies queued here still send bytes from store memory (`Body::Stored`).
    pub fn has_stored_bodies(&self) -> bool {
        self.stored_bodies > 0
    }

    /// Copies the bytes of every queued `Body::Stored` reply into a pool buffer of its own, so
    /// that the store may change or free its memory: the core calls this before any op that
    /// mutates the store (the rule `StoredBytes` relies on). False when a pool ran out of
    /// buffers first: some bodies still point into the store, and the mutation must wait
    /// (the next `flush_tx` writes some of them, or the next call copies the rest).
    pub fn copy_stored_bodies(&mut self, pools: &mut CorePools) -> bool {
        while let Some(&index) = self.stored_conns.last() {
            let conn = self.conns[index as usize]
                .as_mut()
                .expect("closing a connection takes it off the list");
            for reply in conn.tx.iter_mut() {
                if !matches!(reply.body, Body::Stored(_)) {
                    continue;
                }
                // Same bytes, so the crc already in the head still holds, and `sent` still
                // counts into the same sequence.
                if !reply.body.copy_stored(pools) {
                    return false;
                }
                conn.stored -= 1;
                self.stored_bodies -= 1;
                self.stats.stored_bodies_copied += 1;
            }
            assert_eq!(
                conn.stored, 0,
                "every stored body of the connection was copied"
            );
            conn.in_stored_list = false;
            self.stored_conns.pop();
        }
        assert_eq!(self.stored_bodies, 0);
        true
    }

    /// Bodies from other cores' pools that this core finished with; they must travel home.
    pub fn take_foreign(&mut self) -> Option<Body> {
        self.foreign.pop()
    }

    pub fn has_pending_tx(&self) -> bool {
        !self.tx_list.is_empty()
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&mut self, pools: &mut CorePools) {
        for index in 0..self.conns.len() as u32 {
            if self.conns[index as usize].is_some() {
                self.close(index, pools);
            }
        }
    }
}

enum FrameStep {
    Frame(Header, Lease),
    /// Bytes the pending frame needs in total (HEADER_SIZE while the header is incomplete).
    NeedMore(usize),
}

/// Takes the next complete frame out of the connection's receive state.
fn next_frame(
    conn: &mut Connection,
    pools: &mut CorePools,
    limits: &Limits,
) -> Result<FrameStep, (HeaderError, u64)> {
    if let Some((buf, frame_len)) = conn.large.as_ref() {
        if buf.sealed_len() < *frame_len {
            return Ok(FrameStep::NeedMore(*frame_len));
        }
        let (buf, frame_len) = conn.large.take().expect("checked above");
        let header = wire::parse_header(buf.sealed(), limits)
            .ok()
            .flatten()
            .expect("header checked when the frame started");
        let lease = pools.lease(&buf, 0, frame_len);
        pools.release(buf);
        return Ok(FrameStep::Frame(header, lease));
    }
    let Some(chunk) = conn.rx.as_ref() else {
        return Ok(FrameStep::NeedMore(HEADER_SIZE));
    };
    let available = &chunk.sealed()[conn.consumed..];
    let header = match wire::parse_header(available, limits) {
        Ok(Some(header)) => header,
        Ok(None) => return Ok(FrameStep::NeedMore(HEADER_SIZE)),
        Err(error) => {
            let request_id = if available.len() >= 16 {
                u64::from_le_bytes(available[8..16].try_into().unwrap())
            } else {
                0
            };
            return Err((error, request_id));
        }
    };
    let frame_len = header.frame_len();
    if available.len() < frame_len {
        return Ok(FrameStep::NeedMore(frame_len));
    }
    let lease = pools.lease(chunk, conn.consumed, frame_len);
    conn.consumed += frame_len;
    Ok(FrameStep::Frame(header, lease))
}

/// Ensures the connection can receive the rest of a frame of `pending_len` bytes. False when
/// the pools are exhausted (the connection waits; buffers come back as replies complete).
fn make_room(
    conn: &mut Connection,
    pools: &mut CorePools,
    pending_len: usize,
    stats: &mut TransportStats,
) -> bool {
    if conn.large.is_some() {
        return true;
    }
    let chunk_size = pools.small.buffer_size();
    let (partial_start, partial_end) = match conn.rx.as_ref() {
        Some(chunk) => (conn.consumed, chunk.sealed_len()),
        None => (0, 0),
    };
    let partial_len = partial_end - partial_start;
    if pending_len > chunk_size {
        let Some(mut large) = pools.acquire_rx_large() else {
            return false;
        };
        if let Some(chunk) = conn.rx.take() {
            copy_partial(&chunk, partial_start, partial_end, &mut large, stats);
            pools.release(chunk);
        }
        conn.consumed = 0;
        conn.large = Some((large, pending_len));
        return true;
    }
    if let Some(chunk) = conn.rx.as_ref() {
        let fits = partial_start + pending_len <= chunk_size;
        if fits
            && chunk_size - chunk.sealed_len() >= RX_SPARE_MIN_BYTES.min(pending_len - partial_len)
        {
            return true;
        }
    }
    let Some(mut fresh) = pools.acquire_rx_small() else {
        return false;
    };
    if let Some(chunk) = conn.rx.take() {
        copy_partial(&chunk, partial_start, partial_end, &mut fresh, stats);
        pools.release(chunk);
    }
    conn.consumed = 0;
    conn.rx = Some(fresh);
    true
}

fn copy_partial(
    source: &Buf,
    start: usize,
    end: usize,
    target: &mut Buf,
    stats: &mut TransportStats,
) {
    let len = end - start;
    target.spare_mut()[..len].copy_from_slice(&source.sealed()[start..end]);
    target.seal(len);
    stats.rx_copied_bytes += len as u64;
}

/// The socket is drained: if a partial frame is left in a buffer, the connection starts (or
/// keeps) counting as stalled. Returns the transport's new count of stalled connections.
fn note_stall(conn: &mut Connection, stalled_count: u32) -> u32 {
    let partial = conn.large.is_some()
        || conn
            .rx
            .as_ref()
            .is_some_and(|chunk| chunk.sealed_len() > conn.consumed);
    match (partial, conn.stalled_since.is_some()) {
        (true, false) => {
            conn.stalled_since = Some(Instant::now());
            stalled_count + 1
        }
        (false, true) => {
            conn.stalled_since = None;
            stalled_count - 1
        }
        _ => stalled_count,
    }
}

/// An idle connection gives its chunk back so that thousands of idle clients hold no buffers.
fn retire_idle_chunk(conn: &mut Connection, pools: &mut CorePools) {
    let fully_parsed = conn
        .rx
        .as_ref()
        .is_some_and(|chunk| chunk.sealed_len() == conn.consumed);
    if fully_parsed && conn.inflight == 0 {
        let chunk = conn.rx.take().expect("checked");
        pools.release(chunk);
        conn.consumed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffers::{PoolSizes, StoredBytes};
    use crate::reactor::Waker;
    use crate::wire::{Opcode, SubOpSpec};
    use std::io::{Read, Write};

    fn setup() -> (TcpTransport, CorePools, Waker) {
        let waker = Waker::new().unwrap();
        let config = TransportConfig {
            limits: Limits::DEFAULT,
            inflight_per_connection_max: 4,
            connections_max: 8,
        };
        let transport = TcpTransport::new(0, config, waker.fd()).unwrap();
        let sizes = PoolSizes {
            small_size_bytes: 64 << 10,
            small_count: 8,
            large_size_bytes: 8 << 20,
            large_count: 2,
        };
        (transport, CorePools::new(0, sizes, false).unwrap(), waker)
    }

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn a_connection_whose_epoll_edge_was_lost_is_accepted_at_the_second_audit() {
        let (mut transport, _pools, _waker) = setup();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        transport.listen(listener).unwrap();
        assert!(transport.poll_accept().is_none(), "nothing queued yet");
        let _client = TcpStream::connect(address).unwrap();
        // The edge is in the epoll set, but the core never collects it (`poll_events` is not
        // called): as if it were lost. Nothing is accepted without it...
        assert!(transport.poll_accept().is_none());
        let t0 = Instant::now();
        transport.audit_listener(t0);
        assert!(transport.poll_accept().is_none(), "one look proves nothing");
        assert_eq!(transport.stats.accept_rescues, 0);
        // ...until the connection has waited through two looks.
        transport.audit_listener(t0 + crate::listener_audit::AUDIT_INTERVAL);
        assert_eq!(transport.stats.accept_rescues, 1);
        let (stream, _) = transport
            .poll_accept()
            .expect("the audit lets the core accept");
        assert_eq!(stream.peer_addr().unwrap(), _client.local_addr().unwrap());
        assert!(
            transport.poll_accept().is_none(),
            "the queue is empty again"
        );
    }

    #[test]
    fn connections_announced_by_epoll_are_never_counted_as_rescued() {
        let (mut transport, _pools, _waker) = setup();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        transport.listen(listener).unwrap();
        assert!(transport.poll_accept().is_none());
        let t0 = Instant::now();
        let mut clients = Vec::new();
        for round in 0..3u32 {
            clients.push(TcpStream::connect(address).unwrap());
            transport.audit_listener(t0 + round * crate::listener_audit::AUDIT_INTERVAL);
            transport.poll_events(Duration::from_millis(100));
            assert!(transport.poll_accept().is_some(), "epoll announced it");
            assert!(transport.poll_accept().is_none());
        }
        assert_eq!(transport.stats.accept_rescues, 0);
    }

    #[test]
    fn connections_stalled_mid_frame_give_up_their_chunks_when_the_pool_is_empty() {
        let waker = Waker::new().unwrap();
        let config = TransportConfig {
            limits: Limits::DEFAULT,
            inflight_per_connection_max: 4,
            connections_max: 16,
        };
        let mut transport = TcpTransport::new(0, config, waker.fd()).unwrap();
        let (_, mut pools, _) = setup();
        // Receive may take all but the chunks it leaves for op outputs.
        let chunks = pools.small.free_count() - crate::buffers::RX_LEAVES_FREE;
        let mut frame = Vec::new();
        wire::encode_request(
            &mut frame,
            Opcode::OsdOp,
            7,
            b"obj",
            &[SubOpSpec::write(0, &[1; 100])],
            b"",
        );
        // Slow-loris clients: one partial frame each, one per chunk receive may take.
        let mut stallers = Vec::new();
        for _ in 0..chunks {
            let (mut client, server) = pair();
            transport.adopt(server).unwrap();
            client.write_all(&frame[..10]).unwrap();
            stallers.push(client);
        }
        for _ in 0..100 {
            transport.poll_events(Duration::from_millis(10));
            transport.poll_rx(&mut pools, 16, &mut |_| panic!("no frame is complete"));
            if transport.stalled_count == chunks && transport.rx_list.is_empty() {
                break;
            }
        }
        assert_eq!(
            pools.small.free_count(),
            crate::buffers::RX_LEAVES_FREE,
            "every chunk but the output reserve holds a partial frame"
        );
        assert_eq!(transport.stalled_count, chunks);
        // A client with a whole frame, before the eviction age: it waits.
        let (mut good, server) = pair();
        let good_conn = transport.adopt(server).unwrap();
        good.write_all(&frame).unwrap();
        let mut frames = Vec::new();
        transport.poll_events(Duration::from_millis(10));
        transport.poll_rx(&mut pools, 16, &mut |frame| frames.push(frame));
        assert!(frames.is_empty() && transport.stats.evicted == 0);
        assert!(transport.stats.rx_pool_waits > 0);
        // Past it: the oldest staller is closed, and the frame comes in on its chunk.
        std::thread::sleep(STALL_EVICT_AFTER);
        for _ in 0..100 {
            transport.poll_events(Duration::from_millis(10));
            transport.poll_rx(&mut pools, 16, &mut |frame| frames.push(frame));
            if !frames.is_empty() {
                break;
            }
        }
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].conn, good_conn);
        assert_eq!(
            transport.stats.evicted, 1,
            "one chunk was needed, one staller closed"
        );
        assert_eq!(transport.stalled_count, chunks - 1);
        let mut byte = [0u8; 1];
        let closed = stallers
            .iter_mut()
            .filter(|staller| {
                let mut staller: &TcpStream = staller;
                staller
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                match staller.read(&mut byte) {
                    Ok(n) => n == 0,
                    Err(e) => !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ),
                }
            })
            .count();
        assert_eq!(
            closed, 1,
            "only the evicted staller sees its connection closed"
        );
        for frame in frames {
            pools.release_lease(frame.frame);
        }
    }

    #[test]
    fn a_late_wakeup_is_not_work_forever() {
        let (mut transport, _pools, waker) = setup();
        waker.prepare_park();
        waker.wake_if_sleeping(); // Lands after the core decided not to park: nobody drains it.
        assert_eq!(transport.poll_events(Duration::ZERO), 0);
        assert_eq!(
            transport.poll_events(Duration::ZERO),
            0,
            "a readable eventfd is reported once, and never as work"
        );
    }

    /// Sends three OSD_OP requests on "obj" (ids 0..3, one sub-op each, made by `sub_op`) and
    /// polls until the transport has handed all three up.
    fn send_three<'a>(
        transport: &mut TcpTransport,
        pools: &mut CorePools,
        client: &mut TcpStream,
        sub_op: impl Fn(u64) -> SubOpSpec<'a>,
    ) -> Vec<RxFrame> {
        let mut requests = Vec::new();
        for id in 0..3 {
            wire::encode_request(&mut requests, Opcode::OsdOp, id, b"obj", &[sub_op(id)], b"");
        }
        client.write_all(&requests).unwrap();
        let mut frames = Vec::new();
        for _ in 0..100 {
            transport.poll_events(Duration::from_millis(10));
            transport.poll_rx(pools, 16, &mut |frame| frames.push(frame));
            if frames.len() == 3 {
                break;
            }
        }
        assert_eq!(frames.len(), 3);
        frames
    }

    #[test]
    fn frames_arrive_as_leases_and_replies_go_out() {
        let (mut transport, mut pools, _waker) = setup();
        let (mut client, server) = pair();
        let conn = transport.adopt(server).unwrap();
        let data: Vec<[u8; 1000]> = (0..3).map(|id| [id as u8; 1000]).collect();
        let frames = send_three(&mut transport, &mut pools, &mut client, |id| {
            SubOpSpec::write(0, &data[id as usize])
        });
        assert_eq!(
            pools.small.in_use(),
            1,
            "three frames, one receive chunk: parsed in place"
        );
        assert_eq!(transport.stats.rx_copied_bytes, 0);
        for frame in frames {
            assert_eq!(frame.conn, conn);
            let view = wire::Frame::view(frame.header, frame.frame.as_slice());
            assert!(view.crc_ok(frame.frame.as_slice()));
            transport
                .reply(conn, &frame.header, Status::Ok, &[(0, 0)], Body::None)
                .ok()
                .unwrap();
            pools.release_lease(frame.frame);
        }
        assert_eq!(transport.flush_tx(&mut pools), 3);
        assert_eq!(
            (transport.stats.tx_syscalls, transport.stats.tx_iovecs),
            (1, 1),
            "three replies without a body: their heads packed into one iovec"
        );
        let reply_len = HEADER_SIZE + SUB_OP_RESULT_SIZE;
        let mut replies = vec![0u8; 3 * reply_len];
        client.read_exact(&mut replies).unwrap();
        for (id, reply) in replies.chunks(reply_len).enumerate() {
            let header = wire::parse_header(reply, &Limits::CEILING)
                .unwrap()
                .unwrap();
            assert!(header.is_reply());
            assert_eq!(header.request_id, id as u64, "in order, each whole");
            assert!(wire::Frame::view(header, reply).crc_ok(reply));
        }
        drop(client);
        for _ in 0..100 {
            transport.poll_events(Duration::from_millis(10));
            transport.poll_rx(&mut pools, 16, &mut |_| panic!("no more frames"));
            if transport.connection_count() == 0 {
                break;
            }
        }
        assert_eq!(transport.connection_count(), 0, "EOF closes the connection");
        assert_eq!(pools.in_use(), 0, "every buffer came back");
    }

    /// Heads of replies without a body are packed into one iovec per run; a reply with a
    /// body breaks the run (its head and body go by reference), and the bytes on the wire are
    /// the replies in order either way.
    #[test]
    fn runs_of_bodiless_replies_are_one_iovec() {
        let (_, mut pools, waker) = setup();
        let config = TransportConfig {
            limits: Limits::DEFAULT,
            inflight_per_connection_max: 8,
            connections_max: 2,
        };
        let mut transport = TcpTransport::new(0, config, waker.fd()).unwrap();
        let (mut client, server) = pair();
        let conn = transport.adopt(server).unwrap();
        let mut frames = send_three(&mut transport, &mut pools, &mut client, |_| {
            SubOpSpec::read(0, 100)
        });
        frames.extend(send_three(&mut transport, &mut pools, &mut client, |_| {
            SubOpSpec::read(0, 100)
        }));
        let requests: Vec<Header> = frames.iter().map(|f| f.header).collect();
        for frame in frames {
            pools.release_lease(frame.frame);
        }
        // Replies to requests 0, 1 (no body), 2 (a body), 0, 1 (no body) of the second batch.
        let mut expected = Vec::new();
        for (index, request) in requests.iter().enumerate().take(5) {
            let body = if index == 2 {
                let mut buf = pools.acquire_for(100).unwrap();
                buf.spare_mut()[..100].fill(0x5A);
                buf.seal(100);
                Body::Buf(buf)
            } else {
                Body::None
            };
            let results = [(0, body.as_slice().len() as u32)];
            let mut head = [0u8; REPLY_HEAD_MAX_BYTES];
            let len =
                wire::encode_reply(&mut head, request, Status::Ok, &results, &[body.as_slice()]);
            expected.extend_from_slice(&head[..len]);
            expected.extend_from_slice(body.as_slice());
            assert!(transport
                .reply(conn, request, Status::Ok, &results, body)
                .is_ok());
        }
        assert_eq!(transport.flush_tx(&mut pools), 5);
        assert_eq!(
            (transport.stats.tx_syscalls, transport.stats.tx_iovecs),
            (1, 4),
            "two packed runs of two heads, and the head and body of the reply between"
        );
        let mut received = vec![0u8; expected.len()];
        client.read_exact(&mut received).unwrap();
        assert_eq!(received, expected);
        transport
            .reply(conn, &requests[5], Status::Ok, &[(0, 0)], Body::None)
            .ok()
            .unwrap();
        assert_eq!(transport.flush_tx(&mut pools), 1);
        assert_eq!(pools.in_use(), 0, "every buffer came back");
    }

    /// Stored bodies go out with the crc they came with, and `copy_stored_bodies` leaves the
    /// replies independent of the store's memory: what is sent is what was there when the
    /// reply was queued, even after the memory changes.
    #[test]
    fn stored_bodies_are_sent_by_their_crc_and_copied_before_the_store_changes() {
        let (mut transport, mut pools, _waker) = setup();
        let (mut client, server) = pair();
        let conn = transport.adopt(server).unwrap();
        // Three read requests to answer (the transport counts replies against frames).
        let frames = send_three(&mut transport, &mut pools, &mut client, |_| {
            SubOpSpec::read(0, 4096)
        });
        let request = frames[0].header;
        for frame in frames {
            pools.release_lease(frame.frame);
        }
        let mut store_memory = vec![0xA5u8; 8192];
        let crcs = [
            carmine_crc::crc32c(&store_memory[..4096]),
            carmine_crc::crc32c(&store_memory[4096..]),
        ];
        for (index, crc) in crcs.into_iter().enumerate() {
            // SAFETY: `store_memory` is only changed after `copy_stored_bodies` succeeded.
            let stored =
                unsafe { StoredBytes::new(store_memory[index * 4096..].as_ptr(), 4096, crc) };
            let replied = transport.reply(
                conn,
                &request,
                Status::Ok,
                &[(0, 4096)],
                Body::Stored(stored),
            );
            assert!(replied.is_ok());
        }
        assert!(transport.has_stored_bodies());
        let in_use_before = pools.small.in_use(); // The receive chunk, perhaps.
        assert!(transport.copy_stored_bodies(&mut pools));
        assert!(!transport.has_stored_bodies());
        assert_eq!(transport.stats.stored_bodies_tx, 2);
        assert_eq!(transport.stats.stored_bodies_copied, 2);
        assert_eq!(
            pools.small.in_use(),
            in_use_before + 2,
            "each copy in a pool buffer"
        );
        store_memory.fill(0); // The store overwrites the blocks.
        assert_eq!(transport.flush_tx(&mut pools), 2);
        assert!(
            pools.small.in_use() <= in_use_before,
            "the copies went back once written"
        );
        let reply_len = HEADER_SIZE + SUB_OP_RESULT_SIZE + 4096;
        let mut replies = vec![0u8; 2 * reply_len];
        client.read_exact(&mut replies).unwrap();
        for reply in replies.chunks(reply_len) {
            let header = wire::parse_header(reply, &Limits::CEILING)
                .unwrap()
                .unwrap();
            let view = wire::Frame::view(header, reply);
            assert!(view.crc_ok(reply), "the kept crc covers the bytes sent");
            assert!(reply[reply_len - 4096..].iter().all(|&b| b == 0xA5));
        }
        // Without a copy, the reply is written straight from the store's memory.
        let crc = carmine_crc::crc32c(&store_memory[..4096]);
        // SAFETY: `store_memory` is not changed again.
        let stored = unsafe { StoredBytes::new(store_memory.as_ptr(), 4096, crc) };
        let in_use_before = pools.in_use();
        let replied = transport.reply(
            conn,
            &request,
            Status::Ok,
            &[(0, 4096)],
            Body::Stored(stored),
        );
        assert!(replied.is_ok());
        assert_eq!(pools.in_use(), in_use_before, "no buffer for a stored body");
        assert_eq!(transport.flush_tx(&mut pools), 1);
        assert!(!transport.has_stored_bodies(), "written, so no longer held");
        let mut reply = vec![0u8; reply_len];
        client.read_exact(&mut reply).unwrap();
        let header = wire::parse_header(&reply, &Limits::CEILING)
            .unwrap()
            .unwrap();
        assert!(wire::Frame::view(header, &reply).crc_ok(&reply));
        assert_eq!(transport.stats.stored_bodies_copied, 2);
    }

    #[test]
    fn data_and_hangup_in_one_edge_still_close() {
        let (mut transport, mut pools, _waker) = setup();
        let (mut client, server) = pair();
        transport.adopt(server).unwrap();
        let mut request = Vec::new();
        wire::encode_request(&mut request, Opcode::Ping, 1, b"", &[], b"");
        // A partial second frame, then FIN: the short recv must not hide the hang-up.
        request.extend_from_slice(&[0x43, 0x52]);
        client.write_all(&request).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut frames = Vec::new();
        for _ in 0..100 {
            transport.poll_events(Duration::from_millis(10));
            transport.poll_rx(&mut pools, 16, &mut |frame| frames.push(frame));
            if transport.connection_count() == 0 {
                break;
            }
        }
        assert_eq!(frames.len(), 1, "the complete frame is delivered");
        assert_eq!(
            transport.connection_count(),
            0,
            "EOF after a short read closes the connection"
        );
        assert_eq!(transport.stats.truncated, 1, "the partial frame is counted");
        for frame in frames {
            pools.release_lease(frame.frame);
        }
        assert_eq!(pools.in_use(), 0);
    }

    #[test]
    fn frame_larger_than_a_chunk_uses_a_large_buffer() {
        let (mut transport, mut pools, _waker) = setup();
        let (mut client, server) = pair();
        transport.adopt(server).unwrap();
        let data = vec![0xA5u8; 200 << 10];
        let mut request = Vec::new();
        wire::encode_request(
            &mut request,
            Opcode::OsdOp,
            9,
            b"big",
            &[SubOpSpec::write(0, &data)],
            b"",
        );
        let writer = std::thread::spawn(move || {
            client.write_all(&request).unwrap();
            client
        });
        let mut frames = Vec::new();
        for _ in 0..500 {
            transport.poll_events(Duration::from_millis(10));
            transport.poll_rx(&mut pools, 16, &mut |frame| frames.push(frame));
            if !frames.is_empty() {
                break;
            }
        }
        let _client = writer.join().unwrap();
        assert_eq!(frames.len(), 1);
        let frame = frames.pop().unwrap();
        assert_eq!(frame.frame.pool(), pools.large.id());
        let view = wire::Frame::view(frame.header, frame.frame.as_slice());
        assert!(view.crc_ok(frame.frame.as_slice()));
        view.validate_sub_ops().unwrap();
        assert_eq!(view.sub_ops().next().unwrap().data, &data[..]);
        pools.release_lease(frame.frame);
    }
}
