//! Probes for the C libraries behind the optional features and, with `dpdk`, generates the
//! bindings. Without a feature nothing is probed or generated, so the default build needs no C
//! toolchain beyond what Rust itself needs, and no clang.
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
    #[cfg(feature = "dpdk")]
    dpdk::generate();
}

#[cfg(feature = "dpdk")]
mod dpdk {
    use std::path::PathBuf;
    use std::process::Command;

    /// Functions Carmine calls. DPDK's hot path (`rte_eth_rx_burst`, `rte_pktmbuf_alloc`, ...)
    /// is `static inline`: bindgen's `wrap_static_fns` emits a C wrapper for each, compiled below.
    const FUNCTIONS: &[&str] = &[
        "rte_eal_init",
        "rte_eal_cleanup",
        "rte_strerror",
        "rte_socket_id",
        "rte_lcore_id",
        "rte_thread_register",
        "rte_pktmbuf_pool_create",
        "rte_pktmbuf_pool_create_extbuf",
        "rte_pktmbuf_attach_extbuf",
        "rte_pktmbuf_chain",
        "rte_eal_iova_mode",
        "rte_mempool_free",
        "rte_mempool_avail_count",
        "rte_mempool_in_use_count",
        "rte_pktmbuf_alloc",
        "rte_pktmbuf_alloc_bulk",
        "rte_pktmbuf_free",
        "rte_pktmbuf_append",
        "rte_pktmbuf_trim",
        "rte_pktmbuf_adj",
        "rte_pktmbuf_reset",
        "rte_pktmbuf_data_room_size",
        "rte_pktmbuf_headroom",
        "rte_pktmbuf_tailroom",
        "rte_mbuf_refcnt_read",
        "rte_eth_dev_count_avail",
        "rte_eth_dev_get_port_by_name",
        "rte_eth_dev_info_get",
        "rte_eth_dev_configure",
        "rte_eth_dev_socket_id",
        "rte_eth_rx_queue_setup",
        "rte_eth_tx_queue_setup",
        "rte_eth_dev_start",
        "rte_eth_dev_stop",
        "rte_eth_dev_close",
        "rte_eth_dev_set_mtu",
        "rte_eth_dev_get_mtu",
        "rte_eth_macaddr_get",
        "rte_eth_promiscuous_enable",
        "rte_eth_stats_get",
        "rte_eth_rx_burst",
        "rte_eth_tx_burst",
        "carmine_.*",
    ];

    const TYPES: &[&str] = &[
        "rte_mbuf",
        "rte_mempool",
        "rte_pktmbuf_extmem",
        "rte_mbuf_ext_shared_info",
        "rte_iova_mode",
        "rte_eth_conf",
        "rte_eth_dev_info",
        "rte_eth_rxconf",
        "rte_eth_txconf",
        "rte_eth_stats",
        "rte_ether_addr",
    ];

    const VARS: &[&str] = &[
        "RTE_MBUF_DEFAULT_BUF_SIZE",
        "RTE_PKTMBUF_HEADROOM",
        "RTE_MAX_ETHPORTS",
        "RTE_ETHER_MTU",
        "RTE_ETHER_MAX_LEN",
        "SOCKET_ID_ANY",
    ];

    fn pkg_config(arg: &str) -> Vec<String> {
        let out = Command::new("pkg-config")
            .args([arg, "libdpdk"])
            .output()
            .expect("pkg-config runs (probed above)");
        assert!(out.status.success(), "pkg-config {arg} libdpdk failed");
        String::from_utf8(out.stdout)
            .expect("pkg-config prints UTF-8")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// `pkg-config --cflags` splits `-include rte_config.h` into two words; keep them as a pair.
    fn cflags() -> Vec<String> {
        pkg_config("--cflags")
    }

    pub fn generate() {
        let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
        let dir = manifest.join("src/dpdk");
        let header = dir.join("wrapper.h");
        let shim = dir.join("shim.c");
        println!("cargo:rerun-if-changed={}", header.display());
        println!("cargo:rerun-if-changed={}", shim.display());
        let flags = cflags();

        let mut builder = bindgen::Builder::default()
            .header(header.to_str().unwrap())
            .clang_args(&flags)
            .clang_arg(format!("-I{}", dir.display()))
            // The static inline hot functions become real symbols `<name>__extern` in a C file.
            .wrap_static_fns(true)
            .wrap_static_fns_path(out.join("dpdk_static_fns"))
            .derive_default(true)
            .prepend_enum_name(false)
            .generate_comments(false)
            .layout_tests(true)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        for f in FUNCTIONS {
            builder = builder.allowlist_function(f);
        }
        for t in TYPES {
            builder = builder.allowlist_type(t);
        }
        for v in VARS {
            builder = builder.allowlist_var(v);
        }
        builder
            .generate()
            .expect("bindgen over DPDK headers (needs clang and libclang-dev)")
            .write_to_file(out.join("dpdk_bindings.rs"))
            .expect("write bindings");

        // The wrappers and the macro shim, compiled with DPDK's own flags (`-include
        // rte_config.h`, `-march=...`): the inline functions read config macros and use SSE.
        let mut build = cc::Build::new();
        build
            .file(out.join("dpdk_static_fns.c"))
            .file(&shim)
            .include(&dir)
            .warnings(false);
        let mut words = flags.iter();
        while let Some(w) = words.next() {
            if w == "-include" {
                build.flag("-include");
                build.flag(words.next().expect("-include takes a file"));
            } else {
                build.flag(w);
            }
        }
        build.compile("carmine_dpdk_shim");

        // Link the DPDK shared libraries after the shim (it calls them). A shared DPDK loads its
        // PMDs (net_ring, net_memif, net_tap, ...) itself from its plugin directory at EAL start.
        for word in pkg_config("--libs") {
            if let Some(lib) = word.strip_prefix("-l") {
                println!("cargo:rustc-link-lib=dylib={lib}");
            } else if let Some(path) = word.strip_prefix("-L") {
                println!("cargo:rustc-link-search=native={path}");
            }
        }
    }
}
