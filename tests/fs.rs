//! virtio-fs shares on a real guest (Debian root disk, agent over vsock).
//! One VM with four shares serves the whole file:
//! - `work` (read-write) at /mnt/work,
//! - `tools` (read-only) at /mnt/tools: the guest-side check script,
//! - `ro` (read-only) at /mnt/ro,
//! - `gone` (read-write) at /mnt/gone: its host folder is removed by a test.
//!
//! Next to the shares, `outside` is a host file no guest action may touch.
//! The checks in `common::shares` run the same against the vhost-user
//! daemon (tests/vhost_user.rs).

mod common;

use devices::sync::Locked;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::shares::{self, fails, work};
use common::{describe, fork, ok, stop_now, Guest, Scratch};
use serde_json::json;
use vmm::action::Control;

fn guest() -> MutexGuard<'static, Guest> {
    static GUEST: OnceLock<Mutex<Guest>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let scratch = Scratch::new("fs");
            shares::prepare(&scratch);
            std::fs::create_dir_all(scratch.path("gone")).unwrap();
            let share = |tag: &str, read_only: bool| {
                json!({"tag": tag, "host_path": scratch.path(tag),
                       "guest_path": format!("/mnt/{tag}"), "read_only": read_only})
            };
            let config = json!({
                "vcpus": 2,
                "memory_mib": 512,
                "rootfs": {},
                "serial": scratch.path("console.log"),
                "shares": [share("work", false), share("tools", true),
                           share("ro", true), share("gone", false)],
            });
            Mutex::new(Guest::boot(scratch, &config))
        })
        .locked()
}

#[test]
fn posix_operations_work_in_the_guest() {
    shares::posix_operations(&*guest());
}

#[test]
fn host_and_guest_see_each_others_edits_without_a_remount() {
    let g = guest();
    std::fs::write(work(&*g, "edit.txt"), "version 1\n").unwrap();
    assert_eq!(ok(g.sh("cat /mnt/work/edit.txt")), "version 1");
    std::fs::write(work(&*g, "edit.txt"), "version two, longer\n").unwrap();
    // The guest trusts cached attributes for up to 1 s (docs/shares.md):
    // it waits (at most 10 s) for the new content.
    ok(g.sh(
        "for i in $(seq 100); do [ \"$(cat /mnt/work/edit.txt)\" = 'version two, longer' ] && exit 0; sleep 0.1; done; exit 1",
    ));
    std::fs::remove_file(work(&*g, "edit.txt")).unwrap();
    ok(g.sh(
        "for i in $(seq 100); do [ -e /mnt/work/edit.txt ] || exit 0; sleep 0.1; done; exit 1",
    ));
    // Guest writes reach the host when the command returns (no write-back
    // cache in the guest).
    ok(g.sh("echo from the guest > /mnt/work/guest.txt"));
    assert_eq!(
        std::fs::read_to_string(work(&*g, "guest.txt")).unwrap(),
        "from the guest\n"
    );
}

#[test]
fn a_4_mib_file_keeps_its_checksum_both_ways() {
    shares::big_file_both_ways(&*guest());
}

#[test]
fn two_hundred_small_files_are_created_listed_and_removed() {
    let g = guest();
    let listed = ok(
        g.sh("mkdir /mnt/work/many && cd /mnt/work/many && python3 -c \"
for i in range(200):
    open(f'f{i}', 'w').write(str(i))
\" && ls | wc -l"),
    );
    // More entries than one READDIR answer holds.
    assert_eq!(listed, "200");
    let dir = work(&*g, "many");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 200);
    assert_eq!(std::fs::read_to_string(dir.join("f167")).unwrap(), "167");
    assert_eq!(
        ok(g.sh("rm -r /mnt/work/many && ls /mnt/work | grep -c '^many$' || true")),
        "0"
    );
    assert!(!dir.exists());
}

