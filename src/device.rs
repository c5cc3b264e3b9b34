//! Segment-store devices: creating a device file, formatting it (`carmine mkfs`), and the
//! checks `carmine serve --store segment` makes before mounting.
//!
//! A device is a file or block device path, or `nvme:PCI_ADDRESS` (e.g.
//! `nvme:0000:00:04.0`): namespace 1 of that NVMe controller through Carmine's own driver
//! (VFIO; bind the device with `scripts/setup.sh bind`). Such a device always exists (it is
//! never created) and the VFIO group, which one process at a time may open, keeps a second
//! server off it.
//!
//! With feature `spdk`, `spdk:TRANSPORT_ID` (e.g. `spdk:trtype=PCIe traddr=0000:00:04.0`):
//! namespace 1 of that controller through SPDK's NVMe driver, attached once per process and
//! shared by every core's queue pair, as for `nvme:`. Without the feature such a name is
//! refused with a message saying how to build it.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use carmine_storage::queue_pair::AlignedBuf;
use carmine_storage::queue_pair::{NvmeController, NvmeQueuePair};
#[cfg(feature = "spdk")]
use carmine_storage::queue_pair::{SpdkController, SpdkQueuePair};
use carmine_storage::segment::format::{
    Superblock, SEGMENTS_START_BYTES, SPARE_PERCENT_DEFAULT, SPARE_PERCENT_MAX,
};
use carmine_storage::segment::mkfs;
use carmine_storage::UringQueuePair;

use crate::config::ServeConfig;
use crate::units::parse_size;

#[derive(clap::Args, Debug)]
#[command(
    about = "Format a file or block device for the segment store (ERASES what is on it)",
    long_about = "Writes a fresh superblock: the device's geometry (size, segment size) and its \
partition into one shard per core. Anything written before on the device becomes unreachable. \
A missing PATH is created as a sparse file of --size."
)]
pub struct MkfsArgs {
    /// File or block device to format, or nvme:PCI_ADDRESS (Carmine's NVMe driver, via VFIO), or
    /// spdk:TRANSPORT_ID (SPDK's NVMe driver; builds with feature spdk).
    #[arg(long)]
    device: PathBuf,
    /// Size of the file to create when PATH does not exist (e.g. 4GiB); ignored for existing
    /// files and devices, which are used whole.
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    size: u64,
    /// Shards, one per core of the server that will mount it.
    #[arg(long, default_value_t = 1)]
    cores: u32,
    /// Segment size: the unit of log writing and cleaning.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    segment_size: u64,
    /// Percent of each shard's data capacity kept from clients (0-90), as an SSD keeps
    /// over-provisioned space: the cleaner then finds emptier segments to clean, so random
    /// overwrites cost fewer extra writes. Clients are told (and may fill) the rest; a write
    /// that would store more gets no_space. The default keeps write amplification near 1.5
    /// at 80% of the usable capacity under random 4 KiB overwrites (ARCHITECTURE.md).
    #[arg(long, default_value_t = SPARE_PERCENT_DEFAULT, value_parser = parse_spare)]
    spare: u32,
    /// Write zeros over the whole file before formatting (regular files only). A sparse
    /// file's first write to each block allocates it, and the kernel runs such writes (in
    /// io_uring's worker threads, on the writing core's CPU) several times slower than
    /// overwrites, until the log has wrapped once. Use it for benchmarks; it takes as long as
    /// writing the file.
    #[arg(long)]
    preallocate: bool,
}

/// `--spare`: a whole percentage, 0..=SPARE_PERCENT_MAX (a trailing % is accepted).
pub fn parse_spare(text: &str) -> Result<u32, String> {
    text.trim()
        .trim_end_matches('%')
        .parse::<u32>()
        .ok()
        .filter(|percent| *percent <= SPARE_PERCENT_MAX)
        .ok_or_else(|| format!("expected a whole percentage 0..={SPARE_PERCENT_MAX}, got {text:?}"))
}

/// The PCI address of a device named `nvme:PCI_ADDRESS`, or None for a file or block device.
pub fn nvme_address(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix("nvme:")
}

/// The SPDK transport ID of a device named `spdk:TRANSPORT_ID`, or None for other devices.
pub fn spdk_transport_id(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix("spdk:")
}

/// Whether `path` names a controller driven from user space (`nvme:` or `spdk:`): such a
/// device always exists, is never created, and is used whole.
pub fn is_user_space_device(path: &Path) -> bool {
    nvme_address(path).is_some() || spdk_transport_id(path).is_some()
}

/// The error for an `spdk:` device in a build without feature `spdk`.
#[cfg(not(feature = "spdk"))]
pub fn spdk_not_built(transport_id: &str) -> String {
    format!(
        "spdk:{transport_id}: this carmine was built without SPDK: rebuild with \
         `cargo build --release --features spdk` where SPDK is installed (README.md, \"SPDK backend\")"
    )
}

