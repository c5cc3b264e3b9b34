//! `NvmeQueuePair`: Carmine's own NVMe driver, one I/O submission/completion queue pair per
//! reactor, driven from user space through VFIO (in the spirit of SPDK's lib/nvme).
//!
//! - `vfio.rs`: container/group/device, BAR0 mapped for MMIO, memory mapped for DMA.
//! - `controller.rs`: `NvmeController`: reset, admin queue, Identify, Set Features (number of
//!   queues), creating, re-creating and deleting I/O queues, Abort. Start-up and error paths
//!   only; behind a mutex, which the poll path only ever try-locks (Aborts).
//! - `abort.rs`: the controller's table of Aborts out, and the timeout policy per command.
//! - `queue.rs`: one SQ/CQ ring pair with its doorbells; completions found by phase tag.
//! - `controller/reset.rs`: the controller reset, a state machine stepped from polls.
//! - `recovery.rs`: the timeout scan (Abort, then reset) and recovery after a reset.
//! - `spec.rs`: register offsets, entry layouts, opcodes, status codes.
//!
//! A request (`submit_read` / `submit_write` / `submit_flush`) takes one request slot; it is
//! cut into commands of at most `transfer_max_bytes` (the controller's MDTS, capped at
//! `COMMAND_TRANSFER_MAX_BYTES`), each with its own command slot (command identifier), PRP
//! list page and bounce buffer, all preallocated in one DMA mapping made at construction.
//! Commands go into the submission queue as slots allow (a request whose commands do not all
//! fit waits in a FIFO, in order); the doorbell is written once per `poll`, not per command.
//! `poll` rings the submission doorbell, reaps completions by phase tag, writes the completion
//! doorbell once, and issues what waited.
//!
//! **Payload and DMA.** A buffer inside a region given to `register_buffers` (mapped once with
//! `VFIO_IOMMU_MAP_DMA`) is used in place: its PRPs are its IOVAs, no copy. Any other buffer
//! goes through the command's bounce buffer (one copy: before a write, after a read), counted
//! by `bounced_commands`. The segment store registers its block pool's two arenas (every 4 KiB
//! block buffer, and the multi-block buffers of its size classes) and its journal's record
//! buffers at mount, so its writes, read runs and cleaner moves move without a copy (only a
//! buffer the pool had to allocate, its classes being exhausted, is bounced).
//!
//! **Errors.** A failed command's NVMe status becomes `IoError::Nvme(status)` for its request
//! (the first failure wins; the request completes when all its commands have). Every
//! `TIMEOUT_SCAN_POLLS` polls with I/O out (or our Abort unanswered), a scan looks at each
//! command: one out longer than `COMMAND_TIMEOUT` gets an Abort (admin queue; the controller
//! may still complete it normally, or complete it as "command abort requested": either way it
//! is reported once, through its completion). The Abort is asynchronous: the scan submits it
//! (if the admin lock is free and no other Abort of ours is out; else the command gets only
//! the grace) and returns; a later scan takes its answer, filed by whoever reaped the admin
//! completion queue (see `abort.rs`). Until then the aborted command's identifier is not
//! reused, so the Abort cannot hit a later command. One still out `COMMAND_TIMEOUT` after its
//! Abort, or a controller reporting fatal status (CSTS.CFS), starts a controller reset, a
//! state machine the queue pairs step from their polls (`controller/reset.rs`): no poll waits
//! for the controller. The reset bumps the generation as it starts; every queue pair sees it
//! at its next poll, rings no doorbell from then on, and once the controller is disabled (it
//! then touches no host memory) takes the completions already posted and fails every other
//! request (`IoError::ControllerReset`, or `TimedOut` for the one that timed out; those
//! submitted during the reset too), each reported exactly once; once the controller is ready
//! again it re-creates its I/O queue and carries on. If the reset fails, every request fails
//! with `IoError::DeviceFailed`. Still waiting, on this error path: re-creating an I/O queue
//! (two admin commands, which a ready controller answers at once) and the Set Features that
//! ends the reset.
//!
//! **Write Zeroes and deallocate** (`submit_write_zeroes`, `submit_deallocate`) are issued when
//! Identify says the controller supports them (ONCS), else refused with
//! `SubmitError::Unsupported`; a deallocate is one Dataset Management range per command, the
//! range in the command's PRP list page.

mod abort;
mod controller;
mod queue;
mod recovery;
pub mod spec;
mod vfio;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use controller::{Identity, NvmeController, ResetPhase, IO_QUEUES_MAX};
pub use spec::NvmeStatus;

