//! The io_uring side of the TCP transport (`--tcp-io uring`): the same connections, framing and
//! reply queues as the epoll side, with the kernel calls replaced by one ring per core.
//!
//! Per pass: `poll_rx` posts a RECV into each connection's receive chunk that needs bytes (a
//! POLL, holding no buffer, for a connection with nothing in flight: idle connections keep no
//! chunk, as with epoll), `flush_tx` posts one SENDMSG per connection with replies, and then ONE
//! `io_uring_enter` both submits them and reaps what completed (`enter_and_reap`). The ring is
//! set up with `DEFER_TASKRUN` + `SINGLE_ISSUER`: the kernel's receive work for a RECV that
//! waited runs in that enter, on the reactor's thread (so it is in the reactor's CPU time, and
//! never interrupts the reactor in user space), and a pass with nothing to submit and no task
//! work pending (`IORING_SQ_TASKRUN`) makes no system call at all. No SQPOLL thread, and nothing
//! goes to io-wq workers: sockets are issued non-blocking, a RECV without data arms a poll, and
//! sends carry `MSG_DONTWAIT` so that a full socket answers EAGAIN (a POLLOUT is armed then)
//! instead of waiting in the kernel.
//!
//! Why sends never wait in the kernel: a send still in flight after `flush_tx` would keep reading
//! reply bodies that may be the store's own memory (`Body::Stored`), which must be free to change
//! once `copy_stored_bodies` has run. So `flush_tx` returns only after every send it posted has
//! completed (each one completes inside the enter that submits it; the loop that waits for the
//! rest is a guarantee, not a path taken).
//!
//! Buffers under a RECV belong to the kernel until its completion: a connection closed with one
//! posted is shut down (which completes it) and its slot kept, with the buffer, until the
//! completion comes (`held`).

use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::*;

/// Submission queue entries; a full queue is submitted early, so this bounds no connection count.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries (the kernel keeps overflow, `IORING_FEAT_NODROP`, so this is not a
/// limit either, only the batch one reap takes).
const CQ_ENTRIES: u32 = 4096;
/// Sends posted per enter; more connections with replies in one pass take another enter.
const SEND_SLOTS: usize = 64;
/// Bytes of packed reply heads per send (`TX_HEADS_BYTES` for writev): 204 one-sub-op write
/// acknowledgements, more than the default in-flight limit of a connection.
const SEND_HEADS_BYTES: usize = 8 << 10;
/// Connection slots must fit the 24 index bits of a user_data.
const INDEX_BITS: u32 = 24;
/// `IORING_ENTER_GETEVENTS` (the io-uring crate keeps its `sys` module private): an enter that
/// also runs the deferred task work.
const ENTER_GETEVENTS: u32 = 1;
/// How long `close_all` waits for the kernel to give back buffers under posted receives.
const CLOSE_WAIT_MAX: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Recv = 1,
    RxPoll = 2,
    TxPoll = 3,
    Send = 4,
    Cancel = 5,
    Waker = 6,
    Listener = 7,
    Watched = 8,
}

impl Kind {
    fn from_bits(bits: u8) -> Option<Kind> {
        Some(match bits {
            1 => Kind::Recv,
            2 => Kind::RxPoll,
            3 => Kind::TxPoll,
            4 => Kind::Send,
            5 => Kind::Cancel,
            6 => Kind::Waker,
            7 => Kind::Listener,
            8 => Kind::Watched,
            _ => return None,
        })
    }
}

/// user_data: generation (32 bits) | kind (8) | connection index (or send slot / watched fd) (24).
fn user_data(kind: Kind, index: u32, generation: u32) -> u64 {
    debug_assert!(index < 1 << INDEX_BITS);
    u64::from(generation) << 32 | u64::from(kind as u8) << INDEX_BITS | u64::from(index)
}

fn decode(data: u64) -> (Option<Kind>, u32, u32) {
    let index = (data & ((1 << INDEX_BITS) - 1)) as u32;
    let kind = Kind::from_bits((data >> INDEX_BITS) as u8);
    (kind, index, (data >> 32) as u32)
}

