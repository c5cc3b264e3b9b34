//! `carmine load --transport udp`: the same generator (`Work`: block choice, data, verify,
//! ack log) over the datagram RPC on kernel UDP sockets (`dataplane::dgram`), for servers
//! started with `serve --transport udp`.
//!
//! A client is one UDP socket and one RPC client with `qd / 8` sessions (a session carries at
//! most `SLOTS_PER_SESSION` = 8 requests): load slot `i` always uses session `i / 8`, so a
//! session never has more requests than slots. The RPC resends on loss; its request ids are
//! its own, and the wire frame inside keeps the generator's (slot, generation) id, checked as
//! over TCP. Request bodies come from a per-client free list and go back to it when the RPC
//! drops them, so the steady state allocates nothing per request.

use std::cell::RefCell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;

use carmine_dataplane::dgram::socket::{RecvBuf, UdpSocketPort, DATAGRAM_BYTES_MAX};
use carmine_dataplane::dgram::{Message, RpcClient, RpcError, SessionId, SLOTS_PER_SESSION};
use carmine_dataplane::udp::rpc_config;

use super::*;

/// Longest wait in epoll while requests are in flight: the RPC's resend timer is checked at
/// least this often.
const TIMER_TICK: Duration = Duration::from_millis(2);
/// How long `fetch_status` waits for the STATUS reply.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) type BodyHome = Rc<RefCell<Vec<Vec<u8>>>>;

/// A request frame kept by the RPC until its response; its vector goes back to the client's
/// free list on drop.
pub(super) struct RequestBody {
    pub(super) bytes: Vec<u8>,
    pub(super) home: BodyHome,
}

impl AsRef<[u8]> for RequestBody {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for RequestBody {
    /// The vector goes home with its bytes: the next request is written over them
    /// (`Work::encode_over`), so a write's block is not zeroed before it is made.
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        self.home.borrow_mut().push(bytes);
    }
}

/// `--transport udp` limits: a request or reply must fit one RPC message.
pub(super) fn validate(args: &LoadArgs) -> Result<(), String> {
    let message_max = rpc_config(args.rpc_mtu).message_bytes_max() as u64;
    // Header, object id, one sub-op descriptor or result, the block.
    let frame_max = args.bs + 32 + 64 + wire::SUB_OP_DESC_SIZE as u64;
    if frame_max > message_max {
        return Err(format!(
            "--bs {} is too large for --transport udp: requests and replies must fit one RPC message of {message_max} bytes",
            args.bs
        ));
    }
    Ok(())
}

fn resolve(target: &str) -> Result<SocketAddr, String> {
    target
        .to_socket_addrs()
        .map_err(|e| format!("target {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("target {target}: no address"))
}

fn bind_for(target: SocketAddr, buffers: usize) -> Result<UdpSocketPort, String> {
    let local = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    UdpSocketPort::bind(local, buffers, DATAGRAM_BYTES_MAX)
        .map_err(|e| format!("UDP socket for {target}: {e}"))
}

/// A per-client id base that differs between runs and processes, so a server never takes a
/// new run's requests for an old one's (see `RpcClient::new`).
pub(super) fn id_base(thread: usize, client: usize) -> u32 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = mix64(
        clock ^ (u64::from(std::process::id()) << 32) ^ ((thread as u64) << 16) ^ client as u64,
    );
    (mixed as u32) & !0xffff // room for the client's sessions below
}

struct UdpClient {
    port: UdpSocketPort,
    rpc: RpcClient<SocketAddr, RecvBuf, RequestBody>,
    sessions: Vec<SessionId>,
    slots: Slots,
    free_bodies: BodyHome,
    /// A multi-packet response, made contiguous (replies to reads of large blocks).
    scratch: Vec<u8>,
    starved: bool,
}

pub(super) struct UdpGenerator<'a> {
    config: &'a Config,
    shared: &'a Shared,
    index: usize,
    target: SocketAddr,
    epoll: Epoll,
    clients: Vec<UdpClient>,
    work: Work,
    epoch: Instant,
}

