//! Pause, snapshot, restore and hot fork of a real guest (Debian root disk,
//! agent over vsock). One parent VM is booted for the whole file; the tests
//! take turns with it.

mod common;

use devices::sync::Locked;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};

use common::{describe, exec, fork, ok, stop_now, Guest, Scratch, VMM};
use serde_json::{json, Value};
use vmm::action::{Control, VmState};
use vmm::api::ApiClient;

/// The shared parent, booted once.
fn parent() -> MutexGuard<'static, Guest> {
    static PARENT: OnceLock<Mutex<Guest>> = OnceLock::new();
    PARENT
        .get_or_init(|| {
            let scratch = Scratch::new("fork");
            let config = json!({
                "memory_mib": 256,
                "rootfs": {},
                "serial": scratch.path("console.log"),
            });
            Mutex::new(Guest::boot(scratch, &config))
        })
        .locked()
}

fn counter(out: &str) -> u64 {
    out.lines().next().unwrap().trim().parse().unwrap()
}

#[test]
fn children_continue_from_the_parent_then_diverge() {
    let p = parent();
    // A process whose state lives in guest memory: the count goes to tmpfs
    // after each step (renamed into place, so a reader never sees the file
    // empty).
    let before = counter(&ok(exec(
        &p.api,
        // One process, no child per step, one step a second: under PVM
        // every process the guest starts costs about a second of emulated
        // kernel time, each step tens of milliseconds, and each fork child
        // carries this loop along.
        r#"nohup python3 -c '
import os, time
i = 0
while True:
    i += 1
    open("/tmp/counter.new", "w").write("%d\n" % i)
    os.rename("/tmp/counter.new", "/tmp/counter")
    time.sleep(1)
' >/dev/null 2>&1 & echo $! > /tmp/counter.pid
until read -r c < /tmp/counter && [ "$c" -ge 2 ]; do sleep 0.5; done 2>/dev/null; echo $c"#,
    )));
    let children = fork(&p.api, 4);

    let mut randoms = Vec::new();
    for (id, api, _) in &children {
        let out = ok(exec(
            api,
            &format!(
                "read -r c < /tmp/counter; echo $c; read -r u < /proc/sys/kernel/random/uuid; echo $u; echo {id} > /root/who; echo {id} > /tmp/who; sync"
            ),
        ));
        let mut lines = out.lines();
        let start = counter(lines.next().unwrap());
        assert!(
            start >= before,
            "child {id} counts from {start}, the parent was at {before} before the fork"
        );
        randoms.push(lines.next().unwrap().to_string());
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(randoms.len(), 4, "the children's random bytes repeat");

    // Each child sees its own writes, on disk and in memory (tmpfs), and
    // its counter moves on.
    for (id, api, _) in &children {
        let out = ok(exec(api, "cat /root/who /tmp/who /tmp/counter"));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..2], &[id.as_str(), id.as_str()], "{out}");
        assert!(counter(lines[2]) > before);
    }
    // The parent sees none of them.
    let out = ok(exec(
        &p.api,
        "cat /root/who /tmp/who 2>/dev/null; echo end; cat /tmp/counter",
    ));
    assert!(
        out.starts_with("end"),
        "the parent sees a child's file: {out}"
    );

    // A fork of a fork starts from its parent child.
    let (first_id, first_api, _) = &children[0];
    let grandchildren = fork(first_api, 1);
    let (_, g_api, g_pid) = &grandchildren[0];
    let out = ok(exec(g_api, "cat /root/who /tmp/who"));
    assert_eq!(out, format!("{first_id}\n{first_id}"));

    stop_now(g_api, *g_pid);
    for (_, api, pid) in &children {
        stop_now(api, *pid);
    }
    ok(exec(&p.api, "kill $(cat /tmp/counter.pid)"));
}

