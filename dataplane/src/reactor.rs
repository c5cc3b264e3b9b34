//! The reactor: one pinned thread per core running one poll loop to completion.
//!
//! The loop calls `Core::poll_once`, which runs the core's pollers in a fixed order (network rx,
//! inbox, store completions, timers, network tx) and reports how much work it did. Time spent in
//! passes that did work counts as busy, the rest as idle, so `busy_ns / ops` is the CPU cost of an
//! op whatever the idle policy.
//!
//! Wall-clock busy time also counts the time the thread was runnable but preempted (another
//! process on its CPU: the load generator sharing a CPU with a reactor, a parallel build). So
//! the loop also reads the thread's own CPU clock once per publish interval and books that CPU
//! time to busy and idle passes in proportion to their wall-clock time in the interval (time
//! parked is excluded: the thread asked not to run): `busy_cpu_ns` equals `busy_ns` on a CPU
//! the reactor has alone and drops by the share of time it lost to others. It is an estimate:
//! preemption that falls mostly in busy passes is spread over idle ones too, so it can only
//! understate the correction. `cpu_ns` is the thread's CPU time, idle passes included.
//!
//! Idle policy: `Spin` never leaves user space (an appliance owns its cores). `Adaptive` spins for
//! `park_after` and then parks in the kernel (`Core::park`, an `epoll_wait` that also watches the
//! core's `Waker`), so a laptop or a CI machine is not burned by an idle daemon; a core whose
//! only wait is device I/O that wakes it (`Core::waits_on_device`) parks after
//! `DEVICE_PARK_AFTER` (20 us) instead.
//!
//! Architecture invariant: a reactor thread never blocks except in `Core::park`, and never takes a lock.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use crate::coalesce::Coalesce;
use crate::coalesce::LoadDetector;

/// How long a parked core sleeps at most before looking at its timers again.
pub const PARK_TIMEOUT_MAX: Duration = Duration::from_millis(10);
/// How long an adaptive core waiting on device I/O (`Core::waits_on_device`) polls without
/// work before it parks. Measured on a file-backed segment store (ARCHITECTURE.md, session 16;
/// 1 reactor, RFS): 4 x 32 random reads kept their IOPS (190k) and latency while the server's
/// process CPU per op fell from 4.4-4.5 us to 2.8 (5 us: 2.6); one write in flight went from
/// 2.8k to 9.2k IOPS (p50 295 -> 107 us: the journal's fsync runs in an io-wq worker on the
/// reactor's CPU, which got it only when the core parked after the 200 us default); one read
/// in flight kept 35k (5 us: 31.7k, parking between a reply and the next request).
pub const DEVICE_PARK_AFTER: Duration = Duration::from_micros(20);
/// How often a core copies its counters to where `status` can read them.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Poll forever: lowest latency, one core at 100% whatever the load.
    Spin,
    /// Poll; after `park_after` without work, sleep in the kernel until work arrives.
    Adaptive { park_after: Duration },
}

impl IdlePolicy {
    pub fn parse(text: &str, park_after: Duration) -> Result<IdlePolicy, String> {
        match text {
            "spin" => Ok(IdlePolicy::Spin),
            "adaptive" => Ok(IdlePolicy::Adaptive { park_after }),
            other => Err(format!(
                "unknown idle policy {other:?}: expected spin or adaptive"
            )),
        }
    }
}

