use super::*;
use crate::queue_pair::{MemFaults, MemQueuePair, TearGranularity};
use crate::segment::format::{DeltaReader, SEGMENTS_START_BYTES};
use crate::segment::metadata::Metadata;
use crate::segment::scan::scan_shard;

const SEGMENT: u64 = 1 << 20;

fn device(faults: MemFaults) -> (Superblock, MemQueuePair) {
    let size = SEGMENTS_START_BYTES + 6 * SEGMENT;
    let sb = Superblock::for_device(size, SEGMENT, 1, *b"journal-test-id!").unwrap();
    let mut image = vec![0u8; size as usize];
    image[..4096].copy_from_slice(&sb.encode());
    (sb, MemQueuePair::from_image(image, 256, faults))
}

fn block(seed: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::new(4096);
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = (i as u64 * 31 + seed) as u8;
    }
    buf
}

/// Appends op `n`: create object `o<n>`, write one block, set its size.
fn append_op(journal: &mut Journal, n: u64, data: &mut AlignedBuf) -> Result<(), JournalError> {
    let oid = format!("o{n}");
    let crc = carmine_crc::crc32c(data);
    let mut op = journal.append()?;
    op.delta(&Delta::ObjectCreate {
        oid: oid.as_bytes(),
    })?;
    // SAFETY: the caller keeps `data` alive and unchanged until the op is acknowledged.
    unsafe { op.extent(oid.as_bytes(), 0, data.as_io_vec(), &[crc])? };
    op.delta(&Delta::ObjectSize {
        oid: oid.as_bytes(),
        size: 4096,
    })?;
    op.commit(n);
    Ok(())
}

fn step(journal: &mut Journal, qp: &mut MemQueuePair, acked: &mut Vec<u64>) {
    journal.pump(qp, &mut |_| {}, &mut |tag, result| {
        result.unwrap();
        acked.push(tag);
    });
    qp.poll(64, &mut |tag, result| journal.complete_io(tag, result));
}

fn replay(sb: &Superblock, image: &[u8]) -> (Metadata, usize) {
    let mut metadata = Metadata::new(*sb);
    let mut reader: &[u8] = image;
    let log = scan_shard(sb, 0, &mut reader, &mut |_, deltas| {
        for delta in DeltaReader::new(deltas) {
            metadata.apply(&delta.unwrap()).unwrap();
        }
    })
    .unwrap();
    (metadata, log.records.len())
}

#[test]
fn ops_are_group_committed_and_replay_with_their_data() {
    let (sb, mut qp) = device(MemFaults {
        latency_polls: (1, 3),
        ..MemFaults::default()
    });
    let mut journal = Journal::new(
        sb,
        0,
        &scan_shard(&sb, 0, &mut &qp.durable()[..], &mut |_, _| {}).unwrap(),
        &vec![0; sb.segment_count as usize],
    );
    let mut buffers: Vec<AlignedBuf> = (0..40).map(block).collect();
    let mut acked = Vec::new();
    let mut writes_per_record = Vec::new();
    for (n, buf) in buffers.iter_mut().enumerate() {
        append_op(&mut journal, n as u64, buf).unwrap();
        step(&mut journal, &mut qp, &mut acked);
        for record in &journal.in_flight {
            // First sight of each record (a record spans several steps).
            if !writes_per_record
                .iter()
                .any(|&(seq, _)| seq == record.record_seq)
            {
                writes_per_record.push((record.record_seq, record.writes_outstanding));
            }
        }
    }
    for _ in 0..100 {
        step(&mut journal, &mut qp, &mut acked);
    }
    assert_eq!(acked.len(), 40, "every op acknowledged");
    assert!(
        writes_per_record.iter().filter(|&&(_, w)| w > 1).count() <= 1,
        "a small record is one device write (two when it opens a segment): {writes_per_record:?}"
    );
    assert!(
        journal.records_written < 40,
        "ops arriving during a record share the next one"
    );
    let (metadata, records) = replay(&sb, qp.durable());
    assert_eq!(records as u64, journal.records_written);
    for (n, buf) in buffers.iter().enumerate() {
        let onode = metadata
            .object(format!("o{n}").as_bytes())
            .expect("acknowledged op replays");
        let block = onode.blocks.get(0).unwrap();
        let on_disk = &qp.durable()[block.physical as usize..][..4096];
        assert_eq!(on_disk, &buf[..], "data at the patched address");
        assert_eq!(carmine_crc::crc32c(on_disk), block.crc);
    }
}

