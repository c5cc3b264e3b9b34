//! `carmine load --transport dpdk`: the same generator (`Work`) over the datagram RPC on a DPDK
//! port, for servers started with `serve --transport dpdk`.
//!
//! The EAL and the port are started once, in `open` (before the generator thread; one thread
//! only: the port has one queue). Each load client is one `RpcClient` on its own UDP port
//! (`CLIENT_PORT_BASE + client`), so the server sees distinct peers; received frames go to the
//! client their destination port names, as mbufs (responses are read in place, no copy). The
//! server's MAC address comes from ARP before the first request. The loop busy-polls the
//! queue (a NIC queue has no descriptor to sleep on).

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Mutex;

use carmine_dataplane::dgram::ipv4::{self, Endpoint, Parsed};
use carmine_dataplane::dgram::{Message, RpcClient, RpcError, SessionId, SLOTS_PER_SESSION};
use carmine_dataplane::dpdk::{self, net, Eal, Mbuf, Mempool, RxQueue, TxQueue, BURST_MAX};
use carmine_dataplane::udp::rpc_config;

use super::udp::{book, id_base, issue_requests, RequestBody};
use super::*;

/// UDP port of load client 0 (client i uses this + i).
const CLIENT_PORT_BASE: u16 = 40_000;
/// How long to ask for the server's MAC address (the link comes up on its own schedule).
const ARP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the resend timers are walked (the RPC's timeout is 50 ms).
const TIMER_TICK_NS: u64 = 1_000_000;

/// The port opened by `open`, taken by the generator thread.
struct Link {
    local: Endpoint,
    pool: &'static Mempool,
    rx: RxQueue<'static, 'static>,
    tx: TxQueue<'static, 'static>,
}

static LINK: Mutex<Option<Link>> = Mutex::new(None);

pub(super) fn validate(args: &LoadArgs) -> Result<(), String> {
    super::udp::validate(args)?;
    if args.threads != 1 {
        return Err(
            "--transport dpdk runs one generator thread (one queue): use --threads 1".into(),
        );
    }
    if args.dpdk.dpdk_args.trim().is_empty() {
        return Err("--transport dpdk needs --dpdk-args=\"...\" (EAL arguments, e.g. --no-huge --no-pci -m 256 --file-prefix load --vdev net_memif0,role=client,socket=/run/m.sock)".into());
    }
    server_endpoint(&args.target).map(|_| ())
}

fn server_endpoint(target: &str) -> Result<(Ipv4Addr, u16), String> {
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("target {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("target {target}: no address"))?;
    match addr {
        SocketAddr::V4(v4) => Ok((*v4.ip(), v4.port())),
        SocketAddr::V6(_) => Err(format!(
            "target {target}: --transport dpdk speaks IPv4 only"
        )),
    }
}

/// Starts the EAL and the port (once per process) for the generator thread to take.
pub(super) fn open(args: &LoadArgs) -> Result<(), String> {
    let eal_args: Vec<&str> = args.dpdk.dpdk_args.split_whitespace().collect();
    let eal = Eal::init(&eal_args).map_err(|e| format!("DPDK EAL ({eal_args:?}): {e}"))?;
    let port = args.dpdk.dpdk_port;
    let opened = net::open(
        &eal,
        port,
        1,
        args.dpdk.dpdk_ip,
        CLIENT_PORT_BASE,
        "load-rx",
        // The generator reads responses in their mbufs (RpcClient keeps them).
        net::InPlace {
            rx: false,
            tx: false,
            tx_store: false,
        },
        args.rpc_mtu,
    )
    .map_err(|e| format!("DPDK port {port} ({} ports found): {e}", eal.port_count()))?;
    let queue = opened.queues.into_iter().next().expect("one queue");
    let local = queue.local();
    // Scripts wait for this line before starting a server whose memif port is the client
    // side: a memif client connects once, and a server port not yet started turns it away.
    log::info!(
        "DPDK port {port} started ({}), {}: the server is resolved by ARP next",
        opened.driver,
        local.ip
    );
    let (pool, rx, tx) = queue.into_parts();
    *LINK.lock().unwrap() = Some(Link {
        local,
        pool,
        rx,
        tx,
    });
    Ok(())
}

struct DpdkClient {
    rpc: RpcClient<Endpoint, Mbuf<'static>, RequestBody>,
    sessions: Vec<SessionId>,
    slots: Slots,
    free_bodies: super::udp::BodyHome,
    scratch: Vec<u8>,
}

pub(super) struct DpdkGenerator<'a> {
    config: &'a Config,
    shared: &'a Shared,
    index: usize,
    link: Link,
    server: Endpoint,
    got: Vec<Mbuf<'static>>,
    out: Vec<Mbuf<'static>>,
    clients: Vec<DpdkClient>,
    work: Work,
    epoch: Instant,
}

/// Queues a frame; false when neither the queue nor the driver has room (or no mbuf).
fn push(
    out: &mut Vec<Mbuf<'static>>,
    tx: &mut TxQueue<'static, 'static>,
    frame: Option<Mbuf<'static>>,
) -> bool {
    if out.len() == out.capacity() {
        tx.tx_burst(out);
        if out.len() == out.capacity() {
            return false;
        }
    }
    match frame {
        Some(m) => {
            out.push(m);
            true
        }
        None => false,
    }
}

impl<'a> DpdkGenerator<'a> {
    pub(super) fn connect(
        config: &'a Config,
        shared: &'a Shared,
        plan: &ThreadPlan,
        work: Work,
    ) -> Result<Self, String> {
        let mut link = LINK
            .lock()
            .unwrap()
            .take()
            .ok_or("the DPDK port was not opened (one generator thread only)")?;
        if let Err(e) = dpdk::register_current_thread() {
            log::warn!("{e}: the generator's mbuf pool runs without a cache");
        }
        let (server_ip, server_port) = server_endpoint(&config.target)?;
        let server_mac = resolve_mac(&mut link, server_ip, shared)?;
        let server = Endpoint {
            mac: server_mac,
            ip: server_ip,
            port: server_port,
        };
        let rpc = rpc_config(config.rpc_mtu);
        let qd = config.qd as usize;
        let frame_max = config.bs as usize + 256;
        let mut clients = Vec::with_capacity(plan.clients);
        for token in 0..plan.clients {
            let mut rpc_client = RpcClient::new(rpc, id_base(plan.index, token));
            let sessions = (0..qd.div_ceil(SLOTS_PER_SESSION))
                .map(|_| {
                    rpc_client
                        .open_session(server)
                        .expect("sessions_max covers qd")
                })
                .collect();
            clients.push(DpdkClient {
                rpc: rpc_client,
                sessions,
                slots: Slots::new(config.qd),
                free_bodies: Rc::new(RefCell::new(
                    (0..qd).map(|_| Vec::with_capacity(frame_max)).collect(),
                )),
                scratch: Vec::with_capacity(frame_max),
            });
        }
        Ok(DpdkGenerator {
            config,
            shared,
            index: plan.index,
            link,
            server,
            got: Vec::with_capacity(BURST_MAX),
            out: Vec::with_capacity(BURST_MAX),
            clients,
            work,
            epoch: Instant::now(),
        })
    }

    /// Issues requests until the client's slots are full or the work has none to give.
    fn fill(&mut self, token: usize, now_ns: u64) {
        let client = &mut self.clients[token];
        issue_requests(
            &mut self.work,
            &mut client.slots,
            &client.free_bodies,
            &client.sessions,
            &mut client.rpc,
            now_ns,
        );
    }

    /// Sends the client's queued packets; returns how many.
    fn flush(&mut self, token: usize) -> usize {
        let Link {
            local, pool, tx, ..
        } = &mut self.link;
        let source = Endpoint {
            port: CLIENT_PORT_BASE + token as u16,
            ..*local
        };
        let out = &mut self.out;
        self.clients[token].rpc.flush_tx(&mut |to, head, payload| {
            push(
                out,
                tx,
                dpdk::udp::udp_frame(pool, &source, to, head, payload),
            )
        })
    }

    /// Takes a burst from the queue and books complete responses; with `timers`, also runs
    /// every client's resend timer. Returns the frames received.
    fn receive(&mut self, now_ns: u64, timers: bool) -> Result<usize, String> {
        let received = self.link.rx.rx_burst(&mut self.got);
        let local_ip = self.link.local.ip;
        let work = &mut self.work;
        let mut failure: Option<String> = None;
        for m in self.got.drain(..) {
            let Parsed::Udp {
                source,
                target_port,
                payload_offset,
                ..
            } = ipv4::parse(m.data(), local_ip)
            else {
                continue;
            };
            let Some(token) = target_port
                .checked_sub(CLIENT_PORT_BASE)
                .map(usize::from)
                .filter(|t| *t < self.clients.len())
            else {
                continue;
            };
            let DpdkClient {
                rpc,
                slots,
                scratch,
                ..
            } = &mut self.clients[token];
            rpc.receive(source, m, payload_offset, now_ns, &mut |_, _, result| {
                if failure.is_none() {
                    if let Err(e) = book(work, slots, scratch, now_ns, result) {
                        failure = Some(e);
                    }
                }
            });
        }
        for client in self.clients.iter_mut().filter(|_| timers) {
            let DpdkClient {
                rpc,
                slots,
                scratch,
                ..
            } = client;
            rpc.poll_timers(now_ns, &mut |_,
                                          _,
                                          result: Result<
                &Message<'_, Mbuf<'static>>,
                RpcError,
            >| {
                if failure.is_none() {
                    if let Err(e) = book(work, slots, scratch, now_ns, result) {
                        failure = Some(e);
                    }
                }
            });
        }
        match failure {
            Some(e) => Err(format!(
                "thread {} dpdk client to {:?}: {e}",
                self.index, self.server.ip
            )),
            None => Ok(received),
        }
    }

    /// As `Generator::run_phase`, busy-polling the queue and the resend timers.
    fn run_phase(&mut self, phase: Phase) -> Result<Duration, String> {
        self.work.begin(phase);
        let start = Instant::now();
        let deadline = (phase == Phase::Timed).then(|| start + self.config.duration);
        self.work.stopping = deadline.is_some_and(|d| d <= start);
        let mut last_progress = (start, 0u64);
        let mut last_timers_ns = 0u64;
        let mut pass = 0u64;
        // The previous pass: when it began, and whether it received or sent anything (its
        // time is then busy time: how much of the spinning CPU the work takes).
        let (mut pass_start, mut pass_busy) = (start, false);
        loop {
            pass += 1;
            if pass & 1023 == 0 {
                self.shared.check_abort()?;
            }
            let now = Instant::now();
            if pass_busy {
                self.work.stats().busy_ns += (now - pass_start).as_nanos() as u64;
            }
            pass_start = now;
            if deadline.is_some_and(|d| now >= d) {
                self.work.stopping = true;
            }
            if self.work.in_flight == 0 && (self.work.stopping || self.work.exhausted()) {
                self.publish();
                return Ok(now - start);
            }
            let done = self.work.prefill.ops + self.work.timed.ops;
            if done != last_progress.1 {
                last_progress = (now, done);
            } else if now - last_progress.0 >= REPLY_TIMEOUT {
                return Err(format!(
                    "no response from {:?} for {} s with {} requests in flight (is the server up, \
                     and was it started with this client's --rpc-mtu {}? a server that receives \
                     packets sized for another MTU refuses them with an error naming both, but \
                     a port or link may drop frames larger than its own MTU before that)",
                    self.server.ip,
                    REPLY_TIMEOUT.as_secs(),
                    self.work.in_flight,
                    self.config.rpc_mtu
                ));
            }
            // One clock read per pass (the generator spins: clock reads were 40% of its time),
            // and the resend timers walked once a millisecond, not every pass.
            let now_ns = (now - self.epoch).as_nanos() as u64;
            let timers = now_ns >= last_timers_ns + TIMER_TICK_NS;
            if timers {
                last_timers_ns = now_ns;
            }
            let mut moved = self.receive(now_ns, timers)?;
            for token in 0..self.clients.len() {
                self.fill(token, now_ns);
                moved += self.flush(token);
            }
            self.link.tx.tx_burst(&mut self.out);
            pass_busy = moved > 0;
            if pass & 63 == 0 {
                self.publish();
            }
        }
    }

    fn publish(&self) {
        self.work.publish(&self.shared.progress[self.index]);
    }
}

/// Asks for `server_ip`'s MAC address once a millisecond until it answers.
fn resolve_mac(link: &mut Link, server_ip: Ipv4Addr, shared: &Shared) -> Result<[u8; 6], String> {
    let start = Instant::now();
    let mut got = Vec::with_capacity(BURST_MAX);
    let mut out = Vec::with_capacity(BURST_MAX);
    let mut last_ask: Option<Instant> = None;
    loop {
        shared.check_abort()?;
        if start.elapsed() > ARP_TIMEOUT {
            return Err(format!(
                "no ARP reply from {server_ip} within {} s (is the server up on the other end of the port?)",
                ARP_TIMEOUT.as_secs()
            ));
        }
        if last_ask.is_none_or(|t| t.elapsed() > Duration::from_millis(1)) {
            last_ask = Some(Instant::now());
            let local = link.local;
            let ask = dpdk::udp::arp_frame(link.pool, |f| {
                ipv4::build_arp_request(f, local.mac, local.ip, server_ip)
            });
            push(&mut out, &mut link.tx, ask);
            link.tx.tx_burst(&mut out);
        }
        link.rx.rx_burst(&mut got);
        for m in got.drain(..) {
            if let Some((mac, ip)) = ipv4::parse_arp_reply(m.data(), link.local.ip) {
                if ip == server_ip {
                    return Ok(mac);
                }
            }
        }
        std::thread::yield_now();
    }
}

impl RunPhase for DpdkGenerator<'_> {
    fn run_phase(&mut self, phase: Phase) -> Result<Duration, String> {
        DpdkGenerator::run_phase(self, phase)
    }

    fn into_work(self: Box<Self>) -> Work {
        self.work
    }
}
