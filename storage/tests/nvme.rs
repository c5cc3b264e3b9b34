//! The NVMe queue pair against a real controller: in CI the emulated one in the QEMU guest
//! (ci/vm/run.sh sets CARMINE_NVME_PCI to its address and binds it to vfio-pci). Without
//! CARMINE_NVME_PCI each device test prints why it is skipped; the error-path tests that need
//! no device always run. With a device, run them with `--test-threads=1`: each test opens the
//! controller, and a VFIO group is open in one place at a time.

use std::time::{Duration, Instant};

use carmine_storage::queue_pair::nvme::{ResetPhase, COMMAND_TIMEOUT};
use carmine_storage::queue_pair::{
    AlignedBuf, IoError, IoVec, NvmeController, NvmeQueuePair, QueuePair, SubmitError,
    BLOCK_SIZE_BYTES,
};

const BLOCK: usize = BLOCK_SIZE_BYTES;

/// How long a test waits for completions (the emulated controller under TCG is slow).
const WAIT_MAX: Duration = Duration::from_secs(120);

fn device() -> Option<String> {
    match std::env::var("CARMINE_NVME_PCI") {
        Ok(address) if !address.is_empty() => Some(address),
        _ => {
            eprintln!(
                "SKIP: CARMINE_NVME_PCI is not set (the NVMe tests run in the ci/vm guest: \
                 ci/vm/run.sh; on bare metal bind a scratch NVMe device with scripts/setup.sh)"
            );
            None
        }
    }
}

/// Polls until `count` completions arrived; returns them as (tag, result).
fn drain(qp: &mut NvmeQueuePair, count: usize) -> Vec<(u64, Result<(), IoError>)> {
    let mut done = Vec::new();
    let start = Instant::now();
    while done.len() < count {
        qp.poll(64, &mut |tag, result| done.push((tag, result)));
        assert!(
            start.elapsed() < WAIT_MAX,
            "only {} of {count} completions after {WAIT_MAX:?}",
            done.len()
        );
    }
    assert_eq!(qp.in_flight(), 0);
    done
}

fn pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

fn io_vec(buf: &mut AlignedBuf) -> IoVec {
    // SAFETY: every test keeps the buffer alive and untouched until `drain` has reported the
    // request's completion.
    unsafe { buf.as_io_vec() }
}

#[test]
fn identify_reports_the_emulated_controller() {
    let Some(address) = device() else { return };
    let controller = NvmeController::open(&address).expect("open controller");
    let identity = controller.identity();
    eprintln!(
        "{identity:?}, {} I/O queues",
        controller.io_queues_granted()
    );
    assert!(matches!(identity.lba_size_bytes, 512 | 4096));
    assert!(identity.capacity_bytes() >= 16 << 20);
    assert!(controller.io_queues_granted() >= 2);
    assert!(identity.transfer_max_bytes >= 4096);
    // run.sh passes what it gave QEMU on the kernel command line.
    if let Ok(serial) = std::env::var("CARMINE_NVME_EXPECT_SERIAL") {
        assert_eq!(identity.serial, serial);
    }
    if let Ok(bytes) = std::env::var("CARMINE_NVME_EXPECT_BYTES") {
        assert_eq!(identity.capacity_bytes(), bytes.parse::<u64>().unwrap());
    }
}

#[test]
fn write_then_read_back_matches_across_commands_and_buffers() {
    let Some(address) = device() else { return };
    // Depth 4: a 1 MiB request is 8 commands of 128 KiB, so commands wait for slots.
    let mut qp = NvmeQueuePair::open(&address, 4).expect("open");
    let capacity = qp.capacity_bytes();
    // Three buffers of uneven sizes make one 1 MiB write.
    let sizes = [12 * BLOCK, 100 * BLOCK, 144 * BLOCK];
    let mut sources: Vec<AlignedBuf> = sizes.iter().map(|&s| AlignedBuf::new(s)).collect();
    for (seed, buf) in sources.iter_mut().enumerate() {
        pattern(buf, seed as u64 + 1);
    }
    let want: Vec<u32> = sources.iter().map(|b| crc32c::crc32c(b)).collect();
    for offset in [0, 7 * BLOCK as u64, capacity - (1 << 20)] {
        let vecs: Vec<IoVec> = sources.iter_mut().map(io_vec).collect();
        qp.submit_write(offset, &vecs, 1).unwrap();
        assert_eq!(drain(&mut qp, 1), vec![(1, Ok(()))]);
        // Read it back split differently: one buffer.
        let mut whole = AlignedBuf::new(1 << 20);
        qp.submit_read(offset, &[io_vec(&mut whole)], 2).unwrap();
        assert_eq!(drain(&mut qp, 1), vec![(2, Ok(()))]);
        let mut start = 0;
        for (size, crc) in sizes.iter().zip(&want) {
            assert_eq!(
                crc32c::crc32c(&whole[start..start + size]),
                *crc,
                "at {offset}+{start}"
            );
            start += size;
        }
    }
    assert!(
        qp.bounced_commands() >= 3 * 16,
        "unregistered buffers are bounced"
    );
}

