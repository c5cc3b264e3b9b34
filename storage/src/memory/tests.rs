use super::*;
use crate::object_store::{OBJECT_SIZE_MAX_BYTES, XATTR_NAME_MAX_BYTES};

const CAPACITY_BYTES: u64 = 1 << 20;

/// What one submit produced: the op's result, the per-sub-op results and their outputs.
struct Outcome {
    submit: Result<Submit, StoreError>,
    results: Vec<SubOpResult>,
    outputs: Vec<Vec<u8>>,
}

impl Outcome {
    fn status(&self, index: usize) -> Result<(), StoreError> {
        self.results[index].result()
    }
}

fn run_with(
    store: &mut MemoryStore,
    oid: &[u8],
    ops: &[SubOp<'_>],
    out_capacity: usize,
) -> Outcome {
    let mut region = vec![0u8; out_capacity];
    let mut results = vec![SubOpResult::default(); ops.len()];
    let mut out = OutputBuffer::from_slice(&mut region);
    let submit = store.submit(7, oid, ops, &mut out, &mut results);
    store.verify();
    let outputs = results
        .iter()
        .map(|r| region[r.out_offset as usize..][..r.out_len as usize].to_vec())
        .collect();
    Outcome {
        submit,
        results,
        outputs,
    }
}

fn run(store: &mut MemoryStore, oid: &[u8], ops: &[SubOp<'_>]) -> Outcome {
    run_with(store, oid, ops, 4096)
}

fn read_all(store: &mut MemoryStore, oid: &[u8]) -> Result<Vec<u8>, StoreError> {
    let outcome = run(
        store,
        oid,
        &[SubOp::Read {
            offset: 0,
            length: 4096,
        }],
    );
    assert_eq!(outcome.submit, Ok(Submit::Done));
    outcome.status(0).map(|()| outcome.outputs[0].clone())
}

fn stat(store: &mut MemoryStore, oid: &[u8]) -> Result<ObjectStat, StoreError> {
    let outcome = run(store, oid, &[SubOp::Stat]);
    outcome
        .status(0)
        .map(|()| ObjectStat::from_bytes(&outcome.outputs[0]).unwrap())
}

#[test]
fn write_then_read_round_trips() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let outcome = run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 0,
            data: b"hello",
        }],
    );
    assert_eq!(outcome.submit, Ok(Submit::Done));
    assert_eq!(outcome.status(0), Ok(()));
    assert_eq!(read_all(&mut store, b"obj"), Ok(b"hello".to_vec()));
    assert_eq!(store.stats().objects, 1);
    assert_eq!(store.stats().bytes_stored, 5);
}

/// The bytes and crc `read_in_place` gives, checked against a read through `submit`.
fn in_place(store: &mut MemoryStore, oid: &[u8], offset: u64, length: u64) -> Option<Vec<u8>> {
    let read = store.read_in_place(oid, offset, length)?;
    // SAFETY: the store promises the bytes until its next mutating submit; none runs
    // before this copy.
    let bytes = unsafe { std::slice::from_raw_parts(read.ptr, read.len) }.to_vec();
    assert_eq!(
        read.crc,
        carmine_crc::crc32c(&bytes),
        "kept crc matches the bytes"
    );
    let outcome = run_with(store, oid, &[SubOp::Read { offset, length }], bytes.len());
    assert!(
        outcome.outputs[0] == bytes,
        "same bytes as a submitted read"
    );
    Some(bytes)
}

#[test]
fn read_in_place_serves_whole_blocks_with_their_crc() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let block = READ_IN_PLACE_BLOCK_BYTES;
    let data: Vec<u8> = (0..5 * block as usize).map(|i| (i % 251) as u8).collect();
    run(
        &mut store,
        b"o",
        &[SubOp::Write {
            offset: 0,
            data: &data[..4 * 4096 + 100],
        }],
    );
    let reads_before = store.stats().reads;
    assert!(in_place(&mut store, b"o", 0, block).unwrap() == data[..4096]);
    assert_eq!(
        store.stats().reads,
        reads_before + 2,
        "in place and the check's submit"
    );
    // Several blocks: the crc is the kept crcs joined.
    assert!(in_place(&mut store, b"o", block, 3 * block).unwrap() == data[4096..4 * 4096]);
    // Refused (the usual path answers these): not whole blocks, past the end (the last
    // block is partial), empty, a missing object.
    assert!(store.read_in_place(b"o", 1, block).is_none());
    assert!(store.read_in_place(b"o", 0, block + 1).is_none());
    assert!(store.read_in_place(b"o", 4 * block, block).is_none());
    assert!(store.read_in_place(b"o", 0, 0).is_none());
    assert!(store.read_in_place(b"missing", 0, block).is_none());
}

