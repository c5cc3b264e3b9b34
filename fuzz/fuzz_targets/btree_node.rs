//! The extent tree's node decoder fed arbitrary blocks (what bit rot, a torn or misdirected
//! write leaves): must never panic, and whatever decodes must re-encode to the same bytes.
#![no_main]

use carmine_storage::segment::btree::node::{decode, encode, NODE_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    // The nonce and address a reader expects come from the input's own header bytes, so that
    // the fuzzer can reach past those checks; a block of the wrong size must be refused too.
    let field = |at: usize| {
        bytes
            .get(at..at + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let (nonce, address) = (field(8), field(16));
    let _ = decode(bytes, nonce, address);
    // Then as a block whose crc is right (a forged or buggy node): every other check must
    // hold on its own, and the fuzzer gets past the checksum to reach them.
    let mut block = vec![0u8; NODE_BYTES];
    let n = bytes.len().min(NODE_BYTES);
    block[..n].copy_from_slice(&bytes[..n]);
    let crc = crc32c::crc32c(&block[8..]);
    block[4..8].copy_from_slice(&crc.to_le_bytes());
    if let Ok(node) = decode(&block, nonce, address) {
        let mut again = vec![0u8; NODE_BYTES];
        encode(&mut again, nonce, address, node.generation, node.level, &node.entries);
        assert_eq!(again, block, "a node that decodes re-encodes to the same bytes");
    }
});
