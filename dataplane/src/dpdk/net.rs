//! A DPDK rx/tx queue pair as a [`DatagramPort`]: what `serve --transport dpdk` gives each
//! reactor's datagram RPC (`crate::udp::RpcTransport`), in place of a kernel UDP socket.
//!
//! Receive: `rx_burst` into a per-queue array; each frame is parsed (`dgram::ipv4`): an ARP
//! request for the port's address is answered at once, a UDP datagram to the port's UDP port
//! is handed up, anything else is dropped and counted.
//!
//! **Zero copy on receive** (`open(.., rx_in_place: true)`, what the server asks for): the rx
//! queue fills from a mempool whose data rooms are not DPDK memory but the buffers of a
//! [`BufferPool`] (`Mempool::with_external_rooms`), which joins the reactor's `CorePools` as
//! its `nic` pool. The port keeps an owner `Buf` for every room the NIC has (in the mempool, in
//! the rx ring). A received datagram becomes a `Lease` over its own room: the owner seals the
//! bytes the driver wrote, leases the datagram and lets go, and the mbuf is kept here, by room.
//! From there it is every other lease's path (the RPC, the frame parser, the one-hop ring, the
//! store read it in place; it comes home to be released). When the room's last lease is back,
//! it is free in the `nic` pool: [`DpdkDatagramPort::reclaim`] takes it again as its owner and
//! frees the mbuf, and the room goes back to DPDK with it. So the payload is never copied
//! between the NIC's buffer and the store (`PortStats::rx_in_place`); a frame the port cannot
//! take in place (several segments, another pool) is copied into a pool chunk instead
//! (`rx_copies`). memif's own PMD copies the frame from its shared-memory ring into the mbuf;
//! that copy is the driver's (a NIC's DMA does not make it), not Carmine's.
//!
//! The rooms are EAL memory (`rooms.rs`), which is what lets a memif port in zero-copy client
//! mode (`role=client,zero-copy=yes`) have its peer write frames straight into them and read
//! replies out of our tx mbufs: then memif makes no copy on this side either. In-place receive
//! is used only on drivers that write the mbuf in software ([`SOFTWARE_DRIVERS`]; on a NIC it
//! is untested); other ports receive into an ordinary mempool and copy once, as before.
//!
//! Send: each packet is built in a fresh mbuf of the queue's tx pool (Ethernet/IPv4/UDP header,
//! RPC header, payload: one copy, as a kernel socket's send makes) and queued; `flush` hands the
//! queue to `tx_burst`. With `InPlace::tx` a payload of `ATTACH_MIN_BYTES` or more is not
//! copied but attached (`attach.rs`). Off by default: memif copies every frame into its ring
//! anyway, and its two-segment path costs more than the copy saved (callgrind, 4 KiB reads:
//! about 420 fewer instructions in memcpy, 540 more in memif's tx, 350 for the attaching).
//!
//! Lifetimes: the port and its mempools live as long as the process (a server opens its port
//! once; DPDK cannot restart a closed vdev port in the same process anyway), so `open` leaks
//! them (and the rooms' mapping), and the queue handles are `'static`, which lets each move to
//! its reactor thread.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::heap;
use super::rooms::Rooms;
use super::BURST_MAX;
use super::{
    udp, DpdkError, Eal, MacAddr, Mbuf, Mempool, Port, PortConfig, RxQueue, TxAttach, TxQueue,
};
use crate::buffers::CorePools;
use crate::dgram::ipv4::{self, Endpoint, Parsed, UdpHeaderTemplate};
use crate::dgram::socket::DATAGRAM_BYTES_MAX;
use crate::dgram::PACKET_HEADER_BYTES;
use crate::pool::{Buf, BufferPool};
use crate::udp::{recv_into_chunk, split_datagram, DatagramPort, PortStats, Received};

