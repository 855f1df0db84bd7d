//! Imports of images made by the tests, checked by reading the ext4 image
//! back with debugfs.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::fixture::{self, Compression, Layer};
use crate::source::{self, Image};
use crate::{build_disk, import, Step};

/// A capability set: cap_net_bind_service, effective (VFS_CAP_REVISION_2).
const CAP: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn sample() -> fixture::Image {
    let lower = Layer::new()
        .dir("etc", 0o755)
        .file("etc/gone", b"deleted above", 0o644, 0, 0)
        .dir("old", 0o755)
        .file("old/a", b"a", 0o644, 0, 0)
        .dir("opaque", 0o755)
        .file("opaque/lower", b"hidden above", 0o644, 0, 0)
        .file("data/shared", b"linked", 0o640, 0, 0)
        .symlink("lib", "usr/lib")
        .dir("usr/lib", 0o755)
        .dir("home/user", 0o750)
        .finish();
    let upper = Layer::new()
        .whiteout("etc/gone")
        .whiteout("old")
        .opaque("opaque")
        .file("opaque/upper", b"kept", 0o644, 0, 0)
        .hardlink("data/again", "data/shared")
        .file("lib/through-link.so", b"elf", 0o755, 0, 0)
        .file("usr/bin/su", b"setuid", 0o4755, 0, 0)
        .file("home/user/notes", b"mine", 0o600, 1000, 1001)
        .file_with_xattrs(
            "usr/bin/ping",
            b"cap",
            0o755,
            &[("security.capability", CAP)],
        )
        .char_device("dev/null", 1, 3)
        .file("etc/with \"quote\" and space", b"odd", 0o644, 0, 0)
        .finish();
    fixture::Image {
        layers: vec![(lower, Compression::Gzip), (upper, Compression::Zstd)],
        config: json!({"Env": ["PATH=/usr/bin", "A=1"], "Cmd": ["/usr/bin/su"], "WorkingDir": "/home/user", "User": "1000:1001"}),
    }
}

/// Runs one debugfs request on an image; returns its output.
fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(disk)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn import(path: &Path, dir: &Path) -> (Image, PathBuf, Vec<Step>) {
    let image = Image::open(path).unwrap();
    let work = dir.join("work");
    std::fs::create_dir(&work).unwrap();
    let out = dir.join("disk.ext4");
    let mut steps = Vec::new();
    build_disk(&image, &work, &out, &mut |s| steps.push(s)).unwrap();
    (image, out, steps)
}

fn check_sample(disk: &Path) {
    let root = debugfs(disk, "ls /");
    assert!(root.contains("etc") && root.contains("usr"), "{root}");
    assert!(!debugfs(disk, "ls /etc").contains("gone"));
    assert!(debugfs(disk, "stat /old").contains("File not found"));
    let opaque = debugfs(disk, "ls /opaque");
    assert!(
        opaque.contains("upper") && !opaque.contains("lower"),
        "{opaque}"
    );
    let shared = debugfs(disk, "stat /data/shared");
    assert!(shared.contains("Links: 2"), "{shared}");
    let inode = |p: &str| {
        debugfs(disk, &format!("stat {p}"))
            .split_whitespace()
            .nth(2)
            .map(str::to_owned)
    };
    assert_eq!(inode("/data/shared"), inode("/data/again"));
    assert!(debugfs(disk, "cat /usr/lib/through-link.so").contains("elf"));
    assert!(debugfs(disk, "stat /lib").contains("Fast link dest: \"usr/lib\""));
    let su = debugfs(disk, "stat /usr/bin/su");
    assert!(
        su.contains("Mode:  04755") && su.contains("User:     0"),
        "{su}"
    );
    let notes = debugfs(disk, "stat /home/user/notes");
    assert!(notes.contains("User:  1000   Group:  1001"), "{notes}");
    assert!(notes.contains("Mode:  0600"), "{notes}");
    assert!(debugfs(disk, "stat /home/user").contains("Mode:  0750"));
    let ping = debugfs(disk, "ea_list /usr/bin/ping");
    assert!(ping.contains("security.capability (20)"), "{ping}");
    let null = debugfs(disk, "stat /dev/null");
    assert!(
        null.contains("Type: character special") && null.contains("Mode:  0666"),
        "{null}"
    );
    assert!(null.contains("Device major/minor number: 01:03"), "{null}");
    assert!(debugfs(disk, "cat \"/etc/with \"\"quote\"\" and space\"").contains("odd"));
    let root_stat = debugfs(disk, "stat /");
    assert!(
        root_stat.contains("Mode:  0755") && root_stat.contains("User:     0"),
        "{root_stat}"
    );
    // Times are the image's, not the import's.
    assert!(debugfs(disk, "stat /usr/bin/su").contains("2001"));
    assert!(debugfs(disk, "stat /home/user").contains("2001"));
}

#[test]
fn oci_layout_with_every_kind_of_change() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let digest = sample().write_oci_layout(&layout, "sample:1", true);
    let (image, disk, steps) = import(&layout, dir.path());
    assert_eq!(image.config_digest, digest);
    assert_eq!(image.name.as_deref(), Some("sample:1"));
    assert_eq!(image.layers.len(), 2);
    assert_eq!(steps.len(), 3);
    assert!(matches!(
        steps[0],
        Step::Layer {
            index: 1,
            count: 2,
            ..
        }
    ));
    check_sample(&disk);
}

