//! Send: replies queued per connection and written with one `writev` per connection per pass.

use super::*;

impl NbdFrontend {
    pub(super) fn want_tx(&mut self, index: u32) {
        let conn = self.conns[index as usize].as_mut().expect("open");
        if !conn.in_tx_list {
            conn.in_tx_list = true;
            self.tx_list.push(index);
        }
    }

    /// Writes queued output, one writev per connection. Returns replies completed.
    pub fn flush_tx(&mut self, pools: &mut CorePools) -> usize {
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
        if conn.ctl_sent < conn.ctl.len() {
            let piece = &conn.ctl[conn.ctl_sent..];
            // SAFETY: `piece` is a live slice for the duration of the call; send only reads it.
            let written = unsafe {
                libc::send(
                    conn.stream.as_raw_fd(),
                    piece.as_ptr().cast(),
                    piece.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if written < 0 {
                return self.write_failed(index, pools);
            }
            conn.ctl_sent += written as usize;
            if conn.ctl_sent < conn.ctl.len() {
                return (0, true);
            }
            conn.ctl.clear();
            conn.ctl_sent = 0;
        }
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; TX_IOVECS_MAX];
        let mut count = 0;
        for reply in conn.tx.iter() {
            let parts = reply.body.map_or(0, |r| {
                let request = self.work.requests.get(r);
                match request.kind {
                    Kind::BlockStatus => 1,
                    _ => request.parts_issued as usize,
                }
            });
            if count + 1 + 2 * parts > TX_IOVECS_MAX {
                break;
            }
            let mut skip = reply.sent;
            let mut push = |piece: &[u8]| {
                if skip >= piece.len() {
                    skip -= piece.len();
                    return;
                }
                iovecs[count] = libc::iovec {
                    iov_base: piece[skip..].as_ptr() as *mut _,
                    iov_len: piece.len() - skip,
                };
                count += 1;
                skip = 0;
            };
            push(&reply.head[..usize::from(reply.head_len)]);
            if let Some(body) = reply.body {
                let request = self.work.requests.get(body);
                if request.kind == Kind::BlockStatus {
                    push(&request.extents[..body_len(request)]);
                    continue;
                }
                for part in 0..parts {
                    let length = request.lengths[part] as usize;
                    let data = request.outputs[part]
                        .as_ref()
                        .map_or(&[][..], |b| b.sealed());
                    let data = &data[..data.len().min(length)];
                    push(data);
                    push(&ZEROES[..length - data.len()]);
                }
            }
        }
        if count == 0 {
            conn.in_tx_list = false;
            if conn.closing && conn.inflight == 0 {
                self.close(index, pools);
            }
            return (0, false);
        }
        // SAFETY: every iovec points into a reply head, a request's output buffer or ZEROES,
        // none of which is touched until writev returns; writev only reads them.
        let written =
            unsafe { libc::writev(conn.stream.as_raw_fd(), iovecs.as_ptr(), count as i32) };
        if written < 0 {
            return self.write_failed(index, pools);
        }
        let mut remaining = written as usize;
        let mut completed = 0;
        let conn = self.conns[index as usize].as_mut().expect("open");
        while let Some(front) = conn.tx.front_mut() {
            let length = usize::from(front.head_len)
                + front
                    .body
                    .map_or(0, |r| body_len(self.work.requests.get(r)));
            let left = length - front.sent;
            if remaining < left {
                front.sent += remaining;
                break;
            }
            remaining -= left;
            let reply = conn.tx.pop_front().expect("front exists");
            conn.inflight -= 1;
            completed += 1;
            if let Some(body) = reply.body {
                free_request(&mut self.work, pools, body);
            }
        }
        if conn.inflight < INFLIGHT_PER_CONNECTION_MAX && !conn.in_rx_list && !conn.closing {
            conn.in_rx_list = true; // It may have stopped reading at the in-flight limit.
            self.rx_list.push_back(index);
        }
        if conn.tx.is_empty() {
            conn.in_tx_list = false;
            if conn.closing && conn.inflight == 0 {
                self.close(index, pools);
            }
            return (completed, false);
        }
        (completed, true)
    }

    fn write_failed(&mut self, index: u32, pools: &mut CorePools) -> (usize, bool) {
        let error = io::Error::last_os_error();
        let conn = self.conns[index as usize].as_mut().expect("open");
        match error.kind() {
            io::ErrorKind::WouldBlock => {
                conn.in_tx_list = false; // EPOLLOUT puts it back.
                (0, false)
            }
            io::ErrorKind::Interrupted => (0, true),
            _ => {
                log::info!(
                    "core {}: NBD write failed, closing: {error}",
                    self.work.core
                );
                self.close(index, pools);
                (0, false)
            }
        }
    }
}

/// Queues a reply; `read` is a successful read: its request (whose outputs follow the head),
/// offset and length.
pub(super) fn queue_reply(
    conn: &mut Conn,
    error: u32,
    cookie: u64,
    read: Option<(OpRef, u64, u32)>,
) {
    // The in-flight limit bounds the queue: it never grows past its capacity from accept.
    assert!(conn.tx.len() < conn.tx.capacity(), "NBD tx queue overflow");
    let (head, head_len) = nbd::reply_head(
        conn.structured,
        error,
        cookie,
        read.map(|(_, offset, length)| (offset, length)),
    );
    let body = read.map(|(request, _, _)| request);
    conn.tx.push_back(TxReply {
        head,
        head_len: head_len as u8,
        body,
        sent: 0,
    });
}
