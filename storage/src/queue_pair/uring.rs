//! `UringQueuePair`: a queue pair on a file or block device through one io_uring, O_DIRECT.
//!
//! One ring per queue pair (so one per reactor), sized by depth: a request owns one slot, and a
//! slot has at most one SQE queued or in the kernel, so the submission queue never overflows and
//! the completion queue (twice the submission queue) never does either.
//!
//! `submit_*` only writes an SQE into the shared submission ring (no system call). `poll` makes
//! one `io_uring_enter` for the SQEs queued since the last poll, if any, then reaps completions
//! from the shared completion ring without waiting. The caller's buffers are used in place (no
//! copy): a request of one buffer inside a region given to `register_buffers` uses
//! ReadFixed/WriteFixed (pages pinned once, not per I/O); any other request uses Readv/Writev
//! from the slot's own iovec table. Flush is an fdatasync (`Fsync` with DATASYNC): the kernel
//! then writes back file metadata the data needs and sends the device a cache flush.
//!
//! Offsets are relative to `offset_base`: each reactor owns one partition of the device.
//! A short transfer (possible, though rare, with O_DIRECT) is resubmitted for the remainder.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use io_uring::{opcode, squeue, types, IoUring};

use super::{
    check_request, AlignedBuf, IoError, IoVec, QueuePair, SubmitError, BLOCK_SIZE_BYTES, DEPTH_MAX,
    IOVECS_PER_REQUEST_MAX,
};

/// Most regions `register_buffers` takes, a count: the lookup per I/O scans them.
pub const REGISTERED_REGIONS_MAX: usize = 64;

/// Largest registered region, in bytes (the kernel's limit per registered buffer).
pub const REGISTERED_REGION_MAX_BYTES: usize = 1 << 30;