/// What a connection has posted to receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RxOp {
    None,
    /// A RECV into the connection's large buffer (`large`) or its chunk.
    Recv {
        large: bool,
    },
    /// A one-shot POLLIN: the connection had nothing in flight and holds no chunk.
    Poll,
}

/// The memory one SENDMSG reads until its completion: the message header, its iovecs and the
/// reply heads packed for it.
struct SendSlot {
    msg: libc::msghdr,
    iovecs: [libc::iovec; TX_IOVECS_MAX],
    heads: Box<[u8]>,
    /// The connection (index, generation) whose send this slot carries.
    conn: (u32, u32),
}

/// A receive buffer the kernel may still write: its connection was closed with a RECV posted.
struct Held {
    generation: u32,
    buf: Buf,
}

pub(super) struct UringIo {
    /// `SINGLE_ISSUER`: only the thread that built it may enter it, so a transport on
    /// io_uring is built on its reactor's thread (`build_core` runs there).
    ring: IoUring,
    /// Boxed so the addresses handed to the kernel stay put.
    sends: Box<[SendSlot]>,
    sends_used: usize,
    /// Sends submitted whose completion has not been reaped.
    sends_in_flight: usize,
    watched: Vec<RawFd>,
    waker_fd: RawFd,
    listener_fd: Option<RawFd>,
    held: Vec<Option<Held>>,
    held_count: usize,
    /// Buffers given back by completions reaped without the pools at hand (sized at start).
    released: Vec<Buf>,
    /// Completions copied out of the ring before they are handled (sized at start).
    reaped: Vec<(u64, i32, u32)>,
    pub(super) enters: u64,
    pub(super) enter_errors: u64,
    /// Readiness found by reaps since `poll_events` last reported it (receive and poll
    /// completions, the listener): the pass's work, as epoll's events are.
    events: usize,
}

/// Sets up a ring for `connections_max` connections, or says why the kernel refused (seccomp,
/// `kernel.io_uring_disabled`, an old kernel without `DEFER_TASKRUN`).
pub(super) fn setup(connections_max: u32, waker_fd: RawFd) -> io::Result<UringIo> {
    if connections_max >= 1 << INDEX_BITS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "io_uring transport: at most {} connections",
                1 << INDEX_BITS
            ),
        ));
    }
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_submit_all()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES)?;
    let sends = (0..SEND_SLOTS)
        .map(|_| SendSlot {
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
            iovecs: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; TX_IOVECS_MAX],
            heads: vec![0; SEND_HEADS_BYTES].into_boxed_slice(),
            conn: (0, 0),
        })
        .collect();
    let mut io = UringIo {
        ring,
        sends,
        sends_used: 0,
        sends_in_flight: 0,
        watched: Vec::with_capacity(8),
        waker_fd,
        listener_fd: None,
        held: (0..connections_max).map(|_| None).collect(),
        held_count: 0,
        released: Vec::with_capacity(connections_max as usize),
        reaped: Vec::with_capacity(CQ_ENTRIES as usize),
        enters: 0,
        enter_errors: 0,
        events: 0,
    };
    io.push(multishot_poll(waker_fd, user_data(Kind::Waker, 0, 0)))?;
    // Submitted now, so that a ring the kernel refuses to run is refused here (and the
    // transport falls back to epoll) rather than on the first pass.
    io.enter(None)?;
    Ok(io)
}

fn multishot_poll(fd: RawFd, data: u64) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
        .multi(true)
        .build()
        .user_data(data)
}

impl UringIo {
    pub(super) fn held_count(&self) -> usize {
        self.held_count
    }

