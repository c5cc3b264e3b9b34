//! Many datagrams per system call on a kernel UDP socket: `sendmmsg` for what a pass sends,
//! `recvmmsg` for what waits. On this project's VM a UDP system call costs more than an op's
//! whole user-space path (`scripts/dpdk-bench.sh` with `DGRAM=udp`: 2.0 system calls and
//! ~3.7 us of server CPU per op, against TCP's 0.1-0.2 and ~1 us, whose one read and one
//! writev carry a whole batch), so the datagram RPC on kernel sockets batches both ways.
//!
//! [`SendBatch`] keeps a datagram's head (the 32-byte RPC header, made on the caller's stack)
//! in a slot of its own and, with `push_borrowed`, points at the payload where it lies (a
//! response the RPC keeps): the kernel's copy into its buffer is the only one, as TCP's
//! `writev` of a reply. What a full socket did not take is copied into its slot before
//! `send_queued` returns, so no datagram borrows the caller's bytes past that call.
//! [`recv_batch`] fills caller-given buffers, each able to hold a maximal datagram.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use super::socket::DATAGRAM_BYTES_MAX;

/// Datagrams one `sendmmsg` or `recvmmsg` carries at most: a client's credit window (32
/// packets), and what a pass of 4 clients x QD32 one-packet ops sends in a few calls.
pub const BATCH_MAX: usize = 32;

/// Datagrams queued for `sendmmsg`: each a head copied into its own slot, then up to two
/// borrowed parts (or, once owned, nothing borrowed: the whole datagram in the slot).
pub struct SendBatch {
    /// `BATCH_MAX` slots of `DATAGRAM_BYTES_MAX` bytes.
    bytes: Box<[u8]>,
    slots: [Slot; BATCH_MAX],
    /// Each slot's destination, as the kernel takes it (made at push, not per call).
    names: [(libc::sockaddr_storage, libc::socklen_t); BATCH_MAX],
    /// Queued datagrams are slots `first..end`; the socket took the ones before `first`.
    first: usize,
    end: usize,
    /// `sendmmsg` calls made, for the port's counters.
    pub calls: u64,
}

/// What one queued datagram is made of.
#[derive(Clone, Copy)]
struct Slot {
    /// Bytes at the start of the slot's own storage, sent first.
    own: usize,
    /// Bytes sent after them, where the caller keeps them (`push_borrowed`'s contract); empty
    /// parts are (null, 0). Raw because they outlive the borrow that gave them, up to the
    /// next `send_queued`, which owns whatever it leaves queued.
    borrowed: [(*const u8, usize); 2],
}

const EMPTY_SLOT: Slot = Slot {
    own: 0,
    borrowed: [(std::ptr::null(), 0); 2],
};

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch::new()
    }
}

impl SendBatch {
    /// Set-up time: allocates the slots (`BATCH_MAX` x 8,972 bytes).
    pub fn new() -> SendBatch {
        SendBatch {
            bytes: vec![0u8; BATCH_MAX * DATAGRAM_BYTES_MAX].into_boxed_slice(),
            slots: [EMPTY_SLOT; BATCH_MAX],
            names: [(zeroed_storage(), 0); BATCH_MAX],
            first: 0,
            end: 0,
            calls: 0,
        }
    }

    /// Datagrams queued and not yet taken by the socket.
    pub fn queued(&self) -> usize {
        self.end - self.first
    }

    /// True when no slot is left: `send_queued` first.
    pub fn is_full(&self) -> bool {
        self.end == BATCH_MAX
    }

