//! `NvmeController`: one NVMe controller through VFIO. Resets and enables it, owns the admin
//! queue (start-up, queue creation and error recovery only, behind a mutex: never on the
//! normal I/O path), and creates the I/O queue pairs (`NvmeQueuePair`), one per reactor.
//!
//! **Reset and recovery** (`reset.rs`): a reset disables the controller (CC.EN = 0; once
//! CSTS.RDY = 0 it touches no host memory and every I/O queue is gone), re-creates the admin
//! queue and enables it again; it bumps `generation` as it starts. It is a state machine the
//! queue pairs step from their polls (`start_reset`, `step_reset`: try-lock, no wait; `reset`
//! is the blocking form for tests and operators). Each queue pair compares the generation on
//! every poll; on a change it fails what it had in flight once the controller is disabled, and
//! re-creates its own I/O queue (same qid) once it is ready. A reset that fails leaves the
//! controller `failed`: every queue pair then fails its requests with `IoError::DeviceFailed`.
//!
//! **Aborts** are the one admin command the I/O path sends, and it never waits for them:
//! `try_abort` only try-locks the admin queue, and the answer is filed in `abort::AbortTable`
//! by whoever reaps the admin completion queue next (see `abort.rs`).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

mod reset;

pub use self::reset::ResetPhase;

use super::abort::{AbortOutcome, AbortTable, AbortTicket};
use super::queue::Queue;
use super::spec::*;
use super::vfio::{Bar, DmaMemory, Vfio};

/// Admin queue entries. Admin commands run one at a time, so a few suffice.
const ADMIN_QUEUE_ENTRIES: u16 = 32;

/// How long an admin command may take. Generous: the emulated controller runs under TCG.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Most I/O queue pairs asked for at start-up (one per reactor; this caps what Set Features
/// requests, not what the controller grants).
pub const IO_QUEUES_MAX: u16 = 64;

fn error(message: String) -> io::Error {
    io::Error::other(message)
}

/// What Identify Controller and Identify Namespace said.
#[derive(Clone, Debug)]
pub struct Identity {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Largest transfer per command, in bytes (`u64::MAX`: no limit).
    pub transfer_max_bytes: u64,
    /// Namespaces the controller supports.
    pub namespace_count: u32,
    /// A volatile write cache is present (Flush matters).
    pub volatile_write_cache: bool,
    /// The namespace the driver uses (1).
    pub nsid: u32,
    pub lba_size_bytes: u32,
    pub lba_count: u64,
    /// The controller supports Write Zeroes (ONCS bit 3).
    pub write_zeroes: bool,
    /// The controller supports Dataset Management, i.e. deallocate (ONCS bit 2).
    pub deallocate: bool,
    /// Deallocated blocks of the namespace read as zeroes (DLFEAT bits 2:0 = 001b).
    pub deallocated_reads_zeroes: bool,
    /// Abort Command Limit (zero-based): Aborts the controller takes at once.
    pub abort_limit: u8,
}

impl Identity {
    pub fn capacity_bytes(&self) -> u64 {
        self.lba_count * u64::from(self.lba_size_bytes)
    }
}

struct Admin {
    queue: Queue,
    /// Admin SQ, admin CQ, then one page for identify data.
    memory: DmaMemory,
    next_command_id: u16,
    /// I/O queue identifiers in use (index = qid - 1).
    io_queues_used: Vec<bool>,
    /// The Aborts out on this queue, whose completions may come between other commands'.
    aborts: AbortTable,
    /// When the reset phase in progress began (its wait is bounded by CAP.TO).
    phase_since: Instant,
}

// SAFETY: `Admin`'s raw pointers (queue memory, doorbells) point into memory it owns
// (`memory`) or that its controller keeps mapped (the BAR); it is used under a mutex only.
unsafe impl Send for Admin {}

