//! A pod's VM: a `vmm launch` process started from a template (or
//! booted), with the pod's folder as a virtio-fs share,
//! driven through its control socket and its guest agent.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::action::Control;
use crate::agent::AgentClient;
use crate::api::ApiClient;

use super::network::{self, PodNetwork};
use super::options::{Settings, Start};
use super::spec::{GUEST_SHARE, SHARE_TAG};
use super::{Error, Result};

/// How long a VM may take from its process start to its agent answering.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the default template's first build may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a stopped VMM gets to end after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the VM is made of.
pub struct VmSpec<'a> {
    /// The pod's folder on the host (the containers' root file systems
    /// and bound host files are mounted in it).
    pub share: &'a Path,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub settings: &'a Settings,
    /// A private folder for the VM's sockets, config and log.
    pub dir: &'a Path,
    /// The pod's network the VM joins (the settings' network is its
    /// TAP); the VMM runs in its namespace.
    pub network: Option<&'a PodNetwork>,
}

/// A running VM whose agent answers.
pub struct Vm {
    child: Mutex<Option<Child>>,
    pid: u32,
    /// The guest's memory, MiB.
    pub memory_mib: u32,
    api: ApiClient,
    agent: AgentClient,
}

impl Vm {
    pub fn start(spec: &VmSpec) -> Result<Vm> {
        let vmm = spec.settings.vmm_binary();
        let config = spec.dir.join("vm.json");
        let start = spec.settings.start((spec.vcpus, spec.memory_mib));
        // A template of the user's is restored with its own command line
        // (with or without staged mounts); the shim's VMs stage them.
        let cmdline = match &start {
            Start::Template {
                name,
                default: false,
            } => crate::template::Template::open(name)
                .map_err(|e| Error::Start(e.to_string()))?
                .record
                .config
                .cmdline
                .clone(),
            _ => Some(STAGE_MOUNTS.to_string()),
        };
        let guest = Guest {
            share: spec.share,
            network: spec.settings.network.as_ref(),
            cmdline: cmdline.as_deref(),
        };
        write_config(&config, spec, &guest)?;
        let mut cmd = Command::new(&vmm);
        cmd.arg("launch");
        if let Start::Template { name, default } = start {
            ensure_template(&vmm, &name, default, spec, &config)?;
            cmd.args(["--template", &name]);
        }
        let api_socket = spec.dir.join("api.sock");
        let log = spec.dir.join("vmm.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|e| Error::Start(format!("cannot make {}: {e}", log.display())))?;
        cmd.arg("--config")
            .arg(&config)
            .arg("--api-socket")
            .arg(&api_socket)
            .env("VMM_LAUNCH_NOTIFY", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        if spec.settings.jail {
            cmd.arg("--jail");
        }
        if let Some(n) = spec.network {
            let netns = n.open()?;
            // SAFETY: the closure runs in the child between fork and exec
            // and makes one system call (setns).
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    network::enter(&netns)
                });
            }
        }
        let mut child = spawn_tied(cmd)
            .map_err(|e| Error::Start(format!("cannot run {}: {e}", vmm.display())))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = BufReader::new(out).read_line(&mut line);
            }
            let _ = tx.send(line);
        });
        let api = ApiClient::new(&api_socket);
        // The VMM prints `ready` once the VM runs and its socket serves.
        let ready = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) if line.trim() == "ready" => Ok(()),
            Ok(_) => Err(Error::Start(last_line(&log))),
            Err(_) => Err(Error::Start(format!(
                "the VM did not start within {START_TIMEOUT:?}"
            ))),
        };
        let agent = ready.and_then(|()| {
            api.wait_agent()
                .map_err(|e| Error::Start(format!("its agent did not come up: {e}")))?;
            let vsock = api.vsock_path().map_err(|e| Error::Api(e.to_string()))?;
            Ok(AgentClient::new(&vsock))
        });
        match agent {
            Ok(agent) => Ok(Vm {
                child: Mutex::new(Some(child)),
                pid,
                memory_mib: spec.memory_mib,
                api,
                agent,
            }),
            Err(e) => {
                end(child);
                Err(e)
            }
        }
    }

    /// The VMM process's pid (the task's pid containerd sees).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn pause(&self) -> Result<()> {
        self.api.pause().map_err(|e| Error::Api(e.to_string()))
    }

    pub fn resume(&self) -> Result<()> {
        self.api.resume().map_err(|e| Error::Api(e.to_string()))
    }

    /// Ends the VMM: SIGTERM, SIGKILL when it lingers; returns once it has
    /// ended. A second call does nothing.
    pub fn stop(&self) {
        if let Some(child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            end(child);
        }
    }
}