    /// Queues one datagram made of `parts` back to back, for `to`, copied whole into its slot.
    /// False when full.
    pub fn push(&mut self, to: &SocketAddr, parts: [&[u8]; 3]) -> bool {
        let Some(slot) = self.take_slot(to, parts.iter().map(|p| p.len()).sum()) else {
            return false;
        };
        let storage = &mut self.bytes[slot * DATAGRAM_BYTES_MAX..][..DATAGRAM_BYTES_MAX];
        let mut at = 0;
        for part in parts {
            storage[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        self.slots[slot].own = at;
        true
    }

    /// Queues one datagram for `to`: `head` copied into its slot, then `body`'s two parts
    /// sent from where they are. False when full.
    ///
    /// # Safety
    /// `body`'s bytes must stay valid and unchanged until the next `send_queued` returns
    /// (which sends them or copies them into the slot).
    pub unsafe fn push_borrowed(&mut self, to: &SocketAddr, head: &[u8], body: [&[u8]; 2]) -> bool {
        let len = head.len() + body[0].len() + body[1].len();
        let Some(slot) = self.take_slot(to, len) else {
            return false;
        };
        self.bytes[slot * DATAGRAM_BYTES_MAX..][..head.len()].copy_from_slice(head);
        self.slots[slot].own = head.len();
        for (kept, part) in self.slots[slot].borrowed.iter_mut().zip(body) {
            *kept = if part.is_empty() {
                (std::ptr::null(), 0)
            } else {
                (part.as_ptr(), part.len())
            };
        }
        true
    }

    /// The next slot, with its destination set, for a datagram of `len` bytes.
    fn take_slot(&mut self, to: &SocketAddr, len: usize) -> Option<usize> {
        if self.is_full() {
            return None;
        }
        assert!(
            len <= DATAGRAM_BYTES_MAX,
            "datagram of {len} bytes over the limit"
        );
        let slot = self.end;
        self.end += 1;
        self.slots[slot] = EMPTY_SLOT;
        self.names[slot] = sockaddr_of(*to);
        Some(slot)
    }

    /// Hands the queued datagrams to the socket, as many as it takes (`sendmmsg`, non-blocking).
    /// What a full socket did not take stays queued (`Ok` either way), copied into its slot.
    /// A socket error is reported once and the datagram it concerns is dropped, as a lost
    /// datagram would be (the RPC resends), so one bad peer cannot wedge the queue.
    pub fn send_queued(&mut self, fd: RawFd) -> io::Result<()> {
        let result = self.send_some(fd);
        self.own_queued();
        result
    }

    fn send_some(&mut self, fd: RawFd) -> io::Result<()> {
        while self.first < self.end {
            let count = self.end - self.first;
            let mut iovecs = [MaybeUninit::<libc::iovec>::uninit(); BATCH_MAX * 3];
            let mut headers = [MaybeUninit::<libc::mmsghdr>::uninit(); BATCH_MAX];
            let mut next_iovec = 0;
            for i in 0..count {
                let slot = self.first + i;
                let parts = &self.slots[slot];
                let first_iovec = next_iovec;
                iovecs[next_iovec].write(libc::iovec {
                    iov_base: self.bytes[slot * DATAGRAM_BYTES_MAX..].as_ptr() as *mut _,
                    iov_len: parts.own,
                });
                next_iovec += 1;
                for &(ptr, len) in parts.borrowed.iter().filter(|(_, len)| *len > 0) {
                    iovecs[next_iovec].write(libc::iovec {
                        iov_base: ptr as *mut _,
                        iov_len: len,
                    });
                    next_iovec += 1;
                }
                // SAFETY: an all-zero mmsghdr is a valid value (null pointers, zero lengths);
                // the fields sendmmsg reads are set just below.
                let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
                header.msg_hdr.msg_name =
                    (&mut self.names[slot].0 as *mut libc::sockaddr_storage).cast();
                header.msg_hdr.msg_namelen = self.names[slot].1;
                header.msg_hdr.msg_iov = iovecs[first_iovec].as_mut_ptr();
                header.msg_hdr.msg_iovlen = next_iovec - first_iovec;
                headers[i].write(header);
            }
            self.calls += 1;
            // SAFETY: `headers[..count]` are initialized above; each names a live sockaddr of
            // the given length and iovecs over live bytes: the slot's own, and borrowed ones
            // `push_borrowed`'s caller keeps valid until this call returns. The kernel only
            // reads them (and writes `msg_len` in `headers`).
            let sent = unsafe {
                libc::sendmmsg(
                    fd,
                    headers.as_mut_ptr().cast(),
                    count as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if sent < 0 {
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::WouldBlock => return Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.first += 1; // the datagram the error is about
                        self.reset_if_empty();
                        return Err(error);
                    }
                }
            }
            self.first += sent as usize;
            self.reset_if_empty();
        }
        Ok(())
    }

    /// Copies the borrowed parts of every datagram still queued into its slot, so none
    /// points at the caller's bytes once `send_queued` has returned.
    fn own_queued(&mut self) {
        for slot in self.first..self.end {
            let parts = self.slots[slot];
            let storage = &mut self.bytes[slot * DATAGRAM_BYTES_MAX..][..DATAGRAM_BYTES_MAX];
            let mut at = parts.own;
            for &(ptr, len) in parts.borrowed.iter().filter(|(_, len)| *len > 0) {
                // SAFETY: `push_borrowed`'s caller keeps these bytes valid until this
                // `send_queued` returns, and they are not the batch's own storage.
                let part = unsafe { std::slice::from_raw_parts(ptr, len) };
                storage[at..at + len].copy_from_slice(part);
                at += len;
            }
            self.slots[slot] = Slot {
                own: at,
                ..EMPTY_SLOT
            };
        }
    }

    fn reset_if_empty(&mut self) {
        if self.first == self.end {
            self.first = 0;
            self.end = 0;
        }
    }
}

/// Receives up to `buffers.len()` datagrams in one `recvmmsg` (non-blocking), each into its
/// own buffer (which should hold a maximal datagram: a longer one is cut, and then fails the
/// packet checks). Writes each one's length and sender into `got` and returns how many came:
/// 0 when none was waiting.
pub fn recv_batch(
    fd: RawFd,
    buffers: &mut [&mut [u8]],
    got: &mut [(usize, SocketAddr); BATCH_MAX],
) -> io::Result<usize> {
    let count = buffers.len().min(BATCH_MAX);
    if count == 0 {
        return Ok(0);
    }
    let mut names = [MaybeUninit::<libc::sockaddr_storage>::uninit(); BATCH_MAX];
    let mut iovecs = [MaybeUninit::<libc::iovec>::uninit(); BATCH_MAX];
    let mut headers = [MaybeUninit::<libc::mmsghdr>::uninit(); BATCH_MAX];
    for i in 0..count {
        iovecs[i].write(libc::iovec {
            iov_base: buffers[i].as_mut_ptr().cast(),
            iov_len: buffers[i].len(),
        });
        // SAFETY: an all-zero mmsghdr is a valid value; the fields recvmmsg reads are set here.
        let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
        header.msg_hdr.msg_name = names[i].as_mut_ptr().cast();
        header.msg_hdr.msg_namelen =
            std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        header.msg_hdr.msg_iov = iovecs[i].as_mut_ptr();
        header.msg_hdr.msg_iovlen = 1;
        headers[i].write(header);
    }
    loop {
        // SAFETY: `headers[..count]` are initialized above; each names a sockaddr_storage of
        // `names` and one iovec over
        // a live, exclusively borrowed buffer of the given length; the kernel writes at most
        // that many bytes into each, and the names and lengths into `names` and `headers`.
        let received = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr().cast(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            let error = io::Error::last_os_error();
            return match error.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                io::ErrorKind::Interrupted => continue,
                _ => Err(error),
            };
        }
        let received = received as usize;
        for i in 0..received {
            // SAFETY: the kernel filled the first `received` headers, and each one's name
            // (`msg_namelen` bytes of it, at most a sockaddr_storage; the rest is not read).
            let (header, name) =
                unsafe { (headers[i].assume_init_ref(), names[i].assume_init_ref()) };
            let from = socket_addr_of(name, header.msg_hdr.msg_namelen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            got[i] = (header.msg_len as usize, from);
        }
        return Ok(received);
    }
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// A socket address as the kernel takes it.
pub fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage = zeroed_storage();
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The address the kernel wrote into `storage` (`len` bytes); None for a family other than
/// IPv4 and IPv6.
fn socket_addr_of(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and it is long enough;
            // sockaddr_storage is aligned for it.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn recv_all(socket: &UdpSocket, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut out = Vec::new();
        let mut storage = vec![vec![0u8; DATAGRAM_BYTES_MAX]; 5];
        let mut got = [(0, SocketAddr::from(([0, 0, 0, 0], 0))); BATCH_MAX];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.len() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {want}",
                out.len()
            );
            let mut buffers: Vec<&mut [u8]> = storage.iter_mut().map(|b| &mut b[..]).collect();
            let n = recv_batch(socket.as_raw_fd(), &mut buffers, &mut got).unwrap();
            assert!(n <= 5, "never more than the buffers given");
            for (i, &(len, from)) in got[..n].iter().enumerate() {
                out.push((storage[i][..len].to_vec(), from));
            }
        }
        out
    }

