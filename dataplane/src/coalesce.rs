//! Pass coalescing (interrupt moderation for a polling loop) and the load detector that turns
//! it on by itself.
//!
//! A core faster than its clients runs about one pass per request, and every pass costs an
//! `epoll_wait`, a `recv` and a `writev` per connection, plus an `epoll_wait` per idle pass in
//! between. Sleeping a short `pause` after each light pass (idle ones included) lets requests
//! and replies accumulate, so that each system call serves several ops: NBD, 4 KiB, 4
//! connections x 32 in flight, from 3.0-3.3 system calls and 5.1-5.7 us of CPU per request to
//! 0.27 and 2.5 us. The price is up to `pause` (plus the kernel's timer slack) of added latency
//! per pass, which a client with one request in flight would pay on every request.
//!
//! `Coalesce::Auto` (the default) pauses only while pausing pays. A per-pass signal cannot tell:
//! when the server outruns its clients, passes with one request and idle passes alternate at
//! any queue depth (a streak of working passes was tried and fires at queue depth 1 too). So
//! the detector *tries*: once a window (the loop's 1 ms publish tick) shows load, the next
//! window pauses, and the try is judged by what the passes right after pauses found, against
//! a busy pass of the window that started it.
//! - At least `BATCH_GAIN` times that and `BATCH_MIN` units, or `BATCH_FULL` units whatever
//!   the gain: pausing stays on. Comparing with the core's own passes needs no idea of how many
//!   units a request is (about four for NBD, two for an OSD request). The `BATCH_MIN` floor is
//!   there because a request's work can be split over two passes: at queue depth 1, NBD passes
//!   of two units and pauses that brought back one whole request (four) looked like a gain.
//! - Less (one request per pause: a client waiting for each reply): off, for a hold-off that
//!   doubles with every failed try up to about a second, so a queue-depth-1 client meets one
//!   paused window a second at most.
//! - Too few pauses to judge: the state stays, but `QUIET_MAX` windows in a row without load
//!   turn it off (one was too few: clients that take a burst of replies and think for a
//!   millisecond turned it off in a third of the windows of a 4 x 32 NBD run, and it came back
//!   a window late each time).

use std::time::Duration;

/// How a reactor coalesces passes (`serve --coalesce off|auto|PAUSE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coalesce {
    /// Never pause.
    Off,
    /// Pause after every pass with fewer than `BELOW` units of work (idle passes too).
    Fixed(Duration),
    /// Pause like `Fixed` while the load detector says pausing brings back batches.
    Auto(Duration),
}

impl Coalesce {
    /// Passes with this much work or more never pause (a 4 KiB NBD request is about four
    /// units: its read, dispatch, execution and reply; an OSD request about two).
    pub const BELOW: usize = 64;
    /// The pause `auto` uses: the value measured with `--coalesce 20us` (see ARCHITECTURE.md).
    pub const AUTO_PAUSE: Duration = Duration::from_micros(20);

    /// `off`, `auto`, or a pause such as `20us` (`0us` is `off`).
    pub fn parse(
        text: &str,
        parse_duration: impl Fn(&str) -> Result<Duration, String>,
    ) -> Result<Coalesce, String> {
        match text.trim() {
            "off" => Ok(Coalesce::Off),
            "auto" => Ok(Coalesce::Auto(Coalesce::AUTO_PAUSE)),
            other => match parse_duration(other) {
                Ok(pause) if pause.is_zero() => Ok(Coalesce::Off),
                Ok(pause) if pause > Duration::from_millis(10) => Err(format!(
                    "a pause of {pause:?} would stall every client; expected off, auto or a \
                     duration up to 10ms such as 20us"
                )),
                Ok(pause) => Ok(Coalesce::Fixed(pause)),
                Err(error) => Err(format!("expected off, auto or a duration (20us): {error}")),
            },
        }
    }

    pub fn pause(&self) -> Duration {
        match *self {
            Coalesce::Off => Duration::ZERO,
            Coalesce::Fixed(pause) | Coalesce::Auto(pause) => pause,
        }
    }
}

