use super::*;
use std::collections::HashMap;
use std::net::TcpListener;
use wire::{Header, HEADER_SIZE, SUB_OP_RESULT_SIZE};

fn written(bs: usize, hash: u64, offset: u64, counter: u64) -> Vec<u8> {
    let mut block = vec![0u8; bs];
    fill_block(&mut block, hash, offset, counter);
    block
}

fn reason(check: BlockCheck) -> &'static str {
    match check {
        BlockCheck::Mismatch(m) => m.reason,
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[test]
fn block_content_round_trips() {
    let hash = name_hash(b"obj.3");
    for bs in [32, 33, 100, 4096, 4099] {
        let block = written(bs, hash, 8192, 5);
        assert_eq!(
            check_block(&block, bs, hash, 8192, 5),
            BlockCheck::Intact { counter: 5 }
        );
        // Not written in this run: any self-consistent counter is accepted.
        assert_eq!(
            check_block(&block, bs, hash, 8192, 0),
            BlockCheck::Intact { counter: 5 }
        );
    }
    // Blocks longer than the stream pool wrap around it without repeating themselves.
    let big = 600 << 10;
    let mut block = written(big, hash, 0, 9);
    assert_eq!(
        check_block(&block, big, hash, 0, 9),
        BlockCheck::Intact { counter: 9 }
    );
    let period = POOL_WORDS * 8;
    assert_ne!(block[64..64 + 4096], block[64 + period..64 + period + 4096]);
    block[big - 3] ^= 4;
    assert_eq!(
        reason(check_block(&block, big, hash, 0, 9)),
        "data differs from the write's content"
    );
    // Content depends on every input.
    let base = written(4096, hash, 0, 1);
    assert_ne!(base, written(4096, hash, 0, 2));
    assert_ne!(base, written(4096, hash, 4096, 1));
    assert_ne!(base, written(4096, name_hash(b"obj.4"), 0, 1));
}

#[test]
fn verify_detects_flipped_byte_wrong_counter_and_wrong_offset() {
    let (bs, hash) = (4096, name_hash(b"obj.0"));
    let mut block = written(bs, hash, 4096, 3);
    block[1000] ^= 0x10;
    let check = check_block(&block, bs, hash, 4096, 3);
    let flipped = Mismatch {
        reason: "data differs from the write's content",
        got_counter: 3,
        byte: 1000,
    };
    assert_eq!(check, BlockCheck::Mismatch(flipped));
    let mut tail_flip = written(4099, hash, 0, 1);
    tail_flip[4098] ^= 1;
    assert_eq!(
        reason(check_block(&tail_flip, 4099, hash, 0, 1)),
        "data differs from the write's content"
    );

    let stale = written(bs, hash, 4096, 2);
    assert_eq!(
        reason(check_block(&stale, bs, hash, 4096, 3)),
        "stale or wrong write counter"
    );
    let misplaced = written(bs, hash, 8192, 3);
    assert_eq!(
        reason(check_block(&misplaced, bs, hash, 4096, 3)),
        "block belongs to another offset"
    );
    let foreign = written(bs, name_hash(b"obj.1"), 4096, 3);
    assert_eq!(
        reason(check_block(&foreign, bs, hash, 4096, 3)),
        "block belongs to another object"
    );
    // A header edited to claim another counter does not match that counter's stream.
    let mut forged = written(bs, hash, 4096, 2);
    forged[24..32].copy_from_slice(&3u64.to_le_bytes());
    assert_eq!(
        reason(check_block(&forged, bs, hash, 4096, 0)),
        "data differs from the write's content"
    );
    let mut garbage = vec![7u8; bs];
    assert_eq!(
        reason(check_block(&garbage, bs, hash, 0, 0)),
        "no block header (bad magic)"
    );
    garbage.truncate(100);
    assert_eq!(reason(check_block(&garbage, bs, hash, 0, 0)), "short read");
}

#[test]
fn unwritten_blocks_are_recognised() {
    let hash = name_hash(b"obj.0");
    assert_eq!(check_block(&[], 4096, hash, 0, 0), BlockCheck::Unwritten);
    assert_eq!(
        check_block(&[0u8; 4096], 4096, hash, 0, 0),
        BlockCheck::Unwritten
    );
    assert_eq!(
        check_block(&[0u8; 512], 4096, hash, 0, 0),
        BlockCheck::Unwritten
    );
}

fn table(blocks_per_object: u64, objects: usize) -> BlockTable {
    let names = (0..objects).map(|i| object_name("t", i as u64)).collect();
    BlockTable::new(names, blocks_per_object, 4096, true)
}

#[test]
fn routed_selection_stays_on_the_core_of_the_connection() {
    let placement = Placement::new(PlacementMode::Pg { pg_count: 128 }, 3);
    let mut table = table(10, 40);
    let ranges = table.group_by_core(3, |name| placement.locate(name).core);
    assert_eq!(ranges.len(), 3);
    assert_eq!(ranges[0].start, 0);
    assert_eq!(ranges[2].end, table.len());
    for (core, range) in ranges.iter().enumerate() {
        assert!(!range.is_empty(), "40 objects cover 3 cores");
        for block in range.clone() {
            let (object, _) = table.locate(block);
            assert_eq!(placement.locate(&table.names[object]).core, core);
        }
    }
    // Names and their hashes moved together.
    for (object, name) in table.names.iter().enumerate() {
        assert_eq!(table.name_hashes[object], name_hash(name));
    }
    let mut rng = Rng(7);
    let range = ranges[1].clone();
    for block in range.clone().step_by(2) {
        table.set_busy(block, true);
    }
    let mut cursor = range.start;
    for _ in 0..1_000 {
        let random = table
            .pick_random_in(&mut rng, &range)
            .expect("half are free");
        assert!(range.contains(&random) && !table.is_busy(random));
        let next = table
            .pick_sequential_in(&mut cursor, &range)
            .expect("half are free");
        assert!(range.contains(&next) && !table.is_busy(next));
        assert!(range.contains(&cursor));
    }
    for block in range.clone() {
        table.set_busy(block, true);
    }
    assert_eq!(table.pick_random_in(&mut rng, &range), None);
    assert_eq!(table.pick_sequential_in(&mut cursor, &range), None);
    assert_eq!(
        table.pick_random_in(&mut rng, &(5..5)),
        None,
        "an empty range"
    );
}

#[test]
fn block_selection_never_returns_an_in_flight_block() {
    let mut table = table(50, 3); // 150 blocks: a partial last bitset word
    let mut rng = Rng(42);
    for block in 0..150 {
        if rng.below(10) < 9 {
            table.set_busy(block, true);
        }
    }
    let mut cursor = 0;
    for _ in 0..10_000 {
        let random = table.pick_random(&mut rng).expect("some blocks are free");
        assert!(!table.is_busy(random) && random < 150);
        let sequential = table
            .pick_sequential(&mut cursor)
            .expect("some blocks are free");
        assert!(!table.is_busy(sequential) && sequential < 150);
    }
    for block in 0..150 {
        table.set_busy(block, true);
    }
    assert_eq!(table.pick_random(&mut rng), None);
    assert_eq!(table.pick_sequential(&mut cursor), None);
    table.set_busy(149, false);
    assert_eq!(table.pick_random(&mut rng), Some(149));
    assert_eq!(table.pick_sequential(&mut cursor), Some(149));
    assert_eq!(
        cursor, 0,
        "the sequential cursor wraps after the last block"
    );
}

#[test]
fn sequential_selection_walks_blocks_in_order() {
    let table = table(4, 2);
    let mut cursor = 0;
    let walk: Vec<u32> = (0..10)
        .map(|_| table.pick_sequential(&mut cursor).unwrap())
        .collect();
    assert_eq!(walk, vec![0, 1, 2, 3, 4, 5, 6, 7, 0, 1]);
    assert_eq!(table.locate(5), (1, 4096));
}

#[test]
fn slots_reject_stale_and_unknown_request_ids() {
    let mut slots = Slots::new(2);
    let request = Request {
        block: 7,
        kind: Kind::Write,
        counter: 1,
    };
    let (_, first) = slots.arm(request);
    assert_eq!(slots.take(first).map(|s| s.request.block), Some(7));
    assert!(
        slots.take(first).is_none(),
        "a duplicate reply must not complete twice"
    );
    let (_, second) = slots.arm(request);
    assert_ne!(first, second);
    assert!(
        slots.take(first).is_none(),
        "a stale id must not complete the slot's new request"
    );
    assert!(slots.take(99).is_none());
    assert_eq!(slots.free.len(), 1);
}

// --- A fake server speaking the protocol: enough of an OSD to run the generator against.

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Flip one byte in this many read replies (with a correct crc over the corrupted bytes).
    CorruptReads(u64),
    /// Send every read reply with a wrong crc.
    BadCrc,
}

