//! seccomp filters on a real VMM: a thread that makes a call its filter
//! forbids ends the VMM by SIGSYS, with a line naming the thread and the
//! call. The forbidden calls come from a test-only hook (the
//! `seccomp-test-hooks` feature, which `tools/test.sh` turns on); that
//! every thread of a running VMM is filtered is checked in
//! tests/cli_run_exec.rs.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::{Scratch, VMM};

/// Boots the default kernel and initramfs with the hook set for `role`;
/// the VMM's exit signal and standard error.
fn launch_with_forbidden_call(role: &str) -> (Option<i32>, String) {
    let scratch = Scratch::new(&format!("seccomp-{}", role.replace(' ', "-")));
    let config = scratch.file("vm.json", r#"{"serial": "off"}"#);
    let out = Command::new(VMM)
        .arg("launch")
        .arg("--config")
        .arg(&config)
        .env("VMM_TEST_FORBIDDEN_SYSCALL", role)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.signal(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hooks_built_in() -> bool {
    if cfg!(feature = "seccomp-test-hooks") {
        return true;
    }
    common::skipped(
        "seccomp hook tests",
        "build the tests with --features vmm/seccomp-test-hooks (tools/test.sh does)",
    );
    false
}

#[test]
fn a_vcpu_thread_that_calls_execve_ends_the_vmm_by_sigsys() {
    if !hooks_built_in() {
        return;
    }
    let (signal, stderr) = launch_with_forbidden_call("vcpu");
    assert_eq!(signal, Some(libc::SIGSYS), "{stderr}");
    assert!(
        stderr.contains("the vcpu thread made a system call its filter forbids: execve (59)"),
        "{stderr}"
    );
}

#[test]
fn the_device_loop_cannot_open_a_packet_socket() {
    if !hooks_built_in() {
        return;
    }
    // socket(2) is allowed on the device loop for Unix and IP sockets only.
    let (signal, stderr) = launch_with_forbidden_call("device loop");
    assert_eq!(signal, Some(libc::SIGSYS), "{stderr}");
    assert!(
        stderr
            .contains("the device loop thread made a system call its filter forbids: socket (41)"),
        "{stderr}"
    );
}
