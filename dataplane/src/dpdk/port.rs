//! An ethernet port: configured with one rx and one tx queue per reactor, started, and split
//! into per-queue handles that each reactor drives with bursts into its own arrays.

use super::{sys, DpdkError, Eal, Mbuf, Mempool};
use std::cell::Cell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

/// Most packets one burst call moves. DPDK drivers are tuned for bursts of 32; 64 covers a
/// poll pass's worth without making one reactor pass long.
pub const BURST_MAX: usize = 64;

/// Descriptors per rx and per tx queue unless configured otherwise: enough for a burst-sized
/// backlog at 10 GbE line rate between two polls, small enough to stay cache-resident.
pub const QUEUE_DESCRIPTORS_DEFAULT: u16 = 1024;

/// How to configure a port.
#[derive(Debug, Clone)]
pub struct PortConfig {
    /// rx/tx queue pairs: one per reactor. More than one turns on RSS (IPv4/UDP hash).
    pub queue_count: u16,
    /// Descriptors per rx queue.
    pub rx_descriptors: u16,
    /// Descriptors per tx queue.
    pub tx_descriptors: u16,
    /// MTU to set (jumbo frames when the port allows); `None` keeps the port's default.
    pub mtu: Option<u16>,
    /// Receive frames addressed to any MAC (needed on memif/tap/af_packet test setups).
    pub promiscuous: bool,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            queue_count: 1,
            rx_descriptors: QUEUE_DESCRIPTORS_DEFAULT,
            tx_descriptors: QUEUE_DESCRIPTORS_DEFAULT,
            mtu: None,
            promiscuous: false,
        }
    }
}

/// A 6-byte ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

/// A started port. Stopped and closed on drop; its queue handles borrow it, so they go first.
#[derive(Debug)]
pub struct Port<'pool> {
    id: u16,
    queue_count: u16,
    /// Queue handles are handed out once (two handles on one queue would race in the driver).
    queues_taken: Cell<bool>,
    mac: MacAddr,
    mtu: u16,
    /// Invariant in `'pool`: frames given to tx must come from pools that outlive the port
    /// (the driver may hold them until close), and covariance would let `'pool` shrink.
    _pools: PhantomData<fn(&'pool Mempool) -> &'pool Mempool>,
}

/// The receive side of one queue; owned by one reactor. Frames come out as `Mbuf<'pool>`:
/// they may outlive the port, not their pool.
#[derive(Debug)]
pub struct RxQueue<'port, 'pool> {
    port: u16,
    queue: u16,
    _port: PhantomData<&'port Port<'pool>>,
}

/// The transmit side of one queue; owned by one reactor. Takes only `Mbuf<'pool>`: a frame in
/// the driver's tx ring is freed at the latest when the port closes, so its pool must outlive
/// the port. A pool made after the port is refused at compile time:
///
/// ```compile_fail
/// use carmine_dataplane::dpdk::{Eal, Mempool, Port, PortConfig};
/// fn send_from_short_pool(eal: &Eal, rx_pool: &Mempool) {
///     let port = Port::start(eal, 0, &PortConfig::default(), &[rx_pool]).unwrap();
///     let queues = port.queues();
///     let short = Mempool::new(eal, "short", 64, 2176).unwrap();
///     let mut frames = vec![short.alloc().unwrap()];
///     let (_, mut tx) = queues.into_iter().next().unwrap();
///     tx.tx_burst(&mut frames);
/// }
/// ```
#[derive(Debug)]
pub struct TxQueue<'port, 'pool> {
    port: u16,
    queue: u16,
    _port: PhantomData<&'port Port<'pool>>,
}

// A queue handle may move to the reactor thread that will own it: DPDK asks that one thread at
// a time use a queue, not a particular thread, and `&mut self` on the burst calls keeps it so.
// SAFETY: the handles hold only ids; exclusive use follows from `&mut self` and `Port::queues`
// handing each queue out once.
unsafe impl Send for RxQueue<'_, '_> {}
// SAFETY: as for RxQueue.
unsafe impl Send for TxQueue<'_, '_> {}