use self::abort::AbortTicket;
use self::controller::IoQueueCreated;
use self::queue::Queue;
use self::recovery::queue_over;
use self::spec::{
    CompletionEntry, SubmissionEntry, DSM_ATTRIBUTE_DEALLOCATE, NVM_DATASET_MANAGEMENT, NVM_FLUSH,
    NVM_READ, NVM_WRITE, NVM_WRITE_ZEROES, PAGE_SIZE_BYTES, WRITE_ZEROES_BLOCKS_MAX,
};
use self::vfio::{DmaMapping, DmaMemory};
use super::{
    check_range, check_request, IoError, IoVec, QueuePair, SubmitError, BLOCK_SIZE_BYTES,
    DEPTH_MAX, IOVECS_PER_REQUEST_MAX,
};

/// Largest transfer per command, in bytes. Sizes each command's bounce buffer (depth x 128 KiB
/// of DMA memory) and keeps its PRP list within one page.
pub const COMMAND_TRANSFER_MAX_BYTES: usize = 128 * 1024;

/// Pages one command transfers at most.
const PAGES_PER_COMMAND_MAX: usize = COMMAND_TRANSFER_MAX_BYTES / PAGE_SIZE_BYTES;
const _: () = assert!(PAGES_PER_COMMAND_MAX <= PAGE_SIZE_BYTES / 8 + 1);
const _: () = assert!(BLOCK_SIZE_BYTES == PAGE_SIZE_BYTES);

/// How long a command may be out before it is failed (generous: an emulated controller under
/// TCG is slow, and a real one has its own timeouts well below this).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls between timeout scans while I/O is out: the scan reads the clock and walks every
/// command slot, so it must not run on every poll.
const TIMEOUT_SCAN_POLLS: u32 = 4096;

/// Most regions `register_buffers` takes, a count: the lookup per command scans them.
pub const REGISTERED_REGIONS_MAX: usize = 64;

/// Most bytes one deallocate command covers: keeps a command's length in a `u32`.
const DEALLOCATE_COMMAND_MAX_BYTES: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Deallocate,
}

const IOVEC_NONE: IoVec = IoVec {
    ptr: core::ptr::null_mut(),
    len: 0,
};

/// A request slot, preallocated.
struct Request {
    busy: bool,
    kind: Kind,
    tag: u64,
    /// Absolute device byte offset of the request's first byte.
    device_offset: u64,
    length: u64,
    /// Bytes handed to commands so far.
    issued: u64,
    /// Commands issued and not completed.
    outstanding: u32,
    /// Its outcome is settled and it waits in `ready` to be reported.
    settled: bool,
    error: Option<IoError>,
    iovecs: [IoVec; IOVECS_PER_REQUEST_MAX],
    iovec_count: usize,
}

/// A command slot; its index is the NVMe command identifier, its PRP list page and bounce
/// buffer are at fixed places in the queue pair's DMA memory.
#[derive(Clone, Copy)]
struct Command {
    busy: bool,
    request: u32,
    /// Byte offset of this command's data inside its request.
    request_offset: u64,
    length: u32,
    bounced: bool,
    /// Set by the first timeout scan that sees the command.
    deadline: Option<Instant>,
    /// An Abort was sent for it; past the new deadline the controller is reset.
    abort_sent: bool,
}

/// The one Abort a queue pair may have out (see `abort.rs`).
#[derive(Clone, Copy)]
struct PendingAbort {
    ticket: AbortTicket,
    /// The command it aborts. Its slot is not reused until the Abort is answered (an Abort
    /// for a completed command must not hit the next command given that identifier).
    command_id: u16,
    /// The command completed first: its slot waits here, out of `free_commands`.
    holds_slot: bool,
}

const COMMAND_IDLE: Command = Command {
    busy: false,
    request: 0,
    request_offset: 0,
    length: 0,
    bounced: false,
    deadline: None,
    abort_sent: false,
};

