//! Our devices as vhost-user daemons (`vmm device fs|vsock`) behind QEMU
//! (Debian's qemu-system-x86, a frontend nobody here wrote), booting our
//! guest kernel and base image (docs/vhost-user.md).
//!
//! One QEMU guest serves the file: three `vmm device fs` daemons (`work`
//! with --tag, `tools` without it, `ro` with --read-only) and a `vmm
//! device vsock` daemon, which also carries the guest agent: so the share
//! checks of tests/fs.rs run here unchanged (`common::shares`). Every
//! daemon first gets a connection that sends garbage, and must serve QEMU
//! after it. The protocol's error paths are tested without a guest.
//! (vhost-user is Linux's: on other hosts the file is empty.)
#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use common::shares::{self, ShareGuest};
use common::{sha256_hex, spawn_for_the_tests, Scratch, VMM};
use devices::sync::Locked;
use vmm::agent::{AgentClient, Exec, ReadyListener};
use vmm::artifacts::{self, KernelFlavour};
use vmm::config::{Flavour, VmConfig};

const GUEST_CID: u64 = 3;
const MEMORY_MIB: u64 = 512;

/// A `vmm device` daemon, killed with the test process.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vmm device ARGS --socket SOCKET` and waits for its "listening"
/// line.
fn daemon(args: &[&str], socket: &Path) -> Daemon {
    let mut cmd = Command::new(VMM);
    cmd.arg("device")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = spawn_for_the_tests(cmd, libc::SIGKILL).expect("vmm device starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "vmm device {args:?}: {line}");
    // The rest of its log goes to ours.
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("[vmm device] {line}");
        }
    });
    Daemon {
        child,
        socket: socket.to_path_buf(),
    }
}

/// A vhost-user message header: request, flags (version 1), payload size.
fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    [request, flags, size]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// Connections that break the protocol, each on its own connection: one
/// closed before any request, a truncated header, a bad version, a payload size past the limit, an
/// unknown request, a memory table with more regions than allowed, one
/// whose region has no file descriptor, a payload cut short.
fn garbage() -> Vec<Vec<u8>> {
    const SET_MEM_TABLE: u32 = 5;
    const SET_OWNER: u32 = 3;
    let mut table_too_big = header(SET_MEM_TABLE, 1, 8 + 32 * 200);
    table_too_big.extend(200u32.to_le_bytes());
    table_too_big.extend(0u32.to_le_bytes());
    table_too_big.extend(vec![0u8; 32 * 200]);
    let mut no_fd = header(SET_MEM_TABLE, 1, 8 + 32);
    no_fd.extend(1u32.to_le_bytes());
    no_fd.extend(0u32.to_le_bytes());
    no_fd.extend(
        [0x10_0000u64, 1 << 30, 0x7f00_0000_0000, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes()),
    );
    let mut cut = header(SET_MEM_TABLE, 1, 8 + 32);
    cut.extend([1u8, 0, 0]);
    vec![
        vec![],
        vec![1, 0, 0, 0, 1],
        header(SET_OWNER, 0x7, 0),
        header(SET_OWNER, 1, u32::MAX),
        header(9999, 1, 0),
        table_too_big,
        no_fd,
        cut,
    ]
}

/// Sends each of [`garbage`] on its own connection to `socket`: the daemon
/// must close each and stay up.
fn send_garbage(d: &mut Daemon) {
    for (i, bytes) in garbage().into_iter().enumerate() {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut rest = Vec::new();
        let read = s.read_to_end(&mut rest);
        assert!(
            read.is_ok()
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
            "garbage {i}: the daemon did not close the connection"
        );
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "garbage {i}: the daemon ended"
        );
    }
}