/// Data room of each mbuf: the default headroom (128) plus a whole jumbo frame of the RPC's
/// packet size (Ethernet/IPv4/UDP headers + `DATAGRAM_BYTES_MAX`), so every packet is one
/// segment on both sides.
pub const MBUF_DATA_ROOM: u16 = 128 + 9216;
/// Mbufs per queue's pool: the rx ring (1,024 descriptors), a burst in hand, the tx queue and
/// what the driver holds until sent; with in-place receive, the rx pool's mbufs also stay
/// with the requests the RPC holds (at most 2,048 per core: 256 sessions x 8) until answered.
pub const MBUFS_PER_QUEUE: u32 = 4095;
/// Mbufs of a queue's separate tx pool (in-place receive): a few flushes' worth of packets.
pub const TX_MBUFS_PER_QUEUE: u32 = 2047;
/// Smallest payload sent in place (attached to the frame) rather than copied: below it the
/// second mbuf and the lease cost more than the copy.
pub const ATTACH_MIN_BYTES: usize = 1024;
/// Frames with an attached payload in flight per queue (a slot each); beyond, payloads copy.
pub const ATTACH_SLOTS: u32 = 1024;
/// Drivers that write received frames into the mbuf with the CPU, so rooms in memory DPDK did
/// not map for DMA are safe to receive into.
pub const SOFTWARE_DRIVERS: &[&str] = &["net_memif", "net_ring"];

/// How long the driver may refuse every frame before the queued ones are dropped: a peer that
/// went away (memif link down) must not keep the RPC's packets, and so a stopping server,
/// waiting forever; the RPC's resends cover a live peer's loss.
const TX_STUCK_DROP_AFTER: Duration = Duration::from_millis(100);

const _: () = assert!(DATAGRAM_BYTES_MAX + ipv4::UDP_FRAME_HEADER_BYTES <= 9216);

/// One reactor's queue pair of a started port, with the address it answers for.
pub struct DpdkDatagramPort {
    local: Endpoint,
    /// The Ethernet/IPv4/UDP header of what this queue sends, less the peer's fields.
    udp_header: UdpHeaderTemplate,
    /// Where sent frames (and ARP replies) are built; also the rx pool unless `rooms` is set.
    pool: &'static Mempool,
    rx: RxQueue<'static, 'static>,
    tx: TxQueue<'static, 'static>,
    /// The last burst received, reversed: `pop` gives the next frame in arrival order.
    rx_batch: Vec<Mbuf<'static>>,
    /// The rx pool's rooms, when receive is in place.
    rooms: Option<Rooms>,
    /// Payloads sent in place (on the same ports as in-place receive).
    attach: Option<TxAttach>,
    /// Pool payloads are sent attached (`InPlace::tx`).
    attach_pool: bool,
    /// Replies from the store's memory are sent attached (`InPlace::tx_store`).
    attach_store: bool,
    /// Frames built and not yet taken by the driver.
    tx_out: Vec<Mbuf<'static>>,
    /// Since when the driver has taken nothing while frames wait (see `TX_STUCK_DROP_AFTER`).
    tx_stuck_since: Option<Instant>,
    stats: PortStats,
}

/// What [`open`] may do in place rather than copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct InPlace {
    /// Receive into rooms of a `nic` buffer pool (module comment).
    pub rx: bool,
    /// Send payloads of `ATTACH_MIN_BYTES` and more attached from pool memory (`attach.rs`);
    /// only with `rx` (the same drivers).
    pub tx: bool,
    /// Send replies from the store's memory attached where they lie (a zero-copy memif
    /// client, whose peer reads them there, as a NIC's DMA would): only bytes in the EAL's
    /// memory (`heap`), only with `rx`. The core then holds back every mutation while such
    /// frames are in flight (`DatagramPort::stored_in_flight`).
    pub tx_store: bool,
}

/// What [`open`] started: one [`DpdkDatagramPort`] per queue, and the port's MAC address.
pub struct OpenedPort {
    pub queues: Vec<DpdkDatagramPort>,
    /// The port's driver (`net_memif`, ...).
    pub driver: String,
    pub mac: MacAddr,
    pub mtu: u16,
}

