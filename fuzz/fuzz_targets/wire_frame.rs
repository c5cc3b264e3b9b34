//! The server's view of untrusted bytes from the network: header, limits, crc, sub-op table,
//! reply table. Must never panic, and a frame that validates must iterate consistently.
#![no_main]

use carmine_dataplane::wire::{self, Frame, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    for limits in [Limits::DEFAULT, Limits::CEILING] {
        let Ok(Some(header)) = wire::parse_header(bytes, &limits) else { continue };
        assert!(header.frame_len() <= limits.frame_len_max());
        if bytes.len() < header.frame_len() {
            continue;
        }
        let frame = Frame::view(header, bytes);
        let _ = frame.crc_ok(bytes);
        let _ = frame.opcode();
        if frame.validate_sub_ops().is_ok() {
            let ops: Vec<_> = frame.sub_ops().collect();
            assert_eq!(ops.len(), usize::from(header.sub_op_count));
            let body: usize = ops.iter().map(|op| op.name.len() + op.data.len()).sum();
            assert_eq!(body + ops.len() * wire::SUB_OP_DESC_SIZE, frame.payload.len());
        }
        if let Ok(results) = frame.reply_results() {
            assert_eq!(results.count(), usize::from(header.sub_op_count));
        }
    }
});
