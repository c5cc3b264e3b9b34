//! Receive: reading NBD connections and consuming what arrived (options or requests), and
//! the zero/trim requests whose parts wait for room.

use super::*;

impl NbdFrontend {
    /// Reads every connection with pending bytes, turning requests into parts (only issues
    /// the rest of zero requests when `reading` is false: the server is stopping). Returns
    /// work done.
    pub fn poll_rx(&mut self, pools: &mut CorePools, reading: bool) -> usize {
        let mut work = self.pump_zero_requests(pools);
        if !reading {
            return work;
        }
        let mut visits = self.rx_list.len();
        while visits > 0 {
            visits -= 1;
            let index = self.rx_list.pop_front().expect("visits <= list length");
            let outcome = self.read_connection(index, pools);
            work += outcome.0;
            match outcome.1 {
                Rx::Paused => self.rx_list.push_back(index),
                Rx::Drained => {
                    if let Some(conn) = self.conns[index as usize].as_mut() {
                        conn.in_rx_list = false;
                    }
                }
                Rx::Close => self.close(index, pools),
            }
        }
        work
    }

    fn read_connection(&mut self, index: u32, pools: &mut CorePools) -> (usize, Rx) {
        let mut work = 0;
        let mut socket_drained = false;
        loop {
            let conn = self.conns[index as usize]
                .as_mut()
                .expect("listed connections are open");
            if conn.closing {
                return (work, Rx::Drained);
            }
            match consume(&mut self.work, conn, index, pools) {
                Consume::Progress => {
                    work += 1;
                    self.want_tx(index);
                    continue;
                }
                Consume::Paused => return (work, Rx::Paused),
                Consume::Wait => return (work, Rx::Drained),
                Consume::Close => return (work, Rx::Close),
                Consume::CloseAfterReplies => {
                    conn.closing = true;
                    self.want_tx(index);
                    return (work, Rx::Drained);
                }
                Consume::NeedBytes => {}
            }
            if socket_drained && !conn.peer_closed {
                // The last recv returned less than it could take: the socket is empty, and
                // edge-triggered epoll reports the next arrival. Saves one recv per pass.
                return (work, Rx::Drained);
            }
            // Make room at the end of the buffer for the rest of what is pending.
            if conn.in_start == conn.in_end {
                conn.in_start = 0;
                conn.in_end = 0;
            } else if conn.in_start > 0 && conn.inbuf.len() - conn.in_end < self.work.part_bytes {
                conn.inbuf.copy_within(conn.in_start..conn.in_end, 0);
                conn.in_end -= conn.in_start;
                conn.in_start = 0;
            }
            let target = &mut conn.inbuf[conn.in_end..];
            // SAFETY: `target` is a live, exclusively borrowed byte slice; recv writes at most its length.
            let received = unsafe {
                libc::recv(
                    conn.stream.as_raw_fd(),
                    target.as_mut_ptr().cast(),
                    target.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if received > 0 {
                socket_drained = (received as usize) < target.len();
                conn.in_end += received as usize;
                continue;
            }
            let error = io::Error::last_os_error();
            if received < 0 && error.kind() == io::ErrorKind::WouldBlock {
                return (work, Rx::Drained);
            }
            if received < 0 && error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if conn.in_end > conn.in_start || conn.write.is_some() {
                log::info!("core {}: NBD client went away mid-request", self.work.core);
            }
            return (work, Rx::Close);
        }
    }

    /// Issues more parts of zero/trim requests, as earlier ones finish.
    fn pump_zero_requests(&mut self, pools: &mut CorePools) -> usize {
        let mut work = 0;
        for _ in 0..self.work.pump.len() {
            let request_ref = self.work.pump.pop_front().expect("counted");
            let request = self.work.requests.get(request_ref);
            request.in_pump = false;
            let (conn_index, generation) = (request.conn, request.conn_generation);
            let export = match self.conns[conn_index as usize].as_ref() {
                Some(conn) if conn.generation == generation => conn.export,
                _ => None,
            };
            let Some(export) = export else {
                // The client went away: issue nothing more.
                let request = self.work.requests.get(request_ref);
                request.remaining = 0;
                if request.parts_done == request.parts_issued {
                    free_request(&mut self.work, pools, request_ref);
                }
                continue;
            };
            work += issue_zero_parts(&mut self.work, request_ref, &export, pools);
            schedule_zero(&mut self.work, request_ref);
        }
        work
    }
}

enum Rx {
    Drained,
    Paused,
    Close,
}

pub(super) enum Consume {
    /// Something was consumed; try again.
    Progress,
    /// More bytes are needed.
    NeedBytes,
    /// Out of resources (slots, buffers, in-flight limit): try again next pass.
    Paused,
    /// Waiting for a negotiation read: the completion puts the connection back on the list.
    Wait,
    Close,
    CloseAfterReplies,
}

/// Consumes what the connection has buffered: one step.
fn consume(work: &mut Work, conn: &mut Conn, index: u32, pools: &mut CorePools) -> Consume {
    let available = conn.in_end - conn.in_start;
    if conn.discard > 0 {
        if available == 0 {
            return Consume::NeedBytes;
        }
        let dropped = (available as u64).min(conn.discard);
        conn.in_start += dropped as usize;
        conn.discard -= dropped;
        return Consume::Progress;
    }
    match conn.phase {
        Phase::ClientFlags => {
            if available < 4 {
                return Consume::NeedBytes;
            }
            let mut raw = [0u8; 4];
            raw.copy_from_slice(&conn.inbuf[conn.in_start..conn.in_start + 4]);
            conn.in_start += 4;
            match nbd::parse_client_flags(&raw) {
                Ok(no_zeroes) => conn.no_zeroes = no_zeroes,
                Err(flags) => {
                    log::info!("NBD client flags {flags:#x} not supported: closing");
                    work.stats.protocol_errors += 1;
                    return Consume::Close;
                }
            }
            conn.phase = Phase::Options;
            Consume::Progress
        }
        Phase::Options => consume_option(work, conn, index, pools),
        Phase::Transmission => consume_request(work, conn, index, pools),
    }
}
