//! A pod: one VM and its folder on the host. The folder (`<runtime
//! folder>/pod`, a shared mount so that what is mounted in it later also
//! reaches the jailed VMM) is the VM's virtio-fs share, seen at
//! `/containers` in the guest: each container's root file system is bound
//! at `<id>/rootfs` in it, the host files its spec binds at
//! `<id>/mounts/<n>`. Without Kubernetes (`ctr run`) every container is a
//! pod of its own. A pod whose network namespace has CNI's interface has
//! its VM on it (`network`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use super::network::{self, PodNetwork};
use super::options::Settings;
use super::process::Process;
use super::vm::{Vm, VmSpec};
use super::{Error, Result};

pub struct Pod {
    pub id: String,
    pub vm: Vm,
    /// The runtime folder (the VM's sockets, config and log; the share).
    dir: PathBuf,
    share: PathBuf,
    /// CNI's interface the VM is joined to.
    network: Option<PodNetwork>,
    /// The first process of the pod's own container (its sandbox): the
    /// namespaces the pod's containers share are its.
    pub sandbox: OnceLock<Arc<Process>>,
}

impl Pod {
    /// Makes the pod's folders and starts its VM, on the interface of the
    /// network namespace `netns` when it has one, else on the settings'
    /// network.
    pub fn start(
        namespace: &str,
        id: &str,
        size: (u32, u32),
        settings: &Settings,
        netns: Option<&Path>,
    ) -> Result<Pod> {
        let dir = runtime_dir(namespace, id)?;
        // A folder of a shim that was killed: nothing of it runs any more.
        remove(&dir);
        let share = dir.join("pod");
        make_dir(&dir, 0o700)?;
        make_dir(&share, 0o755)?;
        let shared = bind(&share, &share).and_then(|()| {
            vmm_agent::mount::mount("", &share, "", libc::MS_SHARED, "")
                .map_err(|e| Error::Io(format!("cannot share {}: {e}", share.display())))
        });
        let network = shared.and_then(|()| netns.map(PodNetwork::connect).transpose());
        let network = match network {
            Ok(n) => n.flatten(),
            Err(e) => {
                remove(&dir);
                return Err(e);
            }
        };
        let mut settings = settings.clone();
        if let Some(n) = &network {
            log::info!(
                "{id}: the VM takes {} ({}) of {}",
                n.interface,
                n.address,
                n.netns.display()
            );
            settings.network = Some(n.config());
        }
        let vm = Vm::start(&VmSpec {
            share: &share,
            vcpus: size.0,
            memory_mib: size.1,
            settings: &settings,
            dir: &dir,
            network: network.as_ref(),
        });
        match vm {
            Ok(vm) => Ok(Pod {
                id: id.to_string(),
                vm,
                dir,
                share,
                network,
                sandbox: OnceLock::new(),
            }),
            Err(e) => {
                if let Some(n) = &network {
                    network::reset(&n.netns);
                }
                remove(&dir);
                Err(e)
            }
        }
    }

    /// Binds container `id`'s root file system and the host files its spec
    /// binds (`binds`, in order) into the pod's folder.
    pub fn add(&self, id: &str, rootfs: &Path, binds: &[PathBuf]) -> Result<()> {
        let folder = self.share.join(id);
        let added = (|| {
            make_dir(&folder.join("rootfs"), 0o755)?;
            bind(rootfs, &folder.join("rootfs"))?;
            for (n, source) in binds.iter().enumerate() {
                let target = folder.join("mounts").join(n.to_string());
                make_dir(&folder.join("mounts"), 0o755)?;
                match source.is_dir() {
                    true => make_dir(&target, 0o755)?,
                    false => {
                        std::fs::File::create(&target).map_err(|e| {
                            Error::Io(format!("cannot make {}: {e}", target.display()))
                        })?;
                    }
                }
                bind(source, &target)?;
            }
            Ok(())
        })();
        if added.is_err() {
            self.remove(id);
        }
        added
    }

    /// Unbinds container `id`'s files from the pod's folder.
    pub fn remove(&self, id: &str) {
        remove(&self.share.join(id));
    }

    /// Stops the VM, gives the network namespace back as CNI made it and
    /// removes the pod's folders.
    pub fn stop(&self) {
        self.vm.stop();
        if let Some(n) = &self.network {
            network::reset(&n.netns);
        }
        remove(&self.dir);
    }
}

/// The runtime folder of pod `id`: its name hashed, so socket paths stay
/// short whatever the id.
pub fn runtime_dir(namespace: &str, id: &str) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(format!("{namespace}/{id}").as_bytes());
    let name: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let base = crate::runtime::user_dir().map_err(|e| Error::Start(e.to_string()))?;
    Ok(base.join(format!("shim-{name}")))
}

/// Unmounts everything under `path` and removes it.
pub fn remove(path: &Path) {
    if !path.exists() {
        return;
    }
    remove_mount(path);
    let _ = std::fs::remove_dir_all(path);
}

/// Unmounts what is mounted at or under `path` (the folder stays).
pub fn remove_mount(path: &Path) {
    if let Err(e) = vmm_agent::mount::unmount_under(path) {
        log::warn!("{e}");
    }
}

fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| Error::Io(format!("cannot make {}: {e}", dir.display())))
}

/// Binds `source` (and what is mounted under it) on `target`.
fn bind(source: &Path, target: &Path) -> Result<()> {
    vmm_agent::mount::mount(source, target, "", libc::MS_BIND | libc::MS_REC, "").map_err(|e| {
        Error::Io(format!(
            "cannot bind {} on {}: {e}",
            source.display(),
            target.display()
        ))
    })
}