/// One controller; see the module docs. Shared (`Arc`) by its queue pairs.
pub struct NvmeController {
    // Field order is drop order: the admin queue memory is unmapped before the BAR and VFIO.
    admin: Mutex<Admin>,
    bar: Bar,
    vfio: Arc<Vfio>,
    doorbell_stride_bytes: usize,
    /// Entries per queue the controller allows (CAP.MQES + 1).
    queue_entries_max: u32,
    /// I/O queues granted by Set Features.
    io_queues_granted: u16,
    identity: Identity,
    /// How long CSTS.RDY may take to follow CC.EN (CAP.TO).
    ready_timeout: Duration,
    /// Bumped when a reset starts; queue pairs compare it on each poll (written under `admin`).
    generation: AtomicU64,
    /// A `ResetPhase` (written under `admin`, read lock-free by the queue pairs).
    reset_phase: AtomicU8,
    /// A reset failed: the controller is unusable until the process reopens it.
    failed: AtomicBool,
}

impl NvmeController {
    /// Opens the controller at `pci_address` (bound to vfio-pci), resets and enables it,
    /// identifies it and namespace 1, and asks for I/O queues.
    pub fn open(pci_address: &str) -> io::Result<Arc<NvmeController>> {
        let vfio = Arc::new(Vfio::open(pci_address)?);
        let bar = vfio.map_bar0()?;
        let cap = bar.read64(REG_CAP);
        let queue_entries_max = (cap & 0xFFFF) as u32 + 1;
        let ready_timeout = Duration::from_millis(500 * ((cap >> 24) & 0xFF).max(1));
        let doorbell_stride_bytes = 4usize << ((cap >> 32) & 0xF);
        let page_size_min = 4096u64 << ((cap >> 48) & 0xF);
        if page_size_min != PAGE_SIZE_BYTES as u64 {
            return Err(error(format!(
                "{pci_address}: minimum page size {page_size_min} is not 4096"
            )));
        }
        if cap & (1 << 37) == 0 {
            return Err(error(format!(
                "{pci_address}: controller lacks the NVM command set"
            )));
        }
        // Admin SQ (64-byte entries) and CQ (16-byte entries), one page each, then a data page.
        let memory = DmaMemory::new(&vfio, 3 * PAGE_SIZE_BYTES)?;
        let queue = enable_with_admin_queue(&bar, &memory, ready_timeout, pci_address)?;
        let mut admin = Admin {
            queue,
            memory,
            next_command_id: 0,
            io_queues_used: Vec::new(),
            aborts: AbortTable::new(0),
            phase_since: Instant::now(),
        };
        let identity = identify(&mut admin, cap, pci_address)?;
        admin.aborts = AbortTable::new(identity.abort_limit);
        let granted = admin.set_number_of_queues()?;
        admin.io_queues_used = vec![false; usize::from(granted)];
        log::info!(
            "nvme {pci_address}: {} fw {} sn {}, {} LBAs of {} bytes, {} I/O queues, max transfer {} bytes, write cache {}",
            identity.model,
            identity.firmware,
            identity.serial,
            identity.lba_count,
            identity.lba_size_bytes,
            granted,
            identity.transfer_max_bytes,
            identity.volatile_write_cache
        );
        Ok(Arc::new(NvmeController {
            admin: Mutex::new(admin),
            bar,
            vfio,
            doorbell_stride_bytes,
            queue_entries_max,
            io_queues_granted: granted,
            identity,
            ready_timeout,
            generation: AtomicU64::new(0),
            reset_phase: AtomicU8::new(ResetPhase::Ready as u8),
            failed: AtomicBool::new(false),
        }))
    }

    /// Bumped by every reset, as it starts (see the module docs).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A reset failed: nothing more can be done with this controller.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Submits an Abort of command `command_id` of submission queue `qid`, without waiting:
    /// neither for the admin lock (held elsewhere: None) nor for the answer (`poll_abort`).
    /// None too when `ABORTS_IN_FLIGHT_MAX` (or the controller's limit) Aborts are out, or the
    /// controller failed: the caller tries again at its next scan.
    pub(super) fn try_abort(&self, qid: u16, command_id: u16) -> Option<AbortTicket> {
        let mut admin = self.try_admin()?;
        if self.reset_phase() != ResetPhase::Ready {
            return None;
        }
        let admin_command_id = admin.next_command_id();
        let ticket = admin.aborts.start(admin_command_id)?;
        let mut abort = SubmissionEntry::new(ADMIN_ABORT, 0);
        abort.set_command_id(admin_command_id);
        abort.cdw10 = (u32::from(command_id) << 16) | u32::from(qid);
        admin.queue.push(&abort);
        admin.queue.ring_submissions();
        Some(ticket)
    }

