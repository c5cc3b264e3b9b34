//! Carmine wire format, version 1: one frame per request or reply, parsed in place.
//!
//! ```text
//! offset size field
//!  0     4   magic        0x4E4D_5243 ("CRMN" as little-endian bytes "CRMN")
//!  4     1   version      1
//!  5     1   opcode       OSD_OP=1, PING=2, STATUS=3, HELLO=4; a reply sets bit 0x80
//!  6     2   flags        must be 0 in version 1
//!  8     8   request_id   chosen by the client, echoed in the reply
//! 16     2   oid_len      bytes of object id that follow the header
//! 18     2   sub_op_count sub-ops in the payload (OSD_OP and its reply)
//! 20     4   payload_len  bytes of payload that follow the object id
//! 24     4   status       0 in requests; the op's status in replies (`Status`)
//! 28     4   crc32c       over bytes 0..28, then the object id, then the payload
//! ```
//! then `oid_len` bytes of object id, then `payload_len` bytes of payload. All integers little-endian.
//!
//! OSD_OP request payload: `sub_op_count` descriptors of `SUB_OP_DESC_SIZE` bytes
//! (`code u8, flags u8, name_len u16, data_len u32, offset u64, length u64`), then each sub-op's
//! name bytes and data bytes, in sub-op order, packed. OSD_OP reply payload: `sub_op_count` results
//! of `SUB_OP_RESULT_SIZE` bytes (`status u32, out_len u32`), then each sub-op's output, packed.
//! PING echoes its payload. STATUS replies carry a UTF-8 JSON document. HELLO (empty request)
//! is answered with `HELLO_REPLY_SIZE` bytes saying which core owns the connection and how
//! objects are placed (`HelloReply`): a shard-aware client sends each op on a connection owned
//! by the op's core, so that no op crosses the server's rings. A server that predates it (or
//! classic mode, which has no owning cores) answers UNKNOWN_OPCODE.
//!
//! Why this shape: every field sits at a fixed offset, so a frame is a view over the receive
//! buffer (nothing is decoded into owned structs), and all lengths are known from the first 32
//! bytes, so limits are enforced before a single byte of body is buffered or allocated.

use core::fmt;

pub const MAGIC: u32 = u32::from_le_bytes(*b"CRMN");
pub const VERSION: u8 = 1;
pub const HEADER_SIZE: usize = 32;
/// Bytes of a header covered by the crc (everything before the crc field).
const HEADER_CRC_OFFSET: usize = 28;
pub const SUB_OP_DESC_SIZE: usize = 24;
pub const SUB_OP_RESULT_SIZE: usize = 8;
/// Bit set in the opcode of every reply.
pub const REPLY_BIT: u8 = 0x80;

/// Hard ceilings: configured limits may be lower, never higher.
pub const OID_LEN_CEILING: u16 = 1024;
pub const PAYLOAD_LEN_CEILING_BYTES: u32 = 64 << 20;
/// 16 keeps a reply head (header + results) at 160 bytes, carried inline in tx queues and
/// cross-core completions.
pub const SUB_OPS_CEILING: u16 = 16;

const _: () = assert!(HEADER_CRC_OFFSET + 4 == HEADER_SIZE);
const _: () =
    assert!(SUB_OPS_CEILING as usize * SUB_OP_DESC_SIZE < PAYLOAD_LEN_CEILING_BYTES as usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    OsdOp = 1,
    Ping = 2,
    Status = 3,
    Hello = 4,
}

impl Opcode {
    pub fn from_u8(value: u8) -> Option<Opcode> {
        match value {
            1 => Some(Opcode::OsdOp),
            2 => Some(Opcode::Ping),
            3 => Some(Opcode::Status),
            4 => Some(Opcode::Hello),
            _ => None,
        }
    }
}

/// Bytes of a HELLO reply's payload.
pub const HELLO_REPLY_SIZE: usize = 16;

