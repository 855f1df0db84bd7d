//! OCI and Docker images as root disks, on real guests (docs/images.md).
//! The images are made by the test: layers written as tar files (the
//! host's static busybox is their only program), packed as a `docker save`
//! archive and as an OCI archive; no network. One VM booted from the main
//! image serves the file's exec checks; `vmm run --image` boots its own.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::{describe, ok, vmm, Guest, Scratch, VMM};
use serde_json::json;
use vmm_image::fixture::{self, Compression, Layer};

/// cap_net_bind_service, effective (VFS_CAP_REVISION_2).
const CAP_NET_BIND_SERVICE: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn busybox() -> Vec<u8> {
    std::fs::read("/usr/bin/busybox")
        .expect("/usr/bin/busybox (busybox-static; tools/setup.sh installs it)")
}

/// The main image: a busybox system in two layers, with every kind of
/// change a layer can make, a user of its own, and a configuration.
fn main_image() -> fixture::Image {
    let bb = busybox();
    let lower = Layer::new()
        .dir("bin", 0o755)
        .file("bin/busybox", &bb, 0o755, 0, 0)
        .symlink("bin/sh", "busybox")
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
            0o644,
            0,
            0,
        )
        .file(
            "etc/group",
            b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
            0o644,
            0,
            0,
        )
        .file("etc/gone", b"deleted above", 0o644, 0, 0)
        .dir("old", 0o755)
        .file("old/a", b"a", 0o644, 0, 0)
        .dir("opaque", 0o755)
        .file("opaque/lower", b"hidden above", 0o644, 0, 0)
        .dir("data", 0o755)
        .file("data/shared", b"linked", 0o644, 0, 0)
        .dir("home", 0o755)
        .dir("home/app", 0o755)
        .finish();
    let upper = Layer::new()
        .whiteout("etc/gone")
        .whiteout("old")
        .opaque("opaque")
        .file("opaque/upper", b"kept", 0o644, 0, 0)
        .hardlink("data/again", "data/shared")
        .symlink("data/link", "/data/shared")
        .dir("opt/suid", 0o755)
        .file("opt/suid/busybox", &bb, 0o4755, 0, 0)
        .dir("opt/cap", 0o755)
        .file_with_xattrs(
            "opt/cap/busybox",
            &bb,
            0o755,
            &[("security.capability", CAP_NET_BIND_SERVICE)],
        )
        .file("home/app/notes", b"mine", 0o600, 1000, 1000)
        .finish();
    fixture::Image {
        layers: vec![(lower, Compression::Gzip), (upper, Compression::Zstd)],
        config: json!({
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hello from the image"],
            "WorkingDir": "/home/app/work",
            "User": "app",
            "Cmd": ["sh", "-c", "echo cmd ran as $(id -u) in $(pwd): $GREETING"],
        }),
    }
}

/// An image with no shell: busybox where the agent's applet fallback
/// (`/bin/busybox`) does not look, and no `sh`.
fn shell_less_image() -> fixture::Image {
    let layer = Layer::new()
        .dir("usr/local/bin", 0o755)
        .file("usr/local/bin/busybox", &busybox(), 0o755, 0, 0)
        .finish();
    fixture::Image {
        layers: vec![(layer, Compression::None)],
        config: json!({"Entrypoint": ["/usr/local/bin/busybox"], "Cmd": ["echo", "no shell here"]}),
    }
}

/// This test process's image names.
fn name(tag: &str) -> String {
    format!("test-{}-{tag}", std::process::id())
}

/// Removes what earlier runs of this file left (their process is gone).
fn remove_ended_test_images() {
    for listed in vmm::image::list(&[]).unwrap_or_default() {
        for n in &listed.names {
            let pid = n
                .strip_prefix("test-")
                .and_then(|r| r.split('-').next()?.parse().ok());
            if pid.is_some_and(|p: u32| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = vmm(&["image", "rm", n]);
            }
        }
    }
}

/// The main image, imported once for the file (from a `docker save`
/// archive), and a VM booted from it.
struct Shared {
    guest: Guest,
    digest: String,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        remove_ended_test_images();
        let scratch = Scratch::new("image");
        let archive = scratch.path("main.tar");
        let digest = main_image().write_docker_archive(&archive, "ignored:tag");
        let out = vmm(&[
            "image",
            "import",
            archive.to_str().unwrap(),
            "--name",
            &name("main"),
        ]);
        assert!(ok(out).contains("imported"));
        let config = json!({
            "memory_mib": 256,
            "rootfs": {"image": name("main")},
            "serial": "off",
            "vsock": {"cid": 3, "uds_path": scratch.path("vsock.sock")},
        });
        Shared {
            guest: Guest::boot(scratch, &config),
            digest,
        }
    })
}

