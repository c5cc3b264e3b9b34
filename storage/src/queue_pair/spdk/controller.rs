//! `SpdkController`: SPDK's environment, initialized once per process, and one attached NVMe
//! controller with its namespace 1, shared by every reactor's queue pair.

use std::ffi::CString;
use std::io;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use carmine_ffi::spdk as ffi;

use super::super::BLOCK_SIZE_BYTES;

pub(super) fn io_error(message: String) -> io::Error {
    io::Error::other(message)
}

/// Initializes SPDK's environment once per process (SPDK allows no second call). Every
/// controller attach goes through it; the outcome is kept, so a failure is reported each time.
fn init_environment() -> io::Result<()> {
    static INIT: OnceLock<Result<(), i32>> = OnceLock::new();
    let outcome = INIT.get_or_init(|| {
        // SAFETY: zeroed options are a valid `spdk_env_opts` (pointers null, integers 0);
        // `spdk_env_opts_init` then fills in the defaults.
        let mut opts: ffi::spdk_env_opts = unsafe { std::mem::zeroed() };
        // Since SPDK v24.09 the caller says how big its options are, before and after init.
        opts.opts_size = std::mem::size_of::<ffi::spdk_env_opts>();
        // SAFETY: `opts` is a live, writable `spdk_env_opts`.
        unsafe { ffi::spdk_env_opts_init(&mut opts) };
        opts.opts_size = std::mem::size_of::<ffi::spdk_env_opts>();
        opts.name = c"carmine".as_ptr();
        // SAFETY: `opts` is initialized and its strings are 'static.
        let rc = unsafe { ffi::spdk_env_init(&opts) };
        if rc == 0 {
            Ok(())
        } else {
            Err(-rc)
        }
    });
    outcome.map_err(|errno| {
        io_error(format!(
            "spdk_env_init failed: {} (hugepages reserved? run scripts/setup.sh, or SPDK's \
             scripts/setup.sh, as root)",
            io::Error::from_raw_os_error(errno)
        ))
    })
}

/// An NVMe controller attached through SPDK, and its namespace 1. Shared by every reactor's
/// queue pair (each allocates its own I/O queue pair on it); detached when the last drops.
pub struct SpdkController {
    pub(super) ctrlr: NonNull<ffi::spdk_nvme_ctrlr>,
    pub(super) ns: NonNull<ffi::spdk_nvme_ns>,
    pub(super) sector_size: u32,
    pub(super) sectors: u64,
    pub(super) transfer_max_bytes: u32,
    pub(super) transport_id: String,
}

// SAFETY: the controller-level calls Carmine makes after attaching (allocating and freeing I/O
// queue pairs, reading namespace geometry) take SPDK's controller lock or read fields fixed at
// attach; each queue pair is then used by one thread at a time (`SpdkQueuePair` is not Sync).
unsafe impl Send for SpdkController {}
// SAFETY: as for Send: shared access only makes the thread-safe calls above.
unsafe impl Sync for SpdkController {}

impl SpdkController {
    /// Initializes SPDK's environment (once per process) and attaches the controller at
    /// `transport_id`, SPDK's syntax: `trtype=PCIe traddr=0000:00:04.0` (`:` works for `=`).
    ///
    /// Errors: InvalidInput for a string SPDK cannot parse; the attach failure otherwise, or
    /// Unsupported for a namespace whose sector size does not divide 4096.
    pub fn connect(transport_id: &str) -> io::Result<Arc<SpdkController>> {
        let text = CString::new(transport_id).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "transport ID contains a NUL byte",
            )
        })?;
        init_environment()?;
        let mut trid = ffi::spdk_nvme_transport_id::default();
        // SAFETY: `trid` is a live transport ID and `text` a NUL-terminated string.
        let rc = unsafe { ffi::spdk_nvme_transport_id_parse(&mut trid, text.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "'{transport_id}' is not an SPDK transport ID (e.g. 'trtype=PCIe \
                     traddr=0000:00:04.0'): {}",
                    io::Error::from_raw_os_error(-rc)
                ),
            ));
        }
        // SAFETY: `trid` was filled in by SPDK; null options ask for the defaults.
        let ctrlr = unsafe { ffi::spdk_nvme_connect(&trid, std::ptr::null(), 0) };
        let Some(ctrlr) = NonNull::new(ctrlr) else {
            return Err(io_error(format!(
                "cannot attach NVMe controller '{transport_id}' through SPDK (bound to \
                 vfio-pci or uio? already attached by another process?)"
            )));
        };
        // From here on `detach` runs on every exit path, through the controller's Drop.
        let mut controller = SpdkController {
            ctrlr,
            ns: NonNull::dangling(),
            sector_size: 0,
            sectors: 0,
            transfer_max_bytes: 0,
            transport_id: transport_id.to_string(),
        };
        // SAFETY: `ctrlr` is attached; namespace ids start at 1.
        let ns = unsafe { ffi::spdk_nvme_ctrlr_get_ns(ctrlr.as_ptr(), 1) };
        // SAFETY: `ns` is checked non-null before it is asked anything.
        let Some(ns) =
            NonNull::new(ns).filter(|ns| unsafe { ffi::spdk_nvme_ns_is_active(ns.as_ptr()) })
        else {
            return Err(io_error(format!(
                "{transport_id}: namespace 1 is not active"
            )));
        };
        controller.ns = ns;
        // SAFETY: `ns` is an active namespace of the attached controller.
        unsafe {
            controller.sector_size = ffi::spdk_nvme_ns_get_sector_size(ns.as_ptr());
            controller.sectors = ffi::spdk_nvme_ns_get_num_sectors(ns.as_ptr());
            controller.transfer_max_bytes = ffi::spdk_nvme_ns_get_max_io_xfer_size(ns.as_ptr());
        }
        let sector = controller.sector_size as usize;
        if sector == 0 || !sector.is_power_of_two() || BLOCK_SIZE_BYTES % sector != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{transport_id}: namespace 1 has {sector}-byte sectors; Carmine needs a \
                     sector size dividing {BLOCK_SIZE_BYTES}"
                ),
            ));
        }
        if (controller.transfer_max_bytes as usize) < BLOCK_SIZE_BYTES {
            return Err(io_error(format!(
                "{transport_id}: maximum transfer of {} bytes is below one block",
                controller.transfer_max_bytes
            )));
        }
        log::info!(
            "spdk {transport_id}: namespace 1, {} sectors of {sector} bytes, transfers up to {} KiB",
            controller.sectors,
            controller.transfer_max_bytes >> 10
        );
        Ok(Arc::new(controller))
    }

    /// Bytes namespace 1 holds.
    pub fn capacity_bytes(&self) -> u64 {
        self.sectors * u64::from(self.sector_size)
    }

    /// The namespace's sector (LBA) size in bytes.
    pub fn sector_size_bytes(&self) -> u32 {
        self.sector_size
    }

    /// The transport ID the controller was attached with.
    pub fn transport_id(&self) -> &str {
        &self.transport_id
    }
}

impl Drop for SpdkController {
    fn drop(&mut self) {
        // SAFETY: attached in `connect`, detached only here; every queue pair holds an `Arc`
        // to us and frees its SPDK queue pair first, so none is left.
        let rc = unsafe { ffi::spdk_nvme_detach(self.ctrlr.as_ptr()) };
        if rc != 0 {
            log::warn!("spdk {}: detach failed ({rc})", self.transport_id);
        }
    }
}
