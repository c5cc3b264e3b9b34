//! Completions: a part's op finished; a request is done when all its parts are, and its
//! reply (data, error, block status extents) is queued.

use super::*;

impl NbdFrontend {
    /// One part finished (on this core or another). `sub_status` is its sub-op's status,
    /// `output` its read output.
    pub fn complete(
        &mut self,
        pools: &mut CorePools,
        request_ref: OpRef,
        part: u8,
        status: Status,
        sub_status: Option<u32>,
        output: Option<Buf>,
    ) {
        let missing = sub_status == Some(Status::NotFound as u32) || status == Status::NotFound;
        let failed = status != Status::Ok || sub_status.is_some_and(|s| s != 0);
        let no_space = status == Status::NoSpace || sub_status == Some(Status::NoSpace as u32);
        let mut spare = None;
        self.work.parts_outstanding -= 1;
        let request = self.work.requests.get(request_ref);
        request.parts_done += 1;
        match request.kind {
            Kind::Read | Kind::Option(_) => {
                // A missing object reads as zeroes: it was never written (or was trimmed).
                if failed && !missing {
                    request.error = nbd::EIO;
                }
                let slot = &mut request.outputs[usize::from(part)];
                match output {
                    Some(buf) if slot.is_none() => *slot = Some(buf),
                    other => spare = other,
                }
            }
            Kind::BlockStatus => {
                let slot = &mut request.object_sizes[usize::from(part)];
                if missing {
                    *slot = OBJECT_MISSING;
                } else if failed {
                    request.error = nbd::EIO;
                } else {
                    let stat = output.as_ref().and_then(|b| {
                        carmine_storage::object_store::ObjectStat::from_bytes(b.sealed())
                    });
                    match stat {
                        // Object sizes are at most 1 GiB: a larger size means past the part.
                        Some(stat) => *slot = stat.size.min(u64::from(u32::MAX - 1)) as u32,
                        None => request.error = nbd::EIO,
                    }
                }
                spare = output;
            }
            Kind::Write | Kind::Zero => {
                spare = output;
                // Zeroing or removing an object that was never written is already done.
                let harmless = missing && request.kind == Kind::Zero;
                if failed && !harmless && request.error == 0 {
                    request.error = if no_space { nbd::ENOSPC } else { nbd::EIO };
                }
            }
        }
        if let Some(buf) = spare {
            release(&mut self.work, pools, buf);
        }
        let request = self.work.requests.get(request_ref);
        if request.remaining > 0 {
            // A write still receiving data, or a zero with object ranges left to issue.
            if request.kind == Kind::Zero && !request.in_pump {
                request.in_pump = true;
                self.work.pump.push_back(request_ref);
            }
            return;
        }
        if request.parts_done == request.parts_issued {
            self.request_done(pools, request_ref);
        }
    }

    /// Every part of the request has finished: answer it (or drop it, if its client is gone).
    fn request_done(&mut self, pools: &mut CorePools, request_ref: OpRef) {
        let request = self.work.requests.get(request_ref);
        let (index, generation, kind, cookie, error) = (
            request.conn,
            request.conn_generation,
            request.kind,
            request.cookie,
            request.error,
        );
        let alive = self.conns[index as usize]
            .as_ref()
            .is_some_and(|c| c.generation == generation);
        if !alive {
            free_request(&mut self.work, pools, request_ref);
            return;
        }
        if let Kind::Option(option) = kind {
            self.option_done(pools, index, request_ref, option);
            return;
        }
        if error != 0 {
            self.work.stats.errors += 1;
        }
        if kind == Kind::BlockStatus && error == 0 {
            let request = self.work.requests.get(request_ref);
            let export = self.conns[index as usize].as_ref().and_then(|c| c.export);
            let object_size = export.map_or(1, |e| e.header.object_size);
            build_extents(request, object_size);
            let conn = self.conns[index as usize].as_mut().expect("alive");
            queue_block_status(
                conn,
                cookie,
                request_ref,
                self.work.requests.get(request_ref),
            );
            self.want_tx(index);
            return;
        }
        let read = (kind == Kind::Read && error == 0).then(|| {
            let length: u32 = request.lengths[..request.parts_issued as usize]
                .iter()
                .sum();
            (request_ref, request.next_offset, length)
        });
        if read.is_none() {
            free_request(&mut self.work, pools, request_ref);
        }
        let conn = self.conns[index as usize].as_mut().expect("alive");
        queue_reply(conn, error, cookie, read);
        self.want_tx(index);
    }

