//! Receive: reading connections into pooled chunks, cutting frames out of them in place,
//! and what happens to a connection that stalls mid-frame or sends a frame it must refuse.

use super::*;

impl TcpTransport {
    /// Reads from connections with pending bytes and hands up to `budget` complete frames to
    /// `on_frame`. Returns the number of frames delivered.
    pub fn poll_rx(
        &mut self,
        pools: &mut CorePools,
        budget: usize,
        on_frame: &mut dyn FnMut(RxFrame),
    ) -> usize {
        if self.uring.is_some() {
            // Completions a park's enter gathered (the pass's own enter is in `flush_tx`).
            self.reap(Some(pools));
        }
        let mut delivered = 0;
        let mut visits = self.rx_list.len();
        while visits > 0 && delivered < budget {
            visits -= 1;
            // An eviction (`evict_stalled`) may take a listed connection out of the list.
            let Some(index) = self.rx_list.pop_front() else {
                break;
            };
            let outcome =
                self.read_connection(index, pools, budget - delivered, &mut delivered, on_frame);
            match outcome {
                RxOutcome::Paused => self.rx_list.push_back(index),
                RxOutcome::Drained => {
                    if let Some(conn) = self.conns[index as usize].as_mut() {
                        conn.in_rx_list = false;
                    }
                }
                RxOutcome::Closed => {}
            }
        }
        delivered
    }