fn check(call: &'static str, rc: i32) -> Result<(), DpdkError> {
    if rc < 0 {
        Err(DpdkError::from_rc(call, rc))
    } else {
        Ok(())
    }
}

impl<'pool> Port<'pool> {
    /// Configures port `id` with `config.queue_count` queue pairs, rx queue `i` filling from
    /// `rx_pools[i]` (one pool per reactor: buffers stay on their core), and starts it.
    pub fn start(
        eal: &Eal,
        id: u16,
        config: &PortConfig,
        rx_pools: &[&'pool Mempool],
    ) -> Result<Port<'pool>, DpdkError> {
        assert!(config.queue_count >= 1);
        assert_eq!(
            rx_pools.len(),
            config.queue_count as usize,
            "one rx pool per queue"
        );
        if id >= eal.port_count() {
            return Err(DpdkError {
                call: "Port::start (no such port)",
                code: libc::ENODEV,
            });
        }
        let info = Self::info(id)?;
        if config.queue_count > info.max_rx_queues || config.queue_count > info.max_tx_queues {
            return Err(DpdkError {
                call: "Port::start (port has fewer queues than reactors)",
                code: libc::EINVAL,
            });
        }
        let mut conf = sys::rte_eth_conf::default();
        if config.queue_count > 1 {
            conf.rxmode.mq_mode = sys::RTE_ETH_MQ_RX_RSS;
            // Hash what the port can of IPv4/UDP so clients spread over reactors.
            // SAFETY: returns a constant (RTE_BIT64 macros spelled out in shim.c).
            let wanted = unsafe { sys::carmine_rss_ipv4_udp() };
            conf.rx_adv_conf.rss_conf.rss_hf = wanted & info.flow_type_rss_offloads;
        }
        // SAFETY: EAL running; id < port count; conf is a valid, fully initialised struct that
        // DPDK copies.
        let rc = unsafe {
            sys::rte_eth_dev_configure(id, config.queue_count, config.queue_count, &conf)
        };
        check("rte_eth_dev_configure", rc)?;
        if let Some(mtu) = config.mtu {
            // SAFETY: configured port, plain integer argument.
            let rc = unsafe { sys::rte_eth_dev_set_mtu(id, mtu) };
            if rc < 0 {
                // Not fatal: some drivers report a smaller limit than they carry (net_af_packet
                // says 1518 and sends and receives frames up to its framesz). The log says what
                // to expect; the port's real MTU is read back below and shown at start.
                log::warn!(
                    "DPDK port {id}: the driver refuses MTU {mtu} ({}): frames over its MTU \
                     may be dropped (net_af_packet: give framesz=9216,blocksz=36864)",
                    DpdkError::from_rc("rte_eth_dev_set_mtu", rc)
                );
            }
        }
        // SAFETY: plain query on a valid port id.
        let socket = unsafe { sys::rte_eth_dev_socket_id(id) };
        let socket = if socket < 0 {
            sys::SOCKET_ID_ANY
        } else {
            socket
        } as u32;
        for (q, pool) in rx_pools.iter().enumerate() {
            // SAFETY: configured port, q < queue_count; NULL rxconf means the driver's defaults;
            // the pool outlives the port ('pool), as the queue refills from it until close.
            let rc = unsafe {
                sys::rte_eth_rx_queue_setup(
                    id,
                    q as u16,
                    config.rx_descriptors,
                    socket,
                    std::ptr::null(),
                    pool.as_ptr(),
                )
            };
            check("rte_eth_rx_queue_setup", rc)?;
            // SAFETY: as above; NULL txconf means the driver's defaults.
            let rc = unsafe {
                sys::rte_eth_tx_queue_setup(
                    id,
                    q as u16,
                    config.tx_descriptors,
                    socket,
                    std::ptr::null(),
                )
            };
            check("rte_eth_tx_queue_setup", rc)?;
        }
        if config.promiscuous {
            // SAFETY: configured port. Some vdevs do not support it; that is not an error here.
            let _ = unsafe { sys::rte_eth_promiscuous_enable(id) };
        }
        // SAFETY: every queue is set up.
        check("rte_eth_dev_start", unsafe { sys::rte_eth_dev_start(id) })?;
        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: valid port; mac is a valid out-pointer.
        check("rte_eth_macaddr_get", unsafe {
            sys::rte_eth_macaddr_get(id, &mut mac)
        })?;
        let mut mtu = 0u16;
        // SAFETY: valid port; mtu is a valid out-pointer.
        check("rte_eth_dev_get_mtu", unsafe {
            sys::rte_eth_dev_get_mtu(id, &mut mtu)
        })?;
        Ok(Port {
            id,
            queue_count: config.queue_count,
            queues_taken: Cell::new(false),
            mac: MacAddr(mac.addr_bytes),
            mtu,
            _pools: PhantomData,
        })
    }

