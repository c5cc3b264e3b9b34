//! Deterministic whole-server simulation (issue 9, item 3): the OSD cores (`OsdCore`: PGs,
//! op tables, rings between cores, timers) and their segment-store shards on `MemQueuePair`
//! devices, all in one thread, stepped by one seeded scheduler.
//!
//! One seed is one run: a geometry (2 or 3 cores, segments per shard, device faults: latency,
//! reordering, a small write-back cache, tear granularity) and then several *power cycles*.
//! In each, the scheduler picks from the seed, step by step, whether a client op is sent (to
//! its object's connection core, as a wire v1 frame), which core polls (its inbox, network,
//! store, timers, rings), whether time moves (the replication hook's timers), and whether a
//! core stalls for a while (a latency spike: its completions and messages wait). At a random
//! step the power goes: every device drops its unflushed writes and tears one. The cores then
//! drain (every op gets an answer, I/O fails with PowerLoss; no buffer may leak), the device
//! images are composed into one whole device, `fsck` must find it clean, the real mount code
//! remounts each shard, and a read of every object through the remounted server must show a
//! state the oracle (`model.rs`) allows: every acknowledged op applied, every refused one
//! absent, every unanswered one wholly applied or wholly absent. Reads during the run are
//! checked the same way (answers given after the cut, during the drain, constrain nothing but
//! acknowledgements: see `run.rs`). The run then continues on the remounted server.
//!
//! Everything random comes from the seed, so a failure names its seed and `carmine sim
//! --seed N` replays it exactly; `trace_digest` folds every event (each reply's bytes, the
//! cuts, the tears, fsck's counts) so a test can assert that a seed replays identically.

mod device;
mod model;
mod net;
mod run;

pub use run::{run_seed, SeedConfig, SeedReport};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Replay one seed (prints its report and trace digest).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after at least this many power cuts (ignored with --seconds).
    #[arg(long, default_value_t = 1000)]
    pub cuts: u64,
    /// Long mode: run seeds until this many seconds have passed.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// The first seed; the next ones follow in order.
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// Power cuts (and remounts) per seed.
    #[arg(long, default_value_t = 4)]
    pub cuts_per_seed: u32,
    /// Test the checker: a device whose flushes persist nothing (the run must fail).
    #[arg(long, hide = true)]
    pub lying_flush: bool,
    /// Inject medium errors at random blocks (reads fail with EIO until the block is
    /// rewritten): clients may see Io errors, never wrong bytes; failed ops change nothing.
    #[arg(long)]
    pub read_errors: bool,
    /// Small buffer pools (the first sizing): frames may hold most buffers and ops wait for
    /// outputs, which once hung the OSD (seed 93; fixed, CI runs a few hundred cuts so).
    #[arg(long)]
    pub tight_pools: bool,
    /// Format every seed with this `mkfs --spare` (percent of the data capacity kept from
    /// clients) instead of drawing one per seed from 0, 0, 20, 40.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=90))]
    pub spare: Option<u32>,
}

/// The seed being simulated, for the panic hook (a panic aborts the release build, so the
/// seed must be printed before that).
static CURRENT_SEED: AtomicU64 = AtomicU64::new(u64::MAX);

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let seed = CURRENT_SEED.load(Ordering::Relaxed);
        if seed != u64::MAX {
            eprintln!(
                "sim: panic in seed={seed}; replay: carmine sim --seed {seed} (or CARMINE_SIM_SEED={seed})"
            );
        }
        previous(info);
    }));
}

/// Runs one seed, remembering it for the panic hook.
pub fn run_seed_reported(config: &SeedConfig) -> Result<SeedReport, String> {
    CURRENT_SEED.store(config.seed, Ordering::Relaxed);
    let result = run_seed(config);
    CURRENT_SEED.store(u64::MAX, Ordering::Relaxed);
    result
}

/// Totals over many seeds.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchReport {
    pub seeds: u64,
    pub cuts: u64,
    pub ops: u64,
    pub acked: u64,
    pub reads_checked: u64,
    pub objects_checked: u64,
    pub unknown_ops: u64,
    /// Seeds in which the cleaner freed or cleaned a segment, and in which a checkpoint was
    /// written (coverage: the cuts must also hit those).
    pub seeds_cleaning: u64,
    /// Seeds whose cleaner wrote copies to its cold head.
    pub seeds_cold: u64,
    pub seeds_checkpointing: u64,
    /// Seeds formatted with a spare (`mkfs --spare`).
    pub seeds_with_spare: u64,
    /// Shard power cuts that met two journal records in flight.
    pub cuts_with_two_records: u64,
    pub read_errors_injected: u64,
    pub io_errors_answered: u64,
}