/// Starts port `port_id` with `queue_count` rx/tx queue pairs answering for `ip`:`udp_port`,
/// queue `q` for reactor `q`. With `in_place.rx` (and a driver in [`SOFTWARE_DRIVERS`]) each
/// queue receives into rooms of a `nic` buffer pool (see the module comment; the reactor takes
/// it with [`DpdkDatagramPort::take_nic_pool`]) and sends from its own tx pool, attaching large
/// payloads with `in_place.tx`; otherwise one ordinary pool per queue serves both. Pools are
/// named `name`-`q` (and `name`-tx-`q`). The port's MTU is raised to `mtu` (the RPC's, see
/// below). The port and pools are leaked (see the module comment).
pub fn open(
    eal: &Eal,
    port_id: u16,
    queue_count: u16,
    ip: Ipv4Addr,
    udp_port: u16,
    name: &str,
    in_place_asked: InPlace,
    mtu: u16,
) -> Result<OpenedPort, DpdkError> {
    let driver = Port::driver_name(eal, port_id)?;
    let in_place = in_place_asked.rx && SOFTWARE_DRIVERS.contains(&driver.as_str());
    let attach_pool = in_place && in_place_asked.tx;
    let attach_store = in_place && in_place_asked.tx_store;
    if in_place_asked.rx && !in_place {
        log::info!(
            "DPDK port {port_id} ({driver}): receive copies once (in-place receive is used on \
             software drivers only: untested on a NIC's DMA)"
        );
    }
    let mut rx_pools: Vec<&'static Mempool> = Vec::with_capacity(queue_count as usize);
    let mut tx_pools: Vec<&'static Mempool> = Vec::with_capacity(queue_count as usize);
    let mut rooms: Vec<Option<Rooms>> = Vec::with_capacity(queue_count as usize);
    for q in 0..queue_count {
        if in_place {
            let queue_rooms = Rooms::open(eal, &format!("{name}-{q}"), q)?;
            rx_pools.push(queue_rooms.mempool());
            rooms.push(Some(queue_rooms));
            let tx = Mempool::new(
                eal,
                &format!("{name}-tx-{q}"),
                TX_MBUFS_PER_QUEUE,
                MBUF_DATA_ROOM,
            )?;
            tx_pools.push(Box::leak(Box::new(tx)));
        } else {
            let pool = Mempool::new(eal, &format!("{name}-{q}"), MBUFS_PER_QUEUE, MBUF_DATA_ROOM)?;
            let pool: &'static Mempool = Box::leak(Box::new(pool));
            rx_pools.push(pool);
            tx_pools.push(pool);
            rooms.push(None);
        }
    }
    // The RPC's packets are sized for `mtu` (`--rpc-mtu`, jumbo by default): a port that
    // enforces its MTU (a NIC, net_tap, net_af_packet) must take that, or it drops the larger
    // frames (seen on net_tap at its default 1500 with 9000-byte packets: writes ran, 4 KiB
    // read replies and STATUS timed out). The software rings carry any frame their buffers
    // hold and may not implement the call.
    let software = SOFTWARE_DRIVERS.contains(&driver.as_str());
    let config = PortConfig {
        queue_count,
        mtu: (!software).then_some(mtu),
        ..PortConfig::default()
    };
    let port: &'static Port<'static> =
        Box::leak(Box::new(Port::start(eal, port_id, &config, &rx_pools)?));
    let mac = port.mac();
    let queues = port
        .queues()
        .into_iter()
        .zip(tx_pools)
        .zip(rooms)
        .map(|(((rx, tx), pool), rooms)| DpdkDatagramPort {
            local: Endpoint {
                mac: mac.0,
                ip,
                port: udp_port,
            },
            udp_header: UdpHeaderTemplate::new(&Endpoint {
                mac: mac.0,
                ip,
                port: udp_port,
            }),
            pool,
            rx,
            tx,
            rx_batch: Vec::with_capacity(BURST_MAX),
            attach: (attach_pool || attach_store).then(|| TxAttach::new(ATTACH_SLOTS)),
            attach_pool,
            attach_store,
            rooms,
            tx_out: Vec::with_capacity(BURST_MAX),
            tx_stuck_since: None,
            stats: PortStats::default(),
        })
        .collect();
    Ok(OpenedPort {
        queues,
        driver,
        mac,
        mtu: port.mtu(),
    })
}

impl DpdkDatagramPort {
    /// The address this queue answers for.
    pub fn local(&self) -> Endpoint {
        self.local
    }

    /// The `nic` buffer pool over this queue's rx rooms (in-place receive), for the reactor's
    /// `CorePools::attach_nic`; taken once.
    pub fn take_nic_pool(&mut self) -> Option<BufferPool> {
        self.rooms.as_mut().and_then(Rooms::take_buffers)
    }

    /// Rooms whose every lease came back: owned again, their mbufs freed to DPDK.
    fn reclaim(&mut self, pools: &mut CorePools) {
        let (Some(rooms), Some(nic)) = (self.rooms.as_mut(), pools.nic.as_mut()) else {
            return;
        };
        rooms.reclaim(nic);
        self.stats.rx_rooms_leased = rooms.leased_count() as u64;
    }

