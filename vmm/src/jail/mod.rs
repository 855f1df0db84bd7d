//! The jail a VMM process runs in (docs/security.md, "The jail"): new
//! user, mount, PID, IPC and UTS namespaces (and network when the VM has
//! none), a private root with only what the VM uses, no capabilities,
//! no_new_privs, resource limits, Landlock, and the cgroup limits the
//! config asks for.
//!
//! [`probe`] finds out what this host allows (`vmm doctor` reports it);
//! [`Plan::for_vm`] lists what a VM needs to see; [`enter`] builds the
//! jail and returns in the jailed VMM process ([`process`] has the three
//! processes a jail is made of).

// Plain data and cgroupfs writes; only Linux's jail joins one.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
mod cgroup;
#[cfg(target_os = "linux")]
mod folder;
#[cfg(target_os = "linux")]
mod limits;
pub mod probe;
#[cfg(target_os = "linux")]
mod process;
#[cfg(target_os = "linux")]
mod root;

use std::path::{Path, PathBuf};

use crate::config::{NetworkConfig, SerialOutput, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot jail the VMM: {0}")]
    Namespaces(#[from] probe::NoNamespaces),
    #[error("cannot jail the VMM: {path} is missing ({source}); the jail shows the VM only files that exist")]
    Missing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot jail the VMM: cannot {what}: {source}")]
    Setup {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot jail the VMM: {0}")]
    Cgroup(String),
    #[error("cannot jail the VMM: Landlock refused the rules: {0}")]
    Landlock(String),
    #[error("cannot jail the VMM: {0}")]
    Runtime(#[from] crate::runtime::Error),
}

/// Confines the calling process without namespaces (a vhost-user daemon,
/// `vmm device`): no capabilities, no_new_privs, and Landlock rules that
/// let it reach only `ro` (read) and `rw`. Says whether the kernel
/// enforces Landlock fully.
#[cfg(target_os = "linux")]
pub fn confine(ro: Vec<&Path>, rw: Vec<&Path>) -> Result<bool, Error> {
    limits::drop_privileges()?;
    let status = limits::restrict_paths(ro, rw)?;
    Ok(status == landlock::RulesetStatus::FullyEnforced)
}

/// A host path the jailed VMM sees, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exposed {
    ReadOnly(PathBuf),
    ReadWrite(PathBuf),
    /// A device node (read and write).
    Device(PathBuf),
}

impl Exposed {
    pub fn path(&self) -> &Path {
        match self {
            Exposed::ReadOnly(p) | Exposed::ReadWrite(p) | Exposed::Device(p) => p,
        }
    }
}

/// What a jail holds and allows.
#[derive(Debug, Clone)]
pub struct Plan {
    pub exposed: Vec<Exposed>,
    /// A network namespace of its own (a VM without a network).
    pub new_network: bool,
    pub max_file_size: u64,
    /// The launcher and the init run under the `jail` seccomp filter once
    /// the VMM runs (the config's `seccomp`).
    pub seccomp: bool,
    /// The cgroup limits (none: no cgroup of its own).
    pub cgroup: Option<cgroup::Limits>,
}

impl Plan {
    /// What the VM of `config` needs: `boot_files` (kernel, initramfs), the
    /// disk's `base` image and the executable (for fork children)
    /// read-only; the folders of its disk layer, console file, report and
    /// `sockets` writable; shares as configured; /dev/kvm, /dev/urandom,
    /// /dev/null and, with a TAP network, /dev/net/tun; on a PVM host, its
    /// KVM module's folder in /sys (the sign the VMM detects it by).
    pub fn for_vm(
        config: &VmConfig,
        boot_files: &[PathBuf],
        base: Option<&Path>,
        sockets: &[&Path],
        report: Option<&Path>,
    ) -> Result<Plan, Error> {
        if let Some(j) = &config.jail {
            // Again here: a restore's guest is the snapshot's, not the
            // operator's config's.
            j.validate(config.memory_mib, config.vcpus)
                .map_err(|e| Error::Cgroup(e.to_string()))?;
        }
        let mut exposed = Vec::new();
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        for f in boot_files.iter().map(PathBuf::as_path).chain(base) {
            // Once each: a second bind of one file fails on the first.
            let file = Exposed::ReadOnly(abs(f));
            if !exposed.contains(&file) {
                exposed.push(file);
            }
        }
        let exe = std::env::current_exe().map_err(|source| Error::Setup {
            what: "find the vmm executable".into(),
            source,
        })?;
        exposed.push(Exposed::ReadOnly(exe));
        // Files the VMM writes or creates: their folders (a file that does
        // not exist yet has no node to bind).
        let mut folders: Vec<PathBuf> = sockets.iter().map(|s| parent(&abs(s))).collect();
        if let Some(layer) = config.rootfs.as_ref().and_then(|r| r.layer.as_ref()) {
            folders.push(parent(&abs(layer)));
        }
        if let SerialOutput::File(p) = &config.serial {
            folders.push(parent(&abs(p)));
        }
        if let Some(r) = report {
            folders.push(parent(&abs(r)));
        }
        folders.sort();
        folders.dedup();
        exposed.extend(folders.into_iter().map(Exposed::ReadWrite));
        for share in &config.shares {
            let p = abs(&share.host_path);
            exposed.push(match share.read_only {
                true => Exposed::ReadOnly(p),
                false => Exposed::ReadWrite(p),
            });
        }
        for dev in ["/dev/kvm", "/dev/urandom", "/dev/null"] {
            exposed.push(Exposed::Device(PathBuf::from(dev)));
        }
        if let Some(NetworkConfig::Tap { .. }) = &config.network {
            exposed.push(Exposed::Device(PathBuf::from("/dev/net/tun")));
        }
        // How the VMM (and its fork children) tell a PVM host's KVM apart.
        #[cfg(target_os = "linux")]
        {
            let pvm = Path::new(hypervisor::kvm::PVM_MODULE_PATH);
            if pvm.exists() {
                exposed.push(Exposed::ReadOnly(pvm.to_path_buf()));
            }
        }
        let disk = base
            .and_then(|b| std::fs::metadata(b).ok())
            .map_or(0, |m| m.len());
        let memory = config.memory_mib << 20;
        Ok(Plan {
            exposed,
            new_network: config.network.is_none(),
            // A layer grows to the disk's size; a snapshot's memory file to
            // the guest's; with room for the rest.
            max_file_size: disk.max(memory) + (1 << 30),
            seccomp: config.seccomp,
            cgroup: config.jail.as_ref().and_then(cgroup::Limits::from_config),
        })
    }
}

/// Settles what the VMM would read from the host's /etc once jailed: the
/// user network's DNS servers default to the host's resolvers now.
pub fn prepare(config: &mut VmConfig) {
    if let Some(NetworkConfig::User {
        dns: dns @ None, ..
    }) = &mut config.network
    {
        let servers = devices::virtio::net::user::host_resolvers();
        *dns = Some(servers.iter().map(|s| s.to_string()).collect());
    }
}

fn parent(p: &Path) -> PathBuf {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// The read-write folders of this process's jail (unset: not jailed).
static WRITABLE: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();

/// Whether what this process writes at `path` is where the host sees it:
/// always unjailed; jailed, only inside a read-write folder of the jail
/// (elsewhere it would land in the jail's private `/tmp`, or nowhere).
pub fn host_sees(path: &Path) -> bool {
    WRITABLE
        .get()
        .is_none_or(|dirs| dirs.iter().any(|d| path.starts_with(d)))
}

/// [`host_sees`] as a sentence for the API's answer.
pub fn check_host_sees(path: &Path) -> Result<(), String> {
    if host_sees(path) {
        return Ok(());
    }
    let dirs: Vec<String> = WRITABLE
        .get()
        .into_iter()
        .flatten()
        .map(|d| d.display().to_string())
        .collect();
    Err(format!(
        "{} is outside this jailed VMM's view; use a path in one of its folders: {}",
        path.display(),
        dirs.join(", ")
    ))
}

/// Other hosts have no namespaces: no jail (the error says so).
#[cfg(not(target_os = "linux"))]
pub fn enter(_plan: &Plan) -> Result<(), Error> {
    Err(Error::Namespaces(probe::not_on_this_host()))
}

/// Jails this process as `plan` says. Returns in the jailed VMM only; the
/// launcher exits with the VMM's status. Call it before the process has
/// any thread.
#[cfg(target_os = "linux")]
pub fn enter(plan: &Plan) -> Result<(), Error> {
    let folder = folder::JailFolder::create()?;
    if let Some(limits) = &plan.cgroup {
        let name = folder.dir.file_name().unwrap_or_default().to_string_lossy();
        if let Err(e) = cgroup::join(limits, &name) {
            let _ = std::fs::remove_dir_all(&folder.dir);
            return Err(e);
        }
    }
    let mut plan = plan.clone();
    plan.exposed.push(Exposed::ReadWrite(folder.run.clone()));
    if let Err(e) = process::enter(&plan, &folder) {
        // Still the launcher, before any jail process.
        let _ = std::fs::remove_dir_all(&folder.dir);
        return Err(e);
    }
    crate::runtime::set_user_dir(folder.run.clone());
    let writable = plan.exposed.iter().filter_map(|e| match e {
        Exposed::ReadWrite(p) => Some(p.clone()),
        _ => None,
    });
    let _ = WRITABLE.set(writable.collect());
    // The VMM keeps the folder's lock (its descriptor) while it runs.
    std::mem::forget(folder);
    Ok(())
}