#[test]
fn flush_completes_after_writes() {
    let Some(address) = device() else { return };
    let mut qp = NvmeQueuePair::open(&address, 8).expect("open");
    let mut buf = AlignedBuf::new(4 * BLOCK);
    pattern(&mut buf, 42);
    qp.submit_write(64 * BLOCK as u64, &[io_vec(&mut buf)], 10)
        .unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(10, Ok(()))]);
    qp.submit_flush(11).unwrap();
    qp.submit_flush(12).unwrap();
    let mut done = drain(&mut qp, 2);
    done.sort_by_key(|&(tag, _)| tag);
    assert_eq!(done, vec![(11, Ok(())), (12, Ok(()))]);
}

#[test]
fn many_in_flight_each_lands_where_it_was_sent() {
    let Some(address) = device() else { return };
    let depth = 64u32;
    let mut qp = NvmeQueuePair::open(&address, depth).expect("open");
    let mut buffers: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(BLOCK)).collect();
    for (index, buf) in buffers.iter_mut().enumerate() {
        pattern(buf, 1000 + index as u64);
    }
    let crcs: Vec<u32> = buffers.iter().map(|b| crc32c::crc32c(b)).collect();
    // Every other block, so no two writes touch one range.
    for (index, buf) in buffers.iter_mut().enumerate() {
        let offset = (2 * index * BLOCK) as u64;
        qp.submit_write(offset, &[io_vec(buf)], index as u64)
            .unwrap();
    }
    assert_eq!(qp.in_flight(), depth);
    let mut extra = AlignedBuf::new(BLOCK);
    assert_eq!(
        qp.submit_write(0, &[io_vec(&mut extra)], 99),
        Err(SubmitError::QueueFull)
    );
    let mut done = drain(&mut qp, depth as usize);
    done.sort_by_key(|&(tag, _)| tag);
    assert_eq!(
        done,
        (0..u64::from(depth))
            .map(|t| (t, Ok(())))
            .collect::<Vec<_>>()
    );
    let mut reads: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(BLOCK)).collect();
    for (index, buf) in reads.iter_mut().enumerate() {
        let offset = (2 * index * BLOCK) as u64;
        qp.submit_read(offset, &[io_vec(buf)], index as u64)
            .unwrap();
    }
    let done = drain(&mut qp, depth as usize);
    assert!(done.iter().all(|(_, result)| result.is_ok()), "{done:?}");
    for (index, buf) in reads.iter().enumerate() {
        assert_eq!(crc32c::crc32c(buf), crcs[index], "block {}", 2 * index);
    }
}

#[test]
fn out_of_range_is_refused_at_submit_and_by_the_device() {
    let Some(address) = device() else { return };
    let mut qp = NvmeQueuePair::open(&address, 4).expect("open");
    let capacity = qp.capacity_bytes();
    let mut buf = AlignedBuf::new(2 * BLOCK);
    assert_eq!(
        qp.submit_read(capacity - BLOCK as u64, &[io_vec(&mut buf)], 1),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(qp.in_flight(), 0);
    // Past the namespace's end the controller itself refuses: its status comes back.
    qp.widen_capacity_for_tests(capacity + (1 << 20));
    qp.submit_read(capacity, &[io_vec(&mut buf)], 2).unwrap();
    let done = drain(&mut qp, 1);
    let (tag, result) = done[0];
    assert_eq!(tag, 2);
    let Err(IoError::Nvme(status)) = result else {
        panic!("expected an NVMe status, got {result:?}");
    };
    assert_eq!((status.code_type(), status.code()), (0, 0x80), "{status}");
    assert!(IoError::Nvme(status)
        .to_string()
        .contains("LBA out of range"));
    // The queue pair is still usable.
    qp.submit_read(0, &[io_vec(&mut buf)], 3).unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(3, Ok(()))]);
}

#[test]
fn registered_buffers_are_used_in_place() {
    let Some(address) = device() else { return };
    let mut qp = NvmeQueuePair::open(&address, 8).expect("open");
    let mut region = AlignedBuf::new(64 * BLOCK);
    // SAFETY: `region` outlives `qp` (declared before it is dropped at the end of the test,
    // and `qp` is dropped explicitly first).
    unsafe {
        qp.register_buffers(&[(region.as_mut_ptr(), region.len())])
            .unwrap()
    };
    pattern(&mut region[..32 * BLOCK], 7);
    let want = crc32c::crc32c(&region[..32 * BLOCK]);
    // SAFETY: the halves are untouched until their requests complete.
    let (source, target) = unsafe {
        (
            region.io_vec_at(0, 32 * BLOCK),
            region.io_vec_at(32 * BLOCK, 32 * BLOCK),
        )
    };
    qp.submit_write(1 << 20, &[source], 1).unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(1, Ok(()))]);
    qp.submit_read(1 << 20, &[target], 2).unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(2, Ok(()))]);
    assert_eq!(qp.bounced_commands(), 0);
    assert_eq!(qp.zero_copy_commands(), 2);
    drop(qp);
    assert_eq!(crc32c::crc32c(&region[32 * BLOCK..]), want);
}