#[test]
fn every_mutation_forgets_the_crcs_it_changes() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let block = READ_IN_PLACE_BLOCK_BYTES;
    let data = vec![7u8; 3 * 4096];
    run(
        &mut store,
        b"o",
        &[SubOp::Write {
            offset: 0,
            data: &data,
        }],
    );
    for first in 0..3 {
        in_place(&mut store, b"o", first * block, block).unwrap();
    }
    // Each step changes some bytes; `in_place` asserts the crc against the new bytes
    // (and the store's own debug check names a stale block).
    run(
        &mut store,
        b"o",
        &[SubOp::Write {
            offset: 4095,
            data: b"xy",
        }],
    );
    in_place(&mut store, b"o", 0, 3 * block).unwrap();
    run(
        &mut store,
        b"o",
        &[SubOp::Zero {
            offset: 5000,
            length: 10,
        }],
    );
    in_place(&mut store, b"o", 0, 3 * block).unwrap();
    run(&mut store, b"o", &[SubOp::Truncate { size: 6000 }]);
    assert!(
        store.read_in_place(b"o", block, block).is_none(),
        "block 1 is partial now"
    );
    run(&mut store, b"o", &[SubOp::Truncate { size: 3 * block }]);
    let grown = in_place(&mut store, b"o", block, 2 * block).unwrap();
    assert!(
        grown[6000 - 4096..].iter().all(|&b| b == 0),
        "truncate-grown bytes are zeros"
    );
    run(
        &mut store,
        b"o",
        &[SubOp::Write {
            offset: 4 * block,
            data: b"z",
        }],
    );
    in_place(&mut store, b"o", 0, 4 * block).unwrap();
    run(&mut store, b"o", &[SubOp::WriteFull { data: &[9u8; 8192] }]);
    assert!(in_place(&mut store, b"o", 0, 2 * block).unwrap() == [9u8; 8192]);
    run(
        &mut store,
        b"o",
        &[
            SubOp::Remove,
            SubOp::Write {
                offset: 0,
                data: &[1u8; 4096],
            },
        ],
    );
    assert!(in_place(&mut store, b"o", 0, block).unwrap() == [1u8; 4096]);
}

#[test]
fn write_past_end_zero_fills_the_hole() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 0,
            data: b"ab",
        }],
    );
    run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 5,
            data: b"cd",
        }],
    );
    assert_eq!(read_all(&mut store, b"obj"), Ok(b"ab\0\0\0cd".to_vec()));
    // Overwrite within the size does not change it.
    run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 1,
            data: b"XY",
        }],
    );
    assert_eq!(read_all(&mut store, b"obj"), Ok(b"aXY\0\0cd".to_vec()));
}

#[test]
fn empty_write_creates_without_extending() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let outcome = run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 100,
            data: b"",
        }],
    );
    assert_eq!(outcome.submit, Ok(Submit::Done));
    assert_eq!(
        stat(&mut store, b"obj"),
        Ok(ObjectStat {
            size: 0,
            generation: 1
        })
    );
}

#[test]
fn write_full_replaces_data_and_keeps_xattrs() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(
        &mut store,
        b"obj",
        &[
            SubOp::Write {
                offset: 0,
                data: b"long contents",
            },
            SubOp::SetXattr {
                name: b"user.a",
                value: b"1",
            },
        ],
    );
    run(&mut store, b"obj", &[SubOp::WriteFull { data: b"new" }]);
    assert_eq!(read_all(&mut store, b"obj"), Ok(b"new".to_vec()));
    let outcome = run(&mut store, b"obj", &[SubOp::GetXattr { name: b"user.a" }]);
    assert_eq!(outcome.outputs[0], b"1");
    assert_eq!(store.stats().bytes_stored, 3 + 6 + 1);
}

