//! A user-space datagram RPC protocol over UDP (eRPC-style), transport-agnostic.
//!
//! Frames in, frames out, and a clock passed in: the endpoints never touch a socket or a port.
//! The same code runs over a DPDK port (raw Ethernet frames: [`ipv4`] parses and builds the
//! Ethernet/IPv4/UDP headers and answers ARP) and over kernel UDP sockets (datagram payloads).
//!
//! - **Sessions**: a client opens one per server; the server knows it by (peer, session id) and
//!   creates its state on the first packet, up to `sessions_max` (bounded; refused beyond).
//!   `RpcServer::expire_idle` forgets sessions idle longer than clients keep resending.
//! - **Slots and request ids**: each session has `SLOTS_PER_SESSION` slots, one request in
//!   flight per slot. Slot `s` uses request ids `s, s + SLOTS, s + 2*SLOTS, ...`, so the server
//!   matches a packet to its slot by `request_id % SLOTS`, and an id below the slot's current one
//!   is stale (dropped).
//! - **Exactly once**: the server runs a request once (the slot remembers it) and keeps its
//!   response until the client's next request on that slot, so a retransmitted request gets the
//!   same response again instead of a second execution. The client hands each response up once.
//! - **Multi-packet messages**: a request or response spans up to `PACKETS_PER_MESSAGE_MAX`
//!   packets; they are reassembled in any order, each packet kept where it was received (no
//!   copy; a one-packet message is the received buffer itself).
//! - **Credits**: a session has at most `CREDITS_PER_SESSION` request packets unacknowledged.
//!   The server acks each request packet (`Ack`, cumulative count) and the first response packet
//!   acks the whole request.
//! - **Retransmission**: a client slot with no progress for `retransmit_timeout_ns` resends its
//!   unacked request packets (the last one if all were acked: that asks the server to resend the
//!   response); after `retries_max` tries the request fails with `RpcError::TimedOut`.
//! - **Packet size**: both ends must pack messages alike (`RpcConfig::packet_payload_bytes`,
//!   from the MTU). A packet laid out for another size is refused at once rather than dropped
//!   until the resends run out: the server answers such a request packet with a `Refuse` that
//!   names its size, and the client fails such a request, or a request whose response is laid
//!   out for another size, with `RpcError::PacketSize`.
//!
//! Shape (like `tcp.rs`): feed received datagrams to `receive` (requests / responses come out
//! through a callback), call `reply` / `request`, then `flush_tx` hands each outgoing packet as
//! (peer, header, payload) to a send callback that builds the frame or calls `sendmsg`; the
//! client's `poll_timers(now)` drives retransmission. A server response may be kept as two
//! parts (`ResponseParts`: e.g. a head and bytes left where they were made), and
//! `RpcServer::flush_parts` then hands a packet's payload as its slice of each part.

pub mod client;
pub mod ipv4;
pub mod mmsg;
pub mod packet;
mod reassembly;
pub mod server;
mod session_hash;
pub mod socket;

pub use client::{OnResponse, RpcClient, RpcError, SessionId};
pub use packet::{
    PacketError, PacketHeader, PacketKind, PACKETS_PER_MESSAGE_MAX, PACKET_HEADER_BYTES,
};
pub use reassembly::Message;
pub use server::{RequestHandle, RpcServer};

/// The send callback of `flush_tx`: `(peer, rpc_header, payload) -> accepted`; false when the
/// transport is full (the packet and the ones after it wait for the next call).
pub type SendPacket<'a, P> = dyn FnMut(&P, &[u8], &[u8]) -> bool + 'a;

/// The server's send callback (`RpcServer::flush_parts`): `(peer, rpc_header, payload, tail)
/// -> accepted`, the packet's payload being `payload` then `tail` (a range of a two-part
/// response that crosses from its first part into its second; `tail` is empty otherwise).
pub type SendParts<'a, P> = dyn FnMut(&P, &[u8], &[u8], &[u8]) -> bool + 'a;