#[test]
fn two_queue_pairs_share_one_controller() {
    let Some(address) = device() else { return };
    let controller = NvmeController::open(&address).expect("open controller");
    let half = controller.identity().capacity_bytes() / 2 / BLOCK as u64 * BLOCK as u64;
    let mut first = NvmeQueuePair::new(&controller, 0, half, 8).unwrap();
    let mut second = NvmeQueuePair::new(&controller, half, half, 8).unwrap();
    let mut buf = AlignedBuf::new(BLOCK);
    pattern(&mut buf, 5);
    // The second pair's offset 0 is the first pair's `half`.
    second.submit_write(0, &[io_vec(&mut buf)], 1).unwrap();
    assert_eq!(drain(&mut second, 1), vec![(1, Ok(()))]);
    let mut back = AlignedBuf::new(BLOCK);
    first.widen_capacity_for_tests(2 * half);
    first.submit_read(half, &[io_vec(&mut back)], 2).unwrap();
    assert_eq!(drain(&mut first, 1), vec![(2, Ok(()))]);
    assert_eq!(&back[..], &buf[..]);
    // The range is checked against the namespace.
    assert!(NvmeQueuePair::new(&controller, half, 2 * half, 8).is_err());
}

#[test]
fn a_missing_or_unbound_device_is_a_clear_error() {
    let error = NvmeController::open("0000:ff:1f.7")
        .err()
        .expect("no such device");
    let text = error.to_string();
    assert!(text.contains("no PCI device 0000:ff:1f.7"), "{text}");
}

/// Reads per batch in the cost rounds (a reactor's typical queue depth).
const COST_BATCH: usize = 32;
/// Batches per cost run: `ci/vm/cost.sh` divides the instructions it counts by 50 x 32.
const COST_ROUNDS: usize = 50;

