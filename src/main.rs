//! `carmine`: the object storage daemon and its tools.

mod ack_log;
mod bench;
mod classic;
mod client;
mod compare;
mod config;
mod device;
mod fsck;
mod load;
mod nbd;
mod osd;
mod rx_steering;
mod server;
mod sim;
mod status;
mod store_bench;
mod units;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Counts allocations per thread, so that each reactor can report how many it made: the data
/// path promises none per op after start-up, and `status` shows whether it keeps the promise.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_allocation() {
    // try_with: during thread teardown the slot may be gone; such allocations are not counted.
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

/// Allocations made so far by the calling thread.
pub fn thread_allocations() -> u64 {
    ALLOCATIONS.try_with(|count| count.get()).unwrap_or(0)
}

/// Large allocations from the EAL heap, once a zero-copy DPDK port asked for it
/// (`carmine_dataplane::dpdk::heap`): the memory store's objects then lie in memory the port's
/// peer can read replies from. Everything else, and everything without that port, is the
/// system allocator's. Each function says whether it took the call (None / false: the system
/// allocator's).
#[cfg(feature = "dpdk")]
mod eal_heap {
    use carmine_dataplane::dpdk::heap;
    use std::alloc::{GlobalAlloc, Layout, System};

    fn wanted(size: usize) -> bool {
        size >= heap::LARGE_ALLOCATION_BYTES && heap::enabled()
    }

    fn is_heap_block(ptr: *mut u8, layout: Layout) -> bool {
        // Only a large block can be the heap's; `owns` tells which allocator made it.
        layout.size() >= heap::LARGE_ALLOCATION_BYTES && heap::owns(ptr)
    }

    /// # Safety
    /// As `GlobalAlloc::alloc`.
    pub unsafe fn alloc(layout: Layout, zeroed: bool) -> Option<*mut u8> {
        if !wanted(layout.size()) {
            return None;
        }
        // SAFETY: enabled (`wanted`); a Layout's alignment is a power of two.
        let p = unsafe { heap::alloc(layout.size(), layout.align()) };
        if p.is_null() {
            return None; // full: the system's
        }
        if zeroed {
            // SAFETY: p holds layout.size() bytes, just allocated.
            unsafe { p.write_bytes(0, layout.size()) };
        }
        Some(p)
    }

    /// # Safety
    /// As `GlobalAlloc::dealloc`.
    pub unsafe fn dealloc(ptr: *mut u8, layout: Layout) -> bool {
        if !is_heap_block(ptr, layout) {
            return false;
        }
        // SAFETY: EAL memory handed out by the global allocator came from `heap::alloc`.
        unsafe { heap::free(ptr) };
        true
    }

    /// # Safety
    /// As `GlobalAlloc::realloc`.
    pub unsafe fn realloc(ptr: *mut u8, layout: Layout, new_size: usize) -> Option<*mut u8> {
        if !is_heap_block(ptr, layout) && !wanted(new_size) {
            return None; // a system block, staying one
        }
        // Across allocators (or within the EAL heap): allocate, copy, free.
        // SAFETY: new_size is non-zero and, rounded to the alignment, fits isize (the
        // caller's promise for realloc).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as the caller's.
        let new = unsafe { alloc(new_layout, false) }
            .unwrap_or_else(|| unsafe { System.alloc(new_layout) });
        if !new.is_null() {
            // SAFETY: both blocks hold at least the smaller size; distinct allocations; the
            // old one is freed by whoever made it.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                if !dealloc(ptr, layout) {
                    System.dealloc(ptr, layout);
                }
            }
        }
        Some(new)
    }
}