    /// Queues one entry; a full submission queue is submitted first (its entries then complete
    /// or arm polls as usual, and their completions wait in the ring for the next reap).
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: every entry built here points only at memory that outlives its
            // completion: receive buffers are held until their completion (`held`), send slots
            // are not reused before theirs is reaped, and polls and cancels point at nothing.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.enter(None)?;
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "io_uring submission queue still full after a submit",
        ))
    }

    /// One `io_uring_enter`: submits what is queued and runs the kernel's deferred work (the
    /// completions of receives that waited for data), waiting up to `wait` for a completion
    /// when given. Makes no system call when there is nothing to submit or run.
    fn enter(&mut self, wait: Option<Duration>) -> io::Result<()> {
        let to_submit = self.ring.submission().len();
        let flags_taskrun = self.ring.submission().taskrun();
        let overflow = self.ring.submission().cq_overflow();
        if wait.is_none() && to_submit == 0 && !flags_taskrun && !overflow {
            return Ok(());
        }
        self.enters += 1;
        let result = match wait {
            None => {
                // SAFETY: no argument pointer; the flags ask for submission and task work only.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        to_submit as u32,
                        0,
                        ENTER_GETEVENTS,
                        None,
                    )
                }
            }
            Some(timeout) => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                // The completion queue is full of unreaped entries: the caller reaps and the
                // next enter submits what is still queued.
                Ok(())
            }
            Err(e) => {
                self.enter_errors += 1;
                Err(e)
            }
        }
    }

    /// Copies the completions out of the ring (into `reaped`, sized at start).
    fn take_completions(&mut self) {
        self.reaped.clear();
        let mut completion = self.ring.completion();
        completion.sync();
        for cqe in &mut completion {
            if self.reaped.len() == self.reaped.capacity() {
                break; // The rest wait for the next reap.
            }
            self.reaped
                .push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }
}

impl TcpTransport {
    /// Whether this transport runs on io_uring (asked for, and the kernel allowed it).
    pub fn uses_uring(&self) -> bool {
        self.uring.is_some()
    }

    pub(super) fn uring_listen(&mut self, fd: RawFd) -> io::Result<()> {
        let uring = self.uring.as_mut().expect("uring transport");
        uring.listener_fd = Some(fd);
        uring.push(multishot_poll(fd, user_data(Kind::Listener, 0, 0)))
    }

    pub(super) fn uring_watch(&mut self, fd: RawFd) -> io::Result<()> {
        let uring = self.uring.as_mut().expect("uring transport");
        let slot = uring.watched.len() as u32;
        uring.watched.push(fd);
        uring.push(multishot_poll(fd, user_data(Kind::Watched, slot, 0)))
    }

    /// `poll_events` on io_uring: the pass's enter is in `flush_tx`, so a non-blocking poll only
    /// reaps what is in the ring (no system call); a park first waits in the ring for a
    /// completion (a waker, a listener, data).
    pub(super) fn uring_poll_events(&mut self, timeout: Duration) -> usize {
        if !timeout.is_zero() {
            // Work already gathered must not wait behind a sleep: then only submit and reap.
            let quiet = self.rx_list.is_empty() && self.tx_list.is_empty();
            let uring = self.uring.as_mut().expect("uring transport");
            if let Err(e) = uring.enter(quiet.then_some(timeout)) {
                self.log_enter_error(e);
            }
        }
        self.reap(None);
        // What this pass's and the last pass's reaps found (the last pass's enter, in
        // `flush_tx`, gathers most of it): counted as work where epoll's `epoll_wait` would.
        std::mem::take(&mut self.uring.as_mut().expect("uring transport").events)
    }

    fn log_enter_error(&self, error: io::Error) {
        let errors = self.uring.as_ref().expect("uring transport").enter_errors;
        if errors.is_power_of_two() {
            log::error!(
                "core {}: io_uring_enter failed ({errors} times so far): {error}; this core's \
                 TCP connections make no progress while it fails",
                self.core
            );
        }
    }

