//! Tells the build which optional kernel-bypass libraries the machine has.
//! The default build needs none of them; features `dpdk`/`spdk` are checked in `ffi/build.rs`.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    let has_dpdk = std::process::Command::new("pkg-config")
        .args(["--exists", "libdpdk"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    println!("cargo:rustc-check-cfg=cfg(carmine_has_dpdk)");
    if has_dpdk {
        println!("cargo:rustc-cfg=carmine_has_dpdk");
    }
}