impl<'a> UdpGenerator<'a> {
    pub(super) fn connect(
        config: &'a Config,
        shared: &'a Shared,
        plan: &ThreadPlan,
        work: Work,
    ) -> Result<Self, String> {
        let target = resolve(&config.target)?;
        let epoll = Epoll::new()?;
        let rpc = rpc_config(config.rpc_mtu);
        let qd = config.qd as usize;
        let frame_max = config.bs as usize + 256;
        let packets_per_reply = frame_max.div_ceil(rpc.packet_payload_bytes as usize);
        let mut clients = Vec::with_capacity(plan.clients);
        for token in 0..plan.clients {
            // Every in-flight request's reply may be arriving at once, plus acks.
            let port = bind_for(target, qd * packets_per_reply + 64)?;
            epoll.add(port.fd(), libc::EPOLLIN as u32, token)?;
            let mut rpc_client = RpcClient::new(rpc, id_base(plan.index, token));
            let sessions = (0..qd.div_ceil(SLOTS_PER_SESSION))
                .map(|_| {
                    rpc_client
                        .open_session(target)
                        .expect("sessions_max covers qd")
                })
                .collect();
            clients.push(UdpClient {
                port,
                rpc: rpc_client,
                sessions,
                slots: Slots::new(config.qd),
                free_bodies: Rc::new(RefCell::new(
                    (0..qd).map(|_| Vec::with_capacity(frame_max)).collect(),
                )),
                scratch: Vec::with_capacity(frame_max),
                starved: false,
            });
        }
        Ok(UdpGenerator {
            config,
            shared,
            index: plan.index,
            target,
            epoll,
            clients,
            work,
            epoch: Instant::now(),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Issues requests until the client's slots are full or the work has none to give.
    fn fill(&mut self, token: usize) {
        let now_ns = self.now_ns();
        let client = &mut self.clients[token];
        let ran_dry = issue_requests(
            &mut self.work,
            &mut client.slots,
            &client.free_bodies,
            &client.sessions,
            &mut client.rpc,
            now_ns,
        );
        client.starved = ran_dry && !self.work.stopping && !self.work.exhausted();
    }

    fn flush(&mut self, token: usize) -> Result<(), String> {
        let client = &mut self.clients[token];
        let (port, rpc) = (&mut client.port, &mut client.rpc);
        let mut error = None;
        rpc.flush_tx(
            &mut |peer, head, payload| match port.send(peer, head, payload) {
                Ok(sent) => sent,
                Err(e) => {
                    error.get_or_insert(e);
                    true // counted as lost; resent on the timer
                }
            },
        );
        // One sendmmsg for the pass's packets (a socket error drops the one it is about).
        if let Err(e) = port.flush() {
            error.get_or_insert(e);
        }
        match error {
            Some(e) if e.kind() != std::io::ErrorKind::ConnectionRefused => {
                Err(self.client_error(token, format!("send: {}", client::io_reason(&e))))
            }
            _ => Ok(()),
        }
    }

    /// Takes every datagram waiting on the client's socket, books complete responses, and
    /// runs the resend timer.
    fn receive(&mut self, token: usize) -> Result<(), String> {
        let now_ns = self.now_ns();
        let client = &mut self.clients[token];
        let UdpClient {
            port,
            rpc,
            slots,
            scratch,
            ..
        } = client;
        let work = &mut self.work;
        let mut failure: Option<String> = None;
        let mut socket_error: Option<String> = None;
        let mut on_response =
            |_session: SessionId, _id: u64, result: Result<&Message<'_, RecvBuf>, RpcError>| {
                if failure.is_some() {
                    return;
                }
                if let Err(e) = book(work, slots, scratch, now_ns, result) {
                    failure = Some(e);
                }
            };
        loop {
            match port.recv() {
                Ok(Some((buf, from))) => rpc.receive(from, buf, 0, now_ns, &mut on_response),
                Ok(None) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                Err(e) => {
                    socket_error = Some(format!("receive: {}", client::io_reason(&e)));
                    break;
                }
            }
        }
        rpc.poll_timers(now_ns, &mut on_response);
        match failure.or(socket_error) {
            Some(e) => Err(self.client_error(token, e)),
            None => Ok(()),
        }
    }

    fn client_error(&self, token: usize, error: String) -> String {
        format!(
            "thread {} udp client {token} to {}: {error}",
            self.index, self.target
        )
    }

    /// As `Generator::run_phase`, polling the sockets and the resend timers.
    fn run_phase(&mut self, phase: Phase) -> Result<Duration, String> {
        self.work.begin(phase);
        let start = Instant::now();
        let deadline = (phase == Phase::Timed).then(|| start + self.config.duration);
        self.work.stopping = deadline.is_some_and(|d| d <= start);
        for token in 0..self.clients.len() {
            self.fill(token);
            self.flush(token)?;
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        let mut last_progress = (start, 0u64);
        loop {
            self.shared.check_abort()?;
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                self.work.stopping = true;
            }
            if self.work.in_flight == 0 && (self.work.stopping || self.work.exhausted()) {
                self.publish();
                return Ok(now - start);
            }
            let done = self.work.prefill.ops + self.work.timed.ops;
            if done != last_progress.1 {
                last_progress = (now, done);
            } else if now - last_progress.0 >= REPLY_TIMEOUT {
                return Err(format!(
                    "no response from {} for {} s with {} requests in flight (is the server up, \
                     and was it started with this client's --rpc-mtu {}? a server that receives \
                     packets sized for another MTU refuses them with an error naming both, but \
                     a link may drop datagrams larger than its own MTU before that)",
                    self.target,
                    REPLY_TIMEOUT.as_secs(),
                    self.work.in_flight,
                    self.config.rpc_mtu
                ));
            }
            let timeout = match deadline {
                Some(d) if !self.work.stopping => TIMER_TICK.min(d - now),
                _ => TIMER_TICK,
            };
            self.epoll.wait(&mut events, timeout)?;
            // Every client each pass: the resend timers run whether or not a datagram came.
            for token in 0..self.clients.len() {
                self.receive(token)?;
                self.fill(token);
                self.flush(token)?;
            }
            self.publish();
        }
    }

    fn publish(&self) {
        self.work.publish(&self.shared.progress[self.index]);
    }
}

impl RunPhase for UdpGenerator<'_> {
    fn run_phase(&mut self, phase: Phase) -> Result<Duration, String> {
        UdpGenerator::run_phase(self, phase)
    }

    fn into_work(self: Box<Self>) -> Work {
        self.work
    }
}

/// Books one RPC outcome: the reply frame inside is checked as a TCP reply is.
/// Issues requests on a datagram client until its slots are full or the work has none to
/// give (then returns true). The UDP and DPDK generators share it.
pub(super) fn issue_requests<P: Copy + Eq, B: AsRef<[u8]>>(
    work: &mut Work,
    slots: &mut Slots,
    free_bodies: &BodyHome,
    sessions: &[SessionId],
    rpc: &mut RpcClient<P, B, RequestBody>,
    now_ns: u64,
) -> bool {
    while !slots.free.is_empty() {
        let Some(request) = work.next_request(None) else {
            return true;
        };
        let (slot, request_id) = slots.arm(request);
        slots.entries[slot as usize].sent_ns = now_ns;
        let mut bytes = free_bodies.borrow_mut().pop().expect("one body per slot");
        work.encode_over(&mut bytes, request_id, request);
        let body = RequestBody {
            bytes,
            home: free_bodies.clone(),
        };
        let session = sessions[slot as usize / SLOTS_PER_SESSION];
        if rpc.request(session, body, now_ns).is_err() {
            unreachable!("load slot {slot} maps to a session with a free slot");
        }
    }
    false
}

/// Why a datagram reply's wire frame was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReplyFault {
    /// Not a frame, or not one frame exactly.
    Malformed(String),
    /// The frame's crc32c disagrees with its bytes.
    Crc { request_id: u64 },
}

