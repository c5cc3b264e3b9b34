//! The server end: reassembles requests, hands each up once, keeps its response for resends.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use super::packet::{PacketHeader, PacketKind, PACKET_HEADER_BYTES};
use super::reassembly::{Insert, Message, Reassembly};
use super::session_hash::SessionHashBuilder;
use super::{
    ResponseParts, RpcConfig, RpcStats, SendPacket, SendParts, ACKS_QUEUED_MAX, SLOTS_PER_SESSION,
};

/// Names a request handed up by [`RpcServer::receive`], for [`RpcServer::reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHandle {
    session: u32,
    /// The session's generation: an expired session's index is reused by the next one.
    generation: u32,
    slot: u8,
    request_id: u64,
}

impl RequestHandle {
    /// The client's request id.
    pub fn request_id(&self) -> u64 {
        self.request_id
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Idle,
    Receiving,
    /// Handed up, no reply yet.
    Executing,
    /// Reply kept for resends until the next request on this slot.
    Responded,
}

struct Slot<B, R> {
    state: SlotState,
    request_id: u64,
    rx: Reassembly<B>,
    response: Option<R>,
    response_packets: u16,
    /// Next response packet to send; `response_packets` when all are out.
    tx_next: u16,
    in_tx_list: bool,
}

struct Session<P, B, R> {
    peer: P,
    client_session: u32,
    generation: u32,
    live: bool,
    last_active_ns: u64,
    slots: Vec<Slot<B, R>>,
}

/// A control packet waiting for `flush_parts`: an ack of `count` request packets, or a refusal.
struct Ack {
    kind: PacketKind,
    session: u32,
    generation: u32,
    request_id: u64,
    count: u16,
}

/// One core's RPC server. `P` is the peer address, `B` a received buffer (an mbuf, a socket
/// buffer), `R` a response body kept until the client moves on: one slice, or two parts sent
/// back to back (`ResponseParts`), so that a head and a body kept elsewhere need not be joined
/// into one buffer first.
pub struct RpcServer<P, B, R> {
    config: RpcConfig,
    sessions: Vec<Session<P, B, R>>,
    /// (peer, client session id) -> session index; a cheap seeded hash (`session_hash.rs`).
    by_peer: HashMap<(P, u32), u32, SessionHashBuilder>,
    /// Indices of expired sessions, reused before the table grows.
    free: Vec<u32>,
    /// Slots with response packets to send, each listed once.
    tx_list: VecDeque<(u32, u8)>,
    acks: VecDeque<Ack>,
    stats: RpcStats,
}

impl<P: Copy + Eq + Hash, B: AsRef<[u8]>, R: ResponseParts> RpcServer<P, B, R> {
    /// Tables sized here; sessions' slots are built when a session first appears (like a TCP
    /// accept), never per request.
    pub fn new(config: RpcConfig) -> Self {
        let sessions_max = config.sessions_max as usize;
        RpcServer {
            config,
            sessions: Vec::with_capacity(sessions_max),
            by_peer: HashMap::with_capacity_and_hasher(sessions_max, SessionHashBuilder::random()),
            free: Vec::with_capacity(sessions_max),
            tx_list: VecDeque::with_capacity(sessions_max * SLOTS_PER_SESSION),
            acks: VecDeque::with_capacity(ACKS_QUEUED_MAX),
            stats: RpcStats::default(),
        }
    }

    pub fn stats(&self) -> RpcStats {
        self.stats
    }

    /// Live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len() - self.free.len()
    }

