//! `NvmeQueuePair`: Carmine's own NVMe driver, one I/O submission/completion queue pair per
//! reactor, driven from user space through VFIO (in the spirit of SPDK's lib/nvme).
//!
//! - `vfio.rs`: container/group/device, BAR0 mapped for MMIO, memory mapped for DMA.
//! - `controller.rs`: `NvmeController`: reset, admin queue, Identify, Set Features (number of
//!   queues), creating and deleting I/O queues. Start-up only; behind a mutex.
//! - `queue.rs`: one SQ/CQ ring pair with its doorbells; completions found by phase tag.
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
//! goes through the command's bounce buffer (one copy: before a write, after a read); the
//! segment store does not register its block pool yet, so today its payload is copied once
//! here (`bounced_commands` counts it).
//!
//! **Errors.** A failed command's NVMe status becomes `IoError::Nvme(status)` for its request
//! (the first failure wins; the request completes when all its commands have). A command
//! still out `COMMAND_TIMEOUT` after it was first seen by the timeout scan fails its request
//! with `IoError::TimedOut` if the device holds none of the caller's memory (bounced or a
//! flush); its command slot stays reserved until the late completion arrives. A timed-out
//! zero-copy command is reported only when it completes (the device could still write the
//! caller's buffer), with an error log. Not built yet: Abort, controller reset on fatal
//! status (CSTS.CFS is logged by the scan), write-zeroes and dataset management.

mod controller;
mod queue;
pub mod spec;
mod vfio;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use controller::{Identity, NvmeController, IO_QUEUES_MAX};
pub use spec::NvmeStatus;

use self::queue::Queue;
use self::spec::{
    CompletionEntry, SubmissionEntry, NVM_FLUSH, NVM_READ, NVM_WRITE, PAGE_SIZE_BYTES,
};
use self::vfio::{DmaMapping, DmaMemory};
use super::{
    check_request, IoError, IoVec, QueuePair, SubmitError, BLOCK_SIZE_BYTES, DEPTH_MAX,
    IOVECS_PER_REQUEST_MAX,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
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
    /// Failed by timeout and detached from its request; the slot waits for the completion.
    abandoned: bool,
}

