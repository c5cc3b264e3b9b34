//! Safe wrappers over DPDK (feature `dpdk`): the environment abstraction layer ([`Eal`]), packet
//! buffer pools ([`Mempool`]), owned packet buffers ([`Mbuf`]) and ethernet ports ([`Port`]).
//!
//! `unsafe` stays in these files; each block says why it is sound. The raw bindings are
//! `carmine_ffi::dpdk`. Threading model (Carmine's): one reactor thread owns one rx and one tx
//! queue of a port, so burst calls take `&mut` on a per-queue handle and are never shared.

mod attach;
mod eal;
pub mod heap;
mod mbuf;
mod mempool;
pub mod net;
mod port;
mod rooms;
pub mod udp;

pub use attach::TxAttach;
pub use eal::{register_current_thread, Eal, EalMemory};
pub use mbuf::Mbuf;
pub use mempool::Mempool;
pub use port::{MacAddr, Port, PortConfig, PortStats, RxQueue, TxQueue, BURST_MAX};

use carmine_ffi::dpdk as sys;
use std::ffi::CStr;
use std::fmt;

/// An error from a DPDK call: which call, and DPDK's errno-style code (positive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpdkError {
    /// The DPDK function that failed.
    pub call: &'static str,
    /// Positive errno value (DPDK returns `-errno` or sets `rte_errno`).
    pub code: i32,
}

impl DpdkError {
    /// From a DPDK return value `rc < 0` (`-errno`).
    pub(crate) fn from_rc(call: &'static str, rc: i32) -> DpdkError {
        debug_assert!(rc < 0);
        DpdkError { call, code: -rc }
    }

    /// From `rte_errno`, for calls that return NULL or -1 and set it.
    pub(crate) fn from_errno(call: &'static str) -> DpdkError {
        // SAFETY: reads this thread's rte_errno through the shim; no arguments, no side effects.
        let code = unsafe { sys::carmine_rte_errno() };
        DpdkError { call, code }
    }
}

impl fmt::Display for DpdkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated
        // string for any code; we copy it out before returning.
        let text = unsafe { CStr::from_ptr(sys::rte_strerror(self.code)) };
        write!(
            f,
            "{} failed: {} ({})",
            self.call,
            text.to_string_lossy(),
            self.code
        )
    }
}

impl std::error::Error for DpdkError {}
