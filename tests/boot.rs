//! Boots the real guest kernel with the default initramfs on this machine.
//! Needs /dev/kvm and the artifacts `tools/setup.sh` builds; without them
//! these tests fail and say so.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{launch, Scratch, VMM};

const READY: &str = "vmm-init: ready";

#[test]
fn guest_boots_prints_its_line_and_powers_off() {
    let scratch = Scratch::new("boot-default");
    let run = launch(&scratch, r#"{"cmdline": "loglevel=6 printk.time=1"}"#);
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert!(run.stdout.contains(READY), "{}", run.describe());
    // The VMM's boot seed made the kernel's random generator ready before
    // its clock ran (no seconds of jitter gathering).
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("[    0.000000] random: crng init done")),
        "{}",
        run.describe()
    );
    // The boot timer saw the init's write, after the first vCPU entry.
    let report = run.report.as_ref().expect("a launch report");
    let setup = report["vmm_setup_ms"].as_f64().expect("vmm_setup_ms");
    let init = report["boot_to_init_ms"].as_f64().expect("boot_to_init_ms");
    assert!(setup > 0.0 && init > setup, "{report}");
    assert_eq!(report["exit_reason"], "the guest shut down");
}

#[test]
fn two_vcpus_are_online_and_a_guest_reboot_ends_the_vm_cleanly() {
    let scratch = Scratch::new("boot-smp-reboot");
    // busybox `reboot -f` asks the kernel for a restart, which goes through
    // the i8042 reset line; the VM must end with status 0.
    let run = launch(
        &scratch,
        r#"{"vcpus": 2, "memory_mib": 256, "cmdline": "-- reboot -f"}"#,
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert!(
        run.stdout.contains(&format!("{READY} cpus-online=0-1")),
        "{}",
        run.describe()
    );
    // The VM stopped at the reboot: init never got to report the command's end.
    assert!(!run.stdout.contains("command exited"), "{}", run.describe());
}

#[test]
fn a_guest_kernel_panic_is_a_failure_with_its_message() {
    let scratch = Scratch::new("boot-panic");
    // Without an init the kernel looks for a root file system, finds none
    // and panics (then reboots itself at once: panic=-1).
    let run = launch(&scratch, r#"{"cmdline": "rdinit=/nonexistent"}"#);
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains(
            "the guest kernel panicked: Kernel panic - not syncing: VFS: Unable to mount root fs"
        ),
        "{}",
        run.describe()
    );
}

#[test]
fn sigterm_stops_a_running_vm_cleanly() {
    let scratch = Scratch::new("boot-sigterm");
    let config = scratch.file("vm.json", r#"{"cmdline": "-- sleep 600"}"#);
    let mut child = Command::new(VMM)
        .arg("launch")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // Wait until the guest is up and running its long command.
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains(READY));
    assert!(ready, "the guest never printed its ready line");
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
}
