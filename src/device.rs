//! Segment-store devices: creating a device file, formatting it (`carmine mkfs`), and the
//! checks `carmine serve --store segment` makes before mounting.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use carmine_storage::segment::format::{Superblock, SEGMENTS_START_BYTES};
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
    /// File or block device to format.
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
}

/// Bytes a file or block device holds.
pub fn device_size(path: &Path) -> Result<u64, String> {
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
    if path.exists() {
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

fn format(path: &Path, cores: u32, segment_size: u64) -> Result<(), String> {
    let size = device_size(path)?;
    let mut qp = UringQueuePair::open(path, 0, size / 4096 * 4096, 64)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    qp.lock(0, size, true)
        .map_err(|e| format!("refusing to format it: {e}"))?;
    let sb = mkfs(&mut qp, segment_size, cores, random_uuid()?)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    log::info!(
        "formatted {}: {} bytes, {} segments of {} MiB, {} shard(s)",
        path.display(),
        sb.device_size,
        sb.segment_count,
        sb.segment_size >> 20,
        sb.shard_count
    );
    Ok(())
}

pub fn run_mkfs(args: &MkfsArgs) -> Result<(), String> {
    let created = create_if_missing(&args.device, args.size)?;
    let result = format(&args.device, args.cores, args.segment_size);
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
    )
    .map(|_| ())
}

/// Creates a missing device file (sparse, `size` bytes) and formats it with `shards` shards;
/// an existing one is left as it is. A file created here is removed again if formatting
/// fails. Returns whether it was created.
pub fn create_and_format(
    path: &Path,
    size: u64,
    shards: u32,
    segment_size: u64,
) -> Result<bool, String> {
    if !create_if_missing(path, size)? {
        return Ok(false);
    }
    log::info!(
        "{} does not exist: creating a {size}-byte sparse file and formatting it ({shards} shard(s), {segment_size}-byte segments)",
        path.display()
    );
    if let Err(error) = format(path, shards, segment_size) {
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