#[test]
fn short_read_past_end() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 0,
            data: b"0123456789",
        }],
    );
    let outcome = run(
        &mut store,
        b"obj",
        &[
            SubOp::Read {
                offset: 6,
                length: 100,
            },
            SubOp::Read {
                offset: 10,
                length: 5,
            },
            SubOp::Read {
                offset: u64::MAX,
                length: u64::MAX,
            },
            SubOp::Read {
                offset: 2,
                length: 3,
            },
        ],
    );
    assert_eq!(
        outcome.outputs,
        vec![b"6789".to_vec(), vec![], vec![], b"234".to_vec()]
    );
    assert!(outcome.results.iter().all(|r| r.status == STATUS_OK));
    // Outputs are back to back.
    let offsets: Vec<u32> = outcome.results.iter().map(|r| r.out_offset).collect();
    assert_eq!(offsets, vec![0, 4, 4, 4]);
}

#[test]
fn reads_of_missing_object_report_not_found() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let outcome = run(
        &mut store,
        b"ghost",
        &[
            SubOp::Read {
                offset: 0,
                length: 4,
            },
            SubOp::Stat,
            SubOp::GetXattr { name: b"a" },
            SubOp::OmapGet { key: b"k" },
        ],
    );
    assert_eq!(outcome.submit, Ok(Submit::Done));
    for index in 0..4 {
        assert_eq!(outcome.status(index), Err(StoreError::NotFound));
        assert_eq!(outcome.results[index].out_len, 0);
    }
    assert_eq!(store.stats().objects, 0);
    assert_eq!(store.stats().reads, 4);
    assert_eq!(store.stats().transactions, 0);
}

#[test]
fn reads_see_earlier_sub_ops_of_the_same_op() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let outcome = run(
        &mut store,
        b"obj",
        &[
            SubOp::Read {
                offset: 0,
                length: 8,
            },
            SubOp::Write {
                offset: 0,
                data: b"abc",
            },
            SubOp::Read {
                offset: 0,
                length: 8,
            },
            SubOp::Remove,
            SubOp::Stat,
            SubOp::Truncate { size: 2 },
            SubOp::Read {
                offset: 0,
                length: 8,
            },
        ],
    );
    assert_eq!(outcome.submit, Ok(Submit::Done));
    assert_eq!(outcome.status(0), Err(StoreError::NotFound));
    assert_eq!(outcome.outputs[2], b"abc");
    assert_eq!(outcome.status(4), Err(StoreError::NotFound));
    assert_eq!(outcome.outputs[6], b"\0\0");
    assert_eq!(
        stat(&mut store, b"obj"),
        Ok(ObjectStat {
            size: 2,
            generation: 1
        })
    );
}

#[test]
fn zero_range_and_extend() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 0,
            data: b"abcdef",
        }],
    );
    run(
        &mut store,
        b"obj",
        &[SubOp::Zero {
            offset: 1,
            length: 2,
        }],
    );
    assert_eq!(read_all(&mut store, b"obj"), Ok(b"a\0\0def".to_vec()));
    run(
        &mut store,
        b"obj",
        &[SubOp::Zero {
            offset: 5,
            length: 3,
        }],
    );
    assert_eq!(read_all(&mut store, b"obj"), Ok(b"a\0\0de\0\0\0".to_vec()));
    run(
        &mut store,
        b"obj",
        &[SubOp::Zero {
            offset: 20,
            length: 0,
        }],
    );
    assert_eq!(stat(&mut store, b"obj").unwrap().size, 8);
}

#[test]
fn zero_of_missing_object_is_not_found() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let outcome = run(
        &mut store,
        b"obj",
        &[SubOp::Zero {
            offset: 0,
            length: 4,
        }],
    );
    assert_eq!(outcome.submit, Err(StoreError::NotFound));
    assert_eq!(store.stats().objects, 0);
    assert_eq!(store.stats().errors, 1);
}

#[test]
fn truncate_shrinks_grows_and_creates() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(&mut store, b"obj", &[SubOp::Truncate { size: 3 }]);
    assert_eq!(read_all(&mut store, b"obj"), Ok(vec![0, 0, 0]));
    run(
        &mut store,
        b"obj",
        &[
            SubOp::WriteFull { data: b"abcdef" },
            SubOp::Truncate { size: 2 },
        ],
    );
    assert_eq!(read_all(&mut store, b"obj"), Ok(b"ab".to_vec()));
    run(&mut store, b"obj", &[SubOp::Truncate { size: 4 }]);
    // Bytes past a truncation come back as zeros, not as the old data.
    assert_eq!(read_all(&mut store, b"obj"), Ok(b"ab\0\0".to_vec()));
    assert_eq!(store.stats().bytes_stored, 4);
}