    /// A negotiation read finished: answer the option it serves.
    fn option_done(&mut self, pools: &mut CorePools, index: u32, request_ref: OpRef, option: u32) {
        let request = self.work.requests.get(request_ref);
        let bytes: &[u8] = request.outputs[0].as_ref().map_or(&[], |b| b.sealed());
        let failed = request.error != 0;
        let conn = self.conns[index as usize].as_mut().expect("alive");
        conn.option_pending = false;
        let mut close = false;
        if option == nbd::OPT_LIST {
            if failed {
                nbd::option_reply(&mut conn.ctl, option, nbd::REP_ERR_UNSUP, b"");
            } else {
                for name in image::directory_names(bytes) {
                    let mut entry = [0u8; 4 + image::NAME_BYTES_MAX];
                    entry[..4].copy_from_slice(&(name.len() as u32).to_be_bytes());
                    entry[4..4 + name.len()].copy_from_slice(name);
                    nbd::option_reply(
                        &mut conn.ctl,
                        option,
                        nbd::REP_SERVER,
                        &entry[..4 + name.len()],
                    );
                }
                nbd::option_reply(&mut conn.ctl, option, nbd::REP_ACK, b"");
            }
        } else {
            let mut export = conn.pending.take().expect("an export was asked for");
            match ImageHeader::parse(bytes) {
                Ok(header) if !failed => {
                    export.header = header;
                    // Contexts selected for another export do not apply to this one.
                    if conn.meta_export[..conn.meta_export_len] != export.name[..export.name_len] {
                        conn.meta_allocation = false;
                    }
                    if option == nbd::OPT_EXPORT_NAME {
                        conn.ctl.extend_from_slice(&header.size.to_be_bytes());
                        conn.ctl
                            .extend_from_slice(&nbd::TRANSMISSION_FLAGS.to_be_bytes());
                        if !conn.no_zeroes {
                            conn.ctl.extend_from_slice(&[0u8; 124]);
                        }
                        conn.phase = Phase::Transmission;
                        conn.export = Some(export);
                    } else {
                        let maximum = self.work.request_bytes_max() as u32;
                        let info = nbd::info_export(header.size);
                        nbd::option_reply(&mut conn.ctl, option, nbd::REP_INFO, &info);
                        let block = nbd::info_block_size(1, 4096, maximum);
                        nbd::option_reply(&mut conn.ctl, option, nbd::REP_INFO, &block);
                        nbd::option_reply(&mut conn.ctl, option, nbd::REP_ACK, b"");
                        if option == nbd::OPT_GO {
                            conn.phase = Phase::Transmission;
                            conn.export = Some(export);
                        }
                    }
                }
                _ if option == nbd::OPT_EXPORT_NAME => close = true,
                _ => nbd::option_reply(
                    &mut conn.ctl,
                    option,
                    nbd::REP_ERR_UNKNOWN,
                    b"no such image",
                ),
            }
        }
        if close {
            conn.closing = true;
        }
        free_request(&mut self.work, pools, request_ref);
        // Bytes of the next option may already be buffered: look again.
        let conn = self.conns[index as usize].as_mut().expect("alive");
        if !conn.in_rx_list {
            conn.in_rx_list = true;
            self.rx_list.push_back(index);
        }
        self.want_tx(index);
    }
}

