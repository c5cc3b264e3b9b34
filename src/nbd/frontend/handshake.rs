//! The NBD handshake's option haggling (`Phase::Options`): NBD_OPT_GO, INFO, LIST,
//! EXPORT_NAME, STRUCTURED_REPLY and ABORT, and reading an export's image header first.

use super::*;

pub(super) fn consume_option(
    work: &mut Work,
    conn: &mut Conn,
    index: u32,
    pools: &mut CorePools,
) -> Consume {
    if conn.option_pending {
        return Consume::Wait;
    }
    let available = conn.in_end - conn.in_start;
    if available < nbd::OPTION_HEADER_BYTES {
        return Consume::NeedBytes;
    }
    let mut head = [0u8; nbd::OPTION_HEADER_BYTES];
    head.copy_from_slice(&conn.inbuf[conn.in_start..conn.in_start + nbd::OPTION_HEADER_BYTES]);
    let Some(nbd::OptionHeader { option, length }) = nbd::parse_option_header(&head) else {
        work.stats.protocol_errors += 1;
        log::info!("NBD option with a bad magic: closing");
        return Consume::Close;
    };
    let length = length as usize;
    if length > OPTION_BYTES_MAX {
        work.stats.protocol_errors += 1;
        if option == nbd::OPT_EXPORT_NAME {
            return Consume::Close; // It has no error reply.
        }
        conn.in_start += nbd::OPTION_HEADER_BYTES;
        conn.discard = length as u64;
        nbd::option_reply(
            &mut conn.ctl,
            option,
            nbd::REP_ERR_TOO_BIG,
            b"option too large",
        );
        return Consume::Progress;
    }
    if available < nbd::OPTION_HEADER_BYTES + length {
        return Consume::NeedBytes;
    }
    let start = conn.in_start + nbd::OPTION_HEADER_BYTES;
    conn.in_start = start + length;
    let mut data = [0u8; OPTION_BYTES_MAX];
    data[..length].copy_from_slice(&conn.inbuf[start..start + length]);
    let data = &data[..length];
    match option {
        nbd::OPT_ABORT => {
            nbd::option_reply(&mut conn.ctl, option, nbd::REP_ACK, b"");
            Consume::CloseAfterReplies
        }
        nbd::OPT_LIST if !data.is_empty() => {
            nbd::option_reply(&mut conn.ctl, option, nbd::REP_ERR_INVALID, b"");
            Consume::Progress
        }
        nbd::OPT_LIST => start_option_read(
            work,
            conn,
            index,
            pools,
            option,
            image::DIRECTORY_OID,
            image::DIRECTORY_BYTES_MAX,
        ),
        nbd::OPT_EXPORT_NAME => {
            if image::check_name(data).is_err() {
                return Consume::Close;
            }
            ask_export(work, conn, index, pools, option, data)
        }
        nbd::OPT_STRUCTURED_REPLY if !data.is_empty() => {
            nbd::option_reply(&mut conn.ctl, option, nbd::REP_ERR_INVALID, b"");
            Consume::Progress
        }
        nbd::OPT_STRUCTURED_REPLY => {
            conn.structured = true;
            nbd::option_reply(&mut conn.ctl, option, nbd::REP_ACK, b"");
            Consume::Progress
        }
        nbd::OPT_GO | nbd::OPT_INFO => {
            let Some(info) = nbd::parse_info_request(data) else {
                nbd::option_reply(&mut conn.ctl, option, nbd::REP_ERR_INVALID, b"malformed");
                return Consume::Progress;
            };
            let name = info.name;
            if image::check_name(name).is_err() {
                nbd::option_reply(
                    &mut conn.ctl,
                    option,
                    nbd::REP_ERR_UNKNOWN,
                    b"no such image",
                );
                return Consume::Progress;
            }
            ask_export(work, conn, index, pools, option, name)
        }
        nbd::OPT_LIST_META_CONTEXT | nbd::OPT_SET_META_CONTEXT => {
            let listing = option == nbd::OPT_LIST_META_CONTEXT;
            let Some(meta) = nbd::parse_meta_context_request(data) else {
                nbd::option_reply(&mut conn.ctl, option, nbd::REP_ERR_INVALID, b"malformed");
                return Consume::Progress;
            };
            if !listing && !conn.structured {
                // Block status replies are structured: SET needs them negotiated first.
                nbd::option_reply(
                    &mut conn.ctl,
                    option,
                    nbd::REP_ERR_INVALID,
                    b"structured replies first",
                );
                return Consume::Progress;
            }
            if meta.name.len() > image::NAME_BYTES_MAX {
                nbd::option_reply(
                    &mut conn.ctl,
                    option,
                    nbd::REP_ERR_UNKNOWN,
                    b"no such image",
                );
                return Consume::Progress;
            }
            // LIST with no query lists every context; SET with none selects none.
            let selected = if meta.query_count == 0 {
                listing
            } else {
                meta.queries()
                    .any(|q| nbd::query_selects_base_allocation(q, listing))
            };
            if !listing {
                conn.meta_allocation = selected;
                conn.meta_export[..meta.name.len()].copy_from_slice(meta.name);
                conn.meta_export_len = meta.name.len();
            }
            if selected {
                nbd::option_reply(
                    &mut conn.ctl,
                    option,
                    nbd::REP_META_CONTEXT,
                    &nbd::meta_context_reply(),
                );
            }
            nbd::option_reply(&mut conn.ctl, option, nbd::REP_ACK, b"");
            Consume::Progress
        }
        _ => {
            // STARTTLS, extended headers: not offered.
            nbd::option_reply(&mut conn.ctl, option, nbd::REP_ERR_UNSUP, b"");
            Consume::Progress
        }
    }
}

