//! A DPDK rx/tx queue pair as a [`DatagramPort`]: what `serve --transport dpdk` gives each
//! reactor's datagram RPC (`crate::udp::RpcTransport`), in place of a kernel UDP socket.
//!
//! Receive: `rx_burst` into a per-queue array; each frame is parsed (`dgram::ipv4`): an ARP
//! request for the port's address is answered at once, a UDP datagram to the port's UDP port
//! is handed up, anything else is dropped and counted. The datagram's payload is **copied once**
//! from its mbuf into the caller's pool chunk (`PortStats::rx_copies`/`rx_copied_bytes`): the
//! OSD's ops carry pool `Lease`s (also across the one-hop ring), not mbufs, so this is the one
//! place the payload moves between the NIC buffer and the store. Send: each packet is built in
//! a fresh mbuf (Ethernet/IPv4/UDP header, RPC header, payload: one copy, as a kernel socket's
//! send makes) and queued; `flush` hands the queue to `tx_burst`.
//!
//! Lifetimes: the port and its mempools live as long as the process (a server opens its port
//! once; DPDK cannot restart a closed vdev port in the same process anyway), so `open` leaks
//! them and the queue handles are `'static`, which lets each move to its reactor thread.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::BURST_MAX;
use super::{udp, DpdkError, Eal, MacAddr, Mbuf, Mempool, Port, PortConfig, RxQueue, TxQueue};
use crate::dgram::ipv4::{self, Endpoint, Parsed};
use crate::dgram::socket::DATAGRAM_BYTES_MAX;
use crate::udp::{DatagramPort, PortStats};

/// Data room of each mbuf: the default headroom (128) plus a whole jumbo frame of the RPC's
/// packet size (Ethernet/IPv4/UDP headers + `DATAGRAM_BYTES_MAX`), so every packet is one
/// segment on both sides.
pub const MBUF_DATA_ROOM: u16 = 128 + 9216;
/// Mbufs per queue's pool: the rx ring (1,024 descriptors), a burst in hand, the tx queue and
/// what the driver holds until sent.
pub const MBUFS_PER_QUEUE: u32 = 4095;

/// How long the driver may refuse every frame before the queued ones are dropped: a peer that
/// went away (memif link down) must not keep the RPC's packets, and so a stopping server,
/// waiting forever; the RPC's resends cover a live peer's loss.
const TX_STUCK_DROP_AFTER: Duration = Duration::from_millis(100);

const _: () = assert!(DATAGRAM_BYTES_MAX + ipv4::UDP_FRAME_HEADER_BYTES <= 9216);

/// One reactor's queue pair of a started port, with the address it answers for.
pub struct DpdkDatagramPort {
    local: Endpoint,
    pool: &'static Mempool,
    rx: RxQueue<'static, 'static>,
    tx: TxQueue<'static, 'static>,
    /// The last burst received and how far `recv_into` has read it.
    rx_batch: Vec<Mbuf<'static>>,
    rx_next: usize,
    /// Frames built and not yet taken by the driver.
    tx_out: Vec<Mbuf<'static>>,
    /// Since when the driver has taken nothing while frames wait (see `TX_STUCK_DROP_AFTER`).
    tx_stuck_since: Option<Instant>,
    stats: PortStats,
}

/// What [`open`] started: one [`DpdkDatagramPort`] per queue, and the port's MAC address.
pub struct OpenedPort {
    pub queues: Vec<DpdkDatagramPort>,
    pub mac: MacAddr,
    pub mtu: u16,
}

/// Starts port `port_id` with `queue_count` rx/tx queue pairs, each with its own mempool
/// (named `name`-`q`), answering for `ip`:`udp_port`. The port and pools are leaked (see the
/// module comment).
pub fn open(
    eal: &Eal,
    port_id: u16,
    queue_count: u16,
    ip: Ipv4Addr,
    udp_port: u16,
    name: &str,
) -> Result<OpenedPort, DpdkError> {
    let mut pools: Vec<&'static Mempool> = Vec::with_capacity(queue_count as usize);
    for q in 0..queue_count {
        let pool = Mempool::new(eal, &format!("{name}-{q}"), MBUFS_PER_QUEUE, MBUF_DATA_ROOM)?;
        pools.push(Box::leak(Box::new(pool)));
    }
    let config = PortConfig {
        queue_count,
        ..PortConfig::default()
    };
    let port: &'static Port<'static> =
        Box::leak(Box::new(Port::start(eal, port_id, &config, &pools)?));
    let mac = port.mac();
    let queues = port
        .queues()
        .into_iter()
        .zip(pools)
        .map(|((rx, tx), pool)| DpdkDatagramPort {
            local: Endpoint {
                mac: mac.0,
                ip,
                port: udp_port,
            },
            pool,
            rx,
            tx,
            rx_batch: Vec::with_capacity(BURST_MAX),
            rx_next: 0,
            tx_out: Vec::with_capacity(BURST_MAX),
            tx_stuck_since: None,
            stats: PortStats::default(),
        })
        .collect();
    Ok(OpenedPort {
        queues,
        mac,
        mtu: port.mtu(),
    })
}