/// What a reactor drives. Implemented by the OSD's per-core state.
pub trait Core {
    /// One pass over every poller in a fixed order. Returns the units of work done (0: idle pass).
    fn poll_once(&mut self) -> usize;
    /// Sleeps in the kernel for at most `timeout`, returning early when the network or the
    /// core's `Waker` has something. Called only after a pass found no work.
    fn park(&mut self, timeout: Duration);
    /// The longest this core may park before a timer of its own is due.
    fn park_timeout(&self) -> Duration;
    /// Copies local counters to shared ones (for `status`), outside the hot path.
    fn publish(&mut self, loop_stats: &LoopCounters);
    /// True when the core has drained everything it must finish before the thread exits.
    fn drained(&self) -> bool;
    /// Whether a coalescing pause may start now: false while the core waits on something
    /// that finishes by itself (device I/O), whose completions a pause would only delay.
    fn may_coalesce(&self) -> bool {
        true
    }
    /// Whether what the core waits for is device I/O whose completion wakes a parked core
    /// (`park` returns on it). An idle core then parks after `DEVICE_PARK_AFTER` instead of
    /// `park_after`: polling finds nothing the wake-up would not bring, and a kernel worker
    /// that completes the I/O on this CPU (io_uring's io-wq, for a file) gets the CPU.
    fn waits_on_device(&self) -> bool {
        false
    }
}

/// Loop-level counters, kept by the reactor and published by the core.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopCounters {
    /// Wall-clock time of passes that did work.
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub passes: u64,
    /// Passes that did work: ops / busy passes is how many ops a pass carries (a saturated
    /// core spreads its per-pass costs over many).
    pub busy_passes: u64,
    pub parks: u64,
    /// The thread's CPU time booked to busy passes (see the module comment).
    pub busy_cpu_ns: u64,
    /// The thread's CPU time since the loop started.
    pub cpu_ns: u64,
    /// Coalescing pauses taken, publish intervals (windows) with coalescing on, and tries of
    /// `--coalesce auto` that pausing did not pay for (see `coalesce.rs`).
    pub coalesce_pauses: u64,
    pub coalesce_windows_on: u64,
    pub coalesce_tries_failed: u64,
}

/// This thread's CPU time (user and system), in nanoseconds. One system call: the loop reads
/// it once per publish interval, never per pass.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Books the thread's CPU time over one publish interval to busy and idle passes.
#[derive(Debug)]
struct CpuBooking {
    cpu_at_start: u64,
    last_cpu: u64,
    /// Wall-clock time of busy passes, and of idle passes outside parks, this interval.
    busy_wall: u64,
    idle_wall: u64,
}

impl CpuBooking {
    fn new(cpu_now: u64) -> CpuBooking {
        CpuBooking {
            cpu_at_start: cpu_now,
            last_cpu: cpu_now,
            busy_wall: 0,
            idle_wall: 0,
        }
    }

    /// Closes the interval at `cpu_now` (the thread's CPU clock) into `counters`.
    fn close(&mut self, cpu_now: u64, counters: &mut LoopCounters) {
        let cpu = cpu_now.saturating_sub(self.last_cpu);
        let running = self.busy_wall + self.idle_wall;
        if running > 0 {
            // Never more than the wall-clock busy time: CPU time read at the interval's edges
            // may include a little of the neighbouring passes.
            let share = (u128::from(cpu) * u128::from(self.busy_wall) / u128::from(running)) as u64;
            counters.busy_cpu_ns += share.min(self.busy_wall);
        }
        counters.cpu_ns = cpu_now.saturating_sub(self.cpu_at_start);
        self.last_cpu = cpu_now;
        self.busy_wall = 0;
        self.idle_wall = 0;
    }
}

/// Lets other cores wake a parked core. The core sets `sleeping` before parking and re-checks
/// its inbox; a producer that pushed a message checks `sleeping` after the push. The SeqCst
/// fences on both sides order "store sleeping / load inbox" against "store inbox / load
/// sleeping", so either the core sees the message or the producer sees the flag (Dekker).
pub struct Waker {
    sleeping: AtomicBool,
    eventfd: OwnedFd,
    wakeups: AtomicU64,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker {
            sleeping: AtomicBool::new(false),
            eventfd,
            wakeups: AtomicU64::new(0),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Called by a producer after pushing to this core's inbox.
    pub fn wake_if_sleeping(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            self.wake();
        }
    }