const COMMAND_IDLE: Command = Command {
    busy: false,
    request: 0,
    request_offset: 0,
    length: 0,
    bounced: false,
    deadline: None,
    abandoned: false,
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
    in_flight: u32,
    /// Registered caller regions (zero copy).
    registered: Vec<DmaMapping>,
    lba_shift: u32,
    nsid: u32,
    transfer_max_bytes: usize,
    offset_base: u64,
    length: u64,
    depth: u32,
    polls_since_scan: u32,
    bounced_commands: u64,
    zero_copy_commands: u64,
    // Cold: set up once.
    /// SQ, CQ, then one PRP list page per command, then one bounce buffer per command.
    memory: DmaMemory,
    prp_lists_offset: usize,
    bounces_offset: usize,
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
        let (qid, sq_doorbell, cq_doorbell) = controller.create_io_queue(
            entries as u16,
            memory.iova(),
            memory.iova() + sq_bytes as u64,
        )?;
        // SAFETY: SQ and CQ lie in `memory` (zeroed, DMA mapped, owned by the queue pair and
        // dropped after the queue is deleted); the doorbells are in the BAR `controller` keeps
        // mapped while we hold it.
        let queue = unsafe {
            Queue::new(
                memory.ptr().cast(),
                memory.ptr().add(sq_bytes).cast(),
                entries as u16,
                sq_doorbell,
                cq_doorbell,
            )
        };
        let requests = (0..depth)
            .map(|_| Request {
                busy: false,
                kind: Kind::Flush,
                tag: 0,
                device_offset: 0,
                length: 0,
                issued: 0,
                outstanding: 0,
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
            in_flight: 0,
            registered: Vec::with_capacity(REGISTERED_REGIONS_MAX),
            lba_shift: identity.lba_size_bytes.trailing_zeros(),
            nsid: identity.nsid,
            transfer_max_bytes,
            offset_base,
            length,
            depth,
            polls_since_scan: 0,
            bounced_commands: 0,
            zero_copy_commands: 0,
            memory,
            prp_lists_offset,
            bounces_offset,
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
        };
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
        request.error = None;
        request.iovecs[..buffers.len()].copy_from_slice(buffers);
        request.iovec_count = buffers.len();
        self.in_flight += 1;
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
        if chunk > 0 {
            bounced = self.set_prps(index, command, request_offset, chunk as usize, &mut entry);
            let lba = device_offset >> self.lba_shift;
            entry.cdw10 = lba as u32;
            entry.cdw11 = (lba >> 32) as u32;
            // Zero-based block count; at most 128 KiB / 512 B = 256 blocks.
            entry.cdw12 = ((chunk >> self.lba_shift) - 1) as u32;
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
            abandoned: false,
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

    /// Accounts a completed command. Returns the request's completion if this was its last.
    fn complete_command(&mut self, done: &CompletionEntry) -> Option<(u64, Result<(), IoError>)> {
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
        self.free_commands.push(command_id);
        if command.abandoned {
            log::warn!(
                "nvme {} queue {}: command {command_id} completed after its timeout ({})",
                self.controller.pci_address(),
                self.qid,
                done.nvme_status()
            );
            return None;
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

    /// One of request `index`'s commands is done: completes the request if it was the last.
    fn command_done(&mut self, index: u32) -> Option<(u64, Result<(), IoError>)> {
        let request = &mut self.requests[index as usize];
        debug_assert!(request.busy && request.outstanding > 0);
        request.outstanding -= 1;
        if request.outstanding > 0 || request.issued < request.length {
            return None;
        }
        request.busy = false;
        let result = request.error.map_or(Ok(()), Err);
        let tag = request.tag;
        self.free_requests.push(index);
        self.in_flight -= 1;
        Some((tag, result))
    }

    /// Fails commands out past `COMMAND_TIMEOUT` whose request can be completed safely;
    /// reports at most `completions_max`.
    fn scan_timeouts(
        &mut self,
        completions_max: usize,
        complete: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        if self.controller.fatal() {
            log::error!(
                "nvme {}: controller fatal status (CSTS.CFS): reset is not implemented yet",
                self.controller.pci_address()
            );
        }
        let now = Instant::now();
        let mut reported = 0;
        for command_id in 0..self.commands.len() {
            let command = self.commands[command_id];
            if !command.busy || command.abandoned {
                continue;
            }
            let Some(deadline) = command.deadline else {
                self.commands[command_id].deadline = Some(now + COMMAND_TIMEOUT);
                continue;
            };
            if now < deadline || reported == completions_max {
                continue;
            }
            // The device may still write a zero-copy read's buffer: only a command that holds
            // none of the caller's memory may be failed before it completes.
            let holds_caller_memory = command.length > 0 && !command.bounced;
            log::error!(
                "nvme {} queue {}: command {command_id} out for over {COMMAND_TIMEOUT:?}{}",
                self.controller.pci_address(),
                self.qid,
                if holds_caller_memory {
                    "; it uses the caller's memory, so it waits for the device"
                } else {
                    "; failing its request"
                }
            );
            if holds_caller_memory {
                self.commands[command_id].deadline = Some(now + COMMAND_TIMEOUT);
                continue;
            }
            self.commands[command_id].abandoned = true;
            let index = command.request;
            self.requests[index as usize]
                .error
                .get_or_insert(IoError::TimedOut);
            if let Some((tag, result)) = self.command_done(index) {
                complete(tag, result);
                reported += 1;
            }
        }
        reported
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

    fn submit_queued(&mut self) {
        self.queue.ring_submissions();
    }

    fn poll(
        &mut self,
        completions_max: usize,
        complete: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        // Everything submitted since the last poll goes to the device with one doorbell write.
        self.queue.ring_submissions();
        let mut reported = 0;
        while reported < completions_max {
            let Some(done) = self.queue.next_completion() else {
                break;
            };
            if let Some((tag, result)) = self.complete_command(&done) {
                complete(tag, result);
                reported += 1;
            }
        }
        self.queue.ring_completions();
        if !self.waiting.is_empty() {
            self.issue_waiting();
            self.queue.ring_submissions();
        }
        if self.in_flight > 0 {
            self.polls_since_scan += 1;
            if self.polls_since_scan >= TIMEOUT_SCAN_POLLS {
                self.polls_since_scan = 0;
                reported += self.scan_timeouts(completions_max - reported, complete);
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
        // Delete the queue first: the controller then no longer touches its memory (or the
        // caller's), which the fields' drop unmaps and frees afterwards.
        if let Err(e) = self.controller.delete_io_queue(self.qid) {
            log::error!(
                "nvme {}: deleting I/O queue {}: {e}",
                self.controller.pci_address(),
                self.qid
            );
        }
    }
}
