use super::*;
use proptest::prelude::*;

fn parse_one(bytes: &[u8]) -> Frame<'_> {
    let header = parse_header(bytes, &Limits::CEILING).unwrap().unwrap();
    let frame = Frame::view(header, bytes);
    assert!(frame.crc_ok(bytes));
    frame
}

#[test]
fn write_request_filled_in_place_is_the_copied_one() {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut copied = b"left".to_vec();
    let ops = [SubOpSpec::write(8192, &data)];
    encode_request(&mut copied, Opcode::OsdOp, 0x55, b"obj.3", &ops, b"");
    let mut filled = b"left".to_vec();
    let mut fills = 0;
    encode_write_request(&mut filled, 4, 0x55, b"obj.3", 8192, data.len(), |block| {
        assert_eq!(block.len(), data.len());
        block.copy_from_slice(&data);
        fills += 1;
    });
    assert_eq!(fills, 1);
    assert_eq!(filled, copied, "appended: same bytes, crc included");
    let frame = parse_one(&filled[4..]);
    assert_eq!(frame.header.request_id, 0x55);
    assert_eq!(frame.oid, b"obj.3");
    // Reused from the start: every old byte overwritten (a longer old frame cut), and a
    // different fill is a different frame, sealed with its own crc.
    let mut reused = vec![0xee; 5000];
    encode_write_request(&mut reused, 0, 0x56, b"o", 0, 16, |b| b.fill(9));
    let mut fresh = Vec::new();
    let ops = [SubOpSpec::write(0, &[9; 16])];
    encode_request(&mut fresh, Opcode::OsdOp, 0x56, b"o", &ops, b"");
    assert_eq!(reused, fresh);
    assert_eq!(
        parse_one(&reused).header.payload_len as usize,
        SUB_OP_DESC_SIZE + 16
    );
}

#[test]
fn hello_reply_round_trips_and_refuses_nonsense() {
    for reply in [
        HelloReply {
            core: 1,
            cores: 2,
            pg_count: Some(128),
        },
        HelloReply {
            core: 0,
            cores: 1,
            pg_count: None,
        },
    ] {
        assert_eq!(HelloReply::decode(&reply.encode()), Ok(reply));
    }
    let good = HelloReply {
        core: 1,
        cores: 2,
        pg_count: Some(128),
    }
    .encode();
    assert!(HelloReply::decode(&good[..15]).is_err(), "short payload");
    let mut bad = good;
    bad[8] = 7; // placement mode 7
    assert!(HelloReply::decode(&bad).is_err());
    let core_out_of_range = HelloReply {
        core: 2,
        cores: 2,
        pg_count: Some(128),
    }
    .encode();
    assert!(HelloReply::decode(&core_out_of_range).is_err());
    let fewer_pgs_than_cores = HelloReply {
        core: 0,
        cores: 4,
        pg_count: Some(2),
    }
    .encode();
    assert!(HelloReply::decode(&fewer_pgs_than_cores).is_err());
    let no_cores = HelloReply {
        core: 0,
        cores: 0,
        pg_count: None,
    }
    .encode();
    assert!(HelloReply::decode(&no_cores).is_err());
}

#[test]
fn request_round_trip() {
    let mut buf = Vec::new();
    let ops = [
        SubOpSpec::write(4096, b"hello"),
        SubOpSpec {
            code: SubOpCode::SetXattr,
            name: b"k",
            data: b"v",
            offset: 0,
            length: 0,
        },
        SubOpSpec::read(0, 10),
    ];
    encode_request(&mut buf, Opcode::OsdOp, 77, b"obj", &ops, b"");
    let frame = parse_one(&buf);
    assert_eq!(frame.header.request_id, 77);
    assert_eq!(frame.oid, b"obj");
    frame.validate_sub_ops().unwrap();
    let parsed: Vec<_> = frame.sub_ops().collect();
    assert_eq!(parsed.len(), 3);
    assert_eq!(parsed[0].data, b"hello");
    assert_eq!(parsed[0].offset, 4096);
    assert_eq!((parsed[1].name, parsed[1].data), (&b"k"[..], &b"v"[..]));
    assert_eq!((parsed[2].code, parsed[2].length), (SubOpCode::Read, 10));
}

#[test]
fn reply_round_trip_from_pieces() {
    let request = Header {
        opcode: Opcode::OsdOp as u8,
        request_id: 9,
        ..Header::default()
    };
    let mut scratch = [0u8; 128];
    let outputs: [&[u8]; 2] = [b"abc", b"de"];
    let n = encode_reply(
        &mut scratch,
        &request,
        Status::Ok,
        &[(0, 3), (1, 2)],
        &outputs,
    );
    let mut frame_bytes = scratch[..n].to_vec();
    frame_bytes.extend_from_slice(b"abcde");
    let frame = parse_one(&frame_bytes);
    assert!(frame.header.is_reply());
    assert_eq!(frame.header.request_id, 9);
    let results: Vec<_> = frame.reply_results().unwrap().collect();
    assert_eq!(results, vec![(0, &b"abc"[..]), (1, &b"de"[..])]);
}

