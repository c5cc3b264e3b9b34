//! The datagram RPC (`dgram`) on a kernel UDP socket, as a reactor transport: the same shape as
//! `tcp.rs` (`poll_rx` hands up wire frames as `Lease`s, `reply`, `flush_tx`), so the OSD core
//! runs UDP requests down the same frame check -> placement -> PG -> store path.
//!
//! Buffers: datagrams are received into the core's small-pool chunks, several per chunk (like
//! the TCP receive chunks); the port copies each one's 32-byte RPC header out and leases the
//! rest (`Received::Datagram`), a `Lease` held by the RPC until the request is answered. A
//! request that came in one packet is that lease: the RPC hands it over
//! (`RpcServer::take_request`) and it goes up as the frame, **no copy between the socket and
//! the store**, and one lease per request, not a second one inside the datagram's (callgrind:
//! ~100 instructions fewer per op, a `lease_within` and a `release_lease`). A request of
//! several packets is copied once into one contiguous buffer (the frame parser and the store need contiguous
//! bytes); `stats.frames_copied` / `rx_copied_bytes` count exactly that. Responses are copied
//! once into a pool chunk (reply head and output back to back, several per chunk), because the
//! RPC slices a response into packets and keeps it for resends until the client moves on. A
//! response of at most `INLINE_RESPONSE_MAX_BYTES` (a write's reply: its head alone) is kept
//! inline in the RPC's slot instead: no chunk, no lease to take and give back. A read answered
//! from the store's memory (`Body::Stored`) is kept as two parts, its head inline and its
//! bytes where the store has them (`Response::Stored`): the payload is copied once, into each
//! packet as it is sent, and moved into a pool chunk only if the store is about to change
//! while the RPC still keeps the response (`copy_stored_bodies`).
//!
//! The RPC drops the buffers it holds (`B` and `R` are `PoolBytes`) wherever it likes; a pool
//! handle may only go back through the pool's `&mut` methods, so a dropped `PoolBytes` parks its
//! lease in a `graveyard` this transport empties into the pools every pass. The graveyard is
//! sized for every lease the transport may have out (`held_max`), so it never grows.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Debug;
use std::hash::Hash;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::rc::Rc;

use crate::buffers::{Body, CorePools, StoredBytes};
use crate::dgram::mmsg::sockaddr_of;
use crate::dgram::socket::DATAGRAM_BYTES_MAX;
use crate::dgram::{
    PacketHeader, RequestHandle, ResponseParts, RpcConfig, RpcServer, RpcStats,
    PACKET_HEADER_BYTES, SLOTS_PER_SESSION,
};
use crate::pool::{Buf, Lease};
use crate::tcp::REPLY_HEAD_MAX_BYTES;
use crate::wire::{self, Header, Limits, Status};

/// Ethernet MTU the RPC's packets are sized for by default, and the largest (jumbo frames;
/// loopback takes them): a 4 KiB request or reply is one packet.
pub const RPC_MTU_DEFAULT: u16 = 9000;
/// Smallest MTU the packets can be sized for (IPv6's minimum link MTU, so any Ethernet path
/// carries them); at 1500 a 4 KiB request takes three packets, reassembled without a copy.
pub const RPC_MTU_MIN: u16 = 1280;
/// Sessions a core keeps (each up to `SLOTS_PER_SESSION` requests in flight).
pub const SESSIONS_MAX: u32 = 256;
/// Leases the transport may have out at once (received datagrams held by the RPC, responses
/// kept for resends). Beyond it nothing more is received until some are let go.
pub const HELD_MAX: usize = 8192;
/// How long a session may stay idle before the server forgets it. Far longer than a client
/// keeps resending (`rpc_config`: 50 ms x 600 = 30 s).
pub const SESSION_IDLE_NS: u64 = 60_000_000_000;
/// How often idle sessions are looked for (the walk visits every session).
const EXPIRE_INTERVAL_NS: u64 = 1_000_000_000;

/// The RPC settings both ends use, with packets sized for `mtu`: client and server must be
/// given the same (`--rpc-mtu`), as a packet's place in its message follows from the size.
pub fn rpc_config(mtu: u16) -> RpcConfig {
    assert!(
        (RPC_MTU_MIN..=RPC_MTU_DEFAULT).contains(&mtu),
        "RPC MTU {mtu} outside {RPC_MTU_MIN}..={RPC_MTU_DEFAULT} (parse_rpc_mtu checks it)"
    );
    RpcConfig {
        sessions_max: SESSIONS_MAX,
        // Loopback loses little; most resends are of requests queued behind others at a busy
        // server, so the timeout is generous (eRPC's datacenter figure is a few ms).
        retransmit_timeout_ns: 50_000_000,
        // 30 s without progress before a request fails: as long as a TCP client waits.
        retries_max: 600,
        ..RpcConfig::for_mtu(mtu)
    }
}

/// Parses `--rpc-mtu` (serve and load): a whole number in `RPC_MTU_MIN..=RPC_MTU_DEFAULT`.
pub fn parse_rpc_mtu(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(mtu) if (RPC_MTU_MIN..=RPC_MTU_DEFAULT).contains(&mtu) => Ok(mtu),
        _ => Err(format!(
            "RPC MTU {text:?}: expected a whole number from {RPC_MTU_MIN} to {RPC_MTU_DEFAULT} \
             (the link's MTU; both ends must use the same)"
        )),
    }
}

type Graveyard = Rc<RefCell<Vec<Lease>>>;

/// Bytes in a pool buffer, held by the RPC: a received datagram or a response. Dropping it
/// parks the lease for the transport to release (see the module comment).
pub struct PoolBytes {
    lease: Option<Lease>,
    graveyard: Graveyard,
}

impl PoolBytes {
    /// The lease, out of the graveyard's way: the caller releases it (and counts it no longer
    /// held).
    fn into_lease(mut self) -> Lease {
        self.lease.take().expect("present until drop")
    }
}

impl AsRef<[u8]> for PoolBytes {
    fn as_ref(&self) -> &[u8] {
        self.lease.as_ref().map_or(&[], Lease::as_slice)
    }
}