    /// The answer to `ticket`'s Abort so far: reaps the admin completion queue if the admin
    /// lock is free (never waits for it: `Pending` if it is held elsewhere).
    pub(super) fn poll_abort(&self, ticket: AbortTicket) -> AbortOutcome {
        let Some(mut admin) = self.try_admin() else {
            return AbortOutcome::Pending;
        };
        // During a reset the admin queue is not ours to read (a reset loses every Abort).
        if self.reset_phase() == ResetPhase::Ready {
            admin.reap();
        }
        admin.aborts.take(ticket)
    }

    /// The owner of `ticket` goes away without waiting for the answer (waits for the admin
    /// lock: drop path only).
    pub(super) fn forget_abort(&self, ticket: AbortTicket) {
        let mut admin = self.admin.lock().expect("admin queue lock");
        if self.reset_phase() == ResetPhase::Ready {
            admin.reap();
        }
        admin.aborts.forget(ticket);
    }

    /// The admin queue if nobody holds it now.
    fn try_admin(&self) -> Option<MutexGuard<'_, Admin>> {
        match self.admin.try_lock() {
            Ok(admin) => Some(admin),
            Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Poisoned(_)) => panic!("admin queue lock poisoned"),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn pci_address(&self) -> &str {
        self.vfio.pci_address()
    }

    pub fn queue_entries_max(&self) -> u32 {
        self.queue_entries_max
    }

    pub fn io_queues_granted(&self) -> u16 {
        self.io_queues_granted
    }

    pub(super) fn vfio(&self) -> &Arc<Vfio> {
        &self.vfio
    }

    /// Controller Status: whether the controller reports a fatal error (CSTS.CFS).
    pub fn fatal(&self) -> bool {
        self.bar.read32(REG_CSTS) & CSTS_FATAL != 0
    }

    /// Creates I/O completion queue then submission queue `qid` (a free identifier is picked)
    /// of `entries` entries over `submissions` / `completions` (IOVAs). Returns the qid, the
    /// queue's doorbells and the generation it was created in.
    pub(super) fn create_io_queue(
        &self,
        entries: u16,
        submissions_iova: u64,
        completions_iova: u64,
    ) -> io::Result<IoQueueCreated> {
        let mut admin = self.admin.lock().expect("admin queue lock");
        match self.reset_phase() {
            ResetPhase::Ready => {}
            ResetPhase::Failed => {
                return Err(error(format!(
                    "{}: the controller failed to reset earlier",
                    self.pci_address()
                )))
            }
            _ => {
                return Err(error(format!(
                    "{}: the controller is being reset",
                    self.pci_address()
                )))
            }
        }
        let index = admin
            .io_queues_used
            .iter()
            .position(|used| !used)
            .ok_or_else(|| {
                error(format!(
                    "{}: all {} I/O queues the controller granted are in use",
                    self.pci_address(),
                    self.io_queues_granted
                ))
            })?;
        let qid = index as u16 + 1;
        let created =
            self.create_locked(&mut admin, qid, entries, submissions_iova, completions_iova)?;
        admin.io_queues_used[index] = true;
        Ok(created)
    }

    /// Creates I/O queue `qid` again after a reset (the reset deleted it; the qid stayed
    /// reserved for its queue pair). None if another reset is under way, or the admin lock is
    /// held (try again later: this never waits for the lock); an error if the controller
    /// failed or refused.
    pub(super) fn recreate_io_queue(
        &self,
        qid: u16,
        entries: u16,
        submissions_iova: u64,
        completions_iova: u64,
    ) -> io::Result<Option<IoQueueCreated>> {
        let Some(mut admin) = self.try_admin() else {
            return Ok(None);
        };
        debug_assert!(admin.io_queues_used[usize::from(qid) - 1]);
        match self.reset_phase() {
            ResetPhase::Ready => {}
            ResetPhase::Failed => {
                return Err(error(format!(
                    "{}: the controller failed to reset",
                    self.pci_address()
                )))
            }
            _ => return Ok(None),
        }
        self.create_locked(&mut admin, qid, entries, submissions_iova, completions_iova)
            .map(Some)
    }