/// A window with less work than this is not load: the detector does not try pausing, and turns
/// pausing off when it had no pauses to judge.
pub const LOAD_MIN: u64 = 64;
/// Windows in a row without load (and without pauses to judge) that turn pausing off.
pub const QUIET_MAX: u32 = 16;
/// Pauses are judged once the window has this many; fewer keep the state.
pub const JUDGE_MIN: u32 = 4;
/// Pausing stays on when a pass after a pause finds at least this many times the work of a busy
/// pass without pauses...
pub const BATCH_GAIN: u64 = 2;
/// ...and at least this many units (about two NBD or four OSD requests)...
pub const BATCH_MIN: u64 = 8;
/// ...or this many units on average (half the pass size that never pauses).
pub const BATCH_FULL: u64 = Coalesce::BELOW as u64 / 2;
/// Hold-off after the first failed try, in windows; it doubles with each failed try.
pub const HOLD_MIN: u32 = 8;
/// Longest hold-off, in windows (about a second at 1 ms a window).
pub const HOLD_MAX: u32 = 1024;
/// A spinning core keeps pausing only if its paused windows do at least this fraction
/// (`RATE_KEPT_NUM / RATE_KEPT_DEN`) of the work per nanosecond of the unpaused window that
/// started the try.
pub const RATE_KEPT_NUM: u128 = 15;
pub const RATE_KEPT_DEN: u128 = 16;

/// Decides, once a window, whether the coming passes pause. Counts only; no clock of its own
/// (the reactor closes windows on its publish tick) and no allocation.
#[derive(Clone, Debug)]
pub struct LoadDetector {
    mode: Coalesce,
    on: bool,
    /// Windows left before the next try, and the hold-off the next failure sets.
    hold_left: u32,
    hold: u32,
    /// Windows in a row while on without load.
    quiet: u32,
    window_work: u64,
    window_busy_passes: u64,
    /// Work, busy passes and length of the window that started the current try (passes
    /// unpaused).
    base_work: u64,
    base_passes: u64,
    base_ns: u64,
    /// The core spins when idle (`--idle spin`): its CPU is its own, so pausing saves no CPU
    /// anyone else could use and must also not cost throughput (see `decide`).
    spinning: bool,
    window_pauses: u32,
    window_work_after_pause: u64,
    /// The previous pass paused, so this pass's work is the pause's result.
    paused: bool,
    /// Totals, for `status`.
    pub pauses: u64,
    pub windows_on: u64,
    pub tries_failed: u64,
}

impl LoadDetector {
    pub fn new(mode: Coalesce) -> LoadDetector {
        LoadDetector {
            mode,
            on: matches!(mode, Coalesce::Fixed(_)),
            hold_left: 0,
            hold: HOLD_MIN,
            quiet: 0,
            window_work: 0,
            window_busy_passes: 0,
            base_work: 0,
            base_passes: 0,
            base_ns: 0,
            spinning: false,
            window_pauses: 0,
            window_work_after_pause: 0,
            paused: false,
            pauses: 0,
            windows_on: 0,
            tries_failed: 0,
        }
    }

