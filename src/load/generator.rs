//! The generator thread: connect, prefill, the timed run, and the rendezvous between threads.

use super::*;

pub(super) const EPOLL_READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

pub(super) struct Epoll {
    pub(super) fd: OwnedFd,
}

impl Epoll {
    pub(super) fn new() -> Result<Epoll, String> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn control(&self, op: libc::c_int, fd: RawFd, events: u32, token: usize) -> Result<(), String> {
        let mut event = libc::epoll_event {
            events,
            u64: token as u64,
        };
        // SAFETY: both descriptors are open for the duration of the call and `event` is a valid,
        // initialized epoll_event that the kernel only reads.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) };
        if rc < 0 {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    pub(super) fn add(&self, fd: RawFd, events: u32, token: usize) -> Result<(), String> {
        self.control(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub(super) fn modify(&self, fd: RawFd, events: u32, token: usize) -> Result<(), String> {
        self.control(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Waits for events; returns how many were stored (0 on timeout or signal).
    pub(super) fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout: Duration,
    ) -> Result<usize, String> {
        let timeout_ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let capacity = events.len().min(i32::MAX as usize) as i32;
        // SAFETY: `events` is a valid, writable buffer of `capacity` epoll_event structs for the
        // duration of the call; the kernel writes at most `capacity` of them.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                capacity,
                timeout_ms,
            )
        };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(format!("epoll_wait: {error}"));
        }
        Ok(n as usize)
    }
}

pub(super) struct ThreadOutcome {
    pub(super) timed: Stats,
    pub(super) prefill: Stats,
    /// From the start of the timed run to its last reply.
    pub(super) elapsed: Duration,
    pub(super) routed_connections: u32,
}

pub(super) fn thread_main(
    config: &Arc<Config>,
    shared: &Shared,
    prefix: &str,
    plan: ThreadPlan,
) -> Result<ThreadOutcome, String> {
    let mut guard = AbortGuard {
        shared,
        armed: true,
    };
    if let Some(cpu) = plan.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            return Err(format!(
                "could not pin generator thread {} to CPU {cpu}",
                plan.index
            ));
        }
    }
    let names = plan
        .objects
        .iter()
        .map(|index| object_name(prefix, *index))
        .collect();
    let work = Work::new(config.clone(), plan.index, names);
    let mut generator: Box<dyn RunPhase + '_> = match config.transport {
        Transport::Udp => Box::new(udp::UdpGenerator::connect(config, shared, &plan, work)?),
        #[cfg(feature = "dpdk")]
        Transport::Dpdk => Box::new(dpdk::DpdkGenerator::connect(config, shared, &plan, work)?),
        _ => Box::new(Generator::connect(config, shared, &plan, work)?),
    };
    shared.rendezvous.wait(shared)?; // everyone connected: a refused connection fails the run early
    if config.prefill {
        if plan.index == 0 {
            shared.phase.store(PHASE_PREFILL, Ordering::Relaxed);
        }
        generator.run_phase(Phase::Prefill)?;
        shared.rendezvous.wait(shared)?; // the timed run starts only on fully written objects
    }
    if plan.index == 0 {
        let _ = shared.timed_start.set(Instant::now());
        shared.phase.store(PHASE_TIMED, Ordering::Release);
    }
    let elapsed = generator.run_phase(Phase::Timed)?;
    guard.armed = false;
    let Work {
        timed,
        prefill,
        routed_connections,
        ..
    } = generator.into_work();
    Ok(ThreadOutcome {
        timed,
        prefill,
        elapsed,
        routed_connections,
    })
}

