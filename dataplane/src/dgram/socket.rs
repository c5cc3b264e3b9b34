//! The datagram RPC over a kernel UDP socket: for clients on ordinary hosts (and tests) that
//! speak the same protocol as a DPDK appliance. Non-blocking; receive buffers come from a fixed
//! set made at start-up and go back to it when the RPC drops them, so receiving allocates
//! nothing.

use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::rc::Rc;

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

    /// Receive buffers not held by the RPC.
    pub fn free_buffer_count(&self) -> usize {
        self.free.borrow().len()
    }

    /// One datagram, or None when none is waiting or every buffer is held (the RPC must let
    /// some go first: back-pressure, the kernel queues or drops the rest).
    pub fn recv(&mut self) -> io::Result<Option<(RecvBuf, SocketAddr)>> {
        let Some(mut bytes) = self.free.borrow_mut().pop() else {
            return Ok(None);
        };
        debug_assert_eq!(bytes.len(), self.buffer_bytes);
        match self.socket.recv_from(&mut bytes) {
            Ok((len, from)) => Ok(Some((
                RecvBuf {
                    bytes: Some(bytes),
                    len,
                    home: self.free.clone(),
                },
                from,
            ))),
            Err(e) => {
                self.free.borrow_mut().push(bytes);
                if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Sends one packet (RPC header then payload, joined in a stack buffer). False when the
    /// socket's send buffer is full: the RPC keeps the packet for the next flush.
    pub fn send(&self, to: &SocketAddr, header: &[u8], payload: &[u8]) -> io::Result<bool> {
        let mut datagram = [0u8; DATAGRAM_BYTES_MAX];
        let len = header.len() + payload.len();
        assert!(
            len <= DATAGRAM_BYTES_MAX,
            "packet of {len} bytes over the datagram limit"
        );
        datagram[..header.len()].copy_from_slice(header);
        datagram[header.len()..len].copy_from_slice(payload);
        match self.socket.send_to(&datagram[..len], to) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_bounded_and_come_back() {
        let mut a = UdpSocketPort::bind("127.0.0.1:0", 2, 1500).unwrap();
        let b = UdpSocketPort::bind("127.0.0.1:0", 1, 1500).unwrap();
        let to = a.local_addr().unwrap();
        for i in 0..3u8 {
            assert!(b.send(&to, &[i], b"xyz").unwrap());
        }
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