    fn read_connection(
        &mut self,
        index: u32,
        pools: &mut CorePools,
        budget: usize,
        delivered: &mut usize,
        on_frame: &mut dyn FnMut(RxFrame),
    ) -> RxOutcome {
        let limits = self.config.limits;
        let inflight_max = self.config.inflight_per_connection_max;
        let mut local_delivered = 0;
        let mut socket_drained = false;
        loop {
            let conn = self.conns[index as usize]
                .as_mut()
                .expect("listed connections are open");
            if conn.closing {
                return RxOutcome::Drained;
            }
            // 1. Hand up every complete frame already received.
            let pending_len = loop {
                if local_delivered == budget || conn.inflight >= inflight_max {
                    *delivered += local_delivered;
                    return RxOutcome::Paused;
                }
                match next_frame(conn, pools, &limits) {
                    Ok(FrameStep::Frame(header, frame)) => {
                        if conn.stalled_since.take().is_some() {
                            self.stalled_count -= 1;
                        }
                        conn.inflight += 1;
                        local_delivered += 1;
                        self.stats.frames_rx += 1;
                        on_frame(RxFrame {
                            conn: ConnId {
                                index,
                                generation: conn.generation,
                            },
                            header,
                            frame,
                        });
                    }
                    Ok(FrameStep::NeedMore(len)) => break len,
                    Err((error, request_id)) => {
                        *delivered += local_delivered;
                        self.reject_stream(index, error, request_id);
                        return RxOutcome::Drained;
                    }
                }
            };
            // 2. Make room for the rest of the pending frame, then receive.
            if self.uring.is_some() {
                *delivered += local_delivered;
                return self.uring_post_receive(index, pools, pending_len);
            }
            let conn = self.conns[index as usize].as_mut().expect("still open");
            if socket_drained && !conn.peer_closed {
                // The last recv returned less than it could take: the socket is empty, and
                // edge-triggered epoll reports the next arrival. Saves one EAGAIN recv per
                // connection per pass.
                *delivered += local_delivered;
                retire_idle_chunk(conn, pools);
                self.stalled_count = note_stall(conn, self.stalled_count);
                return RxOutcome::Drained;
            }
            if !self.ensure_room(index, pools, pending_len) {
                *delivered += local_delivered;
                return RxOutcome::Paused;
            }
            let conn = self.conns[index as usize].as_mut().expect("still open");
            let (target, is_large) = match conn.large.as_mut() {
                Some((buf, frame_len)) => {
                    let want = *frame_len - buf.sealed_len();
                    (&mut buf.spare_mut()[..want], true)
                }
                None => (
                    conn.rx
                        .as_mut()
                        .expect("make_room provides a chunk")
                        .spare_mut(),
                    false,
                ),
            };
            self.stats.rx_syscalls += 1;
            let target_len = target.len();
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
                let received = received as usize;
                socket_drained = received < target_len;
                self.stats.rx_bytes += received as u64;
                match conn.large.as_mut() {
                    Some((buf, _)) if is_large => buf.seal(received),
                    _ => conn.rx.as_mut().expect("chunk").seal(received),
                }
                continue;
            }
            *delivered += local_delivered;
            let error = io::Error::last_os_error();
            if received < 0 && error.kind() == io::ErrorKind::WouldBlock {
                retire_idle_chunk(conn, pools);
                self.stalled_count = note_stall(conn, self.stalled_count);
                return RxOutcome::Drained;
            }
            if received < 0 && error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let partial = conn.large.is_some()
                || conn
                    .rx
                    .as_ref()
                    .is_some_and(|b| b.sealed_len() > conn.consumed);
            if partial {
                self.stats.truncated += 1;
                log::info!("core {}: connection closed mid-frame", self.core);
            }
            self.close(index, pools);
            return RxOutcome::Closed;
        }
    }

    /// Makes room for the rest of a pending frame of `pending_len` bytes (`make_room`), closing
    /// a stalled connection for its buffer if the pool is empty. False (counted in
    /// `rx_pool_waits`) when there is still no buffer: the connection waits.
    pub(super) fn ensure_room(
        &mut self,
        index: u32,
        pools: &mut CorePools,
        pending_len: usize,
    ) -> bool {
        let conn = self.conns[index as usize].as_mut().expect("open");
        if make_room(conn, pools, pending_len, &mut self.stats) {
            return true;
        }
        let want_large = pending_len > pools.small.buffer_size();
        if !self.evict_stalled(index, pools, want_large) {
            self.stats.rx_pool_waits += 1;
            return false;
        }
        let conn = self.conns[index as usize]
            .as_mut()
            .expect("not the evicted one");
        if !make_room(conn, pools, pending_len, &mut self.stats) {
            // The evicted connection's buffer is still leased by ops in flight (or, on
            // io_uring, still under its receive until that completes).
            self.stats.rx_pool_waits += 1;
            return false;
        }
        true
    }

    /// The pool `want_large` names is empty: closes the connection (not `except`) that has
    /// held a partial frame in a buffer of that pool the longest, if for `STALL_EVICT_AFTER`
    /// or more. Walks the connection table, but only when a pool is empty.
    fn evict_stalled(&mut self, except: u32, pools: &mut CorePools, want_large: bool) -> bool {
        if self.stalled_count == 0 {
            return false;
        }
        let now = Instant::now();
        let mut oldest: Option<(Instant, u32)> = None;
        for (index, slot) in self.conns.iter().enumerate() {
            let Some(conn) = slot.as_ref() else { continue };
            let Some(since) = conn.stalled_since else {
                continue;
            };
            let holds = if want_large {
                conn.large.is_some()
            } else {
                conn.rx.is_some()
            };
            if index as u32 == except || !holds || now.duration_since(since) < STALL_EVICT_AFTER {
                continue;
            }
            if oldest.map_or(true, |(first, _)| since < first) {
                oldest = Some((since, index as u32));
            }
        }
        let Some((since, victim)) = oldest else {
            return false;
        };
        self.stats.evicted += 1;
        self.stats.truncated += 1;
        log::info!(
            "core {}: closing a connection stalled mid-frame for {:?}: its buffer is needed",
            self.core,
            now.duration_since(since)
        );
        self.close(victim, pools);
        true
    }

    /// The core found the pool it needs (`want_large`: the large one) empty, for an op's
    /// output: frees a buffer held by a connection stalled mid-frame, if there is one.
    pub fn evict_stalled_for(&mut self, pools: &mut CorePools, want_large: bool) -> bool {
        self.evict_stalled(u32::MAX, pools, want_large)
    }

    /// The byte stream can no longer be trusted: answer once, then close after the answer is sent.
    fn reject_stream(&mut self, index: u32, error: HeaderError, request_id: u64) {
        let status = error.status();
        if status == Status::OverLimit {
            self.stats.over_limit += 1;
        } else {
            self.stats.malformed += 1;
        }
        log::info!("core {}: closing connection: {error}", self.core);
        let request = Header {
            opcode: 0,
            request_id,
            ..Header::default()
        };
        let conn = self.conns[index as usize].as_mut().expect("open");
        conn.closing = true;
        self.queue(index, &request, status, &[], Body::None, false);
    }

    /// Whether replies queued here still send bytes from store memory (`Body::Stored`).
    pub fn has_stored_bodies(&self) -> bool {
        self.stored_bodies > 0
    }

    /// Copies the bytes of every queued `Body::Stored` reply into a pool buffer of its own, so
    /// that the store may change or free its memory: the core calls this before any op that
    /// mutates the store (the rule `StoredBytes` relies on). False when a pool ran out of
    /// buffers first: some bodies still point into the store, and the mutation must wait
    /// (the next `flush_tx` writes some of them, or the next call copies the rest).
    pub fn copy_stored_bodies(&mut self, pools: &mut CorePools) -> bool {
        while let Some(&index) = self.stored_conns.last() {
            let conn = self.conns[index as usize]
                .as_mut()
                .expect("closing a connection takes it off the list");
            for reply in conn.tx.iter_mut() {
                if !matches!(reply.body, Body::Stored(_)) {
                    continue;
                }
                // Same bytes, so the crc already in the head still holds, and `sent` still
                // counts into the same sequence.
                if !reply.body.copy_stored(pools) {
                    return false;
                }
                conn.stored -= 1;
                self.stored_bodies -= 1;
                self.stats.stored_bodies_copied += 1;
            }
            assert_eq!(
                conn.stored, 0,
                "every stored body of the connection was copied"
            );
            conn.in_stored_list = false;
            self.stored_conns.pop();
        }
        assert_eq!(self.stored_bodies, 0);
        true
    }

    /// Bodies from other cores' pools that this core finished with; they must travel home.
    pub fn take_foreign(&mut self) -> Option<Body> {
        self.foreign.pop()
    }
}

