//! Connections: request slots, receive buffers, one TCP connection, the epoll set.

use super::*;

#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub(super) request: Request,
    /// Bumped at each use, so a late or duplicated reply cannot complete a newer request.
    pub(super) generation: u32,
    active: bool,
    pub(super) sent_ns: u64,
}

/// A connection's request slots; a request id is (generation << 32) | slot index.
pub(super) struct Slots {
    pub(super) entries: Vec<Slot>,
    pub(super) free: Vec<u32>,
}

impl Slots {
    pub(super) fn new(qd: u32) -> Slots {
        let request = Request {
            block: 0,
            kind: Kind::Read,
            counter: 0,
        };
        let idle = Slot {
            request,
            generation: 0,
            active: false,
            sent_ns: 0,
        };
        Slots {
            entries: vec![idle; qd as usize],
            free: (0..qd).rev().collect(),
        }
    }

    /// Fills a free slot; returns (slot index, request id).
    pub(super) fn arm(&mut self, request: Request) -> (u32, u64) {
        let index = self
            .free
            .pop()
            .expect("arm is called only with a free slot");
        let slot = &mut self.entries[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.request = request;
        slot.active = true;
        (index, u64::from(slot.generation) << 32 | u64::from(index))
    }

    pub(super) fn take(&mut self, request_id: u64) -> Option<Slot> {
        let index = request_id as u32;
        let slot = self.entries.get_mut(index as usize)?;
        if !slot.active || slot.generation != (request_id >> 32) as u32 {
            return None;
        }
        slot.active = false;
        self.free.push(index);
        Some(*slot)
    }
}

/// Receive buffer: bytes start..end are received and not yet consumed.
pub(super) struct RxBuf {
    pub(super) buf: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
    /// Length of the incomplete frame at `start` (0: unknown yet).
    need: usize,
}

impl RxBuf {
    pub(super) fn new() -> RxBuf {
        RxBuf {
            buf: vec![0; RX_BUFFER_BYTES],
            start: 0,
            end: 0,
            need: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, len: usize) {
        self.start += len;
        self.need = 0;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Free space to read into: room for the whole incomplete frame and at least
    /// `RX_READ_MIN_BYTES`, made by moving the pending bytes to the front or by growing.
    fn spare(&mut self) -> &mut [u8] {
        let pending = self.end - self.start;
        let needed = self.need.max(pending + RX_READ_MIN_BYTES);
        if self.start + needed > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, pending);
            if needed > self.buf.len() {
                self.buf.resize(needed.next_power_of_two(), 0);
            }
        }
        &mut self.buf[self.end..]
    }
}

pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) rx: RxBuf,
    pub(super) tx: Vec<u8>,
    pub(super) tx_sent: usize,
    pub(super) slots: Slots,
    /// Slots encoded since the last flush: their send time is the flush's.
    pub(super) unstamped: Vec<u32>,
    /// EPOLLOUT is registered (a write was cut short).
    pub(super) want_write: bool,
    /// Could not fill its slots because every block was in flight; retried each loop pass.
    pub(super) starved: bool,
    /// --route: the server core that owns this connection (its timed ops are on that core's
    /// objects); None when not routed.
    pub(super) route: Option<usize>,
}

impl Conn {
    /// Issues requests until the slots are full or the work has none to give.
    pub(super) fn fill(&mut self, work: &mut Work) {
        self.starved = false;
        while !self.slots.free.is_empty() {
            let Some(request) = work.next_request(self.route) else {
                self.starved = !work.stopping && !work.exhausted();
                return;
            };
            let (slot, request_id) = self.slots.arm(request);
            work.encode(&mut self.tx, request_id, request);
            self.unstamped.push(slot);
        }
    }

    /// Writes what the socket takes; registers for EPOLLOUT while anything is left.
    pub(super) fn flush(
        &mut self,
        epoch: Instant,
        epoll: &Epoll,
        token: usize,
    ) -> Result<(), String> {
        if !self.unstamped.is_empty() {
            let now = epoch.elapsed().as_nanos() as u64;
            for slot in self.unstamped.drain(..) {
                self.slots.entries[slot as usize].sent_ns = now;
            }
        }
        while self.tx_sent < self.tx.len() {
            match self.stream.write(&self.tx[self.tx_sent..]) {
                Ok(0) => return Err("server closed the connection".to_string()),
                Ok(n) => self.tx_sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("send: {}", client::io_reason(&e))),
            }
        }
        if self.tx_sent == self.tx.len() {
            self.tx.clear();
            self.tx_sent = 0;
        }
        let want_write = self.tx_sent < self.tx.len();
        if want_write != self.want_write {
            let events = if want_write {
                EPOLL_READ | libc::EPOLLOUT as u32
            } else {
                EPOLL_READ
            };
            epoll.modify(self.stream.as_raw_fd(), events, token)?;
            self.want_write = want_write;
        }
        Ok(())
    }

    /// Reads what has arrived and books every complete reply.
    pub(super) fn receive(&mut self, work: &mut Work, epoch: Instant) -> Result<(), String> {
        loop {
            let spare = self.rx.spare();
            let spare_len = spare.len();
            let n = match self.stream.read(spare) {
                Ok(0) => return Err("server closed the connection".to_string()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("receive: {}", client::io_reason(&e))),
            };
            self.rx.end += n;
            self.drain_frames(work, epoch.elapsed().as_nanos() as u64)?;
            if n < spare_len {
                return Ok(()); // the socket is empty; level-triggered epoll reports more later
            }
        }
    }

    fn drain_frames(&mut self, work: &mut Work, now_ns: u64) -> Result<(), String> {
        loop {
            let pending = self.rx.pending();
            let header = match wire::parse_header(pending, &Limits::CEILING) {
                Ok(Some(header)) => header,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("malformed reply: {e}")),
            };
            let len = header.frame_len();
            if pending.len() < len {
                self.rx.need = len;
                return Ok(());
            }
            let bytes = &pending[..len];
            let frame = Frame::view(header, bytes);
            if !frame.crc_ok(bytes) {
                let stats = work.stats();
                stats.verify_failures += 1;
                stats.errors += 1;
                return Err(format!(
                    "reply crc mismatch (request id {:#x}); closing the connection",
                    header.request_id
                ));
            }
            if header.opcode != Opcode::OsdOp as u8 | wire::REPLY_BIT {
                let status = client::status_name(header.status);
                return Err(format!(
                    "unexpected reply opcode {:#04x} (status {status})",
                    header.opcode
                ));
            }
            let Some(slot) = self.slots.take(header.request_id) else {
                let status = client::status_name(header.status);
                return Err(format!(
                    "reply to unknown request id {:#x} (status {status})",
                    header.request_id
                ));
            };
            let (status, output) = reply_outcome(&frame)?;
            work.complete(&slot, now_ns, status, output);
            self.rx.consume(len);
        }
    }
}

/// The effective status of a one-sub-op reply and the sub-op's output.
pub(super) fn reply_outcome<'a>(frame: &Frame<'a>) -> Result<(u32, &'a [u8]), String> {
    let first = frame
        .reply_results()
        .ok()
        .and_then(|mut results| results.next());
    if frame.header.status != Status::Ok as u32 {
        return Ok((frame.header.status, first.map_or(&[][..], |(_, out)| out)));
    }
    first.ok_or_else(|| "malformed reply: result table missing or inconsistent".to_string())
}