/// Asks a fresh connection which server core owns it (--route). None: the server has no HELLO
/// (classic mode, or an older server).
pub(super) fn hello(
    stream: &mut TcpStream,
    target: &str,
) -> Result<Option<wire::HelloReply>, String> {
    let reply = client::call(stream, Opcode::Hello, b"", &[])
        .map_err(|e| format!("--route: HELLO to {target}: {e}"))?;
    if reply.status == Status::UnknownOpcode as u32 {
        return Ok(None);
    }
    if reply.status != Status::Ok as u32 {
        return Err(format!(
            "--route: HELLO to {target}: server answered {}",
            reply.status_name()
        ));
    }
    wire::HelloReply::decode(&reply.payload)
        .map(Some)
        .map_err(|e| format!("--route: HELLO to {target}: {e}"))
}

/// The server's placement, when every connection answered HELLO and they agree.
fn routing_placement(hellos: &[Option<wire::HelloReply>], thread: usize) -> Option<Placement> {
    let first = hellos.first()?;
    if hellos.iter().any(Option::is_none) {
        log::info!("thread {thread}: --route: the server does not answer HELLO (classic mode?): not routed");
        return None;
    }
    let first = first.expect("checked: every connection answered");
    if hellos
        .iter()
        .flatten()
        .any(|h| (h.cores, h.pg_count) != (first.cores, first.pg_count))
    {
        log::warn!(
            "thread {thread}: --route: connections disagree on the server's placement: not routed"
        );
        return None;
    }
    let mode = match first.pg_count {
        Some(pg_count) => PlacementMode::Pg { pg_count },
        None => PlacementMode::Flex,
    };
    Some(Placement::new(mode, first.cores as usize))
}

/// What a generator thread drives, whatever the transport.
pub(super) trait RunPhase {
    /// Runs one phase to completion (see `Generator::run_phase`); returns its length.
    fn run_phase(&mut self, phase: Phase) -> Result<Duration, String>;
    fn into_work(self: Box<Self>) -> Work;
}

impl RunPhase for Generator<'_> {
    fn run_phase(&mut self, phase: Phase) -> Result<Duration, String> {
        Generator::run_phase(self, phase)
    }

    fn into_work(self: Box<Self>) -> Work {
        self.work
    }
}

pub(super) struct Generator<'a> {
    pub(super) config: &'a Config,
    pub(super) shared: &'a Shared,
    pub(super) index: usize,
    pub(super) epoll: Epoll,
    conns: Vec<Conn>,
    pub(super) work: Work,
    /// Time base of send and receive stamps.
    pub(super) epoch: Instant,
}

impl<'a> Generator<'a> {
    pub(super) fn connect(
        config: &'a Config,
        shared: &'a Shared,
        plan: &ThreadPlan,
        work: Work,
    ) -> Result<Self, String> {
        let (index, clients) = (plan.index, plan.clients);
        let epoll = Epoll::new()?;
        let mut conns = Vec::with_capacity(clients);
        let mut hellos = Vec::with_capacity(clients);
        for token in 0..clients {
            let mut stream = client::connect(&config.target)?;
            if config.route {
                hellos.push(hello(&mut stream, &config.target)?);
            }
            stream
                .set_nonblocking(true)
                .map_err(|e| format!("connect {}: {}", config.target, client::io_reason(&e)))?;
            epoll.add(stream.as_raw_fd(), EPOLL_READ, token)?;
            conns.push(Conn {
                stream,
                rx: RxBuf::new(),
                tx: Vec::with_capacity(config.qd as usize * (config.bs as usize + 128)),
                tx_sent: 0,
                slots: Slots::new(config.qd),
                unstamped: Vec::with_capacity(config.qd as usize),
                want_write: false,
                starved: false,
                route: None,
            });
        }
        let mut work = work;
        if let Some(placement) = routing_placement(&hellos, index) {
            let cores: Vec<usize> = hellos.iter().flatten().map(|h| h.core as usize).collect();
            if work.route(&placement, &cores) {
                for (conn, core) in conns.iter_mut().zip(cores) {
                    conn.route = Some(core);
                }
                work.routed_connections = conns.len() as u32;
                log::info!(
                    "thread {index}: routed: connection cores {:?} of {}",
                    conns.iter().map(|c| c.route).collect::<Vec<_>>(),
                    placement.cores
                );
            }
        }
        Ok(Generator {
            config,
            shared,
            index,
            epoll,
            conns,
            work,
            epoch: Instant::now(),
        })
    }

