//! Per-core counters. A core keeps plain `u64`s on its hot path and copies them every
//! millisecond into its `SharedCounters` (relaxed atomics, one writer), which `status` reads
//! from any core. That copy is the only state cores share outside the rings, and it is not on
//! the data path.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Names of the counters, as `status` prints them.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Counter { $($name),* }
        pub const COUNTER_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

counters!(
    ops,
    ops_read,
    ops_write,
    ops_remote_out,
    ops_remote_in,
    bytes_written,
    bytes_read,
    busy_ns,
    busy_cpu_ns,
    cpu_ns,
    idle_ns,
    passes,
    busy_passes,
    parks,
    coalesce_pauses,
    coalesce_windows_on,
    coalesce_tries_failed,
    allocations,
    pg_queued,
    ring_full_waits,
    buffer_waits,
    status_requests,
    pings,
    err_bad_crc,
    err_malformed,
    err_over_limit,
    err_unknown_opcode,
    err_unsupported,
    err_not_found,
    err_no_data,
    err_no_space,
    err_too_large,
    err_invalid_argument,
    err_range,
    err_io,
    err_corrupt,
    err_other,
    stream_malformed,
    stream_over_limit,
    conn_accepted,
    conn_closed,
    conn_refused,
    accept_rescues,
    connections,
    conn_truncated,
    conn_evicted,
    rx_bytes,
    tx_bytes,
    rx_copied_bytes,
    tx_stored_bodies,
    tx_stored_bodies_copied,
    rx_syscalls,
    tx_syscalls,
    tx_iovecs,
    epoll_polls,
    epoll_errors,
    uring_enters,
    rx_pool_waits,
    ops_in_flight,
    stalls,
    buffers_in_use,
    timers_armed,
    pgs,
    pg_log_entries,
    pg_version_max,
    pg_id_max,
    store_objects,
    store_bytes,
    store_capacity_bytes,
    store_device_bytes_written,
    store_client_bytes_written,
    store_records_written,
    nbd_requests,
    nbd_errors,
    nbd_accept_rescues,
    nbd_protocol_errors,
    nbd_connections,
    udp_datagrams_rx,
    udp_datagrams_tx,
    udp_rx_bytes,
    udp_tx_bytes,
    udp_sessions,
    udp_frames_in_place,
    udp_payload_copies,
    udp_rx_copied_bytes,
    udp_tx_copied_bytes,
    udp_replies_from_store,
    udp_stored_bodies_copied,
    udp_stored_responses_copied,
    udp_stored_frames_waits,
    udp_malformed,
    udp_duplicates,
    udp_retransmits,
    udp_pool_waits,
    udp_dropped_injected,
    udp_sessions_refused,
    udp_refusals,
    udp_rx_syscalls,
    udp_tx_syscalls,
    dpdk_rx_copies,
    dpdk_rx_copied_bytes,
    dpdk_rx_in_place,
    dpdk_rx_rooms_leased,
    dpdk_tx_in_place,
    dpdk_tx_from_store,
    dpdk_tx_copied_bytes,
    dpdk_tx_attached_held,
    dpdk_arp_replies,
    dpdk_ignored,
    dpdk_tx_full,
    dpdk_tx_dropped,
);

pub const COUNTER_COUNT: usize = COUNTER_NAMES.len();

#[derive(Clone, Copy, Debug)]
pub struct Counters {
    pub values: [u64; COUNTER_COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            values: [0; COUNTER_COUNT],
        }
    }
}

impl Counters {
    #[inline]
    pub fn add(&mut self, counter: Counter, value: u64) {
        self.values[counter as usize] += value;
    }
    #[inline]
    pub fn set(&mut self, counter: Counter, value: u64) {
        self.values[counter as usize] = value;
    }
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }
}

/// A core's published counters plus its ring occupancy.
pub struct SharedCounters {
    values: [AtomicU64; COUNTER_COUNT],
    /// Messages waiting in this core's outgoing ring to each other core.
    ring_occupancy: Box<[AtomicU64]>,
}

impl SharedCounters {
    pub fn new(cores: usize) -> SharedCounters {
        SharedCounters {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            ring_occupancy: (0..cores).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn publish(&self, counters: &Counters) {
        for (shared, value) in self.values.iter().zip(counters.values.iter()) {
            shared.store(*value, Ordering::Relaxed);
        }
    }

    pub fn publish_ring(&self, target: usize, occupancy: usize) {
        self.ring_occupancy[target].store(occupancy as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> (Counters, Vec<u64>) {
        let mut counters = Counters::default();
        for (value, shared) in counters.values.iter_mut().zip(self.values.iter()) {
            *value = shared.load(Ordering::Relaxed);
        }
        let rings = self
            .ring_occupancy
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
            .collect();
        (counters, rings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_and_snapshot_round_trip() {
        let shared = SharedCounters::new(2);
        let mut counters = Counters::default();
        counters.add(Counter::ops, 5);
        counters.set(Counter::busy_ns, 99);
        shared.publish(&counters);
        shared.publish_ring(1, 3);
        let (seen, rings) = shared.snapshot();
        assert_eq!(seen.get(Counter::ops), 5);
        assert_eq!(seen.get(Counter::busy_ns), 99);
        assert_eq!(rings, vec![0, 3]);
        assert_eq!(COUNTER_NAMES[Counter::ops_read as usize], "ops_read");
    }
}
