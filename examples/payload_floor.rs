//! The floor under a 4 KiB op's server CPU that comes from moving its payload alone, with the
//! payload placed as a zero-copy memif peer (or a NIC's DMA into the last-level cache) places
//! it: written by another CPU. No network stack, no RPC, no OSD: only the bytes.
//!
//! - write: a peer thread (CPU 0) copies a 4 KiB payload into one of 256 receive buffers, as
//!   the memif server copies into our rx rooms; the server thread (CPU 1) checks its crc32c
//!   (every frame is checked) and copies it into a random 4 KiB block of a 64 MiB object
//!   region (the memory store's copy), then hands the buffer back.
//! - read: the server thread copies a random block of the region into a send buffer (the reply
//!   mbuf) and hands it to the peer, which copies it out (memif's copy of our mbuf).
//!
//! Reported: the server thread's time per op, counted only while it has a batch of 32 ops in
//! hand (its waits for the peer are excluded), so a peer slower than the server does not
//! inflate it. Run on an otherwise idle machine:
//!
//!   cargo run --release --example payload_floor [seconds]
//!
//! Why it exists: issue 5's goal is 0.5 us of server CPU per 4 KiB op; this says how much of
//! that the payload's own movement takes on the machine at hand (ARCHITECTURE.md, the DPDK
//! transport).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
const SLOTS: usize = 256;
const BATCH: u64 = 32;
const REGION: usize = 64 << 20;

/// The buffers between the two threads: slot `seq % SLOTS` belongs to the peer until
/// `filled > seq`, then to the server until `done > seq`.
struct Ring {
    slots: Vec<std::cell::UnsafeCell<[u8; BLOCK]>>,
    filled: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
}

// SAFETY: a slot is written or read by one thread at a time, handed over by the release
// stores and acquire loads of `filled` and `done` (the protocol above).
unsafe impl Sync for Ring {}

impl Ring {
    fn new() -> Arc<Ring> {
        Arc::new(Ring {
            slots: (0..SLOTS)
                .map(|_| std::cell::UnsafeCell::new([0u8; BLOCK]))
                .collect(),
            filled: AtomicU64::new(0),
            done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    /// The slot of `seq`. Callers own it by the protocol above.
    #[allow(clippy::mut_from_ref)]
    fn slot(&self, seq: u64) -> &mut [u8; BLOCK] {
        // SAFETY: the caller owns slot `seq % SLOTS` now (protocol above), so no other
        // reference to it exists while this one lives.
        unsafe { &mut *self.slots[(seq % SLOTS as u64) as usize].get() }
    }
}

fn pin(cpu: usize) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        eprintln!("could not pin to CPU {cpu}; running unpinned");
    }
}

/// xorshift64: a random block index without a dependency.
fn next_block(state: &mut u64) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state % (REGION / BLOCK) as u64) as usize
}

fn run(write: bool, seconds: u64) -> (f64, u64) {
    let ring = Ring::new();
    let peer_ring = Arc::clone(&ring);
    // The peer: in `write`, fills slots for the server; in `read`, empties what it filled.
    let peer = std::thread::spawn(move || {
        pin(0);
        let ring = peer_ring;
        let source = vec![0x5au8; BLOCK];
        let mut sink = vec![0u8; BLOCK];
        let mut seq = 0u64;
        while !ring.stop.load(Ordering::Relaxed) {
            if write {
                // Fill the next slot once the server has given it back.
                if seq >= ring.done.load(Ordering::Acquire) + SLOTS as u64 {
                    std::hint::spin_loop();
                    continue;
                }
                ring.slot(seq).copy_from_slice(&source);
                ring.filled.store(seq + 1, Ordering::Release);
            } else {
                // Copy out the next slot the server filled.
                if seq >= ring.filled.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                    continue;
                }
                sink.copy_from_slice(ring.slot(seq));
                std::hint::black_box(&sink);
                ring.done.store(seq + 1, Ordering::Release);
            }
            seq += 1;
        }
    });
    pin(1);
    let mut region = vec![0u8; REGION];
    for (i, b) in region.iter_mut().enumerate() {
        *b = i as u8; // touched, so the pages exist (as the store's prefilled objects do)
    }
    let mut random = 0x9e37_79b9_7f4a_7c15u64;
    let mut busy = Duration::ZERO;
    let mut ops = 0u64;
    let mut crcs = 0u32;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut seq = 0u64;
    while Instant::now() < end {
        // Wait, outside the clock, until a whole batch is ours.
        if write {
            while ring.filled.load(Ordering::Acquire) < seq + BATCH {
                std::hint::spin_loop();
            }
        } else {
            while seq + BATCH > ring.done.load(Ordering::Acquire) + SLOTS as u64 {
                std::hint::spin_loop();
            }
        }
        let start = Instant::now();
        for k in seq..seq + BATCH {
            let block = next_block(&mut random) * BLOCK;
            if write {
                let payload = ring.slot(k);
                crcs ^= carmine_crc::crc32c(payload);
                region[block..block + BLOCK].copy_from_slice(payload);
            } else {
                ring.slot(k).copy_from_slice(&region[block..block + BLOCK]);
            }
            if write {
                ring.done.store(k + 1, Ordering::Release);
            } else {
                ring.filled.store(k + 1, Ordering::Release);
            }
        }
        busy += start.elapsed();
        seq += BATCH;
        ops += BATCH;
    }
    ring.stop.store(true, Ordering::Relaxed);
    peer.join().expect("peer thread");
    std::hint::black_box((crcs, &region));
    (busy.as_nanos() as f64 / ops as f64, ops)
}

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for round in 1..=2 {
        for (name, write) in [("write", true), ("read", false)] {
            let (ns, ops) = run(write, seconds);
            println!(
                "round {round} {name:5}: {ns:6.0} ns of server CPU per 4 KiB op ({ops} ops): {}",
                if write {
                    "crc32c of a payload another CPU wrote + copy into a random block of 64 MiB"
                } else {
                    "copy of a random block of 64 MiB into a buffer another CPU then reads"
                }
            );
        }
    }
}