/// Open file descriptors of `pid` (their targets), not counting the
/// memory overlays a forked VM keeps for its future children (one per
/// fork that found changed pages, at most `MAX_OVERLAYS`).
fn fds_of(pid: u32) -> Vec<String> {
    let (overlays, rest): (Vec<String>, Vec<String>) = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .partition(|t| t.contains("vmm-guest-ram-overlay"));
    assert!(overlays.len() <= vmm::memory::MAX_OVERLAYS);
    rest
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

#[test]
fn fifty_children_come_and_go_without_leaks() {
    let p = parent();
    let pid = p.process.id();
    // One fork first: the first fork changes the parent's memory mapping.
    let (_, api, child) = fork(&p.api, 1).remove(0);
    stop_now(&api, child);
    let (fds, threads) = (fds_of(pid), thread_count(pid));
    let rss = vmm::memory::overhead_rss_kib_of(&pid.to_string()).unwrap();

    let children = fork(&p.api, 50);
    for (_, api, _) in &children {
        let vm = ApiClient::new(api).describe().unwrap();
        assert_eq!(vm.state, VmState::Running, "{vm:?}");
    }
    for (_, api, child) in &children {
        stop_now(api, *child);
    }
    let after = fds_of(pid);
    // Sockets of API and agent connections that are closing (each side
    // closes when it sees the other's end) come and go around the
    // snapshots, so their count may differ by a few; a leak per child
    // would be 50 or more. Every other descriptor must be the same.
    let split = |list: &[String]| {
        let (sockets, mut rest): (Vec<String>, Vec<String>) =
            list.iter().cloned().partition(|t| t.starts_with("socket:"));
        rest.sort();
        (sockets.len(), rest)
    };
    let ((sockets_after, rest_after), (sockets_before, rest_before)) = (split(&after), split(&fds));
    assert!(
        rest_after == rest_before && sockets_after < sockets_before + 10,
        "file descriptors leaked: {after:?}, before {fds:?}"
    );
    assert_eq!(thread_count(pid), threads, "threads leaked");
    let grown = vmm::memory::overhead_rss_kib_of(&pid.to_string()).unwrap() as i64 - rss as i64;
    assert!(grown < 1024, "the VMM's own memory grew by {grown} KiB");
    // The guest still runs.
    assert_eq!(ok(exec(&p.api, "echo alive")), "alive");
}

#[test]
fn pause_resume_snapshot_restore() {
    let p = parent();
    let client = ApiClient::new(&p.api);
    client.pause().unwrap();
    assert_eq!(client.describe().unwrap().state, VmState::Paused);
    client.resume().unwrap();
    assert_eq!(client.describe().unwrap().state, VmState::Running);

    ok(exec(
        &p.api,
        "echo saved > /root/snap-marker; echo mem > /tmp/snap-marker; sync",
    ));
    let snap = p.scratch.path("snap");
    let key = p.scratch.path("snap.key");
    std::fs::write(&key, b"0123456789abcdef-a-test-key-0123").unwrap();
    let out = Command::new(VMM)
        .arg("snapshot")
        .arg("--api-socket")
        .arg(&p.api)
        .arg("--out")
        .arg(&snap)
        .arg("--snapshot-key")
        .arg(&key)
        .output()
        .unwrap();
    let info: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", describe(&out)));
    assert!(info["memory_bytes"].as_u64().unwrap() > 0);
    // Later changes in the running VM do not reach the snapshot.
    ok(exec(
        &p.api,
        "echo later > /root/snap-marker; echo later > /tmp/snap-marker",
    ));

    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&snap).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(snap.join("memory")).unwrap().mode() & 0o777,
        0o600
    );

    // The restore takes its host-side settings (here the console file)
    // from the operator's config, and checks the snapshot's MAC.
    let api = p.scratch.path("restored.sock");
    let console = p.scratch.path("restored-console.log");
    let config = p.scratch.file(
        "restore.json",
        &json!({"memory_mib": 256, "rootfs": {}, "serial": console}).to_string(),
    );
    let mut restored = Command::new(VMM)
        .arg("restore")
        .arg("--snapshot")
        .arg(&snap)
        .arg("--api-socket")
        .arg(&api)
        .arg("--config")
        .arg(&config)
        .arg("--snapshot-key")
        .arg(&key)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let out = ok(exec(
        &api,
        "cat /root/snap-marker /tmp/snap-marker; cat /tmp/counter; echo to-console > /dev/console",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], &["saved", "mem"], "{out}");
    ApiClient::new(&api).stop().unwrap();
    assert_eq!(restored.wait().unwrap().code(), Some(0));
    let console = std::fs::read_to_string(&console).unwrap();
    assert!(console.contains("to-console"), "{console}");

    // Damaged snapshots are refused with a reason.
    let restore_err_with = |dir: &Path, args: &[&std::ffi::OsStr]| {
        let out = Command::new(VMM)
            .arg("restore")
            .arg("--snapshot")
            .arg(dir)
            .arg("--api-socket")
            .arg(p.scratch.path("never.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let restore_err = |dir: &Path| restore_err_with(dir, &[]);
    // A changed byte of memory, or another key: refused before anything runs.
    let keyed = [std::ffi::OsStr::new("--snapshot-key"), key.as_os_str()];
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(snap.join("memory"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut byte = [0u8; 1];
    memory.read_exact_at(&mut byte, 0x10_0000).unwrap();
    memory.write_all_at(&[byte[0] ^ 0x40], 0x10_0000).unwrap();
    assert!(restore_err_with(&snap, &keyed).contains("does not match its key"));
    memory.write_all_at(&byte, 0x10_0000).unwrap();
    let other = p.scratch.path("other.key");
    std::fs::write(&other, b"another key of thirty-two bytes!").unwrap();
    let other_keyed = [std::ffi::OsStr::new("--snapshot-key"), other.as_os_str()];
    assert!(restore_err_with(&snap, &other_keyed).contains("does not match its key"));
    // A config whose guest-visible machine differs is refused.
    let bigger = p
        .scratch
        .file("bigger.json", r#"{"memory_mib": 512, "rootfs": {}}"#);
    let bigger_args = [std::ffi::OsStr::new("--config"), bigger.as_os_str()];
    assert!(restore_err_with(&snap, &bigger_args).contains("does not fit the snapshot"));
    let state = std::fs::read(snap.join("state")).unwrap();
    std::fs::write(snap.join("state"), &state[..state.len() / 2]).unwrap();
    assert!(restore_err(&snap).contains("truncated or corrupted"));
    let mut flipped = state.clone();
    let at = flipped.len() - 10;
    flipped[at] ^= 1;
    std::fs::write(snap.join("state"), &flipped).unwrap();
    assert!(restore_err(&snap).contains("checksum"));
    let mut v9 = state.clone();
    v9[8] = 9;
    std::fs::write(snap.join("state"), &v9).unwrap();
    assert!(restore_err(&snap).contains("version 9"));
    std::fs::write(snap.join("state"), &state).unwrap();
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap();
    memory.set_len(4096).unwrap();
    assert!(restore_err(&snap).contains("truncated"));
}
