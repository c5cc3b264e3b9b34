//! Raw bindings to C libraries. Only this crate calls C (besides `libc` system calls).
//!
//! `vfio`: the VFIO ioctls and structs the native NVMe driver (`carmine-storage`) uses,
//! hand-written with layout asserts (no clang needed, always built).
//! Feature `dpdk`: bindings over DPDK 22.11 in [`dpdk`] (bindgen at build time). Feature `spdk`:
//! bindings over SPDK's NVMe driver and environment in [`spdk`] (bindgen at build time, against
//! real SPDK or the stand-in in `ci/spdk-stub/`). Without the library installed, either feature
//! fails early with a message that says what to install, instead of half-way through a link.

pub mod vfio;

#[cfg(feature = "dpdk")]
pub mod dpdk;

#[cfg(feature = "spdk")]
pub mod spdk;

/// True when the crate was built with DPDK bindings.
pub const DPDK_ENABLED: bool = cfg!(feature = "dpdk");
/// True when the crate was built with SPDK bindings.
pub const SPDK_ENABLED: bool = cfg!(feature = "spdk");

#[cfg(test)]
mod tests {
    #[test]
    fn default_build_has_no_c_bindings() {
        assert!(!super::DPDK_ENABLED || cfg!(feature = "dpdk"));
        assert!(!super::SPDK_ENABLED || cfg!(feature = "spdk"));
    }
}