#[test]
fn truncate_releases_large_slack() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let big = vec![7u8; 512 * 1024];
    run(&mut store, b"obj", &[SubOp::WriteFull { data: &big }]);
    run(&mut store, b"obj", &[SubOp::Truncate { size: 10 }]);
    let capacity = store.objects.get(&b"obj"[..]).unwrap().data.capacity();
    assert!(
        capacity <= DATA_SLACK_MAX_BYTES,
        "kept {capacity} bytes allocated"
    );
}

#[test]
fn remove_frees_and_missing_remove_fails_whole_op() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(
        &mut store,
        b"obj",
        &[
            SubOp::Write {
                offset: 0,
                data: b"data",
            },
            SubOp::OmapSet {
                key: b"k",
                value: b"v",
            },
        ],
    );
    let outcome = run(&mut store, b"obj", &[SubOp::Remove]);
    assert_eq!(outcome.submit, Ok(Submit::Done));
    assert_eq!(store.stats().objects, 0);
    assert_eq!(store.stats().bytes_stored, 0);
    // The SetXattr would create the object, but the Remove after it fails the op.
    let outcome = run(
        &mut store,
        b"other",
        &[
            SubOp::SetXattr {
                name: b"a",
                value: b"b",
            },
            SubOp::Remove,
            SubOp::Remove,
        ],
    );
    assert_eq!(outcome.submit, Err(StoreError::NotFound));
    assert_eq!(stat(&mut store, b"other"), Err(StoreError::NotFound));
    assert_eq!(store.stats().objects, 0);
}

#[test]
fn failing_mutation_applies_nothing() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 0,
            data: b"keep",
        }],
    );
    let outcome = run(
        &mut store,
        b"obj",
        &[
            SubOp::SetXattr {
                name: b"user.x",
                value: b"1",
            },
            SubOp::Write {
                offset: 0,
                data: b"lost",
            },
            SubOp::Truncate {
                size: OBJECT_SIZE_MAX_BYTES + 1,
            },
        ],
    );
    assert_eq!(outcome.submit, Err(StoreError::TooLarge));
    let outcome = run(
        &mut store,
        b"obj",
        &[
            SubOp::GetXattr { name: b"user.x" },
            SubOp::Read {
                offset: 0,
                length: 10,
            },
        ],
    );
    assert_eq!(outcome.status(0), Err(StoreError::NoData));
    assert_eq!(outcome.outputs[1], b"keep");
    assert_eq!(
        stat(&mut store, b"obj"),
        Ok(ObjectStat {
            size: 4,
            generation: 1
        })
    );
}

#[test]
fn first_failing_mutation_decides_the_error() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let long_name = [b'n'; XATTR_NAME_MAX_BYTES + 1];
    let outcome = run(
        &mut store,
        b"obj",
        &[
            SubOp::Zero {
                offset: 0,
                length: 1,
            },
            SubOp::SetXattr {
                name: &long_name,
                value: b"",
            },
        ],
    );
    assert_eq!(outcome.submit, Err(StoreError::NotFound));
    let outcome = run(
        &mut store,
        b"obj",
        &[
            SubOp::SetXattr {
                name: &long_name,
                value: b"",
            },
            SubOp::Zero {
                offset: 0,
                length: 1,
            },
        ],
    );
    assert_eq!(outcome.submit, Err(StoreError::TooLarge));
    let outcome = run(
        &mut store,
        b"obj",
        &[SubOp::SetXattr {
            name: b"",
            value: b"",
        }],
    );
    assert_eq!(outcome.submit, Err(StoreError::InvalidArgument));
}

#[test]
fn no_space_leaves_store_unchanged_until_remove_frees() {
    let mut store = MemoryStore::new(10);
    run(
        &mut store,
        b"a",
        &[SubOp::Write {
            offset: 0,
            data: b"12345678",
        }],
    );
    let before = store.stats();
    let outcome = run(
        &mut store,
        b"b",
        &[SubOp::Write {
            offset: 0,
            data: b"xyz",
        }],
    );
    assert_eq!(outcome.submit, Err(StoreError::NoSpace));
    let outcome = run(
        &mut store,
        b"a",
        &[SubOp::OmapSet {
            key: b"k",
            value: b"vv",
        }],
    );
    assert_eq!(outcome.submit, Err(StoreError::NoSpace));
    assert_eq!(
        store.stats(),
        StoreStats {
            errors: before.errors + 2,
            ..before
        }
    );
    assert_eq!(stat(&mut store, b"b"), Err(StoreError::NotFound));
    // Exactly full is allowed.
    assert_eq!(
        run(
            &mut store,
            b"a",
            &[SubOp::Write {
                offset: 8,
                data: b"90"
            }]
        )
        .submit,
        Ok(Submit::Done)
    );
    assert_eq!(store.stats().bytes_stored, 10);
    assert_eq!(
        run(&mut store, b"a", &[SubOp::Remove]).submit,
        Ok(Submit::Done)
    );
    assert_eq!(
        run(
            &mut store,
            b"b",
            &[SubOp::Write {
                offset: 0,
                data: b"xyz"
            }]
        )
        .submit,
        Ok(Submit::Done)
    );
    assert_eq!(store.stats().bytes_stored, 3);
}