/// QEMU microvm with our kernel, the base image as a throwaway root disk,
/// guest memory shared with the daemons, and `devices` (QEMU arguments).
fn qemu(cmdline_extra: &str, devices: &[String]) -> Command {
    let hv = vmm::open_hypervisor().expect("/dev/kvm");
    let flavour = KernelFlavour::resolve(Flavour::Auto, hv.kind());
    drop(hv);
    // QEMU appends its virtio-mmio devices after our command line, where
    // the kernel no longer reads them: all eight microvm transports are
    // named instead (empty ones are skipped by the guest).
    let transports: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                "virtio_mmio.device=512@{:#x}:{}",
                0xfeb0_0000 + 512 * i,
                5 + i
            )
        })
        .collect();
    let config = VmConfig {
        cmdline: Some(cmdline_extra.to_string()),
        ..Default::default()
    };
    let cmdline = vmm::vm::kernel_cmdline(&config, flavour, &transports);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off,auto-kernel-cmdline=off",
    ])
    .args([
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
    ])
    .args(["-m", &format!("{MEMORY_MIB}M")])
    .args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
    ])
    .args(["-machine", "memory-backend=mem"])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(artifacts::default_kernel(flavour))
    .arg("-initrd")
    .arg(artifacts::default_minimal_initramfs())
    .args(["-append", &cmdline])
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none,snapshot=on",
        artifacts::default_base_image().display()
    ))
    .args(["-device", "virtio-blk-device,drive=root"])
    .args(devices);
    cmd
}

/// The QEMU arguments of a vhost-user device `device` on `socket`.
fn vhost_user(id: &str, socket: &Path, device: &str) -> [String; 4] {
    [
        "-chardev".into(),
        format!("socket,id={id},path={}", socket.display()),
        "-device".into(),
        format!("{device},chardev={id}"),
    ]
}

struct QemuGuest {
    scratch: Scratch,
    /// The vsock daemon's host socket.
    uds: PathBuf,
    /// Kept running while the guest is.
    _daemons: Vec<Daemon>,
    qemu: Child,
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

impl ShareGuest for QemuGuest {
    fn sh(&self, script: &str) -> Output {
        let exec = Exec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Some(Duration::from_secs(900)),
            ..Default::default()
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = AgentClient::new(&self.uds)
            .exec(&exec, None, &mut stdout, &mut stderr)
            .expect("the guest agent answers through the vsock daemon");
        Output {
            status: std::process::ExitStatus::from_raw(status.shell_code() << 8),
            stdout,
            stderr,
        }
    }

    fn scratch(&self) -> &Scratch {
        &self.scratch
    }
}

fn guest() -> MutexGuard<'static, QemuGuest> {
    static GUEST: OnceLock<Mutex<QemuGuest>> = OnceLock::new();
    GUEST.get_or_init(|| Mutex::new(boot())).locked()
}

