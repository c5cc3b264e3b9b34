//! Ethernet, ARP, IPv4 and UDP: just enough to carry the RPC over a raw port (DPDK) and to
//! answer ARP for the port's address. No IP options, no fragments (the RPC splits messages
//! itself), UDP checksum 0 (allowed over IPv4; Ethernet's FCS and the wire frame's crc32c cover
//! the bytes).

use std::net::Ipv4Addr;

/// Ethernet (14) + IPv4 (20) + UDP (8): where the RPC header starts in a frame.
pub const UDP_FRAME_HEADER_BYTES: usize = 42;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const IP_PROTO_UDP: u8 = 17;
/// An ARP frame: Ethernet header + 28 bytes of ARP.
pub const ARP_FRAME_BYTES: usize = 42;

/// One end of a UDP flow as seen on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Two words (MAC and port in one, the address in the other) instead of the derived four
/// writes with their length prefixes: the RPC server hashes the sender of every packet it
/// receives. Every field goes in, so equal endpoints hash equal.
impl std::hash::Hash for Endpoint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let [m0, m1, m2, m3, m4, m5] = self.mac;
        let [p0, p1] = self.port.to_le_bytes();
        state.write_u64(u64::from_le_bytes([m0, m1, m2, m3, m4, m5, p0, p1]));
        state.write_u32(u32::from(self.ip));
    }
}

/// What a received frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A UDP datagram for `local_ip`: its source, destination port, and where its payload lies.
    Udp {
        source: Endpoint,
        target_port: u16,
        payload_offset: usize,
        payload_bytes: usize,
    },
    /// An ARP request for `local_ip` from `mac`/`ip`: answer with [`build_arp_reply`].
    ArpRequest { mac: [u8; 6], ip: Ipv4Addr },
    /// Anything else (other protocols, other addresses, fragments, bad lengths): drop it.
    Ignored,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// Parses a received Ethernet frame addressed to `local_ip`.
pub fn parse(frame: &[u8], local_ip: Ipv4Addr) -> Parsed {
    if frame.len() < 14 {
        return Parsed::Ignored;
    }
    let source_mac: [u8; 6] = frame[6..12].try_into().unwrap();
    match u16_at(frame, 12) {
        ETHERTYPE_ARP if frame.len() >= ARP_FRAME_BYTES => {
            let arp = &frame[14..];
            // Ethernet/IPv4 request (htype 1, ptype 0x0800, hlen 6, plen 4, op 1) for our IP.
            if u16_at(arp, 0) == 1
                && u16_at(arp, 2) == ETHERTYPE_IPV4
                && arp[4] == 6
                && arp[5] == 4
                && u16_at(arp, 6) == 1
            {
                let target = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
                if target == local_ip {
                    let ip = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
                    return Parsed::ArpRequest {
                        mac: arp[8..14].try_into().unwrap(),
                        ip,
                    };
                }
            }
            Parsed::Ignored
        }
        ETHERTYPE_IPV4 if frame.len() >= UDP_FRAME_HEADER_BYTES => {
            let ip = &frame[14..];
            let total = u16_at(ip, 2) as usize;
            let fragmented = u16_at(ip, 6) & 0x3fff != 0; // MF flag or an offset
            if ip[0] != 0x45
                || ip[9] != IP_PROTO_UDP
                || fragmented
                || total < 28
                || 14 + total > frame.len()
            {
                return Parsed::Ignored;
            }
            if Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]) != local_ip {
                return Parsed::Ignored;
            }
            let udp = &ip[20..];
            let udp_len = u16_at(udp, 4) as usize;
            if udp_len < 8 || 20 + udp_len > total {
                return Parsed::Ignored;
            }
            Parsed::Udp {
                source: Endpoint {
                    mac: source_mac,
                    ip: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                    port: u16_at(udp, 0),
                },
                target_port: u16_at(udp, 2),
                payload_offset: UDP_FRAME_HEADER_BYTES,
                payload_bytes: udp_len - 8,
            }
        }
        _ => Parsed::Ignored,
    }
}

/// Writes Ethernet + IPv4 + UDP headers for a datagram of `payload_bytes` into `out`.
pub fn build_udp_header(
    out: &mut [u8; UDP_FRAME_HEADER_BYTES],
    source: &Endpoint,
    target: &Endpoint,
    payload_bytes: usize,
) {
    UdpHeaderTemplate::new(source).build(out, target, payload_bytes);
}

