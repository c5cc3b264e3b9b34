//! VFIO user-space ABI (`linux/vfio.h`), hand-written: the few structs and ioctls the NVMe driver
//! uses, with size and offset asserts against the kernel header's layout (checked on x86_64
//! Linux 6.1; the ABI is stable). Hand-written rather than bindgen so that the default build
//! needs no clang; the header is small and frozen.
//!
//! Every ioctl here is an `unsafe fn`: the kernel reads and writes the argument struct, and the
//! file descriptor must be the right kind (container, group or device).

use core::mem::{offset_of, size_of};
use std::io;
use std::os::fd::RawFd;

/// `VFIO_TYPE` (`';'`) and `VFIO_BASE` (100): every VFIO ioctl is `_IO(VFIO_TYPE, VFIO_BASE + n)`.
const fn vfio_io(n: u64) -> u64 {
    ((b';' as u64) << 8) | (100 + n)
}

/// The only API version there is.
pub const VFIO_API_VERSION: i32 = 0;
/// Type1 IOMMU, version 2 semantics (unmap of a partial mapping fails instead of splitting).
pub const VFIO_TYPE1V2_IOMMU: u64 = 3;
/// `vfio_group_status.flags`: every device of the group is bound to VFIO (or no driver).
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
/// `vfio_iommu_type1_dma_map.flags`: the device may read / write the mapping.
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// `vfio_region_info.flags`: the region supports mmap.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// VFIO-PCI region indices.
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

pub const VFIO_GET_API_VERSION: u64 = vfio_io(0);
pub const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
pub const VFIO_SET_IOMMU: u64 = vfio_io(2);
pub const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
pub const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
pub const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
pub const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
pub const VFIO_DEVICE_RESET: u64 = vfio_io(11);
pub const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(13);
pub const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(14);

/// `struct vfio_group_status`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VfioGroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

/// `struct vfio_region_info` (without capability chains: `cap_offset` is ignored).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VfioRegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_iommu_type1_dma_map`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VfioIommuType1DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

/// `struct vfio_iommu_type1_dma_unmap` (without the trailing dirty-bitmap data).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VfioIommuType1DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

const _: () = {
    assert!(size_of::<VfioGroupStatus>() == 8);
    assert!(size_of::<VfioRegionInfo>() == 32);
    assert!(offset_of!(VfioRegionInfo, size) == 16);
    assert!(offset_of!(VfioRegionInfo, offset) == 24);
    assert!(size_of::<VfioIommuType1DmaMap>() == 32);
    assert!(offset_of!(VfioIommuType1DmaMap, vaddr) == 8);
    assert!(offset_of!(VfioIommuType1DmaMap, iova) == 16);
    assert!(size_of::<VfioIommuType1DmaUnmap>() == 24);
    assert!(offset_of!(VfioIommuType1DmaUnmap, iova) == 8);
    assert!(VFIO_GET_API_VERSION == 0x3B64);
    assert!(VFIO_IOMMU_MAP_DMA == 0x3B71);
};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An ioctl whose argument is an integer (or none).
///
/// # Safety
/// `request` must be a VFIO ioctl that takes an integer argument (not a pointer) and `fd` an
/// open descriptor of the kind that request expects.
pub unsafe fn ioctl_value(fd: RawFd, request: u64, value: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: by the caller's contract the kernel reads no memory through `value`.
    check(unsafe { libc::ioctl(fd, request as _, value) })
}

/// An ioctl whose argument is a pointer to `T`, which the kernel reads and may write back.
///
/// # Safety
/// `request` must be a VFIO ioctl whose argument is a `T` (one of the structs above, with
/// `argsz` set to its size) and `fd` an open descriptor of the kind that request expects.
pub unsafe fn ioctl_struct<T>(fd: RawFd, request: u64, argument: &mut T) -> io::Result<i32> {
    // SAFETY: `argument` is a live, exclusive `T`, the layout the kernel expects for `request`
    // (caller's contract); the kernel accesses at most `argsz` bytes of it.
    check(unsafe { libc::ioctl(fd, request as _, argument as *mut T) })
}

/// `VFIO_GROUP_GET_DEVICE_FD` with a PCI address such as `0000:00:04.0`.
///
/// # Safety
/// `group_fd` must be an open VFIO group descriptor.
pub unsafe fn group_get_device_fd(group_fd: RawFd, pci_address: &str) -> io::Result<RawFd> {
    let name = std::ffi::CString::new(pci_address)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "PCI address with a NUL"))?;
    // SAFETY: the kernel reads a NUL-terminated string from `name`, alive for the call.
    check(unsafe { libc::ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD as _, name.as_ptr()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values from linux/vfio.h on x86_64 (_IO(';', 100 + n)).
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3B65);
        assert_eq!(VFIO_SET_IOMMU, 0x3B66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3B67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3B68);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3B6A);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3B6C);
        assert_eq!(VFIO_DEVICE_RESET, 0x3B6F);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3B72);
    }

    #[test]
    fn ioctl_on_a_non_vfio_fd_is_an_error_not_a_crash() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: VFIO_GET_API_VERSION takes no argument; /dev/null refuses it with ENOTTY.
        let result = unsafe { ioctl_value(fd, VFIO_GET_API_VERSION, 0) };
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::ENOTTY));
    }
}
