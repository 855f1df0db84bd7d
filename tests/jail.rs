//! The jail (`"jail": {}`, `vmm launch --jail`) on a real guest: the VMM
//! process has no capabilities, no_new_privs and its seccomp filters; from
//! inside its mount namespace only its list of paths exists (read through
//! /proc/PID/root); the agent, the user network and a share work; fork
//! children run in the same jail. One jailed VM is booted for the whole
//! file.

mod common;

use devices::sync::Locked;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use common::{children, exec, fork, ok, stop_now, Guest, Scratch};
use serde_json::json;

fn jailed() -> MutexGuard<'static, Guest> {
    static GUEST: OnceLock<Mutex<Guest>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let scratch = Scratch::new("jail");
            std::fs::create_dir(scratch.path("share")).unwrap();
            let config = json!({
                "memory_mib": 256,
                "rootfs": {},
                "serial": scratch.path("console.log"),
                "network": {"mode": "user", "egress": {"default": "deny", "allow": ["10.0.2.2"]}},
                "shares": [{"tag": "work", "host_path": scratch.path("share"), "guest_path": "/mnt/work"}],
                "jail": {},
            });
            Mutex::new(Guest::boot(scratch, &config))
        })
        .locked()
}

/// The jailed VMM's host pid: the launcher's child is the jail's init,
/// whose child is the VMM.
fn vmm_pid(guest: &Guest) -> u32 {
    let init = children(guest.process.id());
    assert_eq!(init.len(), 1, "the launcher has one child, the jail's init");
    let vmm = children(init[0]);
    assert_eq!(vmm.len(), 1, "the init has one child, the VMM: {vmm:?}");
    vmm[0]
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

fn assert_unprivileged(pid: u32) {
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000", "pid {pid}");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000", "pid {pid}");
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000", "pid {pid}");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "pid {pid}");
    assert_eq!(status_field(pid, "Seccomp"), "2", "pid {pid}");
}

/// Every path under `dir`, relative to it (symlinks not followed).
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            out.insert(path.strip_prefix(dir).unwrap().to_path_buf());
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

#[test]
fn a_jailed_vmm_has_no_privileges_and_sees_only_its_list() {
    let g = jailed();
    assert_eq!(ok(g.sh("echo jailed")), "jailed");
    let pid = vmm_pid(&g);
    assert_unprivileged(pid);
    // The launcher and the init run under the jail's seccomp filter.
    let launcher = g.process.id();
    for p in [launcher, children(launcher)[0]] {
        assert_eq!(status_field(p, "Seccomp"), "2", "pid {p}");
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let top: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for host_only in ["etc", "usr", "bin", "lib", "home", "var", "boot"] {
        assert!(
            !top.contains(host_only),
            "/{host_only} is in the jail: {top:?}"
        );
    }
    // Of /sys, at most the PVM module's folder (how the VMM tells a PVM
    // host's KVM apart).
    if top.contains("sys") {
        let sys = tree(&root.join("sys"));
        assert!(sys.contains(Path::new("module/kvm_pvm")), "{sys:?}");
        for p in &sys {
            assert!(
                p == Path::new("module") || p.starts_with("module/kvm_pvm"),
                "/sys/{} is in the jail",
                p.display()
            );
        }
    }
    let dev: BTreeSet<String> = std::fs::read_dir(root.join("dev"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dev, ["kvm", "null", "urandom"].map(String::from).into());
    // /proc shows the jail's own processes and nothing host-wide.
    for entry in std::fs::read_dir(root.join("proc")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            name.parse::<u32>().is_ok() || name == "self" || name == "thread-self",
            "/proc/{name} is in the jail"
        );
    }
    // Every file outside /proc and /tmp is one the VM uses: the boot
    // artifacts, the executable, the device nodes.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let files: Vec<PathBuf> = tree(&root)
        .into_iter()
        .filter(|p| !["proc", "tmp", "sys"].iter().any(|d| p.starts_with(d)))
        .filter(|p| std::fs::metadata(root.join(p)).is_ok_and(|m| !m.is_dir()))
        .collect();
    for f in &files {
        let name = f.to_string_lossy();
        let expected = f.starts_with("dev")
            || Path::new("/").join(f) == exe
            || name.contains("vmlinux")
            || name.ends_with(".cpio")
            || name.ends_with(".ext4");
        assert!(expected, "{} is in the jail: {files:?}", f.display());
    }
    // The scratch folder (the API socket's) is there; its siblings are not.
    let scratch = g.scratch.0.strip_prefix("/").unwrap();
    assert!(root.join(scratch).join("api.sock").exists());
    // In /tmp: the scratch folder, the jail's runtime folder (fork
    // children's sockets: `<runtime dir>/jail-<random>/run`) and the
    // folders above them, no more.
    let rel = scratch.strip_prefix("tmp").unwrap();
    let runtime = vmm::runtime::user_dir().unwrap();
    let runtime = runtime.strip_prefix("/tmp").ok();
    let in_run = |p: &Path| {
        let Some(rest) = runtime.and_then(|r| p.strip_prefix(r).ok()) else {
            return false;
        };
        let parts: Vec<_> = rest.iter().collect();
        match parts.as_slice() {
            [] => false,
            [jail] => jail.to_string_lossy().starts_with("jail-"),
            [jail, run, ..] => jail.to_string_lossy().starts_with("jail-") && *run == "run",
        }
    };
    for p in tree(&root.join("tmp")) {
        assert!(
            rel.starts_with(&p)
                || p.starts_with(rel)
                || runtime.is_some_and(|r| r.starts_with(&p))
                || in_run(&p),
            "/tmp/{} is in the jail",
            p.display()
        );
    }
}

#[test]
fn fork_children_run_in_the_same_jail() {
    let g = jailed();
    let vmm = vmm_pid(&g);
    let kids = fork(&g.api, 1);
    let (id, api, _) = &kids[0];
    assert_eq!(ok(exec(api, "echo child")), "child", "child {id}");
    // The child is a process of the VMM's (started by its spawner).
    let child = children(vmm)
        .into_iter()
        .find(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("__fork-child"))
        })
        .expect("the fork child is the VMM's child");
    assert_unprivileged(child);
    for ns in ["mnt", "pid", "user", "ipc", "uts"] {
        let link = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).unwrap();
        assert_eq!(link(child), link(vmm), "{ns} namespace");
    }
    stop_now(api, child);
}

