//! Probes for the C libraries behind the optional features. Without a feature nothing is probed,
//! so the default build needs no C toolchain beyond what Rust itself needs.
use std::process::Command;

fn pkg_config_exists(name: &str) -> bool {
    Command::new("pkg-config")
        .args(["--exists", name])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_DPDK").is_some() && !pkg_config_exists("libdpdk") {
        panic!(
            "feature `dpdk` needs DPDK 22.11 development files: \
             apt-get install -y --no-install-recommends libdpdk-dev dpdk pkg-config clang libclang-dev"
        );
    }
    if std::env::var_os("CARGO_FEATURE_SPDK").is_some() && !pkg_config_exists("spdk_nvme") {
        panic!(
            "feature `spdk` needs SPDK installed with its pkg-config files (spdk_nvme.pc); \
             SPDK is not packaged in Debian: build it from source and set PKG_CONFIG_PATH"
        );
    }
}