#[test]
fn concurrent_appends_lose_nothing() {
    let g = guest();
    ok(g.sh("cd /mnt/work && for w in A B; do python3 -c \"
import os
fd = os.open('log', os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(200):
    os.write(fd, ('$w%05d' % i).ljust(63, '.').encode() + b'\\n')
\" & done; wait"));
    let log = std::fs::read_to_string(work(&*g, "log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 400);
    for w in ['A', 'B'] {
        let mine: Vec<&&str> = lines.iter().filter(|l| l.starts_with(w)).collect();
        assert_eq!(mine.len(), 200);
        for (i, line) in mine.iter().enumerate() {
            assert_eq!(line.len(), 63, "torn line {line:?}");
            assert!(
                line.starts_with(&format!("{w}{i:05}")),
                "{line:?} out of order"
            );
        }
    }
}

#[test]
fn escapes_fail_and_leave_the_host_untouched() {
    shares::escapes(&*guest());
}

#[test]
fn fifos_and_device_nodes_planted_by_the_host_never_block_or_open() {
    let g = guest();
    let dir = work(&*g, "special");
    std::fs::create_dir_all(&dir).unwrap();
    let c = |name: &str| std::ffi::CString::new(dir.join(name).to_str().unwrap()).unwrap();
    // SAFETY: valid path strings.
    assert_eq!(unsafe { libc::mkfifo(c("fifo").as_ptr(), 0o666) }, 0);
    // SAFETY: valid path string; the node is the host's /dev/null (1, 3).
    let dev = unsafe {
        libc::mknod(
            c("null").as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        )
    };
    assert_eq!(
        dev,
        0,
        "mknod needs root: {}",
        std::io::Error::last_os_error()
    );
    // The guest opens both through every path it has: plain opens, opens
    // with O_CREAT (with and without O_EXCL), O_TRUNC, O_NONBLOCK. Special
    // files are the guest kernel's own (a FIFO is a guest pipe), so a
    // blocking open blocks only the guest process (hence the timeouts).
    let script = "cd /mnt/work/special
python3 -c \"
import os, errno
for name in ('fifo', 'null'):
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK,
                  os.O_RDWR | os.O_CREAT | os.O_NONBLOCK,
                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK,
                  os.O_RDWR | os.O_CREAT | os.O_EXCL):
        try:
            os.close(os.open(name, flags, 0o644))
            print(name, flags, 'opened')
        except OSError as e:
            print(name, flags, errno.errorcode[e.errno])
\"
timeout 3 cat fifo; timeout 3 sh -c 'echo x > fifo'; echo x > null; cat null
ls -l; echo done";
    let out = ok(g.sh(script));
    assert!(out.ends_with("done"), "{out}");
    g.assert_healthy("opening planted special files");
    // The host plants and removes a FIFO under a name the guest keeps
    // creating: a guest lookup may say \"no such file\" and the CREATE that
    // follows then finds the FIFO on the host.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let planter = {
        let stop = stop.clone();
        let race = c("race");
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: a valid path string.
                unsafe {
                    libc::mkfifo(race.as_ptr(), 0o666);
                    libc::unlink(race.as_ptr());
                }
            }
        })
    };
    let out = g.sh("cd /mnt/work/special; python3 -c \"
import os
for i in range(300):
    try:
        os.close(os.open('race', os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o644))
        os.unlink('race')
    except OSError:
        pass
print('raced')
\"");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    planter.join().unwrap();
    assert_eq!(ok(out), "raced");
    g.assert_healthy("creating a name the host turns into a FIFO");
    assert_eq!(std::fs::read(dir.join("null")).unwrap(), b"");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_restore_never_takes_share_folders_from_the_snapshot() {
    let g = guest();
    let snap = g.scratch.path("snap");
    vmm::api::ApiClient::new(&g.api)
        .snapshot(&snap, None)
        .unwrap();
    // The snapshot names its folders; a copy from elsewhere could name /.
    // Without the operator's config the restore stops before any VM runs.
    let out = std::process::Command::new(common::VMM)
        .arg("restore")
        .arg("--snapshot")
        .arg(&snap)
        .arg("--api-socket")
        .arg(g.scratch.path("never.sock"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only the operator may choose"), "{err}");
    assert!(!g.scratch.path("never.sock").exists());
    std::fs::remove_dir_all(&snap).unwrap();
}

#[test]
fn read_only_shares_refuse_writes_on_the_host_side() {
    shares::read_only(&*guest());
}

#[test]
fn a_share_whose_folder_is_removed_gives_errors_not_a_hang() {
    let g = guest();
    ok(g.sh("echo before > /mnt/gone/f && cat /mnt/gone/f"));
    std::fs::remove_dir_all(g.scratch.path("gone")).unwrap();
    let start = Instant::now();
    fails(g.sh("touch /mnt/gone/new"));
    fails(g.sh("mkdir /mnt/gone/d"));
    let listed = g.sh("ls /mnt/gone");
    assert!(
        String::from_utf8_lossy(&listed.stdout).trim().is_empty(),
        "{}",
        describe(&listed)
    );
    assert!(start.elapsed() < Duration::from_secs(120));
    assert!(!g.scratch.path("gone").exists());
}

#[test]
fn a_fork_child_keeps_the_share() {
    let g = guest();
    ok(g.sh(
        "mkdir -p /mnt/work/forked && echo parent > /mnt/work/forked/p && ls /mnt/work/forked",
    ));
    let children = fork(&g.api, 1);
    let (_, child_api, pid) = &children[0];
    // The child reuses the parent's cached inodes (restored by path) and
    // makes new ones.
    let out = ok(common::exec(
        child_api,
        "cat /mnt/work/forked/p && echo child > /mnt/work/forked/c && ls /mnt/work/forked",
    ));
    assert_eq!(out, "parent\nc\np");
    assert_eq!(
        std::fs::read_to_string(work(&*g, "forked/c")).unwrap(),
        "child\n"
    );
    // The share is the same host folder for parent and child.
    assert_eq!(ok(g.sh("cat /mnt/work/forked/c")), "child");
    stop_now(child_api, *pid);
}