type Store = Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>;

fn fake_server(fault: Fault) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let store = Store::default();
    let corruptions = Arc::new(AtomicU64::new(match fault {
        Fault::CorruptReads(n) => n,
        _ => 0,
    }));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (store, corruptions) = (store.clone(), corruptions.clone());
            std::thread::spawn(move || serve(stream, &store, fault, &corruptions));
        }
    });
    addr
}

/// Reads whatever arrived, answers every whole frame, sends all the answers in one write.
fn serve(mut stream: TcpStream, store: &Store, fault: Fault, corruptions: &AtomicU64) {
    let (mut inbox, mut chunk, mut outbox) = (Vec::new(), vec![0u8; 1 << 16], Vec::new());
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        inbox.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Ok(Some(header)) = wire::parse_header(&inbox[at..], &Limits::CEILING) {
            if inbox.len() - at < header.frame_len() {
                break;
            }
            let frame = Frame::view(header, &inbox[at..]);
            assert!(frame.crc_ok(&inbox[at..]), "the generator sent a bad crc");
            answer(&frame, store, fault, corruptions, &mut outbox);
            at += header.frame_len();
        }
        inbox.drain(..at);
        if stream.write_all(&outbox).is_err() {
            return;
        }
        outbox.clear();
    }
}

fn answer(
    frame: &Frame<'_>,
    store: &Store,
    fault: Fault,
    corruptions: &AtomicU64,
    out: &mut Vec<u8>,
) {
    let request = &frame.header;
    if frame.opcode() == Some(Opcode::Status) {
        return raw_reply(out, request, Status::Ok, br#"{"fake":true}"#);
    }
    frame
        .validate_sub_ops()
        .expect("the generator sent a valid sub-op table");
    let op = frame.sub_ops().next().unwrap();
    let mut objects = store.lock().unwrap();
    match op.code {
        wire::SubOpCode::Write => {
            let object = objects.entry(frame.oid.to_vec()).or_default();
            let end = op.offset as usize + op.data.len();
            if object.len() < end {
                object.resize(end, 0);
            }
            object[op.offset as usize..end].copy_from_slice(op.data);
            osd_reply(out, request, Status::Ok, 0, b"");
        }
        wire::SubOpCode::Read => match objects.get(frame.oid) {
            None => osd_reply(out, request, Status::NotFound, Status::NotFound as u32, b""),
            Some(object) => {
                let start = (op.offset as usize).min(object.len());
                let end = (op.offset + op.length).min(object.len() as u64) as usize;
                let mut data = object[start..end].to_vec();
                let corrupt = |n: u64| n.checked_sub(1);
                if data.len() > 40
                    && corruptions
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, corrupt)
                        .is_ok()
                {
                    data[40] ^= 0x01;
                }
                osd_reply(out, request, Status::Ok, 0, &data);
                if fault == Fault::BadCrc {
                    let last = out.len() - 1;
                    out[last] ^= 0x80;
                }
            }
        },
        _ => osd_reply(
            out,
            request,
            Status::Unsupported,
            Status::Unsupported as u32,
            b"",
        ),
    }
}