impl DpdkDatagramPort {
    /// The address this queue answers for.
    pub fn local(&self) -> Endpoint {
        self.local
    }

    /// The pool and the raw queues, for a client that keeps received mbufs (the load
    /// generator reads responses in place).
    pub fn into_parts(
        self,
    ) -> (
        &'static Mempool,
        RxQueue<'static, 'static>,
        TxQueue<'static, 'static>,
    ) {
        (self.pool, self.rx, self.tx)
    }

    /// Mbufs of this queue's pool not in the pool (held by the driver, in hand, queued).
    pub fn mbufs_in_use(&self) -> u32 {
        self.pool.in_use_count()
    }

    /// Queues a frame; false when neither the queue nor the driver has room.
    fn push_tx(&mut self, frame: Option<Mbuf<'static>>) -> bool {
        if self.tx_out.len() == self.tx_out.capacity() {
            self.burst();
            if self.tx_out.len() == self.tx_out.capacity() {
                let stuck_since = *self.tx_stuck_since.get_or_insert_with(Instant::now);
                if stuck_since.elapsed() < TX_STUCK_DROP_AFTER {
                    self.stats.tx_full += 1;
                    return false;
                }
                // Nobody takes frames: lost, as on a wire without a receiver.
                self.stats.tx_dropped += self.tx_out.len() as u64;
                self.tx_out.clear();
            }
        }
        match frame {
            Some(m) => {
                self.tx_out.push(m);
                true
            }
            None => {
                self.stats.tx_full += 1; // pool empty: the caller retries
                false
            }
        }
    }
}

impl DpdkDatagramPort {
    /// One `tx_burst`; progress ends a stuck spell.
    fn burst(&mut self) -> usize {
        let sent = self.tx.tx_burst(&mut self.tx_out);
        if sent > 0 {
            self.tx_stuck_since = None;
        }
        sent
    }
}

impl DatagramPort for DpdkDatagramPort {
    type Addr = Endpoint;

    fn recv_into(&mut self, buf: &mut [u8]) -> io::Result<Option<(usize, Endpoint)>> {
        loop {
            if self.rx_next == self.rx_batch.len() {
                self.rx_batch.clear(); // the burst's mbufs go back to the pool together
                self.rx_next = 0;
                if self.rx.rx_burst(&mut self.rx_batch) == 0 {
                    return Ok(None);
                }
            }
            let m = &self.rx_batch[self.rx_next];
            self.rx_next += 1;
            if m.segment_count() != 1 {
                self.stats.ignored += 1; // Carmine's frames always fit one segment
                continue;
            }
            match ipv4::parse(m.data(), self.local.ip) {
                Parsed::ArpRequest { mac, ip } => {
                    let local = self.local;
                    let reply = udp::arp_frame(self.pool, |f| {
                        ipv4::build_arp_reply(f, local.mac, local.ip, mac, ip)
                    });
                    if self.push_tx(reply) {
                        self.stats.arp_replies += 1;
                    }
                }
                Parsed::Udp {
                    source,
                    target_port,
                    payload_offset,
                    payload_bytes,
                } if target_port == self.local.port && payload_bytes <= buf.len() => {
                    let m = &self.rx_batch[self.rx_next - 1];
                    buf[..payload_bytes]
                        .copy_from_slice(&m.data()[payload_offset..payload_offset + payload_bytes]);
                    self.stats.rx_copies += 1;
                    self.stats.rx_copied_bytes += payload_bytes as u64;
                    return Ok(Some((payload_bytes, source)));
                }
                _ => self.stats.ignored += 1,
            }
        }
    }

    fn send(&mut self, peer: &Endpoint, header: &[u8], payload: &[u8]) -> io::Result<bool> {
        let frame = udp::udp_frame(self.pool, &self.local, peer, header, payload);
        Ok(self.push_tx(frame))
    }

    fn flush(&mut self) {
        while !self.tx_out.is_empty() {
            if self.burst() == 0 {
                break; // the driver's ring is full: the rest go next pass
            }
        }
    }

    fn fd(&self) -> Option<RawFd> {
        None
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}