    fn info(id: u16) -> Result<sys::rte_eth_dev_info, DpdkError> {
        let mut info = MaybeUninit::<sys::rte_eth_dev_info>::zeroed();
        // SAFETY: valid port id (checked by caller); info is a valid out-pointer DPDK fills.
        check("rte_eth_dev_info_get", unsafe {
            sys::rte_eth_dev_info_get(id, info.as_mut_ptr())
        })?;
        // SAFETY: zero-initialised plain C struct, filled by DPDK on success.
        Ok(unsafe { info.assume_init() })
    }

    /// How many rx/tx queue pairs port `id` has, and whether it can spread IPv4/UDP flows over
    /// them by RSS (without it, queues other than 0 would see only what a peer chooses to send
    /// there: a server then runs one queue).
    pub fn queue_capabilities(eal: &Eal, id: u16) -> Result<(u16, bool), DpdkError> {
        if id >= eal.port_count() {
            return Err(DpdkError {
                call: "Port::queue_capabilities (no such port)",
                code: libc::ENODEV,
            });
        }
        let info = Self::info(id)?;
        // SAFETY: returns a constant (RTE_BIT64 macros spelled out in shim.c).
        let wanted = unsafe { sys::carmine_rss_ipv4_udp() };
        Ok((
            info.max_rx_queues.min(info.max_tx_queues),
            info.flow_type_rss_offloads & wanted != 0,
        ))
    }

    /// The name of port `id`'s driver (`net_memif`, `net_ring`, `net_ixgbe`, ...).
    pub fn driver_name(eal: &Eal, id: u16) -> Result<String, DpdkError> {
        if id >= eal.port_count() {
            return Err(DpdkError {
                call: "Port::driver_name (no such port)",
                code: libc::ENODEV,
            });
        }
        let info = Self::info(id)?;
        if info.driver_name.is_null() {
            return Ok(String::new());
        }
        // SAFETY: DPDK points driver_name at the driver's static NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(info.driver_name) };
        Ok(name.to_string_lossy().into_owned())
    }

    /// The port's id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The port's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The port's MTU (bytes of IP packet per frame).
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Hands out every queue pair once: element `i` is queue `i`, for reactor `i`.
    /// Panics on a second call (two handles on one queue would race inside the driver).
    pub fn queues(&self) -> Vec<(RxQueue<'_, 'pool>, TxQueue<'_, 'pool>)> {
        assert!(
            !self.queues_taken.replace(true),
            "queues are handed out once"
        );
        (0..self.queue_count)
            .map(|q| {
                (
                    RxQueue {
                        port: self.id,
                        queue: q,
                        _port: PhantomData,
                    },
                    TxQueue {
                        port: self.id,
                        queue: q,
                        _port: PhantomData,
                    },
                )
            })
            .collect()
    }

    /// Frames received and sent, and drops (no rx buffer or queue full), since start.
    pub fn stats(&self) -> Result<PortStats, DpdkError> {
        let mut s = sys::rte_eth_stats::default();
        // SAFETY: valid port, valid out-pointer.
        check("rte_eth_stats_get", unsafe {
            sys::rte_eth_stats_get(self.id, &mut s)
        })?;
        Ok(PortStats {
            rx_frames: s.ipackets,
            tx_frames: s.opackets,
            rx_missed: s.imissed,
            rx_no_buffer: s.rx_nombuf,
        })
    }
}

