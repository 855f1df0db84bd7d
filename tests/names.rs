//! Named VMs as a user drives them: `vmm launch --name NAME --detach`,
//! `vmm ps`, `vmm exec NAME`, `vmm pause/resume NAME`, `vmm fork NAME`
//! (children `NAME-1`, ...), `vmm logs NAME`, `vmm stop NAME`. One VM (and
//! one fork child) serves the whole file, jailed (`--jail`: its sockets in
//! a folder of its own, its children reported with host pids); the
//! registry lives in a private runtime directory of the test's own
//! (`XDG_RUNTIME_DIR`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::{Scratch, VMM};
use serde_json::Value;

/// The CLI with the test's own runtime directory; kills every VM it
/// started when dropped, so a failing test leaves nothing running.
struct Cli {
    runtime: PathBuf,
    _scratch: Scratch,
}

impl Cli {
    fn new() -> Cli {
        let scratch = Scratch::new("names");
        let runtime = scratch.path("run");
        std::fs::create_dir(&runtime).unwrap();
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        Cli {
            runtime,
            _scratch: scratch,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(VMM)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vmm {args:?}: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail; its standard error.
    fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "vmm {args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    }

    fn ps(&self) -> Vec<Value> {
        serde_json::from_str(&self.ok(&["ps", "--json"])).unwrap()
    }

    fn row(&self, name: &str) -> Value {
        let rows = self.ps();
        rows.into_iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not listed"))
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        if let Ok(out) = Command::new(VMM)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .args(["ps", "--json"])
            .output()
        {
            let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            for pid in rows.iter().filter_map(|r| r["pid"].as_i64()) {
                // SAFETY: kill takes no pointers; the pids are VMMs this
                // test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// The pids `pid` has in its PID namespace and those above it.
fn ns_pids(pid: i64) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"));
    line.unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

/// What a process sees in folder `dir` (through its /proc/PID/root).
fn seen(pid: u32, dir: &std::path::Path) -> Vec<String> {
    let inside = PathBuf::from(format!("/proc/{pid}/root")).join(dir.strip_prefix("/").unwrap());
    let mut names: Vec<String> = std::fs::read_dir(inside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_named_vm_is_found_by_name_forked_listed_and_stopped() {
    let cli = Cli::new();
    let started: Value =
        serde_json::from_str(&cli.ok(&["launch", "--name", "dev", "-d", "--jail"])).unwrap();
    assert_eq!(started["name"], "dev");
    let pid = started["pid"].as_i64().unwrap();
    // Jailed: its sockets and console in a folder of its own, which is
    // all of the registry its jail sees.
    let registry = cli.runtime.join("vmm/vms");
    let folder = registry.join("dev.jail");
    assert_eq!(
        started["api_socket"],
        folder.join("api.sock").to_str().unwrap()
    );
    let init = common::children(pid as u32)[0];
    let vmm = common::children(init)[0];
    assert_eq!(seen(vmm, &registry), ["dev.jail"]);

    // The name is held while the VM runs.
    let err = cli.refused(&["launch", "--name", "dev", "-d"]);
    assert!(err.contains("a VM named \"dev\" is running"), "{err}");
    let err = cli.refused(&["launch", "--name", "Bad/Name"]);
    assert!(err.contains("is not a VM name"), "{err}");

    let row = cli.row("dev");
    assert_eq!(row["pid"], pid);
    assert_eq!(row["state"], "running");
    assert_eq!(row["parent"], Value::Null);
    assert!(row["memory_mib"].as_u64().unwrap() > 0);

    let out = cli.ok(&[
        "exec",
        "dev",
        "--",
        "sh",
        "-c",
        "echo hi > /tmp/mark; cat /tmp/mark",
    ]);
    assert_eq!(out, "hi\n");

    cli.ok(&["pause", "dev"]);
    assert_eq!(cli.row("dev")["state"], "paused");
    cli.ok(&["resume", "dev"]);
    assert_eq!(cli.row("dev")["state"], "running");

    // A child is named after its parent and continues from its state.
    let forked: Value = serde_json::from_str(&cli.ok(&["fork", "dev"])).unwrap();
    assert_eq!(forked["children"][0]["id"], "dev-1");
    let child = cli.row("dev-1");
    assert_eq!(child["parent"], "dev");
    assert_eq!(child["state"], "running");
    // Registered with its pid on the host, not the jail's.
    let child_pids = ns_pids(child["pid"].as_i64().unwrap());
    assert_eq!(child_pids.len(), 2, "{child_pids:?}");
    assert_eq!(
        u64::from(child_pids[1]),
        forked["children"][0]["pid"].as_u64().unwrap()
    );
    assert!(folder.join("dev-1.api.sock").exists());
    assert_eq!(cli.ok(&["exec", "dev-1", "--", "cat", "/tmp/mark"]), "hi\n");

    // The console so far: the guest init says it is ready.
    let logs = cli.ok(&["logs", "dev"]);
    assert!(logs.contains("vmm-init: ready"), "{logs}");

    // `stop NAME` returns once the VM has ended.
    cli.ok(&["stop", "dev-1"]);
    assert_eq!(cli.ps().len(), 1);
    cli.ok(&["stop", "dev"]);
    assert!(cli.ps().is_empty());
    let err = cli.refused(&["exec", "dev", "--", "true"]);
    assert!(err.contains("no VM named \"dev\" runs"), "{err}");
}
