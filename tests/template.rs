//! Templates on a real guest (docs/templates.md): one template is built
//! for the whole file, with a warm-up, a share slot and a network, from a
//! config whose initramfs is a copy of the test's own; sandboxes start from
//! it with other host folders and egress rules, each fresh (its own
//! writes, its own random bytes, machine id, hostname and MAC address, the
//! host's time), its clock going on from the snapshot; a config that no
//! longer fits, or a changed initramfs, is
//! refused with a sentence.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{describe, vmm, Scratch, VMM};
use devices::sync::Locked;
use serde_json::{json, Value};

/// The file's template (`test-<pid>`, removed by the next run of this
/// file) and the scratch folder with the initramfs copy it was built
/// from.
struct Built {
    name: String,
    scratch: Scratch,
}

fn remove_ended_test_templates() {
    for t in vmm::template::list().unwrap_or_default() {
        let pid = t
            .record
            .name
            .strip_prefix("test-")
            .and_then(|p| p.parse().ok());
        if pid.is_some_and(|p: u32| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = vmm(&["template", "rm", &t.record.name]);
        }
    }
}

fn config(s: &Scratch, memory: u64, share: &Path) -> PathBuf {
    config_with(s, memory, share, json!({"default": "deny"}))
}

fn config_with(s: &Scratch, memory: u64, share: &Path, egress: Value) -> PathBuf {
    let body = json!({
        "memory_mib": memory,
        "initramfs": s.path("initramfs.cpio"),
        "rootfs": {},
        "serial": "off",
        "shares": [{"tag": "work", "host_path": share, "guest_path": "/mnt/work"}],
        "network": {"mode": "user", "egress": egress},
    });
    let path = s.path(&format!(
        "vm-{memory}-{}.json",
        share.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&path, body.to_string()).unwrap();
    path
}

fn built() -> MutexGuard<'static, Built> {
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let s = Scratch::new("template");
            std::fs::copy(
                vmm::artifacts::default_minimal_initramfs(),
                s.path("initramfs.cpio"),
            )
            .unwrap();
            for folder in ["built-with", "run-with"] {
                std::fs::create_dir(s.path(folder)).unwrap();
                std::fs::write(s.path(folder).join(folder), folder).unwrap();
            }
            // Templates of earlier runs of this file whose process is gone
            // (a static's value is never dropped, so each run removes what
            // the ones before left).
            remove_ended_test_templates();
            let name = format!("test-{}", std::process::id());
            let cfg = config(&s, 256, &s.path("built-with"));
            let cfg = cfg.to_str().unwrap();
            let warmup = "echo warm > /root/warm && cat /proc/sys/kernel/random/uuid > /root/seed";
            let stderr = build_jailed(&["--config", cfg, "--warmup", warmup], &name);
            assert!(stderr.contains("built in"), "progress lines: {stderr}");
            Mutex::new(Built { name, scratch: s })
        })
        .locked()
}