fn boot() -> QemuGuest {
    let scratch = Scratch::new("vhost-user");
    shares::prepare(&scratch);
    let dir = |name: &str| scratch.path(name).display().to_string();
    let (work, tools, ro, vsock) = (
        scratch.path("work.sock"),
        scratch.path("tools.sock"),
        scratch.path("ro.sock"),
        scratch.path("vsock.sock"),
    );
    let uds = scratch.path("v.sock");
    let mut daemons = vec![
        daemon(
            &["fs", "--shared-dir", &dir("work"), "--tag", "work"],
            &work,
        ),
        daemon(&["fs", "--shared-dir", &dir("tools")], &tools),
        daemon(&["fs", "--shared-dir", &dir("ro"), "--read-only"], &ro),
        vsock_daemon(&uds, &vsock),
    ];
    for d in &mut daemons {
        send_garbage(d);
    }
    let ready = ReadyListener::bind(&uds).unwrap();
    let mut devices = Vec::new();
    for (id, socket, tag) in [
        ("work", &work, "work"),
        ("tools", &tools, "tools"),
        ("ro", &ro, "ro"),
    ] {
        devices.extend(vhost_user(
            id,
            socket,
            &format!("vhost-user-fs-device,tag={tag},queue-size=1024"),
        ));
    }
    devices.extend(vhost_user("vsock", &vsock, "vhost-user-vsock-device"));
    let extra = format!(
        "VMM_AGENT_PORT={} VMM_SHARES=work:/mnt/work,tools:/mnt/tools:ro,ro:/mnt/ro:ro",
        vmm_agent::AGENT_PORT
    );
    let mut cmd = qemu(&extra, &devices);
    cmd.arg("-serial")
        .arg(format!("file:{}", scratch.path("console.log").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let command_line = format!("{cmd:?}");
    let qemu = spawn_for_the_tests(cmd, libc::SIGKILL)
        .expect("qemu-system-x86_64 (tools/setup.sh installs it)");
    if let Err(e) = ready.wait(Duration::from_secs(600), None) {
        let console = std::fs::read_to_string(scratch.path("console.log")).unwrap_or_default();
        panic!("the guest agent did not come up behind QEMU: {e}\n{command_line}\n{console}");
    }
    QemuGuest {
        scratch,
        uds,
        _daemons: daemons,
        qemu,
    }
}

fn vsock_daemon(uds: &Path, socket: &Path) -> Daemon {
    let uds = uds.display().to_string();
    daemon(
        &[
            "vsock",
            "--guest-cid",
            &GUEST_CID.to_string(),
            "--uds-path",
            &uds,
        ],
        socket,
    )
}

#[test]
fn posix_operations_work_through_the_daemon() {
    shares::posix_operations(&*guest());
}

#[test]
fn a_4_mib_file_keeps_its_checksum_both_ways() {
    shares::big_file_both_ways(&*guest());
}

#[test]
fn escapes_fail_and_leave_the_host_untouched() {
    shares::escapes(&*guest());
}

#[test]
fn read_only_shares_refuse_writes_on_the_host_side() {
    shares::read_only(&*guest());
}

/// The bytes guest stream `i` sends: (i + j) % 251 at offset j.
fn pattern_ok(i: u8, data: &[u8]) -> bool {
    data.iter()
        .enumerate()
        .all(|(j, &b)| b as usize == (i as usize + j) % 251)
}

/// A guest command run on its own thread; its output once it ended.
#[derive(Default)]
struct Script(Mutex<Option<Output>>);

impl Script {
    /// Panics with the command's output if it has ended.
    fn check_running(&self, waiting_for: &str) {
        if let Some(out) = self.0.locked().as_ref() {
            panic!(
                "the guest script ended while the host waited for {waiting_for}: {}",
                common::describe(out)
            );
        }
    }
}

/// The next connection on `listener`, or a panic with the guest script's
/// output if it ends first.
fn accept_while(listener: &UnixListener, script: &Script, what: &str) -> UnixStream {
    use std::os::fd::AsRawFd;
    loop {
        let mut fd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd.
        if unsafe { libc::poll(&mut fd, 1, 500) } > 0 {
            return listener.accept().unwrap().0;
        }
        script.check_running(what);
    }
}

#[test]
fn eight_concurrent_4_mib_streams_each_way_arrive_intact() {
    const STREAMS: usize = 8;
    const MIB: usize = 4;
    let g = guest();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/guest/vsock_streams.py"
        ),
        g.scratch.path("tools/vsock_streams.py"),
    )
    .unwrap();
    let port = |p: u32| format!("{}_{p}", g.uds.display());
    let ready = UnixListener::bind(port(6002)).unwrap();
    let incoming = UnixListener::bind(port(6001)).unwrap();
    let script = Script::default();
    std::thread::scope(|s| {
        s.spawn(|| {
            let out = g.sh(&format!(
                "python3 /mnt/tools/vsock_streams.py {STREAMS} {MIB}"
            ));
            *script.0.locked() = Some(out);
        });
        // Guest to host: read each stream whole, check its bytes.
        let receiver = s.spawn(|| {
            let readers: Vec<_> = (0..STREAMS)
                .map(|_| {
                    let mut conn = accept_while(&incoming, &script, "a guest stream");
                    std::thread::spawn(move || {
                        let mut data = Vec::new();
                        conn.read_to_end(&mut data).unwrap();
                        let _ = conn.write_all(b"k");
                        data
                    })
                })
                .collect();
            let mut seen = Vec::new();
            for r in readers {
                let data = r.join().unwrap();
                let (i, body) = data.split_first().expect("a stream with its number");
                assert_eq!(body.len(), MIB << 20, "stream {i} length");
                assert!(pattern_ok(*i, body), "stream {i} corrupted");
                seen.push(*i);
            }
            seen.sort();
            seen
        });
        // Host to guest: once the guest listens, 8 writers at once; each
        // gets the sha256 of what it sent.
        drop(accept_while(&ready, &script, "the guest's listener"));
        let writers: Vec<_> = (0..STREAMS)
            .map(|i| {
                let uds = g.uds.clone();
                s.spawn(move || {
                    let data: Vec<u8> = (0..MIB << 20)
                        .map(|j| ((j * 7 + i * 13) % 256) as u8)
                        .collect();
                    let mut conn = UnixStream::connect(&uds).unwrap();
                    conn.write_all(b"CONNECT 6000\n").unwrap();
                    let mut answer = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    answer.read_line(&mut line).unwrap();
                    assert!(line.starts_with("OK "), "{line}");
                    conn.write_all(&data).unwrap();
                    let mut digest = String::new();
                    answer.read_line(&mut digest).unwrap();
                    (digest.trim().to_string(), sha256_hex(&data))
                })
            })
            .collect();
        for w in writers {
            let (guest_digest, host_digest) = w.join().unwrap();
            assert_eq!(guest_digest, host_digest);
        }
        assert_eq!(
            receiver.join().unwrap(),
            (0..STREAMS as u8).collect::<Vec<_>>()
        );
    });
    let out = script.0.locked().take().expect("the script ended");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("streams done"),
        "{}",
        common::describe(&out)
    );
}