/// The state the header-first rule adds: a segment whose header is durable and which holds
/// no record yet. A cut there must mount as an empty tail, and the next writer (in a fresh
/// segment, with fresh sequence numbers) must continue the log.
#[test]
fn a_cut_between_a_segment_header_and_its_first_record_mounts_clean() {
    let (sb, mut qp) = device(MemFaults::default());
    let log = scan_shard(&sb, 0, &mut &qp.durable()[..], &mut |_, _| {}).unwrap();
    let mut journal = Journal::new(sb, 0, &log, &vec![0; sb.segment_count as usize]);
    let mut data = block(1);
    append_op(&mut journal, 1, &mut data).unwrap();
    let mut acked = Vec::new();
    // Until the header is durable and retired, but before the record is sealed.
    for _ in 0..100 {
        journal.retire(&mut |_| {}, &mut |tag, _| acked.push(tag));
        if journal.durable_segment_seq > 0 {
            break;
        }
        journal.advance(&mut qp, &mut |_, result| result.unwrap());
        qp.poll(64, &mut |tag, result| journal.complete_io(tag, result));
    }
    assert!(journal.durable_segment_seq > 0, "the header became durable");
    assert!(
        journal.in_flight.is_empty() && acked.is_empty(),
        "no record yet"
    );
    let image = qp.power_cut(TearGranularity::Block4K);

    let log = scan_shard(&sb, 0, &mut &image[..], &mut |_, _| {}).unwrap();
    assert_eq!(log.segments.len(), 1, "the header's segment is in the log");
    assert!(log.records.is_empty(), "and holds no record");
    let (metadata, records) = replay(&sb, &image);
    assert_eq!((metadata.object_count(), records), (0, 0));

    let mut qp = MemQueuePair::from_image(image, 256, MemFaults::default());
    let mut journal = Journal::new(sb, 0, &log, &vec![0; sb.segment_count as usize]);
    assert!(
        journal.next_segment_seq() > log.next_segment_seq,
        "numbers move on"
    );
    let mut data = block(2);
    append_op(&mut journal, 2, &mut data).unwrap();
    for _ in 0..100 {
        step(&mut journal, &mut qp, &mut acked);
    }
    assert_eq!(acked, vec![2]);
    let (metadata, records) = replay(&sb, qp.durable());
    assert_eq!(records, 1);
    assert!(metadata.object(b"o2").is_some());
    assert!(
        metadata.object(b"o1").is_none(),
        "the unacknowledged op never was"
    );
}

#[test]
fn power_cuts_never_lose_acknowledged_ops_or_show_half_records() {
    for seed in 0..200u64 {
        let faults = MemFaults {
            seed,
            latency_polls: (0, 4),
            reorder: true,
            ..MemFaults::default()
        };
        let (sb, mut qp) = device(faults);
        let mut journal = Journal::new(
            sb,
            0,
            &scan_shard(&sb, 0, &mut &qp.durable()[..], &mut |_, _| {}).unwrap(),
            &vec![0; sb.segment_count as usize],
        );
        let mut buffers: Vec<AlignedBuf> = (0..60).map(|n| block(n ^ seed)).collect();
        let mut acked = Vec::new();
        let cut_after = 5 + seed as usize % 120;
        for step_index in 0..cut_after {
            if let Some(buf) = buffers.get_mut(step_index / 2) {
                if step_index % 2 == 0 {
                    let _ = append_op(&mut journal, (step_index / 2) as u64, buf);
                }
            }
            step(&mut journal, &mut qp, &mut acked);
        }
        let granularity = if seed % 2 == 0 {
            TearGranularity::Sector512
        } else {
            TearGranularity::Block4K
        };
        let image = qp.power_cut(granularity);
        let (metadata, _) = replay(&sb, &image);
        for &n in &acked {
            let onode = metadata.object(format!("o{n}").as_bytes());
            let onode = onode.unwrap_or_else(|| panic!("seed {seed}: acknowledged op {n} lost"));
            let block = onode.blocks.get(0).unwrap();
            assert_eq!(
                carmine_crc::crc32c(&image[block.physical as usize..][..4096]),
                block.crc,
                "seed {seed}: op {n} data"
            );
        }
        for (oid, onode) in metadata.objects() {
            // Every op's three deltas land together (one record) or not at all.
            assert_eq!(
                (onode.size, onode.mapped_blocks as usize),
                (4096, 1),
                "seed {seed}: half-applied {:?}",
                String::from_utf8_lossy(oid)
            );
        }
    }
}