impl BatchReport {
    fn add(&mut self, report: &SeedReport) {
        self.seeds += 1;
        self.cuts += report.cuts;
        self.ops += report.ops;
        self.acked += report.acked;
        self.reads_checked += report.reads_checked;
        self.objects_checked += report.objects_checked;
        self.unknown_ops += report.unknown_ops;
        self.seeds_cleaning += u64::from(report.segments_cleaned > 0);
        self.seeds_cold += u64::from(report.blocks_moved_cold > 0);
        self.seeds_checkpointing += u64::from(report.checkpoints > 0);
        self.seeds_with_spare += u64::from(report.spare_percent > 0);
        self.cuts_with_two_records += report.cuts_with_two_records;
        self.read_errors_injected += report.read_errors_injected;
        self.io_errors_answered += report.io_errors_answered;
    }
}

/// Runs seeds from `first_seed` until `stop` says enough; the first failure ends the batch
/// with `(seed, message)`.
pub fn run_batch(
    first: SeedConfig,
    mut stop: impl FnMut(&BatchReport) -> bool,
) -> Result<BatchReport, (u64, String)> {
    let mut batch = BatchReport::default();
    let mut seed = first.seed;
    while !stop(&batch) {
        let config = SeedConfig { seed, ..first };
        let report = run_seed_reported(&config).map_err(|message| (seed, message))?;
        batch.add(&report);
        seed = seed.wrapping_add(1);
    }
    Ok(batch)
}

/// `carmine sim`.
pub fn run(args: &SimArgs) -> Result<(), String> {
    install_panic_hook();
    // The store logs every op that fails after a power cut; thousands of cuts would bury the
    // report. RUST_LOG still turns logging on.
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Off);
    }
    if let Some(seed) = args.seed {
        let config = SeedConfig {
            seed,
            cuts: args.cuts_per_seed,
            lying_flush: args.lying_flush,
            tight_pools: args.tight_pools,
            read_errors: args.read_errors,
            spare_percent: args.spare,
        };
        let report =
            run_seed_reported(&config).map_err(|message| failure_text(&config, &message))?;
        println!("sim: seed={seed} passed: {report:?}");
        return Ok(());
    }
    let started = Instant::now();
    let deadline = args.seconds.map(Duration::from_secs);
    let mut last_progress = Instant::now();
    let cuts = args.cuts;
    let first = SeedConfig {
        seed: args.first_seed,
        cuts: args.cuts_per_seed,
        lying_flush: args.lying_flush,
        tight_pools: args.tight_pools,
        read_errors: args.read_errors,
        spare_percent: args.spare,
    };
    let result = run_batch(first, |batch| {
        if last_progress.elapsed() >= Duration::from_secs(60) {
            last_progress = Instant::now();
            eprintln!(
                "sim: {} seeds, {} cuts, {} ops so far ({:.0} s)",
                batch.seeds,
                batch.cuts,
                batch.ops,
                started.elapsed().as_secs_f64()
            );
        }
        match deadline {
            Some(deadline) => started.elapsed() >= deadline,
            None => batch.cuts >= cuts,
        }
    });
    match result {
        Ok(batch) => {
            println!(
                "sim: seeds {}..{} passed: {} power cuts, {} ops ({} acknowledged, {} unanswered at a cut), {} reads checked during runs, {} objects checked after remounts; cleaner at work in {} seeds (copies in cold segments in {}), checkpoints in {}, a spare in {}; {} shard cuts met two journal records in flight; {} read errors injected, {} ops answered Io; {:.1} s",
                args.first_seed,
                args.first_seed + batch.seeds,
                batch.cuts,
                batch.ops,
                batch.acked,
                batch.unknown_ops,
                batch.reads_checked,
                batch.objects_checked,
                batch.seeds_cleaning,
                batch.seeds_cold,
                batch.seeds_checkpointing,
                batch.seeds_with_spare,
                batch.cuts_with_two_records,
                batch.read_errors_injected,
                batch.io_errors_answered,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err((seed, message)) => Err(failure_text(&SeedConfig { seed, ..first }, &message)),
    }
}

pub fn failure_text(config: &SeedConfig, message: &str) -> String {
    let seed = config.seed;
    let mut flags = String::new();
    if config.tight_pools {
        flags.push_str(" --tight-pools");
    }
    if config.read_errors {
        flags.push_str(" --read-errors");
    }
    if let Some(spare) = config.spare_percent {
        flags.push_str(&format!(" --spare {spare}"));
    }
    format!(
        "sim: FAILED seed={seed}: {message}\nreplay: carmine sim --seed {seed}{flags}   (or CARMINE_SIM_SEED={seed} cargo test --bin carmine sim::)"
    )
}

#[cfg(test)]
mod tests;
