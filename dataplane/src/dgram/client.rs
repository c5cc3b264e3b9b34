//! The client end: sends requests within the session's credits, matches responses to requests
//! by id, resends on timeout, and hands each response up once.

use std::collections::VecDeque;

use super::packet::{PacketHeader, PacketKind, PACKET_HEADER_BYTES};
use super::reassembly::{Insert, Message, Reassembly};
use super::{RpcConfig, RpcStats, SendPacket, CREDITS_PER_SESSION, SLOTS_PER_SESSION};

/// A session opened by [`RpcClient::open_session`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u32);

/// Why a request finished without a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcError {
    /// No progress after `retries_max` resends. The server may or may not have run it.
    TimedOut,
    /// The two ends size packets differently (they were started with different MTUs): the
    /// server refused the request's packets, which said its packet payload size, or a response
    /// came in packets this client's size does not describe (the server's size is known when
    /// a full packet showed it). No resend can fix it. After a refusal the server did not run
    /// the request; after a response it did.
    PacketSize {
        client_packet_bytes: u16,
        server_packet_bytes: Option<u16>,
    },
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcError::TimedOut => write!(f, "no response after every resend"),
            RpcError::PacketSize {
                client_packet_bytes,
                server_packet_bytes,
            } => {
                let client_mtu = RpcConfig::mtu_for_packet_bytes(*client_packet_bytes);
                match server_packet_bytes {
                    Some(server) => write!(
                        f,
                        "the server sizes its packets for MTU {} ({server} payload bytes a \
                         packet) and this client for MTU {client_mtu} ({client_packet_bytes}): \
                         start both with the same --rpc-mtu",
                        RpcConfig::mtu_for_packet_bytes(*server),
                    ),
                    None => write!(
                        f,
                        "the server's response packets do not fit this client's packet size \
                         (MTU {client_mtu}, {client_packet_bytes} payload bytes a packet): the \
                         server runs with another --rpc-mtu; start both with the same"
                    ),
                }
            }
        }
    }
}

/// Where responses (or failures) go: `(session, request_id, response)`; the message borrows the
/// received packets for the call.
pub type OnResponse<'a, B> = dyn FnMut(SessionId, u64, Result<&Message<'_, B>, RpcError>) + 'a;

struct Slot<B, Q> {
    /// The request in flight; `None` when the slot is free.
    request: Option<Q>,
    request_id: u64,
    /// The id this slot uses next (ids of slot `s` are `s mod SLOTS`).
    next_request_id: u64,
    packet_count: u16,
    /// Packets sent at least once.
    sent: u16,
    /// Packets the server acknowledged (cumulative).
    acked: u16,
    /// Resend range `[resend_next, resend_end)`, within `[0, sent)`.
    resend_next: u16,
    resend_end: u16,
    in_tx_list: bool,
    deadline_ns: u64,
    retries: u32,
    rx: Reassembly<B>,
}

struct Session<P, B, Q> {
    peer: P,
    wire_id: u32,
    /// Request packets sent and not acknowledged, over all slots.
    credits_used: u16,
    /// A slot left the tx list with packets unsent for want of credits: the next ack that
    /// returns credits lists it again. Without one waiting, an ack skips the walk over the
    /// session's slots (it was a step of every response).
    credit_waiters: bool,
    slots: Vec<Slot<B, Q>>,
}

/// One core's RPC client. `P` is the peer address, `B` a received buffer, `Q` a request body
/// kept until its response arrives (for resends).
pub struct RpcClient<P, B, Q> {
    config: RpcConfig,
    /// Wire session ids are `id_base + index`: a restarted client uses another base, so the
    /// server never mistakes its requests for the old instance's.
    id_base: u32,
    sessions: Vec<Session<P, B, Q>>,
    /// Slots with packets to send, each listed once.
    tx_list: VecDeque<(u32, u8)>,
    stats: RpcStats,
}