/// Two records in flight, the second durable (written and flushed) while the first's
/// write is still out, then a power cut that tears the first: the second's ops must not
/// have been acknowledged, nothing of them may replay, the mount must take the surviving
/// second record for a power cut's tail (not damage), and a writer continuing the log
/// must never bring it back.
#[test]
fn a_later_record_durable_before_a_torn_earlier_one_is_never_seen() {
    let mut cases = 0;
    let mut torn = 0;
    for seed in 0..800u64 {
        let (sb, mut qp) = device(MemFaults {
            seed,
            latency_polls: (0, 24),
            reorder: true,
            ..MemFaults::default()
        });
        let log = scan_shard(&sb, 0, &mut &qp.durable()[..], &mut |_, _| {}).unwrap();
        let mut journal = Journal::new(sb, 0, &log, &vec![0; sb.segment_count as usize]);
        let mut buffers: Vec<AlignedBuf> = (0..64).map(|n| block(n ^ seed)).collect();
        let mut acked = Vec::new();
        let mut next = 0usize;
        // (first record's seq, second record's seq and ops) when the state is reached.
        let mut reached = None;
        for _ in 0..2000 {
            // Two ops a step, so that ops arrive while a record is in flight, enough of
            // them for a record beside it (`OVERLAP_DATA_BLOCKS_PER_HEAD_BLOCK_MIN`).
            for _ in 0..2 {
                if next < buffers.len() && next < acked.len() + 32 {
                    append_op(&mut journal, next as u64, &mut buffers[next]).unwrap();
                    next += 1;
                }
            }
            journal.pump(&mut qp, &mut |_| {}, &mut |tag, result| {
                result.unwrap();
                acked.push(tag);
            });
            qp.poll(1, &mut |tag, result| journal.complete_io(tag, result));
            if let (Some(first), Some(second)) =
                (journal.in_flight.front(), journal.in_flight.get(1))
            {
                if second.durable && !first.durable && first.writes_outstanding > 0 {
                    assert_eq!(second.record_seq, first.record_seq + 1);
                    let ops = journal.buffers[second.buffers].tags.clone();
                    reached = Some((first.record_seq, second.record_seq, ops));
                    break;
                }
            }
            if next == buffers.len() && acked.len() == next {
                break;
            }
        }
        let Some((first_seq, second_seq, second_ops)) = reached else {
            continue;
        };
        cases += 1;
        assert!(!second_ops.is_empty());
        // The journal is asked to move on once more before the cut: the second record is
        // durable, yet must wait for the first.
        journal.pump(&mut qp, &mut |_| {}, &mut |tag, result| {
            result.unwrap();
            acked.push(tag);
        });
        for op in &second_ops {
            assert!(
                !acked.contains(op),
                "seed {seed}: op {op} acknowledged early"
            );
        }
        let image = qp.power_cut(TearGranularity::Block4K);
        let (metadata, _) = replay(&sb, &image);
        for &n in &acked {
            assert!(
                metadata.object(format!("o{n}").as_bytes()).is_some(),
                "seed {seed}: acknowledged op {n} lost"
            );
        }
        let log = scan_shard(&sb, 0, &mut &image[..], &mut |_, _| {}).unwrap();
        if log.next_record_seq != first_seq {
            continue; // The tear spared the first record: both replay, nothing to see.
        }
        torn += 1;
        for op in &second_ops {
            assert!(
                metadata.object(format!("o{op}").as_bytes()).is_none(),
                "seed {seed}: op {op} of the record after the torn one replayed"
            );
        }
        // The second record is on the device, whole, after the log's end: the mount
        // excuses it (written beside the torn one), it does not call the log damaged.
        let after =
            crate::segment::tail::records_after_end(&mut &image[..], &sb, 0, &log, &mut Vec::new())
                .unwrap();
        let survivors: Vec<u64> = after
            .iter()
            .flat_map(|a| a.unacknowledged.iter().map(|r| r.header.record_seq))
            .collect();
        assert!(
            after.iter().all(|a| a.client.is_empty()),
            "seed {seed}: a power cut's tail taken for damage"
        );
        assert!(survivors.is_empty() || survivors == vec![second_seq]);
        let mut remount = MemQueuePair::from_image(image.clone(), 256, MemFaults::default());
        crate::segment::mount::replay(&mut remount, 0)
            .unwrap_or_else(|e| panic!("seed {seed}: mount refused: {e}"));

        // A writer continuing the log reuses the torn record's numbers in a fresh
        // segment; the stale second record stays where it was and never joins the log.
        let mut journal = Journal::new(sb, 0, &log, &vec![0; sb.segment_count as usize]);
        let mut more: Vec<AlignedBuf> = (0..4).map(|n| block(n + 1000)).collect();
        let mut acked_after = Vec::new();
        for (i, buf) in more.iter_mut().enumerate() {
            append_op(&mut journal, 1000 + i as u64, buf).unwrap();
        }
        for _ in 0..400 {
            journal.pump(&mut remount, &mut |_| {}, &mut |tag, result| {
                result.unwrap();
                acked_after.push(tag);
            });
            remount.poll(64, &mut |tag, result| journal.complete_io(tag, result));
        }
        assert_eq!(acked_after.len(), 4, "seed {seed}");
        let (metadata, _) = replay(&sb, remount.durable());
        for op in &second_ops {
            assert!(
                metadata.object(format!("o{op}").as_bytes()).is_none(),
                "seed {seed}: stale op {op} came back"
            );
        }
        for i in 0..4u64 {
            assert!(metadata
                .object(format!("o{}", 1000 + i).as_bytes())
                .is_some());
        }
        crate::segment::mount::replay(&mut remount, 0)
            .unwrap_or_else(|e| panic!("seed {seed}: second mount refused: {e}"));
    }
    assert!(
        cases >= 60 && torn >= 40,
        "the overlap was reached {cases} times, with the first record torn {torn} times"
    );
}