/// The head's crc is one call over the header and the table (hashed apart from `out`),
/// and the receiver's check (which hashes the frame as received) holds for every table size.
#[test]
fn reply_heads_of_every_table_size_carry_the_right_crc() {
    let request = Header {
        opcode: Opcode::OsdOp as u8,
        request_id: 5,
        ..Header::default()
    };
    for count in 0..=usize::from(SUB_OPS_CEILING) {
        let results: Vec<(u32, u32)> = (0..count as u32).map(|i| (i, 1)).collect();
        let outputs: Vec<u8> = (0..count as u8).collect();
        let mut head = vec![0u8; HEADER_SIZE + count * SUB_OP_RESULT_SIZE];
        let n = encode_reply(&mut head, &request, Status::Ok, &results, &[&outputs]);
        let mut frame_bytes = head[..n].to_vec();
        frame_bytes.extend_from_slice(&outputs);
        assert!(
            parse_one(&frame_bytes).crc_ok(&frame_bytes),
            "{count} results"
        );
    }
}

/// Replies without a body (write acknowledgements, errors) skip their empty piece in the
/// crc; the receiver's check still holds, and a changed result still fails it.
#[test]
fn replies_without_a_body_carry_the_right_crc() {
    let request = Header {
        opcode: Opcode::OsdOp as u8,
        request_id: 6,
        ..Header::default()
    };
    for results in [&[][..], &[(0, 0)][..], &[(0, 0), (2, 0)][..]] {
        let mut head = [0u8; 64];
        let n = encode_reply(&mut head, &request, Status::Ok, results, &[&[]]);
        assert!(parse_one(&head[..n]).crc_ok(&head[..n]));
        let mut changed = head[..n].to_vec();
        if let Some(last) = changed.last_mut() {
            *last ^= 1;
            let header = parse_header(&changed, &Limits::CEILING).unwrap().unwrap();
            assert!(!Frame::view(header, &changed).crc_ok(&changed));
        }
    }
}

#[test]
fn reply_with_a_known_output_crc_is_the_same_frame() {
    let request = Header {
        opcode: Opcode::OsdOp as u8,
        request_id: 77,
        ..Header::default()
    };
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut hashed = [0u8; 64];
    let n = encode_reply(&mut hashed, &request, Status::Ok, &[(0, 4096)], &[&block]);
    let mut known = [0u8; 64];
    let crc = carmine_crc::crc32c(&block);
    let m = encode_reply_with_output_crc(&mut known, &request, Status::Ok, &[(0, 4096)], 4096, crc);
    assert_eq!((n, &hashed[..n]), (m, &known[..m]));
    let mut frame_bytes = known[..m].to_vec();
    frame_bytes.extend_from_slice(&block);
    assert!(parse_one(&frame_bytes).crc_ok(&frame_bytes));
    // A stored crc that does not match the bytes sent fails the receiver's check.
    let m = encode_reply_with_output_crc(
        &mut known,
        &request,
        Status::Ok,
        &[(0, 4096)],
        4096,
        crc ^ 1,
    );
    let mut frame_bytes = known[..m].to_vec();
    frame_bytes.extend_from_slice(&block);
    let header = parse_header(&frame_bytes, &Limits::CEILING)
        .unwrap()
        .unwrap();
    assert!(!Frame::view(header, &frame_bytes).crc_ok(&frame_bytes));
}

#[test]
fn limits_are_checked_from_the_header_alone() {
    let mut buf = Vec::new();
    encode_request(
        &mut buf,
        Opcode::OsdOp,
        1,
        &[b'x'; 300],
        &[SubOpSpec::simple(SubOpCode::Stat)],
        b"",
    );
    let err = parse_header(&buf[..HEADER_SIZE], &Limits::DEFAULT).unwrap_err();
    assert_eq!(err, HeaderError::OidTooLong { len: 300, max: 256 });
    assert_eq!(err.status(), Status::OverLimit);
}

#[test]
fn corrupt_byte_fails_crc() {
    let mut buf = Vec::new();
    encode_request(
        &mut buf,
        Opcode::OsdOp,
        1,
        b"o",
        &[SubOpSpec::write(0, b"payload")],
        b"",
    );
    let last = buf.len() - 1;
    buf[last] ^= 1;
    let header = parse_header(&buf, &Limits::DEFAULT).unwrap().unwrap();
    assert!(!Frame::view(header, &buf).crc_ok(&buf));
}

#[test]
fn malformed_tables_are_rejected() {
    let mut buf = Vec::new();
    // A read that carries data is malformed.
    let bad = SubOpSpec {
        code: SubOpCode::Read,
        name: b"",
        data: b"zz",
        offset: 0,
        length: 1,
    };
    encode_request(&mut buf, Opcode::OsdOp, 1, b"o", &[bad], b"");
    assert_eq!(parse_one(&buf).validate_sub_ops(), Err(Status::Malformed));
    buf.clear();
    encode_request(&mut buf, Opcode::OsdOp, 1, b"o", &[], b"");
    assert_eq!(parse_one(&buf).validate_sub_ops(), Err(Status::Malformed));
    buf.clear();
    encode_request(
        &mut buf,
        Opcode::OsdOp,
        1,
        b"o",
        &[SubOpSpec::simple(SubOpCode::Stat)],
        b"",
    );
    buf[HEADER_SIZE + 1] = 99; // unknown sub-op code
    let mut header = parse_header(&buf, &Limits::DEFAULT).unwrap().unwrap();
    header.crc = 0;
    assert_eq!(
        Frame::view(header, &buf).validate_sub_ops(),
        Err(Status::Unsupported)
    );
}

