//! Decoders of on-disk structures, fed arbitrary bytes (what bit rot or a torn write leaves):
//! superblock, segment header, record header and head, deltas. Must never panic; whatever
//! decodes must re-encode to the same bytes.
#![no_main]

use carmine_storage::segment::format::{Delta, DeltaReader, RecordHeader, SegmentHeader, Superblock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(sb) = Superblock::decode(bytes) {
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    }
    let nonce = bytes.get(8..16).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let segment = bytes.get(16..20).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()));
    if let Ok(header) = SegmentHeader::decode(bytes, nonce, segment) {
        assert_eq!(SegmentHeader::decode(&header.encode(), nonce, segment), Ok(header));
    }
    if let Ok(header) = RecordHeader::decode(bytes, nonce) {
        let _ = header.head_blocks();
        if let Ok(metadata) = header.verify_head(bytes) {
            let _ = DeltaReader::new(metadata).count();
        }
        let _ = header.verify_data(bytes);
    }
    let mut reencoded = Vec::new();
    let mut consumed_all = true;
    for delta in DeltaReader::new(bytes) {
        match delta {
            Ok(delta) => Delta::encode(&delta, &mut reencoded),
            Err(_) => {
                consumed_all = false;
                break;
            }
        }
    }
    if consumed_all {
        assert_eq!(reencoded, bytes, "deltas that decode re-encode to the same bytes");
    }
});