#[test]
fn the_user_network_and_a_share_work_jailed() {
    let g = jailed();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in server.incoming().flatten() {
            let _ = conn.write_all(b"hello-from-the-host");
        }
    });
    let out = ok(g.sh(&format!(
        "python3 -c \"import socket; s = socket.create_connection(('10.0.2.2', {port}), timeout=60); print(s.recv(100).decode())\" && echo from-the-guest > /mnt/work/note && sync"
    )));
    assert_eq!(out, "hello-from-the-host");
    let note = std::fs::read_to_string(g.scratch.path("share/note")).unwrap();
    assert_eq!(note, "from-the-guest\n");
}

#[test]
fn a_host_without_user_namespaces_gets_the_fix_not_an_unjailed_vm() {
    // A user namespace whose limit on user namespaces is 0 stands for a
    // host that forbids them (the limit is per user namespace).
    let s = Scratch::new("jail-refused");
    let config = s.file("vm.json", r#"{"memory_mib": 256, "rootfs": {}}"#);
    let out = std::process::Command::new("unshare")
        .args(["-Ur", "sh", "-c"])
        .arg("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" launch --jail --config \"$1\"")
        .arg(common::VMM)
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("unshare (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot jail the VMM")
            && stderr.contains("sysctl -w user.max_user_namespaces="),
        "{stderr}"
    );
}