    /// Posts what a listed connection needs to receive more, after its complete frames were
    /// handed up: a RECV for the rest of a frame (or for the next frames while replies are
    /// owed), or a POLL holding no buffer when it has nothing in flight.
    pub(super) fn uring_post_receive(
        &mut self,
        index: u32,
        pools: &mut CorePools,
        pending_len: usize,
    ) -> RxOutcome {
        let conn = self.conns[index as usize].as_mut().expect("listed is open");
        if conn.rx_op != RxOp::None {
            return RxOutcome::Drained; // Its completion lists the connection again.
        }
        if let Some(end) = conn.rx_end.take() {
            let partial = has_partial_frame(conn);
            if partial {
                self.stats.truncated += 1;
                log::info!("core {}: connection closed mid-frame", self.core);
            } else if end != 0 {
                log::info!(
                    "core {}: receive failed, closing connection: {}",
                    self.core,
                    io::Error::from_raw_os_error(end)
                );
            }
            self.close(index, pools);
            return RxOutcome::Closed;
        }
        let fd = conn.stream.as_raw_fd();
        let generation = conn.generation;
        if !has_partial_frame(conn) && conn.inflight == 0 && !conn.rx_ready {
            rx::retire_idle_chunk(conn, pools);
            self.stalled_count = rx::note_stall(conn, self.stalled_count);
            conn.rx_op = RxOp::Poll;
            let events = (libc::POLLIN | libc::POLLRDHUP) as u32;
            let entry = opcode::PollAdd::new(types::Fd(fd), events)
                .build()
                .user_data(user_data(Kind::RxPoll, index, generation));
            return self.push_or_close(index, pools, entry);
        }
        if !self.ensure_room(index, pools, pending_len) {
            return RxOutcome::Paused;
        }
        let conn = self.conns[index as usize].as_mut().expect("still open");
        let large = conn.large.is_some();
        let target = match conn.large.as_mut() {
            Some((buf, frame_len)) => {
                let want = *frame_len - buf.sealed_len();
                &mut buf.spare_mut()[..want]
            }
            None => conn.rx.as_mut().expect("room made").spare_mut(),
        };
        let entry = opcode::Recv::new(types::Fd(fd), target.as_mut_ptr(), target.len() as u32)
            .build()
            .user_data(user_data(Kind::Recv, index, generation));
        conn.rx_op = RxOp::Recv { large };
        conn.rx_ready = false;
        self.stalled_count = rx::note_stall(conn, self.stalled_count);
        self.stats.rx_syscalls += 1;
        self.push_or_close(index, pools, entry)
    }

    fn push_or_close(
        &mut self,
        index: u32,
        pools: &mut CorePools,
        entry: squeue::Entry,
    ) -> RxOutcome {
        let uring = self.uring.as_mut().expect("uring transport");
        if let Err(e) = uring.push(entry) {
            log::warn!("core {}: io_uring submission failed: {e}", self.core);
            let conn = self.conns[index as usize].as_mut().expect("open");
            conn.rx_op = RxOp::None; // Never submitted.
            self.close(index, pools);
            return RxOutcome::Closed;
        }
        RxOutcome::Drained
    }

    /// The connection's replies were written and nothing is in flight: a RECV it posted would
    /// keep its chunk while it idles, so it is cancelled (its completion re-posts a POLL).
    pub(super) fn uring_release_idle(&mut self, index: u32) {
        let conn = self.conns[index as usize].as_mut().expect("open");
        if conn.rx_op == (RxOp::Recv { large: false })
            && !conn.cancel_posted
            && conn.inflight == 0
            && !has_partial_frame(conn)
        {
            conn.cancel_posted = true;
            let target = user_data(Kind::Recv, index, conn.generation);
            let entry = opcode::AsyncCancel::new(target)
                .build()
                .user_data(user_data(Kind::Cancel, index, conn.generation));
            let uring = self.uring.as_mut().expect("uring transport");
            if let Err(e) = uring.push(entry) {
                log::warn!("core {}: io_uring cancel not queued: {e}", self.core);
            }
        }
    }