/// Responses this small are kept inline (`Response::Inline`): a reply head with up to three
/// sub-op results and no output, which is what every write is answered with.
pub const INLINE_RESPONSE_MAX_BYTES: usize = wire::HEADER_SIZE + 3 * wire::SUB_OP_RESULT_SIZE;

/// A response the RPC keeps until the client's next request on the slot.
pub enum Response {
    /// Copied into a pool chunk (or a large buffer), held as a lease.
    Pool(PoolBytes),
    /// Small enough to keep in place (see `INLINE_RESPONSE_MAX_BYTES`).
    Inline {
        bytes: [u8; INLINE_RESPONSE_MAX_BYTES],
        len: u8,
    },
    /// A reply head kept in place, and the output still in the store's memory, with the crc
    /// the store kept already in the head: sent as two parts, the bytes copied from the store
    /// into each packet. The transport lists every such response (`stored_responses`) and
    /// turns it into `Pool` before the store may change (`copy_stored_bodies`).
    Stored {
        head: [u8; INLINE_RESPONSE_MAX_BYTES],
        head_len: u8,
        body: StoredBytes,
    },
}

impl ResponseParts for Response {
    #[inline]
    fn parts(&self) -> (&[u8], &[u8]) {
        match self {
            Response::Pool(bytes) => (bytes.as_ref(), &[]),
            Response::Inline { bytes, len } => (&bytes[..usize::from(*len)], &[]),
            Response::Stored {
                head,
                head_len,
                body,
            } => (&head[..usize::from(*head_len)], body.as_slice()),
        }
    }
}

impl Drop for PoolBytes {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let mut graveyard = self.graveyard.borrow_mut();
            // Capacity is `HELD_MAX` and `held` never passes it: pushing never reallocates.
            debug_assert!(graveyard.len() < graveyard.capacity());
            graveyard.push(lease);
        }
    }
}

/// A complete request: its wire header, the frame (header included) as a lease, and the RPC
/// handle to answer it with.
pub struct UdpRequest {
    pub handle: RequestHandle,
    pub header: Header,
    pub frame: Lease,
}

/// Counters of one core's UDP transport.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpStats {
    pub datagrams_rx: u64,
    pub datagrams_tx: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Requests handed up as the lease over their one datagram's payload (no copy).
    pub frames_in_place: u64,
    /// Requests of several packets, copied once into a contiguous buffer.
    pub frames_copied: u64,
    /// Bytes of those copies.
    pub rx_copied_bytes: u64,
    /// Bytes copied into response buffers (reply heads and outputs).
    pub tx_copied_bytes: u64,
    /// Replies whose output was copied into the response straight from the store's memory,
    /// with the crc the store kept (`Body::Stored`: no output buffer, no hashing).
    pub replies_from_store: u64,
    /// Store-memory outputs that waited for a response buffer and were copied into a pool
    /// buffer first, because an op was about to change the store (`copy_stored_bodies`).
    pub stored_bodies_copied: u64,
    /// Responses kept from the store's memory (`Response::Stored`) that the RPC still held
    /// for resends when an op was about to change the store, moved into a pool chunk then.
    pub stored_responses_copied: u64,
    /// Times an op about to change the store waited because the port still had frames in
    /// flight from the store's memory (`DatagramPort::stored_in_flight`).
    pub stored_frames_waits: u64,
    /// Complete messages that were not a valid wire frame.
    pub malformed_frames: u64,
    /// Receives skipped (no chunk, or `HELD_MAX` leases out) and replies that waited for one.
    pub rx_pool_waits: u64,
    pub tx_pool_waits: u64,
    /// Datagrams thrown away by the loss-injection knob (`drop_every`).
    pub dropped_injected: u64,
    /// Replies over the RPC's message limit, answered `over_limit` instead.
    pub replies_too_large: u64,
    pub sessions: u64,
    pub rpc: RpcStats,
    pub port: PortStats,
}

/// What one [`DatagramPort::recv`] gave.
pub enum Received<A> {
    /// One datagram's UDP payload: its first `PACKET_HEADER_BYTES` (the RPC packet header)
    /// copied out, the rest as a lease over pool memory where it was received, and who sent
    /// it. Split so that a one-packet request's lease is its wire frame: the RPC hands that
    /// lease up itself (`RpcServer::take_request`) instead of a second one inside it.
    Datagram {
        header: [u8; PACKET_HEADER_BYTES],
        payload: Lease,
        peer: A,
    },
    /// A datagram shorter than a packet header (not the RPC's): dropped, counted malformed.
    Runt,
    /// Nothing is waiting.
    Empty,
    /// No buffer to receive into (a datagram may be waiting).
    NoBuffer,
}

