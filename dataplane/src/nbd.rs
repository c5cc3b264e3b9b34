//! The Network Block Device protocol's numbers and byte layouts (newstyle fixed negotiation,
//! simple replies), as in the NBD protocol document (`doc/proto.md` of the NBD project). All
//! integers are big-endian on the wire.
//!
//! Also the decisions that depend on the bytes alone: client flags, option headers, the
//! `GO`/`INFO` payload, and what to do with a transmission request ([`check_request`]). They
//! live here, with no server behind them, so that the fuzz targets can feed them anything; the
//! NBD frontend (`carmine`'s `src/nbd/frontend.rs`) calls them and adds resources and I/O.

/// "NBDMAGIC": the first 8 bytes the server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation; also the magic of every client option.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

/// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// What Carmine advertises. Multi-conn is safe: a write is acknowledged only once the store
/// has it (durable, for the segment store), so a FLUSH on any connection covers every write
/// acknowledged on every connection, and a read after an acknowledged write sees it (ops on one
/// object are ordered by its PG).
pub const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command flags we accept (FUA, NO_HOLE; REQ_ONE on BLOCK_STATUS); others are EINVAL.
pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// The one meta context Carmine serves, and the id it gives it.
pub const META_BASE_ALLOCATION: &[u8] = b"base:allocation";
pub const META_BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` status bits: not allocated, reads as zeroes.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// Bytes of one block status descriptor (length u32, status flags u32).
pub const BLOCK_DESCRIPTOR_BYTES: usize = 8;

/// Structured reply chunks: the flag on the last chunk of a reply, and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// Error numbers of replies (Linux errno values, as the protocol fixes them).
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// Bytes of a transmission request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Bytes of a structured reply chunk's header.
pub const STRUCTURED_HEADER_BYTES: usize = 20;
/// Largest reply head: a structured OFFSET_DATA chunk's header and offset (28 bytes), an
/// ERROR chunk's header, error and empty message (26), or a simple reply (16).
pub const REPLY_HEAD_MAX_BYTES: usize = 28;
/// Bytes of an option header from the client (magic, option, length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of the server's greeting.
pub const GREETING_BYTES: usize = 18;
/// Largest option a client may send during negotiation, in bytes (larger: `ERR_TOO_BIG`).
pub const OPTION_BYTES_MAX: usize = 4096;
/// A write larger than the limit but at most this is read and dropped (reply EINVAL); larger
/// ones close the connection (reading them would only feed a broken client).
pub const DISCARD_BYTES_MAX: u64 = 32 << 20;

/// One transmission request header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub fn be_u64(b: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[..8]);
    u64::from_be_bytes(raw)
}

/// Decodes a request header; `None` when the magic is wrong (the stream cannot be trusted).
pub fn parse_request(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Option<Request> {
    if be_u32(&bytes[0..4]) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: be_u16(&bytes[4..6]),
        command: be_u16(&bytes[6..8]),
        cookie: be_u64(&bytes[8..16]),
        offset: be_u64(&bytes[16..24]),
        length: be_u32(&bytes[24..28]),
    })
}

/// The client's flags (the 4 bytes after the greeting): whether it wants no zero padding, or
/// `Err(flags)` when it lacks fixed newstyle or sets flags we do not know.
pub fn parse_client_flags(bytes: &[u8; 4]) -> Result<bool, u32> {
    let flags = be_u32(bytes);
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 || flags & !known != 0 {
        return Err(flags);
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

/// An option's header: which option, and how many data bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// Decodes an option header; `None` when the magic is wrong (the stream cannot be trusted).
pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_BYTES]) -> Option<OptionHeader> {
    if be_u64(bytes) != OPTION_MAGIC {
        return None;
    }
    Some(OptionHeader {
        option: be_u32(&bytes[8..12]),
        length: be_u32(&bytes[12..16]),
    })
}

/// The data of `NBD_OPT_GO` / `NBD_OPT_INFO`: name length u32, name, a u16 count of
/// information requests, then that many u16 info types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    /// The requested info types, 2 bytes each (big-endian).
    pub info_types: &'a [u8],
}

/// Decodes a `GO`/`INFO` payload; `None` when the lengths inside disagree with its size.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = usize::try_from(be_u32(data.get(0..4)?)).ok()?;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?;
    let count = usize::from(be_u16(data.get(name_end..name_end + 2)?));
    let info_types = &data[name_end + 2..];
    (info_types.len() == 2 * count).then_some(InfoRequest { name, info_types })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: name length u32,
/// name, a u32 count of queries, then that many queries (length u32, then the query's bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub name: &'a [u8],
    pub query_count: u32,
    /// The queries, still encoded (each a length and its bytes); [`parse_meta_context_request`]
    /// checked that they fill this exactly.
    queries: &'a [u8],
}

impl<'a> MetaContextRequest<'a> {
    pub fn queries(&self) -> impl Iterator<Item = &'a [u8]> {
        let mut rest = self.queries;
        std::iter::from_fn(move || {
            let length = be_u32(rest.get(0..4)?) as usize;
            let query = rest.get(4..4 + length)?;
            rest = &rest[4 + length..];
            Some(query)
        })
    }
}

/// Decodes a meta context option's payload; `None` when the lengths inside disagree with its
/// size (the count of queries included).
pub fn parse_meta_context_request(data: &[u8]) -> Option<MetaContextRequest<'_>> {
    let name_len = usize::try_from(be_u32(data.get(0..4)?)).ok()?;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?;
    let query_count = be_u32(data.get(name_end..name_end.checked_add(4)?)?);
    let queries = &data[name_end + 4..];
    let mut rest = queries;
    for _ in 0..query_count {
        let length = usize::try_from(be_u32(rest.get(0..4)?)).ok()?;
        rest = rest.get(4usize.checked_add(length)?..)?;
    }
    rest.is_empty().then_some(MetaContextRequest {
        name,
        query_count,
        queries,
    })
}

/// Whether `query` names `base:allocation`: exactly, or (when listing) as the `base:`
/// namespace, whose every context a LIST query of just the namespace asks for.
pub fn query_selects_base_allocation(query: &[u8], listing: bool) -> bool {
    query == META_BASE_ALLOCATION || (listing && query == b"base:")
}

/// The payload of an `NBD_REP_META_CONTEXT` reply for `base:allocation`: its id, then its name.
pub fn meta_context_reply() -> [u8; 4 + META_BASE_ALLOCATION.len()] {
    let mut out = [0u8; 4 + META_BASE_ALLOCATION.len()];
    out[..4].copy_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
    out[4..].copy_from_slice(META_BASE_ALLOCATION);
    out
}

/// What the server does with a transmission request, decided from its header alone (the
/// export's size and the largest request it accepts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it: for reads, writes and zeroes `offset + length` is within the export and the
    /// length within the limit (zeroes have no payload, so no length limit).
    Read,
    /// The `length` payload bytes follow the header.
    Write,
    /// TRIM, or WRITE_ZEROES (`no_hole`: zero, never deallocate).
    Zero {
        no_hole: bool,
    },
    Flush,
    /// NBD_CMD_BLOCK_STATUS over `[offset, offset + length)` (in the export, length not 0);
    /// `req_one`: the reply must have exactly one descriptor. Whether a meta context was
    /// negotiated is the server's to check (EINVAL if not).
    BlockStatus {
        req_one: bool,
    },
    /// NBD_CMD_DISC: answer what is in flight, then close.
    Disconnect,
    /// Answer `error`, then skip `discard` payload bytes (a refused write's data) and go on.
    Reject {
        error: u32,
        discard: u64,
    },
    /// Answer `error`, then close once the replies are sent: the stream cannot be followed
    /// (an unknown command's payload length is unknown).
    RejectAndClose {
        error: u32,
    },
    /// Close at once: a write whose payload is too large even to read and drop.
    Close,
}

/// Decides what to do with `request` on an export of `export_size` bytes whose largest
/// read or write is `payload_max` bytes. Never panics, whatever the numbers.
pub fn check_request(request: &Request, export_size: u64, payload_max: u64) -> Verdict {
    let length = u64::from(request.length);
    let in_range = request
        .offset
        .checked_add(length)
        .is_some_and(|end| end <= export_size);
    let flags_ok = request.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) == 0;
    match request.command {
        CMD_READ if flags_ok && in_range && length <= payload_max => Verdict::Read,
        CMD_READ => Verdict::Reject {
            error: EINVAL,
            discard: 0,
        },
        CMD_WRITE if flags_ok && in_range && length <= payload_max => Verdict::Write,
        CMD_WRITE if length > DISCARD_BYTES_MAX => Verdict::Close,
        CMD_WRITE => Verdict::Reject {
            // Past the end of the export: no space; anything else is invalid.
            error: if in_range || length > payload_max {
                EINVAL
            } else {
                ENOSPC
            },
            discard: length,
        },
        CMD_TRIM | CMD_WRITE_ZEROES if flags_ok && in_range => Verdict::Zero {
            no_hole: request.command == CMD_WRITE_ZEROES && request.flags & CMD_FLAG_NO_HOLE != 0,
        },
        CMD_TRIM | CMD_WRITE_ZEROES => Verdict::Reject {
            error: if request.command == CMD_WRITE_ZEROES && flags_ok {
                ENOSPC
            } else {
                EINVAL
            },
            discard: 0,
        },
        CMD_BLOCK_STATUS if request.flags & !CMD_FLAG_REQ_ONE == 0 && in_range && length > 0 => {
            Verdict::BlockStatus {
                req_one: request.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
        CMD_BLOCK_STATUS => Verdict::Reject {
            error: EINVAL,
            discard: 0,
        },
        CMD_FLUSH => Verdict::Flush,
        CMD_DISC => Verdict::Disconnect,
        _ => Verdict::RejectAndClose { error: EINVAL },
    }
}

pub fn greeting() -> [u8; GREETING_BYTES] {
    let mut out = [0u8; GREETING_BYTES];
    out[0..8].copy_from_slice(&INIT_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_BYTES];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// The head of the reply to one request, and its length: a simple reply, or with structured
/// replies negotiated one final chunk: ERROR for a failure, OFFSET_DATA (offset, then the
/// `data_bytes` that follow the head) for a read that returns data, NONE otherwise.
pub fn reply_head(
    structured: bool,
    error: u32,
    cookie: u64,
    read: Option<(u64, u32)>,
) -> ([u8; REPLY_HEAD_MAX_BYTES], usize) {
    let mut out = [0u8; REPLY_HEAD_MAX_BYTES];
    if !structured {
        out[..SIMPLE_REPLY_BYTES].copy_from_slice(&simple_reply(error, cookie));
        return (out, SIMPLE_REPLY_BYTES);
    }
    let (kind, length) = match read {
        _ if error != 0 => (REPLY_TYPE_ERROR, 6),
        Some((_, data_bytes)) if data_bytes > 0 => (REPLY_TYPE_OFFSET_DATA, 8 + data_bytes),
        _ => (REPLY_TYPE_NONE, 0),
    };
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    let at = STRUCTURED_HEADER_BYTES;
    match kind {
        REPLY_TYPE_ERROR => {
            // The error, then a message length of 0 (no message).
            out[at..at + 4].copy_from_slice(&error.to_be_bytes());
            (out, at + 6)
        }
        REPLY_TYPE_OFFSET_DATA => {
            let offset = read.expect("a read").0;
            out[at..at + 8].copy_from_slice(&offset.to_be_bytes());
            (out, at + 8)
        }
        _ => (out, at),
    }
}

/// The head of a block status reply (structured replies only): one final BLOCK_STATUS chunk
/// whose `descriptor_bytes` of descriptors follow the head, and its length.
pub fn block_status_head(
    cookie: u64,
    descriptor_bytes: usize,
) -> ([u8; REPLY_HEAD_MAX_BYTES], usize) {
    let mut out = [0u8; REPLY_HEAD_MAX_BYTES];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    out[6..8].copy_from_slice(&REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&(4 + descriptor_bytes as u32).to_be_bytes());
    out[20..24].copy_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
    (out, STRUCTURED_HEADER_BYTES + 4)
}

/// One block status descriptor: `length` bytes with status `flags`.
pub fn block_descriptor(length: u32, flags: u32) -> [u8; BLOCK_DESCRIPTOR_BYTES] {
    let mut out = [0u8; BLOCK_DESCRIPTOR_BYTES];
    out[..4].copy_from_slice(&length.to_be_bytes());
    out[4..].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Appends an option reply (header and data) to `out` (negotiation only: not the data path).
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// NBD_INFO_EXPORT: size and transmission flags.
pub fn info_export(size: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    out
}

/// NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum request sizes.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&maximum.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let mut raw = [0u8; REQUEST_HEADER_BYTES];
        raw[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        raw[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        raw[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        raw[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        raw[16..24].copy_from_slice(&(5u64 << 30).to_be_bytes());
        raw[24..28].copy_from_slice(&4096u32.to_be_bytes());
        let request = parse_request(&raw).unwrap();
        assert_eq!(request.command, CMD_WRITE);
        assert_eq!(request.flags, CMD_FLAG_FUA);
        assert_eq!(request.cookie, 0x1122_3344_5566_7788);
        assert_eq!(request.offset, 5 << 30);
        assert_eq!(request.length, 4096);
        raw[0] ^= 1;
        assert_eq!(parse_request(&raw), None);
    }

    fn request(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    #[test]
    fn check_request_bounds_and_errors() {
        let size = 1 << 20;
        let max = 64 << 10;
        let check = |r: Request| check_request(&r, size, max);
        assert_eq!(
            check(request(CMD_READ, 0, size - 4096, 4096)),
            Verdict::Read
        );
        let einval = Verdict::Reject {
            error: EINVAL,
            discard: 0,
        };
        assert_eq!(check(request(CMD_READ, 0, size - 4095, 4096)), einval);
        assert_eq!(check(request(CMD_READ, 0, u64::MAX, 1)), einval, "overflow");
        assert_eq!(check(request(CMD_READ, 0, 0, max as u32 + 1)), einval);
        assert_eq!(
            check(request(CMD_READ, 1 << 5, 0, 1)),
            einval,
            "unknown flag"
        );
        assert_eq!(
            check(request(CMD_WRITE, CMD_FLAG_FUA, 0, 4096)),
            Verdict::Write
        );
        assert_eq!(
            check(request(CMD_WRITE, 0, size, 4096)),
            Verdict::Reject {
                error: ENOSPC,
                discard: 4096
            }
        );
        assert_eq!(
            check(request(CMD_WRITE, 0, 0, max as u32 + 1)),
            Verdict::Reject {
                error: EINVAL,
                discard: max + 1
            }
        );
        assert_eq!(
            check(request(CMD_WRITE, 0, 0, DISCARD_BYTES_MAX as u32 + 1)),
            Verdict::Close
        );
        assert_eq!(
            check(request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, size as u32)),
            Verdict::Zero { no_hole: true }
        );
        assert_eq!(
            check(request(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 1)),
            Verdict::Zero { no_hole: false }
        );
        assert_eq!(check(request(CMD_TRIM, 0, size, 1)), einval);
        assert_eq!(
            check(request(CMD_WRITE_ZEROES, 0, size, 1)),
            Verdict::Reject {
                error: ENOSPC,
                discard: 0
            }
        );
        assert_eq!(check(request(CMD_FLUSH, 0, 0, 0)), Verdict::Flush);
        assert_eq!(check(request(CMD_DISC, 0, 0, 0)), Verdict::Disconnect);
        assert_eq!(
            check(request(99, 0, 0, 0)),
            Verdict::RejectAndClose { error: EINVAL }
        );
    }

    #[test]
    fn negotiation_parsers_refuse_bad_input() {
        assert_eq!(parse_client_flags(&[0, 0, 0, 3]), Ok(true));
        assert_eq!(parse_client_flags(&[0, 0, 0, 1]), Ok(false));
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 2]),
            Err(2),
            "not fixed newstyle"
        );
        assert_eq!(
            parse_client_flags(&[0, 0, 1, 1]),
            Err(0x101),
            "unknown flag"
        );
        let mut head = [0u8; OPTION_HEADER_BYTES];
        head[0..8].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
        head[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        head[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_option_header(&head),
            Some(OptionHeader {
                option: OPT_GO,
                length: u32::MAX
            })
        );
        head[0] ^= 1;
        assert_eq!(parse_option_header(&head), None);
        // name "vm", two info requests.
        let good = [0, 0, 0, 2, b'v', b'm', 0, 2, 0, 3, 0, 0];
        let info = parse_info_request(&good).unwrap();
        assert_eq!(info.name, b"vm");
        assert_eq!(info.info_types, &[0, 3, 0, 0]);
        assert_eq!(parse_info_request(&good[..11]), None, "count disagrees");
        assert_eq!(parse_info_request(&good[..5]), None, "name cut short");
        assert_eq!(parse_info_request(&[0, 0, 0]), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]), None);
        assert_eq!(
            parse_info_request(&[0, 0, 0, 0, 0, 0]).unwrap().name,
            b"",
            "an empty name is well formed (the default export)"
        );
    }

    #[test]
    fn structured_reply_heads() {
        let (head, len) = reply_head(false, EIO, 9, Some((4096, 512)));
        assert_eq!(&head[..len], &simple_reply(EIO, 9));
        let (head, len) = reply_head(true, 0, 9, Some((4096, 512)));
        assert_eq!(len, 28);
        assert_eq!(be_u32(&head), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be_u16(&head[4..]), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&head[6..]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be_u64(&head[8..]), 9);
        assert_eq!(
            be_u32(&head[16..]),
            8 + 512,
            "offset and data follow the header"
        );
        assert_eq!(be_u64(&head[20..]), 4096);
        let (head, len) = reply_head(true, EINVAL, 9, Some((4096, 512)));
        assert_eq!((len, be_u16(&head[6..])), (26, REPLY_TYPE_ERROR));
        assert_eq!(be_u32(&head[16..]), 6);
        assert_eq!(be_u32(&head[20..]), EINVAL);
        assert_eq!(be_u16(&head[24..]), 0, "no message");
        for read in [None, Some((0, 0))] {
            let (head, len) = reply_head(true, 0, 9, read);
            assert_eq!((len, be_u16(&head[6..])), (20, REPLY_TYPE_NONE));
            assert_eq!(be_u32(&head[16..]), 0);
        }
    }

    fn meta_payload(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut out = (name.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(name);
        out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for query in queries {
            out.extend_from_slice(&(query.len() as u32).to_be_bytes());
            out.extend_from_slice(query);
        }
        out
    }

    #[test]
    fn meta_context_requests_and_block_status() {
        let good = meta_payload(b"vm", &[b"base:allocation", b"qemu:dirty-bitmap:x"]);
        let parsed = parse_meta_context_request(&good).unwrap();
        assert_eq!((parsed.name, parsed.query_count), (&b"vm"[..], 2));
        let queries: Vec<&[u8]> = parsed.queries().collect();
        assert_eq!(queries, [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]);
        assert!(query_selects_base_allocation(queries[0], false));
        assert!(!query_selects_base_allocation(queries[1], true));
        assert!(query_selects_base_allocation(b"base:", true));
        assert!(!query_selects_base_allocation(b"base:", false));
        let none = meta_payload(b"", &[]);
        assert_eq!(parse_meta_context_request(&none).unwrap().query_count, 0);
        for cut in 0..good.len() {
            assert_eq!(
                parse_meta_context_request(&good[..cut]),
                None,
                "cut at {cut}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(parse_meta_context_request(&long), None, "trailing byte");
        let mut lying = meta_payload(b"vm", &[b"base:allocation"]);
        lying[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_context_request(&lying), None, "count too large");
        assert_eq!(&meta_context_reply()[..4], &[0, 0, 0, 1]);
        assert_eq!(&meta_context_reply()[4..], b"base:allocation");

        let size = 1 << 20;
        let check = |flags, offset, length| {
            check_request(
                &request(CMD_BLOCK_STATUS, flags, offset, length),
                size,
                4096,
            )
        };
        assert_eq!(
            check(0, 0, 1 << 20),
            Verdict::BlockStatus { req_one: false }
        );
        assert_eq!(
            check(CMD_FLAG_REQ_ONE, 4096, 1),
            Verdict::BlockStatus { req_one: true }
        );
        let einval = Verdict::Reject {
            error: EINVAL,
            discard: 0,
        };
        assert_eq!(check(0, 0, 0), einval, "empty");
        assert_eq!(check(0, size, 1), einval, "past the end");
        assert_eq!(check(CMD_FLAG_FUA, 0, 1), einval, "FUA means nothing here");

        let (head, len) = block_status_head(7, 16);
        assert_eq!(len, 24);
        assert_eq!(be_u16(&head[6..]), REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(be_u16(&head[4..]), REPLY_FLAG_DONE);
        assert_eq!(be_u64(&head[8..]), 7);
        assert_eq!(
            be_u32(&head[16..]),
            4 + 16,
            "context id and two descriptors"
        );
        assert_eq!(be_u32(&head[20..]), META_BASE_ALLOCATION_ID);
        assert_eq!(
            block_descriptor(4096, STATE_HOLE | STATE_ZERO),
            [0, 0, 16, 0, 0, 0, 0, 3]
        );
    }

    #[test]
    fn replies_are_big_endian() {
        let reply = simple_reply(EINVAL, 7);
        assert_eq!(&reply[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(be_u32(&reply[4..8]), 22);
        assert_eq!(be_u64(&reply[8..16]), 7);
        let mut out = Vec::new();
        option_reply(&mut out, OPT_GO, REP_ACK, b"");
        assert_eq!(out.len(), 20);
        assert_eq!(be_u64(&out), REPLY_MAGIC);
        assert_eq!(&greeting()[0..8], b"NBDMAGIC");
        assert_eq!(&greeting()[8..16], b"IHAVEOPT");
    }
}
