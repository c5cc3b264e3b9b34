//! `carmine fsck`: the segment store's offline check (`carmine_storage::segment::fsck`), as a
//! report for an operator or one JSON object for a script. Exit status: 0 clean, 1 problems
//! found, 2 the device cannot be checked (unreadable, or not a Carmine device).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use carmine_storage::queue_pair::QueuePair;
use carmine_storage::segment::fsck::{fsck, fsck_reader, FsckError, FsckReport, ShardReport};
use carmine_storage::segment::mount::SyncIo;
use serde_json::json;

/// Problems printed per shard in the human report (all of them are counted, and all are in
/// the JSON output).
const PROBLEMS_SHOWN_PER_SHARD: usize = 100;

#[derive(clap::Args, Debug)]
#[command(
    about = "Check a segment-store device offline: metadata, every checksum, the segment inventory",
    long_about = "Reads a segment-store device (read-only: nothing is ever written) and checks it \
the way a mount would replay it, and more: both superblock copies; each shard's log (scan and \
replay of every record, each with its checksums); every live data block read back and checked \
against the crc32c in the metadata; that every block lies in its shard's segments, in a segment \
the log holds, referenced once, and within its object's size; the per-segment inventory against \
a recount; and that no valid record lies after the log's end (a sign that the log was damaged in \
the middle: replay stops at the damage as if it were a torn tail, and every record after it is \
lost).\n\n\
Where each shard's log ends, and why, is printed as information: after a crash the last record is \
often torn, which is normal (it was never acknowledged).\n\n\
Run it on a device no server has mounted. Exit status: 0 clean, 1 problems found (each named: \
object, block, device offset, segment), 2 the device cannot be read or is not a Carmine device."
)]
pub struct FsckArgs {
    /// File or block device to check, or nvme:PCI_ADDRESS (read through Carmine's NVMe driver),
    /// or spdk:TRANSPORT_ID (through SPDK's; builds with feature spdk).
    #[arg(long)]
    device: PathBuf,
    /// Print one JSON object (device, clean, problems, shards with their counts, log end and
    /// problems) instead of the report.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &FsckArgs) -> ExitCode {
    let started = Instant::now();
    let report = match check(&args.device) {
        Ok(report) => report,
        Err(error) => {
            let message = format!("{}: {error}", args.device.display());
            if args.json {
                let kind = match error {
                    FsckError::Io(_) => "io",
                    FsckError::NotFormatted(_) => "not_formatted",
                };
                println!(
                    "{}",
                    json!({
                        "device": args.device.display().to_string(),
                        "clean": false,
                        "error": message,
                        "error_kind": kind,
                    })
                );
            }
            eprintln!("carmine fsck: {message}");
            return ExitCode::from(2);
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", to_json(&report, elapsed));
    } else {
        print_human(&report, elapsed);
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// fsck on a file or block device, or on an NVMe namespace through a queue pair.
fn check(device: &Path) -> Result<FsckReport, FsckError> {
    if let Some(transport_id) = crate::device::spdk_transport_id(device) {
        #[cfg(feature = "spdk")]
        {
            let mut qp = crate::device::spdk_queue_pair(transport_id, 64)
                .map_err(|e| FsckError::Io(std::io::Error::other(e)))?;
            let device_bytes = qp.capacity_bytes();
            return fsck_reader(&mut SyncIo::new(&mut qp), device_bytes, device);
        }
        #[cfg(not(feature = "spdk"))]
        return Err(FsckError::Io(std::io::Error::other(
            crate::device::spdk_not_built(transport_id),
        )));
    }
    let Some(address) = crate::device::nvme_address(device) else {
        return fsck(device);
    };
    let mut qp = crate::device::nvme_queue_pair(address, 64)
        .map_err(|e| FsckError::Io(std::io::Error::other(e)))?;
    let device_bytes = qp.capacity_bytes();
    fsck_reader(&mut SyncIo::new(&mut qp), device_bytes, device)
}

fn shard_json(shard: &ShardReport) -> serde_json::Value {
    json!({
        "shard": shard.shard,
        "clean": shard.problems.is_empty(),
        "segments": shard.segments,
        "objects": shard.objects,
        "live_blocks": shard.live_blocks,
        "journal_segments": shard.journal_segments,
        "data_segments": shard.data_segments,
        "free_segments": shard.free_segments,
        "orphan_segments": shard.orphan_segments,
        "records": shard.records,
        "replay_start": { "record_seq": shard.replay_start.0, "offset": shard.replay_start.1 },
        "log_end": shard.log_end_text(),
        "bytes_verified": shard.bytes_verified,
        "notes": shard.notes,
        "problems": shard.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
    })
}

fn to_json(report: &FsckReport, elapsed_s: f64) -> serde_json::Value {
    let sb = &report.superblock;
    json!({
        "device": report.device.display().to_string(),
        "clean": report.is_clean(),
        "problems": report.problem_count(),
        "device_bytes": report.device_bytes,
        "segment_size": sb.segment_size,
        "segment_count": sb.segment_count,
        "shard_count": sb.shard_count,
        "spare_percent": sb.spare_percent,
        "device_problems": report.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "shards": report.shards.iter().map(shard_json).collect::<Vec<_>>(),
        "elapsed_s": elapsed_s,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn print_human(report: &FsckReport, elapsed_s: f64) {
    let sb = &report.superblock;
    println!(
        "{}: {} bytes, {} segments of {}, {} shard(s), {}% spare",
        report.device.display(),
        report.device_bytes,
        sb.segment_count,
        mib(sb.segment_size),
        sb.shard_count,
        sb.spare_percent
    );
    for problem in &report.problems {
        println!("  problem: {problem}");
    }
    for shard in &report.shards {
        println!(
            "shard {}: {} objects, {} live blocks ({} verified), segments: {} journal, {} data, \
             {} free of {}, {} records replayed{}",
            shard.shard,
            shard.objects,
            shard.live_blocks,
            mib(shard.bytes_verified),
            shard.journal_segments,
            shard.data_segments,
            shard.free_segments,
            shard.segments,
            shard.records,
            if shard.replay_start == (0, 0) {
                String::new()
            } else {
                format!(" from checkpoint record {}", shard.replay_start.0)
            }
        );
        println!("  log end: {}", shard.log_end_text());
        for note in &shard.notes {
            println!("  note: {note}");
        }
        for problem in shard.problems.iter().take(PROBLEMS_SHOWN_PER_SHARD) {
            println!("  problem: {problem}");
        }
        if shard.problems.len() > PROBLEMS_SHOWN_PER_SHARD {
            println!(
                "  ... and {} more",
                shard.problems.len() - PROBLEMS_SHOWN_PER_SHARD
            );
        }
    }
    let problems = report.problem_count();
    println!("checked in {elapsed_s:.2}s");
    if problems == 0 {
        println!("clean");
    } else {
        println!("{problems} problem(s)");
    }
}