/// Where the transport's datagrams come from and go to: a kernel UDP socket, or a DPDK queue
/// pair (`crate::dpdk::net`). A received datagram's UDP payload is a lease over pool memory,
/// so the RPC above holds pool leases whatever the port: written there by the port
/// (`recv_into` a pool chunk: the kernel's copy), or, for a NIC whose receive buffers are
/// carved from the core's `nic` pool, the very buffer the NIC wrote (no copy).
pub trait DatagramPort {
    /// A peer's address (the RPC's session key together with the client's session id).
    type Addr: Copy + Eq + Hash + Debug;
    /// Receives one datagram into `buf` (which holds a maximal one): `Ok(None)` when nothing
    /// is waiting.
    fn recv_into(&mut self, buf: &mut [u8]) -> io::Result<Option<(usize, Self::Addr)>>;
    /// Receives one datagram as a lease. By default into `chunk` (taken from the small pool,
    /// and replaced when too full) with `recv_into`.
    fn recv(
        &mut self,
        pools: &mut CorePools,
        chunk: &mut Option<Buf>,
    ) -> io::Result<Received<Self::Addr>> {
        recv_into_chunk(self, pools, chunk)
    }
    /// Sends `header`, `payload` then `tail` as one datagram (a packet's payload may come from
    /// two parts of a response). `Ok(false)`: no room now (try later).
    fn send(
        &mut self,
        peer: &Self::Addr,
        header: &[u8],
        payload: &[u8],
        tail: &[u8],
    ) -> io::Result<bool>;
    /// `send` for parts that stay where they are until the next `flush` returns, which a port
    /// that queues its packets may send from there instead of copying them first. By default
    /// `send`.
    ///
    /// # Safety
    /// `payload` and `tail` stay valid and unchanged until the next `flush` returns.
    unsafe fn send_borrowed(
        &mut self,
        peer: &Self::Addr,
        header: &[u8],
        payload: &[u8],
        tail: &[u8],
    ) -> io::Result<bool> {
        self.send(peer, header, payload, tail)
    }
    /// `send_borrowed` for a reply whose `stored` part is the store's memory: a port may send
    /// it where it lies, past the next `flush`, for as long as `stored_in_flight` counts the
    /// frame. By default `send_borrowed`.
    ///
    /// # Safety
    /// `header` and `payload` as for `send_borrowed`; `stored` stays valid and unchanged
    /// while `stored_in_flight` is above zero (the core holds back every mutation until it
    /// reads zero).
    unsafe fn send_stored(
        &mut self,
        peer: &Self::Addr,
        header: &[u8],
        payload: &[u8],
        stored: &[u8],
    ) -> io::Result<bool> {
        // SAFETY: a stronger promise than `send_borrowed` asks for.
        unsafe { self.send_borrowed(peer, header, payload, stored) }
    }
    /// Frames sent from the store's memory (`send_stored`) that the driver may still read,
    /// after letting it free what it is done with. By default none.
    fn stored_in_flight(&mut self, _pools: &mut CorePools) -> usize {
        0
    }
    /// Whether some were, as last counted (cheap: no call into the driver).
    fn holds_stored(&self) -> bool {
        false
    }
    /// Whether `send_from_pool` sends payloads in place (no copy). When it does, a reply from
    /// the store's memory is copied into a pool chunk, so that its packets can be sent from
    /// there; otherwise it is sent from the store, and copied once, by `send`.
    fn sends_pool_in_place(&self) -> bool {
        false
    }
    /// `send` for a payload in `pools`' memory, which a port may send in place (holding a
    /// lease over it until the device is done) instead of copying it.
    ///
    /// # Safety
    /// `payload` lies within sealed bytes of a live handle of `pools` (a response the RPC
    /// holds), as `CorePools::lease_bytes` requires.
    unsafe fn send_from_pool(
        &mut self,
        pools: &mut CorePools,
        peer: &Self::Addr,
        header: &[u8],
        payload: &[u8],
    ) -> io::Result<bool> {
        let _ = pools;
        self.send(peer, header, payload, &[])
    }
    /// Pushes out what `send` queued (a port that batches), and gives back what the device is
    /// done with.
    fn flush(&mut self, pools: &mut CorePools) {
        let _ = pools;
    }
    /// Whether packets `send` accepted still wait for the device (a full socket left them
    /// queued after `flush`): the core must not park on them.
    fn has_queued_tx(&self) -> bool {
        false
    }
    /// Gives back whatever pool buffers the port itself holds (after the transport stopped).
    fn close(&mut self, pools: &mut CorePools) {
        let _ = pools;
    }
    /// A descriptor that becomes readable when datagrams wait (for a parked core), if any.
    fn fd(&self) -> Option<RawFd>;
    fn stats(&self) -> PortStats {
        PortStats::default()
    }
}

/// Counters a port keeps beyond the transport's own (zero for a kernel socket).
#[derive(Debug, Clone, Copy, Default)]
pub struct PortStats {
    /// Datagrams copied from a NIC buffer (mbuf) into a pool chunk, and their bytes.
    pub rx_copies: u64,
    pub rx_copied_bytes: u64,
    /// ARP requests answered.
    pub arp_replies: u64,
    /// Datagrams handed up as a lease over the NIC buffer they arrived in (no copy).
    pub rx_in_place: u64,
    /// NIC buffers leased to ops now (returned to the NIC once every lease is back).
    pub rx_rooms_leased: u64,
    /// Frames that were neither ARP for us nor UDP to our port (dropped).
    pub ignored: u64,
    /// Frames sent with their payload attached in place (no copy into the mbuf).
    pub tx_in_place: u64,
    /// Of those, replies attached to the store's memory (`DatagramPort::send_stored`).
    pub tx_from_store: u64,
    /// Payload bytes copied into mbufs on send.
    pub tx_copied_bytes: u64,
    /// Frames with an attached payload the driver has not freed yet.
    pub tx_attached_held: u64,
    /// Sends refused for want of a buffer or ring room (the RPC retries them).
    pub tx_full: u64,
    /// Frames dropped after the driver took nothing for a while (a peer gone).
    pub tx_dropped: u64,
    /// Kernel socket: `recvmmsg` and `sendmmsg` calls (each carries up to 32 datagrams).
    pub recv_calls: u64,
    pub send_calls: u64,
}

/// The transport as `OsdCore` drives it, whatever its port (one trait object per core).
pub trait RpcNet {
    fn poll_rx(
        &mut self,
        pools: &mut CorePools,
        budget: usize,
        now_ns: u64,
        deliver: &mut dyn FnMut(UdpRequest),
    ) -> usize;
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &mut self,
        pools: &mut CorePools,
        handle: RequestHandle,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    );
    fn flush_tx(&mut self, pools: &mut CorePools) -> usize;
    fn take_foreign(&mut self) -> Option<Body>;
    fn has_pending_tx(&self) -> bool;
    /// Whether replies waiting here still hold bytes in store memory (`Body::Stored`).
    fn has_stored_bodies(&self) -> bool;
    /// Copies those into pool buffers (before the store changes); false when a pool ran out.
    fn copy_stored_bodies(&mut self, pools: &mut CorePools) -> bool;
    fn close_all(&mut self, pools: &mut CorePools);
    fn stats(&self) -> UdpStats;
    fn fd(&self) -> Option<RawFd>;
}