#[test]
fn status_numbers_are_stable() {
    for value in 0..64 {
        if let Some(status) = Status::from_u32(value) {
            assert_eq!(status as u32, value);
        }
    }
    assert_eq!(Status::NotFound as u32, 1);
    assert_eq!(Status::Corrupt as u32, 8);
}

fn sub_op_strategy() -> impl Strategy<Value = (u8, Vec<u8>, Vec<u8>, u64, u64)> {
    (
        1u8..=12,
        proptest::collection::vec(any::<u8>(), 1..8),
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<u64>(),
        any::<u64>(),
    )
}

proptest! {
    #[test]
    fn encode_parse_round_trip(
        request_id in any::<u64>(),
        oid in proptest::collection::vec(any::<u8>(), 1..64),
        raw_ops in proptest::collection::vec(sub_op_strategy(), 1..8),
    ) {
        let ops: Vec<SubOpSpec<'_>> = raw_ops.iter().map(|(code, name, data, offset, length)| {
            let code = SubOpCode::from_u8(*code).unwrap();
            let (has_name, has_data) = code.carries();
            SubOpSpec {
                code,
                name: if has_name { name } else { b"" },
                data: if has_data { data } else { b"" },
                offset: *offset,
                length: *length,
            }
        }).collect();
        let mut buf = Vec::new();
        encode_request(&mut buf, Opcode::OsdOp, request_id, &oid, &ops, b"");
        let frame = parse_one(&buf);
        prop_assert_eq!(frame.header.request_id, request_id);
        prop_assert_eq!(frame.oid, &oid[..]);
        let summary = SubOpsSummary {
            mutates: ops.iter().any(|op| op.code.is_mutation()),
            data_bytes: ops.iter().map(|op| op.data.len() as u64).sum(),
            single_read: match ops[..] {
                [SubOpSpec { code: SubOpCode::Read, offset, length, .. }] => {
                    Some(ReadRange { offset, length })
                }
                _ => None,
            },
        };
        prop_assert_eq!(frame.validate_sub_ops(), Ok(summary));
        prop_assert_eq!(frame.sub_ops_summary(), summary);
        let parsed: Vec<_> = frame.sub_ops().collect();
        prop_assert_eq!(parsed.len(), ops.len());
        for (view, spec) in parsed.iter().zip(&ops) {
            prop_assert_eq!(view.code, spec.code);
            prop_assert_eq!(view.name, spec.name);
            prop_assert_eq!(view.data, spec.data);
            prop_assert_eq!((view.offset, view.length), (spec.offset, spec.length));
        }
    }

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), fix_magic in any::<bool>()) {
        let mut bytes = bytes;
        if fix_magic && bytes.len() >= 5 {
            bytes[..4].copy_from_slice(&MAGIC.to_le_bytes());
            bytes[4] = VERSION;
        }
        if let Ok(Some(header)) = parse_header(&bytes, &Limits::CEILING) {
            if bytes.len() >= header.frame_len() {
                let frame = Frame::view(header, &bytes);
                let _ = frame.crc_ok(&bytes);
                let _ = frame.opcode();
                if frame.validate_sub_ops().is_ok() {
                    prop_assert_eq!(frame.sub_ops().count(), usize::from(header.sub_op_count));
                }
                if let Ok(results) = frame.reply_results() {
                    prop_assert_eq!(results.count(), usize::from(header.sub_op_count));
                }
            }
        }
    }
}

/// Only an op of exactly one Read says its range in the summary (reads in place rely on it);
/// a Read among other sub-ops, or one other sub-op, does not.
#[test]
fn summary_names_the_range_of_a_lone_read_only() {
    let summary_of = |ops: &[SubOpSpec<'_>]| {
        let mut buf = Vec::new();
        encode_request(&mut buf, Opcode::OsdOp, 1, b"obj.1", ops, b"");
        let frame = parse_one(&buf);
        let summary = frame.validate_sub_ops().unwrap();
        assert_eq!(frame.sub_ops_summary(), summary);
        summary.single_read
    };
    assert_eq!(
        summary_of(&[SubOpSpec::read(8192, 4096)]),
        Some(ReadRange {
            offset: 8192,
            length: 4096
        })
    );
    let stat = SubOpSpec::simple(SubOpCode::Stat);
    assert_eq!(summary_of(&[SubOpSpec::read(0, 4096), stat]), None);
    assert_eq!(summary_of(&[stat]), None);
    assert_eq!(summary_of(&[SubOpSpec::write(0, b"abcd")]), None);
}
