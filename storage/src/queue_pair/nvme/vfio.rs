//! The device through VFIO: container, group and device descriptors, BAR0 mapped for MMIO,
//! and memory mapped for the device's DMA through the IOMMU (type1 v2).
//!
//! Memory the controller reads or writes must be mapped with `VFIO_IOMMU_MAP_DMA` first; the
//! kernel pins its pages and the device sees it at an I/O virtual address (IOVA) we choose.
//! IOVAs are handed out by a bump allocator starting at `IOVA_BASE`, above the 4 GiB MSI
//! window, so that mappings never collide with it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use carmine_ffi::vfio as sys;

/// First IOVA handed out: 4 GiB, above the x86 MSI window (0xFEE0_0000) and below the
/// emulated intel-iommu's 39-bit address width.
pub const IOVA_BASE: u64 = 1 << 32;

/// Size of a huge page, in bytes: DMA memory that is a multiple of it asks for hugepages first.
pub const HUGE_PAGE_SIZE_BYTES: usize = 2 << 20;

/// PCI command register bits: memory space, bus master (the device may DMA).
const PCI_COMMAND_OFFSET: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

fn error(message: String) -> io::Error {
    io::Error::other(message)
}

/// A VFIO container with one group and one device in it.
pub struct Vfio {
    pci_address: String,
    // Field order is drop order: device, then group, then container.
    device: File,
    _group: File,
    container: File,
    /// Next free IOVA.
    iova_next: AtomicU64,
}

impl Vfio {
    /// Opens the device at `pci_address` (e.g. `0000:00:04.0`), which must be bound to vfio-pci.
    pub fn open(pci_address: &str) -> io::Result<Vfio> {
        let sysfs = Path::new("/sys/bus/pci/devices").join(pci_address);
        if !sysfs.exists() {
            return Err(error(format!(
                "no PCI device {pci_address} ({} missing)",
                sysfs.display()
            )));
        }
        let driver = fs::read_link(sysfs.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            return Err(error(format!(
                "{pci_address} is bound to {}, not vfio-pci: run scripts/setup.sh bind {pci_address}",
                driver.as_deref().unwrap_or("no driver")
            )));
        }
        let group_link = fs::read_link(sysfs.join("iommu_group")).map_err(|e| {
            error(format!(
                "{pci_address}: no IOMMU group ({e}): is the IOMMU enabled (intel_iommu=on)?"
            ))
        })?;
        let group_id = group_link
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rw = |path: &str| OpenOptions::new().read(true).write(true).open(path);
        let container = rw("/dev/vfio/vfio").map_err(|e| error(format!("/dev/vfio/vfio: {e}")))?;
        let group_path = format!("/dev/vfio/{group_id}");
        let group = rw(&group_path).map_err(|e| {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            error(format!(
                "{group_path}: {e}{}",
                if busy {
                    " (another process has the device open)"
                } else {
                    ""
                }
            ))
        })?;
        // SAFETY: `container` is a VFIO container descriptor; GET_API_VERSION takes no argument.
        let version =
            unsafe { sys::ioctl_value(container.as_raw_fd(), sys::VFIO_GET_API_VERSION, 0)? };
        if version != sys::VFIO_API_VERSION {
            return Err(error(format!("VFIO API version {version}, expected 0")));
        }
        // SAFETY: as above; CHECK_EXTENSION takes the extension number by value.
        let type1v2 = unsafe {
            sys::ioctl_value(
                container.as_raw_fd(),
                sys::VFIO_CHECK_EXTENSION,
                sys::VFIO_TYPE1V2_IOMMU,
            )?
        };
        if type1v2 != 1 {
            return Err(error(
                "the kernel's VFIO lacks the type1 v2 IOMMU (vfio_iommu_type1)".into(),
            ));
        }
        let mut status = sys::VfioGroupStatus {
            argsz: core::mem::size_of::<sys::VfioGroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: `group` is a VFIO group descriptor and GET_STATUS takes a vfio_group_status.
        unsafe { sys::ioctl_struct(group.as_raw_fd(), sys::VFIO_GROUP_GET_STATUS, &mut status)? };
        if status.flags & sys::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(error(format!(
                "IOMMU group {group_id} is not viable: bind every device in it to vfio-pci"
            )));
        }
        let mut container_fd: i32 = container.as_raw_fd();
        // SAFETY: SET_CONTAINER takes a pointer to the container's descriptor (an i32).
        unsafe {
            sys::ioctl_struct(
                group.as_raw_fd(),
                sys::VFIO_GROUP_SET_CONTAINER,
                &mut container_fd,
            )?
        };
        // SAFETY: SET_IOMMU takes the IOMMU type by value; the container now has a group.
        unsafe {
            sys::ioctl_value(
                container.as_raw_fd(),
                sys::VFIO_SET_IOMMU,
                sys::VFIO_TYPE1V2_IOMMU,
            )?
        };
        // SAFETY: `group` is a VFIO group descriptor in a container with an IOMMU set.
        let device_fd = unsafe { sys::group_get_device_fd(group.as_raw_fd(), pci_address)? };
        // SAFETY: GET_DEVICE_FD returned a fresh descriptor that nothing else owns.
        let device = File::from(unsafe { OwnedFd::from_raw_fd(device_fd) });
        let vfio = Vfio {
            pci_address: pci_address.to_string(),
            device,
            _group: group,
            container,
            iova_next: AtomicU64::new(IOVA_BASE),
        };
        vfio.enable_bus_master()?;
        Ok(vfio)
    }