/// The submit+poll path, for `ci/vm/cost.sh` to count instructions in under callgrind (here it
/// only checks every read completes). Each round submits `COST_BATCH` 4 KiB reads, polls once
/// (the doorbell), sleeps so the device is done, then reaps: few empty polls get counted.
/// Calls go through `dyn QueuePair` so that `submit_read` and `poll` stay whole functions.
fn cost_rounds(qp: &mut dyn QueuePair, buffers: &[IoVec]) {
    assert_eq!(buffers.len(), COST_BATCH);
    for _ in 0..COST_ROUNDS {
        for (index, buffer) in buffers.iter().enumerate() {
            qp.submit_read((index * BLOCK) as u64, &[*buffer], index as u64)
                .unwrap();
        }
        let mut done = 0;
        let mut failed = 0;
        let start = Instant::now();
        while done < COST_BATCH {
            done += qp.poll(COST_BATCH, &mut |_, result| {
                failed += result.is_err() as usize
            });
            if done < COST_BATCH {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(
                start.elapsed() < WAIT_MAX,
                "{done} of {COST_BATCH} reads done"
            );
        }
        assert_eq!(failed, 0);
    }
}

#[test]
fn cost_rounds_zero_copy() {
    let Some(address) = device() else { return };
    let mut qp = NvmeQueuePair::open(&address, COST_BATCH as u32).expect("open");
    let mut region = AlignedBuf::new(COST_BATCH * BLOCK);
    // SAFETY: `region` outlives `qp`, which is dropped explicitly below.
    unsafe {
        qp.register_buffers(&[(region.as_mut_ptr(), region.len())])
            .unwrap()
    };
    let buffers: Vec<IoVec> = (0..COST_BATCH)
        // SAFETY: each block is only touched by the device, one read at a time.
        .map(|index| unsafe { region.io_vec_at(index * BLOCK, BLOCK) })
        .collect();
    cost_rounds(&mut qp, &buffers);
    assert_eq!(qp.bounced_commands(), 0);
    drop(qp);
}

#[test]
fn cost_rounds_bounced() {
    let Some(address) = device() else { return };
    let mut qp = NvmeQueuePair::open(&address, COST_BATCH as u32).expect("open");
    let mut blocks: Vec<AlignedBuf> = (0..COST_BATCH).map(|_| AlignedBuf::new(BLOCK)).collect();
    let buffers: Vec<IoVec> = blocks.iter_mut().map(io_vec).collect();
    cost_rounds(&mut qp, &buffers);
    assert_eq!(qp.bounced_commands(), (COST_ROUNDS * COST_BATCH) as u64);
}

#[test]
fn a_medium_error_comes_back_as_its_nvme_status() {
    // ci/vm/run.sh gives this controller a backing file whose reads of byte 1 MiB fail (EIO).
    let Ok(address) = std::env::var("CARMINE_NVME_FAULTY_PCI") else {
        eprintln!("SKIP: CARMINE_NVME_FAULTY_PCI is not set (ci/vm/run.sh sets it in the guest)");
        return;
    };
    let mut qp = NvmeQueuePair::open(&address, 4).expect("open");
    let mut buf = AlignedBuf::new(2 * BLOCK);
    qp.submit_read(1 << 20, &[io_vec(&mut buf)], 1).unwrap();
    let done = drain(&mut qp, 1);
    let (tag, result) = done[0];
    assert_eq!(tag, 1);
    let Err(IoError::Nvme(status)) = result else {
        panic!("expected an NVMe status, got {result:?}");
    };
    // Media and data integrity errors, unrecovered read error.
    assert_eq!((status.code_type(), status.code()), (2, 0x81), "{status}");
    assert!(
        status.to_string().contains("unrecovered read error"),
        "{status}"
    );
    // The rest of the namespace reads, and so does a write to the bad range.
    qp.submit_read(0, &[io_vec(&mut buf)], 2).unwrap();
    qp.submit_write(1 << 20, &[io_vec(&mut buf)], 3).unwrap();
    let mut done = drain(&mut qp, 2);
    done.sort_by_key(|&(tag, _)| tag);
    assert_eq!(done, vec![(2, Ok(())), (3, Ok(()))]);
}

/// Polls until nothing is in flight, then some more: returns every (tag, result) reported,
/// sorted by tag, after checking that the tags are exactly `tags` (each reported once, none
/// twice, none late).
fn drain_each_once(qp: &mut NvmeQueuePair, tags: &[u64]) -> Vec<(u64, Result<(), IoError>)> {
    let done = drain_calling(qp, |_| {});
    let reported: Vec<u64> = done.iter().map(|&(tag, _)| tag).collect();
    assert_eq!(reported, tags, "every request reported exactly once");
    done
}

/// Polls until nothing is in flight, calling `after_poll` after each poll, then some more:
/// returns every (tag, result) reported, sorted by tag.
fn drain_calling(
    qp: &mut NvmeQueuePair,
    mut after_poll: impl FnMut(&mut NvmeQueuePair),
) -> Vec<(u64, Result<(), IoError>)> {
    let mut done = Vec::new();
    let start = Instant::now();
    while qp.in_flight() > 0 {
        qp.poll(7, &mut |tag, result| done.push((tag, result)));
        after_poll(qp);
        assert!(
            start.elapsed() < WAIT_MAX,
            "{} requests still in flight after {WAIT_MAX:?}",
            qp.in_flight()
        );
    }
    for _ in 0..1000 {
        qp.poll(64, &mut |tag, result| done.push((tag, result)));
    }
    done.sort_by_key(|&(tag, _)| tag);
    done
}

/// Writes then reads back one block at `offset` through `qp`.
fn round_trip(qp: &mut NvmeQueuePair, offset: u64, seed: u64) {
    let mut buf = AlignedBuf::new(BLOCK);
    pattern(&mut buf, seed);
    qp.submit_write(offset, &[io_vec(&mut buf)], 1_000).unwrap();
    assert_eq!(drain(qp, 1), vec![(1_000, Ok(()))]);
    let mut back = AlignedBuf::new(BLOCK);
    qp.submit_read(offset, &[io_vec(&mut back)], 1_001).unwrap();
    assert_eq!(drain(qp, 1), vec![(1_001, Ok(()))]);
    assert_eq!(&back[..], &buf[..]);
}

#[test]
fn a_controller_reset_fails_in_flight_requests_once_and_io_resumes() {
    let Some(address) = device() else { return };
    let controller = NvmeController::open(&address).expect("open controller");
    let half = controller.identity().capacity_bytes() / 2 / BLOCK as u64 * BLOCK as u64;
    let mut first = NvmeQueuePair::new(&controller, 0, half, 32).unwrap();
    let mut second = NvmeQueuePair::new(&controller, half, half, 8).unwrap();
    // The first pair's 32 writes of 128 KiB reach the controller (doorbell rung); the second
    // pair's 8 are in its submission queue but never rung, so the reset must fail them.
    const CHUNK: usize = 32 * BLOCK;
    let mut sources: Vec<AlignedBuf> = (0..32)
        .map(|index| {
            let mut buf = AlignedBuf::new(CHUNK);
            pattern(&mut buf, 500 + index);
            buf
        })
        .collect();
    for (index, buf) in sources.iter_mut().enumerate() {
        let offset = (index * CHUNK) as u64;
        first
            .submit_write(offset, &[io_vec(buf)], index as u64)
            .unwrap();
    }
    first.submit_queued();
    let mut small: Vec<AlignedBuf> = (0..8).map(|_| AlignedBuf::new(BLOCK)).collect();
    for (index, buf) in small.iter_mut().enumerate() {
        second
            .submit_write((index * BLOCK) as u64, &[io_vec(buf)], 100 + index as u64)
            .unwrap();
    }
    controller.reset().expect("reset");
    assert_eq!(controller.generation(), 1);

    let first_done = drain_each_once(&mut first, &(0..32).collect::<Vec<_>>());
    let done = &first_done;
    let failed = done.iter().filter(|(_, result)| result.is_err()).count();
    eprintln!("reset with 32 writes out: {failed} failed, the rest had completed");
    for (tag, result) in done {
        assert!(
            matches!(result, Ok(()) | Err(IoError::ControllerReset)),
            "write {tag}: {result:?}"
        );
    }
    let done = drain_each_once(&mut second, &(100..108).collect::<Vec<_>>());
    assert!(
        done.iter()
            .all(|(_, result)| *result == Err(IoError::ControllerReset)),
        "requests the controller never saw fail with ControllerReset: {done:?}"
    );
    assert_eq!(
        (first.resets_recovered(), second.resets_recovered()),
        (1, 1)
    );
    assert!(IoError::ControllerReset.to_string().contains("reset"));

    // Both queues were re-created: I/O works on each, and a write acknowledged before the
    // reset reads back whole.
    round_trip(&mut first, 40 * CHUNK as u64, 77);
    round_trip(&mut second, 0, 78);
    // Unacknowledged writes may have landed whole, in part or not at all: not checked.
    for (tag, result) in &first_done {
        if result.is_err() {
            continue;
        }
        let source = &sources[*tag as usize];
        let mut back = AlignedBuf::new(CHUNK);
        first
            .submit_read(*tag * CHUNK as u64, &[io_vec(&mut back)], 2_000)
            .unwrap();
        assert_eq!(drain(&mut first, 1), vec![(2_000, Ok(()))]);
        assert!(
            back[..] == source[..],
            "acknowledged write {tag} reads back whole"
        );
    }
}

#[test]
fn timed_out_commands_are_aborted_then_reset_and_each_reported_once() {
    let Some(address) = device() else { return };
    let depth = 32usize;
    const CHUNK: usize = 32 * BLOCK;
    // One request slot more than the reads below: the read submitted mid-reset must find a
    // free slot even when the reset began before any of the others was reported (under a
    // loaded host, CI once got QueueFull there).
    let mut qp = NvmeQueuePair::open(&address, depth as u32 + 1).expect("open");
    // Half the reads land in a registered region (zero copy: the device writes the caller's
    // memory), half are bounced.
    let mut region = AlignedBuf::new(depth / 2 * CHUNK);
    // SAFETY: `region` outlives `qp`, which is dropped explicitly below.
    unsafe {
        qp.register_buffers(&[(region.as_mut_ptr(), region.len())])
            .unwrap()
    };
    let mut bounced: Vec<AlignedBuf> = (0..depth / 2).map(|_| AlignedBuf::new(CHUNK)).collect();
    // Every command is past its timeout at the second scan: each gets an Abort, and one still
    // out at the scan after that resets the controller.
    qp.set_command_timeout_for_tests(Duration::ZERO);
    for index in 0..depth {
        let iovec = if index < depth / 2 {
            // SAFETY: each chunk is only touched by the device, for this one read.
            unsafe { region.io_vec_at(index * CHUNK, CHUNK) }
        } else {
            io_vec(&mut bounced[index - depth / 2])
        };
        let offset = (index * CHUNK) as u64;
        qp.submit_read(offset, &[iovec], index as u64).unwrap();
    }
    // Polls that return while the reset is under way (it is stepped from polls: they do
    // not wait for the controller); at the first, one more read is submitted, which must be
    // failed once, as the controller never saw it.
    let mut reset_polls = 0u64;
    let mut late = AlignedBuf::new(BLOCK);
    let late_iovec = io_vec(&mut late);
    const LATE_TAG: u64 = 999;
    let mut late_submitted = false;
    let done = drain_calling(&mut qp, |qp| {
        if qp.controller().reset_phase() == ResetPhase::Ready {
            return;
        }
        reset_polls += 1;
        if !late_submitted {
            qp.submit_read(0, &[late_iovec], LATE_TAG).unwrap();
            late_submitted = true;
        }
    });
    let mut tags: Vec<u64> = (0..depth as u64).collect();
    if late_submitted {
        tags.push(LATE_TAG);
    }
    let reported: Vec<u64> = done.iter().map(|&(tag, _)| tag).collect();
    assert_eq!(reported, tags, "every request reported exactly once");
    let mut outcomes = [0usize; 4];
    for (tag, result) in &done {
        let outcome = match result {
            Ok(()) => 0,
            Err(IoError::Nvme(status)) if (status.code_type(), status.code()) == (0, 0x07) => 1,
            Err(IoError::TimedOut) => 2,
            Err(IoError::ControllerReset) => 3,
            other => panic!("read {tag}: unexpected {other:?}"),
        };
        outcomes[outcome] += 1;
    }
    eprintln!(
        "{} aborts sent, {} resets ({reset_polls} polls returned mid-reset); completed {}, \
         aborted {}, timed out {}, reset {}",
        qp.aborts_sent(),
        qp.resets_recovered(),
        outcomes[0],
        outcomes[1],
        outcomes[2],
        outcomes[3]
    );
    assert!(
        qp.aborts_sent() >= 1,
        "no command was ever past its timeout"
    );
    // A reset happened exactly when some command timed out after its abort.
    assert_eq!(qp.resets_recovered() > 0, outcomes[2] > 0);
    // The poll that started the reset returned before the controller was ready again (the
    // next step, Set Features once CSTS.RDY is back, is a later poll's), and the read
    // submitted then failed as reset.
    assert_eq!(reset_polls > 0, qp.resets_recovered() > 0);
    if late_submitted {
        let late = done.iter().find(|(tag, _)| *tag == LATE_TAG).unwrap();
        assert_eq!(late.1, Err(IoError::ControllerReset));
    }
    // Every Abort was accounted for once: answered, or lost to the reset.
    assert!(!qp.abort_in_flight());
    assert_eq!(qp.aborts_answered(), qp.aborts_sent());
    assert_eq!(qp.idle_commands_for_tests(), depth + 1);
    // Back to the normal timeout: the queue pair works.
    qp.set_command_timeout_for_tests(COMMAND_TIMEOUT);
    round_trip(&mut qp, 64 * CHUNK as u64, 79);
    drop(qp);
}

#[test]
fn an_abort_is_answered_while_polling_goes_on() {
    let Some(address) = device() else { return };
    let depth = 32usize;
    const CHUNK: usize = 32 * BLOCK;
    let mut qp = NvmeQueuePair::open(&address, depth as u32).expect("open");
    let mut bufs: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(CHUNK)).collect();
    // Every command is past its timeout at the second scan it sees, but gets a minute after
    // the Abort before a reset: the emulated controller declines the Abort and completes the
    // reads, so nothing is reset and the Abort's answer comes back through later polls.
    qp.set_command_timeout_for_tests(Duration::ZERO);
    qp.set_abort_timeout_for_tests(Duration::from_secs(60));
    for (index, buf) in bufs.iter_mut().enumerate() {
        qp.submit_read((index * CHUNK) as u64, &[io_vec(buf)], index as u64)
            .unwrap();
    }
    let mut done = Vec::new();
    let (mut polls, mut polls_with_abort_out, mut sent_at_poll) = (0u64, 0u64, None);
    let start = Instant::now();
    while qp.in_flight() > 0 || qp.abort_in_flight() {
        qp.poll(7, &mut |tag, result| done.push((tag, result)));
        polls += 1;
        if qp.abort_in_flight() {
            polls_with_abort_out += 1;
            sent_at_poll.get_or_insert(polls);
        }
        assert!(
            start.elapsed() < WAIT_MAX,
            "{} reads out, abort out: {} after {WAIT_MAX:?}",
            qp.in_flight(),
            qp.abort_in_flight()
        );
    }
    eprintln!(
        "{} aborts sent, {} answered; {polls} polls, {polls_with_abort_out} of them returned \
         with the abort out (sent at poll {sent_at_poll:?})",
        qp.aborts_sent(),
        qp.aborts_answered()
    );
    // The poll that sent the Abort returned before its answer: the reactor did not wait.
    assert!(qp.aborts_sent() >= 1, "no command was past its timeout");
    assert!(polls_with_abort_out >= 1);
    assert_eq!(qp.aborts_answered(), qp.aborts_sent());
    assert_eq!(
        qp.resets_recovered(),
        0,
        "a declined abort is no reason to reset"
    );
    done.sort_by_key(|&(tag, _)| tag);
    let expected: Vec<(u64, Result<(), IoError>)> =
        (0..depth as u64).map(|t| (t, Ok(()))).collect();
    assert_eq!(done, expected, "every read completed once, normally");
    // The command slot the Abort kept from reuse while it was out is idle again.
    assert_eq!(qp.idle_commands_for_tests(), depth);
    qp.set_command_timeout_for_tests(COMMAND_TIMEOUT);
    for (index, buf) in bufs.iter_mut().enumerate() {
        qp.submit_read((index * CHUNK) as u64, &[io_vec(buf)], index as u64)
            .unwrap();
    }
    assert_eq!(drain(&mut qp, depth).len(), depth);
    round_trip(&mut qp, 64 * CHUNK as u64, 83);
}

