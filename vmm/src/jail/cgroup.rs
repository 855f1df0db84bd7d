//! The jail's cgroup v2: `memory.max`, `pids.max` and `cpu.max` from the
//! config, over the launcher, the jail's init, the VMM and its fork
//! children.
//!
//! It is made inside the cgroup the launcher runs in, which must be
//! delegated to this user ([`super::probe::cgroup_delegation`]): the
//! launcher makes `<delegated>/vmm-<jail>`, moves itself into it (its
//! children follow), hands the controllers down from the delegated cgroup
//! (cgroup v2 allows that only once that cgroup holds no process, which is
//! why the launcher moves first) and writes the limits. A cgroup outlives
//! the process it holds until someone removes it: each new jail removes
//! the empty `vmm-*` cgroups of jails that ended, and a systemd scope
//! takes its own with it.

use std::io;
use std::path::{Path, PathBuf};

use super::{probe, Error};
use crate::config::JailConfig;

/// cpu.max's period, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// What the jail's cgroup limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
    /// Microseconds of CPU time per [`CPU_PERIOD_US`].
    pub cpu_quota_us: Option<u64>,
}

impl Limits {
    /// The limits `jail` asks for; None when it asks for none (the jail
    /// then makes no cgroup).
    pub fn from_config(jail: &JailConfig) -> Option<Limits> {
        jail.has_limits().then(|| Limits {
            memory_max: jail.memory_max_mib.map(|m| m << 20),
            pids_max: jail.pids_max,
            cpu_quota_us: jail.cpu_max_percent.map(|p| p * CPU_PERIOD_US / 100),
        })
    }

    /// The controllers and the files (with their text) that set the limits.
    fn files(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut files = Vec::new();
        if let Some(m) = self.memory_max {
            files.push(("memory", "memory.max", m.to_string()));
        }
        if let Some(p) = self.pids_max {
            files.push(("pids", "pids.max", p.to_string()));
        }
        if let Some(q) = self.cpu_quota_us {
            files.push(("cpu", "cpu.max", format!("{q} {CPU_PERIOD_US}")));
        }
        files
    }

    fn controllers(&self) -> Vec<&'static str> {
        self.files().into_iter().map(|(c, _, _)| c).collect()
    }
}

fn refused(why: String) -> Error {
    Error::Cgroup(why)
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Setup { what, source }
}

/// Moves this process (one thread: call it before the jail forks) into a
/// new cgroup named `vmm-<name>` with `limits`, in the cgroup delegated to
/// it. Returns the new cgroup's path.
pub fn join(limits: &Limits, name: &str) -> Result<PathBuf, Error> {
    let delegated = probe::cgroup_delegation(&limits.controllers()).map_err(|why| {
        refused(format!(
            "its cgroup limits need a delegated cgroup v2, and {why}"
        ))
    })?;
    join_at(&delegated, limits, name)
}

/// [`join`] in `delegated` (a parameter for tests, which use a folder).
fn join_at(delegated: &Path, limits: &Limits, name: &str) -> Result<PathBuf, Error> {
    sweep(delegated);
    let dir = delegated.join(format!("vmm-{name}"));
    std::fs::create_dir(&dir).map_err(io_err(format!("make the cgroup {}", dir.display())))?;
    let joined = write(&dir.join("cgroup.procs"), "0")
        .and_then(|()| enable_controllers(delegated, &limits.controllers()))
        .and_then(|()| {
            limits
                .files()
                .into_iter()
                .try_for_each(|(_, file, text)| write(&dir.join(file), &text))
        });
    if let Err(e) = joined {
        // Back where it was (possible while the delegated cgroup hands no
        // controller down; otherwise the empty cgroup is swept later).
        let _ = write(&delegated.join("cgroup.procs"), "0");
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(dir)
}

/// Hands `controllers` down from `parent` to its children, unless it does
/// already.
fn enable_controllers(parent: &Path, controllers: &[&str]) -> Result<(), Error> {
    let file = parent.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&file).unwrap_or_default();
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::write(&file, missing.join(" ")).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => refused(format!(
            "the cgroup {} holds other processes, so it cannot hand its controllers to the jail's cgroup; start vmm in a cgroup of its own, for example with `systemd-run --user --scope -p Delegate=yes vmm ...`",
            parent.display()
        )),
        _ => Error::Setup {
            what: format!("enable the {} controller(s) in {}", controllers.join(", "), file.display()),
            source: e,
        },
    })
}

fn write(file: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(file, text).map_err(io_err(format!("write {text:?} to {}", file.display())))
}

/// Removes the cgroups of jails that ended (`rmdir` of a cgroup that still
/// holds a process fails, so a live jail's stays).
fn sweep(delegated: &Path) {
    let Ok(entries) = std::fs::read_dir(delegated) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("vmm-jail-") {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail(memory: Option<u64>, pids: Option<u64>, cpu: Option<u64>) -> JailConfig {
        JailConfig {
            memory_max_mib: memory,
            pids_max: pids,
            cpu_max_percent: cpu,
        }
    }

    #[test]
    fn limits_come_from_the_config_in_the_kernel_units() {
        assert_eq!(Limits::from_config(&JailConfig::default()), None);
        let l = Limits::from_config(&jail(Some(256), Some(64), Some(150))).unwrap();
        assert_eq!(
            l.files(),
            vec![
                ("memory", "memory.max", "268435456".to_string()),
                ("pids", "pids.max", "64".to_string()),
                ("cpu", "cpu.max", "150000 100000".to_string()),
            ]
        );
        let only_cpu = Limits::from_config(&jail(None, None, Some(1))).unwrap();
        assert_eq!(only_cpu.controllers(), vec!["cpu"]);
        assert_eq!(only_cpu.files()[0].2, "1000 100000");
    }

    /// A folder that stands for a delegated cgroup: the files are plain
    /// files, so this checks what is written where, not the kernel.
    #[test]
    fn join_writes_the_move_the_controllers_and_the_limits() {
        let root = std::env::temp_dir().join(format!("vmm-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("vmm-jail-ended")).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "pids\n").unwrap();
        let limits = Limits::from_config(&jail(Some(300), Some(40), Some(50))).unwrap();
        let dir = join_at(&root, &limits, "jail-abc").unwrap();
        assert_eq!(dir, root.join("vmm-jail-abc"));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("cgroup.procs"), "0");
        assert_eq!(read("memory.max"), (300u64 << 20).to_string());
        assert_eq!(read("pids.max"), "40");
        assert_eq!(read("cpu.max"), "50000 100000");
        // Only the controllers not handed down yet are asked for.
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu"
        );
        // The ended jail's (empty) cgroup is gone; nothing else is touched.
        assert!(!root.join("vmm-jail-ended").exists());
        assert!(root.join("other").exists());
        // A name already taken is an error, and leaves the first in place.
        assert!(join_at(&root, &limits, "jail-abc").is_err());
        assert!(dir.join("memory.max").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