    fn create_locked(
        &self,
        admin: &mut Admin,
        qid: u16,
        entries: u16,
        submissions_iova: u64,
        completions_iova: u64,
    ) -> io::Result<IoQueueCreated> {
        let size_and_id = (u32::from(entries - 1) << 16) | u32::from(qid);
        let mut cq = SubmissionEntry::new(ADMIN_CREATE_CQ, 0);
        cq.prp1 = completions_iova;
        cq.cdw10 = size_and_id;
        cq.cdw11 = 1; // Physically contiguous, interrupts off: we poll.
        admin.run(cq, "create I/O completion queue")?;
        let mut sq = SubmissionEntry::new(ADMIN_CREATE_SQ, 0);
        sq.prp1 = submissions_iova;
        sq.cdw10 = size_and_id;
        sq.cdw11 = (u32::from(qid) << 16) | 1; // Its CQ, physically contiguous.
        if let Err(e) = admin.run(sq, "create I/O submission queue") {
            let mut delete = SubmissionEntry::new(ADMIN_DELETE_CQ, 0);
            delete.cdw10 = u32::from(qid);
            let _ = admin.run(delete, "delete I/O completion queue");
            return Err(e);
        }
        let stride = self.doorbell_stride_bytes;
        let sq_doorbell = self
            .bar
            .register_ptr(DOORBELL_BASE + 2 * usize::from(qid) * stride);
        let cq_doorbell = self
            .bar
            .register_ptr(DOORBELL_BASE + (2 * usize::from(qid) + 1) * stride);
        Ok(IoQueueCreated {
            qid,
            sq_doorbell,
            cq_doorbell,
            generation: self.generation(),
        })
    }

    /// Deletes I/O queue `qid` (submission, then completion) if it exists in `generation`
    /// (after a reset it is already gone). The controller aborts what is still queued on it;
    /// afterwards it no longer touches the queue's memory. The qid is free again either way.
    pub(super) fn delete_io_queue(&self, qid: u16, generation: u64) -> io::Result<()> {
        let mut admin = self.admin.lock().expect("admin queue lock");
        admin.io_queues_used[usize::from(qid) - 1] = false;
        // After (or during) a reset the queue is already gone.
        if self.generation() != generation || self.reset_phase() != ResetPhase::Ready {
            return Ok(());
        }
        let mut sq = SubmissionEntry::new(ADMIN_DELETE_SQ, 0);
        sq.cdw10 = u32::from(qid);
        admin.run(sq, "delete I/O submission queue")?;
        let mut cq = SubmissionEntry::new(ADMIN_DELETE_CQ, 0);
        cq.cdw10 = u32::from(qid);
        admin.run(cq, "delete I/O completion queue")?;
        Ok(())
    }
}

/// An I/O queue the controller created: its id, doorbells, and the controller generation.
pub(super) struct IoQueueCreated {
    pub qid: u16,
    pub sq_doorbell: *mut u32,
    pub cq_doorbell: *mut u32,
    pub generation: u64,
}

/// Points the controller (disabled) at an admin queue in the first two pages of `memory`
/// (zeroed), enables it and waits until it is ready.
fn enable_with_admin_queue(
    bar: &Bar,
    memory: &DmaMemory,
    ready_timeout: Duration,
    pci_address: &str,
) -> io::Result<Queue> {
    // Disable, and wait for the controller to say so, before touching the admin queue.
    bar.write32(REG_CC, bar.read32(REG_CC) & !CC_ENABLE);
    wait_ready(bar, false, ready_timeout, pci_address)?;
    let queue = program_admin_queue(bar, memory);
    wait_ready(bar, true, ready_timeout, pci_address)?;
    Ok(queue)
}