#[test]
fn write_zeroes_and_deallocate_where_the_controller_has_them() {
    let Some(address) = device() else { return };
    let mut qp = NvmeQueuePair::open(&address, 8).expect("open");
    let identity = qp.controller().identity().clone();
    eprintln!(
        "write zeroes {}, deallocate {}, deallocated blocks read as zeroes {}",
        identity.write_zeroes, identity.deallocate, identity.deallocated_reads_zeroes
    );
    // QEMU's controller advertises both (ONCS).
    assert!(identity.write_zeroes && identity.deallocate);
    let capacity = qp.capacity_bytes();
    let block = BLOCK as u64;
    assert_eq!(
        qp.submit_write_zeroes(512, block, 1),
        Err(SubmitError::Misaligned)
    );
    assert_eq!(
        qp.submit_write_zeroes(0, 0, 1),
        Err(SubmitError::Misaligned)
    );
    assert_eq!(
        qp.submit_deallocate(capacity - block, 2 * block, 1),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(qp.in_flight(), 0);

    // 40 MiB of zeroes: more than one Write Zeroes command with 512-byte blocks (32 MiB each).
    let start = 8u64 << 20;
    let length = 40u64 << 20;
    let mut data = AlignedBuf::new(4 * BLOCK);
    pattern(&mut data, 9);
    for offset in [start - block, start, start + length - 2 * block] {
        qp.submit_write(offset, &[io_vec(&mut data)], 1).unwrap();
        assert_eq!(drain(&mut qp, 1), vec![(1, Ok(()))]);
    }
    qp.submit_write_zeroes(start, length, 2).unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(2, Ok(()))]);
    let mut back = AlignedBuf::new(4 * BLOCK);
    qp.submit_read(start - block, &[io_vec(&mut back)], 3)
        .unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(3, Ok(()))]);
    assert_eq!(
        &back[..BLOCK],
        &data[..BLOCK],
        "the block before the range is kept"
    );
    assert!(back[BLOCK..].iter().all(|&b| b == 0), "zeroed");
    qp.submit_read(start + length - 2 * block, &[io_vec(&mut back)], 4)
        .unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(4, Ok(()))]);
    assert!(
        back[..2 * BLOCK].iter().all(|&b| b == 0),
        "zeroed to the end"
    );
    assert_eq!(
        &back[2 * BLOCK..],
        &data[2 * BLOCK..],
        "the blocks after it are kept"
    );

    // Deallocate: completes; reads zeroes where the namespace says deallocated blocks do.
    qp.submit_write(start, &[io_vec(&mut data)], 5).unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(5, Ok(()))]);
    qp.submit_deallocate(start, 4 * block, 6).unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(6, Ok(()))]);
    qp.submit_read(start, &[io_vec(&mut back)], 7).unwrap();
    assert_eq!(drain(&mut qp, 1), vec![(7, Ok(()))]);
    if identity.deallocated_reads_zeroes {
        assert!(
            back.iter().all(|&b| b == 0),
            "deallocated blocks read as zeroes"
        );
    }
    // The queue pair still reads and writes.
    round_trip(&mut qp, start, 80);
}