    pub fn pci_address(&self) -> &str {
        &self.pci_address
    }

    fn region_info(&self, index: u32) -> io::Result<sys::VfioRegionInfo> {
        let mut info = sys::VfioRegionInfo {
            argsz: core::mem::size_of::<sys::VfioRegionInfo>() as u32,
            index,
            ..sys::VfioRegionInfo::default()
        };
        // SAFETY: `device` is a VFIO device descriptor; GET_REGION_INFO takes a vfio_region_info.
        unsafe {
            sys::ioctl_struct(
                self.device.as_raw_fd(),
                sys::VFIO_DEVICE_GET_REGION_INFO,
                &mut info,
            )?
        };
        Ok(info)
    }

    /// Lets the device master the bus (DMA) and decode its memory BARs.
    fn enable_bus_master(&self) -> io::Result<()> {
        let config = self.region_info(sys::VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut command = [0u8; 2];
        self.device
            .read_exact_at(&mut command, config.offset + PCI_COMMAND_OFFSET)?;
        let value = u16::from_le_bytes(command) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        self.device
            .write_all_at(&value.to_le_bytes(), config.offset + PCI_COMMAND_OFFSET)
    }

    /// Maps BAR0 (the NVMe registers and doorbells).
    pub fn map_bar0(&self) -> io::Result<Bar> {
        let info = self.region_info(sys::VFIO_PCI_BAR0_REGION_INDEX)?;
        if info.flags & sys::VFIO_REGION_INFO_FLAG_MMAP == 0 || info.size < 0x2000 {
            return Err(error(format!(
                "{}: BAR0 cannot be mapped (flags {:#x}, size {})",
                self.pci_address, info.flags, info.size
            )));
        }
        let len = info.size as usize;
        // SAFETY: a fresh shared mapping of the device's BAR0 region; the kernel checks the
        // offset and length against the region.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                info.offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(error(format!("mmap BAR0: {}", io::Error::last_os_error())));
        }
        Ok(Bar {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
        })
    }

    /// Maps `len` bytes at `vaddr` for the device's DMA at a fresh IOVA, which it returns.
    ///
    /// # Safety
    /// The memory stays allocated at `vaddr` until the returned mapping is dropped (the kernel
    /// pins the pages now; the device may access them until then).
    pub unsafe fn map_dma(self: &Arc<Self>, vaddr: *mut u8, len: usize) -> io::Result<DmaMapping> {
        assert!(vaddr as usize % 4096 == 0 && len % 4096 == 0 && len > 0);
        let iova = self.iova_next.fetch_add(len as u64, Ordering::Relaxed);
        let mut map = sys::VfioIommuType1DmaMap {
            argsz: core::mem::size_of::<sys::VfioIommuType1DmaMap>() as u32,
            flags: sys::VFIO_DMA_MAP_FLAG_READ | sys::VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len as u64,
        };
        // SAFETY: `container` is a type1 container; MAP_DMA takes a vfio_iommu_type1_dma_map,
        // and the memory stays valid while mapped (our caller's contract).
        unsafe {
            sys::ioctl_struct(
                self.container.as_raw_fd(),
                sys::VFIO_IOMMU_MAP_DMA,
                &mut map,
            )
        }
        .map_err(|e| {
            error(format!(
                "VFIO_IOMMU_MAP_DMA of {len} bytes at IOVA {iova:#x}: {e}"
            ))
        })?;
        Ok(DmaMapping {
            vfio: Arc::clone(self),
            vaddr: vaddr as usize,
            iova,
            len,
        })
    }
}

/// A range of process memory the device can address at `iova`. Unmapped at drop.
pub struct DmaMapping {
    vfio: Arc<Vfio>,
    vaddr: usize,
    iova: u64,
    len: usize,
}