/// One I/O queue pair on an NVMe namespace; see the module docs.
pub struct NvmeQueuePair {
    queue: Queue,
    requests: Box<[Request]>,
    commands: Box<[Command]>,
    /// Idle request slots (a stack).
    free_requests: Vec<u32>,
    /// Idle command slots (a stack).
    free_commands: Vec<u16>,
    /// Requests with commands still to issue, in submission order; capacity `depth`.
    waiting: VecDeque<u32>,
    /// Requests whose outcome is settled outside a completion (reset, failed controller),
    /// to be reported by `poll`; capacity `depth`.
    ready: VecDeque<u32>,
    in_flight: u32,
    /// The controller generation our I/O queue exists in (see `NvmeController::reset`).
    generation: u64,
    /// The controller failed: every request fails with `DeviceFailed`.
    failed: bool,
    /// During a reset: our queue's completions were taken (its memory is not read again
    /// until the queue is re-created).
    queue_settled: bool,
    /// Registered caller regions (zero copy).
    registered: Vec<DmaMapping>,
    lba_shift: u32,
    nsid: u32,
    transfer_max_bytes: usize,
    offset_base: u64,
    length: u64,
    depth: u32,
    polls_since_scan: u32,
    command_timeout: Duration,
    /// How long a command may stay out after its Abort before the controller is reset.
    abort_timeout: Duration,
    /// Our Abort out on the admin queue, if any: answered at a later timeout scan.
    abort: Option<PendingAbort>,
    scan_interval_polls: u32,
    bounced_commands: u64,
    zero_copy_commands: u64,
    aborts_sent: u64,
    aborts_answered: u64,
    resets_recovered: u64,
    // Cold: set up once.
    /// SQ, CQ, then one PRP list page per command, then one bounce buffer per command.
    memory: DmaMemory,
    prp_lists_offset: usize,
    bounces_offset: usize,
    /// Bytes of the submission queue (the completion queue follows it).
    sq_bytes: usize,
    entries: u16,
    qid: u16,
    controller: Arc<NvmeController>,
}

// SAFETY: the raw pointers an `NvmeQueuePair` holds are into its own DMA memory, into the BAR
// its `controller` (an `Arc` it holds) keeps mapped, or the caller's submitted buffers, which
// `IoVec::new`'s contract makes valid from the polling thread. Nothing is tied to a thread.
unsafe impl Send for NvmeQueuePair {}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn round_up_page(bytes: usize) -> usize {
    bytes.div_ceil(PAGE_SIZE_BYTES) * PAGE_SIZE_BYTES
}

impl NvmeQueuePair {
    /// Opens the controller at `pci_address` and one queue pair of `depth` over the whole of
    /// namespace 1 (rounded down to 4 KiB).
    pub fn open(pci_address: &str, depth: u32) -> io::Result<NvmeQueuePair> {
        let controller = NvmeController::open(pci_address)?;
        let capacity = controller.identity().capacity_bytes() / BLOCK_SIZE_BYTES as u64
            * BLOCK_SIZE_BYTES as u64;
        NvmeQueuePair::new(&controller, 0, capacity, depth)
    }

