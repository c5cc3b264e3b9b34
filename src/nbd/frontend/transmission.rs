//! The transmission phase: NBD requests cut into object parts (one wire op each), admitted
//! while the core's request and arena budgets allow, and issued down the OSD path.

use super::*;

/// Room for `length` more bytes of frames in the arena (a new chunk if needed).
pub(super) fn arena_room(work: &mut Work, pools: &mut CorePools, length: usize) -> bool {
    if let Some(arena) = work.arena.as_ref() {
        if arena.capacity() - arena.sealed_len() >= length {
            return true;
        }
    }
    if pools.small.free_count() <= POOL_RESERVE_COUNT {
        return false;
    }
    let fresh = pools.small.acquire().expect("free count checked");
    assert!(fresh.capacity() >= length, "a part's frame fits one chunk");
    if let Some(old) = work.arena.replace(fresh) {
        pools.release(old); // Its leases keep it alive until their ops finish.
    }
    true
}

pub(super) fn frame_bytes(oid: &[u8], data: &[u8]) -> usize {
    HEADER_SIZE + oid.len() + SUB_OP_DESC_SIZE + data.len()
}

/// Encodes one part as an OSD_OP frame in the arena and queues it for dispatch. False when
/// the arena has no room (no buffer above the reserve).
#[allow(clippy::too_many_arguments)]
pub(super) fn build_part(
    work: &mut Work,
    pools: &mut CorePools,
    request_ref: OpRef,
    part: u8,
    oid: &[u8],
    code: SubOpCode,
    offset: u64,
    length: u64,
    data: &[u8],
) -> bool {
    let frame_len = frame_bytes(oid, data);
    if !arena_room(work, pools, frame_len) {
        return false;
    }
    let arena = work.arena.as_mut().expect("arena_room provides one");
    let start = arena.sealed_len();
    let header = Header {
        opcode: Opcode::OsdOp as u8,
        flags: 0,
        request_id: request_ref.tag(),
        oid_len: oid.len() as u16,
        sub_op_count: 1,
        payload_len: (SUB_OP_DESC_SIZE + data.len()) as u32,
        status: 0,
        // The crc protects frames on the network; this one is built in-process and never
        // checked (the core dispatches it past `handle_frame`).
        crc: 0,
    };
    let out = &mut arena.spare_mut()[..frame_len];
    let mut raw = [0u8; HEADER_SIZE];
    header.encode(&mut raw);
    out[..HEADER_SIZE].copy_from_slice(&raw);
    let mut at = HEADER_SIZE;
    out[at..at + oid.len()].copy_from_slice(oid);
    at += oid.len();
    let desc = &mut out[at..at + SUB_OP_DESC_SIZE];
    desc[0] = code as u8;
    desc[1] = 0;
    desc[2..4].copy_from_slice(&0u16.to_le_bytes());
    desc[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
    desc[8..16].copy_from_slice(&offset.to_le_bytes());
    desc[16..24].copy_from_slice(&length.to_le_bytes());
    at += SUB_OP_DESC_SIZE;
    out[at..].copy_from_slice(data);
    arena.seal(frame_len);
    let frame = pools.lease(work.arena.as_ref().expect("present"), start, frame_len);
    assert!(
        work.parts.len() < work.parts.capacity(),
        "part queue bounded by admission"
    );
    work.parts_outstanding += 1;
    work.parts.push_back(PartOp {
        request: request_ref,
        part,
        header,
        frame,
    });
    true
}

impl Work {
    /// The largest request: every part but one full (the one for an unaligned start).
    pub(super) fn request_bytes_max(&self) -> usize {
        self.part_bytes * (self.request_parts_max - 1)
    }
}

/// Room to start reading `parts` parts: the budget of read outputs held, and the arena for
/// their frames (a header, the longest part oid and one sub-op each). False: wait, as outputs
/// held by other reads come back when those answer.
fn read_parts_room(work: &mut Work, pools: &mut CorePools, export: &Export, parts: usize) -> bool {
    if work.read_parts_held + parts > work.read_parts_budget {
        return false;
    }
    let oid_len_max = export.name_len + 21;
    arena_room(
        work,
        pools,
        parts * (HEADER_SIZE + oid_len_max + SUB_OP_DESC_SIZE),
    )
}

/// Room to admit a request of `parts` parts (request slot, part queue).
pub(super) fn admits(work: &Work, parts: usize) -> bool {
    work.requests.free_count() > 0 && work.parts.len() + parts <= PARTS_QUEUED_MAX
}

pub(super) fn consume_request(
    work: &mut Work,
    conn: &mut Conn,
    index: u32,
    pools: &mut CorePools,
) -> Consume {
    let export = conn.export.expect("transmission has an export");
    if let Some(request_ref) = conn.write {
        return continue_write(work, conn, request_ref, &export, pools);
    }
    if conn.in_end - conn.in_start < nbd::REQUEST_HEADER_BYTES {
        return Consume::NeedBytes;
    }
    if conn.inflight >= INFLIGHT_PER_CONNECTION_MAX || !admits(work, REQUEST_PARTS_MAX) {
        return Consume::Paused;
    }
    let mut raw = [0u8; nbd::REQUEST_HEADER_BYTES];
    raw.copy_from_slice(&conn.inbuf[conn.in_start..conn.in_start + nbd::REQUEST_HEADER_BYTES]);
    let Some(request) = nbd::parse_request(&raw) else {
        work.stats.protocol_errors += 1;
        log::info!("NBD request with a bad magic: closing");
        return Consume::Close;
    };
    let length = u64::from(request.length);
    let payload_max = work.request_bytes_max() as u64;
    match nbd::check_request(&request, export.header.size, payload_max) {
        Verdict::Read => {
            let parts = image::part_count(work.part_bytes as u64, request.offset, length) as usize;
            if !read_parts_room(work, pools, &export, parts) {
                return Consume::Paused;
            }
            conn.in_start += nbd::REQUEST_HEADER_BYTES;
            start_read(work, conn, index, pools, &export, request);
            Consume::Progress
        }
        Verdict::Write => {
            conn.in_start += nbd::REQUEST_HEADER_BYTES;
            let request_ref = open_request(
                work,
                conn,
                Start {
                    conn: index,
                    cookie: request.cookie,
                    kind: Kind::Write,
                    next_offset: request.offset,
                    remaining: length,
                    ..Start::default()
                },
            );
            if length == 0 {
                conn.write = None;
                queue_reply(conn, 0, request.cookie, None);
                work.requests.release(request_ref);
                return Consume::Progress;
            }
            conn.write = Some(request_ref);
            Consume::Progress
        }
        Verdict::Zero { no_hole } => {
            conn.in_start += nbd::REQUEST_HEADER_BYTES;
            if length == 0 {
                work.stats.requests += 1;
                conn.inflight += 1;
                queue_reply(conn, 0, request.cookie, None);
                return Consume::Progress;
            }
            let request_ref = open_request(
                work,
                conn,
                Start {
                    conn: index,
                    cookie: request.cookie,
                    kind: Kind::Zero,
                    no_hole,
                    next_offset: request.offset,
                    remaining: length,
                    ..Start::default()
                },
            );
            issue_zero_parts(work, request_ref, &export, pools);
            schedule_zero(work, request_ref);
            Consume::Progress
        }
        Verdict::BlockStatus { req_one } => {
            if !conn.meta_allocation {
                conn.in_start += nbd::REQUEST_HEADER_BYTES;
                work.stats.requests += 1;
                answer_now(work, conn, nbd::EINVAL, request.cookie);
                return Consume::Progress;
            }
            let object_size = export.header.object_size;
            let parts = image::split(object_size, object_size, request.offset, length)
                .take(BLOCK_STATUS_OBJECTS_MAX)
                .count();
            if !read_parts_room(work, pools, &export, parts) {
                return Consume::Paused;
            }
            conn.in_start += nbd::REQUEST_HEADER_BYTES;
            start_block_status(work, conn, index, pools, &export, request, req_one);
            Consume::Progress
        }
        Verdict::Flush => {
            // Every acknowledged write is already durable (the store acknowledges an op only
            // once it is: `Submit::Done` / its poll completion), so there is nothing to wait for.
            conn.in_start += nbd::REQUEST_HEADER_BYTES;
            work.stats.requests += 1;
            answer_now(work, conn, 0, request.cookie);
            Consume::Progress
        }
        Verdict::Disconnect => {
            conn.in_start += nbd::REQUEST_HEADER_BYTES;
            Consume::CloseAfterReplies
        }
        Verdict::Reject { error, discard } => {
            // A refused write's payload is read and dropped, so the stream stays in step.
            conn.in_start += nbd::REQUEST_HEADER_BYTES;
            conn.discard = discard;
            answer_now(work, conn, error, request.cookie);
            Consume::Progress
        }
        Verdict::RejectAndClose { error } => {
            // Unknown command: its payload length is unknown too, so the stream cannot be
            // followed further. Answer, then close.
            conn.in_start += nbd::REQUEST_HEADER_BYTES;
            work.stats.protocol_errors += 1;
            answer_now(work, conn, error, request.cookie);
            Consume::CloseAfterReplies
        }
        Verdict::Close => {
            work.stats.protocol_errors += 1;
            Consume::Close
        }
    }
}

/// Takes the request slot that admission reserved for `start` (a request of connection
/// `start.conn`; its generation is filled in here) and counts the request as in flight.
pub(super) fn open_request(work: &mut Work, conn: &mut Conn, start: Start) -> OpRef {
    let request_ref = work.requests.alloc().expect("admits checked");
    work.requests.get(request_ref).start(Start {
        conn_generation: conn.generation,
        ..start
    });
    work.stats.requests += 1;
    conn.inflight += 1;
    request_ref
}

pub(super) fn start_read(
    work: &mut Work,
    conn: &mut Conn,
    index: u32,
    pools: &mut CorePools,
    export: &Export,
    request: NbdRequest,
) {
    let request_ref = open_request(
        work,
        conn,
        Start {
            conn: index,
            cookie: request.cookie,
            kind: Kind::Read,
            // Reads keep their start here for the reply (structured replies carry it).
            next_offset: request.offset,
            ..Start::default()
        },
    );
    let name = &export.name[..export.name_len];
    let mut count = 0;
    for part in image::split(
        export.header.object_size,
        work.part_bytes as u64,
        request.offset,
        u64::from(request.length),
    ) {
        let oid = Oid::data(name, part.index);
        let built = build_part(
            work,
            pools,
            request_ref,
            count as u8,
            oid.as_bytes(),
            SubOpCode::Read,
            part.offset,
            part.length,
            &[],
        );
        assert!(built, "arena room was reserved for the whole read");
        work.requests.get(request_ref).lengths[count] = part.length as u32;
        count += 1;
    }
    work.requests.get(request_ref).parts_issued = count as u32;
    work.read_parts_held += count;
    if count == 0 {
        // A zero-length read: nothing to fetch.
        work.requests.release(request_ref);
        queue_reply(conn, 0, request.cookie, None);
    }
}

/// Issues a Stat of each object in the range (at most `BLOCK_STATUS_OBJECTS_MAX`).
pub(super) fn start_block_status(
    work: &mut Work,
    conn: &mut Conn,
    index: u32,
    pools: &mut CorePools,
    export: &Export,
    request: NbdRequest,
    req_one: bool,
) {
    let request_ref = open_request(
        work,
        conn,
        Start {
            conn: index,
            cookie: request.cookie,
            kind: Kind::BlockStatus,
            next_offset: request.offset,
            req_one,
            ..Start::default()
        },
    );
    let name = &export.name[..export.name_len];
    let object_size = export.header.object_size;
    let mut count = 0;
    for part in image::split(
        object_size,
        object_size,
        request.offset,
        u64::from(request.length),
    )
    .take(BLOCK_STATUS_OBJECTS_MAX)
    {
        let oid = Oid::data(name, part.index);
        let built = build_part(
            work,
            pools,
            request_ref,
            count as u8,
            oid.as_bytes(),
            SubOpCode::Stat,
            0,
            0,
            &[],
        );
        assert!(built, "arena room was reserved for every part");
        work.requests.get(request_ref).lengths[count] = part.length as u32;
        count += 1;
    }
    work.requests.get(request_ref).parts_issued = count as u32;
    work.read_parts_held += count;
}

/// Builds the next parts of a write from the data buffered so far.
pub(super) fn continue_write(
    work: &mut Work,
    conn: &mut Conn,
    request_ref: OpRef,
    export: &Export,
    pools: &mut CorePools,
) -> Consume {
    let request = work.requests.get(request_ref);
    let (offset, remaining, part_index) =
        (request.next_offset, request.remaining, request.parts_issued);
    let part = image::split(
        export.header.object_size,
        work.part_bytes as u64,
        offset,
        remaining,
    )
    .next()
    .expect("a write in progress has bytes left");
    let length = part.length as usize;
    if conn.in_end - conn.in_start < length {
        return Consume::NeedBytes;
    }
    let name = &export.name[..export.name_len];
    let oid = Oid::data(name, part.index);
    let data_start = conn.in_start;
    let data = &conn.inbuf[data_start..data_start + length];
    if !build_part(
        work,
        pools,
        request_ref,
        part_index as u8,
        oid.as_bytes(),
        SubOpCode::Write,
        part.offset,
        0,
        data,
    ) {
        return Consume::Paused;
    }
    conn.in_start += length;
    let request = work.requests.get(request_ref);
    request.parts_issued += 1;
    request.next_offset += part.length;
    request.remaining -= part.length;
    if request.remaining == 0 {
        conn.write = None;
    }
    Consume::Progress
}

/// A zero request that could issue more but did not (no arena room, queue full) goes back on
/// the pump list; one at its in-flight bound is put back by its next completion.
pub(super) fn schedule_zero(work: &mut Work, request_ref: OpRef) {
    let request = work.requests.get(request_ref);
    let in_flight = request.parts_issued - request.parts_done;
    if request.remaining > 0 && in_flight < ZERO_PARTS_IN_FLIGHT_MAX && !request.in_pump {
        request.in_pump = true;
        work.pump.push_back(request_ref);
    }
}

/// Issues zero/trim parts (one per object range) up to the per-request in-flight bound.
/// Returns parts issued.
pub(super) fn issue_zero_parts(
    work: &mut Work,
    request_ref: OpRef,
    export: &Export,
    pools: &mut CorePools,
) -> usize {
    let name = &export.name[..export.name_len];
    let object_size = export.header.object_size;
    let mut issued = 0;
    loop {
        let request = work.requests.get(request_ref);
        if request.remaining == 0
            || request.parts_issued - request.parts_done >= ZERO_PARTS_IN_FLIGHT_MAX
            || work.parts.len() >= PARTS_QUEUED_MAX
        {
            return issued;
        }
        let (offset, remaining, part_index, no_hole) = (
            request.next_offset,
            request.remaining,
            request.parts_issued,
            request.no_hole,
        );
        // Object ranges, not part_bytes ranges: a zero carries no data.
        let part = image::split(object_size, object_size, offset, remaining)
            .next()
            .expect("bytes left");
        let oid = Oid::data(name, part.index);
        let (code, length) = if part.offset == 0 && part.length == object_size && !no_hole {
            (SubOpCode::Remove, 0) // A whole object: drop it; missing objects read as zeroes.
        } else {
            (SubOpCode::Zero, part.length)
        };
        let index_byte = (part_index % 256) as u8; // Zero parts carry no output: the index is informational.
        if !build_part(
            work,
            pools,
            request_ref,
            index_byte,
            oid.as_bytes(),
            code,
            part.offset,
            length,
            &[],
        ) {
            return issued;
        }
        let request = work.requests.get(request_ref);
        request.parts_issued += 1;
        request.next_offset += part.length;
        request.remaining -= part.length;
        issued += 1;
    }
}