impl<P: DatagramPort> RpcNet for RpcTransport<P> {
    fn poll_rx(
        &mut self,
        pools: &mut CorePools,
        budget: usize,
        now_ns: u64,
        deliver: &mut dyn FnMut(UdpRequest),
    ) -> usize {
        RpcTransport::poll_rx(self, pools, budget, now_ns, deliver)
    }
    fn reply(
        &mut self,
        pools: &mut CorePools,
        handle: RequestHandle,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    ) {
        RpcTransport::reply(self, pools, handle, request, status, results, body)
    }
    fn flush_tx(&mut self, pools: &mut CorePools) -> usize {
        RpcTransport::flush_tx(self, pools)
    }
    fn take_foreign(&mut self) -> Option<Body> {
        RpcTransport::take_foreign(self)
    }
    fn has_pending_tx(&self) -> bool {
        RpcTransport::has_pending_tx(self)
    }
    fn has_stored_bodies(&self) -> bool {
        RpcTransport::has_stored_bodies(self)
    }
    fn copy_stored_bodies(&mut self, pools: &mut CorePools) -> bool {
        RpcTransport::copy_stored_bodies(self, pools)
    }
    fn close_all(&mut self, pools: &mut CorePools) {
        RpcTransport::close_all(self, pools)
    }
    fn stats(&self) -> UdpStats {
        RpcTransport::stats(self)
    }
    fn fd(&self) -> Option<RawFd> {
        self.port.fd()
    }
}

struct PendingReply {
    handle: RequestHandle,
    head: [u8; REPLY_HEAD_MAX_BYTES],
    head_len: usize,
    body: Body,
}

/// One core's datagram RPC server on its own port: a UDP socket (`SO_REUSEPORT`: one per
/// core), or a DPDK rx/tx queue pair.
pub struct RpcTransport<P: DatagramPort> {
    core: usize,
    port: P,
    rpc: RpcServer<P::Addr, PoolBytes, Response>,
    limits: Limits,
    message_bytes_max: usize,
    /// Chunks datagrams are received into, and responses written into.
    rx_chunk: Option<Buf>,
    tx_chunk: Option<Buf>,
    graveyard: Graveyard,
    /// Leases out in `PoolBytes` (not yet back from the graveyard).
    held: usize,
    /// Complete requests not handed up yet (no buffer for a copy, or budget).
    ready: VecDeque<RequestHandle>,
    /// Replies that found no buffer; retried by `flush_tx`.
    pending: VecDeque<PendingReply>,
    /// Replies in `pending` whose body is `Body::Stored` (store memory: see
    /// `copy_stored_bodies`).
    pending_stored: usize,
    /// Requests whose response the RPC keeps as `Response::Stored` (store memory), for
    /// `copy_stored_bodies`; an entry whose client has moved on is stale and skipped. At most
    /// one live entry per RPC slot, and the stale ones are swept out when it fills, so its
    /// capacity (every slot) bounds it.
    stored_responses: Vec<RequestHandle>,
    /// Bodies of other cores' pools, to be sent home by the core.
    foreign: VecDeque<Body>,
    /// Test knob: drop every Nth received datagram (0: never).
    drop_every: u32,
    /// Datagrams that were not RPC packets (short, or a header that does not decode): counted
    /// with the RPC's malformed packets, as they were when the RPC decoded every header.
    runts: u64,
    last_expire_ns: u64,
    stats: UdpStats,
}

/// The transport on a kernel UDP socket (`serve --transport udp`).
pub type UdpRpcTransport = RpcTransport<KernelUdpPort>;

impl RpcTransport<KernelUdpPort> {
    /// Takes a bound socket (made non-blocking here); see `with_port`.
    pub fn new(
        core: usize,
        socket: UdpSocket,
        limits: Limits,
        drop_every: u32,
        mtu: u16,
    ) -> io::Result<UdpRpcTransport> {
        Ok(RpcTransport::with_port(
            core,
            KernelUdpPort::new(socket)?,
            limits,
            drop_every,
            mtu,
        ))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.port.local_addr()
    }
}

impl<P: DatagramPort> RpcTransport<P> {
    /// A transport on `port` (non-blocking) with packets sized for `mtu`. `drop_every` > 0
    /// throws away every Nth datagram received, to exercise retransmission end to end.
    pub fn with_port(
        core: usize,
        port: P,
        limits: Limits,
        drop_every: u32,
        mtu: u16,
    ) -> RpcTransport<P> {
        let config = rpc_config(mtu);
        let requests_max = (SESSIONS_MAX as usize) * SLOTS_PER_SESSION;
        RpcTransport {
            core,
            port,
            rpc: RpcServer::new(config),
            limits,
            message_bytes_max: config.message_bytes_max(),
            rx_chunk: None,
            tx_chunk: None,
            graveyard: Rc::new(RefCell::new(Vec::with_capacity(HELD_MAX))),
            held: 0,
            ready: VecDeque::with_capacity(requests_max),
            pending: VecDeque::with_capacity(requests_max),
            pending_stored: 0,
            stored_responses: Vec::with_capacity(requests_max),
            foreign: VecDeque::with_capacity(requests_max),
            drop_every,
            runts: 0,
            last_expire_ns: 0,
            stats: UdpStats::default(),
        }
    }

    pub fn fd(&self) -> Option<RawFd> {
        self.port.fd()
    }

    pub fn stats(&self) -> UdpStats {
        let mut stats = self.stats;
        stats.rpc = self.rpc.stats();
        stats.rpc.packets_rx += self.runts;
        stats.rpc.malformed += self.runts;
        stats.port = self.port.stats();
        stats.sessions = self.rpc.session_count() as u64;
        stats
    }

    /// Replies waiting for a buffer or packets waiting for the socket.
    pub fn has_pending_tx(&self) -> bool {
        !self.pending.is_empty() || self.rpc.has_pending_tx() || self.port.has_queued_tx()
    }

    /// Whether replies waiting for a buffer, or responses the RPC keeps for resends, may
    /// still hold bytes in store memory.
    pub fn has_stored_bodies(&self) -> bool {
        self.pending_stored > 0 || !self.stored_responses.is_empty() || self.port.holds_stored()
    }