/// A queue pair that checks the writer's ordering rule as requests arrive: a write into
/// a segment (past its header block) comes only after that segment's current header was
/// written and then covered by a completed flush. Headers found unflushed are where a
/// power cut could keep records under a header that the next mount never sees.
struct HeaderFirstChecker {
    inner: MemQueuePair,
    sb: Superblock,
    /// Header writes submitted, not completed: (tag, segment).
    header_writes: Vec<(u64, u32)>,
    /// Header writes completed, not yet covered by a flush submitted after them.
    headers_written: Vec<u32>,
    /// Flushes in flight: (tag, the headers they cover).
    flushes: Vec<(u64, Vec<u32>)>,
    durable_headers: Vec<u32>,
    record_writes: u64,
}

impl QueuePair for HeaderFirstChecker {
    fn submit_read(&mut self, offset: u64, buffers: &[IoVec], tag: u64) -> Result<(), SubmitError> {
        self.inner.submit_read(offset, buffers, tag)
    }

    fn submit_write(
        &mut self,
        offset: u64,
        buffers: &[IoVec],
        tag: u64,
    ) -> Result<(), SubmitError> {
        let segment = self
            .sb
            .segment_at(offset)
            .expect("journal writes land in segments");
        let is_header = offset == self.sb.segment_offset(segment);
        if is_header {
            // A new life of the segment: its old header no longer counts.
            self.durable_headers.retain(|&s| s != segment);
        } else {
            assert!(
                self.durable_headers.contains(&segment),
                "record written at {offset} in segment {segment} before its header is durable"
            );
        }
        self.inner.submit_write(offset, buffers, tag)?;
        if is_header {
            self.header_writes.push((tag, segment));
        } else {
            self.record_writes += 1;
        }
        Ok(())
    }

    fn submit_flush(&mut self, tag: u64) -> Result<(), SubmitError> {
        self.inner.submit_flush(tag)?;
        self.flushes
            .push((tag, std::mem::take(&mut self.headers_written)));
        Ok(())
    }

    fn poll(
        &mut self,
        completions_max: usize,
        complete: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        let mut done = Vec::new();
        let count = self.inner.poll(completions_max, &mut |tag, result| {
            done.push((tag, result));
        });
        for (tag, result) in done {
            if result.is_ok() {
                if let Some(i) = self.flushes.iter().position(|&(t, _)| t == tag) {
                    let (_, covered) = self.flushes.remove(i);
                    self.durable_headers.extend(covered);
                } else if let Some(i) = self.header_writes.iter().position(|&(t, _)| t == tag) {
                    let (_, segment) = self.header_writes.remove(i);
                    self.headers_written.push(segment);
                }
            }
            complete(tag, result);
        }
        count
    }

    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }

    fn depth(&self) -> u32 {
        self.inner.depth()
    }

    fn in_flight(&self) -> u32 {
        self.inner.in_flight()
    }
}

