//! One container: where it runs (its pod's VM), its root file system and
//! its processes; what creating it makes on the host and in the guest,
//! and undoing that.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use containerd_shim::api;

use super::options::Settings;
use super::pod::Pod;
use super::process::{Process, Stdio};
use super::{spec, Error, Result};

/// The annotations containerd's CRI plugin puts on a pod's containers.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// In the bundle: what `delete` needs after the shim was killed.
const STATE_FILE: &str = "vmm-shim.json";

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub pod: Arc<Pod>,
    rootfs: PathBuf,
    /// The shim mounted `rootfs` (containerd's snapshot) and unmounts it.
    mounted: bool,
    pub init: Arc<Process>,
    /// What isolates the first process in the guest (an exec joins it).
    isolation: vmm_agent::Isolation,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    pub paused: AtomicBool,
}

/// The pods of one shim, by id.
pub type Pods = Mutex<HashMap<String, Arc<Pod>>>;

impl Container {
    /// Creates the container of `req`: in a new VM when it is a pod of its
    /// own (a pod's sandbox, or any container without Kubernetes), in its
    /// pod's VM otherwise.
    pub fn create(req: &api::CreateTaskRequest, namespace: &str, pods: &Pods) -> Result<Container> {
        if !req.checkpoint.is_empty() {
            return Err(Error::Unsupported("restoring a checkpoint".into()));
        }
        spec::check_id(&req.id)?;
        let settings = Settings::from_options(req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = spec::load(&bundle)?;
        let (mounts, binds) = spec::mounts(&spec, &req.id)?;
        let pod_id = pod_named(&spec).unwrap_or_else(|| req.id.clone());
        let joining = pod_id != req.id;
        let rootfs = spec::rootfs(&bundle, &spec);
        let mounted = mount_rootfs(&req.rootfs, &rootfs)?;
        let unmount_rootfs = |e: Error| {
            if mounted {
                super::pod::remove_mount(&rootfs);
            }
            e
        };
        if !rootfs.is_dir() {
            return Err(unmount_rootfs(Error::Rootfs(format!(
                "{} is not a folder",
                rootfs.display()
            ))));
        }
        let netns = spec::network_namespace(&spec).filter(|_| !joining);
        let state = serde_json::json!({ "rootfs": rootfs, "mounted": mounted, "pod": pod_id, "netns": netns });
        let _ = std::fs::write(bundle.join(STATE_FILE), state.to_string());
        let pod = match joining {
            true => pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&pod_id)
                .cloned()
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "the pod {pod_id:?} of container {:?} is not in this shim",
                        req.id
                    ))
                })
                .map_err(unmount_rootfs)?,
            false => {
                let size = vm_size(&spec, &settings);
                let started = std::time::Instant::now();
                let netns = spec::network_namespace(&spec);
                let pod = Pod::start(namespace, &pod_id, size, &settings, netns.as_deref())
                    .map_err(unmount_rootfs)?;
                log::info!(
                    "{pod_id}: VM {} up in {} ms",
                    pod.vm.pid(),
                    started.elapsed().as_millis()
                );
                Arc::new(pod)
            }
        };
        let end_pod = |e: Error| {
            if !joining {
                pod.stop();
            }
            unmount_rootfs(e)
        };
        pod.add(&req.id, &rootfs, &binds).map_err(end_pod)?;
        let root = spec::guest_root(&req.id);
        let process = spec
            .process()
            .as_ref()
            .expect("spec::load checks the process");
        // The guest mounts them with the first process's start: one round
        // trip to the guest fewer (a failure then fails the start).
        let mut command = spec::command(process, &root);
        command.mounts = mounts;
        let sandbox = pod.sandbox.get().map(|p| p.guest_pid()).filter(|p| *p > 0);
        let isolation = spec::isolation(&spec, &req.id, sandbox.filter(|_| joining));
        command.isolation = Some(isolation.clone());
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new(command, stdio).map_err(end_pod)?;
        if !joining {
            let _ = pod.sandbox.set(init.clone());
            pods.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(pod_id, pod.clone());
        }
        Ok(Container {
            id: req.id.clone(),
            bundle,
            pod,
            rootfs,
            mounted,
            init,
            isolation,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
        })
    }

    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no process {exec_id:?} in this container")))
    }

    /// The command of an exec of `process` into the container: in its
    /// first process's namespaces and cgroup.
    pub fn exec_command(&self, process: &oci_spec::runtime::Process) -> crate::agent::Exec {
        let mut command = spec::command(process, &spec::guest_root(&self.id));
        let init = self.init.guest_pid();
        let isolation = spec::exec_isolation(&self.isolation, &self.id, init, process);
        command.isolation = Some(isolation);
        command
    }

    /// The figures of the container's cgroup in the guest.
    pub fn cgroup_stats(&self) -> Result<vmm_agent::CgroupStats> {
        let name = self.isolation.cgroup.as_ref().map(|c| c.name.as_str());
        let name = name.ok_or_else(|| Error::Unsupported("a container without a cgroup".into()))?;
        Ok(self.pod.vm.agent().cgroup_stats(name)?)
    }

    /// Whether the container is its pod's own (its end ends the VM).
    pub fn owns_pod(&self) -> bool {
        self.pod.id == self.id
    }

    /// Undoes what creating the container made: its mounts in the guest
    /// and the pod's folder (or the whole VM when it owns the pod), its
    /// root file system's mount on the host, the state file.
    pub fn tear_down(&self, pods: &Pods) {
        match self.owns_pod() {
            true => {
                pods.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&self.id);
                let t = std::time::Instant::now();
                self.pod.stop();
                log::info!("{}: VM stopped in {} ms", self.id, t.elapsed().as_millis());
            }
            false => {
                if let Err(e) = self.pod.vm.agent().unmount(&spec::guest_root(&self.id)) {
                    log::warn!("{}: cannot unmount its files in the guest: {e}", self.id);
                }
                self.pod.remove(&self.id);
            }
        }
        if self.mounted {
            super::pod::remove_mount(&self.rootfs);
        }
        let _ = std::fs::remove_file(self.bundle.join(STATE_FILE));
    }
}