    /// Copies the store bytes of every waiting `Body::Stored` reply into a pool buffer of its
    /// own, and those of every `Response::Stored` the RPC keeps into the tx chunk (head and
    /// bytes, as any response), so that the store may change or free its memory: the core
    /// calls this before any op that mutates the store (the rule `StoredBytes` relies on). The
    /// bytes are the same, so the crc already in the reply head holds, and a resend sends what
    /// the first packet did. False when a pool ran out of buffers first (the mutation waits;
    /// the next `flush_tx` may send some of the replies, clients' next requests free chunks).
    pub fn copy_stored_bodies(&mut self, pools: &mut CorePools) -> bool {
        self.reap(pools);
        while let Some(&handle) = self.stored_responses.last() {
            if let Some(response) = self.rpc.response_mut(handle) {
                let Response::Stored {
                    head,
                    head_len,
                    body,
                } = &*response
                else {
                    unreachable!("listed responses are Stored until copied here");
                };
                let head = &head[..usize::from(*head_len)];
                let bytes = body.as_slice();
                let len = head.len() + bytes.len();
                if self.held + 1 >= HELD_MAX {
                    return false;
                }
                let Some(lease) = write_response(&mut self.tx_chunk, pools, len, |out| {
                    out[..head.len()].copy_from_slice(head);
                    out[head.len()..len].copy_from_slice(bytes);
                }) else {
                    return false;
                };
                self.held += 1;
                *response = Response::Pool(PoolBytes {
                    lease: Some(lease),
                    graveyard: self.graveyard.clone(),
                });
                self.stats.stored_responses_copied += 1;
                self.stats.tx_copied_bytes += len as u64;
            }
            self.stored_responses.pop();
        }
        for reply in self.pending.iter_mut() {
            if !matches!(reply.body, Body::Stored(_)) {
                continue;
            }
            if !reply.body.copy_stored(pools) {
                return false;
            }
            self.pending_stored -= 1;
            self.stats.stored_bodies_copied += 1;
        }
        assert_eq!(self.pending_stored, 0, "every stored body was copied");
        // Frames the port sent from store memory itself (`send_stored`): the mutation waits
        // until the driver let go of the last (its peer copies them out within microseconds).
        if self.port.stored_in_flight(pools) > 0 {
            self.stats.stored_frames_waits += 1;
            return false;
        }
        true
    }

    /// A body of another core's pool, for the core to send home.
    pub fn take_foreign(&mut self) -> Option<Body> {
        self.foreign.pop_front()
    }

    /// Returns the leases the RPC let go to their pools.
    fn reap(&mut self, pools: &mut CorePools) {
        let mut graveyard = self.graveyard.borrow_mut();
        self.held -= graveyard.len();
        for lease in graveyard.drain(..) {
            pools.release_lease(lease);
        }
    }

    fn hold(&mut self, lease: Lease) -> PoolBytes {
        assert!(self.held < HELD_MAX, "held leases over their bound");
        self.held += 1;
        PoolBytes {
            lease: Some(lease),
            graveyard: self.graveyard.clone(),
        }
    }

    fn release_body(&mut self, pools: &mut CorePools, body: Body) {
        if let Some(foreign) = pools.release_body(body) {
            assert!(self.foreign.len() < self.foreign.capacity());
            self.foreign.push_back(foreign);
        }
    }

    /// Receives datagrams and hands up to `budget` complete requests to `deliver`. Returns how
    /// many were handed up.
    pub fn poll_rx(
        &mut self,
        pools: &mut CorePools,
        budget: usize,
        now_ns: u64,
        deliver: &mut dyn FnMut(UdpRequest),
    ) -> usize {
        self.reap(pools);
        if now_ns >= self.last_expire_ns + EXPIRE_INTERVAL_NS {
            self.last_expire_ns = now_ns;
            let expired = self.rpc.expire_idle(now_ns, SESSION_IDLE_NS);
            if expired > 0 {
                log::debug!("core {}: {expired} idle UDP sessions forgotten", self.core);
                self.reap(pools);
            }
        }
        let mut delivered = self.deliver_ready(pools, budget, deliver);
        // Requests that could not be handed up wait in `ready`: receive no more until they go.
        while delivered < budget && self.ready.is_empty() {
            if self.held + 1 >= HELD_MAX {
                self.stats.rx_pool_waits += 1;
                break;
            }
            let (header, payload, peer) = match self.port.recv(pools, &mut self.rx_chunk) {
                Ok(Received::Datagram {
                    header,
                    payload,
                    peer,
                }) => (header, payload, peer),
                Ok(Received::Runt) => {
                    self.stats.datagrams_rx += 1;
                    self.runts += 1;
                    continue;
                }
                Ok(Received::Empty) => break,
                Ok(Received::NoBuffer) => {
                    self.stats.rx_pool_waits += 1;
                    break;
                }
                Err(e) => {
                    log::warn!("core {}: datagram receive: {e}", self.core);
                    break;
                }
            };
            self.stats.datagrams_rx += 1;
            self.stats.rx_bytes += (PACKET_HEADER_BYTES + payload.len()) as u64;
            if self.drop_every > 0 && self.stats.datagrams_rx % u64::from(self.drop_every) == 0 {
                self.stats.dropped_injected += 1;
                pools.release_lease(payload);
                continue;
            }
            let header = match PacketHeader::decode_split(&header, payload.len()) {
                Ok(header) => header,
                Err(_) => {
                    self.runts += 1; // not a packet: malformed, as the RPC counts it
                    pools.release_lease(payload);
                    continue;
                }
            };
            let bytes = self.hold(payload);
            let ready = &mut self.ready;
            self.rpc
                .receive_packet(peer, &header, bytes, 0, now_ns, &mut |handle, _message| {
                    // Each handle is a distinct slot in Executing: bounded by the capacity.
                    debug_assert!(ready.len() < ready.capacity());
                    ready.push_back(handle)
                });
            self.reap(pools); // packets the RPC dropped (duplicates, stale, malformed)
            delivered += self.deliver_ready(pools, budget - delivered, deliver);
        }
        delivered
    }