    /// Creates an I/O queue pair of `depth` requests on `controller` for the namespace bytes
    /// `offset_base..offset_base + length` (one reactor's partition).
    ///
    /// Errors: InvalidInput for a misaligned, empty or too-long range or a depth outside
    /// `1..=min(DEPTH_MAX, queue entries - 1)`; the admin command's error otherwise.
    pub fn new(
        controller: &Arc<NvmeController>,
        offset_base: u64,
        length: u64,
        depth: u32,
    ) -> io::Result<NvmeQueuePair> {
        let block = BLOCK_SIZE_BYTES as u64;
        let identity = controller.identity();
        if offset_base % block != 0 || length % block != 0 || length == 0 {
            return Err(invalid_input(format!(
                "range {offset_base}+{length} is not a nonempty range of 4096-byte blocks"
            )));
        }
        let fits = matches!(offset_base.checked_add(length), Some(end) if end <= identity.capacity_bytes());
        if !fits {
            return Err(invalid_input(format!(
                "range {offset_base}+{length} ends past namespace {}'s {} bytes",
                identity.nsid,
                identity.capacity_bytes()
            )));
        }
        let depth_max = DEPTH_MAX.min(controller.queue_entries_max() - 1);
        if !(1..=depth_max).contains(&depth) {
            return Err(invalid_input(format!(
                "depth {depth} not in 1..={depth_max} (the controller's queues hold {} entries)",
                controller.queue_entries_max()
            )));
        }
        let entries = depth as usize + 1;
        let transfer_max_bytes = (identity.transfer_max_bytes as usize)
            .min(COMMAND_TRANSFER_MAX_BYTES)
            / PAGE_SIZE_BYTES
            * PAGE_SIZE_BYTES;
        assert!(transfer_max_bytes >= PAGE_SIZE_BYTES);
        let sq_bytes = round_up_page(entries * core::mem::size_of::<SubmissionEntry>());
        let cq_bytes = round_up_page(entries * core::mem::size_of::<CompletionEntry>());
        let prp_lists_offset = sq_bytes + cq_bytes;
        let bounces_offset = prp_lists_offset + depth as usize * PAGE_SIZE_BYTES;
        let mut total = bounces_offset + depth as usize * transfer_max_bytes;
        if total > vfio::HUGE_PAGE_SIZE_BYTES / 2 {
            total = total.div_ceil(vfio::HUGE_PAGE_SIZE_BYTES) * vfio::HUGE_PAGE_SIZE_BYTES;
        }
        let memory = DmaMemory::new(controller.vfio(), total)?;
        let created = controller.create_io_queue(
            entries as u16,
            memory.iova(),
            memory.iova() + sq_bytes as u64,
        )?;
        // SAFETY: SQ and CQ lie in `memory` (zeroed, DMA mapped, owned by the queue pair and
        // dropped after the queue is deleted), sized for `entries`; the doorbells are in the
        // BAR `controller` keeps mapped while we hold it.
        let queue = unsafe { queue_over(&memory, sq_bytes, entries as u16, &created) };
        let IoQueueCreated {
            qid, generation, ..
        } = created;
        let requests = (0..depth)
            .map(|_| Request {
                busy: false,
                kind: Kind::Flush,
                tag: 0,
                device_offset: 0,
                length: 0,
                issued: 0,
                outstanding: 0,
                settled: false,
                error: None,
                iovecs: [IOVEC_NONE; IOVECS_PER_REQUEST_MAX],
                iovec_count: 0,
            })
            .collect();
        log::info!(
            "nvme {}: I/O queue {qid}, depth {depth}, {} bytes at {offset_base}, {} KiB DMA memory{}",
            controller.pci_address(),
            length,
            total >> 10,
            if memory.is_huge() { " (hugepages)" } else { "" }
        );
        Ok(NvmeQueuePair {
            queue,
            requests,
            commands: vec![COMMAND_IDLE; depth as usize].into_boxed_slice(),
            free_requests: (0..depth).rev().collect(),
            free_commands: (0..depth as u16).rev().collect(),
            waiting: VecDeque::with_capacity(depth as usize),
            ready: VecDeque::with_capacity(depth as usize),
            in_flight: 0,
            generation,
            failed: false,
            queue_settled: false,
            registered: Vec::with_capacity(REGISTERED_REGIONS_MAX),
            lba_shift: identity.lba_size_bytes.trailing_zeros(),
            nsid: identity.nsid,
            transfer_max_bytes,
            offset_base,
            length,
            depth,
            polls_since_scan: 0,
            command_timeout: COMMAND_TIMEOUT,
            abort_timeout: COMMAND_TIMEOUT,
            abort: None,
            scan_interval_polls: TIMEOUT_SCAN_POLLS,
            bounced_commands: 0,
            zero_copy_commands: 0,
            aborts_sent: 0,
            aborts_answered: 0,
            resets_recovered: 0,
            memory,
            prp_lists_offset,
            bounces_offset,
            sq_bytes,
            entries: entries as u16,
            qid,
            controller: Arc::clone(controller),
        })
    }

    pub fn controller(&self) -> &Arc<NvmeController> {
        &self.controller
    }

    /// Commands whose data went through a bounce buffer (one copy each).
    pub fn bounced_commands(&self) -> u64 {
        self.bounced_commands
    }

    /// Commands whose data the device accessed in place (registered regions).
    pub fn zero_copy_commands(&self) -> u64 {
        self.zero_copy_commands
    }

    /// Abort commands sent for commands past their timeout.
    pub fn aborts_sent(&self) -> u64 {
        self.aborts_sent
    }

    /// Aborts whose answer (or loss to a reset) this queue pair has taken.
    pub fn aborts_answered(&self) -> u64 {
        self.aborts_answered
    }

    /// Whether an Abort this queue pair sent is still unanswered: the poll that sent it
    /// returned without waiting for it.
    pub fn abort_in_flight(&self) -> bool {
        self.abort.is_some()
    }

    /// Idle command slots: all of them (`depth`) when nothing is out and no Abort holds one.
    #[doc(hidden)]
    pub fn idle_commands_for_tests(&self) -> usize {
        self.free_commands.len()
    }

    /// Controller resets this queue pair failed its requests for and re-created its queue.
    pub fn resets_recovered(&self) -> u64 {
        self.resets_recovered
    }