/// The SPDK controller at `transport_id`, attached once per process and shared by every
/// core's queue pair. Detached when the last queue pair drops.
#[cfg(feature = "spdk")]
pub fn spdk_controller(transport_id: &str) -> Result<Arc<SpdkController>, String> {
    static OPEN: Mutex<Vec<(String, Weak<SpdkController>)>> = Mutex::new(Vec::new());
    shared_controller(&OPEN, transport_id, || {
        SpdkController::connect(transport_id).map_err(|e| format!("spdk:{transport_id}: {e}"))
    })
}

/// The live controller `table` holds under `name`, or a new one from `open`, kept there (weakly:
/// it closes when its last user drops it). One table per kind of controller, so that every
/// core's queue pair shares the process's one handle on a device.
fn shared_controller<T>(
    table: &Mutex<Vec<(String, Weak<T>)>>,
    name: &str,
    open: impl FnOnce() -> Result<Arc<T>, String>,
) -> Result<Arc<T>, String> {
    let mut table = table.lock().expect("controller table lock");
    table.retain(|(_, weak)| weak.strong_count() > 0);
    if let Some(controller) = table
        .iter()
        .find(|(known, _)| known == name)
        .and_then(|(_, weak)| weak.upgrade())
    {
        return Ok(controller);
    }
    let controller = open()?;
    table.push((name.to_string(), Arc::downgrade(&controller)));
    Ok(controller)
}

/// A queue pair of `depth` over the whole of namespace 1 (rounded down to 4 KiB) of the SPDK
/// controller at `transport_id`.
#[cfg(feature = "spdk")]
pub fn spdk_queue_pair(transport_id: &str, depth: u32) -> Result<SpdkQueuePair, String> {
    let controller = spdk_controller(transport_id)?;
    let size = controller.capacity_bytes() / 4096 * 4096;
    SpdkQueuePair::new(&controller, 0, size, depth).map_err(|e| format!("spdk:{transport_id}: {e}"))
}

/// The controller at `address`, opened once per process and shared by every core's queue pair
/// (each core gets its own I/O queue on it). Closed when the last queue pair drops.
pub fn nvme_controller(address: &str) -> Result<Arc<NvmeController>, String> {
    static OPEN: Mutex<Vec<(String, Weak<NvmeController>)>> = Mutex::new(Vec::new());
    shared_controller(&OPEN, address, || {
        NvmeController::open(address).map_err(|e| format!("nvme:{address}: {e}"))
    })
}

/// A queue pair of `depth` over the whole of namespace 1 (rounded down to 4 KiB) of the
/// controller at `address`.
pub fn nvme_queue_pair(address: &str, depth: u32) -> Result<NvmeQueuePair, String> {
    let controller = nvme_controller(address)?;
    let size = controller.identity().capacity_bytes() / 4096 * 4096;
    NvmeQueuePair::new(&controller, 0, size, depth).map_err(|e| format!("nvme:{address}: {e}"))
}

/// Bytes a file or block device (or NVMe namespace) holds.
pub fn device_size(path: &Path) -> Result<u64, String> {
    if let Some(address) = nvme_address(path) {
        let controller = nvme_controller(address)?;
        return Ok(controller.identity().capacity_bytes() / 4096 * 4096);
    }
    if let Some(transport_id) = spdk_transport_id(path) {
        #[cfg(feature = "spdk")]
        return Ok(spdk_controller(transport_id)?.capacity_bytes() / 4096 * 4096);
        #[cfg(not(feature = "spdk"))]
        return Err(spdk_not_built(transport_id));
    }
    let mut file = OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.seek(SeekFrom::End(0))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn random_uuid() -> Result<[u8; 16], String> {
    let mut uuid = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut uuid))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(uuid)
}