/// The Ethernet/IPv4/UDP header of one sender's datagrams with what never changes already
/// written (its MAC, IP and port, the IPv4 constants) and those words' ones' complement sum:
/// a packet then writes only the peer's fields and the lengths, and finishes the checksum from
/// four words (a port builds one per packet it sends; summing the 10-word header each time cost
/// ~60 instructions a packet under callgrind).
#[derive(Debug, Clone, Copy)]
pub struct UdpHeaderTemplate {
    bytes: [u8; UDP_FRAME_HEADER_BYTES],
    /// Sum of the IPv4 header's 16-bit words that do not depend on the packet.
    fixed_sum: u32,
}

impl UdpHeaderTemplate {
    pub fn new(source: &Endpoint) -> UdpHeaderTemplate {
        let mut out = [0u8; UDP_FRAME_HEADER_BYTES];
        out[6..12].copy_from_slice(&source.mac);
        out[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut out[14..34];
        ip[0] = 0x45;
        // ip[4..6] identification: 0, unused without fragments.
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
        ip[8] = 64;
        ip[9] = IP_PROTO_UDP;
        ip[12..16].copy_from_slice(&source.ip.octets());
        // The checksum over the header so far: total length, checksum and target address are
        // zero here, so they add nothing.
        let fixed_sum = ip.chunks_exact(2).map(|w| u32::from(u16_at(w, 0))).sum();
        out[34..36].copy_from_slice(&source.port.to_be_bytes());
        UdpHeaderTemplate {
            bytes: out,
            fixed_sum,
        }
    }

    /// Writes the header of a datagram of `payload_bytes` to `target` into `out`.
    #[inline]
    pub fn build(
        &self,
        out: &mut [u8; UDP_FRAME_HEADER_BYTES],
        target: &Endpoint,
        payload_bytes: usize,
    ) {
        assert!(
            payload_bytes <= 65535 - 28,
            "UDP payload of {payload_bytes} bytes does not fit IPv4"
        );
        *out = self.bytes;
        out[0..6].copy_from_slice(&target.mac);
        let total = (20 + 8 + payload_bytes) as u16;
        let target_ip = u32::from(target.ip);
        out[16..18].copy_from_slice(&total.to_be_bytes());
        out[30..34].copy_from_slice(&target_ip.to_be_bytes());
        // At most 10 words of 16 bits: no overflow, and two folds take any carry back in.
        let mut sum = self.fixed_sum + u32::from(total) + (target_ip >> 16) + (target_ip & 0xffff);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        out[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        out[36..38].copy_from_slice(&target.port.to_be_bytes());
        out[38..40].copy_from_slice(&((8 + payload_bytes) as u16).to_be_bytes());
    }
}

/// Writes the ARP reply telling `asker` that `local_ip` is at `local_mac`.
pub fn build_arp_reply(
    out: &mut [u8; ARP_FRAME_BYTES],
    local_mac: [u8; 6],
    local_ip: Ipv4Addr,
    asker_mac: [u8; 6],
    asker_ip: Ipv4Addr,
) {
    out[0..6].copy_from_slice(&asker_mac);
    out[6..12].copy_from_slice(&local_mac);
    out[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    let arp = &mut out[14..42];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes());
    arp[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&2u16.to_be_bytes()); // reply
    arp[8..14].copy_from_slice(&local_mac);
    arp[14..18].copy_from_slice(&local_ip.octets());
    arp[18..24].copy_from_slice(&asker_mac);
    arp[24..28].copy_from_slice(&asker_ip.octets());
}

/// Writes a broadcast ARP request asking who has `target_ip`.
pub fn build_arp_request(
    out: &mut [u8; ARP_FRAME_BYTES],
    local_mac: [u8; 6],
    local_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
) {
    build_arp_reply(out, local_mac, local_ip, [0; 6], target_ip);
    out[0..6].fill(0xff);
    out[14 + 6..14 + 8].copy_from_slice(&1u16.to_be_bytes());
}

/// If `frame` is an ARP reply for `local_ip`, the sender's (MAC, IP).
pub fn parse_arp_reply(frame: &[u8], local_ip: Ipv4Addr) -> Option<([u8; 6], Ipv4Addr)> {
    if frame.len() < ARP_FRAME_BYTES || u16_at(frame, 12) != ETHERTYPE_ARP {
        return None;
    }
    let arp = &frame[14..];
    let is_reply = u16_at(arp, 0) == 1 && u16_at(arp, 2) == ETHERTYPE_IPV4 && u16_at(arp, 6) == 2;
    let for_us = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]) == local_ip;
    (is_reply && for_us).then(|| {
        (
            arp[8..14].try_into().unwrap(),
            Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv4 header checksum (ones' complement sum of 16-bit words), straight from its
    /// definition: what `UdpHeaderTemplate`'s incremental sum is checked against.
    fn ip_checksum(header: &[u8]) -> u16 {
        let mut sum = 0u32;
        for pair in header.chunks(2) {
            sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    const A: Endpoint = Endpoint {
        mac: [2, 0, 0, 0, 0, 1],
        ip: Ipv4Addr::new(10, 9, 0, 1),
        port: 4000,
    };
    const B: Endpoint = Endpoint {
        mac: [2, 0, 0, 0, 0, 2],
        ip: Ipv4Addr::new(10, 9, 0, 2),
        port: 5000,
    };

    #[test]
    fn udp_round_trip() {
        let mut head = [0u8; UDP_FRAME_HEADER_BYTES];
        build_udp_header(&mut head, &A, &B, 5);
        let mut frame = head.to_vec();
        frame.extend_from_slice(b"hello");
        assert_eq!(
            ip_checksum(&frame[14..34]),
            0,
            "a header with its checksum sums to zero"
        );
        assert_eq!(
            parse(&frame, B.ip),
            Parsed::Udp {
                source: A,
                target_port: 5000,
                payload_offset: 42,
                payload_bytes: 5
            }
        );
        assert_eq!(parse(&frame, A.ip), Parsed::Ignored, "not addressed to us");
        frame[14 + 6] = 0x20; // more-fragments
        assert_eq!(parse(&frame, B.ip), Parsed::Ignored);
        assert_eq!(parse(&frame[..30], B.ip), Parsed::Ignored);
    }

    #[test]
    fn a_template_builds_the_header_a_straight_checksum_agrees_with() {
        let peers = [
            B,
            A,
            Endpoint {
                mac: [0xff; 6],
                ip: Ipv4Addr::new(255, 255, 255, 254),
                port: 65535,
            },
        ];
        for source in [A, peers[2]] {
            let template = UdpHeaderTemplate::new(&source);
            for target in peers {
                for payload in [0, 5, 4128, 8972, 65535 - 28] {
                    let mut head = [0u8; UDP_FRAME_HEADER_BYTES];
                    template.build(&mut head, &target, payload);
                    assert_eq!(
                        ip_checksum(&head[14..34]),
                        0,
                        "a header with its checksum sums to zero"
                    );
                    let mut frame = head.to_vec();
                    frame.resize(UDP_FRAME_HEADER_BYTES + payload, 0);
                    assert_eq!(
                        parse(&frame, target.ip),
                        Parsed::Udp {
                            source,
                            target_port: target.port,
                            payload_offset: UDP_FRAME_HEADER_BYTES,
                            payload_bytes: payload,
                        }
                    );
                    assert_eq!(&head[0..6], &target.mac);
                }
            }
        }
    }

    #[test]
    fn known_checksum() {
        // The example header from RFC 1071 discussions (Wikipedia "IPv4 header checksum").
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ip_checksum(&h), 0xb861);
    }

    #[test]
    fn arp_request_answered() {
        // A request from A for B's IP, as a host would broadcast it.
        let mut req = [0u8; ARP_FRAME_BYTES];
        build_arp_request(&mut req, A.mac, A.ip, B.ip);
        assert_eq!(&req[0..6], &[0xff; 6]);
        assert_eq!(
            parse(&req, B.ip),
            Parsed::ArpRequest {
                mac: A.mac,
                ip: A.ip
            }
        );
        assert_eq!(parse(&req, Ipv4Addr::new(10, 9, 0, 3)), Parsed::Ignored);
        let mut reply = [0u8; ARP_FRAME_BYTES];
        build_arp_reply(&mut reply, B.mac, B.ip, A.mac, A.ip);
        assert_eq!(&reply[0..6], &A.mac);
        assert_eq!(u16_at(&reply, 14 + 6), 2);
        assert_eq!(&reply[14 + 8..14 + 14], &B.mac);
        assert_eq!(
            parse(&reply, B.ip),
            Parsed::Ignored,
            "a reply is not a request"
        );
    }
}