/// Points the controller (disabled) at an admin queue in the first two pages of `memory`
/// (zeroed) and sets CC.EN; the controller is ready when CSTS.RDY follows.
fn program_admin_queue(bar: &Bar, memory: &DmaMemory) -> Queue {
    let entries = ADMIN_QUEUE_ENTRIES;
    let aqa = (u32::from(entries - 1) << 16) | u32::from(entries - 1);
    bar.write32(REG_AQA, aqa);
    bar.write64(REG_ASQ, memory.iova());
    bar.write64(REG_ACQ, memory.iova() + PAGE_SIZE_BYTES as u64);
    bar.write32(REG_CC, CC_ENABLE | CC_IOSQES | CC_IOCQES);
    let stride = 4usize << ((bar.read64(REG_CAP) >> 32) & 0xF);
    // SAFETY: both queues lie in `memory` (zeroed, DMA mapped, owned by `Admin` with the
    // queue); the doorbells are queue 0's, in the BAR the controller keeps mapped.
    unsafe {
        Queue::new(
            memory.ptr().cast(),
            memory.ptr().add(PAGE_SIZE_BYTES).cast(),
            entries,
            bar.register_ptr(DOORBELL_BASE),
            bar.register_ptr(DOORBELL_BASE + stride),
        )
    }
}

impl Drop for NvmeController {
    fn drop(&mut self) {
        // Stop the controller before its queue memory is unmapped and freed.
        self.bar
            .write32(REG_CC, self.bar.read32(REG_CC) & !CC_ENABLE);
        let _ = wait_ready(
            &self.bar,
            false,
            Duration::from_secs(5),
            self.vfio.pci_address(),
        );
    }
}