/// `carmine sim --seed 1250` found the bug this rules out: a record survived a power cut
/// while its segment's header did not, the next mount reissued the same sequence numbers
/// in that segment, and the stale record came back. The rule must hold across segment
/// rolls and with completions reordered.
#[test]
fn records_go_only_under_a_durable_segment_header() {
    for seed in 0..8u64 {
        let (sb, qp) = device(MemFaults {
            seed,
            latency_polls: (0, 4),
            reorder: true,
            ..MemFaults::default()
        });
        let mut qp = HeaderFirstChecker {
            inner: qp,
            sb,
            header_writes: Vec::new(),
            headers_written: Vec::new(),
            flushes: Vec::new(),
            durable_headers: Vec::new(),
            record_writes: 0,
        };
        let log = scan_shard(&sb, 0, &mut &qp.inner.durable()[..], &mut |_, _| {}).unwrap();
        let mut journal = Journal::new(sb, 0, &log, &vec![0; sb.segment_count as usize]);
        // Eight-block ops fill a 1 MiB segment in about 28 records: several rolls.
        let mut buffers: Vec<AlignedBuf> = (0..8).map(|n| block(n ^ seed)).collect();
        let mut acked = 0u64;
        let mut next = 0u64;
        while acked < 100 {
            if next - acked < 4 {
                let mut op = journal.append().unwrap();
                let oid = format!("o{next}");
                for (i, buf) in buffers.iter_mut().enumerate() {
                    let crc = carmine_crc::crc32c(buf);
                    // SAFETY: the buffers outlive the journal and are never changed.
                    unsafe {
                        op.extent(oid.as_bytes(), i as u64 * 4096, buf.as_io_vec(), &[crc])
                            .unwrap()
                    };
                }
                op.commit(next);
                next += 1;
            }
            journal.pump(&mut qp, &mut |_| {}, &mut |_, result| {
                result.unwrap();
                acked += 1;
            });
            qp.poll(64, &mut |tag, result| journal.complete_io(tag, result));
        }
        assert!(
            journal.chain_len() >= 3,
            "seed {seed}: the journal rolled segments"
        );
        assert!(qp.record_writes >= 20, "seed {seed}: records were written");
    }
}

/// Appends a copy of object `o<n>`'s block 0 (now at `from`, bytes `data`) as the cleaner
/// journals one: an `ExtentMove` whose data goes to the cold head.
fn append_move(
    journal: &mut Journal,
    n: u64,
    from: u64,
    data: &mut AlignedBuf,
    tag: u64,
) -> Result<(), JournalError> {
    let oid = format!("o{n}");
    let crc = carmine_crc::crc32c(data);
    let mut op = journal.append()?;
    // SAFETY: the caller keeps `data` alive and unchanged until the op is acknowledged.
    unsafe { op.moved_extent(oid.as_bytes(), 0, from, data.as_io_vec(), &[crc], true)? };
    op.placement(true)?;
    op.commit(tag);
    Ok(())
}

/// Steps, applying each durable record's deltas to `metadata` as the store does.
fn step_applying(
    journal: &mut Journal,
    qp: &mut MemQueuePair,
    metadata: &mut Metadata,
    acked: &mut Vec<u64>,
) {
    journal.pump(
        qp,
        &mut |deltas| {
            for delta in DeltaReader::new(deltas) {
                metadata.apply(&delta.unwrap()).unwrap();
            }
        },
        &mut |tag, result| {
            result.unwrap();
            acked.push(tag);
        },
    );
    qp.poll(64, &mut |tag, result| journal.complete_io(tag, result));
}

fn headers(sb: &Superblock, image: &[u8]) -> Vec<SegmentHeader> {
    let mut reader: &[u8] = image;
    crate::segment::scan::read_segment_headers(sb, 0, &mut reader).unwrap()
}

fn is_cold(headers: &[SegmentHeader], sb: &Superblock, physical: u64) -> bool {
    let segment = sb.segment_at(physical).unwrap();
    headers.iter().any(|h| h.segment == segment && h.cold)
}

/// What the cold-head tests start from: a fresh journal on `device`'s image in which op 0
/// wrote block 0 of `o0` (acknowledged, its deltas applied to `metadata`), and where that
/// block lies (`from`), for a copy to move.
struct Written {
    sb: Superblock,
    qp: MemQueuePair,
    journal: Journal,
    metadata: Metadata,
    acked: Vec<u64>,
    from: u64,
}