/// Runs `vmm template create NAME ARGS`, checking that the build runs
/// jailed (this host allows it): by its first progress line, printed by
/// the VMM, the process it started is the jail's launcher, whose one
/// child (the init) has one child (the VMM), all in a user namespace of
/// their own. Its standard error.
fn build_jailed(args: &[&str], name: &str) -> String {
    let mut build = Command::new(VMM)
        .args(["template", "create", name])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(build.stderr.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut first).unwrap();
    assert!(first.contains("booting"), "first line: {first}");
    let init = common::children(build.id());
    assert_eq!(init.len(), 1, "the launcher has one child, the jail's init");
    let jailed = common::children(init[0]);
    assert_eq!(jailed.len(), 1, "the jail's init has one child, the VMM");
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert_ne!(
        ns(jailed[0]),
        ns(std::process::id()),
        "the build's VMM is in a user namespace of its own"
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let out = build.wait_with_output().unwrap();
    let all = format!("{first}{rest}");
    assert!(out.status.success(), "status {:?}: {all}", out.status);
    all
}

/// `vmm run --template NAME --config CONFIG -- ARGV...`.
fn run_from(name: &str, config: &Path, argv: &[&str]) -> std::process::Output {
    let config = config.to_str().unwrap();
    let mut args = vec!["run", "--template", name, "--config", config, "--"];
    args.extend_from_slice(argv);
    vmm(&args)
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn sandboxes_start_from_the_template_each_fresh_and_with_the_runs_folders() {
    let b = built();
    let s = &b.scratch;
    let listed: Vec<Value> =
        serde_json::from_slice(&vmm(&["template", "ls", "--json"]).stdout).unwrap();
    let row = listed
        .iter()
        .find(|r| r["name"] == b.name.as_str())
        .unwrap();
    assert_eq!(row["memory_mib"], 256);
    assert!(row["size_bytes"].as_u64().unwrap() > 0);

    // The run's egress rules (the template's deny everything) let the
    // guest reach this listener through 10.0.2.2.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let _ = std::io::Write::write_all(&mut conn.unwrap(), b"hello from the host\n");
        }
    });
    let run_cfg = config_with(
        s,
        256,
        &s.path("run-with"),
        json!({"default": "deny", "allow": [format!("10.0.2.2:{port}")]}),
    );
    // Bash builtins only: under PVM every process the guest starts costs
    // about a second of emulated kernel time. A random UUID comes from
    // the same generator as /dev/urandom.
    let script = "show() { local l; while IFS= read -r l; do echo \"$l\"; done < \"$1\"; }; \
                  show /root/warm; [ -e /root/mine ] && echo SEEN-AN-EARLIER-RUN; \
                  echo mine > /root/mine; cd /mnt/work && echo *; echo $EPOCHREALTIME; \
                  show /proc/sys/kernel/random/uuid; show /root/seed; \
                  show /proc/sys/kernel/hostname; show /etc/machine-id; \
                  show /sys/class/net/eth0/address";
    // The first two also read their vsock context id
    // (IOCTL_VM_SOCKETS_GET_LOCAL_CID; perl costs seconds on this host).
    let cid_script = format!(
        "{script}; perl -e 'open(my $f, \"<\", \"/dev/vsock\") or die \"$!\"; \
         my $b = pack(\"L\", 0); ioctl($f, 0x7b9, $b) or die \"$!\"; print unpack(\"L\", $b), \"\\n\"'"
    );
    // The first run also talks to the host, from its new address.
    let first_script =
        format!("{cid_script}; exec 3<>/dev/tcp/10.0.2.2/{port} && read -r l <&3 && echo \"$l\"");
    let mut seen_macs = std::collections::BTreeSet::new();
    let mut seen_cids = std::collections::BTreeSet::new();
    let mut seen_random = std::collections::BTreeSet::new();
    let mut seen_ids = std::collections::BTreeSet::new();
    let mut template_seed = None;
    for i in 0..6 {
        let before = now_s();
        let out = run_from(
            &b.name,
            &run_cfg,
            &[
                "bash",
                "-c",
                match i {
                    0 => &first_script,
                    1 => &cid_script,
                    _ => script,
                },
            ],
        );
        let after = now_s();
        assert!(out.status.success(), "run {i}: {}", describe(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            !text.contains("SEEN-AN-EARLIER-RUN"),
            "run {i} sees an earlier run's write: {text}"
        );
        let expected = match i {
            0 => 10,
            1 => 9,
            _ => 8,
        };
        assert_eq!(lines.len(), expected, "run {i}: {text}");
        assert_eq!(lines[0], "warm", "the warm-up's state: {text}");
        // The run's folder, not the one the template was built with.
        assert_eq!(lines[1], "run-with", "run {i}: {text}");
        let guest: f64 = lines[2].parse().unwrap();
        assert!(
            guest > before - 2.0 && guest < after + 2.0,
            "run {i}: the guest's clock says {guest}, the host's was {before}..{after}"
        );
        assert!(
            seen_random.insert(lines[3].to_string()),
            "run {i} repeats random bytes: {text}"
        );
        // Every run sees the bytes the warm-up drew, as saved.
        assert_eq!(*template_seed.get_or_insert(lines[4].to_string()), lines[4]);
        // A machine of its own: hostname and machine id.
        assert_eq!(
            lines[5],
            format!("sandbox-{}", &lines[6][..8]),
            "run {i}: {text}"
        );
        assert!(
            seen_ids.insert(lines[6].to_string()),
            "run {i} repeats a machine id: {text}"
        );
        // A MAC address of its own, not the template's (the default).
        assert!(
            lines[7] != "02:56:4d:4d:00:01" && seen_macs.insert(lines[7].to_string()),
            "run {i} has an address another VM had: {text}"
        );
        // A vsock context id of its own, not the template's (the
        // default, 3).
        if i < 2 {
            assert!(
                lines[8] != "3" && seen_cids.insert(lines[8].to_string()),
                "run {i} has a context id another VM had: {text}"
            );
        }
        if i == 0 {
            assert_eq!(lines[9], "hello from the host", "run {i}: {text}");
        }
    }
    assert!(!seen_random.contains(template_seed.as_deref().unwrap()));
}

