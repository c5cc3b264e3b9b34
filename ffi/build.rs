//! Probes for the C libraries behind the optional features and generates their bindings
//! (`dpdk`: DPDK 22.11; `spdk`: SPDK's NVMe driver, or Carmine's stand-in in `ci/spdk-stub/`).
//! Without a feature nothing is probed or generated, so the default build needs no C toolchain
//! beyond what Rust itself needs, and no clang.
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
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    if std::env::var_os("CARGO_FEATURE_SPDK").is_some()
        && !(pkg_config_exists("spdk_nvme") && pkg_config_exists("spdk_env_dpdk"))
    {
        panic!(
            "feature `spdk` needs SPDK installed with its pkg-config files (spdk_nvme.pc, \
             spdk_env_dpdk.pc) and clang/libclang-dev for bindgen; SPDK is not packaged in \
             Debian: build it from source (./configure --with-shared && make) and set \
             PKG_CONFIG_PATH=<spdk>/build/lib/pkgconfig (README.md, \"SPDK backend\"). For tests \
             without SPDK, Carmine's stand-in: PKG_CONFIG_PATH=$(ci/spdk-stub/build.sh)"
        );
    }
    #[cfg(feature = "dpdk")]
    dpdk::generate();
    #[cfg(feature = "spdk")]
    spdk::generate();
}

/// bindgen over `header` with `clang_args`, keeping only the named functions, types and
/// variables: the settings both libraries' bindings share.
#[cfg(any(feature = "dpdk", feature = "spdk"))]
fn allowlisted_bindings(
    header: &std::path::Path,
    clang_args: &[String],
    allow: (&[&str], &[&str], &[&str]),
    configure: impl FnOnce(bindgen::Builder) -> bindgen::Builder,
) -> bindgen::Builder {
    let (functions, types, vars) = allow;
    let mut builder = configure(
        bindgen::Builder::default()
            .header(header.to_str().expect("header path is UTF-8"))
            .clang_args(clang_args),
    )
    .derive_default(true)
    .prepend_enum_name(false)
    .generate_comments(false)
    .layout_tests(true)
    .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for f in functions {
        builder = builder.allowlist_function(f);
    }
    for t in types {
        builder = builder.allowlist_type(t);
    }
    for v in vars {
        builder = builder.allowlist_var(v);
    }
    builder
}

#[cfg(feature = "spdk")]
mod spdk {
    use std::path::PathBuf;
    use std::process::Command;

    /// Functions Carmine calls (`carmine-storage`'s `queue_pair::spdk`), and the shim's.
    const FUNCTIONS: &[&str] = &[
        "spdk_env_opts_init",
        "spdk_env_init",
        "spdk_dma_zmalloc",
        "spdk_dma_free",
        "spdk_mem_register",
        "spdk_mem_unregister",
        "spdk_nvme_transport_id_parse",
        "spdk_nvme_connect",
        "spdk_nvme_detach",
        "spdk_nvme_ctrlr_get_ns",
        "spdk_nvme_ns_is_active",
        "spdk_nvme_ns_get_sector_size",
        "spdk_nvme_ns_get_num_sectors",
        "spdk_nvme_ns_get_max_io_xfer_size",
        "spdk_nvme_ctrlr_get_default_io_qpair_opts",
        "spdk_nvme_ctrlr_alloc_io_qpair",
        "spdk_nvme_ctrlr_free_io_qpair",
        "spdk_nvme_ns_cmd_read",
        "spdk_nvme_ns_cmd_write",
        "spdk_nvme_ns_cmd_readv",
        "spdk_nvme_ns_cmd_writev",
        "spdk_nvme_ns_cmd_flush",
        "spdk_nvme_qpair_process_completions",
        "carmine_spdk_.*",
    ];

    const TYPES: &[&str] = &[
        "spdk_env_opts",
        "spdk_nvme_transport_id",
        "spdk_nvme_io_qpair_opts",
        "spdk_nvme_cpl",
        "spdk_nvme_cmd_cb",
        "spdk_nvme_req_reset_sgl_cb",
        "spdk_nvme_req_next_sge_cb",
    ];