    /// Takes one received datagram from `peer`; the RPC header starts at `header_offset` in
    /// `buf`. A request made complete by it is handed to `on_request`; its packets are kept
    /// until `reply` (see [`RpcServer::request`]).
    pub fn receive(
        &mut self,
        peer: P,
        buf: B,
        header_offset: usize,
        now_ns: u64,
        on_request: &mut dyn FnMut(RequestHandle, &Message<'_, B>),
    ) {
        let h = match PacketHeader::decode(&buf.as_ref()[header_offset.min(buf.as_ref().len())..]) {
            Ok(h) => h,
            Err(_) => {
                self.stats.packets_rx += 1;
                self.stats.malformed += 1;
                return;
            }
        };
        self.receive_packet(
            peer,
            &h,
            buf,
            header_offset + PACKET_HEADER_BYTES,
            now_ns,
            on_request,
        )
    }

    /// `receive` for a packet whose header the caller decoded (`PacketHeader::decode_split`)
    /// and whose payload starts at `payload_start` in `buf`: for a receiver that keeps a
    /// datagram's payload as a buffer of its own, which `take_request` can then hand over
    /// whole for a one-packet request.
    pub fn receive_packet(
        &mut self,
        peer: P,
        h: &PacketHeader,
        buf: B,
        payload_start: usize,
        now_ns: u64,
        on_request: &mut dyn FnMut(RequestHandle, &Message<'_, B>),
    ) {
        self.stats.packets_rx += 1;
        if h.kind != PacketKind::Request {
            self.stats.malformed += 1;
            return;
        }
        let Some(session) = self.session_for(peer, h.session) else {
            self.stats.sessions_refused += 1;
            return;
        };
        let slot_index = (h.request_id % SLOTS_PER_SESSION as u64) as u8;
        let generation = self.sessions[session as usize].generation;
        self.sessions[session as usize].last_active_ns = now_ns;
        let slot = &mut self.sessions[session as usize].slots[slot_index as usize];
        if slot.state != SlotState::Idle && h.request_id < slot.request_id {
            self.stats.stale += 1;
            return;
        }
        if slot.state == SlotState::Idle || h.request_id > slot.request_id {
            // The client moved on: it has the previous response, so it can be let go.
            slot.rx.clear();
            slot.response = None;
            slot.request_id = h.request_id;
            slot.state = SlotState::Receiving;
        }
        let handle = RequestHandle {
            session,
            generation,
            slot: slot_index,
            request_id: h.request_id,
        };
        match slot.state {
            SlotState::Receiving => {
                debug_assert!(payload_start <= usize::from(u16::MAX));
                match slot.rx.insert(
                    h,
                    buf,
                    payload_start as u16,
                    self.config.packet_payload_bytes,
                ) {
                    // Disagrees with the packets of the message before it.
                    Insert::Mismatch => self.stats.malformed += 1,
                    Insert::PacketSize => {
                        // Laid out for another packet size: the client packs packets for
                        // another MTU. Resends would never fit, so it is told why instead of
                        // being left to time out.
                        self.stats.malformed += 1;
                        self.refuse(session, generation, h.request_id);
                    }
                    Insert::Duplicate => {
                        self.stats.duplicates += 1;
                        let count = slot.rx.contiguous();
                        self.queue_ack(handle, count);
                    }
                    Insert::Stored => {
                        let count = slot.rx.contiguous();
                        self.queue_ack(handle, count);
                    }
                    Insert::Complete => {
                        slot.state = SlotState::Executing;
                        self.stats.messages_delivered += 1;
                        let slot = &mut self.sessions[session as usize].slots[slot_index as usize];
                        // The packets stay in the slot until `reply`, so the request can be
                        // read in place (e.g. by the store) after this callback too.
                        on_request(handle, &slot.rx.message());
                    }
                }
            }
            SlotState::Executing => {
                self.stats.duplicates += 1;
                self.queue_ack(handle, h.packet_count);
            }
            SlotState::Responded => {
                self.stats.duplicates += 1;
                // The client resends its last packet when it lacks the response: send it again.
                if h.packet_index + 1 == h.packet_count {
                    self.stats.retransmits += 1;
                    slot.tx_next = 0;
                    if !slot.in_tx_list {
                        slot.in_tx_list = true;
                        self.tx_list.push_back((session, slot_index));
                    }
                }
            }
            SlotState::Idle => unreachable!("set to Receiving above"),
        }
    }

    fn session_for(&mut self, peer: P, client_session: u32) -> Option<u32> {
        if let Some(&index) = self.by_peer.get(&(peer, client_session)) {
            return Some(index);
        }
        if let Some(index) = self.free.pop() {
            let session = &mut self.sessions[index as usize];
            debug_assert!(!session.live);
            session.peer = peer;
            session.client_session = client_session;
            session.live = true;
            self.by_peer.insert((peer, client_session), index);
            return Some(index);
        }
        if self.sessions.len() >= self.config.sessions_max as usize {
            return None;
        }
        let index = self.sessions.len() as u32;
        let slots = (0..SLOTS_PER_SESSION)
            .map(|_| Slot {
                state: SlotState::Idle,
                request_id: 0,
                rx: Reassembly::new(),
                response: None,
                response_packets: 0,
                tx_next: 0,
                in_tx_list: false,
            })
            .collect();
        self.sessions.push(Session {
            peer,
            client_session,
            generation: 0,
            live: true,
            last_active_ns: 0,
            slots,
        });
        self.by_peer.insert((peer, client_session), index);
        Some(index)
    }

    fn queue_ack(&mut self, handle: RequestHandle, count: u16) {
        if self.acks.len() >= ACKS_QUEUED_MAX {
            self.stats.acks_dropped += 1;
            return;
        }
        self.acks.push_back(Ack {
            kind: PacketKind::Ack,
            session: handle.session,
            generation: handle.generation,
            request_id: handle.request_id,
            count,
        });
    }

    /// Queues a `Refuse` for a request whose packets do not fit this server's packet size
    /// (sent with the acks; dropped like an ack when their queue is full: the client's resend
    /// brings another).
    fn refuse(&mut self, session: u32, generation: u32, request_id: u64) {
        self.stats.refusals += 1;
        if self.acks.len() >= ACKS_QUEUED_MAX {
            self.stats.acks_dropped += 1;
            return;
        }
        self.acks.push_back(Ack {
            kind: PacketKind::Refuse,
            session,
            generation,
            request_id,
            count: 0,
        });
    }

    /// The request behind `handle`, while it waits for its reply: its bytes where they were
    /// received. None once replied to or superseded, or taken by `take_request`.
    pub fn request(&self, handle: RequestHandle) -> Option<Message<'_, B>> {
        let session = self.sessions.get(handle.session as usize)?;
        if session.generation != handle.generation {
            return None;
        }
        let slot = &session.slots[handle.slot as usize];
        (slot.state == SlotState::Executing
            && slot.request_id == handle.request_id
            && slot.rx.is_held())
        .then(|| slot.rx.message())
    }

    /// The buffer of `handle`'s request when it came in one packet, and its payload's range in
    /// it, moved out to the caller, who reads the request from it from now on: one handle on
    /// the bytes instead of two. The request stays the slot's (duplicates, the reply, resends
    /// work as before); `request` is None for it from then on. None for a request of several
    /// packets (read it with `request`), or one replied to, superseded or taken already.
    pub fn take_request(&mut self, handle: RequestHandle) -> Option<(B, std::ops::Range<usize>)> {
        self.slot_of(handle, SlotState::Executing)?.rx.take_single()
    }

    /// `handle`'s slot while it still holds `handle`'s request in `state`: None once the
    /// session expired (another generation) or the slot moved on to another request or state.
    fn slot_of(&mut self, handle: RequestHandle, state: SlotState) -> Option<&mut Slot<B, R>> {
        let session = self.sessions.get_mut(handle.session as usize)?;
        if session.generation != handle.generation {
            return None;
        }
        let slot = &mut session.slots[handle.slot as usize];
        (slot.state == state && slot.request_id == handle.request_id).then_some(slot)
    }

    /// The response kept for `handle`'s request (for resends), while the client has not moved
    /// on: to replace it with one of the same bytes (e.g. moved out of memory about to
    /// change). None once the slot has a newer request or the session expired.
    pub fn response_mut(&mut self, handle: RequestHandle) -> Option<&mut R> {
        self.slot_of(handle, SlotState::Responded)?
            .response
            .as_mut()
    }

    /// Queues the response to a request handed up by `receive`. Gives the body back if the
    /// request is no longer current (the client gave up on it and moved on).
    pub fn reply(&mut self, handle: RequestHandle, response: R) -> Result<(), R> {
        let response_len = response.total_len();
        assert!(
            response_len <= self.config.message_bytes_max(),
            "response over the limit"
        );
        let response_packets = self.config.packets_for(response_len);
        let Some(slot) = self.slot_of(handle, SlotState::Executing) else {
            return Err(response);
        };
        slot.rx.clear(); // the request's packets go back to their pool
        slot.response_packets = response_packets;
        slot.response = Some(response);
        slot.state = SlotState::Responded;
        slot.tx_next = 0;
        let newly_queued = !slot.in_tx_list;
        slot.in_tx_list = true;
        if newly_queued {
            self.tx_list.push_back((handle.session, handle.slot));
        }
        Ok(())
    }

    /// Forgets sessions idle for `idle_ns` with no request being executed, so that clients that
    /// went away do not fill the table. `idle_ns` must be longer than a client keeps resending
    /// (`retransmit_timeout_ns * retries_max`): a request resent to a forgotten session would
    /// run again. Call now and then (not per packet: it walks the table). Returns how many.
    pub fn expire_idle(&mut self, now_ns: u64, idle_ns: u64) -> usize {
        let resend_span_ns = self.config.retransmit_timeout_ns * self.config.retries_max as u64;
        assert!(
            idle_ns > resend_span_ns,
            "idle_ns must outlast clients' resends"
        );
        let mut expired = 0;
        for (index, session) in self.sessions.iter_mut().enumerate() {
            let busy = session
                .slots
                .iter()
                .any(|s| s.state == SlotState::Executing);
            if !session.live || busy || session.last_active_ns + idle_ns > now_ns {
                continue;
            }
            for slot in &mut session.slots {
                slot.rx.clear();
                slot.response = None; // a listed slot is skipped by flush_tx
                slot.state = SlotState::Idle;
                slot.request_id = 0;
            }
            session.live = false;
            session.generation = session.generation.wrapping_add(1);
            self.by_peer.remove(&(session.peer, session.client_session));
            self.free.push(index as u32);
            expired += 1;
        }
        expired
    }

    /// True when acks or response packets wait for `flush_tx`.
    pub fn has_pending_tx(&self) -> bool {
        !self.acks.is_empty() || !self.tx_list.is_empty()
    }

    /// `flush_parts` for responses of one part (`R: AsRef<[u8]>`): each packet's payload is
    /// one slice.
    pub fn flush_tx(&mut self, send: &mut SendPacket<'_, P>) -> usize {
        self.flush_parts(&mut |peer, header, payload, tail| {
            debug_assert!(tail.is_empty(), "a one-part response has no second part");
            send(peer, header, payload)
        })
    }

    /// Hands queued packets to `send(peer, header, payload, tail)`, acks first (they free
    /// clients' credits): a packet's payload is the bytes of its range of the response, in at
    /// most two slices (`payload`, then `tail`) when the range crosses from the response's
    /// first part into its second. `send` returns false when the transport is full; the rest
    /// waits for the next call. Returns the packets sent.
    pub fn flush_parts(&mut self, send: &mut SendParts<'_, P>) -> usize {
        let mut sent = 0;
        let mut head = [0u8; PACKET_HEADER_BYTES];
        while let Some(ack) = self.acks.front() {
            let session = &self.sessions[ack.session as usize];
            if session.generation != ack.generation {
                self.acks.pop_front(); // for an expired session
                continue;
            }
            PacketHeader {
                kind: ack.kind,
                session: session.client_session,
                request_id: ack.request_id,
                message_bytes: 0,
                packet_index: 0,
                packet_count: 0,
                ack_count: ack.count,
                payload_bytes: 0,
                detail: if ack.kind == PacketKind::Refuse {
                    u32::from(self.config.packet_payload_bytes)
                } else {
                    0
                },
            }
            .encode(&mut head);
            if !send(&session.peer, &head, &[], &[]) {
                self.stats.packets_tx += sent as u64;
                return sent;
            }
            sent += 1;
            self.acks.pop_front();
        }
        while let Some(&(session_index, slot_index)) = self.tx_list.front() {
            let session = &mut self.sessions[session_index as usize];
            let slot = &mut session.slots[slot_index as usize];
            // A new request on the slot drops the old response while it may still be listed.
            let Some((first, second)) = slot.response.as_ref().map(|r| r.parts()) else {
                slot.in_tx_list = false;
                self.tx_list.pop_front();
                continue;
            };
            let len = first.len() + second.len();
            while slot.tx_next < slot.response_packets {
                let range = self.config.packet_range(len, slot.tx_next);
                // The range's bytes in each part (either may be empty).
                let in_first = range.start.min(first.len())..range.end.min(first.len());
                let in_second = range.start.max(first.len()) - first.len()
                    ..range.end.max(first.len()) - first.len();
                debug_assert_eq!(in_first.len() + in_second.len(), range.len());
                PacketHeader {
                    kind: PacketKind::Response,
                    session: session.client_session,
                    request_id: slot.request_id,
                    message_bytes: len as u32,
                    packet_index: slot.tx_next,
                    packet_count: slot.response_packets,
                    ack_count: 0,
                    payload_bytes: range.len() as u16,
                    detail: 0,
                }
                .encode(&mut head);
                if !send(&session.peer, &head, &first[in_first], &second[in_second]) {
                    self.stats.packets_tx += sent as u64;
                    return sent;
                }
                sent += 1;
                slot.tx_next += 1;
            }
            slot.in_tx_list = false;
            self.tx_list.pop_front();
        }
        self.stats.packets_tx += sent as u64;
        sent
    }
}