    /// Hands up complete requests in arrival order while the budget and buffers allow.
    fn deliver_ready(
        &mut self,
        pools: &mut CorePools,
        budget: usize,
        deliver: &mut dyn FnMut(UdpRequest),
    ) -> usize {
        let mut delivered = 0;
        while delivered < budget {
            let Some(&handle) = self.ready.front() else {
                break;
            };
            let frame = if let Some((bytes, range)) = self.rpc.take_request(handle) {
                // One packet: the lease the port made over its payload is the frame (a packet
                // with bytes after its payload is leased within, the rare case).
                self.held -= 1;
                let lease = bytes.into_lease();
                self.stats.frames_in_place += 1;
                if range.start == 0 && range.len() == lease.len() {
                    lease
                } else {
                    let frame = pools.lease_within(&lease, range.start, range.len());
                    pools.release_lease(lease);
                    frame
                }
            } else if let Some(message) = self.rpc.request(handle) {
                let len = message.len();
                let Some(mut buf) = pools.acquire_rx_for(len) else {
                    self.stats.rx_pool_waits += 1;
                    break; // retried next pass, in order
                };
                message.copy_to(&mut buf.spare_mut()[..len]);
                buf.seal(len);
                let lease = pools.lease(&buf, 0, len);
                pools.release(buf);
                self.stats.frames_copied += 1;
                self.stats.rx_copied_bytes += len as u64;
                lease
            } else {
                self.ready.pop_front(); // superseded or expired: nobody waits for it
                continue;
            };
            self.ready.pop_front();
            let len = frame.len();
            match wire::parse_header(frame.as_slice(), &self.limits) {
                Ok(Some(header)) if header.frame_len() == len => {
                    delivered += 1;
                    deliver(UdpRequest {
                        handle,
                        header,
                        frame,
                    });
                }
                parsed => {
                    self.stats.malformed_frames += 1;
                    let raw = raw_header(frame.as_slice());
                    pools.release_lease(frame);
                    match parsed {
                        // A frame whose length disagrees with its header: answered with the
                        // status a stream would get, so the client learns why.
                        Ok(Some(header)) => {
                            self.reply(pools, handle, &header, Status::Malformed, &[], Body::None)
                        }
                        Err(wire::HeaderError::OidTooLong { .. })
                        | Err(wire::HeaderError::PayloadTooLong { .. })
                        | Err(wire::HeaderError::TooManySubOps { .. }) => {
                            self.reply(pools, handle, &raw, Status::OverLimit, &[], Body::None)
                        }
                        // Not a frame at all: an empty response ends the request.
                        _ => {
                            let empty = Response::Inline {
                                bytes: [0; INLINE_RESPONSE_MAX_BYTES],
                                len: 0,
                            };
                            let _ = self.rpc.reply(handle, empty);
                        }
                    }
                }
            }
        }
        delivered
    }

    /// Queues the reply to a request handed up by `poll_rx`. The body is copied into the
    /// response and released here (or queued for its home core); a reply that finds no buffer
    /// waits, in order, for `flush_tx`.
    pub fn reply(
        &mut self,
        pools: &mut CorePools,
        handle: RequestHandle,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    ) {
        let body = match self.reply_in_slot(handle, request, status, results, body) {
            Ok(()) => return,
            Err(body) => body,
        };
        let mut head = [0u8; REPLY_HEAD_MAX_BYTES];
        let body_len = body.as_slice().len();
        let mut head_len = match &body {
            // The store kept the bytes' crc: they are not read here.
            Body::Stored(stored) => wire::encode_reply_with_output_crc(
                &mut head,
                request,
                status,
                results,
                body_len,
                stored.crc(),
            ),
            body => wire::encode_reply(&mut head, request, status, results, &[body.as_slice()]),
        };
        let body = if head_len + body_len > self.message_bytes_max {
            // The client cannot take it in one RPC message: say so instead.
            self.stats.replies_too_large += 1;
            self.release_body(pools, body);
            head_len = wire::encode_reply(&mut head, request, Status::OverLimit, &[], &[]);
            Body::None
        } else {
            body
        };
        self.reap(pools);
        if !self.pending.is_empty() {
            // Order is kept: a later reply does not take a buffer an earlier one waits for.
            self.wait_for_buffer(handle, head, head_len, body);
            return;
        }
        if let Err(body) = self.try_reply(pools, handle, &head[..head_len], body) {
            self.stats.tx_pool_waits += 1;
            self.wait_for_buffer(handle, head, head_len, body);
        }
    }

    /// The common replies, encoded straight into the response the RPC keeps: a head that fits
    /// `INLINE_RESPONSE_MAX_BYTES` with no body (every write's) or with bytes left in the
    /// store (a read from its memory), when no earlier reply waits for a buffer. They take no
    /// buffer, so they cannot wait; the head is written once, into the response, instead of
    /// into a `REPLY_HEAD_MAX_BYTES` staging head and then copied. The body back otherwise.
    fn reply_in_slot(
        &mut self,
        handle: RequestHandle,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    ) -> Result<(), Body> {
        let head_len = wire::HEADER_SIZE + results.len() * wire::SUB_OP_RESULT_SIZE;
        if head_len > INLINE_RESPONSE_MAX_BYTES || !self.pending.is_empty() {
            return Err(body);
        }
        let mut head = [0u8; INLINE_RESPONSE_MAX_BYTES];
        match body {
            Body::None => {
                let len = wire::encode_reply(&mut head, request, status, results, &[]);
                debug_assert_eq!(len, head_len);
                self.stats.tx_copied_bytes += len as u64;
                let response = Response::Inline {
                    bytes: head,
                    len: len as u8,
                };
                // Err: the client gave up on the request and moved on; the response is dropped.
                let _ = self.rpc.reply(handle, response);
                Ok(())
            }
            Body::Stored(stored)
                if head_len + stored.as_slice().len() <= self.message_bytes_max
                    && !self.port.sends_pool_in_place() =>
            {
                // The store kept the bytes' crc: they are not read here.
                let len = wire::encode_reply_with_output_crc(
                    &mut head,
                    request,
                    status,
                    results,
                    stored.as_slice().len(),
                    stored.crc(),
                );
                debug_assert_eq!(len, head_len);
                self.reply_from_store(handle, head, len, stored);
                Ok(())
            }
            body => Err(body),
        }
    }

    fn wait_for_buffer(
        &mut self,
        handle: RequestHandle,
        head: [u8; REPLY_HEAD_MAX_BYTES],
        head_len: usize,
        body: Body,
    ) {
        assert!(self.pending.len() < self.pending.capacity());
        if matches!(body, Body::Stored(_)) {
            self.pending_stored += 1;
        }
        self.pending.push_back(PendingReply {
            handle,
            head,
            head_len,
            body,
        });
    }

