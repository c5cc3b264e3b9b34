//! Putting a message back together from its packets, in any order, each kept where it arrived
//! (no copy): a one-packet message is handed up as the received buffer itself.

use super::packet::{PacketHeader, PACKETS_PER_MESSAGE_MAX};

/// The packets of one message, by index. Each entry keeps the received buffer and where the RPC
/// header starts in it (after the Ethernet/IP/UDP headers on a raw port, 0 on a socket).
pub(crate) struct Reassembly<B> {
    packets: Vec<Option<Held<B>>>,
    count: u16,
    message_bytes: u32,
    /// Bit `i`: packet `i` arrived.
    received: u64,
}

/// A received packet kept for its message: the buffer and where the payload lies in it.
pub(crate) struct Held<B> {
    buf: B,
    payload_start: u16,
    payload_bytes: u16,
}

/// What an arriving packet did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Insert {
    /// Stored; the message is still missing packets.
    Stored,
    /// Stored and the message is complete.
    Complete,
    /// Already had it.
    Duplicate,
    /// Disagrees with the packets before it (count or size): dropped.
    Mismatch,
    /// Laid out for another packet size (its count, or its length, does not follow from its
    /// message's size and ours): the peer sizes packets for another MTU, and its message can
    /// never be put together here. Dropped; the caller says why to the peer.
    PacketSize,
}

impl<B: AsRef<[u8]>> Reassembly<B> {
    /// Sized once (session set-up); never grows.
    pub(crate) fn new() -> Self {
        Reassembly {
            packets: (0..PACKETS_PER_MESSAGE_MAX).map(|_| None).collect(),
            count: 0,
            message_bytes: 0,
            received: 0,
        }
    }

    /// Drops every packet (back to its pool) and forgets the message.
    pub(crate) fn clear(&mut self) {
        for p in &mut self.packets[..self.count as usize] {
            *p = None;
        }
        self.count = 0;
        self.message_bytes = 0;
        self.received = 0;
    }

    /// Packets received in a row from index 0.
    pub(crate) fn contiguous(&self) -> u16 {
        (!self.received).trailing_zeros().min(self.count as u32) as u16
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.count > 0 && self.contiguous() == self.count
    }

    /// Adds a packet whose header is `h` (already decoded and checked against the session) and
    /// whose payload starts at `payload_start` in `buf`.
    /// `payload_bytes_max` is this end's packet size: every packet but the last is full, so a
    /// packet's count and length follow from its message's size. This is the one place the
    /// layout is checked (a packet of another size is `PacketSize`, before it can disagree
    /// with the packets before it).
    pub(crate) fn insert(
        &mut self,
        h: &PacketHeader,
        buf: B,
        payload_start: u16,
        payload_bytes_max: u16,
    ) -> Insert {
        debug_assert!(h.packet_index < h.packet_count && h.packet_count <= PACKETS_PER_MESSAGE_MAX);
        let need = h
            .message_bytes
            .div_ceil(u32::from(payload_bytes_max))
            .max(1);
        // Cannot overflow: index < 64 and the size is a u16.
        let start = u32::from(h.packet_index) * u32::from(payload_bytes_max);
        let expect = (h.message_bytes - start.min(h.message_bytes)).min(payload_bytes_max.into());
        if need != u32::from(h.packet_count) || u32::from(h.payload_bytes) != expect {
            return Insert::PacketSize;
        }
        // Laid out for our size, so the message is within `PACKETS_PER_MESSAGE_MAX` packets.
        if self.count == 0 {
            self.count = h.packet_count;
            self.message_bytes = h.message_bytes;
        } else if self.count != h.packet_count || self.message_bytes != h.message_bytes {
            return Insert::Mismatch;
        }
        let bit = 1u64 << h.packet_index;
        if self.received & bit != 0 {
            return Insert::Duplicate;
        }
        self.received |= bit;
        self.packets[h.packet_index as usize] = Some(Held {
            buf,
            payload_start,
            payload_bytes: h.payload_bytes,
        });
        if self.is_complete() {
            Insert::Complete
        } else {
            Insert::Stored
        }
    }

    /// The buffer of a complete one-packet message, and its payload's range in it, moved out
    /// (the message then has no packets to show: `message` is not to be called again until
    /// `clear`). None for a message of several packets, or one already taken.
    pub(crate) fn take_single(&mut self) -> Option<(B, std::ops::Range<usize>)> {
        debug_assert!(self.is_complete());
        if self.count != 1 {
            return None;
        }
        let held = self.packets[0].take()?;
        let start = usize::from(held.payload_start);
        Some((held.buf, start..start + usize::from(held.payload_bytes)))
    }

    /// Whether a complete message's packets are still here (not taken by `take_single`).
    pub(crate) fn is_held(&self) -> bool {
        self.is_complete() && self.packets[0].is_some()
    }

    /// The complete message, as views of the received packets.
    pub(crate) fn message(&self) -> Message<'_, B> {
        debug_assert!(self.is_held());
        Message {
            packets: &self.packets[..self.count as usize],
            message_bytes: self.message_bytes,
        }
    }
}

/// A reassembled message: its bytes are the payloads of its packets in order, where they were
/// received.
pub struct Message<'a, B> {
    packets: &'a [Option<Held<B>>],
    message_bytes: u32,
}

impl<'a, B: AsRef<[u8]>> Message<'a, B> {
    /// Total bytes.
    pub fn len(&self) -> usize {
        self.message_bytes as usize
    }

    pub fn is_empty(&self) -> bool {
        self.message_bytes == 0
    }

