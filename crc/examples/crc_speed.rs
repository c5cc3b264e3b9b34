//! Rough speed of crc32c over 4 KiB: this crate against the `crc32c` crate (not a test).
use std::time::Instant;

fn main() {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let rounds = 2_000_000u32;
    let mut acc = 0u32;
    let start = Instant::now();
    for i in 0..rounds {
        acc ^= carmine_crc::crc32c_append(i, &data);
    }
    let ours = start.elapsed();
    let start = Instant::now();
    for i in 0..rounds {
        acc ^= crc32c::crc32c_append(i, &data);
    }
    let theirs = start.elapsed();
    println!(
        "4 KiB: carmine-crc {:.1} ns, crc32c crate {:.1} ns ({acc})",
        ours.as_nanos() as f64 / f64::from(rounds),
        theirs.as_nanos() as f64 / f64::from(rounds)
    );
}