    /// Sets how long a command may be out before it is aborted (and as long again before the
    /// controller is reset); below one second the timeout scan runs on every poll. For tests
    /// that drive the abort and reset paths on a controller that does not hang on its own.
    #[doc(hidden)]
    pub fn set_command_timeout_for_tests(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
        self.abort_timeout = timeout;
        self.scan_interval_polls = if timeout < Duration::from_secs(1) {
            1
        } else {
            TIMEOUT_SCAN_POLLS
        };
    }

    /// Sets how long a command may stay out after its Abort before the controller is reset
    /// (after `set_command_timeout_for_tests`, which sets both), so that tests can watch an
    /// Abort be answered while polling goes on.
    #[doc(hidden)]
    pub fn set_abort_timeout_for_tests(&mut self, timeout: Duration) {
        self.abort_timeout = timeout;
    }

    /// Maps caller memory for the device once, replacing earlier registrations, so that
    /// requests whose buffers lie inside a region need no bounce copy.
    ///
    /// Errors: InvalidInput with requests in flight, more than `REGISTERED_REGIONS_MAX`
    /// regions, or a region that is empty or not 4 KiB aligned in address and length; the
    /// VFIO error if the kernel refuses the mapping. On error nothing is registered.
    ///
    /// # Safety
    /// Every region stays allocated at the same address until the queue pair is dropped or
    /// `register_buffers` is called again: the kernel pins its pages now, and the device
    /// reads and writes those pages for requests whose buffers lie in them.
    pub unsafe fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> io::Result<()> {
        if self.in_flight > 0 {
            return Err(invalid_input("register_buffers with I/O in flight".into()));
        }
        let block = BLOCK_SIZE_BYTES;
        let valid = |&(ptr, len): &(*mut u8, usize)| {
            len > 0 && len % block == 0 && ptr as usize % block == 0
        };
        if regions.len() > REGISTERED_REGIONS_MAX || !regions.iter().all(valid) {
            return Err(invalid_input(format!(
                "at most {REGISTERED_REGIONS_MAX} nonempty regions, 4096-byte aligned"
            )));
        }
        self.registered.clear();
        for &(ptr, len) in regions {
            // SAFETY: the region stays valid while registered (our caller's contract), and
            // the mapping is dropped when it is unregistered or the queue pair drops.
            match unsafe { self.controller.vfio().map_dma(ptr, len) } {
                Ok(mapping) => self.registered.push(mapping),
                Err(e) => {
                    self.registered.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Lets requests address `length` bytes whatever the namespace holds, so that tests can
    /// make the device itself refuse an LBA past its end. Not for production use.
    #[doc(hidden)]
    pub fn widen_capacity_for_tests(&mut self, length: u64) {
        self.length = length;
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
            Kind::WriteZeroes | Kind::Deallocate => unreachable!("submit_range"),
        };
        self.queue_request(kind, offset, length, buffers, tag)
    }

    /// Write Zeroes or deallocate of `offset..offset + length`, if the controller has it.
    fn submit_range(
        &mut self,
        kind: Kind,
        offset: u64,
        length: u64,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let identity = self.controller.identity();
        let supported = match kind {
            Kind::WriteZeroes => identity.write_zeroes,
            Kind::Deallocate => identity.deallocate,
            _ => unreachable!("submit"),
        };
        if !supported {
            return Err(SubmitError::Unsupported);
        }
        check_range(offset, length, self.length)?;
        self.queue_request(kind, offset, length, &[], tag)
    }

    fn queue_request(
        &mut self,
        kind: Kind,
        offset: u64,
        length: u64,
        buffers: &[IoVec],
        tag: u64,
    ) -> Result<(), SubmitError> {
        let index = self.free_requests.pop().ok_or(SubmitError::QueueFull)?;
        let request = &mut self.requests[index as usize];
        debug_assert!(!request.busy);
        request.busy = true;
        request.kind = kind;
        request.tag = tag;
        request.device_offset = self.offset_base + offset;
        request.length = length;
        request.issued = 0;
        request.outstanding = 0;
        request.settled = false;
        request.error = None;
        request.iovecs[..buffers.len()].copy_from_slice(buffers);
        request.iovec_count = buffers.len();
        self.in_flight += 1;
        if self.failed {
            // Accepted, and failed at the next poll: the caller hears of it like any I/O error.
            request.error = Some(IoError::DeviceFailed);
            request.issued = length;
            request.settled = true;
            self.ready.push_back(index);
            return Ok(());
        }
        // Capacity `depth` and at most `depth` requests busy: never grows.
        debug_assert!(self.waiting.len() < self.depth as usize);
        self.waiting.push_back(index);
        self.issue_waiting();
        Ok(())
    }

    /// Issues commands for waiting requests, in order, while command slots are free.
    fn issue_waiting(&mut self) {
        while let Some(&index) = self.waiting.front() {
            let Some(command) = self.free_commands.pop() else {
                return;
            };
            if self.issue_command(index, command) {
                self.waiting.pop_front();
            }
        }
    }

    /// Issues request `index`'s next command in slot `command`. Returns whether that was
    /// its last.
    fn issue_command(&mut self, index: u32, command: u16) -> bool {
        let request = &mut self.requests[index as usize];
        let (opcode, chunk) = match request.kind {
            Kind::Flush => (NVM_FLUSH, 0),
            Kind::Read => (NVM_READ, self.transfer_max_bytes as u64),
            Kind::Write => (NVM_WRITE, self.transfer_max_bytes as u64),
            Kind::WriteZeroes => (NVM_WRITE_ZEROES, WRITE_ZEROES_BLOCKS_MAX << self.lba_shift),
            Kind::Deallocate => (NVM_DATASET_MANAGEMENT, DEALLOCATE_COMMAND_MAX_BYTES),
        };
        let chunk = chunk.min(request.length - request.issued);
        let request_offset = request.issued;
        let device_offset = request.device_offset + request_offset;
        request.issued += chunk;
        request.outstanding += 1;
        let last = request.issued == request.length;
        let kind = request.kind;
        let mut entry = SubmissionEntry::new(opcode, self.nsid);
        entry.set_command_id(command);
        let mut bounced = false;
        let lba = device_offset >> self.lba_shift;
        let blocks = chunk >> self.lba_shift;
        if kind == Kind::WriteZeroes {
            entry.cdw10 = lba as u32;
            entry.cdw11 = (lba >> 32) as u32;
            // Zero-based block count; at most WRITE_ZEROES_BLOCKS_MAX blocks (chunk above).
            entry.cdw12 = (blocks - 1) as u32;
        } else if kind == Kind::Deallocate {
            let list_offset = self.prp_lists_offset + usize::from(command) * PAGE_SIZE_BYTES;
            let range: [u32; 4] = [0, blocks as u32, lba as u32, (lba >> 32) as u32];
            // SAFETY: the command's PRP list page lies in our DMA memory; the device reads it
            // only for this command, which is not yet submitted. 16 bytes of a 4 KiB page.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    range.as_ptr(),
                    self.memory.ptr().add(list_offset).cast::<u32>(),
                    range.len(),
                )
            };
            entry.prp1 = self.memory.iova() + list_offset as u64;
            entry.cdw10 = 0; // One range (zero-based count).
            entry.cdw11 = DSM_ATTRIBUTE_DEALLOCATE;
        } else if chunk > 0 {
            bounced = self.set_prps(index, command, request_offset, chunk as usize, &mut entry);
            entry.cdw10 = lba as u32;
            entry.cdw11 = (lba >> 32) as u32;
            // Zero-based block count; at most 128 KiB / 512 B = 256 blocks.
            entry.cdw12 = (blocks - 1) as u32;
            if bounced && kind == Kind::Write {
                self.copy_bounce(index, command, request_offset, chunk as usize, true);
            }
            if bounced {
                self.bounced_commands += 1;
            } else {
                self.zero_copy_commands += 1;
            }
        }
        let slot = &mut self.commands[usize::from(command)];
        debug_assert!(!slot.busy);
        *slot = Command {
            busy: true,
            request: index,
            request_offset,
            length: chunk as u32,
            bounced,
            deadline: None,
            abort_sent: false,
        };
        self.queue.push(&entry);
        last
    }

    /// The contiguous pieces of request `index`'s buffers covering `start..start + length`
    /// of its data, as (address, length), passed to `visit` in order.
    fn for_each_piece(
        &self,
        index: u32,
        start: u64,
        length: usize,
        mut visit: impl FnMut(*mut u8, usize),
    ) {
        let request = &self.requests[index as usize];
        let (mut position, end) = (0u64, start + length as u64);
        for iovec in &request.iovecs[..request.iovec_count] {
            let (piece_start, piece_end) = (position, position + iovec.len as u64);
            position = piece_end;
            if piece_end <= start {
                continue;
            }
            if piece_start >= end {
                break;
            }
            let from = start.max(piece_start) - piece_start;
            let to = end.min(piece_end) - piece_start;
            // SAFETY: `from <= iovec.len`: the result is inside the caller's buffer.
            let ptr = unsafe { iovec.ptr.add(from as usize) };
            visit(ptr, (to - from) as usize);
        }
    }

    /// Fills the command's PRP entries (and PRP list page) for `length` bytes at `start` of
    /// request `index`. Returns whether the data goes through the bounce buffer.
    fn set_prps(
        &mut self,
        index: u32,
        command: u16,
        start: u64,
        length: usize,
        entry: &mut SubmissionEntry,
    ) -> bool {
        let mut pages = [0u64; PAGES_PER_COMMAND_MAX];
        let mut count = 0usize;
        let mut in_place = true;
        self.for_each_piece(index, start, length, |ptr, len| {
            let iova = self
                .registered
                .iter()
                .find_map(|mapping| mapping.translate(ptr as usize, len));
            match iova {
                Some(iova) if in_place => {
                    for page in 0..len / PAGE_SIZE_BYTES {
                        pages[count] = iova + (page * PAGE_SIZE_BYTES) as u64;
                        count += 1;
                    }
                }
                _ => in_place = false,
            }
        });
        if !in_place {
            let bounce = self.memory.iova()
                + (self.bounces_offset + usize::from(command) * self.transfer_max_bytes) as u64;
            count = length / PAGE_SIZE_BYTES;
            for (page, slot) in pages[..count].iter_mut().enumerate() {
                *slot = bounce + (page * PAGE_SIZE_BYTES) as u64;
            }
        }
        debug_assert_eq!(count, length / PAGE_SIZE_BYTES);
        entry.prp1 = pages[0];
        entry.prp2 = match count {
            1 => 0,
            2 => pages[1],
            _ => {
                let list_offset = self.prp_lists_offset + usize::from(command) * PAGE_SIZE_BYTES;
                // SAFETY: the command's PRP list page lies in our DMA memory; the device reads
                // it only for this command, which is not yet submitted. At most 31 entries.
                let list = unsafe {
                    core::slice::from_raw_parts_mut(
                        self.memory.ptr().add(list_offset).cast::<u64>(),
                        count - 1,
                    )
                };
                list.copy_from_slice(&pages[1..count]);
                self.memory.iova() + list_offset as u64
            }
        };
        !in_place
    }

    /// Copies between the command's bounce buffer and the request's buffers: into the bounce
    /// buffer before a write (`to_device`), out of it after a read.
    fn copy_bounce(&self, index: u32, command: u16, start: u64, length: usize, to_device: bool) {
        let offset = self.bounces_offset + usize::from(command) * self.transfer_max_bytes;
        // SAFETY: the command's bounce buffer lies in our DMA memory.
        let mut bounce = unsafe { self.memory.ptr().add(offset) };
        self.for_each_piece(index, start, length, |ptr, len| {
            // SAFETY: `ptr..ptr + len` is the caller's buffer (valid for this access by the
            // IoVec contract); the bounce buffer has room for the command's `length` bytes;
            // the two never overlap (ours is DMA memory the caller never sees).
            unsafe {
                if to_device {
                    core::ptr::copy_nonoverlapping(ptr, bounce, len);
                } else {
                    core::ptr::copy_nonoverlapping(bounce, ptr, len);
                }
                bounce = bounce.add(len);
            }
        });
    }

    /// Accounts a completed command. Returns its request if this was the request's last.
    fn complete_command(&mut self, done: &CompletionEntry) -> Option<u32> {
        let command_id = done.command_id;
        // A completion for an idle slot would finish someone else's request: keep in release.
        assert!(
            usize::from(command_id) < self.commands.len()
                && self.commands[usize::from(command_id)].busy,
            "NVMe completion for idle command {command_id} on queue {}",
            self.qid
        );
        let command = self.commands[usize::from(command_id)];
        self.commands[usize::from(command_id)].busy = false;
        match &mut self.abort {
            // Kept out of use until its Abort is answered (`take_abort_answer`).
            Some(abort) if abort.command_id == command_id => abort.holds_slot = true,
            _ => self.free_commands.push(command_id),
        }
        if command.abort_sent {
            log::warn!(
                "nvme {} queue {}: command {command_id} completed after an abort was sent ({})",
                self.controller.pci_address(),
                self.qid,
                done.nvme_status()
            );
        }
        let status = done.nvme_status();
        let index = command.request;
        if status.is_success() {
            if command.bounced && self.requests[index as usize].kind == Kind::Read {
                let length = command.length as usize;
                self.copy_bounce(index, command_id, command.request_offset, length, false);
            }
        } else {
            let request = &mut self.requests[index as usize];
            log::error!(
                "nvme {} queue {}: {:?} at byte {}: {status}",
                self.controller.pci_address(),
                self.qid,
                request.kind,
                request.device_offset + command.request_offset
            );
            request.error.get_or_insert(IoError::Nvme(status));
        }
        self.command_done(index)
    }

    /// One of request `index`'s commands is done: returns the request if it was the last.
    fn command_done(&mut self, index: u32) -> Option<u32> {
        let request = &mut self.requests[index as usize];
        debug_assert!(request.busy && request.outstanding > 0);
        request.outstanding -= 1;
        if request.outstanding > 0 || request.issued < request.length {
            return None;
        }
        Some(index)
    }

    /// Frees request `index` (all its commands done) and returns its tag and outcome.
    fn finish_request(&mut self, index: u32) -> (u64, Result<(), IoError>) {
        let request = &mut self.requests[index as usize];
        debug_assert!(request.busy && request.outstanding == 0 && request.issued == request.length);
        request.busy = false;
        request.settled = false;
        let result = request.error.map_or(Ok(()), Err);
        let tag = request.tag;
        self.free_requests.push(index);
        self.in_flight -= 1;
        (tag, result)
    }
}

impl QueuePair for NvmeQueuePair {
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

