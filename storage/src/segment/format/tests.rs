use super::*;
use proptest::prelude::*;

const UUID: [u8; 16] = *b"0123456789abcdef";

fn superblock() -> Superblock {
    Superblock::for_device(2 << 30, 64 << 20, 2, UUID).unwrap()
}

#[test]
fn superblock_round_trip_and_partition() {
    let sb = superblock();
    assert_eq!(
        sb.segment_count,
        ((2u64 << 30) - SEGMENTS_START_BYTES) as u32 / (64 << 20)
    );
    assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    let (a, b) = (sb.shard_segments(0), sb.shard_segments(1));
    assert_eq!(a.end, b.start, "partitions are contiguous and disjoint");
    assert_eq!(b.end, sb.segment_count, "and cover every segment");
    assert!(a.len() >= SEGMENTS_PER_SHARD_MIN as usize);
    assert_eq!(sb.segment_offset(0), SEGMENTS_START_BYTES);
    let last = sb.segment_offset(sb.segment_count - 1) + sb.segment_size;
    assert!(last <= sb.device_size);
}

#[test]
fn superblock_keeps_the_spare_and_refuses_other_versions() {
    let sb = superblock().with_spare(25).unwrap();
    assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    let blocks = u64::from(sb.shard_segments(1).len() as u32) * ((64 << 20) / 4096 - 1);
    assert_eq!(sb.usable_blocks(1), blocks * 3 / 4);
    assert_eq!(superblock().usable_blocks(1), blocks);
    assert!(superblock().with_spare(SPARE_PERCENT_MAX + 1).is_err());
    let mut too_much = sb.encode();
    put_u32(&mut too_much, 72, 95);
    let crc = carmine_crc::crc32c(&too_much[..SUPERBLOCK_CRC_OFFSET]);
    put_u32(&mut too_much, SUPERBLOCK_CRC_OFFSET, crc);
    assert!(matches!(
        Superblock::decode(&too_much),
        Err(FormatError::Geometry(_))
    ));
    // A version 3 superblock (no spare, crc at 72): refused by its version, with the
    // version in the message, not as a checksum mismatch.
    let mut v3 = sb.encode();
    put_u32(&mut v3, 8, 3);
    v3[72..80].fill(0);
    let crc = carmine_crc::crc32c(&v3[..72]);
    put_u32(&mut v3, 72, crc);
    let error = Superblock::decode(&v3).unwrap_err();
    assert_eq!(
        error,
        FormatError::BadVersion {
            what: "superblock",
            version: 3
        }
    );
    assert!(error.to_string().contains("format version 3"));
    // A version 4 image (same superblock layout, checkpoints without object ids): refused
    // by its version too; this build does not read version 4 logs.
    let mut v4 = sb.encode();
    put_u32(&mut v4, 8, 4);
    let crc = carmine_crc::crc32c(&v4[..SUPERBLOCK_CRC_OFFSET]);
    put_u32(&mut v4, SUPERBLOCK_CRC_OFFSET, crc);
    let error = Superblock::decode(&v4).unwrap_err();
    assert_eq!(
        error,
        FormatError::BadVersion {
            what: "superblock",
            version: 4
        }
    );
    assert!(error
        .to_string()
        .contains("format version 4, this build reads version 7"));
    // A version 5 image: its checkpoints are dumps, which version 6 still writes, but it
    // is refused the same way (one version read per build; no upgrade path yet).
    let mut v5 = sb.encode();
    put_u32(&mut v5, 8, 5);
    let crc = carmine_crc::crc32c(&v5[..SUPERBLOCK_CRC_OFFSET]);
    put_u32(&mut v5, SUPERBLOCK_CRC_OFFSET, crc);
    assert!(Superblock::decode(&v5)
        .unwrap_err()
        .to_string()
        .contains("format version 5, this build reads version 7"));
}