    /// `flush_tx` on io_uring: one SENDMSG per listed connection, then the pass's enter, which
    /// also submits the receives `poll_rx` posted and reaps everything. Returns the replies
    /// completed (receive events it gathered are for the next pass's `poll_rx`; a park does
    /// not sleep while connections are listed to be read).
    pub(super) fn uring_flush_tx(&mut self, pools: &mut CorePools) -> usize {
        let replies_before = self.stats.replies_tx;
        let mut pending = std::mem::take(&mut self.tx_list_spare);
        std::mem::swap(&mut pending, &mut self.tx_list);
        for &index in &pending {
            if self.uring.as_ref().expect("uring").sends_used == SEND_SLOTS {
                self.finish_sends(pools);
            }
            self.post_send(index, pools);
        }
        pending.clear();
        self.tx_list_spare = pending;
        self.finish_sends(pools);
        (self.stats.replies_tx - replies_before) as usize
    }

    /// The pass's enter: submits the sends (and receives) posted, reaps, and returns once every
    /// send has completed. Each completes inside the enter that submits it (MSG_DONTWAIT); the
    /// loop waits for any that did not, so that no reply memory is read by the kernel after
    /// `flush_tx` returns.
    fn finish_sends(&mut self, pools: &mut CorePools) {
        self.enter_and_reap(None, pools);
        while self.uring.as_ref().expect("uring").sends_in_flight > 0 {
            self.enter_and_reap(Some(Duration::from_millis(1)), pools);
        }
        self.uring.as_mut().expect("uring").sends_used = 0;
    }

    fn post_send(&mut self, index: u32, pools: &mut CorePools) {
        let uring = self.uring.as_mut().expect("uring transport");
        let Some(conn) = self.conns[index as usize].as_mut() else {
            return;
        };
        let slot_index = uring.sends_used;
        let slot = &mut uring.sends[slot_index];
        let (iovec_count, _) = tx::gather(conn, &mut slot.iovecs, &mut slot.heads);
        if iovec_count == 0 {
            conn.in_tx_list = false;
            return;
        }
        slot.msg.msg_iov = slot.iovecs.as_mut_ptr();
        slot.msg.msg_iovlen = iovec_count as _;
        slot.conn = (index, conn.generation);
        let entry = opcode::SendMsg::new(types::Fd(conn.stream.as_raw_fd()), &slot.msg)
            .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
            .build()
            .user_data(user_data(Kind::Send, slot_index as u32, 0));
        self.stats.tx_syscalls += 1;
        self.stats.tx_iovecs += iovec_count as u64;
        if let Err(e) = uring.push(entry) {
            log::warn!("core {}: io_uring send not queued: {e}; closing", self.core);
            self.close(index, pools);
            return;
        }
        uring.sends_used += 1;
        uring.sends_in_flight += 1;
    }

    /// Enters the ring (see `UringIo::enter`) and handles every completion. Returns the work
    /// found: replies completed and receive events.
    fn enter_and_reap(&mut self, wait: Option<Duration>, pools: &mut CorePools) -> usize {
        let uring = self.uring.as_mut().expect("uring transport");
        if let Err(e) = uring.enter(wait) {
            self.log_enter_error(e);
        }
        self.reap(Some(pools))
    }

    /// Handles the completions already in the ring (no system call). Returns the readiness
    /// found (also kept for `poll_events` to report as work); sends count in `replies_tx`.
    /// Without `pools` (a park), buffers that completions free wait in `released` for the next
    /// call with them; sends are never in flight then (`flush_tx` waits for its own).
    pub(super) fn reap(&mut self, mut pools: Option<&mut CorePools>) -> usize {
        if let Some(pools) = pools.as_deref_mut() {
            let uring = self.uring.as_mut().expect("uring transport");
            while let Some(buf) = uring.released.pop() {
                pools.release(buf);
            }
        }
        let mut work = 0;
        self.stats.uring_enters = self.uring.as_ref().expect("uring transport").enters;
        loop {
            let uring = self.uring.as_mut().expect("uring transport");
            uring.take_completions();
            if uring.reaped.is_empty() {
                return work;
            }
            let reaped = std::mem::take(&mut uring.reaped);
            let mut found = 0;
            for &(data, result, flags) in &reaped {
                found += self.on_completion(data, result, flags, pools.as_deref_mut());
            }
            work += found;
            let uring = self.uring.as_mut().expect("uring");
            uring.reaped = reaped;
            uring.events += found;
        }
    }

