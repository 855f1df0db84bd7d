//! `vmm run`, and `vmm launch --api-socket` with `vmm exec` and `vmm stop`,
//! as a user runs them.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Scratch, VMM};

/// Also: standard input streams to the command, and while the command
/// runs every thread of `vmm run` (its own, which talks to the agent, and
/// the one that streams standard input among them) is filtered.
#[test]
fn run_boots_runs_python_and_streams_standard_input() {
    let script = "import sys\n\
        print(sys.stdin.readline().strip(), flush=True)\n\
        sys.stdin.read()\n\
        print(6*7)";
    let mut run = Command::new(VMM)
        .args(["run", "-i", "--", "python3", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = run.stdin.take().unwrap();
    stdin.write_all(b"ready\n").unwrap();
    let mut stdout = std::io::BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    // vmm run is jailed (this host allows it): the launcher, the jail's
    // init and the VMM, every thread of each under a filter.
    let init = common::children(run.id());
    let vmm = common::children(init[0]);
    assert_every_thread_is_filtered(run.id(), &[]);
    assert_every_thread_is_filtered(init[0], &[]);
    assert_every_thread_is_filtered(vmm[0], &["vmm", "vcpu0", "spawner"]);
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(rest, "42\n", "{stderr}");
}

/// Also: the first run of a configuration builds its default template
/// (saying so), the next starts from it. The configuration is this test
/// run's own (its command line names the test process), and its template
/// is removed at the end.
#[test]
fn run_returns_the_commands_exit_status() {
    let s = Scratch::new("run-status");
    let config = s.file(
        "vm.json",
        &format!(
            r#"{{"vcpus": 1, "memory_mib": 192, "cmdline": "vmmtest={}"}}"#,
            std::process::id()
        ),
    );
    let run = || {
        Command::new(VMM)
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", "echo out; echo err >&2; exit 3"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let first = run();
    let stderr = String::from_utf8_lossy(&first.stderr).into_owned();
    assert_eq!(first.status.code(), Some(3), "{stderr}");
    assert_eq!(first.stdout, b"out\n");
    let template = stderr
        .split("building the template ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the first run says it builds a template: {stderr}"))
        .to_string();
    assert!(stderr.ends_with("err\n"), "{stderr}");
    let second = run();
    let removed = Command::new(VMM)
        .args(["template", "rm", &template])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(3));
    assert_eq!(second.stdout, b"out\n");
    assert_eq!(
        String::from_utf8_lossy(&second.stderr),
        "err\n",
        "the second run starts from the template, silently"
    );
    assert!(removed.status.success());
}

#[test]
fn launch_exec_stop() {
    let s = Scratch::new("launch-exec");
    let api = s.path("api.sock");
    let config = s.file(
        "vm.json",
        r#"{"vcpus": 2, "memory_mib": 256, "rootfs": {}}"#,
    );
    let mut vm = Command::new(VMM)
        .args(["launch", "--config"])
        .arg(&config)
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The API socket exists once the VMM serves; `vmm exec` then waits for
    // the guest agent by itself. Until the socket is there, only a few
    // milliseconds of VMM setup pass: retrying exec is the wait.
    let exec = |args: &[&str], stdin: Option<&[u8]>| {
        let mut cmd = Command::new(VMM);
        cmd.arg("exec").arg("--api-socket").arg(&api).args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(data) = stdin {
            child.stdin.take().unwrap().write_all(data).unwrap();
        }
        child.wait_with_output().unwrap()
    };
    let first = loop {
        let out = exec(&["--", "uname", "-a"], None);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() || !stderr.contains("cannot reach") {
            break out;
        }
        assert!(vm.try_wait().unwrap().is_none(), "the VMM ended: {stderr}");
    };
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).starts_with("Linux sandbox"));

    let out = exec(
        &[
            "-e",
            "GREETING=hello",
            "--cwd",
            "/etc",
            "--",
            "sh",
            "-c",
            "echo $GREETING from $(pwd)",
        ],
        None,
    );
    assert_eq!(out.stdout, b"hello from /etc\n");
    let out = exec(&["-i", "--", "wc", "-c"], Some(&[b'x'; 10000]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10000");
    let out = exec(&["--", "sh", "-c", "exit 7"], None);
    assert_eq!(out.status.code(), Some(7));
    #[cfg(target_os = "linux")]
    let pvm = std::path::Path::new(hypervisor::kvm::PVM_MODULE_PATH).exists();
    #[cfg(not(target_os = "linux"))]
    let pvm = false;
    if pvm {
        let out = exec(
            &["--", "/lib64/ld-linux-x86-64.so.2", "--list-diagnostics"],
            None,
        );
        assert_no_avx_in_glibc(&String::from_utf8_lossy(&out.stdout));
    } else {
        common::skipped(
            "the glibc AVX check",
            "it is for PVM hosts (no /sys/module/kvm_pvm here)",
        );
    }
    let out = exec(&["--timeout", "0.5", "--", "sleep", "600"], None);
    assert_eq!(out.status.code(), Some(124));
    assert_every_thread_is_filtered(vm.id(), &["vmm", "vcpu0", "vcpu1", "api", "spawner"]);

    let stop = Command::new(VMM)
        .arg("stop")
        .arg("--api-socket")
        .arg(&api)
        .output()
        .unwrap();
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert_eq!(vm.wait().unwrap().code(), Some(0));
}

/// Every thread of the running VMM runs under a seccomp filter (mode 2 in
/// its status), and threads named `names` are among them.
fn assert_every_thread_is_filtered(pid: u32, names_expected: &[&str]) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let mut names = Vec::new();
    for task in tasks {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim);
        assert_eq!(mode, Some("2"), "thread {} is not filtered", name.trim());
        names.push(name.trim().to_string());
    }
    for role in names_expected {
        assert!(
            names.iter().any(|n| n == *role),
            "no {role} thread in {names:?}"
        );
    }
}

/// On PVM hosts the guest kernel cannot save AVX state when it switches
/// tasks, so the pvm flavour tells glibc not to use AVX (docs/host-kvm.md):
/// in glibc's own report, the usable ("active") AVX, AVX2 and AVX-512F bits
/// are clear.
fn assert_no_avx_in_glibc(diagnostics: &str) {
    let word = |key: &str| -> u64 {
        let line = diagnostics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("x86.cpu_features.{key}=0x")))
            .unwrap_or_else(|| panic!("no {key} in glibc's diagnostics: {diagnostics}"));
        u64::from_str_radix(line.trim(), 16).unwrap()
    };
    let leaf1_ecx = word("features[0x0].active[0x2]");
    let leaf7_ebx = word("features[0x1].active[0x1]");
    assert_eq!(leaf1_ecx & (1 << 28), 0, "glibc in the guest uses AVX");
    assert_eq!(leaf7_ebx & (1 << 5), 0, "glibc in the guest uses AVX2");
    assert_eq!(leaf7_ebx & (1 << 16), 0, "glibc in the guest uses AVX-512");
}