/// A HELLO reply's payload: `core u32, cores u32, placement u32 (0: PGs, 1: flex), pg_count u32`
/// (pg_count is 0 in flex mode). With these and the placement hash (crc32c of the object id;
/// `pg = hash % pg_count`, `core = pg % cores`; flex: `core = hash % cores`) a client knows the
/// core of every object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub core: u32,
    pub cores: u32,
    /// `None`: flex placement (no PGs).
    pub pg_count: Option<u32>,
}

impl HelloReply {
    pub fn encode(&self) -> [u8; HELLO_REPLY_SIZE] {
        let mut out = [0u8; HELLO_REPLY_SIZE];
        out[0..4].copy_from_slice(&self.core.to_le_bytes());
        out[4..8].copy_from_slice(&self.cores.to_le_bytes());
        let (mode, pg_count) = match self.pg_count {
            Some(count) => (0u32, count),
            None => (1, 0),
        };
        out[8..12].copy_from_slice(&mode.to_le_bytes());
        out[12..16].copy_from_slice(&pg_count.to_le_bytes());
        out
    }

    /// Refuses a payload of the wrong size, an unknown placement mode, or numbers that cannot
    /// describe a server (no cores, a core out of range, fewer PGs than cores).
    pub fn decode(payload: &[u8]) -> Result<HelloReply, String> {
        if payload.len() != HELLO_REPLY_SIZE {
            return Err(format!(
                "HELLO reply of {} bytes, expected {HELLO_REPLY_SIZE}",
                payload.len()
            ));
        }
        let word = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().unwrap());
        let (core, cores, mode, pg_count) = (word(0), word(4), word(8), word(12));
        let pg_count = match mode {
            0 => Some(pg_count),
            1 => None,
            other => return Err(format!("HELLO reply names placement mode {other}")),
        };
        if cores == 0 || core >= cores || pg_count.is_some_and(|count| count < cores) {
            return Err(format!(
                "HELLO reply is inconsistent: core {core} of {cores}, pg_count {pg_count:?}"
            ));
        }
        Ok(HelloReply {
            core,
            cores,
            pg_count,
        })
    }
}

/// Sub-op codes. Numbers are part of the wire format: fixed forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SubOpCode {
    Write = 1,
    WriteFull = 2,
    Read = 3,
    Zero = 4,
    Truncate = 5,
    Remove = 6,
    Stat = 7,
    SetXattr = 8,
    GetXattr = 9,
    OmapSet = 10,
    OmapGet = 11,
    OmapRemove = 12,
}

impl SubOpCode {
    pub const ALL: [SubOpCode; 12] = [
        SubOpCode::Write,
        SubOpCode::WriteFull,
        SubOpCode::Read,
        SubOpCode::Zero,
        SubOpCode::Truncate,
        SubOpCode::Remove,
        SubOpCode::Stat,
        SubOpCode::SetXattr,
        SubOpCode::GetXattr,
        SubOpCode::OmapSet,
        SubOpCode::OmapGet,
        SubOpCode::OmapRemove,
    ];

    pub fn from_u8(value: u8) -> Option<SubOpCode> {
        SubOpCode::ALL
            .get(usize::from(value).wrapping_sub(1))
            .copied()
    }

    /// Which variable-length fields a sub-op carries: (name, data).
    fn carries(self) -> (bool, bool) {
        match self {
            SubOpCode::Write | SubOpCode::WriteFull => (false, true),
            SubOpCode::SetXattr | SubOpCode::OmapSet => (true, true),
            SubOpCode::GetXattr | SubOpCode::OmapGet | SubOpCode::OmapRemove => (true, false),
            SubOpCode::Read
            | SubOpCode::Zero
            | SubOpCode::Truncate
            | SubOpCode::Remove
            | SubOpCode::Stat => (false, false),
        }
    }

    pub fn is_mutation(self) -> bool {
        !matches!(
            self,
            SubOpCode::Read | SubOpCode::Stat | SubOpCode::GetXattr | SubOpCode::OmapGet
        )
    }
}

/// Status carried in replies. Numbers are part of the wire format: fixed forever.
/// 1..=8 are the object store's errors and keep `carmine_storage::StoreError::code` numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    NoData = 2,
    NoSpace = 3,
    TooLarge = 4,
    InvalidArgument = 5,
    Range = 6,
    Io = 7,
    Corrupt = 8,
    BadCrc = 16,
    UnknownOpcode = 17,
    Malformed = 18,
    OverLimit = 19,
    Unsupported = 20,
    ShuttingDown = 21,
}