#[test]
fn a_restored_guests_clock_goes_on_from_the_snapshot() {
    let b = built();
    let s = &b.scratch;
    let cfg = config(s, 256, &s.path("run-with"));
    // The guest's monotonic clock, as its uptime (a bash builtin: see
    // above).
    let uptime = || -> f64 {
        let out = run_from(
            &b.name,
            &cfg,
            &["bash", "-c", "read -r u _ < /proc/uptime; echo $u"],
        );
        assert!(out.status.success(), "{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let start = std::time::Instant::now();
    let first = uptime();
    // Time passes on the host between the two restores: the condition
    // under test, not a wait for anything.
    let gap = std::time::Duration::from_secs(20);
    if let Some(left) = gap.checked_sub(start.elapsed()) {
        std::thread::sleep(left);
    }
    let second = uptime();
    let host = start.elapsed().as_secs_f64();
    // Each restore goes on from the snapshot's instant: both read about
    // the same uptime. A clock that moved on by the time since the
    // snapshot (a PVM guest on the tsc clocksource did) would read `host`
    // seconds more the second time, and the guest would catch up on it.
    assert!(
        second - first < host / 2.0,
        "the guest's uptime went from {first} to {second} s over {host:.1} s of the host's"
    );
}

#[test]
fn a_template_that_does_not_fit_the_run_is_refused_with_the_reason() {
    let b = built();
    let s = &b.scratch;
    // Another memory size: the guest would not find its machine.
    let bigger = config(s, 512, &s.path("run-with"));
    let out = run_from(&b.name, &bigger, &["true"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("memory is 512 MiB, the template's 256 MiB")
            && stderr.contains("--replace"),
        "{stderr}"
    );
    let out = vmm(&["run", "--template", "no-such-template", "--", "true"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no template named"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_changed_initramfs_makes_the_template_stale() {
    let b = built();
    let s = &b.scratch;
    let cfg = config(s, 256, &s.path("run-with"));
    let initramfs = s.path("initramfs.cpio");
    let saved = std::fs::read(&initramfs).unwrap();
    let modified = std::fs::metadata(&initramfs).unwrap().modified().unwrap();
    let mut changed = saved.clone();
    changed.extend_from_slice(&[0; 512]);
    std::fs::write(&initramfs, &changed).unwrap();
    let out = run_from(&b.name, &cfg, &["true"]);
    // Put back as it was, bytes and modification time (the file keeps its
    // inode), for the other tests.
    std::fs::write(&initramfs, &saved).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&initramfs)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the initramfs {} changed since it was built",
            std::fs::canonicalize(&initramfs).unwrap().display()
        )),
        "{stderr}"
    );
}
