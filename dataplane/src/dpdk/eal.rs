//! DPDK's environment abstraction layer: started once per process.
//!
//! `rte_eal_init` may be called only once in a process's life (a second call fails with
//! EALREADY, even after `rte_eal_cleanup`), so [`Eal::init`] hands out one process-wide token and
//! later calls get an error saying so. Tests that start the EAL therefore run as their own test
//! binaries (`harness = false`) or subprocesses.

use super::{sys, DpdkError};
use std::ffi::{c_char, c_int, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the first `Eal::init`, never cleared: DPDK forbids a second init.
static STARTED: AtomicBool = AtomicBool::new(false);

/// Proof that the EAL is running. Mempools and ports borrow nothing from it, but their
/// constructors take `&Eal` so they cannot be called before `rte_eal_init` succeeded.
#[derive(Debug)]
pub struct Eal {
    _private: (),
}

impl Eal {
    /// Starts the EAL with `args` (as on a DPDK command line, without the program name;
    /// e.g. `["--no-huge", "--no-pci", "-m", "256", "--vdev", "net_ring0"]`).
    /// The calling thread becomes the main lcore.
    pub fn init<S: AsRef<str>>(args: &[S]) -> Result<Eal, DpdkError> {
        if STARTED.swap(true, Ordering::AcqRel) {
            return Err(DpdkError {
                call: "rte_eal_init (EAL already started in this process)",
                code: libc::EALREADY,
            });
        }
        let mut owned = Vec::with_capacity(args.len() + 1);
        owned.push(CString::new("carmine").unwrap());
        for a in args {
            let a = a.as_ref();
            match CString::new(a) {
                Ok(c) => owned.push(c),
                Err(_) => {
                    return Err(DpdkError {
                        call: "rte_eal_init (argument has a NUL byte)",
                        code: libc::EINVAL,
                    })
                }
            }
        }
        // rte_eal_init may permute argv and keeps pointers into it (e.g. for --file-prefix),
        // so the strings and the pointer array are leaked: one small allocation per process.
        let owned: &'static mut [CString] = owned.leak();
        let argv: &'static mut [*mut c_char] = owned
            .iter()
            .map(|c| c.as_ptr() as *mut c_char)
            .collect::<Vec<_>>()
            .leak();
        let argc = argv.len() as c_int;
        // SAFETY: argv holds argc valid NUL-terminated strings that live for the rest of the
        // process (leaked above), as rte_eal_init requires; STARTED guarantees one call.
        let rc = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        if rc < 0 {
            return Err(DpdkError::from_errno("rte_eal_init"));
        }
        Ok(Eal { _private: () })
    }

    /// Number of ethernet ports the EAL found (PCI devices and `--vdev`s).
    pub fn port_count(&self) -> u16 {
        // SAFETY: the EAL is initialised (self exists); the call only reads the device table.
        unsafe { sys::rte_eth_dev_count_avail() }
    }

    /// Reserves `len` bytes of the EAL's own memory (a memzone named `name`, unique in the
    /// process), aligned to `align` (a power of two), for the rest of the process: memzones are
    /// never freed here, since what uses them (rx rooms behind a mempool) lives as long.
    ///
    /// Why EAL memory rather than an anonymous mapping: it is the memory a memif peer sees when
    /// the port is a zero-copy client (memif shares the EAL's memory segments with the peer,
    /// which then writes received frames straight into our rooms), and it has an IOVA.
    pub fn reserve_memory(
        &self,
        name: &str,
        len: usize,
        align: u32,
    ) -> Result<EalMemory, DpdkError> {
        assert!(len > 0);
        assert!(align.is_power_of_two());
        let cname = CString::new(name).map_err(|_| DpdkError {
            call: "rte_memzone_reserve_aligned (name has a NUL byte)",
            code: libc::EINVAL,
        })?;
        // SAFETY: the EAL is running (self exists); the name is a valid C string that DPDK
        // copies; the call allocates and returns a descriptor DPDK keeps (or null).
        let zone = unsafe {
            sys::rte_memzone_reserve_aligned(
                cname.as_ptr(),
                len,
                sys::SOCKET_ID_ANY,
                sys::RTE_MEMZONE_SIZE_HINT_ONLY,
                align,
            )
        };
        if zone.is_null() {
            return Err(DpdkError::from_errno("rte_memzone_reserve_aligned"));
        }
        // SAFETY: a non-null memzone is DPDK's descriptor, valid until freed, which nobody does.
        let (addr, iova, zone_len) = unsafe {
            let zone = &*zone;
            (zone.__bindgen_anon_1.addr, zone.iova, zone.len)
        };
        assert!(zone_len >= len, "memzone of {zone_len} bytes for {len}");
        let ptr = NonNull::new(addr.cast::<u8>()).expect("a reserved memzone has an address");
        assert_eq!(
            ptr.as_ptr() as usize % align as usize,
            0,
            "memzone alignment"
        );
        Ok(EalMemory { ptr, len, iova })
    }

    /// The NUMA socket of the calling thread (`SOCKET_ID_ANY` maps to 0 with `--no-huge`).
    pub fn socket_id(&self) -> i32 {
        // SAFETY: reads the calling lcore's per-thread socket id; no preconditions.
        unsafe { sys::rte_socket_id() as i32 }
    }
}

/// A piece of the EAL's memory, reserved for the rest of the process (`Eal::reserve_memory`).
#[derive(Debug, Clone, Copy)]
pub struct EalMemory {
    pub ptr: NonNull<u8>,
    pub len: usize,
    /// The device address of `ptr` (`u64::MAX`, DPDK's RTE_BAD_IOVA, when it has none).
    pub iova: u64,
}

/// Gives the calling thread (not started by the EAL: a reactor, the load generator) an lcore
/// id, so that its mempool gets and puts use a per-lcore cache instead of the pool's shared
/// ring every time. Fails when the EAL is not running or every lcore id is taken; the thread
/// then still works, without a cache.
pub fn register_current_thread() -> Result<u32, DpdkError> {
    if !STARTED.load(Ordering::Acquire) {
        return Err(DpdkError {
            call: "rte_thread_register (EAL not started)",
            code: libc::EINVAL,
        });
    }
    // SAFETY: no arguments; DPDK checks that its init completed and records the lcore id in
    // this thread's own state (the caller's CPU affinity is read, not changed).
    let rc = unsafe { sys::rte_thread_register() };
    if rc < 0 {
        return Err(DpdkError::from_errno("rte_thread_register"));
    }
    // SAFETY: reads this thread's lcore id; no preconditions.
    Ok(unsafe { sys::rte_lcore_id() })
}