    fn try_reply(
        &mut self,
        pools: &mut CorePools,
        handle: RequestHandle,
        head: &[u8],
        body: Body,
    ) -> Result<(), Body> {
        let body = match body {
            Body::Stored(stored)
                if head.len() <= INLINE_RESPONSE_MAX_BYTES && !self.port.sends_pool_in_place() =>
            {
                let mut bytes = [0u8; INLINE_RESPONSE_MAX_BYTES];
                bytes[..head.len()].copy_from_slice(head);
                self.reply_from_store(handle, bytes, head.len(), stored);
                return Ok(());
            }
            body => body,
        };
        let len = head.len() + body.as_slice().len();
        let response = if len <= INLINE_RESPONSE_MAX_BYTES {
            let mut bytes = [0u8; INLINE_RESPONSE_MAX_BYTES];
            bytes[..head.len()].copy_from_slice(head);
            bytes[head.len()..len].copy_from_slice(body.as_slice());
            Response::Inline {
                bytes,
                len: len as u8,
            }
        } else {
            if self.held + 1 >= HELD_MAX {
                return Err(body);
            }
            let Some(lease) = write_response(&mut self.tx_chunk, pools, len, |out| {
                out[..head.len()].copy_from_slice(head);
                out[head.len()..len].copy_from_slice(body.as_slice());
            }) else {
                return Err(body);
            };
            Response::Pool(self.hold(lease))
        };
        self.stats.tx_copied_bytes += len as u64;
        if matches!(body, Body::Stored(_)) {
            self.stats.replies_from_store += 1;
        }
        self.release_body(pools, body);
        // Err: the client gave up on the request and moved on; the response is dropped.
        let _ = self.rpc.reply(handle, response);
        Ok(())
    }

    /// Keeps a reply from the store's memory as `Response::Stored`: its head (the first
    /// `head_len` bytes of `head`) in the RPC's slot, its bytes left in the store (copied once,
    /// into the packets, when sent) and listed for `copy_stored_bodies`. Takes no buffer, so
    /// it cannot fail.
    fn reply_from_store(
        &mut self,
        handle: RequestHandle,
        head: [u8; INLINE_RESPONSE_MAX_BYTES],
        head_len: usize,
        body: StoredBytes,
    ) {
        assert!(head_len <= INLINE_RESPONSE_MAX_BYTES);
        self.stats.tx_copied_bytes += head_len as u64;
        self.stats.replies_from_store += 1;
        let response = Response::Stored {
            head,
            head_len: head_len as u8,
            body,
        };
        if self.rpc.reply(handle, response).is_err() {
            return; // the client moved on: nothing kept, nothing to list
        }
        if self.stored_responses.len() == self.stored_responses.capacity() {
            // Drop the entries of responses the RPC let go (their clients moved on).
            let rpc = &mut self.rpc;
            self.stored_responses
                .retain(|&h| matches!(rpc.response_mut(h), Some(Response::Stored { .. })));
        }
        // Each live entry is a distinct RPC slot other than this one's (whose previous entry,
        // if any, is stale now), so after the sweep there is room.
        assert!(
            self.stored_responses.len() < self.stored_responses.capacity(),
            "stored responses over their bound"
        );
        self.stored_responses.push(handle);
    }

    /// Retries replies that waited for a buffer, then sends what the RPC has queued (acks and
    /// response packets). Returns the packets sent.
    pub fn flush_tx(&mut self, pools: &mut CorePools) -> usize {
        self.reap(pools);
        while let Some(pending) = self.pending.pop_front() {
            let PendingReply {
                handle,
                head,
                head_len,
                body,
            } = pending;
            let stored = matches!(body, Body::Stored(_));
            if stored {
                self.pending_stored -= 1;
            }
            if let Err(body) = self.try_reply(pools, handle, &head[..head_len], body) {
                self.pending_stored += usize::from(stored);
                self.pending.push_front(PendingReply {
                    handle,
                    head,
                    head_len,
                    body,
                });
                break;
            }
        }
        let (port, stats, core) = (&mut self.port, &mut self.stats, self.core);
        let sent = self.rpc.flush_parts(&mut |peer, header, payload, tail| {
            let len = header.len() + payload.len() + tail.len();
            let sent = if !tail.is_empty() {
                // A `Response::Stored`: its head, then store memory.
                // SAFETY: the head is part of a response the RPC keeps until the client's next
                // request on the slot, which only `poll_rx` takes, not before `port.flush`
                // below returns; store memory changes only in `exec_run`, after
                // `copy_stored_bodies` found no frame in flight from it (`stored_in_flight`).
                unsafe { port.send_stored(peer, header, payload, tail) }
            } else if payload.len() <= INLINE_RESPONSE_MAX_BYTES {
                // A `Response::Inline` (not pool memory).
                // SAFETY: part of a response the RPC keeps until the client's next request on
                // the slot, which only `poll_rx` takes: not before `port.flush` below returns.
                unsafe { port.send_borrowed(peer, header, payload, tail) }
            } else {
                // SAFETY: a one-part payload this long is a slice of a `Response::Pool` the RPC
                // holds, a `PoolBytes` lease over sealed bytes of this core's pools
                // (`write_response`): `Inline` and a `Stored` head are at most
                // `INLINE_RESPONSE_MAX_BYTES`, and a `Stored` body comes as the `tail`.
                unsafe { port.send_from_pool(pools, peer, header, payload) }
            };
            match sent {
                Ok(true) => {
                    stats.datagrams_tx += 1;
                    stats.tx_bytes += len as u64;
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    // Lost like a dropped datagram: the client's timer resends.
                    log::debug!("core {core}: datagram send to {peer:?}: {e}");
                    true
                }
            }
        });
        self.port.flush(pools);
        self.reap(pools);
        sent
    }

    /// Drops every session and returns every buffer (after the reactor stopped).
    pub fn close_all(&mut self, pools: &mut CorePools) {
        drop(std::mem::replace(
            &mut self.rpc,
            RpcServer::new(rpc_config(RPC_MTU_DEFAULT)),
        ));
        while let Some(pending) = self.pending.pop_front() {
            self.release_body(pools, pending.body);
        }
        self.pending_stored = 0;
        self.stored_responses.clear();
        self.ready.clear();
        for chunk in [self.rx_chunk.take(), self.tx_chunk.take()]
            .into_iter()
            .flatten()
        {
            pools.release(chunk);
        }
        self.reap(pools);
        debug_assert_eq!(self.held, 0);
        self.port.close(pools);
    }
}