#[test]
fn a_snapshot_of_a_jailed_vm_restores_into_a_jail() {
    use std::process::{Command, Stdio};
    use vmm::action::Control;
    let g = jailed();
    let snapshot = |out: &Path| {
        Command::new(common::VMM)
            .args(["snapshot", "--api-socket"])
            .arg(&g.api)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    // A folder the jail does not see: refused, never written into the
    // jail's private /tmp.
    let outside = std::env::temp_dir().join(format!("vmm-jail-outside-{}", std::process::id()));
    let out = snapshot(&outside);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("outside this jailed VMM's view"),
        "{stderr}"
    );
    assert!(!outside.exists());
    let snap = g.scratch.path("snap");
    let out = snapshot(&snap);
    assert!(out.status.success(), "{}", common::describe(&out));

    let api = g.scratch.path("restored.sock");
    let mut restored = Command::new(common::VMM)
        .arg("restore")
        .arg("--snapshot")
        .arg(&snap)
        .arg("--api-socket")
        .arg(&api)
        .args(["--trust-snapshot-config", "--jail"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(ok(exec(&api, "echo restored")), "restored");
    let init = children(restored.id());
    let vmm = children(init[0]);
    assert_unprivileged(vmm[0]);
    vmm::api::ApiClient::new(&api).stop().unwrap();
    assert_eq!(restored.wait().unwrap().code(), Some(0));
}

#[test]
fn vmm_run_is_jailed_by_default() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut run = Command::new(common::VMM)
        .args(["run", "--", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The launcher starts the jail's init, which starts the VMM; the VMM
    // takes its seccomp filters once its VM runs. (A first run of this
    // configuration starts a `vmm template create` of its own first, in a
    // jail of its own: not the one looked for.)
    let is_build = |p: u32| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"template"))
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let vmm = loop {
        let found = children(run.id())
            .into_iter()
            .find(|&p| !is_build(p))
            .and_then(|init| children(init).first().copied())
            .filter(|&p| status_field(p, "Seccomp") == "2");
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no jailed VMM under vmm run");
        assert!(run.try_wait().unwrap().is_none(), "vmm run ended");
        std::thread::yield_now();
    };
    assert_unprivileged(vmm);
    // SIGTERM to the launcher reaches the VMM, which stops.
    // SAFETY: kill with a pid and signal number.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let status = run.wait().unwrap();
    assert!(!status.success(), "{status:?}");
    assert!(!Path::new(&format!("/proc/{vmm}")).exists());
}

#[test]
fn vmm_run_goes_unjailed_where_the_host_forbids_user_namespaces() {
    // As in the test above: a user namespace whose limit on user
    // namespaces is 0. `vmm run` jails by default only where it can.
    let out = std::process::Command::new("unshare")
        .args(["-Ur", "sh", "-c"])
        .arg("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" run -- echo unjailed")
        .arg(common::VMM)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("unshare (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "unjailed\n",
        "{stderr}"
    );
}

#[test]
fn cgroup_limits_hold_the_jail_or_the_launch_is_refused() {
    use std::process::{Command, Stdio};
    let s = Scratch::new("jail-cgroup");
    let limits = json!({"memory_max_mib": 384, "pids_max": 64, "cpu_max_percent": 150});
    let config = json!({"memory_mib": 256, "rootfs": {}, "serial": "off", "jail": limits});
    let controllers = vmm::jail::probe::CGROUP_CONTROLLERS;
    let Ok(delegated) = vmm::jail::probe::cgroup_delegation(&controllers) else {
        // The refusal, for real: the launch fails before anything runs
        // and says why, never running without the limits asked for.
        let why = vmm::jail::probe::cgroup_delegation(&controllers).unwrap_err();
        common::skipped(
            "the cgroup limits themselves (the refusal is checked instead)",
            &format!("this host has no delegated cgroup v2: {why}"),
        );
        let path = s.file("vm.json", &config.to_string());
        let out = Command::new(common::VMM)
            .args(["launch", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("cannot jail the VMM: its cgroup limits need a delegated cgroup v2")
                && stderr.contains(&why),
            "{stderr}"
        );
        // `vmm run` with the same config: refused too, not run unjailed.
        let out = Command::new(common::VMM)
            .args(["run", "--config"])
            .arg(&path)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", common::describe(&out));
        return;
    };
    let g = Guest::boot(s, &config);
    let vmm = vmm_pid(&g);
    let own = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    let name = Path::new(path).file_name().unwrap().to_string_lossy();
    assert!(name.starts_with("vmm-jail-"), "{own}");
    let dir = delegated.join(&*name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    assert_eq!(read("memory.max").trim(), (384u64 << 20).to_string());
    assert_eq!(read("pids.max").trim(), "64");
    assert_eq!(read("cpu.max").trim(), "150000 100000");
    assert_eq!(ok(exec(&g.api, "echo limited")), "limited");
    // The launcher, the init, the VMM: all in it.
    let procs = read("cgroup.procs");
    assert!(procs.lines().count() >= 3, "{procs}");
}