#[test]
fn a_tree_root_is_refused_misaligned_or_inconsistent() {
    let mut encoded = Vec::new();
    let root = Delta::TreeRoot {
        root: 1 << 20,
        height: 2,
        entries: 10_000,
        generation: 77,
    };
    root.encode(&mut encoded);
    assert_eq!(encoded.len(), TREE_ROOT_DELTA_BYTES);
    assert_eq!(DeltaReader::new(&encoded).next().unwrap().unwrap(), root);
    for (root, entries) in [((1 << 20) + 512, 5), (0, 5), (1 << 20, 0)] {
        encoded.clear();
        Delta::TreeRoot {
            root,
            height: 0,
            entries,
            generation: 1,
        }
        .encode(&mut encoded);
        assert!(
            DeltaReader::new(&encoded).next().unwrap().is_err(),
            "root {root} with {entries} entries"
        );
    }
    // An empty tree is root 0 with no entries.
    encoded.clear();
    let empty = Delta::TreeRoot {
        root: 0,
        height: 0,
        entries: 0,
        generation: 1,
    };
    empty.encode(&mut encoded);
    assert_eq!(DeltaReader::new(&encoded).next().unwrap().unwrap(), empty);
}

#[test]
fn superblock_rejects_impossible_geometry() {
    assert!(
        Superblock::for_device(8 << 20, 1 << 20, 2, UUID).is_err(),
        "too few segments per shard"
    );
    assert!(
        Superblock::for_device(1 << 30, 3000, 1, UUID).is_err(),
        "segment not block aligned"
    );
    assert!(Superblock::for_device(1 << 30, 1 << 20, 0, UUID).is_err());
    assert!(Superblock::for_device(1 << 30, 1 << 20, 65, UUID).is_err());
}

#[test]
fn newest_valid_superblock_copy_wins() {
    let old = superblock();
    let new = Superblock {
        generation: 2,
        ..old
    };
    let decode = |sb: &Superblock| Superblock::decode(&sb.encode());
    assert_eq!(Superblock::pick(decode(&old), decode(&new)), Ok(new));
    let mut torn = new.encode();
    torn[40] ^= 1;
    assert_eq!(
        Superblock::pick(decode(&old), Superblock::decode(&torn)),
        Ok(old),
        "a torn copy falls back"
    );
    assert!(Superblock::pick(Superblock::decode(&torn), Superblock::decode(&[0u8; 4096])).is_err());
    let other = Superblock {
        device_size: 4 << 30,
        ..Superblock::for_device(4 << 30, 64 << 20, 2, UUID).unwrap()
    };
    assert!(
        Superblock::pick(decode(&old), decode(&other)).is_err(),
        "same generation, different content"
    );
}

#[test]
fn segment_header_checks_owner() {
    let header = SegmentHeader {
        nonce: 7,
        shard: 1,
        segment: 9,
        segment_seq: 42,
        first_record_seq: 1000,
        replay_start_seq: 990,
        replay_start_offset: 1 << 30,
        cold: false,
    };
    let block = header.encode();
    assert_eq!(SegmentHeader::decode(&block, 7, 9), Ok(header));
    assert_eq!(
        SegmentHeader::decode(&block, 8, 9),
        Err(FormatError::Foreign {
            what: "segment header"
        })
    );
    assert!(
        SegmentHeader::decode(&block, 7, 10).is_err(),
        "a header copied to another segment is foreign"
    );
    assert!(
        SegmentHeader::decode(&[0u8; 4096], 7, 9).is_err(),
        "a never-opened segment has no header"
    );
}

fn sample_record() -> (RecordHeader, Vec<u8>, Vec<u8>) {
    let data: Vec<u8> = (0..2 * BLOCK_SIZE_BYTES as usize)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let crcs: Vec<u8> = data
        .chunks(4096)
        .flat_map(|b| carmine_crc::crc32c(b).to_le_bytes())
        .collect();
    let mut metadata = Vec::new();
    let deltas = [
        Delta::ObjectCreate { oid: b"obj.1" },
        Delta::ExtentMap {
            oid: b"obj.1",
            offset: 0,
            physical: 1 << 21,
            blocks: 2,
            crcs: &crcs,
        },
        Delta::ObjectSize {
            oid: b"obj.1",
            size: 8000,
        },
        Delta::XattrSet {
            oid: b"obj.1",
            name: b"k",
            value: b"v",
        },
    ];
    for delta in &deltas {
        delta.encode(&mut metadata);
    }
    let header = RecordHeader {
        nonce: 5,
        shard: 0,
        record_seq: 77,
        segment_seq: 3,
        delta_count: deltas.len() as u32,
        metadata_len: metadata.len() as u32,
        data_blocks: 2,
        data_crc: record_data_crc(&data),
        flags: 0,
        cold_offset: 0,
        cold_segment_seq: 0,
        cold_blocks: 0,
        cold_crc: 0,
    };
    (header, metadata, data)
}