    /// Runs one phase to completion: until every block is written (prefill) or until the deadline
    /// has passed and every request in flight has been answered (timed). Returns its length.
    pub(super) fn run_phase(&mut self, phase: Phase) -> Result<Duration, String> {
        self.work.begin(phase);
        let start = Instant::now();
        let deadline = (phase == Phase::Timed).then(|| start + self.config.duration);
        self.work.stopping = deadline.is_some_and(|d| d <= start);
        for token in 0..self.conns.len() {
            self.fill_and_flush(token)?;
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        let mut last_event = start;
        loop {
            self.shared.check_abort()?;
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                self.work.stopping = true;
            }
            if self.work.in_flight == 0 && (self.work.stopping || self.work.exhausted()) {
                self.publish();
                return Ok(now - start);
            }
            if now - last_event >= REPLY_TIMEOUT {
                let (target, in_flight) = (&self.config.target, self.work.in_flight);
                return Err(format!(
                    "no reply from {target} for {} s with {in_flight} requests in flight",
                    REPLY_TIMEOUT.as_secs()
                ));
            }
            let timeout = match deadline {
                Some(d) if !self.work.stopping => POLL_INTERVAL.min(d - now),
                _ => POLL_INTERVAL,
            };
            let ready = self.epoll.wait(&mut events, timeout)?;
            for event in &events[..ready] {
                let (token, flags) = (event.u64 as usize, event.events);
                self.on_event(token, flags)?;
            }
            if ready > 0 {
                last_event = Instant::now();
            }
            self.refill_starved()?;
            self.publish();
        }
    }

    fn on_event(&mut self, token: usize, flags: u32) -> Result<(), String> {
        let readable = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32;
        if flags & readable != 0 {
            let conn = &mut self.conns[token];
            conn.receive(&mut self.work, self.epoch)
                .map_err(|e| self.conn_error(token, e))?;
        }
        self.fill_and_flush(token)
    }

    fn fill_and_flush(&mut self, token: usize) -> Result<(), String> {
        let conn = &mut self.conns[token];
        conn.fill(&mut self.work);
        conn.flush(self.epoch, &self.epoll, token)
            .map_err(|e| self.conn_error(token, e))
    }

    /// Connections that found every block in flight get another chance once replies freed some.
    fn refill_starved(&mut self) -> Result<(), String> {
        for token in 0..self.conns.len() {
            if self.conns[token].starved {
                self.fill_and_flush(token)?;
            }
        }
        Ok(())
    }

    fn conn_error(&self, token: usize, error: String) -> String {
        format!(
            "thread {} connection {token} to {}: {error}",
            self.index, self.config.target
        )
    }

    pub(super) fn publish(&self) {
        self.work.publish(&self.shared.progress[self.index]);
    }
}

/// A barrier that an aborting thread can break, so the others return instead of waiting forever.
pub(super) struct Rendezvous {
    parties: usize,
    /// (arrived, generation)
    pub(super) state: Mutex<(usize, u64)>,
    wake: Condvar,
}

impl Rendezvous {
    pub(super) fn new(parties: usize) -> Rendezvous {
        Rendezvous {
            parties,
            state: Mutex::new((0, 0)),
            wake: Condvar::new(),
        }
    }

    pub(super) fn wait(&self, shared: &Shared) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        shared.check_abort()?;
        let generation = state.1;
        state.0 += 1;
        if state.0 == self.parties {
            *state = (0, generation + 1);
            self.wake.notify_all();
            return Ok(());
        }
        while state.1 == generation {
            state = self
                .wake
                .wait_timeout(state, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            shared.check_abort()?;
        }
        Ok(())
    }

    pub(super) fn wake_all(&self) {
        let _state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }
}
