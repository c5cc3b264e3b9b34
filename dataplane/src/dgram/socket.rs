//! The datagram RPC over a kernel UDP socket: for clients on ordinary hosts (and tests) that
//! speak the same protocol as a DPDK appliance. Non-blocking; receive buffers come from a fixed
//! set made at start-up and go back to it when the RPC drops them, so receiving allocates
//! nothing. Both directions batch (`mmsg`): `send` queues and `flush` hands the queue to one
//! `sendmmsg`; `recv` takes from what one `recvmmsg` brought.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::rc::Rc;

use super::mmsg::{self, SendBatch, BATCH_MAX};

/// The largest datagram sent: a jumbo frame's IP payload (9000 - 20 - 8).
pub const DATAGRAM_BYTES_MAX: usize = 8972;

type FreeList = Rc<RefCell<Vec<Box<[u8]>>>>;

/// A received datagram. Goes back to its socket's buffer set on drop.
pub struct RecvBuf {
    bytes: Option<Box<[u8]>>,
    len: usize,
    home: FreeList,
}

impl AsRef<[u8]> for RecvBuf {
    fn as_ref(&self) -> &[u8] {
        &self.bytes.as_ref().expect("present until drop")[..self.len]
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        if let Some(b) = self.bytes.take() {
            self.home.borrow_mut().push(b);
        }
    }
}

/// A non-blocking UDP socket with a bounded set of receive buffers.
pub struct UdpSocketPort {
    socket: UdpSocket,
    free: FreeList,
    buffer_bytes: usize,
    /// Datagrams the last `recvmmsg` brought and `recv` has not handed out yet.
    received: VecDeque<(RecvBuf, SocketAddr)>,
    /// Datagrams `send` queued for the next `flush`.
    tx: SendBatch,
    /// `recvmmsg` calls made.
    pub recv_calls: u64,
    /// The buffers lent to one `recvmmsg` (empty between calls; capacity `BATCH_MAX`).
    batch_buffers: Vec<Box<[u8]>>,
}

