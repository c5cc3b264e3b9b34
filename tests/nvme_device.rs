//! `nvme:PCI_ADDRESS` devices from the command line, on a machine without that controller: the
//! errors must name the device and say what to do. (With a controller, ci/vm/e2e.sh runs mkfs,
//! serve, load and fsck on one inside the QEMU guest.)

mod common;

use std::process::Command;

use common::CARMINE;

/// A PCI address no machine here has.
const MISSING: &str = "nvme:0000:ff:1f.7";

fn run(args: &[&str]) -> (bool, String) {
    let output = Command::new(CARMINE)
        .args(args)
        .output()
        .expect("run carmine");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn mkfs_and_fsck_on_a_missing_controller_say_so() {
    let (ok, text) = run(&["mkfs", "--device", MISSING]);
    assert!(!ok, "{text}");
    assert!(text.contains("no PCI device 0000:ff:1f.7"), "{text}");
    let (ok, text) = run(&["fsck", "--device", MISSING]);
    assert!(!ok, "{text}");
    assert!(text.contains("no PCI device 0000:ff:1f.7"), "{text}");
}

#[test]
fn serve_on_a_missing_controller_fails_at_start_up() {
    let (ok, text) = run(&["serve", "--listen", "127.0.0.1:0", "--device", MISSING]);
    assert!(!ok, "{text}");
    assert!(text.contains("no PCI device 0000:ff:1f.7"), "{text}");
}

#[test]
fn classic_mode_refuses_an_nvme_device_with_the_fix() {
    let (ok, text) = run(&[
        "serve",
        "--mode",
        "classic",
        "--store",
        "segment",
        "--listen",
        "127.0.0.1:0",
        "--device",
        MISSING,
    ]);
    assert!(!ok, "{text}");
    assert!(text.contains("use --mode rtc"), "{text}");
}