/// The pod a container of a pod names (CRI's annotations), when it is not
/// the pod's sandbox itself.
fn pod_named(spec: &oci_spec::runtime::Spec) -> Option<String> {
    let annotations = spec.annotations().as_ref()?;
    match annotations.get(CONTAINER_TYPE).map(String::as_str) {
        Some("container") => annotations.get(SANDBOX_ID).cloned(),
        _ => None,
    }
}

/// The pod of the container whose bundle is `bundle`, if it joins one.
pub fn pod_of(bundle: &Path) -> Option<String> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok()?;
    pod_named(&spec)
}

/// The VM's vCPUs and memory: the spec's limits, else the settings'.
fn vm_size(spec: &oci_spec::runtime::Spec, settings: &Settings) -> (u32, u32) {
    let (vcpus, memory) = spec::size(spec);
    (
        vcpus.unwrap_or(settings.vcpus),
        memory.unwrap_or(settings.memory_mib),
    )
}

/// Cleans up after a shim that ended without deleting container `id`
/// (containerd runs the shim's `delete` in the bundle): the VMM died with
/// its shim (PR_SET_PDEATHSIG), so its pod's folders go, and the root file
/// system's mount.
pub fn clean_up(namespace: &str, id: &str, bundle: &Path) {
    let state: serde_json::Value = std::fs::read(bundle.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let pod = state["pod"].as_str().unwrap_or(id);
    if let Ok(dir) = super::pod::runtime_dir(namespace, pod) {
        super::pod::remove(&dir);
    }
    if let Some(netns) = state["netns"].as_str() {
        super::network::reset(Path::new(netns));
    }
    if state["mounted"].as_bool().unwrap_or(false) {
        let rootfs = state["rootfs"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_else(|| bundle.join("rootfs"));
        super::pod::remove_mount(&rootfs);
    }
    let _ = std::fs::remove_file(bundle.join(STATE_FILE));
}

/// Mounts containerd's snapshot on the bundle's rootfs folder; `false`
/// when containerd sent none (the bundle holds the files itself).
fn mount_rootfs(
    mounts: &[containerd_shim::protos::types::mount::Mount],
    target: &Path,
) -> Result<bool> {
    let m = match mounts {
        [] => return Ok(false),
        [m] => m,
        _ => {
            return Err(Error::Unsupported(
                "a root file system of more than one mount".into(),
            ))
        }
    };
    let fail = |why: String| {
        Error::Rootfs(format!(
            "{} {} on {}: {why}",
            m.type_,
            m.source,
            target.display()
        ))
    };
    let options = vmm_agent::mount::Options::parse(&m.options);
    // mount(2) takes one page of data: an image of very many layers
    // would need containerd's lowerdir shortening, not done here.
    if options.data.len() >= 4096 {
        return Err(fail(
            "its options are longer than a page (too many layers)".into(),
        ));
    }
    vmm_agent::mount::mount(&m.source, target, &m.type_, options.flags, &options.data)
        .map_err(|e| fail(e.to_string()))?;
    Ok(true)
}
