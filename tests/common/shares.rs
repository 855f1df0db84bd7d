//! Share checks that run the same against both transports of our
//! virtio-fs: the in-process device (tests/fs.rs) and the vhost-user
//! daemon behind QEMU (tests/vhost_user.rs).
//!
//! The guest's scratch folder ([`prepare`]) holds `work` (read-write at
//! /mnt/work), `tools` (read-only at /mnt/tools, with the guest script
//! fs_ops.py), `ro` (read-only at /mnt/ro, holding `file`), and
//! `outside`, a host file no guest action may touch.

use std::path::{Path, PathBuf};
use std::process::Output;

use super::{describe, ok, sha256_file, Guest, Scratch};

pub const SECRET: &str = "host secret\n";

/// A guest with the shares above mounted.
pub trait ShareGuest {
    /// Runs `script` with `sh -c` in the guest.
    fn sh(&self, script: &str) -> Output;
    /// The host folder the shares are in.
    fn scratch(&self) -> &Scratch;
}

impl ShareGuest for Guest {
    fn sh(&self, script: &str) -> Output {
        Guest::sh(self, script)
    }

    fn scratch(&self) -> &Scratch {
        &self.scratch
    }
}

/// Makes the folders and files above in `scratch`.
pub fn prepare(scratch: &Scratch) {
    for dir in ["work", "tools", "ro"] {
        std::fs::create_dir_all(scratch.path(dir)).unwrap();
    }
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/guest/fs_ops.py"),
        scratch.path("tools/fs_ops.py"),
    )
    .unwrap();
    std::fs::write(scratch.path("ro/file"), "read only\n").unwrap();
    std::fs::write(scratch.path("outside"), SECRET).unwrap();
}

pub fn work(g: &dyn ShareGuest, name: &str) -> PathBuf {
    g.scratch().path("work").join(name)
}

/// Output of a command that must fail (and not time out).
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        describe(&out)
    );
    assert_ne!(
        out.status.code(),
        Some(124),
        "timed out: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything in the scratch folder outside the shares, with contents.
pub fn outside_state(g: &dyn ShareGuest) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&g.scratch().0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.ends_with("console.log"))
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect();
    out.sort();
    out
}

pub fn posix_operations(g: &dyn ShareGuest) {
    let out = ok(g.sh("python3 /mnt/tools/fs_ops.py /mnt/work/ops"));
    for check in [
        "create-write-read",
        "append",
        "truncate",
        "rename",
        "unlink-while-open",
        "mkdir-rmdir",
        "readdir-large",
        "symlink-readlink",
        "hard-link",
        "chmod",
        "utimes",
        "fsync",
        "statfs",
        "mmap-read",
        "locks",
        "xattr",
        "fallocate-seek",
        "mknod",
        "no-setuid",
    ] {
        assert!(
            out.contains(&format!("ok {check}\n")),
            "{check} missing: {out}"
        );
    }
    assert!(out.ends_with("all done"), "{out}");
    // What the guest did is on the host.
    let ops = work(g, "ops");
    assert_eq!(std::fs::read(ops.join("dir1/moved.txt")).unwrap(), b"b+");
    assert_eq!(
        std::fs::read_link(ops.join("link")).unwrap(),
        Path::new("dir1/moved.txt")
    );
    use std::os::unix::fs::MetadataExt;
    let hard = std::fs::metadata(ops.join("hard")).unwrap();
    assert_eq!(hard.nlink(), 2);
    assert_eq!(hard.mode() & 0o7777, 0o640);
    assert_eq!(hard.mtime(), 1_500_000_000);
    assert_eq!(std::fs::read(ops.join("sync.txt")).unwrap(), b"durable");
    assert_eq!(
        std::fs::metadata(ops.join("suid")).unwrap().mode() & 0o6000,
        0
    );
    assert!(!ops.join("sda").exists());
}

pub fn big_file_both_ways(g: &dyn ShareGuest) {
    // From the host to the guest, and back as a copy the guest writes 1 MiB
    // at a time: many requests of the largest size the guest sends. (No
    // interpreter: one costs seconds under PVM.)
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(work(g, "host.bin"), &data).unwrap();
    let out = ok(g.sh(
        "sha256sum /mnt/work/host.bin && dd if=/mnt/work/host.bin of=/mnt/work/big.bin bs=1M 2>/dev/null",
    ));
    let sum = out.split_whitespace().next().unwrap_or_default();
    assert_eq!(sum, sha256_file(&work(g, "host.bin")));
    assert!(
        std::fs::read(work(g, "big.bin")).unwrap() == data,
        "the guest's copy differs"
    );
    std::fs::remove_file(work(g, "big.bin")).unwrap();
    std::fs::remove_file(work(g, "host.bin")).unwrap();
}

