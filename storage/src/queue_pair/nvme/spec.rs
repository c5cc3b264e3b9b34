//! The parts of the NVMe 1.4 base specification the driver uses: controller registers, queue
//! entry layouts, opcodes, identify fields and status codes. Pure data: no memory access here.

use core::fmt;
use core::mem::{offset_of, size_of};

/// Controller Capabilities (64-bit): MQES 15:0, TO 31:24 (500 ms units), DSTRD 35:32,
/// CSS 44:37, MPSMIN 51:48.
pub const REG_CAP: usize = 0x00;
/// Version.
pub const REG_VS: usize = 0x08;
/// Controller Configuration.
pub const REG_CC: usize = 0x14;
/// Controller Status: RDY bit 0, CFS bit 1.
pub const REG_CSTS: usize = 0x1C;
/// Admin Queue Attributes: ACQS 27:16, ASQS 11:0 (both zero-based).
pub const REG_AQA: usize = 0x24;
/// Admin Submission / Completion Queue base addresses (64-bit).
pub const REG_ASQ: usize = 0x28;
pub const REG_ACQ: usize = 0x30;
/// First doorbell; queue y's SQ tail is at `DOORBELL_BASE + 2y * stride`, its CQ head at
/// `DOORBELL_BASE + (2y + 1) * stride`, stride = `4 << CAP.DSTRD`.
pub const DOORBELL_BASE: usize = 0x1000;

pub const CC_ENABLE: u32 = 1 << 0;
/// I/O submission / completion queue entry sizes as log2 (64 and 16 bytes).
pub const CC_IOSQES: u32 = 6 << 16;
pub const CC_IOCQES: u32 = 4 << 20;
pub const CSTS_READY: u32 = 1 << 0;
pub const CSTS_FATAL: u32 = 1 << 1;

/// The memory page size the driver configures (CC.MPS = 0): PRP entries point at pages of it.
pub const PAGE_SIZE_BYTES: usize = 4096;

/// Admin opcodes.
pub const ADMIN_DELETE_SQ: u8 = 0x00;
pub const ADMIN_CREATE_SQ: u8 = 0x01;
pub const ADMIN_DELETE_CQ: u8 = 0x04;
pub const ADMIN_CREATE_CQ: u8 = 0x05;
pub const ADMIN_IDENTIFY: u8 = 0x06;
/// Abort: CDW10 holds the submission queue id (15:0) and the command id (31:16); completion
/// DW0 bit 0 is 0 when the command was aborted (it then completes with "command abort
/// requested"), 1 when it was not (it completes on its own).
pub const ADMIN_ABORT: u8 = 0x08;
pub const ADMIN_SET_FEATURES: u8 = 0x09;
/// NVM command set opcodes.
pub const NVM_FLUSH: u8 = 0x00;
pub const NVM_WRITE: u8 = 0x01;
pub const NVM_READ: u8 = 0x02;
/// Write Zeroes: SLBA in CDW10-11, zero-based block count in CDW12 15:0; no data pointer.
pub const NVM_WRITE_ZEROES: u8 = 0x08;
/// Dataset Management: CDW10 7:0 zero-based range count, CDW11 attributes; PRP1 points at
/// the ranges (16 bytes each: context attributes u32, block count u32, starting LBA u64).
pub const NVM_DATASET_MANAGEMENT: u8 = 0x09;
/// Dataset Management CDW11: Attribute Deallocate.
pub const DSM_ATTRIBUTE_DEALLOCATE: u32 = 1 << 2;
/// Most blocks one Write Zeroes command covers (its 16-bit zero-based count).
pub const WRITE_ZEROES_BLOCKS_MAX: u64 = 1 << 16;

/// Identify CNS values.
pub const IDENTIFY_NAMESPACE: u32 = 0x00;
pub const IDENTIFY_CONTROLLER: u32 = 0x01;
/// Set Features: Number of Queues.
pub const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;

/// Identify Controller byte offsets.
pub const ID_CTRL_SERIAL: core::ops::Range<usize> = 4..24;
pub const ID_CTRL_MODEL: core::ops::Range<usize> = 24..64;
pub const ID_CTRL_FIRMWARE: core::ops::Range<usize> = 64..72;
pub const ID_CTRL_MDTS: usize = 77;
/// Abort Command Limit: Aborts the controller takes at once, zero-based.
pub const ID_CTRL_ACL: usize = 258;
pub const ID_CTRL_NN: usize = 516;
/// Optional NVM Command Support (u16): bit 2 Dataset Management, bit 3 Write Zeroes.
pub const ID_CTRL_ONCS: usize = 520;
pub const ONCS_DATASET_MANAGEMENT: u16 = 1 << 2;
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
pub const ID_CTRL_VWC: usize = 525;
/// Identify Namespace byte offsets.
pub const ID_NS_NSZE: usize = 0;
pub const ID_NS_FLBAS: usize = 26;
/// Deallocate Logical Block Features: bits 2:0 = 001b means deallocated blocks read as zeroes.
pub const ID_NS_DLFEAT: usize = 33;
pub const ID_NS_LBAF: usize = 128;

/// A submission queue entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubmissionEntry {
    /// Opcode 7:0, fused 9:8, PSDT 15:14 (0: PRPs), command identifier 31:16.
    pub cdw0: u32,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub prp1: u64,
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

