//! Raw bindings to C libraries. Only this crate calls C (besides `libc` system calls).
//!
//! `vfio`: the VFIO ioctls and structs the native NVMe driver (`carmine-storage`) uses,
//! hand-written with layout asserts (no clang needed). DPDK and SPDK bindings land with their
//! issues; today the crate carries those features and the build-time probe, so that
//! `--features dpdk` fails early with a clear message on a machine without DPDK instead of
//! half-way through a link.

pub mod vfio;

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