#[test]
fn segment_store_4k_writes_and_reads_make_no_bounce_copies() {
    use carmine_storage::segment::{mkfs, SegmentStore};
    use carmine_storage::{ObjectStore, OutputBuffer, SubOp, SubOpResult, Submit};

    let Some(address) = device() else { return };
    let mut qp = NvmeQueuePair::open(&address, 64).expect("open");
    mkfs(&mut qp, 1 << 20, 1, 0, *b"nvme-zero-copy-1").unwrap();
    let mut store = SegmentStore::mount(qp, 0).unwrap();
    // mkfs and mount read and write through their own (unregistered) buffer: count from here.
    let bounced_at_mount = store.queue_pair().bounced_commands();
    let zero_copy_at_mount = store.queue_pair().zero_copy_commands();
    let mut results = [SubOpResult::default(); 1];
    let wait = |store: &mut SegmentStore<NvmeQueuePair>, mut pending: usize| {
        let start = Instant::now();
        while pending > 0 {
            store.poll(64, &mut |_, result| {
                assert!(result.is_ok_and(|r| r.iter().all(|r| r.result().is_ok())));
                pending -= 1;
            });
            assert!(start.elapsed() < WAIT_MAX, "store ops never completed");
        }
    };
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    for n in 0..16u64 {
        let mut data = vec![0u8; BLOCK];
        pattern(&mut data, 300 + n);
        let oid = format!("zc{}", n % 4).into_bytes();
        let write = [SubOp::Write {
            offset: (n / 4) * BLOCK as u64,
            data: &data,
        }];
        let mut out = OutputBuffer::from_slice(&mut []);
        match store.submit(n, &oid, &write, &mut out, &mut results) {
            Ok(Submit::Pending) => wait(&mut store, 1),
            other => panic!("a write is pending until durable: {other:?}"),
        }
        blocks.push(data);
    }
    for (n, data) in blocks.iter().enumerate() {
        let n = n as u64;
        let oid = format!("zc{}", n % 4).into_bytes();
        let read = [SubOp::Read {
            offset: (n / 4) * BLOCK as u64,
            length: BLOCK as u64,
        }];
        let mut back = vec![0u8; BLOCK];
        // SAFETY: `back` is not touched until `wait` has seen this op complete.
        let mut out = unsafe { OutputBuffer::from_raw(back.as_mut_ptr(), back.len()) };
        match store.submit(100 + n, &oid, &read, &mut out, &mut results) {
            Ok(Submit::Pending) => wait(&mut store, 1),
            other => panic!("a block read is pending: {other:?}"),
        }
        assert_eq!(&back, data, "block {n}");
    }
    let qp = store.queue_pair();
    let (bounced, zero_copy) = (
        qp.bounced_commands() - bounced_at_mount,
        qp.zero_copy_commands() - zero_copy_at_mount,
    );
    eprintln!("after mount: {zero_copy} zero-copy commands, {bounced} bounced");
    assert_eq!(
        bounced, 0,
        "the store's 4 KiB writes and reads are not copied"
    );
    // 16 records (one per write) and 16 block reads at least.
    assert!(zero_copy >= 32, "{zero_copy} zero-copy commands");
}