    /// For a core that spins when idle: `auto` then also turns pausing off when the paused
    /// windows do less work per unit of time than the window that started the try. On the OSD
    /// protocol with a spinning, unsaturated core and latency-bound clients, pausing cost 9-16%
    /// of the IOPS while still bringing back batches; on NBD it raised them.
    pub fn spinning(mut self, spinning: bool) -> LoadDetector {
        self.spinning = spinning;
        self
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Records a pass's work and says whether to pause after it (`may_pause`: the core has no
    /// device I/O out, see `Core::may_coalesce`, and did not just park).
    ///
    /// While on, idle passes pause too: a loaded core between batches would otherwise spin
    /// through idle passes, an `epoll_wait` each (0.74 a request in a 4 x 32 NBD run that
    /// paused only after busy passes, against 0.14 for `recv` and `writev` together). Only
    /// pauses after busy passes are judged: an idle pass's pause says nothing about batching.
    pub fn after_pass(&mut self, work: usize, may_pause: bool) -> bool {
        self.window_work += work as u64;
        self.window_busy_passes += u64::from(work > 0);
        if self.paused {
            self.window_work_after_pause += work as u64;
        }
        let pause = self.on && work < Coalesce::BELOW && may_pause;
        if pause {
            self.pauses += 1;
        }
        self.paused = pause && work > 0;
        if self.paused {
            self.window_pauses += 1;
        }
        pause
    }

    /// Ends a window that lasted `window_ns`: decides whether the next one pauses.
    pub fn close_window(&mut self, window_ns: u64) {
        if self.on {
            self.windows_on += 1;
        }
        if let Coalesce::Auto(_) = self.mode {
            self.decide(window_ns.max(1));
        }
        self.window_work = 0;
        self.window_busy_passes = 0;
        self.window_pauses = 0;
        self.window_work_after_pause = 0;
    }

    fn decide(&mut self, window_ns: u64) {
        if !self.on {
            if self.hold_left > 0 {
                self.hold_left -= 1;
            } else if self.window_work >= LOAD_MIN {
                self.on = true;
                self.quiet = 0;
                self.base_work = self.window_work;
                self.base_passes = self.window_busy_passes;
                self.base_ns = window_ns;
            }
            return;
        }
        if self.window_pauses >= JUDGE_MIN {
            let pauses = u64::from(self.window_pauses);
            let after = self.window_work_after_pause;
            // after / pauses >= GAIN * base_work / base_passes, without division.
            let gained = after * self.base_passes >= BATCH_GAIN * self.base_work * pauses;
            // window_work / window_ns >= KEPT * base_work / base_ns, likewise.
            let rate_kept = !self.spinning
                || u128::from(self.window_work) * u128::from(self.base_ns) * RATE_KEPT_DEN
                    >= u128::from(self.base_work) * u128::from(window_ns) * RATE_KEPT_NUM;
            let batches = (gained && after >= BATCH_MIN * pauses) || after >= BATCH_FULL * pauses;
            if batches && rate_kept {
                self.hold = HOLD_MIN;
            } else {
                // Pausing brought back too little (the clients wait for each reply), or, on a
                // spinning core, it slowed the core's work down.
                self.on = false;
                self.tries_failed += 1;
                self.hold_left = self.hold;
                self.hold = (self.hold * 2).min(HOLD_MAX);
            }
        } else if self.window_work < LOAD_MIN {
            // The load went away, for now; nothing was learnt about pausing.
            self.quiet += 1;
            if self.quiet >= QUIET_MAX {
                self.on = false;
            }
            return;
        }
        self.quiet = 0;
        // Otherwise passes were too full to pause (or too few): keep the state.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(detector: &mut LoadDetector, passes: &[usize]) -> usize {
        let pauses = passes
            .iter()
            .filter(|&&w| detector.after_pass(w, true))
            .count();
        detector.close_window(1_000_000);
        pauses
    }

    fn auto() -> LoadDetector {
        LoadDetector::new(Coalesce::Auto(Coalesce::AUTO_PAUSE))
    }

    #[test]
    fn parses_off_auto_and_pauses() {
        let parse = |t: &str| Coalesce::parse(t, |d| crate_parse_us(d));
        assert_eq!(parse("off"), Ok(Coalesce::Off));
        assert_eq!(parse("0us"), Ok(Coalesce::Off));
        assert_eq!(parse("auto"), Ok(Coalesce::Auto(Coalesce::AUTO_PAUSE)));
        assert_eq!(
            parse("20us"),
            Ok(Coalesce::Fixed(Duration::from_micros(20)))
        );
        assert!(parse("1s").unwrap_err().contains("stall"));
        assert!(parse("soon").unwrap_err().contains("off, auto"));
    }

    /// A stand-in for the binary's duration parser: "<n>us".
    fn crate_parse_us(text: &str) -> Result<Duration, String> {
        match text.strip_suffix("us").map(str::parse::<u64>) {
            Some(Ok(n)) => Ok(Duration::from_micros(n)),
            _ if text == "1s" => Ok(Duration::from_secs(1)),
            _ => Err(format!("bad duration {text:?}")),
        }
    }

    #[test]
    fn off_never_pauses_and_fixed_always_does_below_the_limit() {
        let mut off = LoadDetector::new(Coalesce::Off);
        for _ in 0..10 {
            assert_eq!(window(&mut off, &[4; 100]), 0);
        }
        let mut fixed = LoadDetector::new(Coalesce::Fixed(Duration::from_micros(20)));
        for _ in 0..10 {
            // One request per pass: pausing does not pay, but fixed is not asked.
            assert_eq!(window(&mut fixed, &[4; 10]), 10);
        }
        assert_eq!(window(&mut fixed, &[0, Coalesce::BELOW, 1]), 2);
        assert_eq!(fixed.windows_on, 11);
    }

    #[test]
    fn a_spinning_core_stops_pausing_when_pauses_slow_it_down() {
        fn timed_window(detector: &mut LoadDetector, passes: &[usize], window_ns: u64) {
            for &work in passes {
                detector.after_pass(work, true);
            }
            detector.close_window(window_ns);
        }
        // Pauses bring back batches of ten requests either way; what differs is the rate.
        let slower = [4usize, 40, 4, 40, 4, 40]; // 132 units in 1.1 ms: 120 a ms
        let as_fast = [4usize, 40, 4, 40, 4, 40, 4, 40]; // 176 units in 1 ms
        for spinning in [false, true] {
            let mut detector = auto().spinning(spinning);
            timed_window(&mut detector, &[4; 40], 1_000_000); // 160 units a ms, unpaused
            assert!(detector.is_on());
            timed_window(&mut detector, &as_fast, 1_000_000);
            assert!(detector.is_on(), "as fast: kept (spinning {spinning})");
            timed_window(&mut detector, &slower, 1_100_000);
            // Only a spinning core cares: an adaptive one gives the CPU time to others.
            assert_eq!(detector.is_on(), !spinning);
            assert_eq!(detector.tries_failed, u64::from(spinning));
        }
    }

    #[test]
    fn light_traffic_never_tries() {
        let mut detector = auto();
        for _ in 0..100 {
            // 60 units a window (15 NBD requests a millisecond): below LOAD_MIN.
            assert_eq!(window(&mut detector, &[4; 15]), 0);
            assert!(!detector.is_on());
        }
    }

    #[test]
    fn batches_after_pauses_keep_it_on() {
        let mut detector = auto();
        // A window of load turns it on for the next one.
        assert_eq!(window(&mut detector, &[4; 40]), 0);
        assert!(detector.is_on());
        // Each pause brings back ten requests: stays on, window after window.
        for _ in 0..50 {
            let mut passes = [0usize; 20];
            for (i, pass) in passes.iter_mut().enumerate() {
                *pass = if i % 2 == 0 { 4 } else { 40 };
            }
            assert_eq!(window(&mut detector, &passes), 20, "every pass pauses");
            assert!(detector.is_on());
        }
        assert_eq!(detector.tries_failed, 0);
        // A saturated core (every pass at or over the limit) never pauses and stays on.
        assert_eq!(window(&mut detector, &[Coalesce::BELOW; 100]), 0);
        assert!(detector.is_on());
        // A quiet window (clients busy with a burst of replies) keeps it on...
        assert_eq!(window(&mut detector, &[4, 4]), 2);
        assert!(detector.is_on());
        window(&mut detector, &[4, 40, 4, 40, 4, 40, 4, 40]);
        // ...but QUIET_MAX of them in a row turn it off, with no penalty, and back on at the
        // next load.
        for _ in 0..QUIET_MAX {
            assert!(detector.is_on());
            window(&mut detector, &[4, 4]);
        }
        assert!(!detector.is_on());
        assert_eq!(detector.tries_failed, 0);
        window(&mut detector, &[4; 40]);
        assert!(detector.is_on());
    }

    #[test]
    fn one_request_per_pause_turns_it_off_with_a_doubling_hold_off() {
        let mut detector = auto();
        // Queue depth 1: a request per pass, 30 a window, each pause brings back one request.
        let qd1 = [4usize; 30];
        let mut paused_windows = 0;
        let mut windows = 0;
        let mut holds = Vec::new();
        let mut since_try = 0;
        for _ in 0..3000 {
            windows += 1;
            since_try += 1;
            let was_on = detector.is_on();
            let pauses = window(&mut detector, &qd1);
            if pauses > 0 {
                assert!(was_on);
                paused_windows += 1;
                holds.push(since_try);
                since_try = 0;
            }
            assert!(
                !detector.is_on() || pauses == 0,
                "a failed try ends at once"
            );
        }
        // Tries are spaced by 1 (the load window), then 8+1, 16+1, ... up to 1024+1 windows.
        assert_eq!(&holds[..4], &[2, 10, 18, 34]);
        assert!(holds.iter().all(|&gap| gap <= HOLD_MAX as usize + 2));
        assert_eq!(holds.last(), Some(&(HOLD_MAX as usize + 2)));
        assert_eq!(detector.tries_failed, paused_windows);
        // Over three seconds a QD1 client met pauses in under 1% of its windows.
        assert!(paused_windows * 100 < windows, "{paused_windows}/{windows}");
    }

    #[test]
    fn a_successful_window_resets_the_hold_off() {
        let mut detector = auto();
        for _ in 0..200 {
            window(&mut detector, &[4; 30]);
        }
        assert!(detector.tries_failed >= 4);
        // Load arrives: the next try (after the current hold-off) succeeds and resets it.
        let mut waited = 0;
        while !detector.is_on() {
            window(&mut detector, &[4; 30]);
            waited += 1;
            assert!(waited <= HOLD_MAX + 1);
        }
        window(&mut detector, &[4, 40, 4, 40, 4, 40, 4, 40]);
        assert!(detector.is_on());
        assert_eq!(detector.hold, HOLD_MIN);
    }

    #[test]
    fn the_gain_is_judged_against_the_cores_own_passes() {
        // Busy passes of 20 units without pauses; pauses that bring back 24 gained little.
        let mut detector = auto();
        window(&mut detector, &[20; 10]);
        assert!(detector.is_on());
        window(&mut detector, &[24; 10]);
        assert!(!detector.is_on());
        assert_eq!(detector.tries_failed, 1);
        // Passes of two units (a request's work split over two passes) and pauses that bring
        // back four (one whole request each): twice, but one request per pause is no batch.
        let mut detector = auto();
        window(&mut detector, &[2; 100]);
        window(&mut detector, &[4; 20]);
        assert!(!detector.is_on());
        // Passes of two units and pauses that bring back ten: a gain, and a batch.
        let mut detector = auto();
        window(&mut detector, &[2; 100]);
        window(&mut detector, &[10; 20]);
        assert!(detector.is_on());
        // Passes of 30 and pauses that bring back 40: under twice, but a full batch.
        let mut detector = auto();
        window(&mut detector, &[30; 10]);
        window(&mut detector, &[40; 10]);
        assert!(detector.is_on());
        assert_eq!(detector.tries_failed, 0);
    }

    #[test]
    fn device_io_out_blocks_the_pause_but_not_the_accounting() {
        let mut detector = LoadDetector::new(Coalesce::Fixed(Duration::from_micros(20)));
        assert!(!detector.after_pass(4, false));
        assert!(detector.after_pass(4, true));
        assert!(
            detector.after_pass(0, true),
            "idle passes pause too while on"
        );
        assert!(!detector.after_pass(Coalesce::BELOW, true));
        assert_eq!(detector.pauses, 2);
        // Only the pause after the busy pass is judged: the idle pass after it had no gain,
        // and the full pass after the idle pause counts for nothing.
        assert_eq!(
            (detector.window_pauses, detector.window_work_after_pause),
            (1, 0)
        );
    }
}
