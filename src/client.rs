//! Small blocking client helpers: one request, one reply, on an ordinary blocking socket.
//!
//! For tooling and one-off questions (`status`, `ping`, a single object op). The load generator
//! does not use `call`: it drives its own non-blocking, pipelined engine (`load.rs`).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use carmine_dataplane::wire::{self, Frame, Limits, Opcode, Status, SubOpSpec, HEADER_SIZE};

/// How long `connect` waits for each address of the target.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a blocking call waits for its reply (or for the socket to accept its request)
/// before giving up, so a wedged server cannot hang a tool forever.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One reply, copied out of the receive buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedReply {
    /// The op's status (`wire::Status` as u32; kept raw so a newer server's codes survive).
    pub status: u32,
    /// OSD_OP replies: each sub-op's (status, output). Empty for other opcodes.
    pub results: Vec<(u32, Vec<u8>)>,
    /// The reply's whole payload: the JSON document of STATUS, the echo of PING, the raw
    /// result table and outputs of OSD_OP.
    pub payload: Vec<u8>,
}

impl OwnedReply {
    pub fn status_name(&self) -> String {
        status_name(self.status)
    }
}

/// The wire name of a status code ("not_found"), or "status_<n>" for codes this build does not know.
pub fn status_name(code: u32) -> String {
    match Status::from_u32(code) {
        Some(status) => status.name().to_string(),
        None => format!("status_{code}"),
    }
}

/// "connection refused" rather than "Connection refused (os error 111)": messages read as sentences.
pub fn io_reason(error: &io::Error) -> String {
    match error.kind() {
        ErrorKind::ConnectionRefused
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::NotConnected
        | ErrorKind::AddrNotAvailable
        | ErrorKind::BrokenPipe
        | ErrorKind::TimedOut
        | ErrorKind::WouldBlock
        | ErrorKind::UnexpectedEof => error.kind().to_string(),
        _ => error.to_string(),
    }
}

/// Connects to `target` ("host:port") with TCP_NODELAY and `CALL_TIMEOUT` read/write timeouts.
pub fn connect(target: &str) -> Result<TcpStream, String> {
    let addrs = target
        .to_socket_addrs()
        .map_err(|e| format!("connect {target}: {}", io_reason(&e)))?;
    let mut last_error = format!("connect {target}: no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => {
                let setup = stream
                    .set_nodelay(true)
                    .and_then(|()| stream.set_read_timeout(Some(CALL_TIMEOUT)))
                    .and_then(|()| stream.set_write_timeout(Some(CALL_TIMEOUT)));
                setup.map_err(|e| format!("connect {target}: {}", io_reason(&e)))?;
                return Ok(stream);
            }
            Err(e) => last_error = format!("connect {target}: {}", io_reason(&e)),
        }
    }
    Err(last_error)
}

/// Request ids of blocking calls: unique per process so a stray reply is never mistaken for ours.
static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// Sends one request and reads exactly one reply frame (crc verified).
pub fn call(
    stream: &mut TcpStream,
    opcode: Opcode,
    oid: &[u8],
    ops: &[SubOpSpec<'_>],
) -> Result<OwnedReply, String> {
    call_with_payload(stream, opcode, oid, ops, b"")
}

/// `call` with a raw payload (PING's echo); `ops` must then be empty.
pub fn call_with_payload(
    stream: &mut TcpStream,
    opcode: Opcode,
    oid: &[u8],
    ops: &[SubOpSpec<'_>],
    payload: &[u8],
) -> Result<OwnedReply, String> {
    if oid.len() > usize::from(wire::OID_LEN_CEILING)
        || ops.len() > usize::from(wire::SUB_OPS_CEILING)
    {
        return Err(format!(
            "request too large: {} bytes of object id, {} sub-ops",
            oid.len(),
            ops.len()
        ));
    }
    if !ops.is_empty() && !payload.is_empty() {
        return Err("a request carries either sub-ops or a raw payload, not both".to_string());
    }
    let request_id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
    let mut request = Vec::new();
    wire::encode_request(&mut request, opcode, request_id, oid, ops, payload);
    stream
        .write_all(&request)
        .map_err(|e| format!("send request: {}", io_reason(&e)))?;
    let frame_bytes = read_frame(stream)?;
    reply_from_frame(&frame_bytes, opcode, request_id)
}

/// Reads one whole frame. The header is read first so the body's length is known (and bounded by
/// the wire ceilings) before anything is allocated for it.
fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut header_bytes = [0u8; HEADER_SIZE];
    read_exact_or_closed(stream, &mut header_bytes)?;
    let header = match wire::parse_header(&header_bytes, &Limits::CEILING) {
        Ok(Some(header)) => header,
        Ok(None) => unreachable!("a full header was read"),
        Err(e) => return Err(format!("malformed reply: {e}")),
    };
    let mut frame = vec![0u8; header.frame_len()];
    frame[..HEADER_SIZE].copy_from_slice(&header_bytes);
    read_exact_or_closed(stream, &mut frame[HEADER_SIZE..])?;
    Ok(frame)
}

fn read_exact_or_closed(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => "server closed the connection".to_string(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("no reply within {} s", CALL_TIMEOUT.as_secs())
        }
        _ => format!("receive reply: {}", io_reason(&e)),
    })
}

pub(crate) fn reply_from_frame(
    bytes: &[u8],
    opcode: Opcode,
    request_id: u64,
) -> Result<OwnedReply, String> {
    let header = wire::parse_header(bytes, &Limits::CEILING)
        .map_err(|e| format!("malformed reply: {e}"))?
        .ok_or("malformed reply: short header")?;
    let frame = Frame::view(header, bytes);
    if !frame.crc_ok(bytes) {
        return Err("reply crc mismatch".to_string());
    }
    // A server that cannot parse a request answers once (possibly without our id) and closes:
    // its status is then the most useful thing to report.
    if header.request_id != request_id || header.opcode != (opcode as u8 | wire::REPLY_BIT) {
        return Err(format!(
            "unexpected reply (opcode {:#04x}, request id {}, status {}) to request {request_id}",
            header.opcode,
            header.request_id,
            status_name(header.status)
        ));
    }
    let mut results = Vec::new();
    if opcode == Opcode::OsdOp {
        let table = frame
            .reply_results()
            .map_err(|_| "malformed reply: result table does not fit".to_string())?;
        results.extend(table.map(|(status, out)| (status, out.to_vec())));
    }
    Ok(OwnedReply {
        status: header.status,
        results,
        payload: frame.payload.to_vec(),
    })
}

/// Asks the server at `target` for its STATUS document.
pub fn fetch_status(target: &str) -> Result<serde_json::Value, String> {
    let mut stream = connect(target)?;
    let reply =
        call(&mut stream, Opcode::Status, b"", &[]).map_err(|e| format!("status {target}: {e}"))?;
    if reply.status != Status::Ok as u32 {
        return Err(format!(
            "status {target}: server answered {}",
            reply.status_name()
        ));
    }
    serde_json::from_slice(&reply.payload)
        .map_err(|e| format!("status {target}: reply is not valid JSON: {e}"))
}
