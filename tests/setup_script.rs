//! scripts/setup.sh against a fake /sys and /proc (CARMINE_SETUP_SYSFS / CARMINE_SETUP_PROC):
//! what `bind` refuses and what `--dry-run` would write. Its real binding runs in the ci/vm
//! guest, whose init binds the emulated controller with it.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output};

use common::TestDir;

const ADDRESS: &str = "0000:00:04.0";

/// A fake sysfs with one NVMe controller bound to `nvme`, namespace nvme0n1 with partition
/// nvme0n1p1, and an empty /proc/mounts.
fn fake_machine(dir: &Path) {
    let device = dir.join("sys/bus/pci/devices").join(ADDRESS);
    std::fs::create_dir_all(device.join("nvme/nvme0/nvme0n1/nvme0n1p1")).unwrap();
    std::fs::write(device.join("class"), "0x010802\n").unwrap();
    std::fs::create_dir_all(dir.join("sys/bus/pci/drivers/nvme")).unwrap();
    std::fs::create_dir_all(dir.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
    std::fs::create_dir_all(dir.join("sys/kernel/iommu_groups/7")).unwrap();
    symlink(dir.join("sys/bus/pci/drivers/nvme"), device.join("driver")).unwrap();
    symlink(
        dir.join("sys/kernel/iommu_groups/7"),
        device.join("iommu_group"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("sys/class/block/nvme0n1/holders")).unwrap();
    std::fs::create_dir_all(dir.join("sys/class/block/nvme0n1p1/holders")).unwrap();
    std::fs::create_dir_all(dir.join("proc/sys/vm")).unwrap();
    std::fs::write(dir.join("proc/mounts"), "proc /proc proc rw 0 0\n").unwrap();
    std::fs::write(dir.join("proc/swaps"), "Filename Type Size Used Priority\n").unwrap();
    std::fs::write(
        dir.join("proc/meminfo"),
        "HugePages_Total:      16\nHugePages_Free:       16\n",
    )
    .unwrap();
}

fn setup(dir: &Path, args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup.sh");
    Command::new("sh")
        .arg(script)
        .args(args)
        .env("CARMINE_SETUP_SYSFS", dir.join("sys"))
        .env("CARMINE_SETUP_PROC", dir.join("proc"))
        .output()
        .expect("run scripts/setup.sh")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn dry_run_bind_prints_the_writes_and_changes_nothing() {
    let dir = TestDir::new("setup-dry-run");
    fake_machine(&dir.0);
    let output = setup(&dir.0, &["--dry-run", "bind", ADDRESS]);
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("would write 'vfio-pci' to"), "{printed}");
    assert!(
        printed.contains(&format!("would write '{ADDRESS}' to")),
        "{printed}"
    );
    assert!(printed.contains("driver/unbind"), "{printed}");
    let device = dir.0.join("sys/bus/pci/devices").join(ADDRESS);
    assert!(
        !device.join("driver_override").exists(),
        "dry run wrote a file"
    );
}

#[test]
fn bind_refuses_a_controller_with_a_mounted_partition() {
    let dir = TestDir::new("setup-mounted");
    fake_machine(&dir.0);
    std::fs::write(
        dir.0.join("proc/mounts"),
        "/dev/nvme0n1p1 /data ext4 rw,relatime 0 0\n",
    )
    .unwrap();
    for args in [&["bind", ADDRESS][..], &["--dry-run", "bind", ADDRESS][..]] {
        let output = setup(&dir.0, args);
        let printed = text(&output);
        assert!(!output.status.success(), "{printed}");
        assert!(
            printed.contains("refusing to bind 0000:00:04.0: /dev/nvme0n1p1 is mounted on /data"),
            "{printed}"
        );
    }
    let device = dir.0.join("sys/bus/pci/devices").join(ADDRESS);
    assert!(!device.join("driver_override").exists());
    let status = text(&setup(&dir.0, &["status"]));
    assert!(status.contains("driver nvme, iommu group 7"), "{status}");
    assert!(
        status.contains("nvme0n1p1 (in use: /dev/nvme0n1p1 is mounted on /data)"),
        "{status}"
    );
    assert!(status.contains("hugepages: 16 reserved"), "{status}");
}

#[test]
fn bind_refuses_swap_and_held_namespaces_and_non_nvme_devices() {
    let dir = TestDir::new("setup-held");
    fake_machine(&dir.0);
    std::fs::create_dir_all(dir.0.join("sys/class/block/nvme0n1/holders/dm-0")).unwrap();
    let printed = text(&setup(&dir.0, &["--dry-run", "bind", ADDRESS]));
    assert!(
        printed.contains("/dev/nvme0n1 is held by dm-0"),
        "{printed}"
    );
    std::fs::remove_dir(dir.0.join("sys/class/block/nvme0n1/holders/dm-0")).unwrap();
    std::fs::write(dir.0.join("proc/swaps"), "/dev/nvme0n1 partition 1 0 -2\n").unwrap();
    let printed = text(&setup(&dir.0, &["--dry-run", "bind", ADDRESS]));
    assert!(
        printed.contains("/dev/nvme0n1 is used as swap"),
        "{printed}"
    );
    let printed = text(&setup(&dir.0, &["--dry-run", "bind", "0000:00:09.0"]));
    assert!(printed.contains("no PCI device 0000:00:09.0"), "{printed}");
    let printed = text(&setup(&dir.0, &["--dry-run", "hugepages", "lots"]));
    assert!(printed.contains("not a number"), "{printed}");
    let output = setup(&dir.0, &["hugepages", "32"]);
    assert!(output.status.success(), "{}", text(&output));
    let reserved = std::fs::read_to_string(dir.0.join("proc/sys/vm/nr_hugepages")).unwrap();
    assert_eq!(reserved.trim(), "32");
}
