//! What an OCI runtime spec (a bundle's `config.json`, an exec's process)
//! becomes here: the command the guest agent runs, the mounts it makes
//! inside the container's root, and the VM's size.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, Spec};

use crate::agent::Exec;

use super::{Error, Result};

/// Where the guest sees the pod's folder (a virtio-fs share; the shim's
/// templates are built with it): a container's root file system is
/// `<id>/rootfs` in it, the host files bound into it `<id>/mounts/<n>`.
pub const GUEST_SHARE: &str = "/containers";
/// The share's tag.
pub const SHARE_TAG: &str = "containers";

/// A container's root file system in the guest.
pub fn guest_root(id: &str) -> String {
    format!("{GUEST_SHARE}/{id}/rootfs")
}

/// Checks a container id can name a folder (containerd's ids can; a
/// client's mistake must not reach a path).
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && !id.starts_with('.');
    match ok {
        true => Ok(()),
        false => Err(Error::BadSpec(format!(
            "the container id {id:?} is not 1 to 128 of A-Z a-z 0-9 _ . - (not starting with .)"
        ))),
    }
}
/// Memory the guest itself uses on top of a container's limit: kernel,
/// agent, page cache for the root disk (docs/containerd.md).
pub const MEMORY_OVERHEAD_MIB: u32 = 128;
/// The VM size without limits in the spec.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// The most vCPUs a container's CPU limit gives.
const MAX_VCPUS: u32 = 16;

/// Reads and checks the bundle's spec.
pub fn load(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|e| Error::BadSpec(format!("{}: {e}", path.display())))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::BadSpec("it has no process".into()))?;
    check_process(process)?;
    Ok(spec)
}

/// Reads an exec's process (JSON, as containerd sends it).
pub fn exec_process(json: &[u8]) -> Result<Process> {
    let process: Process = serde_json::from_slice(json)
        .map_err(|e| Error::BadSpec(format!("the exec's process: {e}")))?;
    check_process(&process)?;
    Ok(process)
}

fn check_process(p: &Process) -> Result<()> {
    match p.args().as_deref() {
        Some([first, ..]) if !first.is_empty() => Ok(()),
        _ => Err(Error::BadSpec(
            "the process has no command (args is empty)".into(),
        )),
    }
}

/// The bundle's root file system folder on the host (`root.path`, relative
/// to the bundle unless absolute).
pub fn rootfs(bundle: &Path, spec: &Spec) -> PathBuf {
    let path = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    bundle.join(path)
}

/// The command the agent runs for `process`, chrooted to `root` (the
/// container's [`guest_root`]).
pub fn command(process: &Process, root: &str) -> Exec {
    let env = process
        .env()
        .iter()
        .flatten()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let user = process.user();
    Exec {
        argv: process.args().clone().unwrap_or_default(),
        env,
        cwd: Some(process.cwd().to_string_lossy().into_owned()).filter(|c| !c.is_empty()),
        user: Some(format!("{}:{}", user.uid(), user.gid())),
        timeout: None,
        root: Some(root.to_string()),
        mounts: Vec::new(),
        isolation: None,
    }
}

/// The spec's mounts as the agent makes them inside the root of container
/// `id`, and the host paths its bind mounts take: the `n`th (in
/// order) reaches the guest as `<share>/<id>/mounts/<n>`, where the shim
/// binds it on the host.
pub fn mounts(spec: &Spec, id: &str) -> Result<(Vec<vmm_agent::Mount>, Vec<PathBuf>)> {
    let (mut out, mut binds) = (Vec::new(), Vec::new());
    for m in spec.mounts().iter().flatten() {
        let destination = m.destination().to_string_lossy().into_owned();
        let options = m.options().clone().unwrap_or_default();
        let mut kind = m.typ().clone().unwrap_or_default();
        let mut source = m
            .source()
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_default();
        if kind == "bind" || options.iter().any(|o| o == "bind" || o == "rbind") {
            let host = PathBuf::from(&source);
            if !host.is_absolute() || !host.exists() {
                return Err(Error::BadSpec(format!(
                    "the bind mount on {destination}: its source {source:?} does not exist on the host"
                )));
            }
            source = format!("{GUEST_SHARE}/{id}/mounts/{}", binds.len());
            binds.push(host);
            // runc takes a bind of any type ("none" too).
            kind = "bind".into();
        } else if !vmm_agent::MOUNT_KINDS.contains(&kind.as_str()) {
            return Err(Error::BadSpec(format!(
                "the mount on {destination}: its type {kind:?} is not one of {}",
                vmm_agent::MOUNT_KINDS.join(", ")
            )));
        }
        out.push(vmm_agent::Mount {
            destination,
            kind,
            source,
            options,
        });
    }
    Ok((out, binds))
}