    #[test]
    fn a_batch_goes_out_whole_in_order_and_comes_back_in_batches() {
        let (a, b) = pair();
        let to = b.local_addr().unwrap();
        let mut batch = SendBatch::new();
        for i in 0..12u8 {
            let payload = vec![i; 100 * usize::from(i)];
            assert!(batch.push(&to, [&[0xa0, i], &payload, b"end"]));
        }
        assert_eq!(batch.queued(), 12);
        batch.send_queued(a.as_raw_fd()).unwrap();
        assert_eq!(batch.queued(), 0);
        assert_eq!(batch.calls, 1, "twelve datagrams, one system call");
        let got = recv_all(&b, 12);
        for (i, (bytes, from)) in got.iter().enumerate() {
            let i = i as u8;
            let mut want = vec![0xa0, i];
            want.extend(vec![i; 100 * usize::from(i)]);
            want.extend_from_slice(b"end");
            assert_eq!(bytes, &want, "datagram {i}: parts joined, in order");
            assert_eq!(*from, a.local_addr().unwrap());
        }
        assert!(
            recv_batch(
                b.as_raw_fd(),
                &mut [&mut [0u8; 64][..]],
                &mut [(0, to); BATCH_MAX]
            )
            .unwrap()
                == 0
        );
    }

    #[test]
    fn a_full_batch_refuses_more_until_sent() {
        let (a, b) = pair();
        let to = b.local_addr().unwrap();
        let mut batch = SendBatch::new();
        for i in 0..BATCH_MAX {
            assert!(batch.push(&to, [&[i as u8], b"", b""]));
        }
        assert!(batch.is_full());
        assert!(!batch.push(&to, [b"x", b"", b""]), "no slot left");
        batch.send_queued(a.as_raw_fd()).unwrap();
        assert!(!batch.is_full() && batch.queued() == 0);
        assert!(batch.push(&to, [b"y", b"", b""]));
        batch.send_queued(a.as_raw_fd()).unwrap();
        let got = recv_all(&b, BATCH_MAX + 1);
        let firsts: Vec<u8> = got.iter().map(|(bytes, _)| bytes[0]).collect();
        let mut want: Vec<u8> = (0..BATCH_MAX as u8).collect();
        want.push(b'y');
        assert_eq!(firsts, want);
    }

