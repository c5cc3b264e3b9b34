//! A client connection in classic mode: read by its messenger thread, written by whichever
//! thread has a reply (the finisher for ops, the messenger for pings, status and errors) under
//! the connection's write lock, as a classic OSD's connection has a write lock.
//!
//! Sockets are non-blocking. A reply that does not fit in the kernel's send buffer is kept in
//! the connection (`pending`) and the owning messenger is asked, through its epoll set, to
//! finish it when the socket is writable; nobody ever blocks on a slow client.
//!
//! Back-pressure: at most `inflight_max` requests per connection are past parsing and not yet
//! written; beyond it the messenger stops watching the socket for input (`pause_reading`), and
//! the writer that brings the count back under the limit watches it again. Both decisions are
//! made under the write lock, so a pause and a resume cannot miss each other.

use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Replies handed to one `writev` at most (well below IOV_MAX).
const WRITEV_SLICES_MAX: usize = 64;

pub const EPOLL_IN: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
pub const EPOLL_OUT: u32 = libc::EPOLLOUT as u32;

struct Tx {
    /// Bytes accepted for this connection that the kernel has not taken yet.
    pending: Vec<u8>,
    /// Requests whose replies sit in `pending` (they still count as in flight).
    pending_replies: u32,
    reading: bool,
    writing: bool,
    closed: bool,
}

pub struct Conn {
    pub stream: TcpStream,
    /// The owning messenger's epoll descriptor and this connection's token in it.
    epoll: RawFd,
    token: u64,
    /// Requests past parsing whose replies are not written yet.
    pub inflight: AtomicU32,
    inflight_max: u32,
    tx: Mutex<Tx>,
}

