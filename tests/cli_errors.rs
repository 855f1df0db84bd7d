//! Every user error gives one clear sentence and a non-zero exit, before any
//! guest runs.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;

use common::{launch, launch_file, Scratch, VMM};

fn assert_fails_with(run: &common::Launch, needle: &str) {
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains(needle),
        "want {needle:?}\n{}",
        run.describe()
    );
    assert_eq!(
        run.stderr
            .lines()
            .filter(|l| l.starts_with("vmm: error:"))
            .count(),
        1,
        "{}",
        run.describe()
    );
}

#[test]
fn config_that_is_not_json_names_line_and_column() {
    let s = Scratch::new("cli-json");
    let run = launch(&s, "{\n  \"vcpus\": 1,\n  memory_mib: 128\n}");
    assert_fails_with(&run, "line 3 column 3");
}

#[test]
fn unknown_field_is_named() {
    let s = Scratch::new("cli-unknown");
    let run = launch(&s, r#"{"vcpu": 2}"#);
    assert_fails_with(&run, "unknown field `vcpu`");
}

#[test]
fn missing_config_file() {
    let s = Scratch::new("cli-noconfig");
    let run = launch_file(&s, &s.path("absent.json"));
    assert_fails_with(&run, "cannot read config file");
}

#[test]
fn missing_or_unreadable_kernel() {
    let s = Scratch::new("cli-kernel");
    let run = launch(&s, r#"{"kernel": "/nonexistent/vmlinux"}"#);
    assert_fails_with(&run, "cannot open the kernel /nonexistent/vmlinux");
    // A directory is not readable as a kernel.
    let run = launch(&s, r#"{"kernel": "/tmp"}"#);
    assert_fails_with(&run, "cannot open the kernel /tmp: not a regular file");
    let junk = s.file("junk", &"x".repeat(4096));
    let run = launch(&s, &format!(r#"{{"kernel": "{}"}}"#, junk.display()));
    assert_fails_with(&run, "is not a kernel this VMM can boot");
}

#[test]
fn missing_or_unreadable_initramfs() {
    let s = Scratch::new("cli-initramfs");
    let run = launch(&s, r#"{"initramfs": "/nonexistent/initramfs.cpio"}"#);
    assert_fails_with(
        &run,
        "cannot open the initramfs /nonexistent/initramfs.cpio",
    );
    let run = launch(&s, r#"{"initramfs": "/tmp"}"#);
    assert_fails_with(&run, "cannot open the initramfs /tmp: not a regular file");
}

#[test]
fn memory_below_what_the_kernel_needs() {
    let s = Scratch::new("cli-memory");
    let run = launch(&s, r#"{"memory_mib": 16}"#);
    assert_fails_with(
        &run,
        "\"memory_mib\" is 16, but this kernel and initramfs need at least",
    );
    let run = launch(&s, r#"{"memory_mib": 0}"#);
    assert_fails_with(&run, "\"memory_mib\" is 0");
}

#[test]
fn vcpus_zero_or_above_the_host_limit() {
    let s = Scratch::new("cli-vcpus");
    let run = launch(&s, r#"{"vcpus": 0}"#);
    assert_fails_with(&run, "\"vcpus\" is 0");
    let run = launch(&s, r#"{"vcpus": 100000}"#);
    assert_fails_with(&run, "\"vcpus\" is 100000, but this host allows at most");
}

#[test]
fn no_kvm_device() {
    let s = Scratch::new("cli-nokvm");
    let config = s.file("vm.json", "{}");
    let out = Command::new(VMM)
        .args(["launch", "--config"])
        .arg(&config)
        .env("VMM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot open /nonexistent/kvm") && stderr.contains("modprobe"),
        "{stderr}"
    );
}

#[test]
fn no_permission_on_kvm_device() {
    // As an unprivileged user (nobody), /dev/kvm (mode 0600 root here, or
    // group kvm elsewhere) cannot be opened.
    let s = Scratch::new("cli-kvmperm");
    let config = s.file("vm.json", "{}");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&s.0, PermissionsExt::from_mode(0o755)).unwrap();
    // The build tree may sit where that user cannot reach (under /root):
    // run a copy of the binary from the scratch directory.
    let vmm = s.path("vmm");
    std::fs::copy(VMM, &vmm).unwrap();
    std::fs::set_permissions(&vmm, PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new(&vmm)
        .args(["launch", "--config"])
        .arg(&config)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Permission denied") && stderr.contains("usermod -aG kvm"),
        "{stderr}"
    );
}

#[test]
fn doctor_gives_a_verdict() {
    let out = Command::new(VMM).arg("doctor").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("verdict:"), "{stdout}");
    assert!(stdout.contains("hypervisor:"), "{stdout}");
    // This machine lets a jail make its namespaces and has Landlock.
    assert!(
        stdout.contains("[ok  ] jail: user namespaces: allowed"),
        "{stdout}"
    );
    assert!(stdout.contains("jail: Landlock: ABI version "), "{stdout}");
    assert!(stdout.contains("jail: cgroup v2: "), "{stdout}");
    // This machine has KVM and the setup command built the artifacts.
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let out = Command::new(VMM)
        .arg("doctor")
        .env("VMM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("[FAIL]") && stdout.contains("fix:"),
        "{stdout}"
    );
}