#[test]
fn no_space_is_checked_at_every_step() {
    let mut store = MemoryStore::new(10);
    // Ends at 2 bytes, but passes through 12.
    let outcome = run(
        &mut store,
        b"a",
        &[
            SubOp::Write {
                offset: 0,
                data: &[1; 12],
            },
            SubOp::Truncate { size: 2 },
        ],
    );
    assert_eq!(outcome.submit, Err(StoreError::NoSpace));
    // Freeing first within the op makes room for what follows.
    run(
        &mut store,
        b"a",
        &[SubOp::Write {
            offset: 0,
            data: &[1; 10],
        }],
    );
    let outcome = run(
        &mut store,
        b"a",
        &[
            SubOp::Truncate { size: 0 },
            SubOp::SetXattr {
                name: b"n",
                value: &[2; 9],
            },
        ],
    );
    assert_eq!(outcome.submit, Ok(Submit::Done));
    assert_eq!(store.stats().bytes_stored, 10);
}

#[test]
fn metadata_accounting_tracks_replacements_within_an_op() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let outcome = run(
        &mut store,
        b"obj",
        &[
            SubOp::OmapSet {
                key: b"k",
                value: b"1234",
            },
            SubOp::OmapSet {
                key: b"k",
                value: b"1",
            },
            SubOp::SetXattr {
                name: b"x",
                value: b"12",
            },
            SubOp::OmapRemove { key: b"absent" },
            SubOp::OmapGet { key: b"k" },
        ],
    );
    assert_eq!(outcome.submit, Ok(Submit::Done));
    assert_eq!(outcome.outputs[4], b"1");
    assert_eq!(store.stats().bytes_stored, 2 + 3);
    run(&mut store, b"obj", &[SubOp::OmapRemove { key: b"k" }]);
    assert_eq!(store.stats().bytes_stored, 3);
    let outcome = run(&mut store, b"obj", &[SubOp::OmapGet { key: b"k" }]);
    assert_eq!(outcome.status(0), Err(StoreError::NoData));
}

#[test]
fn omap_remove_of_missing_object_is_not_found() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    assert_eq!(
        run(&mut store, b"obj", &[SubOp::OmapRemove { key: b"k" }]).submit,
        Err(StoreError::NotFound)
    );
}

#[test]
fn xattr_overwrite_and_get() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(
        &mut store,
        b"obj",
        &[SubOp::SetXattr {
            name: b"a",
            value: b"one",
        }],
    );
    run(
        &mut store,
        b"obj",
        &[
            SubOp::SetXattr {
                name: b"a",
                value: b"two",
            },
            SubOp::SetXattr {
                name: b"b",
                value: b"",
            },
        ],
    );
    let outcome = run(
        &mut store,
        b"obj",
        &[
            SubOp::GetXattr { name: b"a" },
            SubOp::GetXattr { name: b"b" },
            SubOp::GetXattr { name: b"c" },
            SubOp::GetXattr { name: b"" },
        ],
    );
    assert_eq!(outcome.outputs[0], b"two");
    assert_eq!(outcome.status(1), Ok(()));
    assert_eq!(outcome.outputs[1], b"");
    assert_eq!(outcome.status(2), Err(StoreError::NoData));
    assert_eq!(outcome.status(3), Err(StoreError::InvalidArgument));
    assert_eq!(store.stats().bytes_stored, 4 + 1);
}