impl<P: Copy + Eq, B: AsRef<[u8]>, Q: AsRef<[u8]>> RpcClient<P, B, Q> {
    /// `id_base` should differ between client instances (e.g. from the clock and the pid).
    pub fn new(config: RpcConfig, id_base: u32) -> Self {
        let sessions_max = config.sessions_max as usize;
        RpcClient {
            config,
            id_base,
            sessions: Vec::with_capacity(sessions_max),
            tx_list: VecDeque::with_capacity(sessions_max * SLOTS_PER_SESSION),
            stats: RpcStats::default(),
        }
    }

    pub fn stats(&self) -> RpcStats {
        self.stats
    }

    /// Opens a session to `peer` (set-up time: allocates its slots). None when at the limit.
    pub fn open_session(&mut self, peer: P) -> Option<SessionId> {
        if self.sessions.len() >= self.config.sessions_max as usize {
            return None;
        }
        let index = self.sessions.len() as u32;
        let slots = (0..SLOTS_PER_SESSION)
            .map(|s| Slot {
                request: None,
                request_id: 0,
                next_request_id: s as u64,
                packet_count: 0,
                sent: 0,
                acked: 0,
                resend_next: 0,
                resend_end: 0,
                in_tx_list: false,
                deadline_ns: 0,
                retries: 0,
                rx: Reassembly::new(),
            })
            .collect();
        self.sessions.push(Session {
            peer,
            wire_id: self.id_base.wrapping_add(index),
            credits_used: 0,
            credit_waiters: false,
            slots,
        });
        Some(SessionId(index))
    }

    /// Requests in flight on `session`.
    pub fn in_flight(&self, session: SessionId) -> usize {
        self.sessions[session.0 as usize]
            .slots
            .iter()
            .filter(|s| s.request.is_some())
            .count()
    }

    /// Starts a request; its packets go out on the next `flush_tx`. Gives the body back when
    /// all the session's slots are busy (back-pressure: try again after a response).
    pub fn request(&mut self, session: SessionId, body: Q, now_ns: u64) -> Result<u64, Q> {
        assert!(
            body.as_ref().len() <= self.config.message_bytes_max(),
            "request over the limit"
        );
        let s = &mut self.sessions[session.0 as usize];
        let Some(slot_index) = s.slots.iter().position(|slot| slot.request.is_none()) else {
            return Err(body);
        };
        let slot = &mut s.slots[slot_index];
        slot.request_id = slot.next_request_id;
        slot.next_request_id += SLOTS_PER_SESSION as u64;
        slot.packet_count = self.config.packets_for(body.as_ref().len());
        slot.request = Some(body);
        slot.sent = 0;
        slot.acked = 0;
        slot.resend_next = 0;
        slot.resend_end = 0;
        slot.retries = 0;
        slot.deadline_ns = now_ns + self.config.retransmit_timeout_ns;
        // A slot freed by a timeout may still be listed; it is then sent from where it stands.
        if !slot.in_tx_list {
            slot.in_tx_list = true;
            self.tx_list.push_back((session.0, slot_index as u8));
        }
        Ok(slot.request_id)
    }