/// The file's index in the ring's registered file table (saves an fd lookup per I/O).
const FILE_INDEX: types::Fixed = types::Fixed(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

const IOVEC_NONE: libc::iovec = libc::iovec {
    iov_base: core::ptr::null_mut(),
    iov_len: 0,
};

/// A request slot, preallocated. Its iovec table must not move while the kernel may read it:
/// slots live in a boxed slice allocated once.
struct Slot {
    busy: bool,
    kind: Kind,
    tag: u64,
    /// Absolute device offset of the next byte to transfer (advances on a short transfer).
    offset: u64,
    /// Bytes still to transfer.
    remaining: u64,
    iovecs: [libc::iovec; IOVECS_PER_REQUEST_MAX],
    /// The untransferred iovecs are `iovecs[iovec_first..iovec_end]`.
    iovec_first: usize,
    iovec_end: usize,
    /// Registered region index, for a one-buffer request inside one.
    fixed: Option<u16>,
}

impl Slot {
    fn idle() -> Slot {
        Slot {
            busy: false,
            kind: Kind::Flush,
            tag: 0,
            offset: 0,
            remaining: 0,
            iovecs: [IOVEC_NONE; IOVECS_PER_REQUEST_MAX],
            iovec_first: 0,
            iovec_end: 0,
            fixed: None,
        }
    }

    /// Moves past `done` transferred bytes, for resubmitting the rest.
    fn advance(&mut self, done: u64) {
        debug_assert!(done < self.remaining);
        self.offset += done;
        self.remaining -= done;
        let mut left = done as usize;
        while left > 0 {
            let iovec = &mut self.iovecs[self.iovec_first];
            if left >= iovec.iov_len {
                left -= iovec.iov_len;
                self.iovec_first += 1;
            } else {
                // SAFETY: `left < iov_len`, so the result stays inside the caller's buffer.
                iovec.iov_base = unsafe { iovec.iov_base.cast::<u8>().add(left) }.cast();
                iovec.iov_len -= left;
                left = 0;
            }
        }
        debug_assert!(self.iovec_first < self.iovec_end);
    }

    /// The SQE for what is left of this request; `user_data` is the slot index.
    fn entry(&self, index: usize) -> squeue::Entry {
        let iovecs = &self.iovecs[self.iovec_first..self.iovec_end];
        let count = iovecs.len() as u32;
        let entry = match (self.kind, self.fixed) {
            (Kind::Flush, _) => opcode::Fsync::new(FILE_INDEX)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (Kind::Read, Some(region)) => {
                let (base, len) = (iovecs[0].iov_base.cast::<u8>(), iovecs[0].iov_len as u32);
                opcode::ReadFixed::new(FILE_INDEX, base, len, region)
                    .offset(self.offset)
                    .build()
            }
            (Kind::Write, Some(region)) => {
                let (base, len) = (iovecs[0].iov_base.cast::<u8>(), iovecs[0].iov_len as u32);
                opcode::WriteFixed::new(FILE_INDEX, base, len, region)
                    .offset(self.offset)
                    .build()
            }
            (Kind::Read, None) => opcode::Readv::new(FILE_INDEX, iovecs.as_ptr(), count)
                .offset(self.offset)
                .build(),
            (Kind::Write, None) => opcode::Writev::new(FILE_INDEX, iovecs.as_ptr(), count)
                .offset(self.offset)
                .build(),
        };
        entry.user_data(index as u64)
    }
}

/// A queue pair on one io_uring; see the module docs.
pub struct UringQueuePair {
    ring: IoUring,
    /// Kept open for the ring's registered file table.
    _file: File,
    /// For messages (the lock holder's range).
    path: std::path::PathBuf,
    offset_base: u64,
    length: u64,
    depth: u32,
    slots: Box<[Slot]>,
    /// Indices of idle slots (a stack).
    free: Vec<u32>,
    /// Registered regions as (start address, length), indexed by buffer index.
    regions: Vec<(usize, usize)>,
    /// SQEs written since the last `io_uring_enter`.
    unsubmitted: u32,
}

// SAFETY: the raw pointers a `UringQueuePair` holds are the caller's submitted buffers (valid
// for access from the polling thread, by `IoVec::new`'s contract) and registered regions (by
// `register_buffers`'s); the ring and the file have no thread affinity.
unsafe impl Send for UringQueuePair {}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Why O_DIRECT failed, if the error says the filesystem refused it (EINVAL at open or at the
/// first aligned read: tmpfs and some FUSE and network filesystems).
fn o_direct_refused(path: &Path, error: &io::Error, when: &str) -> Option<io::Error> {
    (error.raw_os_error() == Some(libc::EINVAL)).then(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: the filesystem refused O_DIRECT ({when}: {error}); use a block device or a \
                 file on ext4/xfs/btrfs, not tmpfs",
                path.display()
            ),
        )
    })
}

impl UringQueuePair {
    /// Opens `path` (an existing file or block device) read-write with O_DIRECT, for the range
    /// `offset_base..offset_base + length`, with a ring of `depth` entries.
    ///
    /// Errors: InvalidInput for a misaligned or empty range, a range past the end of the file
    /// or device, or a depth outside `1..=DEPTH_MAX`; Unsupported (with the reason) if the
    /// filesystem refuses O_DIRECT or the kernel refuses io_uring; otherwise the OS error.
    pub fn open(path: &Path, offset_base: u64, length: u64, depth: u32) -> io::Result<Self> {
        let block = BLOCK_SIZE_BYTES as u64;
        if offset_base % block != 0 || length % block != 0 || length == 0 {
            return Err(invalid_input(format!(
                "range {offset_base}+{length} is not a nonempty range of 4096-byte blocks"
            )));
        }
        if !(1..=DEPTH_MAX).contains(&depth) {
            return Err(invalid_input(format!(
                "depth {depth} not in 1..={DEPTH_MAX}"
            )));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| o_direct_refused(path, &e, "open").unwrap_or(e))?;
        let size = file.seek(SeekFrom::End(0))?;
        let fits = matches!(offset_base.checked_add(length), Some(end) if end <= size);
        if !fits {
            return Err(invalid_input(format!(
                "{}: range {offset_base}+{length} ends past its size {size}",
                path.display()
            )));
        }
        // Some filesystems accept the flag and fail the I/O instead: probe with one block.
        let mut probe = AlignedBuf::new(BLOCK_SIZE_BYTES);
        file.read_at(&mut probe, offset_base)
            .map_err(|e| o_direct_refused(path, &e, "first read").unwrap_or(e))?;
        let ring = UringQueuePair::ring(depth)?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        Ok(UringQueuePair {
            ring,
            _file: file,
            path: path.to_path_buf(),
            offset_base,
            length,
            depth,
            slots: (0..depth).map(|_| Slot::idle()).collect(),
            free: (0..depth).rev().collect(),
            regions: Vec::with_capacity(REGISTERED_REGIONS_MAX),
            unsubmitted: 0,
        })
    }