/// SIGTERM to the VMM (it stops its VM and removes its sockets), SIGKILL
/// when it lingers; returns once it has ended.
fn end(mut child: Child) {
    // SAFETY: kill(2) on our own child, not yet reaped (we own it).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    if !exits_within(child.id(), STOP_TIMEOUT) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The kernel command line of the shim's VMs: the guest agent stages the
/// mounts of containerd's default spec at boot (a template holds them
/// made; docs/agent-protocol.md).
const STAGE_MOUNTS: &str = "VMM_STAGE_MOUNTS=1";

/// What a VM config says of the guest besides its size.
struct Guest<'a> {
    /// The host folder of the pod's share.
    share: &'a Path,
    network: Option<&'a crate::config::NetworkConfig>,
    cmdline: Option<&'a str>,
}

/// The VM's config: the size, the pod's share, the network, the kernel
/// command line, no console.
fn write_config(path: &Path, spec: &VmSpec, guest: &Guest) -> Result<()> {
    let mut config = serde_json::json!({
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "serial": "off",
        "cmdline": guest.cmdline,
        "shares": [{ "tag": SHARE_TAG, "host_path": guest.share, "guest_path": GUEST_SHARE }],
    });
    if let Some(network) = guest.network {
        config["network"] =
            serde_json::to_value(network).map_err(|e| Error::Start(e.to_string()))?;
    }
    std::fs::write(path, config.to_string())
        .map_err(|e| Error::Start(format!("cannot write {}: {e}", path.display())))
}

/// The default template's warm-up: what a container's start does in the
/// guest (lookups, folders, files and mounts on the share), so the
/// template holds the guest's kernel ready for it. Without it, the first
/// such calls of every sandbox restored from the template were about
/// 400 ms each here (the guest's memory is faulted in lazily on restore).
const WARMUP: &str = "R=/containers/.warm/rootfs && mkdir -p $R/proc $R/dev $R/sys $R/run \
    && mount -t proc proc $R/proc && mount -t tmpfs tmpfs $R/dev && mount -t sysfs -o ro sysfs $R/sys \
    && mkdir -p $R/dev/pts && mount -t devpts -o newinstance devpts $R/dev/pts && mknod $R/dev/null c 1 3 \
    && cat /bin/sh > $R/file && cat $R/file > /dev/null && ls -la $R $R/dev $R/proc/self > /dev/null \
    && umount $R/dev/pts $R/dev $R/proc $R/sys && rm -rf /containers/.warm";

