//! A once-a-second look at a listening socket's accept queue, for connections the edge-triggered
//! epoll set did not announce.
//!
//! Why: the accepting core learns of new connections only from the listener's epoll edge. Once
//! (session 10, a DPDK benchmark under heavy host load) a server ran 8 minutes with a client
//! waiting to be accepted, `conn_accepted` 0 and `epoll_wait` called 64,000 times a second;
//! the cause was never found. A lost edge must not cost a client forever: if the kernel's
//! accept queue held connections at two looks in a row and nothing was accepted between them,
//! the owner accepts anyway, counts it (status `accept_rescues`) and says so in the log, so the
//! next occurrence is both survived and seen.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Time between two looks at the accept queue.
pub const AUDIT_INTERVAL: Duration = Duration::from_secs(1);
/// Calls of `tick` between readings of the clock: the caller's pass stays free of a clock
/// read (a pass costs well under a microsecond; a look at most once per this many passes).
pub const TICKS_PER_CLOCK_READ: u32 = 4096;

#[derive(Debug)]
pub struct ListenerAudit {
    ticks: u32,
    last_look: Option<Instant>,
    /// Connections waited in the accept queue at the last look.
    queued_at_last_look: bool,
    /// `accepted` at the last look.
    accepted_at_last_look: u64,
    /// Connections taken from the accept queue (by whatever path).
    accepted: u64,
}

impl Default for ListenerAudit {
    fn default() -> ListenerAudit {
        ListenerAudit::new()
    }
}

impl ListenerAudit {
    pub fn new() -> ListenerAudit {
        ListenerAudit {
            ticks: 0,
            last_look: None,
            queued_at_last_look: false,
            accepted_at_last_look: 0,
            accepted: 0,
        }
    }

    /// The owner took a connection from the accept queue.
    pub fn on_accept(&mut self) {
        self.accepted += 1;
    }

    /// Called once per pass; true when a look is due now (the owner then calls `look`).
    pub fn tick(&mut self) -> bool {
        self.ticks += 1;
        if self.ticks < TICKS_PER_CLOCK_READ {
            return false;
        }
        self.ticks = 0;
        true
    }

    /// Looks at `listener`'s accept queue at `now`. True when connections have waited there
    /// since the previous look (at least `AUDIT_INTERVAL` ago) with none accepted in between:
    /// the owner should accept without waiting for an edge.
    pub fn look(&mut self, listener: RawFd, now: Instant) -> bool {
        if let Some(last) = self.last_look {
            if now.duration_since(last) < AUDIT_INTERVAL {
                return false;
            }
        }
        self.last_look = Some(now);
        let queued = match accept_queue_len(listener) {
            Ok(queued) => queued > 0,
            Err(error) => {
                log::warn!("cannot read the listener's accept queue length: {error}");
                false
            }
        };
        let stuck =
            queued && self.queued_at_last_look && self.accepted == self.accepted_at_last_look;
        self.queued_at_last_look = queued;
        self.accepted_at_last_look = self.accepted;
        stuck
    }
}

/// Connections waiting in a listening TCP socket's accept queue: for a socket in LISTEN state
/// Linux reports the queue's length in `tcp_info.tcpi_unacked` (and its limit in
/// `tcpi_sacked`).
pub fn accept_queue_len(listener: RawFd) -> io::Result<u32> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of `len` bytes for the call; the kernel
    // checks the descriptor.
    let rc = unsafe {
        libc::getsockopt(
            listener,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_unacked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn the_accept_queue_length_counts_connections_not_yet_accepted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        assert_eq!(accept_queue_len(fd).unwrap(), 0);
        let _a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _b = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(accept_queue_len(fd).unwrap(), 2);
        let _accepted = listener.accept().unwrap();
        assert_eq!(accept_queue_len(fd).unwrap(), 1);
    }

    #[test]
    fn a_queue_that_stays_full_with_nothing_accepted_is_stuck_at_the_second_look() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        let mut audit = ListenerAudit::new();
        let t0 = Instant::now();
        assert!(!audit.look(fd, t0), "an empty queue is never stuck");
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(
            !audit.look(fd, t0 + AUDIT_INTERVAL),
            "first sight of a queued connection"
        );
        assert!(
            !audit.look(fd, t0 + AUDIT_INTERVAL + AUDIT_INTERVAL / 2),
            "looks closer than the interval are skipped"
        );
        assert!(
            audit.look(fd, t0 + 2 * AUDIT_INTERVAL),
            "queued at two looks, none accepted"
        );
    }

    #[test]
    fn a_queue_the_owner_keeps_draining_is_not_stuck() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        let mut audit = ListenerAudit::new();
        let t0 = Instant::now();
        let _a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(!audit.look(fd, t0));
        // A busy listener: new connections keep arriving, and the owner accepts between looks.
        let _b = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _accepted = listener.accept().unwrap();
        audit.on_accept();
        assert!(!audit.look(fd, t0 + AUDIT_INTERVAL));
    }

    #[test]
    fn a_look_is_due_once_per_ticks_per_clock_read_calls() {
        let mut audit = ListenerAudit::new();
        let due = (0..3 * TICKS_PER_CLOCK_READ)
            .filter(|_| audit.tick())
            .count();
        assert_eq!(due, 3);
    }
}