/// Where block 0 of `o0` lies now.
fn block_0_of_o0(metadata: &Metadata) -> u64 {
    metadata
        .object(b"o0")
        .unwrap()
        .blocks
        .get(0)
        .unwrap()
        .physical
}

fn written_block() -> Written {
    let (sb, mut qp) = device(MemFaults::default());
    let log = scan_shard(&sb, 0, &mut &qp.durable()[..], &mut |_, _| {}).unwrap();
    let mut journal = Journal::new(sb, 0, &log, &vec![0; sb.segment_count as usize]);
    let mut metadata = Metadata::new(sb);
    let mut acked = Vec::new();
    let mut first = block(1);
    append_op(&mut journal, 0, &mut first).unwrap();
    while acked.is_empty() {
        step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
    }
    let from = block_0_of_o0(&metadata);
    Written {
        sb,
        qp,
        journal,
        metadata,
        acked,
        from,
    }
}

/// A copy's data goes to a cold segment (its header says so), the client data of the same
/// record to the journal segment after the record's head; replay maps the moved block at its
/// cold address, with the bytes read there.
#[test]
fn copies_go_to_a_cold_segment_and_replay_from_there() {
    let Written {
        sb,
        mut qp,
        mut journal,
        mut metadata,
        mut acked,
        from,
    } = written_block();
    let mut copy = block(1);
    let mut second = block(2);
    append_move(&mut journal, 0, from, &mut copy, 100).unwrap();
    append_op(&mut journal, 1, &mut second).unwrap();
    for _ in 0..200 {
        step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
    }
    assert_eq!(acked, [0, 100, 1]);
    assert_eq!(journal.cold_segments_opened, 1);
    let image = qp.durable().to_vec();
    let (replayed, records) = replay(&sb, &image);
    assert_eq!(records, 2, "the copy went in the second client record");
    assert!(
        replayed.same_as(&metadata),
        "replay equals the running state"
    );
    let headers = headers(&sb, &image);
    let moved = replayed.object(b"o0").unwrap().blocks.get(0).unwrap();
    let written = replayed.object(b"o1").unwrap().blocks.get(0).unwrap();
    assert!(
        is_cold(&headers, &sb, moved.physical),
        "the copy is in a cold segment"
    );
    assert!(!is_cold(&headers, &sb, from) && !is_cold(&headers, &sb, written.physical));
    assert_eq!(&image[moved.physical as usize..][..4096], &copy[..]);
    assert_eq!(&image[written.physical as usize..][..4096], &second[..]);
    let cold_segment = sb.segment_at(moved.physical).unwrap();
    assert_eq!(
        moved.physical,
        sb.segment_offset(cold_segment) + BLOCK_SIZE_BYTES,
        "the cold run follows its segment's header"
    );
}

/// A record whose cold run is torn ends the log when it is among the last records (it was
/// never acknowledged: its flush had not completed); an older record's cold run is not
/// checked, since its segment may have been freed and reused once later records remapped
/// its blocks (`scan::check_cold_at_end`).
#[test]
fn a_torn_cold_run_ends_the_log_only_among_the_last_records() {
    let Written {
        sb,
        mut qp,
        mut journal,
        mut metadata,
        mut acked,
        from,
    } = written_block();
    let mut copy = block(1);
    append_move(&mut journal, 0, from, &mut copy, 100).unwrap();
    for _ in 0..200 {
        step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
    }
    let moved_to = block_0_of_o0(&metadata);
    assert_ne!(moved_to, from);
    // The copy's record is the last: with its cold run lost, the log ends before it.
    let mut torn = qp.durable().to_vec();
    torn[moved_to as usize..][..4096].fill(0);
    let (replayed, records) = replay(&sb, &torn);
    assert_eq!(records, 1);
    assert_eq!(
        replayed
            .object(b"o0")
            .unwrap()
            .blocks
            .get(0)
            .unwrap()
            .physical,
        from,
        "the copy is not replayed: the block is where it was"
    );
    // Later records overwrite the moved block, and more follow: the copy's record is no
    // longer among the last, so a cold run overwritten since (its segment reused) is not
    // checked, and the log replays whole.
    let mut later: Vec<AlignedBuf> = (0..4).map(|n| block(10 + n)).collect();
    for (n, buf) in later.iter_mut().enumerate() {
        let crc = carmine_crc::crc32c(buf);
        let mut op = journal.append().unwrap();
        // SAFETY: `later` outlives the steps below, unchanged.
        unsafe { op.extent(b"o0", 0, buf.as_io_vec(), &[crc]).unwrap() };
        op.commit(200 + n as u64);
        for _ in 0..100 {
            step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
        }
    }
    assert_eq!(acked.len(), 6);
    let mut reused = qp.durable().to_vec();
    reused[moved_to as usize..][..4096].fill(0xa5);
    let (replayed, records) = replay(&sb, &reused);
    assert_eq!(records, 6, "every record replays");
    assert!(replayed.same_as(&metadata));
    let block = replayed.object(b"o0").unwrap().blocks.get(0).unwrap();
    assert_eq!(&reused[block.physical as usize..][..4096], &later[3][..]);
}