/// A port's counters (`rte_eth_stats_get`).
#[derive(Debug, Clone, Copy, Default)]
pub struct PortStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Frames the port dropped because the rx queue was full.
    pub rx_missed: u64,
    /// Receive buffer allocation failures.
    pub rx_no_buffer: u64,
}

impl Drop for Port<'_> {
    fn drop(&mut self) {
        // SAFETY: queue handles borrow self, so none is in use; stop then close is DPDK's order.
        unsafe {
            sys::rte_eth_dev_stop(self.id);
            sys::rte_eth_dev_close(self.id);
        }
    }
}

impl<'pool> RxQueue<'_, 'pool> {
    /// Receives up to `min(BURST_MAX, spare capacity)` frames, appending them to `out`.
    /// Never allocates: give `out` its capacity at start-up. Returns how many arrived.
    pub fn rx_burst(&mut self, out: &mut Vec<Mbuf<'pool>>) -> usize {
        let room = (out.capacity() - out.len()).min(BURST_MAX);
        if room == 0 {
            return 0;
        }
        let spare = out.spare_capacity_mut();
        // `Mbuf` is repr(transparent) over NonNull<rte_mbuf>, the layout of `*mut rte_mbuf`.
        let slots = spare.as_mut_ptr() as *mut *mut sys::rte_mbuf;
        // SAFETY: slots points at `room` writable pointer-sized slots; &mut self makes this
        // thread the queue's only poller, as DPDK requires.
        let n =
            unsafe { sys::rte_eth_rx_burst(self.port, self.queue, slots, room as u16) } as usize;
        debug_assert!(n <= room);
        // SAFETY: the driver wrote n non-null mbufs, each now owned by us, into those slots.
        unsafe { out.set_len(out.len() + n) };
        n
    }

    /// The queue index (= reactor index).
    pub fn index(&self) -> u16 {
        self.queue
    }
}

impl<'pool> TxQueue<'_, 'pool> {
    /// Lets the driver free what its peer or device is done with, sending nothing: drivers
    /// that free sent frames lazily (memif) do it at the start of every burst call.
    pub fn tx_reclaim(&mut self) {
        // SAFETY: a burst of zero frames (the array is never read); &mut self makes this
        // thread the queue's only user.
        unsafe { sys::rte_eth_tx_burst(self.port, self.queue, std::ptr::null_mut(), 0) };
    }

    /// Whether the port's link is up now (memif: connected to its peer).
    pub fn link_up(&self) -> bool {
        let mut link = sys::rte_eth_link::default();
        // SAFETY: the port exists (the queue borrows it); the call fills `link` and does not
        // wait.
        let rc = unsafe { sys::rte_eth_link_get_nowait(self.port, &mut link) };
        rc == 0 && link.link_status() != 0
    }

    /// Sends frames from the front of `frames` (at most `BURST_MAX`); the sent ones leave the
    /// vector (the driver frees them once on the wire), the rest stay, in order, for the next
    /// call. Returns how many were sent. Never allocates.
    pub fn tx_burst(&mut self, frames: &mut Vec<Mbuf<'pool>>) -> usize {
        let count = frames.len().min(BURST_MAX);
        if count == 0 {
            return 0;
        }
        let base = frames.as_mut_ptr() as *mut *mut sys::rte_mbuf;
        // SAFETY: base points at `count` owned mbufs (repr(transparent)); &mut self makes this
        // thread the queue's only user. The driver takes ownership of the first `sent`.
        let sent =
            unsafe { sys::rte_eth_tx_burst(self.port, self.queue, base, count as u16) } as usize;
        debug_assert!(sent <= count);
        let len = frames.len();
        // SAFETY: the first `sent` elements now belong to the driver: overwrite them by moving
        // the rest down (ptr::copy handles overlap) and shorten, without dropping any.
        unsafe {
            std::ptr::copy(frames.as_ptr().add(sent), frames.as_mut_ptr(), len - sent);
            frames.set_len(len - sent);
        }
        sent
    }

    /// The queue index (= reactor index).
    pub fn index(&self) -> u16 {
        self.queue
    }
}