    fn on_completion(
        &mut self,
        data: u64,
        result: i32,
        flags: u32,
        pools: Option<&mut CorePools>,
    ) -> usize {
        let (kind, index, generation) = decode(data);
        let Some(kind) = kind else {
            log::error!(
                "core {}: io_uring completion of unknown kind {data:#x}",
                self.core
            );
            return 0;
        };
        match kind {
            Kind::Waker | Kind::Listener | Kind::Watched => {
                if kind == Kind::Listener {
                    self.accept_ready = true;
                }
                if kind == Kind::Watched {
                    self.watched_ready = true;
                }
                if !cqueue::more(flags) {
                    self.rearm_multishot(kind, index);
                }
                usize::from(kind == Kind::Listener)
            }
            Kind::Send => {
                self.on_send(
                    index as usize,
                    result,
                    pools.expect("sends complete within flush_tx, which has the pools"),
                );
                0 // Replies are `flush_tx`'s count (`replies_tx`), not readiness.
            }
            Kind::Cancel => 0,
            Kind::Recv => self.on_recv(index, generation, result),
            Kind::RxPoll => {
                let Some(conn) = self.open_conn(index, generation) else {
                    return 0;
                };
                conn.rx_op = RxOp::None;
                conn.rx_ready = true;
                if result > 0
                    && result as u32 & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32 != 0
                {
                    conn.peer_closed = true;
                }
                self.list_rx(index);
                1
            }
            Kind::TxPoll => {
                let Some(conn) = self.open_conn(index, generation) else {
                    return 0;
                };
                conn.tx_poll_posted = false;
                if !conn.tx.is_empty() && !conn.in_tx_list {
                    conn.in_tx_list = true;
                    self.tx_list.push(index);
                }
                0
            }
        }
    }

    fn rearm_multishot(&mut self, kind: Kind, index: u32) {
        let uring = self.uring.as_mut().expect("uring transport");
        let fd = match kind {
            Kind::Waker => uring.waker_fd,
            Kind::Listener => uring.listener_fd.expect("listener polled"),
            _ => uring.watched[index as usize],
        };
        if let Err(e) = uring.push(multishot_poll(fd, user_data(kind, index, 0))) {
            log::error!("core {}: io_uring poll not re-armed: {e}", self.core);
        }
    }

    fn open_conn(&mut self, index: u32, generation: u32) -> Option<&mut Connection> {
        self.conns
            .get_mut(index as usize)?
            .as_mut()
            .filter(|conn| conn.generation == generation)
    }

    fn list_rx(&mut self, index: u32) {
        let conn = self.conns[index as usize].as_mut().expect("open");
        if !conn.in_rx_list {
            conn.in_rx_list = true;
            self.rx_list.push_back(index);
        }
    }

    fn on_recv(&mut self, index: u32, generation: u32, result: i32) -> usize {
        let Some(conn) = self.open_conn(index, generation) else {
            // Closed with this receive posted: its buffer is the kernel's no longer.
            let uring = self.uring.as_mut().expect("uring transport");
            let held = uring.held[index as usize]
                .take_if(|held| held.generation == generation)
                .expect("a closed connection's posted receive holds its buffer");
            uring.held_count -= 1;
            uring.released.push(held.buf);
            self.free.push(index);
            return 0;
        };
        let RxOp::Recv { large } = conn.rx_op else {
            panic!("a receive completed on a connection that posted none");
        };
        conn.rx_op = RxOp::None;
        conn.cancel_posted = false;
        if result > 0 {
            let received = result as usize;
            self.stats.rx_bytes += received as u64;
            let conn = self.conns[index as usize].as_mut().expect("open");
            if large {
                conn.large.as_mut().expect("target").0.seal(received);
            } else {
                conn.rx.as_mut().expect("target").seal(received);
            }
        } else if result == 0 {
            conn.peer_closed = true;
            conn.rx_end = Some(0);
        } else if !matches!(-result, libc::ECANCELED | libc::EINTR | libc::EAGAIN) {
            conn.rx_end = Some(-result);
        }
        self.list_rx(index);
        1
    }

