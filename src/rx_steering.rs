//! Receive flow steering (RFS) on the loopback device, for the length of a benchmark.
//!
//! Why: over loopback the kernel delivers a sent segment to the receiving socket in the
//! *sender's* softirq, on the sender's CPU. A server answering a load generator on the same
//! host then pays, on its own CPUs, the generator's TCP receive path (segment processing, the
//! socket's wake-up), and the generator pays the server's. Two hosts with NICs do not work that
//! way, and a server's CPU per op then includes work that is not the server's. RFS makes the
//! kernel hand each segment to the backlog of the CPU where the receiving socket's reader last
//! ran (`rps_sock_flow_entries`, a per-queue `rps_flow_cnt`, the queue's `rps_cpus`), so each
//! side's receive path runs on its own CPUs, as with a NIC. Both designs under comparison get
//! the same treatment; only where the kernel's work is booked changes.
//!
//! The previous values are written back when the guard drops. A process killed with SIGKILL
//! leaves them set (RFS is a performance setting; nothing breaks): the log line at enable time
//! names the files and the values to restore.

use std::path::{Path, PathBuf};

/// Entries of the global socket-flow table and of loopback's per-queue flow table while the
/// guard lives: more than the flows of any benchmark here (a few hundred connections).
const FLOW_ENTRIES: u32 = 32_768;
const SOCK_FLOW_ENTRIES: &str = "/proc/sys/net/core/rps_sock_flow_entries";
const LOOPBACK_QUEUE: &str = "/sys/class/net/lo/queues/rx-0";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RxSteering {
    /// RFS when this process may set it (root, a loopback device with an rx queue), else off.
    Auto,
    /// RFS, or an error if it cannot be set.
    Rfs,
    /// Leave the kernel's settings as they are.
    Off,
}

/// RFS enabled on loopback until dropped.
pub struct LoopbackRfs {
    /// (file, value before) in the order written; restored in reverse.
    saved: Vec<(PathBuf, String)>,
}

impl LoopbackRfs {
    /// Steers loopback's receive processing to the CPU of each socket's reader, over every
    /// online CPU (`cpus` of them, numbered from 0).
    pub fn enable(cpus: usize) -> Result<LoopbackRfs, String> {
        assert!(cpus > 0, "a machine has at least one CPU");
        let queue = Path::new(LOOPBACK_QUEUE);
        let mask = cpu_mask_hex(cpus);
        let writes = [
            (PathBuf::from(SOCK_FLOW_ENTRIES), FLOW_ENTRIES.to_string()),
            (queue.join("rps_flow_cnt"), FLOW_ENTRIES.to_string()),
            (queue.join("rps_cpus"), mask),
        ];
        let mut guard = LoopbackRfs { saved: Vec::new() };
        for (path, value) in writes {
            let before = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            std::fs::write(&path, &value)
                .map_err(|e| format!("cannot write {value} to {}: {e}", path.display()))?;
            // Restored by Drop from here on, also if a later write fails.
            guard.saved.push((path, before.trim().to_string()));
        }
        log::info!(
            "rx steering: RFS on loopback for this run (restored at exit; by hand: {})",
            guard.restore_commands()
        );
        Ok(guard)
    }

    fn restore_commands(&self) -> String {
        self.saved
            .iter()
            .rev()
            .map(|(path, before)| format!("echo {before} > {}", path.display()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl Drop for LoopbackRfs {
    fn drop(&mut self) {
        for (path, before) in self.saved.iter().rev() {
            if let Err(error) = std::fs::write(path, before) {
                log::warn!(
                    "rx steering: could not restore {} to {before}: {error}",
                    path.display()
                );
            }
        }
    }
}

/// Chooses what `mode` asks for: the guard while RFS is on (None: left off).
pub fn apply(mode: RxSteering, cpus: usize) -> Result<Option<LoopbackRfs>, String> {
    match mode {
        RxSteering::Off => Ok(None),
        RxSteering::Rfs => LoopbackRfs::enable(cpus).map(Some),
        RxSteering::Auto => match LoopbackRfs::enable(cpus) {
            Ok(guard) => Ok(Some(guard)),
            Err(error) => {
                log::warn!("rx steering: left off ({error}); --rx-steering off hides this");
                Ok(None)
            }
        },
    }
}

/// `rps_cpus` takes a hexadecimal CPU bitmap, in comma-separated 32-bit groups.
fn cpu_mask_hex(cpus: usize) -> String {
    let mut groups = Vec::new();
    let mut left = cpus;
    while left > 0 {
        let bits = left.min(32);
        let group: u32 = if bits == 32 {
            u32::MAX
        } else {
            (1 << bits) - 1
        };
        groups.push(format!("{group:08x}"));
        left -= bits;
    }
    groups.reverse();
    groups.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_masks_cover_every_cpu_in_32_bit_groups() {
        assert_eq!(cpu_mask_hex(1), "00000001");
        assert_eq!(cpu_mask_hex(2), "00000003");
        assert_eq!(cpu_mask_hex(32), "ffffffff");
        assert_eq!(cpu_mask_hex(33), "00000001,ffffffff");
        assert_eq!(cpu_mask_hex(70), "0000003f,ffffffff,ffffffff");
    }
}