/// A frontend of our own (rust-vmm's vhost crate): the handshake QEMU
/// starts with, and the device's configuration space.
fn handshake(socket: &Path, config_size: u32) -> Option<Vec<u8>> {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
    use vhost::VhostBackend;
    let mut frontend = Frontend::connect(socket, 3).expect("the daemon accepts a frontend");
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1 offered");
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    frontend.set_protocol_features(protocol).unwrap();
    if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        return None;
    }
    let (_, config) = frontend
        .get_config(
            0,
            config_size,
            VhostUserConfigFlags::WRITABLE,
            &vec![0; config_size as usize],
        )
        .unwrap();
    Some(config)
}

#[test]
fn a_daemon_outlives_garbage_serves_its_frontend_and_exits_0_when_it_leaves() {
    let scratch = Scratch::new("vhost-user-life");
    std::fs::create_dir_all(scratch.path("share")).unwrap();
    let share = scratch.path("share").display().to_string();
    let socket = scratch.path("fs.sock");
    let mut d = daemon(&["fs", "--shared-dir", &share, "--tag", "life"], &socket);
    // Listening means confined: no capabilities, no new privileges, and
    // a seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    for line in [
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
    ] {
        assert!(status.contains(line), "{line} missing:\n{status}");
    }
    send_garbage(&mut d);
    let config = handshake(&socket, 40).expect("a tag given: the daemon serves the config");
    assert_eq!(&config[..4], b"life");
    assert_eq!(config[36..], 1u32.to_le_bytes());
    let status = d.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the daemon ends with its frontend");
    assert!(!socket.exists(), "its socket is removed");

    // Without --tag the frontend sets it: no config space is offered.
    let mut d = daemon(&["fs", "--shared-dir", &share], &socket);
    assert_eq!(handshake(&socket, 40), None);
    assert_eq!(d.child.wait().unwrap().code(), Some(0));
}

#[test]
fn a_persistent_daemon_serves_frontend_after_frontend_and_sigterm_ends_it() {
    let scratch = Scratch::new("vhost-user-persist");
    let socket = scratch.path("vsock.sock");
    let uds = scratch.path("v.sock");
    let uds_s = uds.display().to_string();
    let mut d = daemon(
        &[
            "vsock",
            "--guest-cid",
            "42",
            "--uds-path",
            &uds_s,
            "--persistent",
        ],
        &socket,
    );
    for _ in 0..3 {
        let config = handshake(&socket, 8).expect("vsock serves its config");
        assert_eq!(config, 42u64.to_le_bytes());
        send_garbage(&mut d);
    }
    // The host side listens between frontends too.
    assert!(UnixStream::connect(&uds).is_ok());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert_eq!(d.child.wait().unwrap().code(), Some(0));
    assert!(!socket.exists() && !uds.exists(), "its sockets are removed");
}

#[test]
fn bad_arguments_get_one_sentence_and_status_1() {
    let scratch = Scratch::new("vhost-user-args");
    let socket = scratch.path("s.sock");
    let run = |args: &[&str]| {
        let out = Command::new(VMM)
            .arg("device")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!socket.exists(), "{args:?}: no socket left");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = scratch.path("missing").display().to_string();
    let e = run(&["fs", "--shared-dir", &missing]);
    assert!(
        e.contains("cannot open the shared folder") && e.contains(&missing),
        "{e}"
    );
    let e = run(&["vsock", "--guest-cid", "2", "--uds-path", "/tmp/x"]);
    assert!(e.contains("--guest-cid 3"), "{e}");
}