    /// The libraries to link: the NVMe driver, its DPDK environment, and (real SPDK only) the
    /// system libraries they need.
    fn packages() -> Vec<&'static str> {
        let mut packages = vec!["spdk_nvme", "spdk_env_dpdk"];
        if super::pkg_config_exists("spdk_syslibs") {
            packages.push("spdk_syslibs");
        }
        packages
    }

    fn pkg_config(args: &[&str]) -> Vec<String> {
        let out = Command::new("pkg-config")
            .args(args)
            .args(packages())
            .output()
            .expect("pkg-config runs (probed above)");
        assert!(out.status.success(), "pkg-config {args:?} failed");
        String::from_utf8(out.stdout)
            .expect("pkg-config prints UTF-8")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Whether `spdk_nvme.pc` is Carmine's stand-in (it sets `carmine_spdk_stub=1`).
    fn is_stand_in() -> bool {
        Command::new("pkg-config")
            .args(["--variable=carmine_spdk_stub", "spdk_nvme"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "1")
            .unwrap_or(false)
    }

    pub fn generate() {
        let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
        let dir = manifest.join("src/spdk");
        let header = dir.join("wrapper.h");
        let shim = dir.join("shim.c");
        println!("cargo:rerun-if-changed={}", header.display());
        println!("cargo:rerun-if-changed={}", shim.display());
        let cflags = pkg_config(&["--cflags"]);
        for flag in &cflags {
            if let Some(include) = flag.strip_prefix("-I") {
                // Rebuild when the headers change (the stand-in is rebuilt by ci/spdk-stub).
                println!("cargo:rerun-if-changed={include}/spdk");
            }
        }
        if is_stand_in() {
            println!("cargo:rustc-env=CARMINE_SPDK_STUB=1");
            println!(
                "cargo:warning=feature `spdk` is built against Carmine's stand-in \
                 (ci/spdk-stub), not SPDK"
            );
        }

        super::allowlisted_bindings(&header, &cflags, (FUNCTIONS, TYPES, &[]), |b| b)
            .generate()
            .expect("bindgen over SPDK headers (needs clang and libclang-dev)")
            .write_to_file(out.join("spdk_bindings.rs"))
            .expect("write bindings");

        let mut build = cc::Build::new();
        build.file(&shim).include(&dir).warnings(false);
        for flag in &cflags {
            build.flag(flag);
        }
        build.compile("carmine_spdk_shim");

        // Link order as pkg-config gives it (the NVMe driver before the environment it calls).
        // Real SPDK is linked as shared libraries (`./configure --with-shared`): its
        // transports register themselves from constructors that a static link without
        // --whole-archive would drop.
        let libs = pkg_config(&["--libs"]);
        let dirs: Vec<&str> = libs.iter().filter_map(|w| w.strip_prefix("-L")).collect();
        for word in &libs {
            if let Some(lib) = word.strip_prefix("-l") {
                println!("cargo:rustc-link-lib={lib}");
                // A rebuilt static archive (the stand-in's) must relink what uses it.
                for dir in &dirs {
                    let archive = PathBuf::from(dir).join(format!("lib{lib}.a"));
                    if archive.exists() {
                        println!("cargo:rerun-if-changed={}", archive.display());
                    }
                }
            } else if let Some(path) = word.strip_prefix("-L") {
                println!("cargo:rustc-link-search=native={path}");
            }
        }
    }
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
        "rte_memzone_reserve_aligned",
        "rte_malloc",
        "rte_free",
        "rte_mem_virt2memseg_list",
        "rte_eth_link_get_nowait",
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
        "rte_memzone",
        "rte_memseg_list",
        "rte_eth_link",
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
        "RTE_MEMZONE_SIZE_HINT_ONLY",
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

        super::allowlisted_bindings(&header, &flags, (FUNCTIONS, TYPES, VARS), |b| {
            b.clang_arg(format!("-I{}", dir.display()))
                // The static inline hot functions become real symbols `<name>__extern` in a C
                // file.
                .wrap_static_fns(true)
                .wrap_static_fns_path(out.join("dpdk_static_fns"))
        })
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