    /// Takes one received datagram; the RPC header starts at `header_offset` in `buf`. A
    /// response made complete by it is handed to `on_response` with its session and request id.
    pub fn receive(
        &mut self,
        peer: P,
        buf: B,
        header_offset: usize,
        now_ns: u64,
        on_response: &mut OnResponse<'_, B>,
    ) {
        self.stats.packets_rx += 1;
        let h = match PacketHeader::decode(&buf.as_ref()[header_offset.min(buf.as_ref().len())..]) {
            Ok(h) if h.kind != PacketKind::Request => h,
            _ => {
                self.stats.malformed += 1;
                return;
            }
        };
        let index = h.session.wrapping_sub(self.id_base);
        let Some(session) = self
            .sessions
            .get_mut(index as usize)
            .filter(|s| s.peer == peer)
        else {
            self.stats.malformed += 1;
            return;
        };
        let slot_index = (h.request_id % SLOTS_PER_SESSION as u64) as usize;
        let slot = &mut session.slots[slot_index];
        if slot.request.is_none() || slot.request_id != h.request_id {
            self.stats.stale += 1;
            return;
        }
        let own = self.config.packet_payload_bytes;
        if h.kind == PacketKind::Refuse {
            // A refusal that names this client's own size is not about sizes (a damaged packet
            // on the way): the resends go on.
            if h.detail == u32::from(own) || h.detail == 0 || h.detail > u32::from(u16::MAX) {
                self.stats.malformed += 1;
                return;
            }
            self.stats.refusals += 1;
            let id = slot.request_id;
            Self::finish(session, slot_index);
            let error = RpcError::PacketSize {
                client_packet_bytes: own,
                server_packet_bytes: Some(h.detail as u16),
            };
            on_response(SessionId(index), id, Err(error));
            return;
        }
        // Any packet for the current request is progress: push the deadline out.
        slot.deadline_ns = now_ns + self.config.retransmit_timeout_ns;
        slot.retries = 0;
        let acked = if h.kind == PacketKind::Ack {
            h.ack_count.min(slot.sent)
        } else {
            slot.packet_count
        };
        if acked > slot.acked {
            // A response means every request packet arrived; it can only follow all of them.
            let acked = acked.min(slot.sent);
            let newly = acked - slot.acked;
            session.credits_used -= newly;
            slot.acked = acked;
            slot.resend_next = slot.resend_next.max(slot.acked);
            if newly > 0 && session.credit_waiters {
                session.credit_waiters = false;
                Self::list_waiting_slots(&mut self.tx_list, session, index);
            }
        }
        let session = &mut self.sessions[index as usize];
        let slot = &mut session.slots[slot_index];
        if h.kind == PacketKind::Ack {
            return;
        }
        match slot
            .rx
            .insert(&h, buf, (header_offset + PACKET_HEADER_BYTES) as u16, own)
        {
            // Disagrees with the packets of the message before it.
            Insert::Mismatch => self.stats.malformed += 1,
            Insert::PacketSize => {
                // Packed for another packet size: the server's MTU is not this client's.
                self.stats.refusals += 1;
                let id = slot.request_id;
                Self::finish(session, slot_index);
                let error = RpcError::PacketSize {
                    client_packet_bytes: own,
                    // Every packet but the last is full: such a packet shows the server's size.
                    server_packet_bytes: (h.packet_index + 1 < h.packet_count)
                        .then_some(h.payload_bytes),
                };
                on_response(SessionId(index), id, Err(error));
            }
            Insert::Duplicate => self.stats.duplicates += 1,
            Insert::Stored => {}
            Insert::Complete => {
                self.stats.messages_delivered += 1;
                on_response(SessionId(index), h.request_id, Ok(&slot.rx.message()));
                Self::finish(session, slot_index);
            }
        }
    }

    /// Puts back in the tx list the session's slots that have unsent packets (credits freed).
    fn list_waiting_slots(
        tx_list: &mut VecDeque<(u32, u8)>,
        session: &mut Session<P, B, Q>,
        index: u32,
    ) {
        for (i, slot) in session.slots.iter_mut().enumerate() {
            if slot.request.is_some() && slot.sent < slot.packet_count && !slot.in_tx_list {
                slot.in_tx_list = true;
                tx_list.push_back((index, i as u8));
            }
        }
    }

    /// Frees a slot whose request is done: returns its unacked credits, drops the request body
    /// and the response packets.
    fn finish(session: &mut Session<P, B, Q>, slot_index: usize) {
        let slot = &mut session.slots[slot_index];
        session.credits_used -= slot.sent - slot.acked;
        slot.request = None;
        slot.rx.clear();
        // A slot still in the tx list is skipped there (request None).
    }