enum FrameStep {
    Frame(Header, Lease),
    /// Bytes the pending frame needs in total (HEADER_SIZE while the header is incomplete).
    NeedMore(usize),
}

/// Takes the next complete frame out of the connection's receive state.
fn next_frame(
    conn: &mut Connection,
    pools: &mut CorePools,
    limits: &Limits,
) -> Result<FrameStep, (HeaderError, u64)> {
    if let Some((buf, frame_len)) = conn.large.as_ref() {
        if buf.sealed_len() < *frame_len {
            return Ok(FrameStep::NeedMore(*frame_len));
        }
        let (buf, frame_len) = conn.large.take().expect("checked above");
        let header = wire::parse_header(buf.sealed(), limits)
            .ok()
            .flatten()
            .expect("header checked when the frame started");
        let lease = pools.lease(&buf, 0, frame_len);
        pools.release(buf);
        return Ok(FrameStep::Frame(header, lease));
    }
    let Some(chunk) = conn.rx.as_ref() else {
        return Ok(FrameStep::NeedMore(HEADER_SIZE));
    };
    let available = &chunk.sealed()[conn.consumed..];
    let header = match wire::parse_header(available, limits) {
        Ok(Some(header)) => header,
        Ok(None) => return Ok(FrameStep::NeedMore(HEADER_SIZE)),
        Err(error) => {
            let request_id = if available.len() >= 16 {
                u64::from_le_bytes(available[8..16].try_into().unwrap())
            } else {
                0
            };
            return Err((error, request_id));
        }
    };
    let frame_len = header.frame_len();
    if available.len() < frame_len {
        return Ok(FrameStep::NeedMore(frame_len));
    }
    let lease = pools.lease(chunk, conn.consumed, frame_len);
    conn.consumed += frame_len;
    Ok(FrameStep::Frame(header, lease))
}

/// Ensures the connection can receive the rest of a frame of `pending_len` bytes. False when
/// the pools are exhausted (the connection waits; buffers come back as replies complete).
fn make_room(
    conn: &mut Connection,
    pools: &mut CorePools,
    pending_len: usize,
    stats: &mut TransportStats,
) -> bool {
    if conn.large.is_some() {
        return true;
    }
    let chunk_size = pools.small.buffer_size();
    let (partial_start, partial_end) = match conn.rx.as_ref() {
        Some(chunk) => (conn.consumed, chunk.sealed_len()),
        None => (0, 0),
    };
    let partial_len = partial_end - partial_start;
    if pending_len > chunk_size {
        let Some(mut large) = pools.acquire_rx_large() else {
            return false;
        };
        if let Some(chunk) = conn.rx.take() {
            copy_partial(&chunk, partial_start, partial_end, &mut large, stats);
            pools.release(chunk);
        }
        conn.consumed = 0;
        conn.large = Some((large, pending_len));
        return true;
    }
    if let Some(chunk) = conn.rx.as_ref() {
        let fits = partial_start + pending_len <= chunk_size;
        if fits
            && chunk_size - chunk.sealed_len() >= RX_SPARE_MIN_BYTES.min(pending_len - partial_len)
        {
            return true;
        }
    }
    let Some(mut fresh) = pools.acquire_rx_small() else {
        return false;
    };
    if let Some(chunk) = conn.rx.take() {
        copy_partial(&chunk, partial_start, partial_end, &mut fresh, stats);
        pools.release(chunk);
    }
    conn.consumed = 0;
    conn.rx = Some(fresh);
    true
}

fn copy_partial(
    source: &Buf,
    start: usize,
    end: usize,
    target: &mut Buf,
    stats: &mut TransportStats,
) {
    let len = end - start;
    target.spare_mut()[..len].copy_from_slice(&source.sealed()[start..end]);
    target.seal(len);
    stats.rx_copied_bytes += len as u64;
}

/// The socket is drained: if a partial frame is left in a buffer, the connection starts (or
/// keeps) counting as stalled. Returns the transport's new count of stalled connections.
pub(super) fn note_stall(conn: &mut Connection, stalled_count: u32) -> u32 {
    let partial = conn.large.is_some()
        || conn
            .rx
            .as_ref()
            .is_some_and(|chunk| chunk.sealed_len() > conn.consumed);
    match (partial, conn.stalled_since.is_some()) {
        (true, false) => {
            conn.stalled_since = Some(Instant::now());
            stalled_count + 1
        }
        (false, true) => {
            conn.stalled_since = None;
            stalled_count - 1
        }
        _ => stalled_count,
    }
}

/// An idle connection gives its chunk back so that thousands of idle clients hold no buffers.
pub(super) fn retire_idle_chunk(conn: &mut Connection, pools: &mut CorePools) {
    let fully_parsed = conn
        .rx
        .as_ref()
        .is_some_and(|chunk| chunk.sealed_len() == conn.consumed);
    if fully_parsed && conn.inflight == 0 {
        let chunk = conn.rx.take().expect("checked");
        pools.release(chunk);
        conn.consumed = 0;
    }
}