impl SubmissionEntry {
    /// An entry for `opcode` on namespace `nsid` (0 for admin commands without one).
    pub fn new(opcode: u8, nsid: u32) -> SubmissionEntry {
        SubmissionEntry {
            cdw0: u32::from(opcode),
            nsid,
            ..SubmissionEntry::default()
        }
    }

    /// Sets the command identifier, echoed in the completion.
    pub fn set_command_id(&mut self, command_id: u16) {
        self.cdw0 = (self.cdw0 & 0xFFFF) | (u32::from(command_id) << 16);
    }
}

/// A completion queue entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Command specific (Set Features: the queues allocated).
    pub dw0: u32,
    pub dw1: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub command_id: u16,
    /// Phase tag bit 0, status field 15:1.
    pub status: u16,
}

impl CompletionEntry {
    pub fn phase(&self) -> u16 {
        self.status & 1
    }

    /// The status field without the phase tag.
    pub fn nvme_status(&self) -> NvmeStatus {
        NvmeStatus(self.status >> 1)
    }
}

const _: () = {
    assert!(size_of::<SubmissionEntry>() == 64);
    assert!(offset_of!(SubmissionEntry, prp1) == 24);
    assert!(offset_of!(SubmissionEntry, cdw10) == 40);
    assert!(size_of::<CompletionEntry>() == 16);
    assert!(offset_of!(CompletionEntry, command_id) == 12);
    assert!(offset_of!(CompletionEntry, status) == 14);
};

/// A completion's status field (phase tag removed): status code 7:0, status code type 10:8,
/// more 13, do-not-retry 14.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NvmeStatus(pub u16);

impl NvmeStatus {
    pub fn is_success(self) -> bool {
        self.code_type() == 0 && self.code() == 0
    }

    pub fn code(self) -> u8 {
        (self.0 & 0xFF) as u8
    }

    pub fn code_type(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    pub fn do_not_retry(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// What the specification calls this status, for the codes a driver meets in practice.
    pub fn description(self) -> &'static str {
        match (self.code_type(), self.code()) {
            (0, 0x00) => "successful completion",
            (0, 0x01) => "invalid command opcode",
            (0, 0x02) => "invalid field in command",
            (0, 0x03) => "command ID conflict",
            (0, 0x04) => "data transfer error",
            (0, 0x05) => "commands aborted due to power loss notification",
            (0, 0x06) => "internal error",
            (0, 0x07) => "command abort requested",
            (0, 0x08) => "command aborted due to SQ deletion",
            (0, 0x0B) => "invalid namespace or format",
            (0, 0x0D) => "PRP offset invalid",
            (0, 0x80) => "LBA out of range",
            (0, 0x81) => "capacity exceeded",
            (0, 0x82) => "namespace not ready",
            (1, 0x01) => "invalid queue identifier",
            (1, 0x02) => "invalid queue size",
            (1, 0x08) => "invalid interrupt vector",
            (1, 0x0C) => "invalid queue deletion",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x82) => "end-to-end guard check error",
            (2, 0x86) => "access denied",
            (2, 0x87) => "deallocated or unwritten logical block",
            (3, _) => "path related status",
            (7, _) => "vendor specific status",
            _ => "unknown status",
        }
    }
}

impl fmt::Display for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NVMe status {} (type {:#x}, code {:#04x}{})",
            self.description(),
            self.code_type(),
            self.code(),
            if self.do_not_retry() {
                ", do not retry"
            } else {
                ""
            }
        )
    }
}

impl fmt::Debug for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Reads a little-endian `u32`/`u64` at `offset` of an identify page.
pub fn le_u32(page: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(page[offset..offset + 4].try_into().expect("4 bytes"))
}

pub fn le_u64(page: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(page[offset..offset + 8].try_into().expect("8 bytes"))
}

/// An identify string field (space padded ASCII), trimmed.
pub fn identify_text(page: &[u8], range: core::ops::Range<usize>) -> String {
    String::from_utf8_lossy(&page[range]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_decode() {
        // LBA out of range, DNR set, as QEMU reports it: status field 0x4080.
        let status = NvmeStatus(0x4080);
        assert!(!status.is_success());
        assert_eq!((status.code_type(), status.code()), (0, 0x80));
        assert!(status.do_not_retry());
        let text = status.to_string();
        assert!(
            text.contains("LBA out of range") && text.contains("do not retry"),
            "{text}"
        );
        assert!(NvmeStatus(0).is_success());
        assert_eq!(NvmeStatus(0x0281).description(), "unrecovered read error");
    }

    #[test]
    fn completion_phase_and_status_are_split() {
        let entry = CompletionEntry {
            status: (0x4080 << 1) | 1,
            ..CompletionEntry::default()
        };
        assert_eq!(entry.phase(), 1);
        assert_eq!(entry.nvme_status(), NvmeStatus(0x4080));
    }

    #[test]
    fn command_id_goes_in_the_top_half_of_dword_0() {
        let mut entry = SubmissionEntry::new(NVM_READ, 1);
        entry.set_command_id(0xBEEF);
        assert_eq!(entry.cdw0, 0xBEEF_0002);
        entry.set_command_id(3);
        assert_eq!(entry.cdw0, 0x0003_0002);
    }
}