impl Status {
    pub fn from_u32(value: u32) -> Option<Status> {
        use Status::*;
        Some(match value {
            0 => Ok,
            1 => NotFound,
            2 => NoData,
            3 => NoSpace,
            4 => TooLarge,
            5 => InvalidArgument,
            6 => Range,
            7 => Io,
            8 => Corrupt,
            16 => BadCrc,
            17 => UnknownOpcode,
            18 => Malformed,
            19 => OverLimit,
            20 => Unsupported,
            21 => ShuttingDown,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use Status::*;
        match self {
            Ok => "ok",
            NotFound => "not_found",
            NoData => "no_data",
            NoSpace => "no_space",
            TooLarge => "too_large",
            InvalidArgument => "invalid_argument",
            Range => "range",
            Io => "io",
            Corrupt => "corrupt",
            BadCrc => "bad_crc",
            UnknownOpcode => "unknown_opcode",
            Malformed => "malformed",
            OverLimit => "over_limit",
            Unsupported => "unsupported",
            ShuttingDown => "shutting_down",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Limits a server enforces from the header alone, before buffering the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub oid_len_max: u16,
    pub payload_len_max: u32,
    pub sub_ops_max: u16,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        oid_len_max: 256,
        payload_len_max: 4 << 20 | 64 << 10,
        sub_ops_max: 16,
    };
    /// What a client accepts from a server: the ceilings.
    pub const CEILING: Limits = Limits {
        oid_len_max: OID_LEN_CEILING,
        payload_len_max: PAYLOAD_LEN_CEILING_BYTES,
        sub_ops_max: SUB_OPS_CEILING,
    };

    /// Limits above the ceilings are refused: the ceilings bound every buffer size derived from them.
    pub fn validate(&self) -> Result<(), String> {
        if self.oid_len_max == 0 || self.oid_len_max > OID_LEN_CEILING {
            return Err(format!("oid_len_max must be 1..={OID_LEN_CEILING}"));
        }
        if self.payload_len_max < SUB_OP_DESC_SIZE as u32
            || self.payload_len_max > PAYLOAD_LEN_CEILING_BYTES
        {
            return Err(format!(
                "payload_len_max must be {SUB_OP_DESC_SIZE}..={PAYLOAD_LEN_CEILING_BYTES}"
            ));
        }
        if self.sub_ops_max == 0 || self.sub_ops_max > SUB_OPS_CEILING {
            return Err(format!("sub_ops_max must be 1..={SUB_OPS_CEILING}"));
        }
        Ok(())
    }

    /// The largest frame these limits admit.
    pub fn frame_len_max(&self) -> usize {
        HEADER_SIZE + usize::from(self.oid_len_max) + self.payload_len_max as usize
    }
}

/// The fixed-size header, copied out of the buffer (32 bytes of plain integers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
    pub oid_len: u16,
    pub sub_op_count: u16,
    pub payload_len: u32,
    pub status: u32,
    pub crc: u32,
}

impl Header {
    pub fn frame_len(&self) -> usize {
        HEADER_SIZE + usize::from(self.oid_len) + self.payload_len as usize
    }

    pub fn is_reply(&self) -> bool {
        self.opcode & REPLY_BIT != 0
    }

    /// Writes the header with `crc` as given (see `FrameCrc` to compute it).
    pub fn encode(&self, out: &mut [u8; HEADER_SIZE]) {
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = VERSION;
        out[5] = self.opcode;
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        out[16..18].copy_from_slice(&self.oid_len.to_le_bytes());
        out[18..20].copy_from_slice(&self.sub_op_count.to_le_bytes());
        out[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        out[24..28].copy_from_slice(&self.status.to_le_bytes());
        out[28..32].copy_from_slice(&self.crc.to_le_bytes());
    }
}

/// Why a header could not be accepted. All of these make the byte stream untrustworthy (or
/// too large to buffer), so the connection is answered once and closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    BadMagic(u32),
    BadVersion(u8),
    OidTooLong { len: u16, max: u16 },
    PayloadTooLong { len: u32, max: u32 },
    TooManySubOps { count: u16, max: u16 },
}

impl HeaderError {
    pub fn status(&self) -> Status {
        match self {
            HeaderError::BadMagic(_) | HeaderError::BadVersion(_) => Status::Malformed,
            _ => Status::OverLimit,
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::BadMagic(m) => write!(f, "bad magic {m:#010x}"),
            HeaderError::BadVersion(v) => write!(f, "unsupported wire version {v}"),
            HeaderError::OidTooLong { len, max } => {
                write!(f, "object id of {len} bytes exceeds limit {max}")
            }
            HeaderError::PayloadTooLong { len, max } => {
                write!(f, "payload of {len} bytes exceeds limit {max}")
            }
            HeaderError::TooManySubOps { count, max } => {
                write!(f, "{count} sub-ops exceed limit {max}")
            }
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// Parses the header at the start of `bytes`. `Ok(None)`: fewer than `HEADER_SIZE` bytes so far.
pub fn parse_header(bytes: &[u8], limits: &Limits) -> Result<Option<Header>, HeaderError> {
    if bytes.len() < HEADER_SIZE {
        return Ok(None);
    }
    let magic = u32_at(bytes, 0);
    if magic != MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    if bytes[4] != VERSION {
        return Err(HeaderError::BadVersion(bytes[4]));
    }
    let header = Header {
        opcode: bytes[5],
        flags: u16_at(bytes, 6),
        request_id: u64_at(bytes, 8),
        oid_len: u16_at(bytes, 16),
        sub_op_count: u16_at(bytes, 18),
        payload_len: u32_at(bytes, 20),
        status: u32_at(bytes, 24),
        crc: u32_at(bytes, 28),
    };
    if header.oid_len > limits.oid_len_max {
        return Err(HeaderError::OidTooLong {
            len: header.oid_len,
            max: limits.oid_len_max,
        });
    }
    if header.payload_len > limits.payload_len_max {
        return Err(HeaderError::PayloadTooLong {
            len: header.payload_len,
            max: limits.payload_len_max,
        });
    }
    if header.sub_op_count > limits.sub_ops_max {
        return Err(HeaderError::TooManySubOps {
            count: header.sub_op_count,
            max: limits.sub_ops_max,
        });
    }
    Ok(Some(header))
}

/// crc32c of a frame assembled from pieces: header bytes 0..28, then each piece in order.
/// Replies are sent with writev from several buffers, so the crc is built the same way.
pub struct FrameCrc(u32);

impl FrameCrc {
    pub fn new(header: &[u8; HEADER_SIZE]) -> FrameCrc {
        FrameCrc(carmine_crc::crc32c(&header[..HEADER_CRC_OFFSET]))
    }
    pub fn append(&mut self, piece: &[u8]) {
        // An empty piece changes nothing; the replies without a body (write acknowledgements,
        // errors) append one, and the crc call's dispatch cost ~34 instructions per reply.
        if piece.is_empty() {
            return;
        }
        self.0 = carmine_crc::crc32c_append(self.0, piece);
    }
    /// Appends a piece of `len` bytes by its crc32c alone, without reading it.
    pub fn append_crc(&mut self, piece_crc: u32, len: usize) {
        self.0 = carmine_crc::crc32c_combine(self.0, piece_crc, len as u64);
    }
    pub fn finish(self) -> u32 {
        self.0
    }
}

/// Stores `crc` into an encoded header.
pub fn set_header_crc(header: &mut [u8; HEADER_SIZE], crc: u32) {
    header[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

/// A whole frame, viewed in place: header fields copied out, object id and payload borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub header: Header,
    pub oid: &'a [u8],
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Views the first `header.frame_len()` bytes of `bytes` as a frame. `bytes` must hold the whole
    /// frame (the caller checked `frame_len`), and `header` must be what `parse_header` returned.
    pub fn view(header: Header, bytes: &'a [u8]) -> Frame<'a> {
        assert!(
            bytes.len() >= header.frame_len(),
            "frame view over a partial frame"
        );
        let oid_end = HEADER_SIZE + usize::from(header.oid_len);
        Frame {
            header,
            oid: &bytes[HEADER_SIZE..oid_end],
            payload: &bytes[oid_end..header.frame_len()],
        }
    }

    /// The object id alone, as `view(header, bytes).oid` (for a frame viewed before).
    pub fn oid_of(header: &Header, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[HEADER_SIZE..HEADER_SIZE + usize::from(header.oid_len)]
    }

    /// True when the crc in the header matches the bytes. `raw` is the frame's first 32 bytes.
    pub fn crc_ok(&self, raw_header: &[u8]) -> bool {
        let header: &[u8; HEADER_CRC_OFFSET] = raw_header[..HEADER_CRC_OFFSET]
            .try_into()
            .expect("a frame starts with its header");
        // The object id and the payload are one contiguous run when `raw_header` is the whole
        // frame (as received): hashed with the header in one call (`crc32c_append_pair`: for
        // a short request, one pass of the crc32 instruction).
        let body_len = self.oid.len() + self.payload.len();
        let crc = if raw_header.len() >= HEADER_SIZE + body_len
            && raw_header[HEADER_SIZE..].as_ptr() == self.oid.as_ptr()
        {
            let body = &raw_header[HEADER_SIZE..HEADER_SIZE + body_len];
            carmine_crc::crc32c_append_pair(0, header, body)
        } else {
            let crc = carmine_crc::crc32c_append_pair(0, header, self.oid);
            carmine_crc::crc32c_append(crc, self.payload)
        };
        crc == self.header.crc
    }

    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_u8(self.header.opcode & !REPLY_BIT)
    }

    /// Checks an OSD_OP request's sub-op table against its payload. After `Ok`, `sub_ops`
    /// yields exactly `sub_op_count` items and cannot fail. The summary is what the op path
    /// needs from the table before it runs the op, learned in the same walk.
    pub fn validate_sub_ops(&self) -> Result<SubOpsSummary, Status> {
        let count = usize::from(self.header.sub_op_count);
        if count == 0 {
            return Err(Status::Malformed);
        }
        let table_len = count * SUB_OP_DESC_SIZE;
        if self.payload.len() < table_len {
            return Err(Status::Malformed);
        }
        let mut body_len: u64 = 0;
        let mut summary = SubOpsSummary::default();
        for index in 0..count {
            let desc = &self.payload[index * SUB_OP_DESC_SIZE..(index + 1) * SUB_OP_DESC_SIZE];
            let code = SubOpCode::from_u8(desc[0]).ok_or(Status::Unsupported)?;
            if desc[1] != 0 {
                return Err(Status::Malformed);
            }
            let name_len = u16_at(desc, 2);
            let data_len = u32_at(desc, 4);
            let (has_name, has_data) = code.carries();
            if has_name != (name_len > 0) || (!has_data && data_len > 0) {
                return Err(Status::Malformed);
            }
            body_len += u64::from(name_len) + u64::from(data_len);
            summary.mutates |= code.is_mutation();
            summary.data_bytes += u64::from(data_len);
            if count == 1 && code == SubOpCode::Read {
                summary.single_read = Some(ReadRange {
                    offset: u64_at(desc, 8),
                    length: u64_at(desc, 16),
                });
            }
        }
        if body_len != (self.payload.len() - table_len) as u64 {
            return Err(Status::Malformed);
        }
        Ok(summary)
    }

    /// The summary `validate_sub_ops` gives, for a request whose table passed it earlier.
    pub fn sub_ops_summary(&self) -> SubOpsSummary {
        let mut summary = SubOpsSummary::default();
        for sub_op in self.sub_ops() {
            summary.mutates |= sub_op.code.is_mutation();
            summary.data_bytes += sub_op.data.len() as u64;
            if self.header.sub_op_count == 1 && sub_op.code == SubOpCode::Read {
                summary.single_read = Some(ReadRange {
                    offset: sub_op.offset,
                    length: sub_op.length,
                });
            }
        }
        summary
    }

    /// Iterates the sub-ops of a request whose table passed `validate_sub_ops`.
    pub fn sub_ops(&self) -> SubOps<'a> {
        let table_len = usize::from(self.header.sub_op_count) * SUB_OP_DESC_SIZE;
        SubOps {
            payload: self.payload,
            index: 0,
            count: self.header.sub_op_count,
            body_at: table_len,
        }
    }

    /// Iterates the per-sub-op results of an OSD_OP reply. `Err` when the table does not fit.
    pub fn reply_results(&self) -> Result<ReplyResults<'a>, Status> {
        let count = usize::from(self.header.sub_op_count);
        let table_len = count * SUB_OP_RESULT_SIZE;
        if self.payload.len() < table_len {
            return Err(Status::Malformed);
        }
        let mut total: u64 = 0;
        for index in 0..count {
            total += u64::from(u32_at(self.payload, index * SUB_OP_RESULT_SIZE + 4));
        }
        if total != (self.payload.len() - table_len) as u64 {
            return Err(Status::Malformed);
        }
        Ok(ReplyResults {
            payload: self.payload,
            index: 0,
            count,
            body_at: table_len,
        })
    }
}

/// What a valid sub-op table says about its op as a whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubOpsSummary {
    /// Some sub-op changes the object.
    pub mutates: bool,
    /// Data bytes the sub-ops carry (those of writes).
    pub data_bytes: u64,
    /// The op is one Read sub-op, of this range: what a read served in place needs, without
    /// a second walk of the table.
    pub single_read: Option<ReadRange>,
}

/// The bytes a Read sub-op asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRange {
    pub offset: u64,
    pub length: u64,
}

/// One sub-op, viewed in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubOpView<'a> {
    pub code: SubOpCode,
    pub name: &'a [u8],
    pub data: &'a [u8],
    pub offset: u64,
    pub length: u64,
}

pub struct SubOps<'a> {
    payload: &'a [u8],
    index: u16,
    count: u16,
    body_at: usize,
}