/// Writes to a non-blocking socket: bytes written, 0 on EAGAIN, Err when the peer is gone.
fn write_some(stream: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    let mut writer = stream;
    loop {
        match writer.write_vectored(slices) {
            Ok(written) => return Ok(written),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Outcome of handing replies to a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub bytes: u64,
    pub syscalls: u64,
    /// Replies dropped because the connection had closed.
    pub dropped: u32,
}

impl Conn {
    pub fn new(stream: TcpStream, epoll: RawFd, token: u64, inflight_max: u32) -> Conn {
        Conn {
            stream,
            epoll,
            token,
            inflight: AtomicU32::new(0),
            inflight_max,
            tx: Mutex::new(Tx {
                pending: Vec::new(),
                pending_replies: 0,
                reading: true,
                writing: false,
                closed: false,
            }),
        }
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn lock(&self) -> MutexGuard<'_, Tx> {
        self.tx.lock().expect("connection lock poisoned")
    }

    /// Registers the socket in its messenger's epoll set.
    pub fn register(&self) -> io::Result<()> {
        self.epoll_ctl(libc::EPOLL_CTL_ADD, EPOLL_IN)
    }

    fn epoll_ctl(&self, op: libc::c_int, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events,
            u64: self.token,
        };
        // SAFETY: epoll_ctl reads one epoll_event we own; both descriptors are open (the socket
        // is owned by `self`, the epoll set outlives every connection of its messenger).
        if unsafe { libc::epoll_ctl(self.epoll, op, self.fd(), &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn update_interest(&self, tx: &Tx) {
        if tx.closed {
            return;
        }
        let events = if tx.reading { EPOLL_IN } else { 0 } | if tx.writing { EPOLL_OUT } else { 0 };
        // A failure means the socket is being torn down; the messenger sees the hangup.
        let _ = self.epoll_ctl(libc::EPOLL_CTL_MOD, events);
    }

    /// Stops watching for input while the connection has too much in flight. Returns true if
    /// reading was paused (it resumes when replies are written).
    pub fn pause_reading_if_full(&self) -> bool {
        let mut tx = self.lock();
        if self.inflight.load(Ordering::Acquire) < self.inflight_max || !tx.reading {
            return !tx.reading;
        }
        tx.reading = false;
        self.update_interest(&tx);
        true
    }

    /// Replies written in full: they leave the in-flight count (resuming input if it was paused).
    fn retire(&self, tx: &mut Tx, replies: u32) {
        if replies == 0 {
            return;
        }
        let before = self.inflight.fetch_sub(replies, Ordering::AcqRel);
        debug_assert!(before >= replies);
        if !tx.reading && before - replies < self.inflight_max {
            tx.reading = true;
            self.update_interest(tx);
        }
    }

    /// Sends complete reply frames. `counted`: they answer requests counted in `inflight`.
    pub fn send(&self, replies: &[&[u8]], counted: bool) -> Sent {
        let mut sent = Sent::default();
        let mut tx = self.lock();
        let count = if counted { replies.len() as u32 } else { 0 };
        if tx.closed {
            sent.dropped = replies.len() as u32;
            self.retire(&mut tx, count);
            return sent;
        }
        let mut next = 0;
        while tx.pending.is_empty() && next < replies.len() {
            let end = (next + WRITEV_SLICES_MAX).min(replies.len());
            let mut slices = [IoSlice::new(&[]); WRITEV_SLICES_MAX];
            for (slice, reply) in slices.iter_mut().zip(&replies[next..end]) {
                *slice = IoSlice::new(reply);
            }
            let total: usize = replies[next..end].iter().map(|r| r.len()).sum();
            sent.syscalls += 1;
            let written = match write_some(&self.stream, &slices[..end - next]) {
                Ok(written) => written,
                Err(_) => {
                    // The peer is gone; the messenger closes the connection on its hangup.
                    self.shutdown_locked(&mut tx);
                    sent.dropped = (replies.len() - next) as u32;
                    self.retire(&mut tx, count);
                    return sent;
                }
            };
            sent.bytes += written as u64;
            if written < total {
                keep_unwritten(&mut tx.pending, &replies[next..end], written);
            }
            next = end;
        }
        for reply in &replies[next..] {
            tx.pending.extend_from_slice(reply);
        }
        if tx.pending.is_empty() {
            self.retire(&mut tx, count);
        } else {
            tx.pending_replies += count;
            if !tx.writing {
                tx.writing = true;
                self.update_interest(&tx);
            }
        }
        sent
    }

    /// The socket is writable: sends what is pending (called by the owning messenger).
    pub fn flush_pending(&self) -> Sent {
        let mut sent = Sent::default();
        let mut tx = self.lock();
        if tx.closed || tx.pending.is_empty() {
            return sent;
        }
        sent.syscalls += 1;
        match write_some(&self.stream, &[IoSlice::new(&tx.pending)]) {
            Ok(written) => {
                sent.bytes += written as u64;
                tx.pending.drain(..written);
            }
            Err(_) => {
                self.shutdown_locked(&mut tx);
                return sent;
            }
        }
        if tx.pending.is_empty() {
            tx.pending = Vec::new();
            tx.writing = false;
            self.update_interest(&tx);
            let replies = std::mem::take(&mut tx.pending_replies);
            self.retire(&mut tx, replies);
        }
        sent
    }

    fn shutdown_locked(&self, tx: &mut Tx) {
        if !tx.closed {
            let _ = self.epoll_ctl(libc::EPOLL_CTL_DEL, 0);
            tx.closed = true;
            tx.pending = Vec::new();
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }

    /// Closes the connection for good: later replies are dropped. Returns the requests whose
    /// replies were pending (they leave the in-flight count here).
    pub fn close(&self) {
        let mut tx = self.lock();
        self.shutdown_locked(&mut tx);
        let replies = std::mem::take(&mut tx.pending_replies);
        self.retire(&mut tx, replies);
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// Appends the bytes of `replies` past the first `written` to `pending`.
fn keep_unwritten(pending: &mut Vec<u8>, replies: &[&[u8]], mut written: usize) {
    for reply in replies {
        if written >= reply.len() {
            written -= reply.len();
            continue;
        }
        pending.extend_from_slice(&reply[written..]);
        written = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_bytes_are_kept_in_order() {
        let mut pending = Vec::new();
        keep_unwritten(&mut pending, &[b"abc", b"defg", b"hi"], 5);
        assert_eq!(pending, b"fghi");
        pending.clear();
        keep_unwritten(&mut pending, &[b"abc", b"de"], 0);
        assert_eq!(pending, b"abcde");
    }
}