fn osd_reply(out: &mut Vec<u8>, request: &Header, status: Status, result: u32, output: &[u8]) {
    let start = out.len();
    out.resize(start + HEADER_SIZE + SUB_OP_RESULT_SIZE, 0);
    wire::encode_reply(
        &mut out[start..],
        request,
        status,
        &[(result, output.len() as u32)],
        &[output],
    );
    out.extend_from_slice(output);
}

fn raw_reply(out: &mut Vec<u8>, request: &Header, status: Status, payload: &[u8]) {
    let header = Header {
        opcode: request.opcode | wire::REPLY_BIT,
        request_id: request.request_id,
        payload_len: payload.len() as u32,
        status: status as u32,
        ..Header::default()
    };
    let start = out.len();
    out.resize(start + HEADER_SIZE, 0);
    out.extend_from_slice(payload);
    wire::seal_frame(header, &mut out[start..]);
}

#[derive(clap::Parser)]
#[command(args_override_self = true)]
struct Cli {
    #[command(flatten)]
    load: LoadArgs,
}

/// 8 objects of 16 blocks, 2 connections of qd 8: small enough that blocks are often busy.
fn args(target: &str, extra: &[&str]) -> LoadArgs {
    use clap::Parser;
    let mut argv = vec![
        "load",
        "--target",
        target,
        "--objects",
        "8",
        "--object-size",
        "64KiB",
        "--bs",
        "4k",
    ];
    argv.extend(["--qd", "8", "--clients", "2", "--duration", "1s"]);
    argv.extend(extra);
    Cli::try_parse_from(argv).unwrap().load
}