/// A response the server keeps until the client's next request on its slot: sent as its first
/// part then its second, back to back (e.g. a reply head kept in the slot and a body left where
/// it was made), so nobody joins them into one buffer. Any byte slice is one part.
pub trait ResponseParts {
    fn parts(&self) -> (&[u8], &[u8]);
    /// Bytes in both parts.
    fn total_len(&self) -> usize {
        let (first, second) = self.parts();
        first.len() + second.len()
    }
}

impl<T: AsRef<[u8]>> ResponseParts for T {
    fn parts(&self) -> (&[u8], &[u8]) {
        (self.as_ref(), &[])
    }
}

/// Requests one session may have in flight (one per slot).
pub const SLOTS_PER_SESSION: usize = 8;
/// Request packets a session may have sent and not had acknowledged: bounds what one client
/// can push into a server's receive ring at once.
pub const CREDITS_PER_SESSION: u16 = 32;
/// Acks waiting for `flush_tx`; beyond this an ack is dropped (the client's timer covers it).
pub const ACKS_QUEUED_MAX: usize = 1024;

/// Settings shared by both ends (they must agree on `packet_payload_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct RpcConfig {
    /// Message bytes per packet. Over Ethernet with MTU m: m - 20 (IPv4) - 8 (UDP) - 32.
    pub packet_payload_bytes: u16,
    /// Sessions a server keeps (and a client may open).
    pub sessions_max: u32,
    /// A client slot without progress this long resends.
    pub retransmit_timeout_ns: u64,
    /// Resends before a request fails.
    pub retries_max: u32,
}

impl RpcConfig {
    /// Packet payload for an Ethernet MTU (1500, or 9000 for jumbo frames).
    pub fn for_mtu(mtu: u16) -> RpcConfig {
        RpcConfig {
            packet_payload_bytes: mtu - 20 - 8 - PACKET_HEADER_BYTES as u16,
            sessions_max: 256,
            retransmit_timeout_ns: 5_000_000,
            retries_max: 20,
        }
    }

    /// The Ethernet MTU whose packets carry `packet_bytes` of message each (`for_mtu`'s
    /// inverse).
    pub fn mtu_for_packet_bytes(packet_bytes: u16) -> u32 {
        u32::from(packet_bytes) + 20 + 8 + PACKET_HEADER_BYTES as u32
    }

    /// Largest request or response.
    pub fn message_bytes_max(&self) -> usize {
        self.packet_payload_bytes as usize * PACKETS_PER_MESSAGE_MAX as usize
    }

    /// Packets a message of `bytes` takes (an empty message still takes one).
    pub(crate) fn packets_for(&self, bytes: usize) -> u16 {
        assert!(
            bytes <= self.message_bytes_max(),
            "message of {bytes} bytes over the limit"
        );
        bytes.div_ceil(self.packet_payload_bytes as usize).max(1) as u16
    }

    /// The payload range of packet `index` of a message of `bytes`.
    pub(crate) fn packet_range(&self, bytes: usize, index: u16) -> std::ops::Range<usize> {
        let start = index as usize * self.packet_payload_bytes as usize;
        start.min(bytes)..(start + self.packet_payload_bytes as usize).min(bytes)
    }
}

/// Counters of one endpoint (client or server).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RpcStats {
    pub packets_rx: u64,
    pub packets_tx: u64,
    /// Datagrams that were not valid packets, or disagreed with their message.
    pub malformed: u64,
    /// Packets already received (retransmissions that crossed an ack, network duplicates).
    pub duplicates: u64,
    /// Packets for a request id older than the slot's (late retransmissions).
    pub stale: u64,
    /// Server: responses sent again for a retransmitted request. Client: resend rounds.
    pub retransmits: u64,
    /// Server: first packets refused because the session table was full.
    pub sessions_refused: u64,
    /// Server: acks (and refusals) dropped because the ack queue was full.
    pub acks_dropped: u64,
    /// Server: request packets that did not fit its packet size, answered with a `Refuse`.
    /// Client: requests failed because the two ends size packets differently.
    pub refusals: u64,
    /// Server: requests handed up. Client: responses handed up.
    pub messages_delivered: u64,
    /// Client: requests failed after `retries_max`.
    pub timeouts: u64,
}