pub(super) fn ask_export(
    work: &mut Work,
    conn: &mut Conn,
    index: u32,
    pools: &mut CorePools,
    option: u32,
    name: &[u8],
) -> Consume {
    let mut export = Export {
        name: [0; image::NAME_BYTES_MAX],
        name_len: name.len(),
        header: ImageHeader {
            size: 0,
            object_size: 0,
        },
    };
    export.name[..name.len()].copy_from_slice(name);
    let oid = Oid::header(name);
    match start_option_read(
        work,
        conn,
        index,
        pools,
        option,
        oid.as_bytes(),
        image::HEADER_BYTES,
    ) {
        Consume::Wait => {
            conn.pending = Some(export);
            Consume::Wait
        }
        other => other,
    }
}

/// Starts a one-part read for a negotiation option. The option's bytes are already consumed,
/// so running out of resources here is answered as "try again" with the option un-consumed.
pub(super) fn start_option_read(
    work: &mut Work,
    conn: &mut Conn,
    index: u32,
    pools: &mut CorePools,
    option: u32,
    oid: &[u8],
    length: usize,
) -> Consume {
    if work.read_parts_held + 1 > work.read_parts_budget {
        nbd::option_reply(&mut conn.ctl, option, nbd::REP_ERR_UNSUP, b"server busy");
        return Consume::Progress;
    }
    let Some(request_ref) = work.requests.alloc() else {
        nbd::option_reply(&mut conn.ctl, option, nbd::REP_ERR_UNSUP, b"server busy");
        return Consume::Progress;
    };
    work.requests.get(request_ref).start(Start {
        conn: index,
        conn_generation: conn.generation,
        kind: Kind::Option(option),
        ..Start::default()
    });
    if !build_part(
        work,
        pools,
        request_ref,
        0,
        oid,
        SubOpCode::Read,
        0,
        length as u64,
        &[],
    ) {
        work.requests.release(request_ref);
        nbd::option_reply(&mut conn.ctl, option, nbd::REP_ERR_UNSUP, b"server busy");
        return Consume::Progress;
    }
    let request = work.requests.get(request_ref);
    request.parts_issued = 1;
    request.lengths[0] = length as u32;
    work.read_parts_held += 1;
    conn.option_pending = true;
    Consume::Wait
}