#[test]
fn record_round_trip() {
    let (header, metadata, data) = sample_record();
    let mut head = vec![0u8; header.head_blocks() as usize * 4096];
    header.encode_head(&metadata, &mut head);
    let decoded = RecordHeader::decode(&head, 5).unwrap();
    assert_eq!(decoded, header);
    assert_eq!(decoded.total_blocks(), 3);
    let verified = decoded.verify_head(&head).unwrap();
    let deltas: Vec<_> = DeltaReader::new(verified)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(deltas.len(), header.delta_count as usize);
    assert_eq!(
        deltas[2],
        Delta::ObjectSize {
            oid: b"obj.1",
            size: 8000
        }
    );
    match deltas[1] {
        Delta::ExtentMap { crcs, blocks, .. } => {
            assert_eq!(blocks, 2);
            assert_eq!(u32_at(crcs, 4), carmine_crc::crc32c(&data[4096..]));
        }
        other => panic!("unexpected {other:?}"),
    }
    decoded.verify_data(&data).unwrap();
    assert_eq!(
        RecordHeader::decode(&head, 6),
        Err(FormatError::Foreign {
            what: "record header"
        })
    );
}

#[test]
fn torn_data_is_detected_at_every_sector() {
    let (header, _, data) = sample_record();
    for sector in 0..data.len() / 512 {
        let mut torn = data.clone();
        torn[sector * 512..(sector + 1) * 512].fill(0);
        assert!(
            header.verify_data(&torn).is_err(),
            "sector {sector} torn but accepted"
        );
    }
}

#[test]
fn extent_map_fast_encoding_matches_the_delta() {
    let crcs = [1u32, 0xDEAD_BEEF, 7];
    let crc_bytes: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
    let mut slow = Vec::new();
    Delta::ExtentMap {
        oid: b"o",
        offset: 8192,
        physical: 1 << 30,
        blocks: 3,
        crcs: &crc_bytes,
    }
    .encode(&mut slow);
    let mut fast = vec![9u8];
    let at = encode_extent_map(&mut fast, b"o", 8192, 1 << 30, &crcs);
    assert_eq!(&fast[1..], &slow[..]);
    assert_eq!(
        u64_at(&fast, at),
        1 << 30,
        "the returned offset is the physical field"
    );
}