    /// Resends for slots past their deadline, and fails requests past `retries_max` (handed to
    /// `on_response` with `RpcError::TimedOut`). Call once per poll pass; walks every slot,
    /// which is cheap at the sizes used (sessions x 8).
    pub fn poll_timers(&mut self, now_ns: u64, on_response: &mut OnResponse<'_, B>) {
        for (index, session) in self.sessions.iter_mut().enumerate() {
            for slot_index in 0..SLOTS_PER_SESSION {
                let slot = &mut session.slots[slot_index];
                if slot.request.is_none() || slot.deadline_ns > now_ns {
                    continue;
                }
                if slot.retries >= self.config.retries_max {
                    self.stats.timeouts += 1;
                    let id = slot.request_id;
                    Self::finish(session, slot_index);
                    on_response(SessionId(index as u32), id, Err(RpcError::TimedOut));
                    continue;
                }
                slot.retries += 1;
                slot.deadline_ns = now_ns + self.config.retransmit_timeout_ns;
                // Unacked packets again; if all were acked, the last one asks for the response.
                slot.resend_next = slot.acked.min(slot.packet_count - 1).min(slot.sent);
                slot.resend_end = slot.sent;
                if slot.resend_next < slot.resend_end {
                    self.stats.retransmits += 1;
                    if !slot.in_tx_list {
                        slot.in_tx_list = true;
                        self.tx_list.push_back((index as u32, slot_index as u8));
                    }
                }
            }
        }
    }

    /// True when packets wait for `flush_tx`.
    pub fn has_pending_tx(&self) -> bool {
        !self.tx_list.is_empty()
    }

    /// Hands queued request packets to `send(peer, header, payload)`: resends first, then new
    /// packets while the session has credits. `send` returns false when the transport is full.
    pub fn flush_tx(&mut self, send: &mut SendPacket<'_, P>) -> usize {
        let mut sent_total = 0;
        let mut head = [0u8; PACKET_HEADER_BYTES];
        let mut visits = self.tx_list.len();
        while visits > 0 {
            visits -= 1;
            let (session_index, slot_index) = *self.tx_list.front().expect("visits <= length");
            let session = &mut self.sessions[session_index as usize];
            let slot = &mut session.slots[slot_index as usize];
            let Some(body) = slot.request.as_ref().map(|q| q.as_ref()) else {
                slot.in_tx_list = false;
                self.tx_list.pop_front();
                continue;
            };
            let header = |index: u16, range: &std::ops::Range<usize>| PacketHeader {
                kind: PacketKind::Request,
                session: session.wire_id,
                request_id: slot.request_id,
                message_bytes: body.len() as u32,
                packet_index: index,
                packet_count: slot.packet_count,
                ack_count: 0,
                payload_bytes: range.len() as u16,
                detail: 0,
            };
            let mut full = false;
            while slot.resend_next < slot.resend_end {
                let range = self.config.packet_range(body.len(), slot.resend_next);
                header(slot.resend_next, &range).encode(&mut head);
                if !send(&session.peer, &head, &body[range]) {
                    full = true;
                    break;
                }
                sent_total += 1;
                slot.resend_next += 1;
            }
            while !full
                && slot.sent < slot.packet_count
                && session.credits_used < CREDITS_PER_SESSION
            {
                let range = self.config.packet_range(body.len(), slot.sent);
                header(slot.sent, &range).encode(&mut head);
                if !send(&session.peer, &head, &body[range]) {
                    full = true;
                    break;
                }
                sent_total += 1;
                slot.sent += 1;
                session.credits_used += 1;
            }
            if full {
                break; // keep this slot at the front for the next call
            }
            if slot.sent < slot.packet_count {
                session.credit_waiters = true; // out of credits
            }
            // Done, or out of credits: an ack puts it back (list_waiting_slots).
            slot.in_tx_list = false;
            self.tx_list.pop_front();
        }
        self.stats.packets_tx += sent_total as u64;
        sent_total
    }
}