fn wait_ready(bar: &Bar, ready: bool, timeout: Duration, pci_address: &str) -> io::Result<()> {
    let start = Instant::now();
    loop {
        let csts = bar.read32(REG_CSTS);
        if ready && csts & CSTS_FATAL != 0 {
            return Err(error(format!(
                "{pci_address}: controller fatal status while enabling"
            )));
        }
        if (csts & CSTS_READY != 0) == ready {
            return Ok(());
        }
        if start.elapsed() > timeout {
            let state = if ready { "ready" } else { "disabled" };
            return Err(error(format!(
                "{pci_address}: controller not {state} after {timeout:?} (CSTS {csts:#x})"
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Admin {
    /// Set Features, Number of Queues: asks for `IO_QUEUES_MAX` (zero-based counts of SQs
    /// 15:0 and CQs 31:16); returns how many queue pairs the controller granted.
    fn set_number_of_queues(&mut self) -> io::Result<u16> {
        let wanted = u32::from(IO_QUEUES_MAX - 1);
        let mut set = SubmissionEntry::new(ADMIN_SET_FEATURES, 0);
        set.cdw10 = FEATURE_NUMBER_OF_QUEUES;
        set.cdw11 = (wanted << 16) | wanted;
        let done = self.run(set, "set features (number of queues)")?;
        let granted = ((done.dw0 & 0xFFFF).min(done.dw0 >> 16) + 1).min(u32::from(IO_QUEUES_MAX));
        Ok(granted as u16)
    }

    /// A command identifier for the next admin command: not one an unanswered Abort uses.
    fn next_command_id(&mut self) -> u16 {
        loop {
            let command_id = self.next_command_id;
            self.next_command_id = self.next_command_id.wrapping_add(1);
            if !self.aborts.holds(command_id) {
                return command_id;
            }
        }
    }

    /// Takes every admin completion posted so far: each answers an Abort (other commands are
    /// waited for by `run`; only one `run` gave up on comes late, and is dropped).
    fn reap(&mut self) {
        while let Some(done) = self.queue.next_completion() {
            if !self.aborts.answer(&done) {
                log::error!(
                    "NVMe admin completion for command {} that nobody waits for any more: {}",
                    done.command_id,
                    done.nvme_status()
                );
            }
        }
        self.queue.ring_completions();
    }

    /// Runs one admin command to completion (start-up, queue creation, recovery: this
    /// waits). Answers to Aborts that come first are filed in `aborts`.
    fn run(&mut self, mut entry: SubmissionEntry, what: &str) -> io::Result<CompletionEntry> {
        let command_id = self.next_command_id();
        entry.set_command_id(command_id);
        self.queue.push(&entry);
        self.queue.ring_submissions();
        let start = Instant::now();
        loop {
            if let Some(done) = self.queue.next_completion() {
                self.queue.ring_completions();
                if self.aborts.answer(&done) {
                    continue;
                }
                assert_eq!(
                    done.command_id, command_id,
                    "admin completion for another command"
                );
                let status = done.nvme_status();
                if !status.is_success() {
                    return Err(error(format!("NVMe {what}: {status}")));
                }
                return Ok(done);
            }
            if start.elapsed() > ADMIN_TIMEOUT {
                return Err(error(format!(
                    "NVMe {what}: no completion after {ADMIN_TIMEOUT:?}"
                )));
            }
            std::hint::spin_loop();
        }
    }

    /// Runs an Identify with the given CNS and nsid into the data page; returns a copy of it.
    fn identify(&mut self, cns: u32, nsid: u32, what: &str) -> io::Result<Vec<u8>> {
        let data_iova = self.memory.iova() + 2 * PAGE_SIZE_BYTES as u64;
        let mut entry = SubmissionEntry::new(ADMIN_IDENTIFY, nsid);
        entry.prp1 = data_iova;
        entry.cdw10 = cns;
        self.run(entry, what)?;
        // SAFETY: the data page is the third page of `memory`, which the controller finished
        // writing (its completion was seen).
        let page = unsafe {
            core::slice::from_raw_parts(self.memory.ptr().add(2 * PAGE_SIZE_BYTES), PAGE_SIZE_BYTES)
        };
        Ok(page.to_vec())
    }
}

fn identify(admin: &mut Admin, cap: u64, pci_address: &str) -> io::Result<Identity> {
    let controller = admin.identify(IDENTIFY_CONTROLLER, 0, "identify controller")?;
    let mdts = controller[ID_CTRL_MDTS];
    let page_size_min = 4096u64 << ((cap >> 48) & 0xF);
    let transfer_max_bytes = if mdts == 0 {
        u64::MAX
    } else {
        page_size_min << mdts
    };
    let namespace_count = le_u32(&controller, ID_CTRL_NN);
    if namespace_count == 0 {
        return Err(error(format!(
            "{pci_address}: the controller has no namespaces"
        )));
    }
    let nsid = 1;
    let namespace = admin.identify(IDENTIFY_NAMESPACE, nsid, "identify namespace 1")?;
    let lba_count = le_u64(&namespace, ID_NS_NSZE);
    let format = usize::from(namespace[ID_NS_FLBAS] & 0xF);
    let lbaf = le_u32(&namespace, ID_NS_LBAF + 4 * format);
    let metadata_bytes = lbaf & 0xFFFF;
    let lba_shift = (lbaf >> 16) & 0xFF;
    if lba_count == 0 {
        return Err(error(format!(
            "{pci_address}: namespace 1 is inactive (size 0)"
        )));
    }
    if !(9..=12).contains(&lba_shift) || metadata_bytes != 0 {
        return Err(error(format!(
            "{pci_address}: namespace 1 uses {}-byte blocks with {metadata_bytes} metadata bytes; \
             the driver needs 512..4096-byte blocks without metadata",
            1u64 << lba_shift
        )));
    }
    let oncs = u16::from_le_bytes([controller[ID_CTRL_ONCS], controller[ID_CTRL_ONCS + 1]]);
    Ok(Identity {
        write_zeroes: oncs & ONCS_WRITE_ZEROES != 0,
        deallocate: oncs & ONCS_DATASET_MANAGEMENT != 0,
        deallocated_reads_zeroes: namespace[ID_NS_DLFEAT] & 0x7 == 1,
        abort_limit: controller[ID_CTRL_ACL],
        serial: identify_text(&controller, ID_CTRL_SERIAL),
        model: identify_text(&controller, ID_CTRL_MODEL),
        firmware: identify_text(&controller, ID_CTRL_FIRMWARE),
        transfer_max_bytes,
        namespace_count,
        volatile_write_cache: controller[ID_CTRL_VWC] & 1 != 0,
        nsid,
        lba_size_bytes: 1 << lba_shift,
        lba_count,
    })
}