    fn on_send(&mut self, slot: usize, result: i32, pools: &mut CorePools) -> usize {
        let uring = self.uring.as_mut().expect("uring transport");
        uring.sends_in_flight -= 1;
        let (index, generation) = uring.sends[slot].conn;
        if self.open_conn(index, generation).is_none() {
            return 0;
        }
        if result >= 0 {
            let (done, keep) = self.complete_written(index, result as usize, pools);
            if keep {
                self.tx_list.push(index);
            }
            return done;
        }
        let error = -result;
        let conn = self.conns[index as usize].as_mut().expect("open");
        if error == libc::EAGAIN {
            // The socket is full: POLLOUT says when it is not (as EPOLLOUT does).
            conn.in_tx_list = false;
            if !conn.tx_poll_posted {
                conn.tx_poll_posted = true;
                let entry =
                    opcode::PollAdd::new(types::Fd(conn.stream.as_raw_fd()), libc::POLLOUT as u32)
                        .build()
                        .user_data(user_data(Kind::TxPoll, index, generation));
                let uring = self.uring.as_mut().expect("uring transport");
                if let Err(e) = uring.push(entry) {
                    log::warn!("core {}: io_uring poll not queued: {e}", self.core);
                }
            }
            return 0;
        }
        if error == libc::EINTR {
            self.tx_list.push(index);
            return 0;
        }
        log::info!(
            "core {}: write failed, closing connection: {}",
            self.core,
            io::Error::from_raw_os_error(error)
        );
        self.close(index, pools);
        0
    }

    /// `close` on io_uring: shuts the socket down so that whatever it has posted completes, and
    /// keeps a buffer under a posted receive until that completion. Returns true when it did:
    /// the slot stays taken until then (`on_recv` frees it).
    pub(super) fn uring_close(&mut self, index: u32, conn: &mut Connection) -> bool {
        // SAFETY: shutdown on a descriptor this connection owns; errors (already disconnected)
        // change nothing.
        unsafe { libc::shutdown(conn.stream.as_raw_fd(), libc::SHUT_RDWR) };
        let RxOp::Recv { large } = conn.rx_op else {
            return false;
        };
        let buf = if large {
            conn.large.take().expect("receive target").0
        } else {
            conn.rx.take().expect("receive target")
        };
        let uring = self.uring.as_mut().expect("uring transport");
        assert!(
            uring.held[index as usize].is_none(),
            "one held buffer per slot"
        );
        uring.held[index as usize] = Some(Held {
            generation: conn.generation,
            buf,
        });
        uring.held_count += 1;
        true
    }

    /// After `close_all`: waits (bounded) for the receives still posted to complete, so that
    /// no buffer goes back to its pool while the kernel may write it.
    pub(super) fn uring_drain(&mut self, pools: &mut CorePools) {
        let deadline = Instant::now() + CLOSE_WAIT_MAX;
        while self.uring.as_ref().expect("uring").held_count > 0 && Instant::now() < deadline {
            self.enter_and_reap(Some(Duration::from_millis(10)), pools);
        }
        let left = self.uring.as_ref().expect("uring").held_count;
        if left > 0 {
            // Leaked, not reused: the kernel may still write them until the ring is closed.
            log::warn!(
                "core {}: {left} receive buffers still posted to io_uring at shutdown",
                self.core
            );
        }
    }
}

pub(super) fn has_partial_frame(conn: &Connection) -> bool {
    conn.large.is_some()
        || conn
            .rx
            .as_ref()
            .is_some_and(|chunk| chunk.sealed_len() > conn.consumed)
}