pub fn escapes(g: &dyn ShareGuest) {
    let before = outside_state(g);
    let outside = g.scratch().path("outside");
    std::os::unix::fs::symlink(&outside, work(g, "esc-abs")).unwrap();
    std::os::unix::fs::symlink("../outside", work(g, "esc-rel")).unwrap();
    std::os::unix::fs::symlink("../../../../../../..", work(g, "esc-up")).unwrap();
    std::os::unix::fs::symlink("/proc/self/root", work(g, "esc-proc")).unwrap();
    let outside_s = outside.display().to_string();
    // Symlinks resolve inside the guest: none of these reach the host file.
    let script = format!(
        "cd /mnt/work
         cat esc-abs; cat esc-rel; cat esc-up/{outside_s}; cat esc-proc/{outside_s}
         echo pwned > esc-abs; echo pwned > esc-rel
         echo pwned > esc-up/{outside_s}; echo pwned > esc-proc/{outside_s}
         cat ../outside; cat /mnt/work/../outside; cat {outside_s}
         echo pwned > ../outside
         ln /etc/hostname hl && echo linked-in
         ln esc-abs /tmp/hl-out; echo x > moved && mv moved /tmp/moved-out
         python3 -c \"
import ctypes, os, struct
# File handles: the guest kernel makes them from our nodeids; forged ones
# for any nodeid must never open anything outside the share.
libc = ctypes.CDLL(None, use_errno=True)
dev = os.stat('/mnt/work').st_dev
mnt = os.open('/mnt/work', os.O_RDONLY)
opened = 0
for nodeid in range(1, 300):
    for typ, words in ((0x81, [nodeid >> 32, nodeid & 0xffffffff, 0]),
                       (0x82, [nodeid >> 32, nodeid & 0xffffffff, 0, 0, 1, 0])):
        raw = struct.pack('<Ii', 4 * len(words), typ) + struct.pack('<%dI' % len(words), *words)
        buf = ctypes.create_string_buffer(raw, len(raw))
        # Non-blocking: a FIFO another test planted in the share is a
        # guest pipe, whose open would wait for a writer.
        fd = libc.open_by_handle_at(mnt, buf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        if fd >= 0:
            opened += 1
            st = os.fstat(fd)
            regular = (st.st_mode & 0o170000) == 0o100000
            if st.st_dev != dev or (regular and b'host secret' in os.read(fd, 100)):
                print('ESCAPED', nodeid)
            os.close(fd)
print('handles opened', opened)
\"
         true"
    );
    let out = g.sh(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("host secret"), "{}", describe(&out));
    assert!(!stdout.contains("linked-in"), "{}", describe(&out));
    assert!(stdout.contains("handles opened"), "{}", describe(&out));
    assert!(!stdout.contains("ESCAPED"), "{}", describe(&out));
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), SECRET);
    assert_eq!(outside_state(g), before);
    // Nothing outside the share appeared on the host.
    for p in ["hl-out", "moved-out", "pwned"] {
        assert!(!g.scratch().path(p).exists());
    }
}

pub fn read_only(g: &dyn ShareGuest) {
    assert_eq!(ok(g.sh("cat /mnt/ro/file")), "read only");
    let err = fails(g.sh("echo x > /mnt/ro/file"));
    assert!(err.contains("Read-only file system"), "{err}");
    // Even with the guest's mount made writable, the VMM refuses. (One
    // guest command for all: each costs seconds under PVM.)
    let attempts = [
        "echo x > /mnt/ro/file",
        "echo x >> /mnt/ro/file",
        "touch /mnt/ro/new",
        "rm /mnt/ro/file",
        "mv /mnt/ro/file /mnt/ro/renamed",
        "mkdir /mnt/ro/d",
        "truncate -s 0 /mnt/ro/file",
        "chmod 777 /mnt/ro/file",
    ];
    let script: String = attempts
        .iter()
        .map(|cmd| format!("if {{ {cmd}; }} 2>/tmp/ro.err; then echo WROTE; else read -r l </tmp/ro.err; echo \"$l\"; fi\n"))
        .collect();
    let out = ok(g.sh(&format!("mount -o remount,rw /mnt/ro\n{script}")));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), attempts.len(), "{out}");
    for (cmd, line) in attempts.iter().zip(lines) {
        assert!(line.contains("Read-only file system"), "{cmd}: {line}");
    }
    assert_eq!(
        std::fs::read_to_string(g.scratch().path("ro/file")).unwrap(),
        "read only\n"
    );
    assert_eq!(
        std::fs::read_dir(g.scratch().path("ro")).unwrap().count(),
        1
    );
}