/// Power cuts (any unflushed write lost or torn, completions reordered) while records carry
/// client writes and copies to the cold head: every acknowledged write and copy replays, each
/// block's bytes match its crc wherever it lives, and a copy acknowledged lives in a cold
/// segment.
#[test]
fn power_cuts_with_copies_in_the_cold_head_lose_nothing_acknowledged() {
    let mut cold_cuts = 0;
    for seed in 0..200u64 {
        let (sb, mut qp) = device(MemFaults {
            seed,
            latency_polls: (0, 4),
            reorder: true,
            ..MemFaults::default()
        });
        let log = scan_shard(&sb, 0, &mut &qp.durable()[..], &mut |_, _| {}).unwrap();
        let mut journal = Journal::new(sb, 0, &log, &vec![0; sb.segment_count as usize]);
        let mut metadata = Metadata::new(sb);
        let mut buffers: Vec<AlignedBuf> = (0..60).map(|n| block(n ^ seed)).collect();
        let mut copies: Vec<AlignedBuf> = (0..60).map(|n| block(n ^ seed)).collect();
        let mut moved = vec![false; 60];
        let mut acked = Vec::new();
        let cut_after = 5 + seed as usize % 150;
        for step_index in 0..cut_after {
            let n = step_index / 2;
            if n < 60 && step_index % 2 == 0 {
                let _ = append_op(&mut journal, n as u64, &mut buffers[n]);
            }
            // Copy an acknowledged object's block, once, as the cleaner would.
            let candidate = (step_index * 7 + seed as usize) % 60;
            if acked.contains(&(candidate as u64)) && !moved[candidate] {
                let from = metadata
                    .object(format!("o{candidate}").as_bytes())
                    .unwrap()
                    .blocks
                    .get(0)
                    .unwrap()
                    .physical;
                let tag = 1000 + candidate as u64;
                if append_move(
                    &mut journal,
                    candidate as u64,
                    from,
                    &mut copies[candidate],
                    tag,
                )
                .is_ok()
                {
                    moved[candidate] = true;
                }
            }
            step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
        }
        cold_cuts += usize::from(journal.in_flight.iter().any(|f| f.cold_blocks > 0));
        let image = qp.power_cut(if seed % 2 == 0 {
            TearGranularity::Sector512
        } else {
            TearGranularity::Block4K
        });
        let (replayed, _) = replay(&sb, &image);
        let headers = headers(&sb, &image);
        for &tag in &acked {
            let n = if tag >= 1000 { tag - 1000 } else { tag };
            let onode = replayed.object(format!("o{n}").as_bytes());
            let onode = onode.unwrap_or_else(|| panic!("seed {seed}: acknowledged op {tag} lost"));
            let block = onode.blocks.get(0).unwrap();
            assert_eq!(
                carmine_crc::crc32c(&image[block.physical as usize..][..4096]),
                block.crc,
                "seed {seed}: object {n}'s bytes"
            );
            if tag >= 1000 {
                assert!(
                    is_cold(&headers, &sb, block.physical),
                    "seed {seed}: acknowledged copy of {n} not in a cold segment"
                );
            }
        }
    }
    assert!(
        cold_cuts >= 10,
        "cuts met records with a cold run in flight only {cold_cuts} times"
    );
}