// SAFETY: every method forwards to the system allocator (or, large blocks with a zero-copy
// DPDK port, to the EAL heap: `eal_heap`) with the caller's arguments; counting touches only
// a const-initialised thread-local Cell, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        #[cfg(feature = "dpdk")]
        if let Some(p) = eal_heap::alloc(layout, false) {
            return p;
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        #[cfg(feature = "dpdk")]
        if let Some(p) = eal_heap::alloc(layout, true) {
            return p;
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        #[cfg(feature = "dpdk")]
        if let Some(p) = eal_heap::realloc(ptr, layout, new_size) {
            return p;
        }
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(feature = "dpdk")]
        if eal_heap::dealloc(ptr, layout) {
            return;
        }
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[derive(Parser)]
#[command(
    name = "carmine",
    version,
    about = "User-space, polling, shared-nothing object storage daemon",
    long_about = "Carmine serves objects over a small pipelined protocol from one pinned, \
run-to-completion thread per core. Objects map to placement groups, placement groups to cores; \
each core owns its connections, PGs, buffers and store, and cores talk only through SPSC rings.\n\n\
Start with `carmine bench` (embedded server + load generator), then `carmine serve` and \
`carmine load` in two terminals, and `carmine status` to see per-core counters."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGINT/SIGTERM.
    Serve(config::ServeArgs),
    /// Drive a server with the bundled load generator.
    Load(load::LoadArgs),
    /// Print a server's per-core counters (a perf dump).
    Status(StatusArgs),
    /// Start an embedded server on loopback, drive it (write, then read, verified) and print a table.
    Bench(bench::BenchArgs),
    /// Classic thread-pool mode vs run-to-completion on this machine: IOPS, latency, CPU per op.
    Compare(compare::CompareArgs),
    Mkfs(device::MkfsArgs),
    Fsck(fsck::FsckArgs),
    StoreBench(store_bench::StoreBenchArgs),
    /// Block images for the NBD frontend: create, list, rm.
    #[command(subcommand)]
    Image(nbd::cli::ImageCommand),
    /// Deterministic whole-server simulation: seeded workloads, power cuts, remounts, checks.
    Sim(sim::SimArgs),
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:6800")]
    target: String,
    /// Print the raw JSON document.
    #[arg(long)]
    json: bool,
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// A running server of either execution mode.
enum Running {
    Rtc(server::Server),
    Classic(Box<classic::ClassicServer>),
}

impl Running {
    fn start(config: &config::ServeConfig) -> Result<Running, String> {
        if config.mode == "classic" {
            // Resolve "auto" CPUs before pinning: pinning narrows what the process sees.
            let mut config = config.clone();
            let cpus = config.reactor_cpus();
            config.cpus = Some(cpus.clone());
            // The main thread too: every thread of the process runs on the server's CPUs.
            if !classic::pin_to_cpus(&cpus) {
                log::warn!("could not pin to CPUs {cpus:?}");
            }
            return classic::ClassicServer::start(&config).map(|s| Running::Classic(Box::new(s)));
        }
        server::Server::start(config, thread_allocations).map(Running::Rtc)
    }

    fn addr_cpus_board(&self) -> (std::net::SocketAddr, &[usize], &status::StatusBoard) {
        match self {
            Running::Rtc(s) => (s.addr, &s.cpus, &s.board),
            Running::Classic(s) => (s.addr, &s.cpus, &s.board),
        }
    }

    fn stop_and_join(self) -> Result<(), String> {
        match self {
            Running::Rtc(s) => {
                s.stop();
                s.join()
            }
            Running::Classic(s) => {
                s.stop();
                s.join()
            }
        }
    }
}

fn serve(args: &config::ServeArgs) -> Result<(), String> {
    let config = config::ServeConfig::resolve(args)?;
    install_signal_handlers();
    let server = Running::start(&config)?;
    let (addr, cpus, _) = server.addr_cpus_board();
    if let Running::Rtc(rtc) = &server {
        if let Some(nbd) = rtc.nbd_addr {
            // Printed before the banner below, which tests wait for.
            log::info!("NBD frontend listening on {nbd} (exports: the images)");
        }
        if config.transport == "dpdk" {
            log::info!(
                "datagram RPC on DPDK port {} for {} (carmine load --transport dpdk --target {})",
                config.dpdk_port,
                config.udp,
                config.udp
            );
        }
        if let Some(udp) = rtc.udp_addr {
            log::info!(
                "datagram RPC listening on udp {udp} (carmine load --transport udp --target {udp})"
            );
        }
    }
    log::info!(
        "carmine {} serving on {} with {} core(s) on CPU(s) {:?}, mode {}, store {}, placement {}, idle {}",
        env!("CARGO_PKG_VERSION"),
        addr,
        config.cores,
        cpus,
        config.mode,
        config.store,
        config.placement,
        config.idle
    );
    while !SIGNALLED.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    log::info!("signal received: finishing in-flight ops and stopping");
    let summary = status::render(server.addr_cpus_board().2);
    server.stop_and_join()?;
    log::info!("stopped; final counters: {summary}");
    Ok(())
}

fn print_status(args: &StatusArgs) -> Result<(), String> {
    let status = client::fetch_status(&args.target)?;
    if args.json {
        println!("{status}");
        return Ok(());
    }
    let text = |value: &serde_json::Value| match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::Number(n) if n.is_f64() => format!("{:.0}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    };
    let millis = |value: &serde_json::Value| (value.as_u64().unwrap_or(0) / 1_000_000).to_string();
    println!(
        "carmine {} at {}, up {:.1}s",
        text(&status["version"]),
        args.target,
        status["uptime_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:>4} {:>12} {:>12} {:>12} {:>8} {:>6} {:>9} {:>10}",
        "core", "ops", "busy_ms", "idle_ms", "ns/op", "conns", "in_flight", "allocs"
    );
    for core in status["per_core"].as_array().into_iter().flatten() {
        println!(
            "{:>4} {:>12} {:>12} {:>12} {:>8} {:>6} {:>9} {:>10}",
            text(&core["core"]),
            text(&core["ops"]),
            millis(&core["busy_ns"]),
            millis(&core["idle_ns"]),
            text(&core["cpu_ns_per_op"]),
            text(&core["connections"]),
            text(&core["ops_in_flight"]),
            text(&core["allocations"]),
        );
    }
    if let Some(amplification) = status["totals"]["write_amplification"].as_f64() {
        println!(
            "store: {} objects, {} MiB live, write amplification {amplification:.2} (device bytes / acknowledged write bytes)",
            text(&status["totals"]["store_objects"]),
            status["totals"]["store_bytes"].as_u64().unwrap_or(0) >> 20
        );
    }
    let errors: Vec<String> = status["errors"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    println!(
        "errors: {}",
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(" ")
        }
    );
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve(args) => serve(args),
        Command::Load(args) if args.check.is_some() => check_ack_log(args),
        Command::Load(args) => load::run(args).map(|report| {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serialises")
                );
            } else {
                load::print_human(&report);
            }
        }),
        Command::Status(args) => print_status(args),
        Command::Bench(args) => bench::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Mkfs(args) => device::run_mkfs(args),
        // Its own exit statuses: 0 clean, 1 problems found, 2 cannot check.
        Command::Fsck(args) => return fsck::run(args),
        Command::StoreBench(args) => store_bench::run(args),
        Command::Image(command) => nbd::cli::run(command),
        Command::Sim(args) => sim::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("carmine: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `carmine load --check FILE`: the ack log's verdict; an error (exit status 1) on any loss.
fn check_ack_log(args: &load::LoadArgs) -> Result<(), String> {
    let path = args.check.as_ref().expect("--check given");
    let report = ack_log::check(&args.target, path)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serialises")
        );
    } else {
        ack_log::print_human(&report);
    }
    match report.failures() {
        0 => Ok(()),
        failures => Err(format!(
            "{failures} of {} blocks failed the check against {}",
            report.blocks,
            path.display()
        )),
    }
}