/// The wire frame of one RPC response: its header is checked (parses, and its length is the
/// message's) and so is its crc32c, with or without `--verify`. Skipping the crc without
/// `--verify` saved the DPDK generator a third of its instructions per read (session 11), but
/// the generator was never what limited the rate, and the crc is what caught DPDK 22.11's memif
/// delivering corrupted packets with chained descriptors: every reply is checked.
pub(super) fn reply_frame(bytes: &[u8]) -> Result<Frame<'_>, ReplyFault> {
    let header = match wire::parse_header(bytes, &Limits::CEILING) {
        Ok(Some(header)) if header.frame_len() == bytes.len() => header,
        Ok(_) => {
            return Err(ReplyFault::Malformed(format!(
                "malformed reply: {} bytes",
                bytes.len()
            )))
        }
        Err(e) => return Err(ReplyFault::Malformed(format!("malformed reply: {e}"))),
    };
    let frame = Frame::view(header, bytes);
    if !frame.crc_ok(bytes) {
        return Err(ReplyFault::Crc {
            request_id: header.request_id,
        });
    }
    Ok(frame)
}

pub(super) fn book<B: AsRef<[u8]>>(
    work: &mut Work,
    slots: &mut Slots,
    scratch: &mut Vec<u8>,
    now_ns: u64,
    result: Result<&Message<'_, B>, RpcError>,
) -> Result<(), String> {
    let message = match result {
        Ok(message) => message,
        Err(RpcError::TimedOut) => {
            return Err(
                "no response after every resend (the server is gone or dropping everything)"
                    .to_string(),
            )
        }
        Err(e @ RpcError::PacketSize { .. }) => return Err(e.to_string()),
    };
    let bytes = match message.as_single() {
        Some(bytes) => bytes,
        None => {
            scratch.resize(message.len(), 0);
            message.copy_to(scratch);
            &scratch[..]
        }
    };
    let frame = match reply_frame(bytes) {
        Ok(frame) => frame,
        Err(ReplyFault::Malformed(e)) => return Err(e),
        Err(ReplyFault::Crc { request_id }) => {
            let stats = work.stats();
            stats.verify_failures += 1;
            stats.errors += 1;
            return Err(format!("reply crc mismatch (request id {request_id:#x})"));
        }
    };
    let header = frame.header;
    if header.opcode != Opcode::OsdOp as u8 | wire::REPLY_BIT {
        return Err(format!(
            "unexpected reply opcode {:#04x} (status {})",
            header.opcode,
            client::status_name(header.status)
        ));
    }
    let Some(slot) = slots.take(header.request_id) else {
        return Err(format!(
            "reply to unknown request id {:#x} (status {})",
            header.request_id,
            client::status_name(header.status)
        ));
    };
    let (status, output) = reply_outcome(&frame)?;
    work.complete(&slot, now_ns, status, output);
    Ok(())
}