    /// The next UDP datagram to our port of the current burst (a new burst when it is used
    /// up): its frame, and where in it the UDP payload is. ARP requests are answered on the
    /// way; anything else is dropped.
    fn next_datagram(&mut self) -> Option<(Mbuf<'static>, usize, usize, Endpoint)> {
        loop {
            if self.rx_batch.is_empty() {
                if self.rx.rx_burst(&mut self.rx_batch) == 0 {
                    return None;
                }
                self.rx_batch.reverse();
            }
            let m = self.rx_batch.pop().expect("non-empty");
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
                } if target_port == self.local.port && payload_bytes <= DATAGRAM_BYTES_MAX => {
                    return Some((m, payload_offset, payload_bytes, source));
                }
                _ => self.stats.ignored += 1,
            }
        }
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

    /// Mbufs of this queue's pools (rx and tx) out of them: held by the driver, in hand,
    /// queued, or, with in-place receive, kept while ops hold leases over their rooms.
    pub fn mbufs_in_use(&self) -> u32 {
        let rx = self
            .rooms
            .as_ref()
            .map_or(0, |rooms| rooms.mempool().in_use_count());
        self.pool.in_use_count() + rx
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
        let Some((m, offset, len, source)) = self.next_datagram() else {
            return Ok(None);
        };
        assert!(
            len <= buf.len(),
            "a datagram buffer holds a maximal datagram"
        );
        buf[..len].copy_from_slice(&m.data()[offset..offset + len]);
        self.stats.rx_copies += 1;
        self.stats.rx_copied_bytes += len as u64;
        Ok(Some((len, source)))
    }

    fn recv(
        &mut self,
        pools: &mut CorePools,
        chunk: &mut Option<Buf>,
    ) -> io::Result<Received<Endpoint>> {
        if self.rooms.is_none() || pools.nic.is_none() {
            return recv_into_chunk(self, pools, chunk);
        }
        if self.rx_batch.is_empty() {
            // Rooms go back to DPDK before each burst (the driver refills its ring from the
            // mempool then), not before each datagram: the walk cost ~90 instructions a call.
            self.reclaim(pools);
        }
        let Some((m, offset, len, source)) = self.next_datagram() else {
            return Ok(Received::Empty);
        };
        let Some(rest) = len.checked_sub(PACKET_HEADER_BYTES) else {
            return Ok(Received::Runt); // the mbuf goes back to DPDK with its room
        };
        // The RPC header is copied out and the rest leased (see `Received::Datagram`).
        let mut header = [0u8; PACKET_HEADER_BYTES];
        header.copy_from_slice(&m.data()[offset..offset + PACKET_HEADER_BYTES]);
        let rooms = self.rooms.as_mut().expect("checked above");
        match rooms.lease(pools, m, offset + PACKET_HEADER_BYTES, rest) {
            Ok(payload) => {
                self.stats.rx_in_place += 1;
                self.stats.rx_rooms_leased = rooms.leased_count() as u64;
                Ok(Received::Datagram {
                    header,
                    payload,
                    peer: source,
                })
            }
            Err(m) => {
                // Not one of our rooms: copied into a chunk, as a copying port would.
                let Some(spare) = crate::udp::rx_spare(chunk, pools) else {
                    self.rx_batch.push(m); // taken again once a chunk is free
                    return Ok(Received::NoBuffer);
                };
                spare[..len].copy_from_slice(&m.data()[offset..offset + len]);
                self.stats.rx_copies += 1;
                self.stats.rx_copied_bytes += len as u64;
                let chunk = chunk.as_mut().expect("rx_spare leaves a chunk");
                let at = chunk.sealed_len();
                chunk.seal(len);
                Ok(split_datagram(pools, chunk, at, len, source))
            }
        }
    }

    fn send(
        &mut self,
        peer: &Endpoint,
        header: &[u8],
        payload: &[u8],
        tail: &[u8],
    ) -> io::Result<bool> {
        let frame = udp::udp_frame_from(self.pool, &self.udp_header, peer, header, payload, tail);
        if frame.is_some() {
            self.stats.tx_copied_bytes += (payload.len() + tail.len()) as u64;
        }
        Ok(self.push_tx(frame))
    }

    fn sends_pool_in_place(&self) -> bool {
        self.attach_pool
    }

    unsafe fn send_stored(
        &mut self,
        peer: &Endpoint,
        header: &[u8],
        payload: &[u8],
        stored: &[u8],
    ) -> io::Result<bool> {
        let last = stored.as_ptr().wrapping_add(stored.len().saturating_sub(1));
        let Some(attach) = self.attach.as_mut().filter(|_| {
            self.attach_store
                && stored.len() >= ATTACH_MIN_BYTES
                && heap::same_memory(stored.as_ptr(), last)
        }) else {
            return self.send(peer, header, payload, stored);
        };
        let mut head = [0u8; ipv4::UDP_FRAME_HEADER_BYTES];
        self.udp_header
            .build(&mut head, peer, header.len() + payload.len() + stored.len());
        // SAFETY: the caller's promise (the bytes stay as they are while `stored_in_flight`
        // counts the frame), and they lie in one segment list of the EAL's memory, which the
        // peer of the only port this is turned on for (a zero-copy memif client) maps.
        match unsafe { attach.frame_from_store(self.pool, &[&head, header, payload], stored) } {
            Some(frame) => {
                self.stats.tx_copied_bytes += payload.len() as u64;
                if self.push_tx(Some(frame)) {
                    self.stats.tx_in_place += 1;
                    self.stats.tx_from_store += 1;
                    return Ok(true);
                }
                // Refused (queue and driver full): dropped here, its slot comes back through
                // the free callback; the RPC sends it again later.
                Ok(false)
            }
            None => self.send(peer, header, payload, stored),
        }
    }

    fn holds_stored(&self) -> bool {
        self.attach
            .as_ref()
            .is_some_and(|a| a.store_in_flight() > 0)
    }

    fn stored_in_flight(&mut self, pools: &mut CorePools) -> usize {
        let Some(attach) = self.attach.as_mut() else {
            return 0;
        };
        if attach.store_in_flight() == 0 {
            return 0;
        }
        // The peer frees what it has copied out at our next burst call: make one.
        self.tx.tx_reclaim();
        attach.reap(pools);
        let in_flight = attach.store_in_flight();
        if in_flight > 0 && !self.tx.link_up() {
            // No peer reads our memory any more (a memif client never reconnects).
            return 0;
        }
        in_flight
    }

    unsafe fn send_from_pool(
        &mut self,
        pools: &mut CorePools,
        peer: &Endpoint,
        header: &[u8],
        payload: &[u8],
    ) -> io::Result<bool> {
        let Some(attach) = self
            .attach
            .as_mut()
            .filter(|_| self.attach_pool && payload.len() >= ATTACH_MIN_BYTES)
        else {
            return self.send(peer, header, payload, &[]);
        };
        // SAFETY: the caller's promise (payload inside sealed bytes of a live handle).
        let Some(lease) = (unsafe { pools.lease_bytes(payload) }) else {
            return self.send(peer, header, payload, &[]);
        };
        let mut head = [0u8; ipv4::UDP_FRAME_HEADER_BYTES];
        self.udp_header
            .build(&mut head, peer, header.len() + payload.len());
        match attach.frame(self.pool, &[&head, header], lease) {
            Ok(frame) => {
                if self.push_tx(Some(frame)) {
                    self.stats.tx_in_place += 1;
                    return Ok(true);
                }
                // Refused (queue and driver full): the frame was dropped here, its lease comes
                // back through the free callback; the RPC sends it again later.
                Ok(false)
            }
            Err(lease) => {
                pools.release_lease(lease);
                self.send(peer, header, payload, &[])
            }
        }
    }

    fn flush(&mut self, pools: &mut CorePools) {
        while !self.tx_out.is_empty() {
            if self.burst() == 0 {
                break; // the driver's ring is full: the rest go next pass
            }
        }
        if let Some(attach) = self.attach.as_mut() {
            attach.reap(pools);
            self.stats.tx_attached_held = attach.in_use() as u64;
        }
    }

    fn close(&mut self, pools: &mut CorePools) {
        self.flush(pools);
        if let (Some(rooms), Some(nic)) = (self.rooms.as_mut(), pools.nic.as_mut()) {
            rooms.release_all(nic);
        }
    }

    fn fd(&self) -> Option<RawFd> {
        None
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}