/// Checks the template fits the VM of `config`. The shim's own (`default`)
/// is built on first use, and again when the kernel, initramfs or base
/// image changed; a template named by the settings must exist and fit.
fn ensure_template(
    vmm: &Path,
    name: &str,
    default: bool,
    spec: &VmSpec,
    config: &Path,
) -> Result<()> {
    let replace = match crate::template::Template::open(name) {
        Ok(t) => {
            let vm_config = crate::config::VmConfig::from_file(config)
                .map_err(|e| Error::Start(e.to_string()))?;
            let ours = t.record.warmup.iter().map(String::as_str).eq([WARMUP]);
            match t.fit(Some(vm_config)) {
                Ok(_) if ours || !default => return Ok(()),
                // A default template of an older shim.
                Ok(_) => true,
                Err(crate::template::Error::Stale { .. }) if default => true,
                Err(e) => return Err(Error::Start(e.to_string())),
            }
        }
        Err(crate::template::Error::NoSuchTemplate(_)) if default => false,
        Err(e) => return Err(Error::Start(e.to_string())),
    };
    log::info!("building the template {name}: later sandboxes start from it");
    let empty = spec.dir.join("template-share");
    let config = spec.dir.join("template.json");
    std::fs::create_dir_all(&empty)
        .map_err(|e| Error::Start(format!("cannot prepare the template build: {e}")))?;
    // A pod's TAP template is built in a network namespace of its own,
    // with a TAP there of the same name; each sandbox from it moves to
    // its pod's addresses.
    let network = match spec.network {
        Some(_) => Some(network::template_config()),
        None => spec.settings.network.clone(),
    };
    let guest = Guest {
        share: &empty,
        network: network.as_ref(),
        cmdline: Some(STAGE_MOUNTS),
    };
    write_config(&config, spec, &guest)?;
    let log = spec.dir.join("template.log");
    let log_file = std::fs::File::create(&log).map_err(|e| Error::Start(e.to_string()))?;
    let mut cmd = Command::new(vmm);
    cmd.args(["template", "create", name])
        .arg(if replace { "--replace" } else { "--if-missing" })
        .arg("--config")
        .arg(&config)
        .args(["--warmup", WARMUP])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file));
    let cannot_run = |e: std::io::Error| Error::Start(format!("cannot run {}: {e}", vmm.display()));
    let build = |child: std::io::Result<Child>| {
        let mut child = child.map_err(cannot_run)?;
        let ended = exits_within(child.id(), BUILD_TIMEOUT);
        if !ended {
            let _ = child.kill();
        }
        let status = child.wait().map_err(|e| Error::Start(e.to_string()))?;
        Ok((ended, status))
    };
    let built = match spec.network {
        // Started from (and so tied to) the thread that made the
        // namespace, which waits for it.
        Some(_) => network::in_new_namespace(|| {
            tie(&mut cmd);
            build(cmd.spawn())
        }),
        None => build(spawn_tied(cmd)),
    };
    let _ = std::fs::remove_dir(&empty);
    let (ended, status) = built?;
    match (ended, status.success()) {
        (true, true) => Ok(()),
        (false, _) => Err(Error::Start(format!(
            "building the template {name} took over {BUILD_TIMEOUT:?}"
        ))),
        (true, false) => Err(Error::Start(format!(
            "building the template {name} failed: {}",
            last_line(&log)
        ))),
    }
}

/// Whether process `pid` (our unreaped child) ends within `limit`.
fn exits_within(pid: u32, limit: Duration) -> bool {
    vmm_os::process::exit_fd(pid).map_or(true, |fd| vmm_os::process::ended_within(&fd, limit))
}

/// The last line of the VMM's log: why it did not start.
fn last_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("the VMM exited without a message")
        .to_string()
}

/// Has `cmd`'s process get SIGKILL when the thread that starts it ends
/// (PR_SET_PDEATHSIG), or at once if the shim is already gone.
fn tie(cmd: &mut Command) {
    let shim = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe calls (prctl, getppid).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            vmm_os::process::die_with_parent(libc::SIGKILL)?;
            if libc::getppid() as u32 != shim {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            Ok(())
        });
    }
}

/// Starts `cmd` so that it gets SIGKILL when the shim ends, however it
/// ends (containerd may SIGKILL a shim). PR_SET_PDEATHSIG follows the
/// thread that started the process, so every child is started from one
/// thread that lives as long as the shim, not from a request's thread.
fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::SyncSender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    tie(&mut cmd);
    let jobs = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let _ = std::thread::Builder::new()
            .name("vmm-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::sync_channel(1);
    let gone = || std::io::Error::other("the shim's spawner thread has ended");
    jobs.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}