/// The network namespace the spec joins (`linux.namespaces`: a network
/// entry with a path, as the CRI plugin sets for a pod CNI set up, or
/// `ctr run --with-ns network:PATH`); `None` for a new or no namespace.
pub fn network_namespace(spec: &Spec) -> Option<PathBuf> {
    use oci_spec::runtime::LinuxNamespaceType;
    let namespaces = spec.linux().as_ref()?.namespaces().as_ref()?;
    namespaces
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
}

/// The guest cgroup of container `id`.
fn cgroup_name(id: &str) -> String {
    format!("container-{id}")
}

/// What isolates container `id`'s first process inside the guest: a new
/// namespace of each kind the spec asks for (one the spec names by path,
/// as the CRI plugin names its pod sandbox's, is the one of the guest
/// process `sandbox` when the container is in a pod, else the VM's; a
/// mount namespace is always new; the VM is the pod's network, see
/// docs/containerd.md), the spec's hostname
/// with a new uts namespace, and a cgroup of its own with the spec's
/// memory, CPU and pids limits.
pub fn isolation(spec: &Spec, id: &str, sandbox: Option<i32>) -> vmm_agent::Isolation {
    let process = spec.process().as_ref().expect("load checks the process");
    use oci_spec::runtime::LinuxNamespaceType as Kind;
    let linux = spec.linux().as_ref();
    let mut namespaces = Vec::new();
    for n in linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
    {
        let kind = match n.typ() {
            Kind::Pid => "pid",
            Kind::Ipc => "ipc",
            Kind::Uts => "uts",
            Kind::Mount => "mount",
            Kind::Cgroup => "cgroup",
            _ => continue,
        };
        let named = n.path().as_ref().is_some_and(|p| !p.as_os_str().is_empty());
        let join = match (named, sandbox) {
            (false, _) => None,
            // A mount namespace is a container's own (its root is in it).
            (true, _) if kind == "mount" => None,
            (true, Some(pid)) => Some(pid),
            (true, None) => continue,
        };
        namespaces.push(vmm_agent::Namespace {
            kind: kind.into(),
            join,
        });
    }
    let new_uts = namespaces
        .iter()
        .any(|n| n.kind == "uts" && n.join.is_none());
    let resources = linux.and_then(|l| l.resources().as_ref());
    vmm_agent::Isolation {
        namespaces,
        hostname: spec.hostname().clone().filter(|h| new_uts && !h.is_empty()),
        cgroup: Some(vmm_agent::Cgroup {
            name: cgroup_name(id),
            memory_max: memory_limit(spec),
            cpu_max: cpu_quota(spec),
            pids_max: resources
                .and_then(|r| r.pids().as_ref())
                .map(|p| p.limit())
                .filter(|l| *l > 0)
                .map(|l| l as u64),
        }),
        capabilities: capabilities(process),
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
    }
}

/// `process`'s capability sets, by name.
fn capabilities(process: &Process) -> Option<vmm_agent::Capabilities> {
    let c = process.capabilities().as_ref()?;
    let names = |set: &Option<oci_spec::runtime::Capabilities>| -> Vec<String> {
        let mut v: Vec<String> = set
            .iter()
            .flatten()
            .filter_map(|cap| serde_json::to_value(cap).ok()?.as_str().map(String::from))
            .collect();
        v.sort();
        v
    };
    Some(vmm_agent::Capabilities {
        bounding: names(c.bounding()),
        effective: names(c.effective()),
        permitted: names(c.permitted()),
        inheritable: names(c.inheritable()),
        ambient: names(c.ambient()),
    })
}