impl DmaMapping {
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The IOVA of `len` bytes at `vaddr`, if they lie inside this mapping.
    #[inline]
    pub fn translate(&self, vaddr: usize, len: usize) -> Option<u64> {
        let inside = vaddr >= self.vaddr && vaddr + len <= self.vaddr + self.len;
        inside.then(|| self.iova + (vaddr - self.vaddr) as u64)
    }
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        let mut unmap = sys::VfioIommuType1DmaUnmap {
            argsz: core::mem::size_of::<sys::VfioIommuType1DmaUnmap>() as u32,
            flags: 0,
            iova: self.iova,
            size: self.len as u64,
        };
        // SAFETY: UNMAP_DMA takes a vfio_iommu_type1_dma_unmap; the range is exactly one
        // earlier mapping of this container.
        let result = unsafe {
            sys::ioctl_struct(
                self.vfio.container.as_raw_fd(),
                sys::VFIO_IOMMU_UNMAP_DMA,
                &mut unmap,
            )
        };
        if let Err(e) = result {
            log::error!(
                "{}: VFIO_IOMMU_UNMAP_DMA at {:#x}: {e}",
                self.vfio.pci_address,
                self.iova
            );
        }
    }
}

/// Anonymous memory of our own, freed at drop.
struct AnonymousMemory {
    ptr: NonNull<u8>,
    len: usize,
}

impl Drop for AnonymousMemory {
    fn drop(&mut self) {
        // SAFETY: mmapped in `DmaMemory::new`, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Zeroed memory of our own, mapped for DMA: queues, PRP lists, bounce buffers.
/// Hugepage-backed when its size is a multiple of 2 MiB and hugepages are reserved.
pub struct DmaMemory {
    // Field order is drop order: unmap from the IOMMU before the pages are freed.
    mapping: DmaMapping,
    memory: AnonymousMemory,
    huge: bool,
}

impl DmaMemory {
    pub fn new(vfio: &Arc<Vfio>, len: usize) -> io::Result<DmaMemory> {
        assert!(len > 0 && len % 4096 == 0, "DMA memory of {len} bytes");
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        let map = |flags| {
            // SAFETY: a fresh anonymous mapping; no existing memory is touched.
            let ptr = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    -1,
                    0,
                )
            };
            (ptr != libc::MAP_FAILED).then(|| NonNull::new(ptr.cast::<u8>()).expect("mmap null"))
        };
        let huge_try = len % HUGE_PAGE_SIZE_BYTES == 0;
        let (ptr, huge) = match huge_try.then(|| map(flags | libc::MAP_HUGETLB)).flatten() {
            Some(ptr) => (ptr, true),
            None => match map(flags) {
                Some(ptr) => (ptr, false),
                None => {
                    let os = io::Error::last_os_error();
                    return Err(error(format!("mmap {len} bytes: {os}")));
                }
            },
        };
        let memory = AnonymousMemory { ptr, len };
        // SAFETY: `memory` lives in the returned value and, by field order, is freed only
        // after `mapping` is dropped.
        let mapping = unsafe { vfio.map_dma(ptr.as_ptr(), len)? };
        Ok(DmaMemory {
            mapping,
            memory,
            huge,
        })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.memory.ptr.as_ptr()
    }

    pub fn iova(&self) -> u64 {
        self.mapping.iova()
    }

    pub fn is_huge(&self) -> bool {
        self.huge
    }
}

/// BAR0 mapped into the process: 32-bit volatile register access.
pub struct Bar {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the BAR is device memory with no thread affinity; registers are accessed with single
// volatile loads and stores, and each doorbell has one writer (its queue's owner).
unsafe impl Send for Bar {}
// SAFETY: as above: shared access is volatile MMIO, which the device serialises.
unsafe impl Sync for Bar {}

impl Bar {
    /// A pointer to the 32-bit register at `offset`, for doorbells written on the hot path.
    pub fn register_ptr(&self, offset: usize) -> *mut u32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "register {offset:#x} outside BAR0"
        );
        // SAFETY: inside the mapping (checked above).
        unsafe { self.ptr.as_ptr().add(offset).cast() }
    }

    pub fn read32(&self, offset: usize) -> u32 {
        // SAFETY: an aligned register inside the mapped BAR (register_ptr checks).
        unsafe { self.register_ptr(offset).read_volatile() }
    }

    pub fn write32(&self, offset: usize, value: u32) {
        // SAFETY: an aligned register inside the mapped BAR (register_ptr checks).
        unsafe { self.register_ptr(offset).write_volatile(value) }
    }

    /// A 64-bit register as two 32-bit reads, low half first.
    pub fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }

    /// A 64-bit register as two 32-bit writes, low half first.
    pub fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: mapped in `map_bar0`, unmapped only here; no doorbell pointer outlives the
        // controller that owns this BAR.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