/// Asks the server's datagram RPC at `target` for its STATUS document.
pub(super) fn fetch_status(target: &str, mtu: u16) -> Result<serde_json::Value, String> {
    let to = resolve(target)?;
    let mut port = bind_for(to, 128)?;
    let mut rpc: RpcClient<SocketAddr, RecvBuf, Vec<u8>> =
        RpcClient::new(rpc_config(mtu), id_base(usize::MAX, 0));
    let session = rpc.open_session(to).expect("one session");
    let request_id = 1;
    let mut frame = Vec::new();
    wire::encode_request(&mut frame, Opcode::Status, request_id, b"", &[], b"");
    let epoch = Instant::now();
    let now_ns = |epoch: Instant| epoch.elapsed().as_nanos() as u64;
    rpc.request(session, frame, 0)
        .map_err(|_| "no free RPC slot".to_string())?;
    let mut reply: Option<Result<crate::client::OwnedReply, String>> = None;
    while reply.is_none() {
        if epoch.elapsed() > STATUS_TIMEOUT {
            return Err(format!(
                "status {target}: no reply within {} s",
                STATUS_TIMEOUT.as_secs()
            ));
        }
        rpc.flush_tx(&mut |peer, head, payload| port.send(peer, head, payload).unwrap_or(true));
        let _ = port.flush(); // a lost status request is resent on the timer
        let mut on_response =
            |_: SessionId, _: u64, result: Result<&Message<'_, RecvBuf>, RpcError>| {
                reply = Some(match result {
                    Ok(message) => {
                        client::reply_from_frame(&message.to_vec(), Opcode::Status, request_id)
                    }
                    Err(e) => Err(e.to_string()),
                });
            };
        while let Ok(Some((buf, from))) = port.recv() {
            rpc.receive(from, buf, 0, now_ns(epoch), &mut on_response);
        }
        rpc.poll_timers(now_ns(epoch), &mut on_response);
        std::thread::sleep(Duration::from_micros(200));
    }
    let reply = reply
        .expect("loop ends with a reply")
        .map_err(|e| format!("status {target}: {e}"))?;
    if reply.status != Status::Ok as u32 {
        return Err(format!(
            "status {target}: server answered {}",
            reply.status_name()
        ));
    }
    serde_json::from_slice(&reply.payload)
        .map_err(|e| format!("status {target}: reply is not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_frame_refuses_a_bad_crc_and_a_bad_header() {
        let mut frame = Vec::new();
        let ops = [wire::SubOpSpec::write(0, &[7u8; 4096])];
        wire::encode_request(&mut frame, Opcode::OsdOp, 0x42, b"obj.1", &ops, b"");
        assert_eq!(reply_frame(&frame).unwrap().header.request_id, 0x42);
        let mut flipped = frame.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1; // a payload bit flipped
        assert_eq!(
            reply_frame(&flipped).err(),
            Some(ReplyFault::Crc { request_id: 0x42 })
        );
        assert!(matches!(
            reply_frame(&frame[..frame.len() - 1]),
            Err(ReplyFault::Malformed(_))
        ));
        let mut foreign = frame.clone();
        foreign[0] ^= 0xff; // the magic
        assert!(matches!(
            reply_frame(&foreign),
            Err(ReplyFault::Malformed(_))
        ));
    }
}