/// Writes `len` bytes with `fill` into the tx chunk (a large buffer when they do not fit a
/// chunk) and leases them.
fn write_response(
    tx_chunk: &mut Option<Buf>,
    pools: &mut CorePools,
    len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Option<Lease> {
    if len > pools.small.buffer_size() {
        let mut buf = pools.acquire_for(len)?;
        fill(&mut buf.spare_mut()[..len]);
        buf.seal(len);
        let lease = pools.lease(&buf, 0, len);
        pools.release(buf);
        return Some(lease);
    }
    let full = tx_chunk.as_mut().is_some_and(|c| c.spare_mut().len() < len);
    if full {
        pools.release(tx_chunk.take().expect("checked"));
    }
    if tx_chunk.is_none() {
        *tx_chunk = Some(pools.small.acquire()?);
    }
    let chunk = tx_chunk.as_mut().expect("set above");
    let offset = chunk.sealed_len();
    fill(&mut chunk.spare_mut()[..len]);
    chunk.seal(len);
    Some(pools.lease(chunk, offset, len))
}

/// The datagram at `[offset, offset + len)` of `buf` (sealed) as `Received`: its packet header
/// copied out, the rest leased (`Runt`, nothing leased, when it is shorter than a header).
pub(crate) fn split_datagram<A>(
    pools: &mut CorePools,
    buf: &Buf,
    offset: usize,
    len: usize,
    peer: A,
) -> Received<A> {
    let Some(rest) = len.checked_sub(PACKET_HEADER_BYTES) else {
        return Received::Runt;
    };
    let mut header = [0u8; PACKET_HEADER_BYTES];
    header.copy_from_slice(&buf.sealed()[offset..offset + PACKET_HEADER_BYTES]);
    Received::Datagram {
        header,
        payload: pools.lease(buf, offset + PACKET_HEADER_BYTES, rest),
        peer,
    }
}

/// [`DatagramPort::recv`] through a copy: `recv_into` the receive chunk (a fresh one when the
/// current one is too full), the datagram leased from there.
pub fn recv_into_chunk<P: DatagramPort + ?Sized>(
    port: &mut P,
    pools: &mut CorePools,
    chunk: &mut Option<Buf>,
) -> io::Result<Received<P::Addr>> {
    let Some(spare) = rx_spare(chunk, pools) else {
        return Ok(Received::NoBuffer);
    };
    let Some((len, peer)) = port.recv_into(&mut spare[..DATAGRAM_BYTES_MAX])? else {
        return Ok(Received::Empty);
    };
    let chunk = chunk.as_mut().expect("rx_spare leaves a chunk");
    let offset = chunk.sealed_len();
    chunk.seal(len);
    Ok(split_datagram(pools, chunk, offset, len, peer))
}

/// Room for one more datagram in the receive chunk (a fresh chunk when the current one is too
/// full; the old one stays alive through its leases).
pub(crate) fn rx_spare<'a>(
    rx_chunk: &'a mut Option<Buf>,
    pools: &mut CorePools,
) -> Option<&'a mut [u8]> {
    let full = rx_chunk
        .as_mut()
        .is_some_and(|c| c.spare_mut().len() < DATAGRAM_BYTES_MAX);
    if full {
        pools.release(rx_chunk.take().expect("checked"));
    }
    if rx_chunk.is_none() {
        let chunk = pools.acquire_rx_small()?;
        assert!(
            chunk.capacity() >= DATAGRAM_BYTES_MAX,
            "chunks hold a datagram"
        );
        *rx_chunk = Some(chunk);
    }
    Some(rx_chunk.as_mut().expect("set above").spare_mut())
}

/// A header with the request id and opcode of a frame's raw header bytes (zeros past its end),
/// enough to address an error reply when the header failed the limits.
fn raw_header(frame: &[u8]) -> Header {
    let mut raw = [0u8; wire::HEADER_SIZE];
    let n = frame.len().min(raw.len());
    raw[..n].copy_from_slice(&frame[..n]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&raw[8..16]);
    Header {
        opcode: raw[5],
        request_id: u64::from_le_bytes(id),
        ..Header::default()
    }
}

/// Receive buffer asked of the kernel per socket: bursts of a few clients' credit windows
/// (32 packets of up to 9 KB per session) fit without drops. Capped by `net.core.rmem_max`.
const SOCKET_RCVBUF_BYTES: libc::c_int = 4 << 20;

/// `count` UDP sockets bound to the same address with `SO_REUSEPORT`, one per core: the kernel
/// spreads clients over them by a hash of the source address, so a client's session always
/// reaches the same core. Port 0 takes a free port for the first and the same for the rest.
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> io::Result<Vec<UdpSocket>> {
    assert!(count > 0);
    let mut sockets = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let socket = bind_one(addr)?;
        addr = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

fn bind_one(addr: SocketAddr) -> io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns; the socket closes it on drop, also
    // on the error paths below.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    set_socket_option(fd, libc::SO_REUSEPORT, 1)?;
    set_socket_buffers(fd);
    let (storage, len) = sockaddr_of(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes for the address family.
    let rc = unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn set_socket_option(fd: RawFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and the length passed is its size; a bad descriptor is
    // an error return, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for `SOCKET_RCVBUF_BYTES` of receive and send buffer on a UDP socket. Best effort: a
/// smaller buffer (capped by `net.core.rmem_max`) only means more drops, which the RPC's resends
/// cover. The default (~208 KiB) holds about 30 replies of 4 KiB: a client with 32 requests in
/// flight would lose replies to every burst.
pub fn set_socket_buffers(fd: RawFd) {
    let _ = set_socket_option(fd, libc::SO_RCVBUF, SOCKET_RCVBUF_BYTES);
    let _ = set_socket_option(fd, libc::SO_SNDBUF, SOCKET_RCVBUF_BYTES);
}

mod kernel;
pub use kernel::KernelUdpPort;

#[cfg(test)]
mod tests;
