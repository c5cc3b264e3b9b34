//! The kernel UDP socket as a [`DatagramPort`] (`serve --transport udp`), batched both ways
//! (`dgram::mmsg`): `recv` takes what one `recvmmsg` brought, `send` queues and `flush` hands
//! the pass's packets to one `sendmmsg`. A response's bytes are sent from where the RPC keeps
//! them (`send_borrowed`, `send_from_pool`): the kernel's copy is the only one.
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

use super::{rx_spare, split_datagram, DatagramPort, PortStats, Received};
use crate::buffers::CorePools;
use crate::dgram::mmsg::{self, SendBatch, BATCH_MAX};
use crate::dgram::socket::DATAGRAM_BYTES_MAX;
use crate::pool::Buf;

/// A non-blocking kernel UDP socket whose sends and receives are batched.
pub struct KernelUdpPort {
    socket: UdpSocket,
    /// IPv4 datagrams go out with Don't Fragment set, until one is too long for its route.
    /// Why DF: an unconnected socket's datagram without it takes the kernel's shared IP id
    /// generator (`__ip_select_ident`, 6.5% of a kernel-UDP server's CPU under `perf record`),
    /// while a DF datagram's id is 0. Why the fallback: `--rpc-mtu` above the link's MTU still
    /// works, fragmented, as it did before.
    dont_fragment: bool,
    /// Datagrams the last `recvmmsg` brought that `recv` has not handed up yet (at most
    /// `BATCH_MAX`).
    received: VecDeque<Received<SocketAddr>>,
    /// Packets `send` queued for `flush`.
    tx: SendBatch,
    recv_calls: u64,
}

impl KernelUdpPort {
    /// Takes a bound socket, made non-blocking here.
    pub fn new(socket: UdpSocket) -> io::Result<KernelUdpPort> {
        socket.set_nonblocking(true)?;
        let dont_fragment = socket.local_addr()?.is_ipv4()
            && set_ip_mtu_discover(socket.as_raw_fd(), libc::IP_PMTUDISC_DO).is_ok();
        Ok(KernelUdpPort {
            socket,
            dont_fragment,
            received: VecDeque::with_capacity(BATCH_MAX),
            tx: SendBatch::new(),
            recv_calls: 0,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Whether IPv4 datagrams still go out with Don't Fragment set.
    pub fn dont_fragment(&self) -> bool {
        self.dont_fragment
    }

    /// A slot for one more packet: a full batch goes to the socket first. False when the
    /// socket took none of it (the RPC keeps the packet for the next flush).
    fn make_room(&mut self) -> bool {
        if self.tx.is_full() {
            let result = self.tx.send_queued(self.socket.as_raw_fd());
            self.after_send(result);
        }
        !self.tx.is_full()
    }

    /// A send error loses its datagram (the batch drops it; the client's timer resends). A
    /// datagram too long for its route with DF set is the sign to stop setting it: the
    /// resend then goes out fragmented.
    fn after_send(&mut self, result: io::Result<()>) {
        let Err(e) = result else {
            return;
        };
        if self.dont_fragment && e.raw_os_error() == Some(libc::EMSGSIZE) {
            match set_ip_mtu_discover(self.socket.as_raw_fd(), libc::IP_PMTUDISC_DONT) {
                Ok(()) => {
                    self.dont_fragment = false;
                    log::warn!(
                        "datagram RPC on {:?}: a packet is longer than the route's MTU; \
                         sending fragmented from now on (give both ends an --rpc-mtu that \
                         the link carries)",
                        self.socket.local_addr().ok()
                    );
                }
                Err(e) => log::warn!("datagram RPC: clearing Don't Fragment: {e}"),
            }
            return;
        }
        log::debug!("datagram send: {e}");
    }
}

/// `IP_MTU_DISCOVER` on an IPv4 socket: `IP_PMTUDISC_DO` sets Don't Fragment (a datagram
/// longer than the route's MTU fails with `EMSGSIZE`), `IP_PMTUDISC_DONT` clears it.
fn set_ip_mtu_discover(fd: RawFd, mode: libc::c_int) -> io::Result<()> {
    // SAFETY: `mode` is a live c_int and the length passed is its size; a bad descriptor is
    // an error return, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&mode as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
        if let Some(received) = self.received.pop_front() {
            return Ok(received);
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
                .push_back(split_datagram(pools, chunk, offset, len, peer));
        }
        Ok(self.received.pop_front().expect("received > 0"))
    }

    fn send(
        &mut self,
        peer: &SocketAddr,
        header: &[u8],
        payload: &[u8],
        tail: &[u8],
    ) -> io::Result<bool> {
        if !self.make_room() {
            return Ok(false);
        }
        Ok(self.tx.push(peer, [header, payload, tail]))
    }

    unsafe fn send_borrowed(
        &mut self,
        peer: &SocketAddr,
        header: &[u8],
        payload: &[u8],
        tail: &[u8],
    ) -> io::Result<bool> {
        if !self.make_room() {
            return Ok(false);
        }
        // SAFETY: the caller keeps `payload` and `tail` until the next `flush` returns, and
        // `flush` ends with `send_queued`, which sends them or copies them into the batch.
        Ok(unsafe { self.tx.push_borrowed(peer, header, [payload, tail]) })
    }

    unsafe fn send_from_pool(
        &mut self,
        _pools: &mut CorePools,
        peer: &SocketAddr,
        header: &[u8],
        payload: &[u8],
    ) -> io::Result<bool> {
        // SAFETY: a payload in pool memory the RPC holds as a response stays until the
        // client's next request, taken only by `poll_rx`, after this pass's `flush`.
        unsafe { self.send_borrowed(peer, header, payload, &[]) }
    }

    fn flush(&mut self, _pools: &mut CorePools) {
        let result = self.tx.send_queued(self.socket.as_raw_fd());
        self.after_send(result);
    }

    fn has_queued_tx(&self) -> bool {
        self.tx.queued() > 0
    }

    fn close(&mut self, pools: &mut CorePools) {
        while let Some(received) = self.received.pop_front() {
            if let Received::Datagram { payload, .. } = received {
                pools.release_lease(payload);
            }
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