#[test]
fn docker_archive_and_oci_archive_give_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("docker.tar");
    let digest = sample().write_docker_archive(&archive, "sample:docker");
    let one = dir.path().join("one");
    std::fs::create_dir(&one).unwrap();
    let (image, disk, _) = import(&archive, &one);
    assert_eq!(image.config_digest, digest);
    assert_eq!(image.name.as_deref(), Some("sample:docker"));
    check_sample(&disk);

    let layout = dir.path().join("layout");
    sample().write_oci_layout(&layout, "x", false);
    let oci_archive = dir.path().join("oci.tar");
    fixture::tar_folder(&layout, &oci_archive);
    let two = dir.path().join("two");
    std::fs::create_dir(&two).unwrap();
    let (image, disk, _) = import(&oci_archive, &two);
    assert_eq!(
        image.config_digest, digest,
        "same config whichever way it is packed"
    );
    check_sample(&disk);
}

#[test]
fn a_corrupt_layer_is_refused_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let image = fixture::Image {
        layers: vec![(
            Layer::new().file("a", b"original", 0o644, 0, 0).finish(),
            Compression::None,
        )],
        config: json!({}),
    };
    image.write_oci_layout(&layout, "x", false);
    // Change one byte of the layer blob (the only blob holding "original").
    for blob in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let path = blob.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(8).position(|w| w == b"original") {
            bytes[at] = b'O';
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let opened = Image::open(&layout).unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let err = build_disk(&opened, &work, &dir.path().join("d.ext4"), &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            import::Error::Source(source::Error::DigestMismatch { .. })
        ),
        "{err}"
    );
}

#[test]
fn no_image_for_this_architecture_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let image = fixture::Image {
        layers: vec![],
        config: json!({}),
    };
    image.write_oci_layout(&layout, "x", false);
    // Rewrite the inner index's platform to one no host has, and the outer
    // index to name the rewritten one.
    let blobs = layout.join("blobs/sha256");
    for blob in std::fs::read_dir(&blobs).unwrap() {
        let path = blob.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("\"platform\"") {
            let text = text
                .replace("\"amd64\"", "\"s390x\"")
                .replace("\"arm64\"", "\"s390x\"");
            let digest = source::sha256(text.as_bytes());
            std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), &text).unwrap();
            let index = std::fs::read_to_string(layout.join("index.json")).unwrap();
            let old = source::sha256(&std::fs::read(&path).unwrap());
            let index = index.replace(&old, &digest).replace(
                &format!("\"size\":{}", std::fs::read(&path).unwrap().len()),
                &format!("\"size\":{}", text.len()),
            );
            std::fs::write(layout.join("index.json"), index).unwrap();
        }
    }
    let err = Image::open(&layout).err().expect("refused");
    assert!(matches!(err, source::Error::NoPlatform { .. }), "{err}");
    assert!(err.to_string().contains("linux/s390x"), "{err}");
}

#[test]
fn not_an_image_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let err = Image::open(dir.path()).err().expect("refused");
    assert!(matches!(err, source::Error::UnknownFormat(_)), "{err}");
}

/// The importer needs no privilege: run as root (as CI does), the sample
/// import runs again as user 65534, whose host files cannot carry root's or
/// user 1000's ownership, set-id bits, capabilities or device nodes.
#[test]
fn an_unprivileged_user_imports_the_same_image() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Already unprivileged: the other tests ran this way.
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let scratch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scratch.path(), PermissionsExt::from_mode(0o1777)).unwrap();
    // This test binary where user 65534 can reach it wherever the build
    // folder is (a private clone, a 0700 home): a hard link (a copy across
    // file systems).
    let exe = scratch.path().join("tests");
    let me = std::env::current_exe().unwrap();
    if std::fs::hard_link(&me, &exe).is_err() {
        std::fs::copy(&me, &exe).unwrap();
        std::fs::set_permissions(&exe, PermissionsExt::from_mode(0o755)).unwrap();
    }
    let run = || {
        Command::new(&exe)
            .args([
                "--exact",
                "tests::oci_layout_with_every_kind_of_change",
                "--test-threads=1",
            ])
            .env("TMPDIR", scratch.path())
            .uid(65534)
            .gid(65534)
            .output()
    };
    // A copy just written may still be open for writing in a process
    // another test thread forked meanwhile (until it execs): ETXTBSY.
    let mut tries = 0;
    let out = loop {
        match run() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 1000 => tries += 1,
            other => break other.unwrap(),
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compressed_archives_are_told_by_their_first_bytes() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.tar");
    std::fs::write(&plain, b"not compressed").unwrap();
    assert!(source::decompressed(&plain).unwrap().is_none());
    let gz = dir.path().join("a.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(b"gzip inside").unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    let zst = dir.path().join("a.tar.zst");
    std::fs::write(&zst, crate::zstd::compress(b"zstd inside")).unwrap();
    for (path, want) in [(gz, "gzip inside"), (zst, "zstd inside")] {
        let mut text = String::new();
        source::decompressed(&path)
            .unwrap()
            .expect("compressed")
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, want);
    }
}