    fn ring(depth: u32) -> io::Result<IoUring> {
        // The kernel rounds entries up to a power of two; the CQ gets twice as many.
        IoUring::new(depth.next_power_of_two()).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EPERM) => io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "io_uring unavailable ({e}): kernel without io_uring, \
                         sysctl kernel.io_uring_disabled, or a seccomp profile blocking it"
                ),
            ),
            _ => e,
        })
    }

    /// Locks bytes `start..start + length` of the device for this queue pair: exclusively
    /// (a shard's segments; the whole device for mkfs) or shared (the superblock a running
    /// shard reads), so that a second server, a shard claimed twice, or mkfs on a device in
    /// use is refused instead of overwriting a live log. The locks are advisory (every
    /// carmine command takes them; fsck a shared one on the whole device) and are released
    /// at drop.
    ///
    /// Errors: `WouldBlock`, naming the range, when another holder keeps it past a short wait.
    pub fn lock(&self, start: u64, length: u64, exclusive: bool) -> io::Result<()> {
        let kind = if exclusive {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        };
        lock_range(&self._file, &self.path, kind, start, length)
    }

    /// Registers memory regions with the ring, replacing earlier ones, so that a one-buffer
    /// request inside one of them uses ReadFixed/WriteFixed (pages pinned once, not per I/O).
    ///
    /// Errors: InvalidInput with requests in flight, with more than `REGISTERED_REGIONS_MAX`
    /// regions, or an empty region or one larger than `REGISTERED_REGION_MAX_BYTES`; the OS
    /// error if the kernel refuses (RLIMIT_MEMLOCK on older kernels). On error nothing is
    /// registered.
    ///
    /// # Safety
    /// Every region stays allocated, mapped at the same address, until the queue pair is
    /// dropped or `register_buffers` is called again: the kernel pins the pages behind each
    /// address now, and an I/O later reads or writes those pages whatever is mapped there.
    pub unsafe fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> io::Result<()> {
        if self.in_flight() > 0 {
            return Err(invalid_input("register_buffers with I/O in flight".into()));
        }
        let valid = |&&(_, len): &&(*mut u8, usize)| len > 0 && len <= REGISTERED_REGION_MAX_BYTES;
        if regions.len() > REGISTERED_REGIONS_MAX || !regions.iter().all(|r| valid(&r)) {
            return Err(invalid_input(format!(
                "at most {REGISTERED_REGIONS_MAX} regions of 1 byte to 1 GiB each"
            )));
        }
        if !self.regions.is_empty() {
            self.ring.submitter().unregister_buffers()?;
            self.regions.clear();
        }
        if regions.is_empty() {
            return Ok(());
        }
        let iovecs: Vec<libc::iovec> = regions
            .iter()
            .map(|&(ptr, len)| libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            })
            .collect();
        // SAFETY: the regions stay valid while registered, by our caller's contract.
        unsafe { self.ring.submitter().register_buffers(&iovecs)? };
        self.regions
            .extend(regions.iter().map(|&(ptr, len)| (ptr as usize, len)));
        Ok(())
    }

    /// The registered region holding all of `buffer`, if any.
    fn region_of(&self, buffer: &IoVec) -> Option<u16> {
        let start = buffer.ptr as usize;
        let end = start + buffer.len;
        self.regions
            .iter()
            .position(|&(base, len)| base <= start && end <= base + len)
            .map(|index| index as u16)
    }

    fn submit(
        &mut self,
        kind: Kind,
        offset: u64,
        buffers: &[IoVec],
        tag: u64,
    ) -> Result<(), SubmitError> {
        let length = match kind {
            Kind::Flush => 0,
            Kind::Read | Kind::Write => check_request(offset, buffers, self.length)?,
        };
        let index = self.free.pop().ok_or(SubmitError::QueueFull)? as usize;
        let fixed = match buffers {
            [one] => self.region_of(one),
            _ => None,
        };
        let slot = &mut self.slots[index];
        debug_assert!(!slot.busy);
        slot.busy = true;
        slot.kind = kind;
        slot.tag = tag;
        slot.offset = self.offset_base + offset;
        slot.remaining = length;
        for (iovec, buffer) in slot.iovecs.iter_mut().zip(buffers) {
            *iovec = libc::iovec {
                iov_base: buffer.ptr.cast(),
                iov_len: buffer.len,
            };
        }
        slot.iovec_first = 0;
        slot.iovec_end = buffers.len();
        slot.fixed = fixed;
        self.push(index);
        Ok(())
    }

    /// Writes slot `index`'s SQE into the submission ring (no system call).
    fn push(&mut self, index: usize) {
        let entry = self.slots[index].entry(index);
        // SAFETY: the SQE's buffers (caller memory under the IoVec contract, or a registered
        // region) and its iovec table (in the slot, which does not move and is not reused
        // before the CQE is reaped) stay valid until the kernel completes it.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        // Each busy slot has at most one SQE, and the ring has at least `depth` entries.
        assert!(pushed.is_ok(), "io_uring submission queue overflow");
        self.unsubmitted += 1;
    }

    /// Hands queued SQEs to the kernel: one `io_uring_enter`, never waiting.
    fn enter(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(consumed) => self.unsubmitted -= consumed as u32,
            // Transient (kernel short of memory, or a signal): the SQEs stay queued.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) => {}
            Err(e) => panic!("io_uring_enter failed: {e}"),
        }
    }

    /// Interprets a CQE for slot `index`: the request's result, or `None` if the rest of a
    /// short transfer was resubmitted.
    fn finish(&mut self, index: usize, res: i32) -> Option<Result<(), IoError>> {
        let slot = &mut self.slots[index];
        assert!(slot.busy, "completion for idle slot {index}");
        if res < 0 {
            if res == -libc::EAGAIN || res == -libc::EINTR {
                self.push(index);
                return None;
            }
            return Some(Err(IoError::Io(-res)));
        }
        let done = res as u64;
        if slot.kind == Kind::Flush || done == slot.remaining {
            return Some(Ok(()));
        }
        if done == 0 || done > slot.remaining {
            // End of file inside the range checked at open (the file shrank): report EIO.
            return Some(Err(IoError::Io(libc::EIO)));
        }
        slot.advance(done);
        self.push(index);
        None
    }
}

