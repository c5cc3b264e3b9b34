//! Messenger threads (Ceph's AsyncMessenger workers): each owns a set of connections and an
//! epoll set, sleeps in a blocking `epoll_wait`, reads what arrived, cuts it into frames with
//! the RTC transport's functions (`wire::parse_header`, `Frame`: same limits, same statuses,
//! same log lines), answers PING/STATUS and errors itself, and enqueues ops on the sharded op
//! queue. Messenger 0 also owns the listener and deals accepted connections round-robin.
//!
//! A frame is copied out of the connection's receive buffer into its own `Vec` (a classic
//! messenger decodes into a message); the receive buffer is reused. Ops from one `epoll_wait`
//! round are pushed in one batch per shard: one lock round and at most one wake-up per shard.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use carmine_dataplane::wire::{self, Frame, Header, HeaderError, Opcode, Status, HEADER_SIZE};

use crate::classic::connection::{Conn, EPOLL_IN};
use crate::classic::op_queue::Op;
use crate::classic::Shared;
use crate::osd::core::error_counter;
use crate::osd::stats::{Counter, Counters, SharedCounters};

/// Receive buffer per connection, allocated at accept; larger frames grow it for their time.
const RX_BUFFER_BYTES: usize = 64 << 10;
/// recv calls per readiness event: fairness between connections (epoll is level-triggered and
/// reports the connection again if more is waiting).
const RECVS_PER_EVENT_MAX: usize = 4;
const EVENTS_MAX: usize = 256;
/// Ops held for one shard before they are pushed, within one epoll round.
const BATCH_OPS_MAX: usize = 256;
const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_WAKE: u64 = u64::MAX - 1;

/// What other threads hold to reach a messenger: its epoll set, its wake-up eventfd and its
/// inbox of accepted connections.
pub struct MessengerHandle {
    pub epoll: OwnedFd,
    eventfd: OwnedFd,
    inbox: Mutex<Vec<TcpStream>>,
}