/// What an exec of `process` into container `id` runs in: every namespace
/// of its first process (guest pid `init`) and its cgroup, with the
/// process's own capabilities.
pub fn exec_isolation(
    first: &vmm_agent::Isolation,
    id: &str,
    init: i32,
    process: &Process,
) -> vmm_agent::Isolation {
    vmm_agent::Isolation {
        namespaces: first
            .namespaces
            .iter()
            .map(|n| vmm_agent::Namespace {
                kind: n.kind.clone(),
                join: Some(init),
            })
            .collect(),
        hostname: None,
        cgroup: Some(vmm_agent::Cgroup {
            name: cgroup_name(id),
            ..Default::default()
        }),
        capabilities: capabilities(process),
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
    }
}

/// The spec's CPU quota and period (microseconds), when it sets both.
fn cpu_quota(spec: &Spec) -> Option<(u64, u64)> {
    let resources = spec.linux().as_ref()?.resources().as_ref()?;
    let cpu = resources.cpu().as_ref()?;
    match (cpu.quota()?, cpu.period()?) {
        (quota, period) if quota > 0 && period > 0 => Some((quota as u64, period)),
        _ => None,
    }
}

/// The spec's memory limit in bytes, when it sets one.
fn memory_limit(spec: &Spec) -> Option<u64> {
    let resources = spec.linux().as_ref()?.resources().as_ref()?;
    let limit = resources.memory().as_ref()?.limit()?;
    (limit > 0).then_some(limit as u64)
}