    /// Makes the eventfd readable whether or not its owner sleeps (a stop request, say).
    pub fn wake(&self) {
        self.wakeups.fetch_add(1, Ordering::Relaxed);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A full counter
        // (EAGAIN) still leaves the fd readable, which is all a wakeup needs.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// Called by the owning core before its last inbox check ahead of parking.
    pub fn prepare_park(&self) {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Called by the owning core after parking (or after deciding not to park).
    pub fn finish_park(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from an eventfd we own; EAGAIN means no wakeup was pending.
        unsafe { libc::read(self.fd(), (&mut value as *mut u64).cast(), 8) };
    }

    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// Blocks until the eventfd is readable or `timeout` (rounded up to whole milliseconds)
    /// has passed, then takes its count: for a thread with no epoll set of its own that waits
    /// only for this fd (store-bench waiting for device completions, as fio waits for its
    /// io_uring's). A wakeup that came before the call returns at once. Returns whether the fd
    /// was readable (false: the timeout passed, or a signal ended the wait).
    pub fn wait(&self, timeout: Duration) -> bool {
        let millis = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        let mut pollfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, borrowed for the duration of the call; an error (EINTR)
        // only ends the wait early.
        let ready = unsafe { libc::poll(&mut pollfd, 1, millis) } > 0;
        self.finish_park();
        ready
    }
}

/// Pins the calling thread to `cpu`. Returns false when the OS refused (logged by the caller).
pub fn pin_current_thread(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

/// Runs `core` until `stop` is set and the core has drained.
pub fn run<C: Core>(core: &mut C, policy: IdlePolicy, stop: &AtomicBool) -> LoopCounters {
    run_coalesced(core, policy, Coalesce::Off, stop)
}

/// `run`, with pass coalescing (`coalesce.rs`).
pub fn run_coalesced<C: Core>(
    core: &mut C,
    policy: IdlePolicy,
    coalesce: Coalesce,
    stop: &AtomicBool,
) -> LoopCounters {
    let mut counters = LoopCounters::default();
    let mut last = Instant::now();
    let mut last_publish = last;
    // `last_publish + PUBLISH_INTERVAL`, kept so that each pass compares two instants instead
    // of subtracting them (a pass of a core polling a NIC carries a few ops; the subtraction
    // was a measurable part of its overhead under callgrind).
    let mut publish_due = last + PUBLISH_INTERVAL;
    let mut idle_since: Option<Instant> = None;
    let mut booking = CpuBooking::new(thread_cpu_ns());
    let mut detector = LoadDetector::new(coalesce).spinning(matches!(policy, IdlePolicy::Spin));
    let pause = coalesce.pause();
    loop {
        let work = core.poll_once();
        let now = Instant::now();
        let elapsed_ns = now.duration_since(last).as_nanos() as u64;
        last = now;
        counters.passes += 1;
        let mut parked = false;
        if work > 0 {
            counters.busy_ns += elapsed_ns;
            counters.busy_passes += 1;
            booking.busy_wall += elapsed_ns;
            idle_since = None;
        } else {
            counters.idle_ns += elapsed_ns;
            booking.idle_wall += elapsed_ns;
            if stop.load(Ordering::Relaxed) && core.drained() {
                break;
            }
            if let IdlePolicy::Adaptive { park_after } = policy {
                let since = *idle_since.get_or_insert(now);
                let park_after = if core.waits_on_device() {
                    park_after.min(DEVICE_PARK_AFTER)
                } else {
                    park_after
                };
                // A park of no time (a core polling a NIC queue, which nothing wakes) is none:
                // its poll of the wakeup descriptor would be a system call per idle pass, and
                // the next pass looks at everything anyway.
                let timeout = if now.duration_since(since) >= park_after {
                    core.park_timeout().min(PARK_TIMEOUT_MAX)
                } else {
                    Duration::ZERO
                };
                if !timeout.is_zero() {
                    // Publish before sleeping: a parked core must not leave a stale picture
                    // of its last busy stretch on the status board for up to a park timeout.
                    if last_publish < since {
                        booking.close(thread_cpu_ns(), &mut counters);
                        core.publish(&counters);
                        last_publish = now;
                        publish_due = now + PUBLISH_INTERVAL;
                    }
                    core.park(timeout);
                    parked = true;
                    counters.parks += 1;
                    let woke = Instant::now();
                    counters.idle_ns += woke.duration_since(last).as_nanos() as u64;
                    last = woke;
                }
            }
        }
        let may_pause = detector.is_on() && !parked && core.may_coalesce();
        if detector.after_pass(work, may_pause) {
            // Asleep is idle: the next pass's time starts when it wakes.
            std::thread::sleep(pause);
            let woke = Instant::now();
            counters.idle_ns += woke.duration_since(last).as_nanos() as u64;
            last = woke;
        }
        if last >= publish_due {
            detector.close_window(last.duration_since(last_publish).as_nanos() as u64);
            note_coalescing(&detector, &mut counters);
            booking.close(thread_cpu_ns(), &mut counters);
            core.publish(&counters);
            last_publish = last;
            publish_due = last + PUBLISH_INTERVAL;
        }
    }
    note_coalescing(&detector, &mut counters);
    booking.close(thread_cpu_ns(), &mut counters);
    core.publish(&counters);
    counters
}

fn note_coalescing(detector: &LoadDetector, counters: &mut LoopCounters) {
    counters.coalesce_pauses = detector.pauses;
    counters.coalesce_windows_on = detector.windows_on;
    counters.coalesce_tries_failed = detector.tries_failed;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wait_returns_for_a_wakeup_sent_before_it_and_takes_it() {
        let waker = Waker::new().unwrap();
        waker.wake();
        let started = Instant::now();
        assert!(
            waker.wait(Duration::from_secs(60)),
            "a pending wakeup ends the wait"
        );
        // Returned for the pending wakeup, not at the timeout.
        assert!(started.elapsed() < Duration::from_secs(60));
        assert_eq!(waker.wakeups(), 1);
        // The wakeup was taken: with none pending, a wait lasts its timeout (at least).
        let second = Instant::now();
        assert!(
            !waker.wait(Duration::from_millis(20)),
            "nothing pending: a timeout"
        );
        assert!(second.elapsed() >= Duration::from_millis(20));
    }

    struct CountingCore {
        work_left: usize,
        parks: usize,
        published: usize,
        waker: Arc<Waker>,
    }

    impl Core for CountingCore {
        fn poll_once(&mut self) -> usize {
            if self.work_left > 0 {
                self.work_left -= 1;
                1
            } else {
                0
            }
        }
        fn park(&mut self, timeout: Duration) {
            self.waker.prepare_park();
            let mut pfd = libc::pollfd {
                fd: self.waker.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack.
            unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
            self.waker.finish_park();
            self.parks += 1;
        }
        fn park_timeout(&self) -> Duration {
            Duration::from_millis(1)
        }
        fn publish(&mut self, _: &LoopCounters) {
            self.published += 1;
        }
        fn drained(&self) -> bool {
            self.work_left == 0
        }
    }

    #[test]
    fn loop_counts_busy_passes_and_stops_when_drained() {
        let stop = AtomicBool::new(true);
        let waker = Arc::new(Waker::new().unwrap());
        let mut core = CountingCore {
            work_left: 1000,
            parks: 0,
            published: 0,
            waker,
        };
        let counters = run(&mut core, IdlePolicy::Spin, &stop);
        assert_eq!(core.work_left, 0);
        assert_eq!(
            counters.passes, 1001,
            "1000 busy passes and one idle pass that sees stop"
        );
        assert_eq!(counters.busy_passes, 1000);
        assert!(counters.busy_ns > 0);
        assert!(counters.busy_cpu_ns <= counters.busy_ns);
        assert!(core.published >= 1);
        assert_eq!(core.parks, 0, "spin never parks");
    }

    #[test]
    fn coalescing_sleeps_after_light_passes_and_counts_it_idle() {
        let stop = AtomicBool::new(true);
        let waker = Arc::new(Waker::new().unwrap());
        let mut core = CountingCore {
            work_left: 5,
            parks: 0,
            published: 0,
            waker,
        };
        let pause = Duration::from_millis(2);
        let counters = run_coalesced(&mut core, IdlePolicy::Spin, Coalesce::Fixed(pause), &stop);
        assert_eq!((core.work_left, counters.passes), (0, 6));
        // A sleep lasts at least what it asks for: five light passes, five pauses, all idle.
        assert!(
            counters.idle_ns >= 5 * pause.as_nanos() as u64,
            "{counters:?}"
        );
        assert!(counters.busy_ns < counters.idle_ns, "{counters:?}");
        assert_eq!(counters.coalesce_pauses, 5);
        // Auto: five light passes are not load, so nothing pauses (an hour would show).
        let mut light = CountingCore {
            work_left: 5,
            parks: 0,
            published: 0,
            waker: core.waker.clone(),
        };
        let auto = Coalesce::Auto(Duration::from_secs(3600));
        let counters = run_coalesced(&mut light, IdlePolicy::Spin, auto, &stop);
        assert_eq!((counters.passes, counters.coalesce_pauses), (6, 0));
    }

    #[test]
    fn adaptive_policy_parks_when_idle() {
        let stop = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Waker::new().unwrap());
        let stopper = {
            let stop = stop.clone();
            let waker = waker.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                stop.store(true, Ordering::Relaxed);
                waker.wake_if_sleeping();
            })
        };
        let mut core = CountingCore {
            work_left: 0,
            parks: 0,
            published: 0,
            waker,
        };
        let policy = IdlePolicy::Adaptive {
            park_after: Duration::from_micros(100),
        };
        let counters = run(&mut core, policy, &stop);
        stopper.join().unwrap();
        assert!(core.parks > 0 && counters.parks as usize == core.parks);
        assert!(counters.idle_ns >= 40_000_000, "parked time counts as idle");
    }

    /// A core idle but for device I/O that will wake it: it stops polling after
    /// `DEVICE_PARK_AFTER`, however long `park_after` is.
    struct DeviceWaitCore {
        idle_passes: u64,
        parks: usize,
        waits_on_device: bool,
        stop: Arc<AtomicBool>,
    }

    impl Core for DeviceWaitCore {
        fn poll_once(&mut self) -> usize {
            self.idle_passes += 1;
            0
        }
        fn park(&mut self, _: Duration) {
            // The completion this core waits for: the run ends at the first park.
            self.parks += 1;
            self.stop.store(true, Ordering::Relaxed);
        }
        fn park_timeout(&self) -> Duration {
            PARK_TIMEOUT_MAX
        }
        fn publish(&mut self, _: &LoopCounters) {}
        fn drained(&self) -> bool {
            true
        }
        fn waits_on_device(&self) -> bool {
            self.waits_on_device
        }
    }

    /// Runs a `DeviceWaitCore` under a day-long `park_after` until it parks or a stopper
    /// thread ends the run after `limit`. Returns the core, the counters and the run's time.
    fn run_device_wait(
        waits_on_device: bool,
        limit: Duration,
    ) -> (DeviceWaitCore, LoopCounters, Duration) {
        let policy = IdlePolicy::Adaptive {
            park_after: Duration::from_secs(86_400),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut core = DeviceWaitCore {
            idle_passes: 0,
            parks: 0,
            waits_on_device,
            stop: stop.clone(),
        };
        let stopper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(limit);
                stop.store(true, Ordering::Relaxed);
            })
        };
        let started = Instant::now();
        let counters = run(&mut core, policy, &stop);
        let took = started.elapsed();
        drop(stopper); // Once the core parked, left to set a flag nobody reads any more.
        (core, counters, took)
    }

    #[test]
    fn adaptive_policy_parks_soon_while_waiting_on_the_device() {
        let (core, counters, took) = run_device_wait(true, Duration::from_secs(2));
        assert_eq!(
            (core.parks, counters.parks),
            (1, 1),
            "parked after DEVICE_PARK_AFTER, not after park_after"
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
        // Without device I/O the same core polls on past DEVICE_PARK_AFTER until the stopper
        // ends the run, with no park.
        let (core, counters, _) = run_device_wait(false, Duration::from_millis(50));
        assert_eq!((core.parks, counters.parks), (0, 0), "{counters:?}");
        assert!(counters.idle_ns >= 40_000_000 && core.idle_passes > 0);
    }

    /// A core nothing can wake (it polls a NIC queue): its park timeout is zero.
    struct UnwakeableCore {
        idle_passes_left: usize,
        parks: usize,
    }

    impl Core for UnwakeableCore {
        fn poll_once(&mut self) -> usize {
            self.idle_passes_left = self.idle_passes_left.saturating_sub(1);
            0
        }
        fn park(&mut self, _: Duration) {
            self.parks += 1;
        }
        fn park_timeout(&self) -> Duration {
            Duration::ZERO
        }
        fn publish(&mut self, _: &LoopCounters) {}
        fn drained(&self) -> bool {
            self.idle_passes_left == 0
        }
    }

    #[test]
    fn adaptive_policy_does_not_park_for_no_time() {
        let stop = AtomicBool::new(true);
        let mut core = UnwakeableCore {
            idle_passes_left: 20_000,
            parks: 0,
        };
        let policy = IdlePolicy::Adaptive {
            park_after: Duration::ZERO,
        };
        let counters = run(&mut core, policy, &stop);
        assert_eq!(counters.passes, 20_000);
        assert_eq!(
            (core.parks, counters.parks),
            (0, 0),
            "a zero park timeout spins on instead of parking"
        );
    }

    #[test]
    fn cpu_booking_splits_cpu_by_wall_share_and_never_exceeds_busy_wall() {
        let mut counters = LoopCounters::default();
        let mut booking = CpuBooking::new(1_000);
        // 3 ms busy and 1 ms idle on the wall clock, but only 2 ms of CPU: the thread lost
        // half of its time to others, busy passes are booked 1.5 ms.
        booking.busy_wall = 3_000_000;
        booking.idle_wall = 1_000_000;
        booking.close(1_000 + 2_000_000, &mut counters);
        assert_eq!(counters.busy_cpu_ns, 1_500_000);
        assert_eq!(counters.cpu_ns, 2_000_000);
        // More CPU than wall time (clock edges): capped at the busy wall time.
        booking.busy_wall = 1_000_000;
        booking.close(1_000 + 2_000_000 + 1_500_000, &mut counters);
        assert_eq!(counters.busy_cpu_ns, 2_500_000);
        // An interval that only parked books nothing.
        booking.close(1_000 + 3_600_000, &mut counters);
        assert_eq!(counters.busy_cpu_ns, 2_500_000);
        assert_eq!(counters.cpu_ns, 3_600_000);
    }

    #[test]
    fn thread_cpu_clock_advances_with_work() {
        let before = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu_ns() > before, "{x}");
    }

    #[test]
    fn waker_only_signals_a_sleeping_core() {
        let waker = Waker::new().unwrap();
        waker.wake_if_sleeping();
        assert_eq!(waker.wakeups(), 0);
        waker.prepare_park();
        waker.wake_if_sleeping();
        assert_eq!(waker.wakeups(), 1);
        waker.finish_park();
        assert!(IdlePolicy::parse("spin", Duration::ZERO).is_ok());
        assert!(IdlePolicy::parse("lazy", Duration::ZERO).is_err());
    }
}