#[test]
fn output_that_does_not_fit_is_range() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 0,
            data: b"0123456789",
        }],
    );
    let outcome = run_with(
        &mut store,
        b"obj",
        &[
            SubOp::Read {
                offset: 0,
                length: 4,
            },
            SubOp::Stat,
            SubOp::Read {
                offset: 4,
                length: 2,
            },
            SubOp::Read {
                offset: 0,
                length: 10,
            },
        ],
        8,
    );
    assert_eq!(outcome.submit, Ok(Submit::Done));
    assert_eq!(outcome.outputs[0], b"0123");
    assert_eq!(outcome.status(1), Err(StoreError::Range));
    assert_eq!(outcome.results[1].out_len, 0);
    // A smaller output after a Range still fits.
    assert_eq!(outcome.outputs[2], b"45");
    assert_eq!(outcome.results[2].out_offset, 4);
    assert_eq!(outcome.status(3), Err(StoreError::Range));
    let outcome = run_with(
        &mut store,
        b"obj",
        &[SubOp::Read {
            offset: 0,
            length: 1,
        }],
        0,
    );
    assert_eq!(outcome.status(0), Err(StoreError::Range));
}

#[test]
fn stat_output_encoding() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(&mut store, b"obj", &[SubOp::Truncate { size: 0x0102 }]);
    let outcome = run(&mut store, b"obj", &[SubOp::Stat]);
    assert_eq!(
        outcome.results[0],
        SubOpResult {
            status: 0,
            out_offset: 0,
            out_len: 16
        }
    );
    assert_eq!(
        outcome.outputs[0],
        [2, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn generation_counts_mutating_ops() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let outcome = run(
        &mut store,
        b"obj",
        &[
            SubOp::Write {
                offset: 0,
                data: b"a",
            },
            SubOp::Write {
                offset: 1,
                data: b"b",
            },
            SubOp::Stat,
        ],
    );
    // Stat sees the bump of its own op: the op counts once.
    assert_eq!(
        ObjectStat::from_bytes(&outcome.outputs[2])
            .unwrap()
            .generation,
        1
    );
    run(
        &mut store,
        b"obj",
        &[
            SubOp::OmapSet {
                key: b"k",
                value: b"v",
            },
            SubOp::Truncate { size: 1 },
        ],
    );
    assert_eq!(stat(&mut store, b"obj").unwrap().generation, 2);
    // Read-only ops and failed ops do not count.
    run(
        &mut store,
        b"obj",
        &[SubOp::Read {
            offset: 0,
            length: 1,
        }],
    );
    run(
        &mut store,
        b"obj",
        &[
            SubOp::Write {
                offset: 0,
                data: b"x",
            },
            SubOp::Truncate { size: u64::MAX },
        ],
    );
    assert_eq!(stat(&mut store, b"obj").unwrap().generation, 2);
    // A recreated object starts over.
    run(
        &mut store,
        b"obj",
        &[
            SubOp::Write {
                offset: 0,
                data: b"x",
            },
            SubOp::Remove,
            SubOp::Write {
                offset: 0,
                data: b"y",
            },
        ],
    );
    assert_eq!(
        stat(&mut store, b"obj"),
        Ok(ObjectStat {
            size: 1,
            generation: 1
        })
    );
    assert_eq!(store.stats().transactions, 3);
}

#[test]
fn malformed_operations_are_rejected() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    assert_eq!(
        run(&mut store, b"", &[SubOp::Stat]).submit,
        Err(StoreError::InvalidArgument)
    );
    assert_eq!(
        run(&mut store, b"obj", &[]).submit,
        Err(StoreError::InvalidArgument)
    );
    let long_oid = vec![b'o'; crate::object_store::OBJECT_ID_MAX_BYTES + 1];
    assert_eq!(
        run(&mut store, &long_oid, &[SubOp::Truncate { size: 1 }]).submit,
        Err(StoreError::TooLarge)
    );
    assert_eq!(store.stats().objects, 0);
    assert_eq!(store.stats().errors, 3);
}

#[test]
#[should_panic(expected = "fewer results than sub-ops")]
fn too_few_results_is_a_bug() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    let mut results = [SubOpResult::default(); 1];
    let _ = store.submit(
        0,
        b"obj",
        &[SubOp::Stat, SubOp::Stat],
        &mut OutputBuffer::empty(),
        &mut results,
    );
}

#[test]
fn poll_reports_nothing() {
    let mut store = MemoryStore::new(CAPACITY_BYTES);
    run(
        &mut store,
        b"obj",
        &[SubOp::Write {
            offset: 0,
            data: b"x",
        }],
    );
    let mut calls = 0;
    assert_eq!(store.poll(64, &mut |_, _| calls += 1), 0);
    assert_eq!(calls, 0);
}