/// A cold segment whose copies died at once (the next record rewrote the block) is not
/// freeable until `COLD_REUSE_RECORDS_AFTER` more records were sealed: before, a torn write
/// reusing it could make a crash's scan, which checks the last records' cold runs, end the
/// log at an acknowledged record (`carmine sim --seed 5437` in the 5000.. batch). With the
/// journal otherwise idle, empty records get it there.
#[test]
fn a_cold_segment_is_freeable_only_records_after_its_last_copy() {
    let Written {
        sb,
        mut qp,
        mut journal,
        mut metadata,
        mut acked,
        from,
    } = written_block();
    let mut copy = block(1);
    append_move(&mut journal, 0, from, &mut copy, 100).unwrap();
    while acked.len() < 2 {
        step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
    }
    let moved_to = block_0_of_o0(&metadata);
    let cold = sb.segment_at(moved_to).unwrap();
    assert_eq!(journal.role(cold), SegmentRole::Cold);
    // The next record rewrites the block: the cold segment holds nothing live.
    let mut rewrite = block(2);
    let crc = carmine_crc::crc32c(&rewrite);
    let mut op = journal.append().unwrap();
    // SAFETY: `rewrite` outlives the steps below, unchanged.
    unsafe { op.extent(b"o0", 0, rewrite.as_io_vec(), &[crc]).unwrap() };
    op.commit(200);
    while acked.len() < 3 {
        step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
    }
    assert_eq!(metadata.live_blocks(cold), 0);
    journal.leave_cold();
    let copy_seq = journal.next_record_seq - 2;
    assert_eq!(
        journal.role(cold),
        SegmentRole::Cold,
        "right after the copy's record, the segment is not freeable"
    );
    // Idle: empty records follow until the segment may be reused.
    let mut steps = 0;
    while journal.role(cold) == SegmentRole::Cold {
        step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
        steps += 1;
        assert!(steps < 1000, "the segment never settled");
    }
    assert_eq!(journal.role(cold), SegmentRole::Data);
    assert!(journal.next_record_seq >= copy_seq + 1 + COLD_REUSE_RECORDS_AFTER);
    let (replayed, _) = replay(&sb, qp.durable());
    assert!(
        replayed.same_as(&metadata),
        "empty records replay as nothing"
    );
}

/// A mount ends the log at a record whose cold run is torn (its head is valid); the writer
/// continues in a fresh segment from that record's number. The next scan must follow the new
/// segment and drop the old record, not end the log there and take the new records for
/// damage (`carmine sim --first-seed 20000`, seed 20054).
#[test]
fn after_a_torn_cold_run_the_next_life_continues_the_log() {
    let Written {
        sb,
        mut qp,
        mut journal,
        mut metadata,
        mut acked,
        from,
    } = written_block();
    let mut copy = block(1);
    append_move(&mut journal, 0, from, &mut copy, 100).unwrap();
    for _ in 0..100 {
        step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
    }
    let moved_to = block_0_of_o0(&metadata);
    drop(journal);
    // The copy's cold run torn: mount ends the log before its record.
    let mut image = qp.durable().to_vec();
    image[moved_to as usize..][..4096].fill(0);
    let mut metadata = Metadata::new(sb);
    let log = scan_shard(&sb, 0, &mut &image[..], &mut |_, deltas| {
        for delta in DeltaReader::new(deltas) {
            metadata.apply(&delta.unwrap()).unwrap();
        }
    })
    .unwrap();
    assert_eq!(log.records.len(), 1);
    let mut qp = MemQueuePair::from_image(image, 256, MemFaults::default());
    let mut journal = Journal::new(sb, 0, &log, &metadata.live_block_counts());
    let mut later: Vec<AlignedBuf> = (0..3).map(|n| block(20 + n)).collect();
    let mut acked = Vec::new();
    for (n, buf) in later.iter_mut().enumerate() {
        append_op(&mut journal, 10 + n as u64, buf).unwrap();
        for _ in 0..100 {
            step_applying(&mut journal, &mut qp, &mut metadata, &mut acked);
        }
    }
    assert_eq!(acked, [10, 11, 12]);
    let mut replayed = Metadata::new(sb);
    let log = scan_shard(&sb, 0, &mut &qp.durable()[..], &mut |_, deltas| {
        for delta in DeltaReader::new(deltas) {
            replayed.apply(&delta.unwrap()).unwrap();
        }
    })
    .unwrap();
    assert_eq!(
        log.records.len(),
        4,
        "the first record and the next life's three"
    );
    assert!(log.orphans.is_empty());
    assert!(replayed.same_as(&metadata));
    assert_eq!(
        replayed
            .object(b"o0")
            .unwrap()
            .blocks
            .get(0)
            .unwrap()
            .physical,
        from,
        "the torn copy stays discarded"
    );
    let mut reader: &[u8] = qp.durable();
    let after = crate::segment::tail::records_after_end(&mut reader, &sb, 0, &log, &mut Vec::new())
        .unwrap();
    assert!(
        after.is_empty(),
        "nothing valid after the end: {}",
        after.len()
    );
}