pub(super) fn release(work: &mut Work, pools: &mut CorePools, buf: Buf) {
    if let Some(foreign) = pools.release_body(Body::Buf(buf)) {
        work.foreign.push(foreign);
    }
}

pub(super) fn free_request(work: &mut Work, pools: &mut CorePools, request_ref: OpRef) {
    let request = work.requests.get(request_ref);
    if matches!(
        request.kind,
        Kind::Read | Kind::Option(_) | Kind::BlockStatus
    ) {
        work.read_parts_held -= request.parts_issued as usize;
    }
    for part in 0..REQUEST_PARTS_MAX {
        if let Some(buf) = work.requests.get(request_ref).outputs[part].take() {
            release(work, pools, buf);
        }
    }
    work.requests.release(request_ref);
}

/// Bytes of a reply's payload held by its request: a read's data, or block status descriptors.
pub(super) fn body_len(request: &Request) -> usize {
    match request.kind {
        Kind::BlockStatus => usize::from(request.extent_count) * nbd::BLOCK_DESCRIPTOR_BYTES,
        _ => request.lengths[..request.parts_issued as usize]
            .iter()
            .map(|l| *l as usize)
            .sum(),
    }
}

/// Queues the reply to a block status request whose descriptors are built.
fn queue_block_status(conn: &mut Conn, cookie: u64, request_ref: OpRef, request: &Request) {
    assert!(conn.tx.len() < conn.tx.capacity(), "NBD tx queue overflow");
    let (head, head_len) = nbd::block_status_head(cookie, body_len(request));
    conn.tx.push_back(TxReply {
        head,
        head_len: head_len as u8,
        body: Some(request_ref),
        sent: 0,
    });
}

/// Turns the Stat results of a block status request into `base:allocation` descriptors: an
/// object the store does not have is a hole (reads as zeroes); one it has is data up to its
/// size and a hole after. Neighbours with the same status merge; REQ_ONE keeps the first.
fn build_extents(request: &mut Request, object_size: u64) {
    let mut extents: [(u32, u32); BLOCK_EXTENTS_MAX] = [(0, 0); BLOCK_EXTENTS_MAX];
    let mut count = 0;
    let mut add = |length: u64, flags: u32| {
        if length == 0 {
            return;
        }
        let length = length as u32; // A part is within one object: at most 1 GiB.
        let merged = (count > 0 && extents[count - 1].1 == flags)
            .then(|| extents[count - 1].0.checked_add(length))
            .flatten();
        if let Some(merged) = merged {
            extents[count - 1].0 = merged;
        } else {
            extents[count] = (length, flags);
            count += 1;
        }
    };
    let hole = nbd::STATE_HOLE | nbd::STATE_ZERO;
    for part in 0..request.parts_issued as usize {
        let length = u64::from(request.lengths[part]);
        // The first part may start inside its object; the others start at its beginning.
        let start = if part == 0 {
            request.next_offset % object_size
        } else {
            0
        };
        let size = request.object_sizes[part];
        let data = if size == OBJECT_MISSING {
            0
        } else {
            u64::from(size).saturating_sub(start).min(length)
        };
        add(data, 0);
        add(length - data, hole);
    }
    if request.req_one {
        count = count.min(1);
    }
    for (index, (length, flags)) in extents[..count].iter().enumerate() {
        let at = index * nbd::BLOCK_DESCRIPTOR_BYTES;
        request.extents[at..at + nbd::BLOCK_DESCRIPTOR_BYTES]
            .copy_from_slice(&nbd::block_descriptor(*length, *flags));
    }
    request.extent_count = count as u8;
}

/// Answers a request at once (errors, FLUSH): counts in flight until sent, like any other.
pub(super) fn answer_now(work: &mut Work, conn: &mut Conn, error: u32, cookie: u64) {
    if error != 0 {
        work.stats.errors += 1;
    }
    conn.inflight += 1;
    queue_reply(conn, error, cookie, None);
}
