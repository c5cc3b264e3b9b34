//! Send: replies queued per connection (heads inline, payload by reference) and written
//! with one `writev` per connection per pass.

use super::rx::retire_idle_chunk;
use super::*;

impl TcpTransport {
    /// Queues the reply to a frame delivered on `conn`. A connection that has gone away gets
    /// nothing and the body comes back to the caller to release.
    pub fn reply(
        &mut self,
        conn: ConnId,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    ) -> Result<(), Body> {
        let open = self
            .conns
            .get(conn.index as usize)
            .and_then(|c| c.as_ref())
            .is_some_and(|c| c.generation == conn.generation);
        if !open {
            return Err(body);
        }
        self.queue(conn.index, request, status, results, body, true);
        Ok(())
    }

    pub(super) fn queue(
        &mut self,
        index: u32,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
        answers_frame: bool,
    ) {
        let conn = self.conns[index as usize].as_mut().expect("open");
        // The in-flight limit bounds the queue: it never grows past its start-up capacity,
        // nor past the head slots (so no queued reply's head is overwritten).
        assert!(
            conn.tx.len() < conn.tx.capacity() && conn.tx.len() < conn.heads.len(),
            "tx queue overflow: in-flight limit not enforced"
        );
        // Encoded in its slot, where it stays until written (`Connection::heads`).
        let head_slot = conn.next_head;
        conn.next_head = (head_slot + 1) % conn.heads.len();
        let head = &mut conn.heads[head_slot];
        let head_len = match &body {
            // The store kept the crc of these bytes: the payload is not read here at all.
            Body::Stored(stored) => {
                if !conn.in_stored_list {
                    conn.in_stored_list = true;
                    self.stored_conns.push(index);
                }
                conn.stored += 1;
                self.stored_bodies += 1;
                self.stats.stored_bodies_tx += 1;
                wire::encode_reply_with_output_crc(
                    head,
                    request,
                    status,
                    results,
                    stored.as_slice().len(),
                    stored.crc(),
                )
            }
            body => wire::encode_reply(head, request, status, results, &[body.as_slice()]),
        };
        conn.tx.push_back(TxReply {
            head_slot,
            head_len: head_len as u16,
            body,
            sent: 0,
            answers_frame,
        });
        if !conn.in_tx_list {
            conn.in_tx_list = true;
            self.tx_list.push(index);
        }
    }

    /// Writes queued replies, one writev per connection (on io_uring: one SENDMSG each, all
    /// in the pass's one enter). Returns the replies completed (on io_uring, plus the receive
    /// events that enter gathered).
    pub fn flush_tx(&mut self, pools: &mut CorePools) -> usize {
        if self.uring.is_some() {
            return self.uring_flush_tx(pools);
        }
        // Iterate over a swapped-out list: writing may close a connection, and closing edits
        // the list. Both vectors keep their start-up capacity, so the swap never allocates.
        let mut pending = std::mem::take(&mut self.tx_list_spare);
        std::mem::swap(&mut pending, &mut self.tx_list);
        let mut completed = 0;
        for &index in &pending {
            let (done, keep) = self.write_connection(index, pools);
            completed += done;
            if keep {
                self.tx_list.push(index);
            }
        }
        pending.clear();
        self.tx_list_spare = pending;
        completed
    }