#[test]
fn segment_store_64k_writes_reads_and_cleaner_moves_make_no_bounce_copies() {
    use carmine_storage::segment::{mkfs, SegmentStore};
    use carmine_storage::{ObjectStore, OutputBuffer, SubOp, SubOpResult, Submit};

    const OBJECTS: u64 = 8;
    const HOT_OBJECTS: u64 = 4;
    const OBJECT_BYTES: u64 = 1 << 20;
    const WRITE_BYTES: usize = 64 << 10;
    let Some(address) = device() else { return };
    let controller = NvmeController::open(&address).expect("open");
    // A 16 MiB partition of 1 MiB segments, half full: the objects are written interleaved,
    // then only the hot half is overwritten, so the first segments keep the cold half live
    // and the cleaner, once free space runs low, moves those runs.
    let mut qp = NvmeQueuePair::new(&controller, 0, 16 << 20, 64).expect("queue pair");
    mkfs(&mut qp, 1 << 20, 1, 0, *b"nvme-zero-copy-2").unwrap();
    let mut store = SegmentStore::mount(qp, 0).unwrap();
    let (bounced_at_mount, zero_copy_at_mount) = (
        store.queue_pair().bounced_commands(),
        store.queue_pair().zero_copy_commands(),
    );
    let mut results = [SubOpResult::default(); 1];
    let wait = |store: &mut SegmentStore<NvmeQueuePair>| {
        let (mut pending, start) = (1, Instant::now());
        while pending > 0 {
            store.poll(64, &mut |_, result| {
                assert!(result.is_ok_and(|r| r.iter().all(|r| r.result().is_ok())));
                pending -= 1;
            });
            assert!(start.elapsed() < WAIT_MAX, "{}", store.debug_state());
        }
    };
    let mut model: Vec<Vec<u8>> = vec![vec![0u8; OBJECT_BYTES as usize]; OBJECTS as usize];
    let chunks = OBJECT_BYTES / WRITE_BYTES as u64;
    let mut writes = 0u64;
    // Whole objects first, then overwrites of the hot ones in turn, until the cleaner has
    // moved blocks (and some more writes after that, so moves and client writes mix).
    let mut writes_after_moves = 64;
    while writes_after_moves > 0 {
        assert!(
            writes < 4_000,
            "the cleaner never moved a block: {:?}",
            store.segment_stats()
        );
        let filled = writes >= OBJECTS * chunks;
        let objects = if filled { HOT_OBJECTS } else { OBJECTS };
        let object = writes % objects;
        let offset = (writes / objects % chunks) * WRITE_BYTES as u64;
        let mut data = vec![0u8; WRITE_BYTES];
        pattern(&mut data, 500 + writes);
        let write = [SubOp::Write {
            offset,
            data: &data,
        }];
        let oid = format!("big{object}").into_bytes();
        let mut out = OutputBuffer::from_slice(&mut []);
        match store.submit(writes, &oid, &write, &mut out, &mut results) {
            Ok(Submit::Pending) => wait(&mut store),
            other => panic!("a write is pending until durable: {other:?}"),
        }
        let at = offset as usize;
        model[object as usize][at..at + WRITE_BYTES].copy_from_slice(&data);
        writes += 1;
        if store.segment_stats().blocks_moved > 0 {
            writes_after_moves -= 1;
        }
    }
    let mut reads = 0u64;
    for (object, expected) in model.iter().enumerate() {
        for chunk in 0..chunks as usize {
            let read = [SubOp::Read {
                offset: (chunk * WRITE_BYTES) as u64,
                length: WRITE_BYTES as u64,
            }];
            let mut back = vec![0u8; WRITE_BYTES];
            // SAFETY: `back` is not touched until `wait` has seen this op complete.
            let mut out = unsafe { OutputBuffer::from_raw(back.as_mut_ptr(), back.len()) };
            let oid = format!("big{object}").into_bytes();
            match store.submit(10_000 + reads, &oid, &read, &mut out, &mut results) {
                Ok(Submit::Pending) => wait(&mut store),
                other => panic!("a read is pending: {other:?}"),
            }
            let at = chunk * WRITE_BYTES;
            assert!(back == expected[at..at + WRITE_BYTES], "{object} at {at}");
            reads += 1;
        }
    }
    let stats = store.segment_stats();
    let qp = store.queue_pair();
    let (bounced, zero_copy) = (
        qp.bounced_commands() - bounced_at_mount,
        qp.zero_copy_commands() - zero_copy_at_mount,
    );
    eprintln!(
        "{writes} writes, {reads} reads of 64 KiB; the cleaner moved {} blocks ({} segments), \
         {} checkpoints; {zero_copy} zero-copy commands, {bounced} bounced, {} buffers \
         allocated",
        stats.blocks_moved, stats.segments_cleaned, stats.checkpoints, stats.buffer_allocations
    );
    assert!(stats.blocks_moved > 0);
    assert_eq!(
        bounced, 0,
        "multi-block writes, read runs and cleaner moves are not copied"
    );
    assert_eq!(
        stats.buffer_allocations, 0,
        "every buffer came from the pool"
    );
    assert!(
        zero_copy >= writes + reads,
        "{zero_copy} zero-copy commands"
    );
}