/// The VM's vCPUs and memory for the spec's limits: vCPUs from the CPU
/// quota (rounded up), memory the limit plus [`MEMORY_OVERHEAD_MIB`];
/// `None` where the spec sets no limit.
pub fn size(spec: &Spec) -> (Option<u32>, Option<u32>) {
    let vcpus = cpu_quota(spec)
        .map(|(quota, period)| quota.div_ceil(period).clamp(1, MAX_VCPUS as u64) as u32);
    let memory = memory_limit(spec)
        .map(|l| (l.div_ceil(1 << 20)).min(u32::MAX as u64 / 2) as u32 + MEMORY_OVERHEAD_MIB);
    (vcpus, memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    const BASE: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"args":["sh","-c","echo hi"],"env":["PATH=/bin","A=b=c"],"cwd":"/work","user":{"uid":1000,"gid":100}},
        "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
                  {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]}],
        "linux":{"resources":{"cpu":{"quota":150000,"period":100000},"memory":{"limit":536870912}}}}"#;

    #[test]
    fn a_process_becomes_a_chrooted_command() {
        let s = spec(BASE);
        let cmd = command(s.process().as_ref().unwrap(), &guest_root("c1"));
        assert_eq!(cmd.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(cmd.env.get("A").map(String::as_str), Some("b=c"));
        assert_eq!(cmd.cwd.as_deref(), Some("/work"));
        assert_eq!(cmd.user.as_deref(), Some("1000:100"));
        assert_eq!(cmd.root.as_deref(), Some("/containers/c1/rootfs"));
        assert_eq!(rootfs(Path::new("/b"), &s), Path::new("/b/rootfs"));
    }

    #[test]
    fn limits_become_the_vm_size() {
        assert_eq!(
            size(&spec(BASE)),
            (Some(2), Some(512 + MEMORY_OVERHEAD_MIB))
        );
        let none = r#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}}"#;
        assert_eq!(size(&spec(none)), (None, None));
    }

    #[test]
    fn mounts_pass_through_and_host_binds_go_through_the_share() {
        let (m, binds) = mounts(&spec(BASE), "c1").unwrap();
        assert_eq!((m.len(), binds.len()), (2, 0));
        assert_eq!(
            (m[1].destination.as_str(), m[1].kind.as_str()),
            ("/dev", "tmpfs")
        );
        let bind = r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/etc/hosts","type":"bind","source":"/etc/hosts","options":["rbind","ro"]}]}"#;
        let (m, binds) = mounts(&spec(bind), "c1").unwrap();
        assert_eq!(binds, [PathBuf::from("/etc/hosts")]);
        assert_eq!(m[0].source, "/containers/c1/mounts/0");
        let missing = r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/x","type":"bind","source":"/nonexistent-source"}]}"#;
        let err = mounts(&spec(missing), "c1").unwrap_err().to_string();
        assert!(err.contains("/nonexistent-source"), "{err}");
        // A bind is one whatever its type says (runc's "none" too).
        let none = r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/h","type":"none","source":"/etc/hosts","options":["rbind"]}]}"#;
        assert_eq!(mounts(&spec(none), "c1").unwrap().0[0].kind, "bind");
        // The guest mounts them when the container starts: a type it
        // cannot mount is refused when it is created.
        let nfs = r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/n","type":"nfs","source":"h:/x"}]}"#;
        let err = mounts(&spec(nfs), "c1").unwrap_err().to_string();
        assert!(
            err.contains(r#"/n: its type "nfs" is not one of proc"#),
            "{err}"
        );
    }

    #[test]
    fn a_pods_network_namespace_is_the_one_with_a_path() {
        let with = |namespaces: &str| {
            spec(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[{namespaces}]}}}}"#
            ))
        };
        let cni = with(r#"{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"}"#);
        assert_eq!(
            network_namespace(&cni),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        assert_eq!(network_namespace(&with(r#"{"type":"network"}"#)), None);
        assert_eq!(network_namespace(&with(r#"{"type":"pid"}"#)), None);
        assert_eq!(network_namespace(&spec(BASE)), None);
    }

    #[test]
    fn namespaces_and_limits_become_the_guest_isolation() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","hostname":"web",
            "process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},"noNewPrivileges":true,
                "capabilities":{"bounding":["CAP_KILL","CAP_CHOWN"],"effective":["CAP_KILL"]}},
            "linux":{"namespaces":[{"type":"pid"},{"type":"ipc","path":"/proc/42/ns/ipc"},{"type":"uts"},
                {"type":"mount"},{"type":"network","path":"/var/run/netns/cni-1"},{"type":"user"}],
            "resources":{"cpu":{"quota":50000,"period":100000},"memory":{"limit":67108864},"pids":{"limit":64}}}}"#,
        );
        let kinds = |i: &vmm_agent::Isolation| -> Vec<(String, Option<i32>)> {
            i.namespaces
                .iter()
                .map(|n| (n.kind.clone(), n.join))
                .collect()
        };
        let alone = isolation(&s, "c1", None);
        let new = |k: &str| (k.to_string(), None);
        // Without a pod, a namespace named by path is the VM's.
        assert_eq!(kinds(&alone), [new("pid"), new("uts"), new("mount")]);
        assert_eq!(alone.hostname.as_deref(), Some("web"));
        let cgroup = alone.cgroup.clone().unwrap();
        assert_eq!(cgroup.name, "container-c1");
        assert_eq!(cgroup.memory_max, Some(64 << 20));
        assert_eq!(cgroup.cpu_max, Some((50000, 100000)));
        assert_eq!(cgroup.pids_max, Some(64));
        let caps = alone.capabilities.clone().unwrap();
        assert_eq!(caps.bounding, ["CAP_CHOWN", "CAP_KILL"]);
        assert_eq!((caps.effective.len(), caps.ambient.len()), (1, 0));
        assert!(alone.no_new_privileges);
        // In a pod: the sandbox's (guest pid 7).
        let in_pod = isolation(&s, "c1", Some(7));
        assert_eq!(in_pod.namespaces[1].join, Some(7));
        let exec = exec_isolation(&in_pod, "c1", 9, s.process().as_ref().unwrap());
        assert!(exec.namespaces.iter().all(|n| n.join == Some(9)));
        assert_eq!(exec.namespaces.len(), 4);
        assert_eq!(
            exec.cgroup.unwrap(),
            vmm_agent::Cgroup {
                name: "container-c1".into(),
                ..Default::default()
            }
        );
        assert_eq!(exec.capabilities, alone.capabilities);
        // A hostname needs a new uts namespace.
        let joined_uts = spec(
            r#"{"ociVersion":"1.0.2","hostname":"x","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},
            "linux":{"namespaces":[{"type":"uts","path":"/p"}]}}"#,
        );
        assert_eq!(isolation(&joined_uts, "c", Some(3)).hostname, None);
    }

    #[test]
    fn ids_that_cannot_name_a_folder_are_refused() {
        assert!(check_id("c1.web_2-x").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_process_without_a_command_is_refused() {
        let err = exec_process(br#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#).unwrap_err();
        assert!(err.to_string().contains("no command"), "{err}");
        assert!(exec_process(b"{").is_err());
        assert!(exec_process(br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0}}"#).is_ok());
    }
}