proptest! {
    #[test]
    fn any_bit_flip_in_a_record_head_is_detected(bit in 0usize..(160 * 8)) {
        // The sample head covers 150 bytes (header + deltas); the last bits probe the padding.
        let (header, metadata, _) = sample_record();
        let mut head = vec![0u8; header.head_blocks() as usize * 4096];
        header.encode_head(&metadata, &mut head);
        head[bit / 8] ^= 1 << (bit % 8);
        let covered = RECORD_HEADER_SIZE_BYTES + metadata.len();
        let outcome = RecordHeader::decode(&head, 5).and_then(|h| h.verify_head(&head).map(|_| ()));
        if bit / 8 < covered {
            prop_assert!(outcome.is_err(), "flip of bit {} accepted", bit);
        } else {
            prop_assert!(outcome.is_ok(), "padding is not covered and need not be");
        }
    }

    #[test]
    fn any_bit_flip_in_a_superblock_is_detected(bit in 0usize..(SUPERBLOCK_CRC_OFFSET + 4) * 8) {
        let mut block = superblock().encode();
        block[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(Superblock::decode(&block).is_err());
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Superblock::decode(&bytes);
        let _ = SegmentHeader::decode(&bytes, 1, 1);
        // Take the nonce from the bytes themselves, so random input can get past the nonce
        // check and exercise the crc and length checks behind it.
        let nonce = u64_at(&[bytes.clone(), vec![0; 16]].concat(), 8);
        if let Ok(header) = RecordHeader::decode(&bytes, nonce) {
            let _ = header.verify_head(&bytes);
            let _ = header.verify_data(&bytes);
        }
        for delta in DeltaReader::new(&bytes) {
            let _ = delta;
        }
    }

    #[test]
    fn deltas_round_trip(
        oid in proptest::collection::vec(any::<u8>(), 1..40),
        a in proptest::collection::vec(any::<u8>(), 0..40),
        b in proptest::collection::vec(any::<u8>(), 0..40),
        offset in any::<u64>(), physical in any::<u64>(), blocks in 1u32..8, size in any::<u64>(),
    ) {
        let crcs = vec![0xAB; blocks as usize * 4];
        let deltas = [
            Delta::ObjectCreate { oid: &oid },
            Delta::ObjectRemove { oid: &oid },
            Delta::ObjectSize { oid: &oid, size },
            Delta::ExtentMap { oid: &oid, offset, physical, blocks, crcs: &crcs },
            Delta::ExtentUnmap { oid: &oid, offset, blocks },
            Delta::XattrSet { oid: &oid, name: &a, value: &b },
            Delta::XattrRemove { oid: &oid, name: &a },
            Delta::OmapSet { oid: &oid, key: &a, value: &b },
            Delta::OmapRemove { oid: &oid, key: &b },
            Delta::ObjectState { oid: &oid, id: offset ^ 3, size, changes: size ^ 5 },
            Delta::ExtentMove { oid: &oid, offset, from: physical ^ 4096, physical, blocks },
            Delta::ObjectIdNext { next: physical },
            Delta::TreeRoot {
                root: (physical & !4095) | 4096,
                height: blocks as u8,
                entries: size | 1,
                generation: offset,
            },
        ];
        let mut encoded = Vec::new();
        for delta in &deltas {
            delta.encode(&mut encoded);
        }
        let decoded: Vec<_> = DeltaReader::new(&encoded).collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(&decoded[..], &deltas[..]);

        // The journal patches a move's destination in place: the offset must be right.
        let mut moved = Vec::new();
        let at = encode_extent_move(&mut moved, &oid, offset, physical ^ 4096, blocks);
        moved[at..at + 8].copy_from_slice(&physical.to_le_bytes());
        let decoded = DeltaReader::new(&moved).next().unwrap().unwrap();
        prop_assert_eq!(decoded, deltas[10]);
    }
}

/// Format 7: a record names its cold run, covered by the head's crc and checked by its own
/// crc; a segment header says whether the segment is cold, and an unknown kind is refused.
#[test]
fn cold_runs_and_cold_segments_round_trip() {
    let (mut header, metadata, _) = sample_record();
    let cold = vec![0x5au8; 3 * 4096];
    header.cold_offset = 9 << 20;
    header.cold_segment_seq = 41;
    header.cold_blocks = 3;
    header.cold_crc = record_data_crc(&cold);
    let mut head = vec![0u8; header.head_blocks() as usize * 4096];
    header.encode_head(&metadata, &mut head);
    let decoded = RecordHeader::decode(&head, 5).unwrap();
    assert_eq!(decoded, header);
    decoded.verify_head(&head).unwrap();
    decoded.verify_cold(&cold).unwrap();
    let mut torn = cold.clone();
    torn[2 * 4096 + 7] ^= 1;
    assert!(
        decoded.verify_cold(&torn).is_err(),
        "a torn cold block fails"
    );
    assert!(decoded.verify_cold(&cold[..4096]).is_err(), "short");
    // A changed cold field fails the head's crc.
    let mut changed = head.clone();
    changed[68] ^= 1;
    assert!(RecordHeader::decode(&changed, 5)
        .unwrap()
        .verify_head(&changed)
        .is_err());
    // Blocks without an offset (or the reverse) never decode.
    let mut inconsistent = head.clone();
    put_u64(&mut inconsistent, 60, 0);
    assert!(RecordHeader::decode(&inconsistent, 5).is_err());

    let segment = SegmentHeader {
        nonce: 7,
        shard: 0,
        segment: 9,
        segment_seq: 41,
        first_record_seq: 0,
        replay_start_seq: 0,
        replay_start_offset: 0,
        cold: true,
    };
    let mut block = segment.encode();
    assert_eq!(SegmentHeader::decode(&block, 7, 9), Ok(segment));
    put_u32(&mut block, 20, 2);
    let crc = carmine_crc::crc32c(&block[..SEGMENT_HEADER_CRC_OFFSET]);
    put_u32(&mut block, SEGMENT_HEADER_CRC_OFFSET, crc);
    assert!(SegmentHeader::decode(&block, 7, 9).is_err(), "unknown kind");
}