impl<'a> Iterator for SubOps<'a> {
    type Item = SubOpView<'a>;

    fn next(&mut self) -> Option<SubOpView<'a>> {
        if self.index == self.count {
            return None;
        }
        let at = usize::from(self.index) * SUB_OP_DESC_SIZE;
        let desc = &self.payload[at..at + SUB_OP_DESC_SIZE];
        let code = SubOpCode::from_u8(desc[0]).expect("sub-op table validated before iteration");
        let name_len = usize::from(u16_at(desc, 2));
        let data_len = u32_at(desc, 4) as usize;
        let name = &self.payload[self.body_at..self.body_at + name_len];
        let data = &self.payload[self.body_at + name_len..self.body_at + name_len + data_len];
        self.body_at += name_len + data_len;
        self.index += 1;
        Some(SubOpView {
            code,
            name,
            data,
            offset: u64_at(desc, 8),
            length: u64_at(desc, 16),
        })
    }
}

/// One sub-op result of a reply: its status and output, viewed in place.
pub struct ReplyResults<'a> {
    payload: &'a [u8],
    index: usize,
    count: usize,
    body_at: usize,
}

impl<'a> Iterator for ReplyResults<'a> {
    type Item = (u32, &'a [u8]);

    fn next(&mut self) -> Option<(u32, &'a [u8])> {
        if self.index == self.count {
            return None;
        }
        let at = self.index * SUB_OP_RESULT_SIZE;
        let status = u32_at(self.payload, at);
        let len = u32_at(self.payload, at + 4) as usize;
        let out = &self.payload[self.body_at..self.body_at + len];
        self.body_at += len;
        self.index += 1;
        Some((status, out))
    }
}

/// A sub-op to encode (client side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubOpSpec<'a> {
    pub code: SubOpCode,
    pub name: &'a [u8],
    pub data: &'a [u8],
    pub offset: u64,
    pub length: u64,
}

