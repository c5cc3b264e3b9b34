//! The kernel UDP socket as a [`DatagramPort`] (`serve --transport udp`), batched both ways
//! (`dgram::mmsg`): `recv` takes what one `recvmmsg` brought, `send` queues and `flush` hands
//! the pass's packets to one `sendmmsg`.
//!
//! Receive: one `recvmmsg` fills up to `BATCH_MAX` slots of the receive chunk, each of a
//! maximal datagram (8,972 bytes), since the call must be given room for the largest one; each
//! datagram becomes a lease where the kernel wrote it (no copy), and the rest of its slot is
//! sealed unused. So a chunk holds ~14 datagrams instead of many small ones packed back to
//! back: more chunks go round, for a system call per batch instead of one per datagram.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use super::{rx_spare, DatagramPort, PortStats, Received};
use crate::buffers::CorePools;
use crate::dgram::mmsg::{self, SendBatch, BATCH_MAX};
use crate::dgram::socket::DATAGRAM_BYTES_MAX;
use crate::pool::{Buf, Lease};

/// A non-blocking kernel UDP socket whose sends and receives are batched.
pub struct KernelUdpPort {
    socket: UdpSocket,
    /// Datagrams the last `recvmmsg` brought that `recv` has not handed up yet (at most
    /// `BATCH_MAX`).
    received: VecDeque<(Lease, SocketAddr)>,
    /// Packets `send` queued for `flush`.
    tx: SendBatch,
    recv_calls: u64,
}

impl KernelUdpPort {
    /// Takes a bound socket, made non-blocking here.
    pub fn new(socket: UdpSocket) -> io::Result<KernelUdpPort> {
        socket.set_nonblocking(true)?;
        Ok(KernelUdpPort {
            socket,
            received: VecDeque::with_capacity(BATCH_MAX),
            tx: SendBatch::new(),
            recv_calls: 0,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

impl DatagramPort for KernelUdpPort {
    type Addr = SocketAddr;

    fn recv_into(&mut self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        loop {
            return match self.socket.recv_from(buf) {
                Ok(got) => Ok(Some(got)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }

    fn recv(
        &mut self,
        pools: &mut CorePools,
        chunk: &mut Option<Buf>,
    ) -> io::Result<Received<SocketAddr>> {
        if let Some((lease, peer)) = self.received.pop_front() {
            return Ok(Received::Datagram(lease, peer));
        }
        let Some(spare) = rx_spare(chunk, pools) else {
            return Ok(Received::NoBuffer);
        };
        // `rx_spare` leaves room for one maximal datagram at least.
        let slots = (spare.len() / DATAGRAM_BYTES_MAX).clamp(1, BATCH_MAX);
        let mut got = [(0, SocketAddr::from(([0, 0, 0, 0], 0))); BATCH_MAX];
        let received = {
            let mut buffers: [&mut [u8]; BATCH_MAX] = Default::default();
            for (buffer, slot) in buffers
                .iter_mut()
                .zip(spare.chunks_exact_mut(DATAGRAM_BYTES_MAX))
                .take(slots)
            {
                *buffer = slot;
            }
            self.recv_calls += 1;
            mmsg::recv_batch(self.socket.as_raw_fd(), &mut buffers[..slots], &mut got)?
        };
        if received == 0 {
            return Ok(Received::Empty);
        }
        let chunk = chunk.as_mut().expect("rx_spare leaves a chunk");
        let base = chunk.sealed_len();
        for (i, &(len, peer)) in got[..received].iter().enumerate() {
            debug_assert!(len <= DATAGRAM_BYTES_MAX);
            // The slot's unused tail before it (after the previous datagram) stays sealed and
            // unleased: written by nobody, read by nobody.
            let offset = base + i * DATAGRAM_BYTES_MAX;
            chunk.seal(offset - chunk.sealed_len());
            chunk.seal(len);
            self.received
                .push_back((pools.lease(chunk, offset, len), peer));
        }
        let (lease, peer) = self.received.pop_front().expect("received > 0");
        Ok(Received::Datagram(lease, peer))
    }

    fn send(
        &mut self,
        peer: &SocketAddr,
        header: &[u8],
        payload: &[u8],
        tail: &[u8],
    ) -> io::Result<bool> {
        if self.tx.is_full() {
            self.tx.send_queued(self.socket.as_raw_fd())?;
            if self.tx.is_full() {
                return Ok(false);
            }
        }
        Ok(self.tx.push(peer, [header, payload, tail]))
    }

    fn flush(&mut self, _pools: &mut CorePools) {
        if let Err(e) = self.tx.send_queued(self.socket.as_raw_fd()) {
            // Lost like a dropped datagram: the client's timer resends.
            log::debug!("datagram send: {e}");
        }
    }

    fn has_queued_tx(&self) -> bool {
        self.tx.queued() > 0
    }

    fn close(&mut self, pools: &mut CorePools) {
        while let Some((lease, _)) = self.received.pop_front() {
            pools.release_lease(lease);
        }
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.socket.as_raw_fd())
    }

    fn stats(&self) -> PortStats {
        PortStats {
            recv_calls: self.recv_calls,
            send_calls: self.tx.calls,
            ..PortStats::default()
        }
    }
}