impl UdpSocketPort {
    /// Binds `addr` with `buffer_count` receive buffers of `buffer_bytes` each (at least the
    /// largest datagram expected: longer ones are cut and then fail the packet checks).
    pub fn bind(
        addr: impl ToSocketAddrs,
        buffer_count: usize,
        buffer_bytes: usize,
    ) -> io::Result<Self> {
        assert!(buffer_count > 0 && buffer_bytes <= DATAGRAM_BYTES_MAX);
        let socket = UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        {
            use std::os::fd::AsRawFd;
            crate::udp::set_socket_buffers(socket.as_raw_fd());
        }
        let free = (0..buffer_count)
            .map(|_| vec![0u8; buffer_bytes].into_boxed_slice())
            .collect();
        Ok(UdpSocketPort {
            socket,
            free: Rc::new(RefCell::new(free)),
            buffer_bytes,
            received: VecDeque::with_capacity(BATCH_MAX),
            tx: SendBatch::new(),
            recv_calls: 0,
            batch_buffers: Vec::with_capacity(BATCH_MAX),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The socket's descriptor, to wait for it with epoll.
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.socket.as_raw_fd()
    }

    /// Receive buffers not held by the RPC (nor waiting in `recv`'s batch).
    pub fn free_buffer_count(&self) -> usize {
        self.free.borrow().len()
    }

    /// `sendmmsg` calls made.
    pub fn send_calls(&self) -> u64 {
        self.tx.calls
    }

    /// One datagram, or None when none is waiting or every buffer is held (the RPC must let
    /// some go first: back-pressure, the kernel queues or drops the rest). Takes up to
    /// `BATCH_MAX` waiting datagrams from the socket at once, into free buffers.
    pub fn recv(&mut self) -> io::Result<Option<(RecvBuf, SocketAddr)>> {
        if let Some(got) = self.received.pop_front() {
            return Ok(Some(got));
        }
        // The buffers lent to this call, kept in a vector made at bind time (no allocation).
        let taken = &mut self.batch_buffers;
        debug_assert!(taken.is_empty());
        {
            let mut free = self.free.borrow_mut();
            let count = free.len().min(BATCH_MAX);
            if count == 0 {
                return Ok(None);
            }
            let from = free.len() - count;
            taken.extend(free.drain(from..));
        }
        let count = taken.len();
        let mut got = [(0, SocketAddr::from(([0, 0, 0, 0], 0))); BATCH_MAX];
        let result = {
            let mut buffers: [&mut [u8]; BATCH_MAX] = Default::default();
            for (slot, bytes) in buffers.iter_mut().zip(taken.iter_mut()) {
                debug_assert_eq!(bytes.len(), self.buffer_bytes);
                *slot = &mut bytes[..];
            }
            self.recv_calls += 1;
            mmsg::recv_batch(self.socket.as_raw_fd(), &mut buffers[..count], &mut got)
        };
        let received = *result.as_ref().unwrap_or(&0);
        let mut lent = taken.drain(..);
        for &(len, from) in &got[..received] {
            let bytes = lent.next().expect("one buffer per datagram");
            self.received.push_back((
                RecvBuf {
                    bytes: Some(bytes),
                    len,
                    home: self.free.clone(),
                },
                from,
            ));
        }
        self.free.borrow_mut().extend(lent);
        result?;
        Ok(self.received.pop_front())
    }

    /// Queues one packet (RPC header then payload) for `flush`. False when the queue is full
    /// and the socket's send buffer too: the RPC keeps the packet for the next flush.
    pub fn send(&mut self, to: &SocketAddr, header: &[u8], payload: &[u8]) -> io::Result<bool> {
        if self.tx.is_full() {
            self.tx.send_queued(self.socket.as_raw_fd())?;
            if self.tx.is_full() {
                return Ok(false);
            }
        }
        Ok(self.tx.push(to, [header, payload, &[]]))
    }

    /// Hands what `send` queued to the socket (one `sendmmsg` per `BATCH_MAX`); what a full
    /// socket does not take waits for the next flush.
    pub fn flush(&mut self) -> io::Result<()> {
        self.tx.send_queued(self.socket.as_raw_fd())
    }

    /// Packets queued by `send` that the socket has not taken yet.
    pub fn queued_tx(&self) -> usize {
        self.tx.queued()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_bounded_and_come_back() {
        let mut a = UdpSocketPort::bind("127.0.0.1:0", 2, 1500).unwrap();
        let mut b = UdpSocketPort::bind("127.0.0.1:0", 1, 1500).unwrap();
        let to = a.local_addr().unwrap();
        for i in 0..3u8 {
            assert!(b.send(&to, &[i], b"xyz").unwrap());
        }
        assert_eq!(b.queued_tx(), 3, "queued until the flush");
        b.flush().unwrap();
        assert_eq!(
            (b.queued_tx(), b.send_calls()),
            (0, 1),
            "three packets, one sendmmsg"
        );
        let wait = |a: &mut UdpSocketPort| loop {
            if let Some(got) = a.recv().unwrap() {
                return got;
            }
        };
        let (first, from) = wait(&mut a);
        assert_eq!(first.as_ref(), b"\0xyz");
        assert_eq!(from, b.local_addr().unwrap());
        let (second, _) = wait(&mut a);
        assert_eq!(a.free_buffer_count(), 0);
        assert!(
            a.recv().unwrap().is_none(),
            "no buffer free: nothing taken from the socket"
        );
        drop(first);
        assert_eq!(a.free_buffer_count(), 1);
        let (third, _) = wait(&mut a);
        assert_eq!(
            third.as_ref(),
            b"\x02xyz",
            "the third datagram waited in the kernel"
        );
        drop((second, third));
        assert_eq!(a.free_buffer_count(), 2);
    }
}