impl<'a> SubOpSpec<'a> {
    pub fn write(offset: u64, data: &'a [u8]) -> Self {
        SubOpSpec {
            code: SubOpCode::Write,
            name: b"",
            data,
            offset,
            length: 0,
        }
    }
    pub fn read(offset: u64, length: u64) -> Self {
        SubOpSpec {
            code: SubOpCode::Read,
            name: b"",
            data: b"",
            offset,
            length,
        }
    }
    pub fn simple(code: SubOpCode) -> Self {
        SubOpSpec {
            code,
            name: b"",
            data: b"",
            offset: 0,
            length: 0,
        }
    }
}

/// Appends a complete request frame to `out` (client side; reuses `out`'s capacity).
pub fn encode_request(
    out: &mut Vec<u8>,
    opcode: Opcode,
    request_id: u64,
    oid: &[u8],
    ops: &[SubOpSpec<'_>],
    payload: &[u8],
) {
    assert!(oid.len() <= usize::from(OID_LEN_CEILING));
    assert!(ops.len() <= usize::from(SUB_OPS_CEILING));
    assert!(
        ops.is_empty() || payload.is_empty(),
        "OSD_OP payload is the sub-op table"
    );
    let start = out.len();
    out.resize(start + HEADER_SIZE, 0);
    out.extend_from_slice(oid);
    for op in ops {
        out.push(op.code as u8);
        out.push(0);
        out.extend_from_slice(&(op.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&(op.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&op.offset.to_le_bytes());
        out.extend_from_slice(&op.length.to_le_bytes());
    }
    for op in ops {
        out.extend_from_slice(op.name);
        out.extend_from_slice(op.data);
    }
    out.extend_from_slice(payload);
    let payload_len = out.len() - start - HEADER_SIZE - oid.len();
    let header = Header {
        opcode: opcode as u8,
        flags: 0,
        request_id,
        oid_len: oid.len() as u16,
        sub_op_count: ops.len() as u16,
        payload_len: u32::try_from(payload_len).expect("payload fits u32"),
        status: 0,
        crc: 0,
    };
    seal_frame(header, &mut out[start..]);
}

/// As `encode_request` for an OSD_OP with one WRITE sub-op of `data_len` bytes at `offset`,
/// whose data `fill` writes straight into the frame: a load generator makes each block where it
/// is sent from, instead of in a staging buffer that is then copied (a 4 KiB memcpy per write).
/// The frame is written at `out[start..]` and `out` ends with it (`start == out.len()`
/// appends). Bytes already there are overwritten, not zeroed first, so a frame buffer reused for
/// the next write (`start` 0) costs no 4 KiB memset either.
pub fn encode_write_request(
    out: &mut Vec<u8>,
    start: usize,
    request_id: u64,
    oid: &[u8],
    offset: u64,
    data_len: usize,
    fill: impl FnOnce(&mut [u8]),
) {
    assert!(oid.len() <= usize::from(OID_LEN_CEILING));
    assert!(start <= out.len(), "start {start} past the end");
    let desc_at = HEADER_SIZE + oid.len();
    let data_at = desc_at + SUB_OP_DESC_SIZE;
    // Only bytes past the old end are zeroed; a longer old frame is cut.
    out.resize(start + data_at + data_len, 0);
    let frame = &mut out[start..];
    frame[HEADER_SIZE..desc_at].copy_from_slice(oid);
    let desc = &mut frame[desc_at..data_at];
    desc[0] = SubOpCode::Write as u8;
    desc[1] = 0;
    desc[2..4].copy_from_slice(&0u16.to_le_bytes()); // no attribute name
    desc[4..8].copy_from_slice(
        &u32::try_from(data_len)
            .expect("data fits u32")
            .to_le_bytes(),
    );
    desc[8..16].copy_from_slice(&offset.to_le_bytes());
    desc[16..24].copy_from_slice(&0u64.to_le_bytes()); // length: a write's is its data
    fill(&mut frame[data_at..]);
    let header = Header {
        opcode: Opcode::OsdOp as u8,
        flags: 0,
        request_id,
        oid_len: oid.len() as u16,
        sub_op_count: 1,
        payload_len: u32::try_from(SUB_OP_DESC_SIZE + data_len).expect("payload fits u32"),
        status: 0,
        crc: 0,
    };
    seal_frame(header, frame);
}

/// Encodes `header` into the first 32 bytes of a contiguous `frame` and sets its crc.
pub fn seal_frame(header: Header, frame: &mut [u8]) {
    assert_eq!(frame.len(), header.frame_len());
    let mut raw = [0u8; HEADER_SIZE];
    header.encode(&mut raw);
    let mut crc = FrameCrc::new(&raw);
    crc.append(&frame[HEADER_SIZE..]);
    set_header_crc(&mut raw, crc.finish());
    frame[..HEADER_SIZE].copy_from_slice(&raw);
}

/// Encodes a reply header and its result table into `out` (server side, no allocation).
/// `outputs` are the sub-op outputs that will follow back to back (possibly from other buffers);
/// they are only read here, to compute the crc. Returns the bytes written to `out`.
pub fn encode_reply(
    out: &mut [u8],
    request: &Header,
    status: Status,
    results: &[(u32, u32)],
    outputs: &[&[u8]],
) -> usize {
    let output_len: usize = outputs.iter().map(|o| o.len()).sum();
    encode_reply_head(out, request, status, results, output_len, |crc| {
        for piece in outputs {
            crc.append(piece);
        }
    })
}

/// As `encode_reply` for one output whose crc32c is known (`output_crc`, over `output_len`
/// bytes): the output is not read. A store that keeps its blocks' crcs answers a read so,
/// and the client's check of the reply crc then covers the bytes as they were stored.
pub fn encode_reply_with_output_crc(
    out: &mut [u8],
    request: &Header,
    status: Status,
    results: &[(u32, u32)],
    output_len: usize,
    output_crc: u32,
) -> usize {
    encode_reply_head(out, request, status, results, output_len, |crc| {
        crc.append_crc(output_crc, output_len)
    })
}

fn encode_reply_head(
    out: &mut [u8],
    request: &Header,
    status: Status,
    results: &[(u32, u32)],
    output_len: usize,
    append_output: impl FnOnce(&mut FrameCrc),
) -> usize {
    // A reply answers one op: at most `SUB_OPS_CEILING` results (they travel inline).
    assert!(results.len() <= usize::from(SUB_OPS_CEILING));
    let table_len = results.len() * SUB_OP_RESULT_SIZE;
    assert!(out.len() >= HEADER_SIZE + table_len);
    // OSD_OP replies: the outputs are exactly what the results announce. PING and STATUS
    // replies have no result table and carry their payload raw.
    debug_assert!(
        results.is_empty()
            || output_len as u64 == results.iter().map(|r| u64::from(r.1)).sum::<u64>()
    );
    for (index, (result_status, out_len)) in results.iter().enumerate() {
        let at = HEADER_SIZE + index * SUB_OP_RESULT_SIZE;
        out[at..at + 4].copy_from_slice(&result_status.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&out_len.to_le_bytes());
    }
    let header = Header {
        opcode: request.opcode | REPLY_BIT,
        flags: 0,
        request_id: request.request_id,
        oid_len: 0,
        sub_op_count: results.len() as u16,
        payload_len: u32::try_from(table_len + output_len).expect("reply payload fits u32"),
        status: status as u32,
        crc: 0,
    };
    let mut raw = [0u8; HEADER_SIZE];
    header.encode(&mut raw);
    // The header's first 28 bytes and the result table in one crc call (in `out` the crc
    // field lies between them; `crc32c_append_pair` hashes both without staging them).
    let hashed_head: &[u8; HEADER_CRC_OFFSET] =
        raw[..HEADER_CRC_OFFSET].try_into().expect("28 of 32 bytes");
    let mut crc = FrameCrc(carmine_crc::crc32c_append_pair(
        0,
        hashed_head,
        &out[HEADER_SIZE..HEADER_SIZE + table_len],
    ));
    append_output(&mut crc);
    set_header_crc(&mut raw, crc.finish());
    out[..HEADER_SIZE].copy_from_slice(&raw);
    HEADER_SIZE + table_len
}

#[cfg(test)]
mod tests;