    fn submit_write_zeroes(
        &mut self,
        offset: u64,
        length: u64,
        tag: u64,
    ) -> Result<(), SubmitError> {
        self.submit_range(Kind::WriteZeroes, offset, length, tag)
    }

    fn submit_deallocate(&mut self, offset: u64, length: u64, tag: u64) -> Result<(), SubmitError> {
        self.submit_range(Kind::Deallocate, offset, length, tag)
    }

    unsafe fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> io::Result<bool> {
        // SAFETY: the trait's contract is the inherent method's.
        unsafe { NvmeQueuePair::register_buffers(self, regions) }.map(|()| true)
    }

    fn submit_queued(&mut self) {
        // After a reset elsewhere our queue is gone until `poll` re-creates it: no doorbell.
        if self.controller.generation() == self.generation {
            self.queue.ring_submissions();
        }
    }

    fn poll(
        &mut self,
        completions_max: usize,
        complete: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        // One shared, rarely written cache line: the controller was reset (by another queue
        // pair, or by an operator) since our queue was created.
        if self.controller.generation() != self.generation && !self.failed && !self.recover() {
            // A reset is under way (or failed): our queue does not exist; report what is
            // settled and keep out of it.
            return self.report_ready(completions_max, complete);
        }
        let mut reported = 0;
        if !self.ready.is_empty() {
            reported += self.report_ready(completions_max, complete);
        }
        if self.failed {
            return reported;
        }
        // Everything submitted since the last poll goes to the device with one doorbell write.
        self.queue.ring_submissions();
        while reported < completions_max {
            let Some(done) = self.queue.next_completion() else {
                break;
            };
            if let Some(index) = self.complete_command(&done) {
                let (tag, result) = self.finish_request(index);
                complete(tag, result);
                reported += 1;
            }
        }
        self.queue.ring_completions();
        if !self.waiting.is_empty() {
            self.issue_waiting();
            self.queue.ring_submissions();
        }
        // An unanswered Abort is looked at by the scan too, even with nothing else out.
        if self.in_flight > 0 || self.abort.is_some() {
            self.polls_since_scan += 1;
            if self.polls_since_scan >= self.scan_interval_polls {
                self.polls_since_scan = 0;
                self.scan_timeouts();
                reported += self.report_ready(completions_max - reported, complete);
            }
        }
        reported
    }

    fn capacity_bytes(&self) -> u64 {
        self.length
    }

    fn depth(&self) -> u32 {
        self.depth
    }

    fn in_flight(&self) -> u32 {
        self.in_flight
    }
}

impl Drop for NvmeQueuePair {
    fn drop(&mut self) {
        if let Some(abort) = self.abort.take() {
            self.controller.forget_abort(abort.ticket);
        }
        // A reset under way: until the controller is disabled it may still write our memory
        // (and the caller's), which must stay mapped until then. Bounded: the reset fails
        // past CAP.TO.
        while self.controller.reset_phase() == ResetPhase::Disabling {
            self.controller.step_reset();
            std::thread::sleep(Duration::from_millis(1));
        }
        // Delete the queue first: the controller then no longer touches its memory (or the
        // caller's), which the fields' drop unmaps and frees afterwards.
        if let Err(e) = self.controller.delete_io_queue(self.qid, self.generation) {
            log::error!(
                "nvme {}: deleting I/O queue {}: {e}",
                self.controller.pci_address(),
                self.qid
            );
        }
    }
}