    /// Returns (replies completed, stay on the tx list).
    fn write_connection(&mut self, index: u32, pools: &mut CorePools) -> (usize, bool) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            return (0, false);
        };
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; TX_IOVECS_MAX];
        let (iovec_count, _) = gather(conn, &mut iovecs, &mut self.tx_heads);
        if iovec_count == 0 {
            conn.in_tx_list = false;
            return (0, false);
        }
        self.stats.tx_syscalls += 1;
        self.stats.tx_iovecs += iovec_count as u64;
        // SAFETY: every iovec points into a reply head or body owned by `conn.tx`, or into
        // `tx_heads`, none of which is touched until writev returns; writev only reads them.
        let written =
            unsafe { libc::writev(conn.stream.as_raw_fd(), iovecs.as_ptr(), iovec_count as i32) };
        if written < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                conn.in_tx_list = false; // EPOLLOUT puts it back.
                return (0, false);
            }
            if error.kind() == io::ErrorKind::Interrupted {
                return (0, true);
            }
            log::info!(
                "core {}: write failed, closing connection: {error}",
                self.core
            );
            self.close(index, pools);
            return (0, false);
        }
        self.complete_written(index, written as usize, pools)
    }

    /// `written` bytes of the connection's queued replies reached the socket: completes the
    /// replies they finish and releases their buffers; closes a closing connection with
    /// nothing left to write. Returns (replies completed, stay on the tx list).
    pub(super) fn complete_written(
        &mut self,
        index: u32,
        written: usize,
        pools: &mut CorePools,
    ) -> (usize, bool) {
        let conn = self.conns[index as usize].as_mut().expect("open");
        self.stats.tx_bytes += written as u64;
        let mut remaining = written;
        let mut completed = 0;
        while let Some(front) = conn.tx.front_mut() {
            let left = front.len() - front.sent;
            if remaining < left {
                front.sent += remaining;
                remaining = 0;
                break;
            }
            remaining -= left;
            let reply = conn.tx.pop_front().expect("front exists");
            if reply.answers_frame {
                conn.inflight -= 1;
            }
            if matches!(reply.body, Body::Stored(_)) {
                conn.stored -= 1;
                self.stored_bodies -= 1;
            }
            completed += 1;
            if let Some(foreign) = pools.release_body(reply.body) {
                self.foreign.push(foreign);
            }
        }
        assert_eq!(remaining, 0, "the kernel wrote no more than was queued");
        self.stats.replies_tx += completed as u64;
        let conn = self.conns[index as usize].as_mut().expect("open");
        // A connection that stopped reading at the in-flight limit (or the budget, or an
        // empty pool) stayed on the rx list (`Paused`); one off the list drained its socket,
        // and edge-triggered epoll reports its next bytes. So it is not listed again to be
        // read (that cost a recv per write that found nothing, EAGAIN); only its receive chunk,
        // kept while the frames it answered were leased, goes back to the pool now if idle
        // (1,000 idle connections must not hold 1,000 chunks). On io_uring a chunk under a
        // posted receive is the kernel's: that receive is cancelled instead.
        if !conn.in_rx_list {
            if self.uring.is_some() {
                if conn.rx_op == RxOp::None {
                    retire_idle_chunk(conn, pools);
                } else {
                    self.uring_release_idle(index);
                }
            } else {
                retire_idle_chunk(conn, pools);
            }
        }
        let conn = self.conns[index as usize].as_mut().expect("open");
        if conn.tx.is_empty() {
            conn.in_tx_list = false;
            if conn.closing {
                self.close(index, pools);
            }
            return (completed, false);
        }
        (completed, true)
    }

    pub fn has_pending_tx(&self) -> bool {
        !self.tx_list.is_empty()
    }
}

/// Builds the iovecs of one write of `conn`'s queued replies: heads of replies without a body
/// packed back to back into `heads` (a run of them is one iovec), a reply with a body as its
/// head and body by reference. Returns (iovecs used, bytes of `heads` used).
pub(super) fn gather(
    conn: &Connection,
    iovecs: &mut [libc::iovec; TX_IOVECS_MAX],
    heads: &mut [u8],
) -> (usize, usize) {
    let mut iovec_count = 0;
    // Bytes of `heads` in use, and whether the last iovec ends there (a packed head that the
    // next one may extend).
    let mut heads_used = 0;
    let mut last_is_packed = false;
    for reply in conn.tx.iter() {
        if iovec_count + 2 > TX_IOVECS_MAX {
            break;
        }
        let head = &conn.heads[reply.head_slot][..usize::from(reply.head_len)];
        let body = reply.body.as_slice();
        let mut skip = reply.sent;
        if skip < head.len() {
            let piece = &head[skip..];
            if body.is_empty() {
                if heads_used + piece.len() > heads.len() {
                    break;
                }
                let packed = &mut heads[heads_used..heads_used + piece.len()];
                packed.copy_from_slice(piece);
                if last_is_packed {
                    iovecs[iovec_count - 1].iov_len += piece.len();
                } else {
                    iovecs[iovec_count] = libc::iovec {
                        iov_base: packed.as_mut_ptr().cast(),
                        iov_len: piece.len(),
                    };
                    iovec_count += 1;
                }
                heads_used += piece.len();
                last_is_packed = true;
            } else {
                iovecs[iovec_count] = libc::iovec {
                    iov_base: piece.as_ptr() as *mut _,
                    iov_len: piece.len(),
                };
                iovec_count += 1;
                last_is_packed = false;
            }
            skip = 0;
        } else {
            skip -= head.len();
        }
        if skip < body.len() {
            iovecs[iovec_count] = libc::iovec {
                iov_base: body[skip..].as_ptr() as *mut _,
                iov_len: body.len() - skip,
            };
            iovec_count += 1;
            last_is_packed = false;
        }
    }
    debug_assert!(iovec_count <= TX_IOVECS_MAX && heads_used <= heads.len());
    (iovec_count, heads_used)
}