/// Creates `path` as a sparse file of `size` bytes (rounded down to 4 KiB) if it is missing.
/// Returns whether it was created.
fn create_if_missing(path: &Path, size: u64) -> Result<bool, String> {
    if path.exists() || is_user_space_device(path) {
        return Ok(false);
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.set_len(size / 4096 * 4096)
        .map_err(|e| format!("{}: cannot size to {size} bytes: {e}", path.display()))?;
    Ok(true)
}

fn format(path: &Path, cores: u32, segment_size: u64, spare: u32) -> Result<(), String> {
    let uuid = random_uuid()?;
    let sb = if let Some(address) = nvme_address(path) {
        let mut qp = nvme_queue_pair(address, 64)?;
        mkfs(&mut qp, segment_size, cores, spare, uuid)
    } else if let Some(transport_id) = spdk_transport_id(path) {
        #[cfg(feature = "spdk")]
        {
            let mut qp = spdk_queue_pair(transport_id, 64)?;
            mkfs(&mut qp, segment_size, cores, spare, uuid)
        }
        #[cfg(not(feature = "spdk"))]
        return Err(spdk_not_built(transport_id));
    } else {
        let size = device_size(path)?;
        let mut qp = UringQueuePair::open(path, 0, size / 4096 * 4096, 64)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        qp.lock(0, size, true)
            .map_err(|e| format!("refusing to format it: {e}"))?;
        mkfs(&mut qp, segment_size, cores, spare, uuid)
    }
    .map_err(|e| format!("{}: {e}", path.display()))?;
    log::info!(
        "formatted {}: {} bytes, {} segments of {} MiB, {} shard(s), {}% spare ({} MiB usable per shard)",
        path.display(),
        sb.device_size,
        sb.segment_count,
        sb.segment_size >> 20,
        sb.shard_count,
        sb.spare_percent,
        sb.usable_blocks(0) * 4096 >> 20
    );
    Ok(())
}

/// Bytes `preallocate` writes per request.
const PREALLOCATE_CHUNK_BYTES: usize = 1 << 20;

/// Writes zeros over the whole of the regular file `path` (O_DIRECT, so the page cache is
/// left alone) and syncs it: every block is then allocated and written, and later O_DIRECT
/// writes are overwrites the kernel completes without allocating.
pub fn preallocate(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let name = path.display();
    let metadata = std::fs::metadata(path).map_err(|e| format!("{name}: {e}"))?;
    if !metadata.is_file() {
        return Err(format!(
            "{name}: --preallocate is for regular files (a block device has no sparse blocks)"
        ));
    }
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{name}: {e}"))?;
    let size = metadata.len() / 4096 * 4096;
    let zeros = AlignedBuf::new(PREALLOCATE_CHUNK_BYTES);
    let started = std::time::Instant::now();
    let mut offset = 0;
    while offset < size {
        let length = (size - offset).min(PREALLOCATE_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&zeros[..length], offset)
            .map_err(|e| format!("{name}: preallocating at byte {offset}: {e}"))?;
        offset += length as u64;
    }
    file.sync_all()
        .map_err(|e| format!("{name}: preallocating: {e}"))?;
    log::info!(
        "preallocated {name}: {size} bytes of zeros in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn run_mkfs(args: &MkfsArgs) -> Result<(), String> {
    let created = create_if_missing(&args.device, args.size)?;
    let mut result = Ok(());
    if args.preallocate {
        result = preallocate(&args.device);
    }
    let result =
        result.and_then(|()| format(&args.device, args.cores, args.segment_size, args.spare));
    if result.is_err() && created {
        let _ = std::fs::remove_file(&args.device);
    }
    result
}

/// Before `serve --store segment`: a missing device file is created and formatted for this
/// server's cores; an existing one is left for mount to check.
pub fn prepare(config: &ServeConfig) -> Result<(), String> {
    create_and_format(
        &config.device,
        config.device_size,
        config.store_shard_count(),
        config.segment_size,
        SPARE_PERCENT_DEFAULT,
        false,
    )
    .map(|_| ())
}

/// Creates a missing device file (sparse, `size` bytes; written with zeros first when
/// `preallocated`) and formats it with `shards` shards and `spare` percent spare; an existing
/// one is left as it is. A file created here is removed again if formatting fails. Returns
/// whether it was created.
pub fn create_and_format(
    path: &Path,
    size: u64,
    shards: u32,
    segment_size: u64,
    spare: u32,
    preallocated: bool,
) -> Result<bool, String> {
    if !create_if_missing(path, size)? {
        return Ok(false);
    }
    log::info!(
        "{} does not exist: creating a {size}-byte {} file and formatting it ({shards} shard(s), {segment_size}-byte segments)",
        path.display(),
        if preallocated { "preallocated" } else { "sparse" }
    );
    let made = if preallocated {
        preallocate(path)
    } else {
        Ok(())
    };
    if let Err(error) = made.and_then(|()| format(path, shards, segment_size, spare)) {
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    Ok(true)
}

/// Claims shard `shard` of a mounted device for `qp`'s process: its segments exclusively, the
/// superblock shared (see `UringQueuePair::lock`). A second server on the same device, or
/// mkfs while it is served, is then refused instead of writing over a live log.
pub fn lock_shard(qp: &UringQueuePair, sb: &Superblock, shard: u32) -> Result<(), String> {
    let segments = sb.shard_segments(shard);
    let start = sb.segment_offset(segments.start);
    let length = u64::from(segments.end - segments.start) * sb.segment_size;
    qp.lock(0, SEGMENTS_START_BYTES, false)
        .and_then(|()| qp.lock(start, length, true))
        .map_err(|e| format!("shard {shard}: {e}"))
}