fn assert_clean(report: &LoadReport) {
    assert!(report.ops > 0, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(report.verify_failures, 0, "{report:?}");
    assert_eq!(report.server, Some(serde_json::json!({"fake": true})));
}

#[test]
fn end_to_end_randwrite_then_randread_verify() {
    let target = fake_server(Fault::None);
    let write = run(&args(&target, &["--op", "randwrite", "--verify"])).unwrap();
    assert_clean(&write);
    assert_eq!(write.bytes, write.ops * 4096);
    assert!(write.latency_us.p50 > 0.0 && write.latency_us.max >= write.latency_us.p99);
    // A new run knows no counters: it accepts any self-consistent content written before.
    let read = run(&args(&target, &["--op", "randread", "--verify"])).unwrap();
    assert_clean(&read);
    assert_eq!(
        read.unwritten_reads, 0,
        "1 s of random writes covers all 128 blocks"
    );
    eprintln!(
        "fake server: randwrite {:.0} ops/s, randread {:.0} ops/s",
        write.iops, read.iops
    );
}

#[test]
fn end_to_end_prefill_mixed_two_threads() {
    let target = fake_server(Fault::None);
    let extra = [
        "--op",
        "mixed",
        "--verify",
        "--prefill",
        "--threads",
        "2",
        "--duration",
        "300ms",
        "--seed",
        "9",
    ];
    let report = run(&args(&target, &extra)).unwrap();
    assert_clean(&report);
    assert_eq!(report.prefill_ops, 128);
    assert_eq!((report.prefill_errors, report.unwritten_reads), (0, 0));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["op"], "mixed");
    assert!(json["latency_us"]["p999"].is_number());
}

#[test]
fn end_to_end_reads_of_never_written_blocks_are_not_failures() {
    let target = fake_server(Fault::None);
    let report = run(&args(
        &target,
        &["--op", "seqread", "--verify", "--duration", "200ms"],
    ))
    .unwrap();
    assert_clean(&report);
    assert_eq!(report.unwritten_reads, report.ops);
}

#[test]
fn end_to_end_detects_a_corrupted_read() {
    let target = fake_server(Fault::CorruptReads(1));
    let extra = [
        "--op",
        "randread",
        "--prefill",
        "--verify",
        "--duration",
        "300ms",
    ];
    let report = run(&args(&target, &extra)).unwrap();
    assert_eq!(report.verify_failures, 1, "{report:?}");
    assert_eq!(report.errors, 0);
}

#[test]
fn end_to_end_reply_crc_mismatch_fails_the_run() {
    let target = fake_server(Fault::BadCrc);
    let error = run(&args(
        &target,
        &["--op", "mixed", "--prefill", "--duration", "300ms"],
    ))
    .unwrap_err();
    assert!(error.contains("reply crc mismatch"), "{error}");
}

#[test]
fn blocking_client_calls_round_trip() {
    let target = fake_server(Fault::None);
    let mut stream = client::connect(&target).unwrap();
    let write = [SubOpSpec::write(4, b"hello")];
    let reply = client::call(&mut stream, Opcode::OsdOp, b"c.0", &write).unwrap();
    assert_eq!(
        (reply.status, reply.results.clone()),
        (0, vec![(0, Vec::new())])
    );
    let read = [SubOpSpec::read(0, 16)];
    let reply = client::call(&mut stream, Opcode::OsdOp, b"c.0", &read).unwrap();
    assert_eq!(reply.results, vec![(0, b"\0\0\0\0hello".to_vec())]);
    let reply = client::call(&mut stream, Opcode::OsdOp, b"c.missing", &read).unwrap();
    assert_eq!(reply.status_name(), "not_found");
    assert_eq!(
        client::fetch_status(&target),
        Ok(serde_json::json!({"fake": true}))
    );
}

#[test]
fn refused_connection_is_a_clear_error() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    drop(listener);
    let error = run(&args(&target, &[])).unwrap_err();
    assert_eq!(error, format!("connect {target}: connection refused"));
}

#[test]
fn arguments_are_validated() {
    let check = |extra: &[&str], needle: &str| {
        let error = validate(&args("127.0.0.1:1", extra))
            .err()
            .unwrap_or_default();
        assert!(error.contains(needle), "{extra:?}: {error:?}");
    };
    check(&["--bs", "16"], "--bs must be");
    check(&["--bs", "3000"], "multiple of --bs");
    check(&["--qd", "0"], "--qd must be");
    check(&["--threads", "3"], "must not exceed --clients");
    check(&["--read-pct", "101"], "--read-pct");
    check(&["--objects", "1000000", "--object-size", "1GiB"], "blocks");
    check(&["--objects", "100000000"], "--objects must be at most");
    check(&["--duration", "1000000h"], "--duration must be at most");
    check(&["--cpus", "100000"], "not available");
    assert!(validate(&args("127.0.0.1:1", &["--bs", "64KiB"])).is_ok());
}
