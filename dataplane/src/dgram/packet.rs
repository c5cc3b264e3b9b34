//! The datagram RPC packet header: the first 32 bytes of every UDP payload.
//!
//! Layout (little-endian):
//! ```text
//!  0 magic u16 = 0x4352 ("RC")   2 version u8 = 1
//!  3 kind u8 (1 request, 2 response, 3 ack, 4 refuse)
//!  4 session u32 (the client's id for the session)
//!  8 request_id u64 (slot = request_id % SLOTS_PER_SESSION)
//! 16 message_bytes u32 (the whole request or response)
//! 20 packet_index u16   22 packet_count u16
//! 24 ack_count u16 (ack: request packets received in a row from 0)   26 payload_bytes u16
//! 28 detail u32 (zero, but in a refusal: the server's packet payload bytes)
//! ```
//! A packet carries bytes `[index * packet_payload, ...)` of its message; the payload follows
//! the header at once.

/// Bytes of the header.
pub const PACKET_HEADER_BYTES: usize = 32;
/// "RC" little-endian.
pub const PACKET_MAGIC: u16 = 0x4352;
/// Header version this code speaks.
pub const PACKET_VERSION: u8 = 1;
/// Packets one message may span: the reassembly keeps which arrived in a `u64`.
pub const PACKETS_PER_MESSAGE_MAX: u16 = 64;

/// What a packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    /// Part of a request, client to server.
    Request = 1,
    /// Part of a response, server to client.
    Response = 2,
    /// Server to client: request packets received (returns the client's credits).
    Ack = 3,
    /// Server to client: a request packet did not fit the server's packet size (its `detail`),
    /// so the request can never be put together there: the two ends were started with
    /// different MTUs. A peer of an older version drops the kind as malformed (and times out,
    /// as before the kind existed).
    Refuse = 4,
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    pub kind: PacketKind,
    pub session: u32,
    pub request_id: u64,
    pub message_bytes: u32,
    pub packet_index: u16,
    pub packet_count: u16,
    pub ack_count: u16,
    pub payload_bytes: u16,
    /// Zero, but in a `Refuse`: the server's packet payload bytes.
    pub detail: u32,
}

/// Why a datagram was not a valid packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Shorter than the header, or than the header plus its payload.
    Short,
    /// Wrong magic or version: not ours.
    Foreign,
    /// Unknown kind, index past count, count of zero or past the limit.
    Malformed,
}

impl PacketHeader {
    /// Encodes into the first `PACKET_HEADER_BYTES` of `out`.
    pub fn encode(&self, out: &mut [u8; PACKET_HEADER_BYTES]) {
        out[0..2].copy_from_slice(&PACKET_MAGIC.to_le_bytes());
        out[2] = PACKET_VERSION;
        out[3] = self.kind as u8;
        out[4..8].copy_from_slice(&self.session.to_le_bytes());
        out[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        out[16..20].copy_from_slice(&self.message_bytes.to_le_bytes());
        out[20..22].copy_from_slice(&self.packet_index.to_le_bytes());
        out[22..24].copy_from_slice(&self.packet_count.to_le_bytes());
        out[24..26].copy_from_slice(&self.ack_count.to_le_bytes());
        out[26..28].copy_from_slice(&self.payload_bytes.to_le_bytes());
        out[28..32].copy_from_slice(&self.detail.to_le_bytes());
    }

    /// Decodes and checks a datagram (header and payload length).
    pub fn decode(datagram: &[u8]) -> Result<PacketHeader, PacketError> {
        let Some((header, payload)) = datagram.split_first_chunk::<PACKET_HEADER_BYTES>() else {
            return Err(PacketError::Short);
        };
        PacketHeader::decode_split(header, payload.len())
    }

    /// `decode` for a datagram whose header was taken apart from its payload (a receive that
    /// keeps the payload as a buffer of its own): the header's bytes and how many followed.
    pub fn decode_split(
        datagram: &[u8; PACKET_HEADER_BYTES],
        payload_len: usize,
    ) -> Result<PacketHeader, PacketError> {
        let u16_at = |i: usize| u16::from_le_bytes([datagram[i], datagram[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(datagram[i..i + 4].try_into().unwrap());
        if u16_at(0) != PACKET_MAGIC || datagram[2] != PACKET_VERSION {
            return Err(PacketError::Foreign);
        }
        let kind = match datagram[3] {
            1 => PacketKind::Request,
            2 => PacketKind::Response,
            3 => PacketKind::Ack,
            4 => PacketKind::Refuse,
            _ => return Err(PacketError::Malformed),
        };
        let header = PacketHeader {
            kind,
            session: u32_at(4),
            request_id: u64::from_le_bytes(datagram[8..16].try_into().unwrap()),
            message_bytes: u32_at(16),
            packet_index: u16_at(20),
            packet_count: u16_at(22),
            ack_count: u16_at(24),
            payload_bytes: u16_at(26),
            detail: u32_at(28),
        };
        let data_kind = matches!(kind, PacketKind::Request | PacketKind::Response);
        if data_kind
            && (header.packet_count == 0
                || header.packet_count > PACKETS_PER_MESSAGE_MAX
                || header.packet_index >= header.packet_count)
        {
            return Err(PacketError::Malformed);
        }
        if payload_len < header.payload_bytes as usize {
            return Err(PacketError::Short);
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PacketHeader {
        PacketHeader {
            kind: PacketKind::Request,
            session: 7,
            request_id: 0x1122_3344_5566_7788,
            message_bytes: 5000,
            packet_index: 2,
            packet_count: 4,
            ack_count: 0,
            payload_bytes: 3,
            detail: 0,
        }
    }

    #[test]
    fn round_trip() {
        let mut b = [0u8; PACKET_HEADER_BYTES + 3];
        let mut h = [0u8; PACKET_HEADER_BYTES];
        sample().encode(&mut h);
        b[..PACKET_HEADER_BYTES].copy_from_slice(&h);
        assert_eq!(PacketHeader::decode(&b), Ok(sample()));
    }

    #[test]
    fn rejects_bad_input() {
        let mut h = [0u8; PACKET_HEADER_BYTES];
        sample().encode(&mut h);
        assert_eq!(PacketHeader::decode(&h[..10]), Err(PacketError::Short));
        assert_eq!(
            PacketHeader::decode(&h),
            Err(PacketError::Short),
            "payload missing"
        );
        let mut p = h;
        p[0] = 0;
        assert_eq!(PacketHeader::decode(&p), Err(PacketError::Foreign));
        let mut bad = sample();
        bad.payload_bytes = 0;
        bad.packet_index = 4;
        bad.encode(&mut p);
        assert_eq!(PacketHeader::decode(&p), Err(PacketError::Malformed));
        bad.packet_index = 0;
        bad.packet_count = PACKETS_PER_MESSAGE_MAX + 1;
        bad.encode(&mut p);
        assert_eq!(PacketHeader::decode(&p), Err(PacketError::Malformed));
        p[3] = 9;
        assert_eq!(PacketHeader::decode(&p), Err(PacketError::Malformed));
    }

    #[test]
    fn a_refusal_carries_the_servers_packet_size() {
        let refusal = PacketHeader {
            kind: PacketKind::Refuse,
            session: 3,
            request_id: 17,
            message_bytes: 0,
            packet_index: 0,
            packet_count: 0,
            ack_count: 0,
            payload_bytes: 0,
            detail: 1440,
        };
        let mut h = [0u8; PACKET_HEADER_BYTES];
        refusal.encode(&mut h);
        assert_eq!(h[3], 4);
        assert_eq!(PacketHeader::decode(&h), Ok(refusal));
    }
}