fn epoll_add(epoll: RawFd, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: epoll_ctl reads one epoll_event we own; both descriptors are open.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl MessengerHandle {
    pub fn new() -> io::Result<MessengerHandle> {
        // SAFETY: epoll_create1 and eventfd take flags only; results are checked before use.
        let (epoll, eventfd) = unsafe {
            (
                libc::epoll_create1(libc::EPOLL_CLOEXEC),
                libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
            )
        };
        if epoll < 0 || eventfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (epoll, eventfd) =
            unsafe { (OwnedFd::from_raw_fd(epoll), OwnedFd::from_raw_fd(eventfd)) };
        epoll_add(
            epoll.as_raw_fd(),
            eventfd.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOKEN_WAKE,
        )?;
        Ok(MessengerHandle {
            epoll,
            eventfd,
            inbox: Mutex::new(Vec::new()),
        })
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to our eventfd.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn hand_over(&self, stream: TcpStream) {
        self.inbox.lock().expect("inbox lock").push(stream);
        self.wake();
    }
}

/// A connection as its messenger sees it: the shared part, and the receive state only the
/// messenger touches.
struct RxConn {
    conn: Arc<Conn>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes the frame at `start` needs in all (HEADER_SIZE while its header is incomplete).
    need: usize,
}

enum Rx {
    /// Keep the connection; more may come.
    Open,
    Closed,
}

pub struct Messenger {
    index: usize,
    shared: Arc<Shared>,
    handles: Arc<[MessengerHandle]>,
    listener: Option<TcpListener>,
    conns: Vec<Option<RxConn>>,
    free: Vec<u32>,
    batches: Vec<Vec<Op>>,
    counters: Counters,
    published: Arc<SharedCounters>,
    accept_next: usize,
}

impl Messenger {
    pub fn new(
        index: usize,
        shared: Arc<Shared>,
        handles: Arc<[MessengerHandle]>,
        listener: Option<TcpListener>,
        entry: usize,
    ) -> io::Result<Messenger> {
        if let Some(listener) = &listener {
            let epoll = handles[index].epoll.as_raw_fd();
            epoll_add(
                epoll,
                listener.as_raw_fd(),
                libc::EPOLLIN as u32,
                TOKEN_LISTENER,
            )?;
        }
        let shards = shared.queue.shard_count();
        Ok(Messenger {
            index,
            published: shared.board.core(entry),
            shared,
            handles,
            listener,
            conns: Vec::new(),
            free: Vec::new(),
            batches: (0..shards)
                .map(|_| Vec::with_capacity(BATCH_OPS_MAX))
                .collect(),
            counters: Counters::default(),
            accept_next: index,
        })
    }

    fn epoll(&self) -> RawFd {
        self.handles[self.index].epoll.as_raw_fd()
    }

    /// The thread's loop: until the server stops reading.
    pub fn run(&mut self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        while !self.shared.stop_reading.load(Ordering::Acquire) {
            // SAFETY: epoll_wait writes at most EVENTS_MAX events into our array.
            let ready = unsafe {
                libc::epoll_wait(self.epoll(), events.as_mut_ptr(), EVENTS_MAX as i32, -1)
            };
            if ready < 0 {
                continue; // EINTR
            }
            for event in &events[..ready as usize] {
                let (token, flags) = (event.u64, event.events);
                match token {
                    TOKEN_LISTENER => self.accept_all(),
                    TOKEN_WAKE => self.adopt_handed_over(),
                    _ => self.on_conn_event(token as u32, flags),
                }
            }
            self.flush_batches();
            self.published.publish(&self.counters);
        }
        self.flush_batches();
        self.published.publish(&self.counters);
    }

    // ---- connections ---------------------------------------------------------------------

    fn accept_all(&mut self) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        self.accept_from(&listener);
        self.listener = Some(listener);
    }

    fn accept_from(&mut self, listener: &TcpListener) {
        loop {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("messenger {}: accept failed: {e}", self.index);
                    return;
                }
            };
            let gauges = &self.shared.gauges;
            if gauges.connections.load(Ordering::Relaxed) >= self.shared.connections_max {
                self.counters.add(Counter::conn_refused, 1);
                continue; // Dropping the stream closes it.
            }
            gauges.connections.fetch_add(1, Ordering::Relaxed);
            let target = self.accept_next % self.handles.len();
            self.accept_next += 1;
            if target == self.index {
                self.adopt(stream);
            } else {
                self.handles[target].hand_over(stream);
            }
        }
    }

    fn adopt_handed_over(&mut self) {
        let mut value: u64 = 0;
        let eventfd = self.handles[self.index].eventfd.as_raw_fd();
        // SAFETY: reads 8 bytes into a local u64 from our non-blocking eventfd.
        unsafe { libc::read(eventfd, (&mut value as *mut u64).cast(), 8) };
        let streams = std::mem::take(&mut *self.handles[self.index].inbox.lock().expect("inbox"));
        for stream in streams {
            self.adopt(stream);
        }
    }

    fn adopt(&mut self, stream: TcpStream) {
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_nonblocking(true));
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            (self.conns.len() - 1) as u32
        });
        let conn = Arc::new(Conn::new(
            stream,
            self.epoll(),
            u64::from(slot),
            self.shared.inflight_per_connection,
        ));
        if let Err(e) = setup.and_then(|()| conn.register()) {
            log::warn!("messenger {}: cannot set up connection: {e}", self.index);
            self.free.push(slot);
            self.shared
                .gauges
                .connections
                .fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.counters.add(Counter::conn_accepted, 1);
        self.conns[slot as usize] = Some(RxConn {
            conn,
            buf: vec![0; RX_BUFFER_BYTES],
            start: 0,
            end: 0,
            need: HEADER_SIZE,
        });
    }

    fn close(&mut self, slot: u32) {
        let Some(rx) = self.conns[slot as usize].take() else {
            return;
        };
        rx.conn.close();
        self.free.push(slot);
        self.counters.add(Counter::conn_closed, 1);
        self.shared
            .gauges
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }

    fn on_conn_event(&mut self, slot: u32, flags: u32) {
        let Some(rx) = self.conns.get(slot as usize).and_then(|c| c.as_ref()) else {
            return; // Closed earlier in this round.
        };
        if flags & libc::EPOLLOUT as u32 != 0 {
            let sent = rx.conn.flush_pending();
            self.counters.add(Counter::tx_bytes, sent.bytes);
            self.counters.add(Counter::tx_syscalls, sent.syscalls);
        }
        let readable = (EPOLL_IN | libc::EPOLLHUP as u32 | libc::EPOLLERR as u32) & flags != 0;
        if readable {
            if let Rx::Closed = self.read_connection(slot) {
                self.close(slot);
            }
        }
    }

    // ---- receive -------------------------------------------------------------------------

    fn read_connection(&mut self, slot: u32) -> Rx {
        for _ in 0..RECVS_PER_EVENT_MAX {
            let rx = self.conns[slot as usize].as_mut().expect("open");
            if rx.conn.is_closed() {
                return Rx::Closed;
            }
            make_room(rx);
            let room = rx.buf.len() - rx.end;
            self.counters.add(Counter::rx_syscalls, 1);
            // SAFETY: recv writes at most `room` bytes into the live buffer past `end`.
            let received = unsafe {
                libc::recv(
                    rx.conn.fd(),
                    rx.buf[rx.end..].as_mut_ptr().cast(),
                    room,
                    libc::MSG_DONTWAIT,
                )
            };
            if received == 0 {
                if rx.end > rx.start {
                    self.counters.add(Counter::conn_truncated, 1);
                    log::info!("messenger {}: connection closed mid-frame", self.index);
                }
                return Rx::Closed;
            }
            if received < 0 {
                let error = io::Error::last_os_error();
                return match error.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Rx::Open,
                    _ => Rx::Closed,
                };
            }
            let received = received as usize;
            rx.end += received;
            self.counters.add(Counter::rx_bytes, received as u64);
            if let Rx::Closed = self.take_frames(slot) {
                return Rx::Closed;
            }
            let rx = self.conns[slot as usize].as_ref().expect("open");
            if received < room || rx.conn.pause_reading_if_full() {
                return Rx::Open; // Socket drained, or too much in flight: wait for epoll.
            }
        }
        Rx::Open
    }

    /// Handles every complete frame in the connection's buffer.
    fn take_frames(&mut self, slot: u32) -> Rx {
        let limits = self.shared.limits;
        loop {
            let rx = self.conns[slot as usize].as_mut().expect("open");
            let available = &rx.buf[rx.start..rx.end];
            let header = match wire::parse_header(available, &limits) {
                Ok(Some(header)) => header,
                Ok(None) => {
                    rx.need = HEADER_SIZE;
                    break;
                }
                Err(error) => {
                    let request_id = if available.len() >= 16 {
                        u64::from_le_bytes(available[8..16].try_into().expect("8 bytes"))
                    } else {
                        0
                    };
                    self.reject_stream(slot, error, request_id);
                    return Rx::Closed;
                }
            };
            let frame_len = header.frame_len();
            if available.len() < frame_len {
                rx.need = frame_len;
                break;
            }
            let conn = rx.conn.clone();
            let range = rx.start..rx.start + frame_len;
            rx.start += frame_len;
            // The frame is handled from the buffer in place; only ops copy it out.
            let rx = self.conns[slot as usize].take().expect("open");
            self.handle_frame(&conn, header, &rx.buf[range]);
            self.conns[slot as usize] = Some(rx);
        }
        let rx = self.conns[slot as usize].as_mut().expect("open");
        if rx.start == rx.end {
            rx.start = 0;
            rx.end = 0;
            if rx.buf.len() > RX_BUFFER_BYTES {
                rx.buf = vec![0; RX_BUFFER_BYTES]; // A large frame is done: give its memory back.
            }
        }
        Rx::Open
    }

    /// The byte stream can no longer be trusted: answer once, then close.
    fn reject_stream(&mut self, slot: u32, error: HeaderError, request_id: u64) {
        let status = error.status();
        if status == Status::OverLimit {
            self.counters.add(Counter::stream_over_limit, 1);
        } else {
            self.counters.add(Counter::stream_malformed, 1);
        }
        log::info!("messenger {}: closing connection: {error}", self.index);
        let request = Header {
            opcode: 0,
            request_id,
            ..Header::default()
        };
        let conn = self.conns[slot as usize]
            .as_ref()
            .expect("open")
            .conn
            .clone();
        self.send_status(&conn, &request, status);
    }

    // ---- one frame -----------------------------------------------------------------------

    fn handle_frame(&mut self, conn: &Arc<Conn>, header: Header, bytes: &[u8]) {
        let view = Frame::view(header, bytes);
        if !view.crc_ok(bytes) {
            log::info!(
                "messenger {}: request {} failed its crc",
                self.index,
                header.request_id
            );
            return self.answer_error(conn, &header, Status::BadCrc);
        }
        match (header.is_reply(), view.opcode()) {
            (false, Some(Opcode::OsdOp)) => {}
            (false, Some(Opcode::Ping)) => {
                self.counters.add(Counter::pings, 1);
                return self.send_payload(conn, &header, view.payload);
            }
            (false, Some(Opcode::Status)) => return self.answer_status(conn, &header),
            _ => return self.answer_error(conn, &header, Status::UnknownOpcode),
        }
        if let Err(status) = view.validate_sub_ops() {
            return self.answer_error(conn, &header, status);
        }
        if view.oid.is_empty() {
            return self.answer_error(conn, &header, Status::InvalidArgument);
        }
        let target = self.shared.placement.locate(view.oid);
        let op = Op {
            conn: conn.clone(),
            header,
            frame: {
                let mut frame = self.shared.buffers.take(bytes.len());
                frame.extend_from_slice(bytes);
                frame
            },
            local_pg: target.local_pg,
            object_hash: target.hash,
            mutates: view.sub_ops().any(|s| s.code.is_mutation()),
        };
        conn.inflight.fetch_add(1, Ordering::AcqRel);
        self.shared
            .gauges
            .ops_in_flight
            .fetch_add(1, Ordering::AcqRel);
        self.batches[target.core].push(op);
        if self.batches[target.core].len() >= BATCH_OPS_MAX {
            self.shared
                .queue
                .push_batch(target.core, &mut self.batches[target.core]);
        }
    }

    fn flush_batches(&mut self) {
        for (shard, batch) in self.batches.iter_mut().enumerate() {
            if !batch.is_empty() {
                self.shared.queue.push_batch(shard, batch);
            }
        }
    }

    fn answer_error(&mut self, conn: &Conn, header: &Header, status: Status) {
        self.counters.add(error_counter(status), 1);
        self.send_status(conn, header, status);
    }

    fn send_status(&mut self, conn: &Conn, header: &Header, status: Status) {
        let mut reply = [0u8; HEADER_SIZE];
        wire::encode_reply(&mut reply, header, status, &[], &[]);
        let sent = conn.send(&[&reply], false);
        self.counters.add(Counter::tx_bytes, sent.bytes);
        self.counters.add(Counter::tx_syscalls, sent.syscalls);
    }

    fn send_payload(&mut self, conn: &Conn, header: &Header, payload: &[u8]) {
        let mut reply = vec![0u8; HEADER_SIZE + payload.len()];
        reply[HEADER_SIZE..].copy_from_slice(payload);
        let (head, body) = reply.split_at_mut(HEADER_SIZE);
        wire::encode_reply(head, header, Status::Ok, &[], &[body]);
        let sent = conn.send(&[&reply], false);
        self.counters.add(Counter::tx_bytes, sent.bytes);
        self.counters.add(Counter::tx_syscalls, sent.syscalls);
    }

    fn answer_status(&mut self, conn: &Conn, header: &Header) {
        self.counters.add(Counter::status_requests, 1);
        self.published.publish(&self.counters);
        let json = crate::classic::render_status(&self.shared);
        self.send_payload(conn, header, json.as_bytes());
    }
}

/// Makes room past `end` for the pending frame: compacts, and grows for a frame larger than the
/// buffer (up to the largest frame the limits admit, checked from its header).
fn make_room(rx: &mut RxConn) {
    if rx.buf.len() - rx.start >= rx.need && rx.end < rx.buf.len() {
        return;
    }
    rx.buf.copy_within(rx.start..rx.end, 0);
    rx.end -= rx.start;
    rx.start = 0;
    if rx.buf.len() < rx.need {
        rx.buf.resize(rx.need, 0);
    }
}