    #[test]
    fn a_socket_error_drops_only_its_datagram() {
        let (a, b) = pair();
        let to = b.local_addr().unwrap();
        // An IPv6 destination on an IPv4 socket: sendmmsg fails on it at once.
        let bad: SocketAddr = "[::1]:9".parse().unwrap();
        let mut batch = SendBatch::new();
        assert!(batch.push(&bad, [b"bad", b"", b""]));
        assert!(batch.push(&to, [b"good", b"", b""]));
        assert!(batch.send_queued(a.as_raw_fd()).is_err());
        assert_eq!(
            batch.queued(),
            1,
            "the bad datagram is dropped, the good one stays"
        );
        batch.send_queued(a.as_raw_fd()).unwrap();
        let got = recv_all(&b, 1);
        assert_eq!(got[0].0, b"good");
    }

    /// A borrowed datagram left queued by `send_queued` is copied into its slot before the
    /// call returns: the caller may change its bytes at once, and what goes out later is what
    /// was queued.
    #[test]
    fn borrowed_parts_left_queued_are_owned_before_send_queued_returns() {
        let (a, b) = pair();
        let to = b.local_addr().unwrap();
        let bad: SocketAddr = "[::1]:9".parse().unwrap();
        let mut payload = vec![0x11u8; 3000];
        let tail = vec![0x22u8; 1000];
        let mut batch = SendBatch::new();
        assert!(batch.push(&bad, [b"bad", b"", b""]));
        // SAFETY: `payload` and `tail` are not touched until `send_queued` has returned.
        assert!(unsafe { batch.push_borrowed(&to, b"head", [&payload, &tail]) });
        assert!(
            batch.send_queued(a.as_raw_fd()).is_err(),
            "the first datagram fails, the call stops there"
        );
        assert_eq!(batch.queued(), 1);
        payload.fill(0xee); // the caller's bytes change after the call
        batch.send_queued(a.as_raw_fd()).unwrap();
        let got = recv_all(&b, 1);
        let mut want = b"head".to_vec();
        want.extend(vec![0x11u8; 3000]);
        want.extend(vec![0x22u8; 1000]);
        assert_eq!(got[0].0, want, "the bytes as queued");
    }

    #[test]
    fn borrowed_parts_sent_at_once_are_not_copied_first() {
        let (a, b) = pair();
        let to = b.local_addr().unwrap();
        let payload = vec![7u8; 4096];
        let mut batch = SendBatch::new();
        // SAFETY: `payload` outlives the `send_queued` call below and is not changed.
        assert!(unsafe { batch.push_borrowed(&to, &[1, 2, 3], [&payload, &[]]) });
        batch.send_queued(a.as_raw_fd()).unwrap();
        assert_eq!(batch.queued(), 0);
        let got = recv_all(&b, 1);
        assert_eq!(&got[0].0[..3], &[1, 2, 3]);
        assert_eq!(&got[0].0[3..], &payload[..]);
    }

    #[test]
    fn addresses_round_trip_through_the_kernel_form() {
        for addr in ["127.0.0.1:6800", "10.1.2.3:1", "[::1]:443", "[fe80::1%2]:9"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let (storage, len) = sockaddr_of(addr);
            assert_eq!(socket_addr_of(&storage, len), Some(addr));
        }
        assert_eq!(socket_addr_of(&zeroed_storage(), 0), None);
    }
}
