//! A client's byte stream into the NBD server: client flags, options, then transmission
//! requests with their write payloads, decoded with the functions the frontend uses
//! (`carmine_dataplane::nbd`) and stepped through the phases the way `src/nbd/frontend.rs`
//! consumes them. Must never panic, and every verdict must keep the bounds it promises: what
//! is served lies inside the export and within the request limit, what is skipped is bounded.
//!
//! Input: export size (8 bytes) and largest request (4 bytes), then the stream.
#![no_main]

use carmine_dataplane::nbd::{self, Verdict};
use libfuzzer_sys::fuzz_target;

/// The stream from `at`, a cursor that refuses to run past the end.
struct Stream<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Stream<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }
    /// Drops up to `n` bytes (a discard ends with the input, like a client that vanishes).
    fn skip(&mut self, n: u64) {
        let left = (self.bytes.len() - self.at) as u64;
        self.at += n.min(left) as usize;
    }
}

fuzz_target!(|bytes: &[u8]| {
    if bytes.len() < 12 {
        return;
    }
    let export_size = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
    let payload_max = u64::from(u32::from_le_bytes(bytes[8..12].try_into().unwrap()));
    let mut s = Stream { bytes: &bytes[12..], at: 0 };
    let Some(flags) = s.take(4) else { return };
    if nbd::parse_client_flags(flags.try_into().unwrap()).is_err() {
        return; // Closed.
    }
    // Negotiation: until an export is chosen.
    loop {
        let Some(head) = s.take(nbd::OPTION_HEADER_BYTES) else { return };
        let Some(header) = nbd::parse_option_header(head.try_into().unwrap()) else {
            return; // Bad magic: closed.
        };
        let length = header.length as usize;
        if length > nbd::OPTION_BYTES_MAX {
            if header.option == nbd::OPT_EXPORT_NAME {
                return;
            }
            s.skip(length as u64);
            continue;
        }
        let Some(data) = s.take(length) else { return };
        match header.option {
            nbd::OPT_ABORT => return,
            nbd::OPT_EXPORT_NAME => break,
            nbd::OPT_GO | nbd::OPT_INFO => {
                let Some(info) = nbd::parse_info_request(data) else { continue };
                assert_eq!(4 + info.name.len() + 2 + info.info_types.len(), data.len());
                assert_eq!(info.info_types.len() % 2, 0);
                assert_eq!(&data[4..4 + info.name.len()], info.name);
                if header.option == nbd::OPT_GO {
                    break;
                }
            }
            nbd::OPT_LIST_META_CONTEXT | nbd::OPT_SET_META_CONTEXT => {
                let Some(meta) = nbd::parse_meta_context_request(data) else { continue };
                assert_eq!(&data[4..4 + meta.name.len()], meta.name);
                let bytes: usize = meta.queries().map(|q| 4 + q.len()).sum();
                assert_eq!(meta.queries().count(), meta.query_count as usize);
                assert_eq!(4 + meta.name.len() + 4 + bytes, data.len());
            }
            _ => {}
        }
    }
    // Transmission.
    while let Some(head) = s.take(nbd::REQUEST_HEADER_BYTES) {
        let Some(request) = nbd::parse_request(head.try_into().unwrap()) else { return };
        let length = u64::from(request.length);
        let end = request.offset.checked_add(length);
        match nbd::check_request(&request, export_size, payload_max) {
            Verdict::Read => {
                assert_eq!(request.command, nbd::CMD_READ);
                assert!(end.is_some_and(|end| end <= export_size) && length <= payload_max);
            }
            Verdict::Write => {
                assert_eq!(request.command, nbd::CMD_WRITE);
                assert!(end.is_some_and(|end| end <= export_size) && length <= payload_max);
                s.skip(length);
            }
            Verdict::Zero { no_hole } => {
                assert!(matches!(request.command, nbd::CMD_TRIM | nbd::CMD_WRITE_ZEROES));
                assert!(end.is_some_and(|end| end <= export_size));
                assert!(!no_hole || request.command == nbd::CMD_WRITE_ZEROES);
            }
            Verdict::Flush => assert_eq!(request.command, nbd::CMD_FLUSH),
            Verdict::BlockStatus { req_one } => {
                assert_eq!(request.command, nbd::CMD_BLOCK_STATUS);
                assert!(end.is_some_and(|end| end <= export_size) && length > 0);
                assert_eq!(req_one, request.flags & nbd::CMD_FLAG_REQ_ONE != 0);
            }
            Verdict::Disconnect => return,
            Verdict::Reject { error, discard } => {
                assert!(matches!(error, nbd::EINVAL | nbd::ENOSPC));
                if discard > 0 {
                    assert_eq!(request.command, nbd::CMD_WRITE);
                    assert!(discard <= nbd::DISCARD_BYTES_MAX);
                }
                s.skip(discard);
            }
            Verdict::RejectAndClose { .. } => return,
            Verdict::Close => {
                assert!(request.command == nbd::CMD_WRITE && length > nbd::DISCARD_BYTES_MAX);
                return;
            }
        }
    }
});