/// `vmm exec` in the shared VM with extra options.
fn exec(options: &[&str], argv: &[&str]) -> Output {
    Command::new(VMM)
        .arg("exec")
        .arg("--api-socket")
        .arg(&shared().guest.api)
        .args(options)
        .arg("--")
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_image_configuration_is_every_execs_default() {
    let out = ok(exec(
        &[],
        &["sh", "-c", "id -u; id -G; pwd; echo $GREETING; echo $HOME"],
    ));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "1000",
            "1000 50",
            "/home/app/work",
            "hello from the image",
            "/home/app"
        ],
        "User (with its groups), WorkingDir (created), Env, HOME"
    );
    let out = ok(exec(
        &["--user", "root", "--cwd", "/", "-e", "GREETING=overridden"],
        &["sh", "-c", "id -u; pwd; echo $GREETING; echo $PATH"],
    ));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["0", "/", "overridden", "/usr/bin:/bin"]
    );
    let out = exec(&["--user", "nobody-here"], &["true"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nobody-here"),
        "{}",
        describe(&out)
    );
}

#[test]
fn layers_apply_in_order_with_whiteouts_links_and_metadata() {
    let script = r#"
        test -e /etc/gone && echo "whiteout file: still there"
        test -e /old && echo "whiteout folder: still there"
        echo "opaque: $(ls /opaque | tr '\n' ' ')"
        echo "hard link: $(stat -c %h /data/again) $(stat -c %i /data/again) $(stat -c %i /data/shared)"
        echo "symlink: $(readlink /data/link) $(cat /data/link)"
        echo "setuid: $(stat -c %a:%u:%g /opt/suid/busybox)"
        echo "owner: $(stat -c %a:%u:%g /home/app/notes)"
        echo "capability: $(/opt/cap/busybox grep CapEff /proc/self/status)"
    "#;
    let out = ok(exec(&["--user", "app"], &["sh", "-c", script]));
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let link: Vec<&str> = lines.get(1).unwrap_or(&"").split(' ').collect();
    assert!(link.len() == 5 && link[3] == link[4], "one inode: {out}");
    assert_eq!(
        lines,
        [
            "opaque: upper",
            &format!("hard link: 2 {} {}", link[3], link[3]),
            "symlink: /data/shared linked",
            "setuid: 4755:0:0",
            "owner: 600:1000:1000",
            // Run by user 1000, the file's capability is effective.
            "capability: CapEff:\t0000000000000400",
        ]
    );
}

#[test]
fn run_image_runs_its_command_and_an_image_without_a_shell_works() {
    let s = shared();
    let out = vmm(&["run", "--cold", "--image", &name("main")]);
    assert_eq!(
        ok(out),
        "cmd ran as 1000 in /home/app/work: hello from the image"
    );
    let scratch = Scratch::new("image-noshell");
    let layout = scratch.path("layout");
    shell_less_image().write_oci_layout(&layout, "noshell", true);
    let archive = scratch.path("noshell.tar");
    fixture::tar_folder(&layout, &archive);
    // From standard input, as `skopeo copy ... oci-archive:/dev/stdout` or
    // `docker save | vmm image import -` give it.
    let mut child = Command::new(VMM)
        .args(["image", "import", "-", "--name", &name("noshell")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(&archive).unwrap())
        .unwrap();
    ok(child.wait_with_output().unwrap());
    assert_eq!(
        ok(vmm(&["run", "--cold", "--image", &name("noshell")])),
        "no shell here"
    );
    assert_eq!(
        ok(vmm(&[
            "run",
            "--cold",
            "--image",
            &name("noshell"),
            "--",
            "echo",
            "args",
            "replace",
            "Cmd"
        ])),
        "args replace Cmd"
    );
    assert!(s.digest.starts_with("sha256:"));
}

#[test]
fn one_copy_per_image_and_removal_waits_for_templates() {
    let s = shared();
    // The same image, packed another way, imported under a second name:
    // still one image.
    let scratch = Scratch::new("image-again");
    let layout = scratch.path("layout");
    main_image().write_oci_layout(&layout, "again", false);
    let out = ok(vmm(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--name",
        &name("again"),
    ]));
    assert!(out.starts_with("already imported"), "{out}");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(vmm(&["image", "ls", "--json"]))).unwrap();
    let ours: Vec<&serde_json::Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["digest"] == s.digest.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{listed}");
    let names = ours[0]["names"].as_array().unwrap();
    assert!(names.contains(&json!(name("main"))) && names.contains(&json!(name("again"))));
    // Sparse: far less on disk than the file system's size.
    let on_disk = ours[0]["size_bytes"].as_u64().unwrap();
    assert!(
        on_disk < ours[0]["disk_bytes"].as_u64().unwrap() / 4,
        "{}",
        ours[0]
    );

    // A template built from the image keeps its defaults after a restore.
    let template = name("tmpl");
    ok(vmm(&[
        "template",
        "create",
        &template,
        "--image",
        &name("again"),
    ]));
    let out = ok(vmm(&[
        "run",
        "--template",
        &template,
        "--",
        "sh",
        "-c",
        "id -u; echo $GREETING",
    ]));
    assert_eq!(out, "1000\nhello from the image");
    let refused = vmm(&["image", "rm", &s.digest]);
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(&template),
        "{}",
        describe(&refused)
    );
    ok(vmm(&["template", "rm", &template]));
    // One name goes, the image stays for the other.
    assert!(ok(vmm(&["image", "rm", &name("again")])).contains("other names"));
    assert!(vmm::image::open(&name("main")).is_ok());
}
