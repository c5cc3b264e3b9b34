//! The seam between `OsdCore` and the world: its network side (`Network`) and its clock
//! (`Clock`). The daemon uses `TcpTransport` and the monotonic clock; the deterministic
//! simulation (`crate::sim`) plugs in an in-memory network and a clock it advances itself.
//!
//! `OsdCore` is generic over `Network` (static dispatch: the daemon's hot path calls
//! `TcpTransport`'s methods directly, exactly as before the seam existed).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carmine_dataplane::buffers::{Body, CorePools};
use carmine_dataplane::tcp::{ConnId, RxFrame, TcpTransport, TransportStats};
use carmine_dataplane::wire::{Header, Status};

/// What `OsdCore` needs from a transport; the methods mean what `TcpTransport`'s do.
pub trait Network {
    /// Gathers readiness; may sleep up to `timeout` (only `park` passes a non-zero one).
    fn poll_events(&mut self, timeout: Duration) -> usize;
    /// One pending connection to hand to a core, if any.
    fn poll_accept(&mut self) -> Option<(TcpStream, SocketAddr)>;
    /// Takes over a connection another core accepted.
    fn adopt(&mut self, stream: TcpStream);
    /// Hands up to `budget` complete frames, each a lease on this core's pools, to `on_frame`.
    fn poll_rx(
        &mut self,
        pools: &mut CorePools,
        budget: usize,
        on_frame: &mut dyn FnMut(RxFrame),
    ) -> usize;
    /// Queues the reply to a frame received on `conn`; `Err(body)` if `conn` is gone.
    fn reply(
        &mut self,
        conn: ConnId,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    ) -> Result<(), Body>;
    /// Sends queued replies; returns how many completed.
    fn flush_tx(&mut self, pools: &mut CorePools) -> usize;
    /// A sent body that lives in another core's pools and must travel home.
    fn take_foreign(&mut self) -> Option<Body>;
    fn has_pending_tx(&self) -> bool;
    fn close_all(&mut self, pools: &mut CorePools);
    /// Also wake a parked core when `fd` becomes readable.
    fn watch_fd(&mut self, fd: RawFd) -> io::Result<()>;
    /// Whether a watched descriptor reported readiness since the last call (true when the
    /// transport cannot tell).
    fn take_watched_ready(&mut self) -> bool;
    fn stats(&self) -> TransportStats;
    /// The pool an op's output needs is empty: free a buffer a stalled connection holds, if
    /// one does (`want_large`: from the large pool). True when one was freed.
    fn evict_stalled_for(&mut self, pools: &mut CorePools, want_large: bool) -> bool;
    /// Whether queued replies still send bytes from store memory (`Body::Stored`).
    fn has_stored_bodies(&self) -> bool;
    /// Copies every queued `Body::Stored` into a pool buffer, so the store may change; false
    /// when a pool ran out first (the caller's mutation waits).
    fn copy_stored_bodies(&mut self, pools: &mut CorePools) -> bool;
}

impl Network for TcpTransport {
    fn poll_events(&mut self, timeout: Duration) -> usize {
        TcpTransport::poll_events(self, timeout)
    }
    fn poll_accept(&mut self) -> Option<(TcpStream, SocketAddr)> {
        TcpTransport::poll_accept(self)
    }
    fn adopt(&mut self, stream: TcpStream) {
        let _ = TcpTransport::adopt(self, stream); // A refusal is counted and logged there.
    }
    fn poll_rx(
        &mut self,
        pools: &mut CorePools,
        budget: usize,
        on_frame: &mut dyn FnMut(RxFrame),
    ) -> usize {
        TcpTransport::poll_rx(self, pools, budget, on_frame)
    }
    fn reply(
        &mut self,
        conn: ConnId,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    ) -> Result<(), Body> {
        TcpTransport::reply(self, conn, request, status, results, body)
    }
    fn flush_tx(&mut self, pools: &mut CorePools) -> usize {
        TcpTransport::flush_tx(self, pools)
    }
    fn take_foreign(&mut self) -> Option<Body> {
        TcpTransport::take_foreign(self)
    }
    fn has_pending_tx(&self) -> bool {
        TcpTransport::has_pending_tx(self)
    }
    fn close_all(&mut self, pools: &mut CorePools) {
        TcpTransport::close_all(self, pools)
    }
    fn watch_fd(&mut self, fd: RawFd) -> io::Result<()> {
        TcpTransport::watch_fd(self, fd)
    }
    fn take_watched_ready(&mut self) -> bool {
        TcpTransport::take_watched_ready(self)
    }
    fn stats(&self) -> TransportStats {
        self.stats
    }
    fn evict_stalled_for(&mut self, pools: &mut CorePools, want_large: bool) -> bool {
        TcpTransport::evict_stalled_for(self, pools, want_large)
    }
    fn has_stored_bodies(&self) -> bool {
        TcpTransport::has_stored_bodies(self)
    }
    fn copy_stored_bodies(&mut self, pools: &mut CorePools) -> bool {
        TcpTransport::copy_stored_bodies(self, pools)
    }
}

/// Where a core's time comes from (the replication hook's timers).
#[derive(Clone, Debug)]
pub enum Clock {
    /// Nanoseconds since the core started.
    Monotonic(Instant),
    /// Nanoseconds as a simulation sets them: it alone moves time.
    Simulated(Arc<AtomicU64>),
}

impl Clock {
    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::Monotonic(epoch) => epoch.elapsed().as_nanos() as u64,
            Clock::Simulated(now) => now.load(Ordering::Relaxed),
        }
    }
}