    /// The message's bytes, one slice per packet, in order.
    pub fn parts(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.packets.iter().map(|p| {
            let held = p.as_ref().expect("complete message has every packet");
            let start = held.payload_start as usize;
            &held.buf.as_ref()[start..start + held.payload_bytes as usize]
        })
    }

    /// Each packet's received buffer and the range of its payload in it, in order: for a
    /// caller that keeps its own handle on the bytes (a second pool lease) instead of copying.
    pub fn buffers(&self) -> impl Iterator<Item = (&'a B, std::ops::Range<usize>)> + 'a {
        self.packets.iter().map(|p| {
            let held = p.as_ref().expect("complete message has every packet");
            let start = held.payload_start as usize;
            (&held.buf, start..start + held.payload_bytes as usize)
        })
    }

    /// The whole message when it came in one packet (the common case for small ops): no copy.
    pub fn as_single(&self) -> Option<&'a [u8]> {
        if self.packets.len() == 1 {
            self.parts().next()
        } else {
            None
        }
    }

    /// Copies the message into `out` (which must hold `len()` bytes); for callers that need one
    /// contiguous buffer for a multi-packet message.
    pub fn copy_to(&self, out: &mut [u8]) {
        assert!(out.len() >= self.len());
        let mut at = 0;
        for part in self.parts() {
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    }

    /// The message as a new vector (tests, cold paths).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len()];
        self.copy_to(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dgram::packet::{PacketKind, PACKET_HEADER_BYTES};

    const PAYLOAD: u16 = 4;
    /// Where a test packet's payload starts: after 3 bytes of other headers and the RPC's.
    const AT: u16 = 3 + PACKET_HEADER_BYTES as u16;

    fn packet(index: u16, message: &[u8]) -> (PacketHeader, Vec<u8>) {
        let count = message.len().div_ceil(PAYLOAD as usize).max(1) as u16;
        let start = index as usize * PAYLOAD as usize;
        let part =
            &message[start.min(message.len())..(start + PAYLOAD as usize).min(message.len())];
        let h = PacketHeader {
            kind: PacketKind::Request,
            session: 1,
            request_id: 9,
            message_bytes: message.len() as u32,
            packet_index: index,
            packet_count: count,
            ack_count: 0,
            payload_bytes: part.len() as u16,
            detail: 0,
        };
        let mut buf = vec![0xee; 3]; // something before the RPC header, as on a raw port
        let mut head = [0u8; PACKET_HEADER_BYTES];
        h.encode(&mut head);
        buf.extend_from_slice(&head);
        buf.extend_from_slice(part);
        (h, buf)
    }

    #[test]
    fn out_of_order_duplicate_and_mismatch() {
        let message = b"0123456789"; // 3 packets of 4, 4, 2
        let mut r = Reassembly::new();
        let (h2, b2) = packet(2, message);
        assert_eq!(r.insert(&h2, b2.clone(), AT, PAYLOAD), Insert::Stored);
        assert_eq!(r.contiguous(), 0);
        assert_eq!(r.insert(&h2, b2, AT, PAYLOAD), Insert::Duplicate);
        let (h0, b0) = packet(0, message);
        assert_eq!(r.insert(&h0, b0, AT, PAYLOAD), Insert::Stored);
        assert_eq!(r.contiguous(), 1);
        let (mut bad, b1) = packet(1, message);
        bad.message_bytes = 11;
        assert_eq!(r.insert(&bad, b1.clone(), AT, PAYLOAD), Insert::Mismatch);
        let (h1, _) = packet(1, message);
        assert_eq!(r.insert(&h1, b1, AT, PAYLOAD), Insert::Complete);
        let m = r.message();
        assert_eq!(m.len(), 10);
        assert_eq!(m.to_vec(), message);
        assert!(m.as_single().is_none());
        r.clear();
        assert!(!r.is_complete());
    }

    #[test]
    fn a_packet_of_another_size_is_told_from_one_that_disagrees() {
        // "0123456789" in packets of 5 (a peer with a larger MTU): 2 packets where ours take 3.
        let mut first = packet(0, b"0123456789").0;
        first.packet_count = 2;
        first.payload_bytes = 5;
        let mut r = Reassembly::new();
        assert_eq!(
            r.insert(&first, vec![0; 40], AT, PAYLOAD),
            Insert::PacketSize
        );
        assert_eq!(r.contiguous(), 0, "nothing kept");
        // Our layout first; then a packet of another size for the same message is still told
        // apart from one that disagrees with it in our layout.
        let (h0, b0) = packet(0, b"0123456789");
        assert_eq!(r.insert(&h0, b0, AT, PAYLOAD), Insert::Stored);
        let mut long = packet(1, b"0123456789").0;
        long.payload_bytes = 5;
        assert_eq!(
            r.insert(&long, vec![0; 40], AT, PAYLOAD),
            Insert::PacketSize
        );
        let (mut other, b2) = packet(2, b"0123456789");
        other.message_bytes = 9; // our layout, but another message than packet 0's
        other.payload_bytes = 1;
        assert_eq!(r.insert(&other, b2, AT, PAYLOAD), Insert::Mismatch);
        assert_eq!(r.contiguous(), 1);
    }

    #[test]
    fn short_last_packet_and_empty_message() {
        let mut r = Reassembly::new();
        let (mut h, b) = packet(0, b"ab");
        h.payload_bytes = 1; // the only packet must carry the whole message
        assert_eq!(r.insert(&h, b, AT, PAYLOAD), Insert::PacketSize);
        let mut r = Reassembly::new();
        let (h, b) = packet(0, b"");
        assert_eq!(r.insert(&h, b, AT, PAYLOAD), Insert::Complete);
        assert_eq!(r.message().as_single(), Some(&b""[..]));
    }
}