/// How long `open` waits for a range a process that just exited may still hold: the kernel
/// tears an io_uring down asynchronously, and the file (with its lock) goes with it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Sets (`F_WRLCK`) or clears (`F_UNLCK`) an open-file-description lock on a byte range.
fn set_range_lock(file: &File, kind: libc::c_int, start: u64, length: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` is plain data; all-zero is a valid value for every field.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = start as libc::off_t;
    lock.l_len = length as libc::off_t;
    // SAFETY: the descriptor is open for the call, and `lock` is a valid flock that outlives it.
    match unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Locks a byte range of `file` (an open-file-description lock: it holds between descriptors
/// even in one process), waiting up to `LOCK_WAIT` for a holder that is going away.
pub fn lock_range(
    file: &File,
    path: &Path,
    kind: libc::c_int,
    offset_base: u64,
    length: u64,
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let error = loop {
        let error = match set_range_lock(file, kind, offset_base, length) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if !matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
            || std::time::Instant::now() >= deadline
        {
            break error;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{}: bytes {offset_base}..{} are in use by another process (a running carmine?): stop it first",
                path.display(),
                offset_base + length
            ),
        )),
        _ => Err(error),
    }
}

impl QueuePair for UringQueuePair {
    fn submit_read(&mut self, offset: u64, buffers: &[IoVec], tag: u64) -> Result<(), SubmitError> {
        self.submit(Kind::Read, offset, buffers, tag)
    }

    fn submit_write(
        &mut self,
        offset: u64,
        buffers: &[IoVec],
        tag: u64,
    ) -> Result<(), SubmitError> {
        self.submit(Kind::Write, offset, buffers, tag)
    }

    fn submit_flush(&mut self, tag: u64) -> Result<(), SubmitError> {
        self.submit(Kind::Flush, 0, &[], tag)
    }

    fn poll(
        &mut self,
        completions_max: usize,
        complete: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        self.enter();
        let mut reported = 0;
        while reported < completions_max {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let index = cqe.user_data() as usize;
            let Some(result) = self.finish(index, cqe.result()) else {
                continue;
            };
            let slot = &mut self.slots[index];
            slot.busy = false;
            let tag = slot.tag;
            self.free.push(index as u32);
            reported += 1;
            complete(tag, result);
        }
        // Resubmitted remainders go to the kernel now rather than a poll later.
        self.enter();
        reported
    }

    fn capacity_bytes(&self) -> u64 {
        self.length
    }

    fn depth(&self) -> u32 {
        self.depth
    }

    fn in_flight(&self) -> u32 {
        self.depth - self.free.len() as u32
    }

    fn submit_queued(&mut self) {
        self.enter();
    }

    /// Registers the regions with the ring (the inherent `register_buffers`): one-buffer
    /// requests inside them become ReadFixed/WriteFixed, whose pages the kernel pinned once
    /// instead of per request.
    unsafe fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> io::Result<bool> {
        // SAFETY: the caller keeps every region allocated at its address until we are dropped
        // or called again: the inherent method's contract.
        unsafe { UringQueuePair::register_buffers(self, regions)? };
        Ok(true)
    }

    /// The kernel signals `fd` for every completion it posts (IORING_REGISTER_EVENTFD).
    fn wake_on_completion(&mut self, fd: std::os::fd::RawFd) -> io::Result<bool> {
        self.ring.submitter().register_eventfd(fd)?;
        Ok(true)
    }
}

impl Drop for UringQueuePair {
    /// Waits for requests in flight: the kernel may otherwise still write into caller buffers
    /// after the ring is closed (ring teardown is asynchronous). Blocking is fine at teardown.
    fn drop(&mut self) {
        self.drain_at_drop();
        // The ring may keep the file open a little longer (teardown is asynchronous): the
        // range is released now, not then.
        if let Err(error) = set_range_lock(&self._file, libc::F_UNLCK, 0, 0) {
            log::error!("unlocking the device range at drop failed: {error}");
        }
    }
}

impl UringQueuePair {
    fn drain_at_drop(&mut self) {
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("io_uring drain at drop failed: {e}");
                    return;
                }
            }
            self.unsubmitted = 0;
            while let Some(cqe) = self.ring.completion().next() {
                let index = cqe.user_data() as usize;
                self.slots[index].busy = false;
                self.free.push(index as u32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A file under /var/tmp (a real filesystem, unlike /tmp on some systems), removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, size: u64) -> TempFile {
            let path = PathBuf::from(format!(
                "/var/tmp/carmine-qp-unit-{name}-{}",
                std::process::id()
            ));
            File::create(&path).unwrap().set_len(size).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Opens, or says clearly why this environment cannot run the test.
    fn open_or_skip(file: &TempFile, base: u64, length: u64, depth: u32) -> Option<UringQueuePair> {
        match UringQueuePair::open(&file.0, base, length, depth) {
            Ok(qp) => Some(qp),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                eprintln!("SKIPPED: io_uring/O_DIRECT unavailable here: {e}");
                None
            }
            Err(e) => panic!("open {}: {e}", file.0.display()),
        }
    }

    fn drain(qp: &mut UringQueuePair) -> Vec<(u64, Result<(), IoError>)> {
        let mut done = Vec::new();
        let start = std::time::Instant::now();
        while qp.in_flight() > 0 {
            assert!(start.elapsed().as_secs() < 10, "I/O never completed");
            qp.poll(usize::MAX, &mut |tag, result| done.push((tag, result)));
        }
        done
    }

    #[test]
    fn open_rejects_bad_ranges_and_depths() {
        let file = TempFile::new("bad-ranges", 64 * 4096);
        let cases = [
            (1, 4096, 4),
            (0, 100, 4),
            (0, 0, 4),
            (0, 65 * 4096, 4),
            (0, 4096, 0),
        ];
        for (base, length, depth) in cases {
            let error = UringQueuePair::open(&file.0, base, length, depth).err();
            let kind = error.map(|e| e.kind());
            assert!(
                matches!(
                    kind,
                    Some(io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported)
                ),
                "{base}+{length} depth {depth}: {kind:?}"
            );
        }
    }

    #[test]
    fn partition_offsets_are_relative_to_base() {
        let file = TempFile::new("partition", 16 * 4096);
        let Some(mut qp) = open_or_skip(&file, 8 * 4096, 8 * 4096, 4) else {
            return;
        };
        assert_eq!(qp.capacity_bytes(), 8 * 4096);
        let mut buf = AlignedBuf::new(4096);
        buf.fill(0x5a);
        // SAFETY: drained before `buf` is dropped.
        let vec = unsafe { buf.as_io_vec() };
        qp.submit_write(4096, &[vec], 1).unwrap();
        assert_eq!(
            qp.submit_write(8 * 4096, &[vec], 2),
            Err(SubmitError::OutOfRange)
        );
        qp.submit_flush(3).unwrap();
        let mut done = drain(&mut qp);
        done.sort_by_key(|&(tag, _)| tag);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|(_, result)| result.is_ok()));
        let bytes = std::fs::read(&file.0).unwrap();
        assert!(bytes[9 * 4096..10 * 4096].iter().all(|&b| b == 0x5a));
        assert!(bytes[..9 * 4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn slot_advance_skips_whole_and_partial_iovecs() {
        let mut slot = Slot::idle();
        let mut memory = [0u8; 3 * 4096];
        for (i, iovec) in slot.iovecs.iter_mut().take(2).enumerate() {
            iovec.iov_base = memory[i * 4096..].as_mut_ptr().cast();
            iovec.iov_len = if i == 0 { 4096 } else { 8192 };
        }
        slot.iovec_end = 2;
        slot.remaining = 3 * 4096;
        slot.offset = 100 * 4096;
        slot.advance(4096 + 512);
        assert_eq!(slot.iovec_first, 1);
        assert_eq!(slot.iovecs[1].iov_len, 8192 - 512);
        assert_eq!(slot.offset, 101 * 4096 + 512);
        assert_eq!(slot.remaining, 2 * 4096 - 512);
        let expected = memory[4096 + 512..].as_mut_ptr().cast::<libc::c_void>();
        assert_eq!(slot.iovecs[1].iov_base, expected);
    }
}
