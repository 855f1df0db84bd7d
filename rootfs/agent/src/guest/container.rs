//! A container's mounts (`Request::Mount`): the file systems an OCI
//! runtime spec asks for, mounted inside the container's root before its
//! processes run there (chrooted; `command::Settings::root`).

use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use vmm_agent::Mount;

/// The mount types a spec may use here.
const KINDS: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "bind",
];

/// The device nodes a container's /dev gets (as runc makes them): name,
/// major, minor.
const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Mounts `mounts` inside `root`, in order; stops at the first that fails
/// and says which.
pub fn mount_all(root: &str, mounts: &[Mount]) -> Result<(), String> {
    let root = match Path::new(root).canonicalize() {
        Ok(r) if r.is_dir() => r,
        _ => return Err(format!("the container root {root} is not a folder")),
    };
    for m in mounts {
        mount_one(&root, m)
            .map_err(|e| format!("cannot mount {} on {}: {e}", m.kind, m.destination))?;
    }
    Ok(())
}

/// Unmounts everything at or under `root`.
pub fn unmount_all(root: &str) -> Result<(), String> {
    vmm_agent::mount::unmount_under(Path::new(root)).map_err(|e| e.to_string())
}

fn mount_one(root: &Path, m: &Mount) -> Result<(), String> {
    if !KINDS.contains(&m.kind.as_str()) {
        return Err(format!("the type is not one of {}", KINDS.join(", ")));
    }
    let target = target(root, &m.destination)?;
    let vmm_agent::mount::Options {
        flags,
        propagation,
        data,
    } = vmm_agent::mount::Options::parse(&m.options);
    let bind = m.kind == "bind" || flags & libc::MS_BIND != 0;
    let source = match bind {
        true => {
            let s = Path::new(&m.source);
            if !s.is_absolute() || !s.exists() {
                return Err(format!(
                    "the bind source {:?} does not exist in the guest",
                    m.source
                ));
            }
            make_target(&target, !s.is_dir())?;
            m.source.clone()
        }
        false => {
            make_target(&target, false)?;
            if m.source.is_empty() {
                m.kind.clone()
            } else {
                m.source.clone()
            }
        }
    };
    let target_s = target.to_str().ok_or("the destination is not UTF-8")?;
    let kind = match (bind, m.kind.as_str()) {
        (true, _) => "",
        // A cgroup v1 request gets the unified hierarchy: the guest runs v2.
        (false, "cgroup") => "cgroup2",
        (false, k) => k,
    };
    let first = flags & !(libc::MS_RDONLY * bind as libc::c_ulong);
    vmm_agent::mount::mount(&source, target_s, kind, first, &data).map_err(|e| e.to_string())?;
    // A bind mount takes its read-only flag (and the others) on a remount.
    if bind && flags & libc::MS_RDONLY != 0 {
        let again = flags | libc::MS_REMOUNT | libc::MS_BIND;
        vmm_agent::mount::mount("", target_s, "", again, "").map_err(|e| e.to_string())?;
    }
    if propagation != 0 {
        vmm_agent::mount::mount("", target_s, "", propagation, "").map_err(|e| e.to_string())?;
    }
    if m.kind == "tmpfs" && m.destination.trim_end_matches('/') == "/dev" {
        populate_dev(&target).map_err(|e| format!("cannot make the device nodes: {e}"))?;
    }
    Ok(())
}

/// `destination` inside `root`: absolute, without `..`, and not leading
/// out of `root` through a symbolic link of the container's.
fn target(root: &Path, destination: &str) -> Result<PathBuf, String> {
    let d = Path::new(destination);
    if !d.is_absolute() || d.components().any(|c| c == Component::ParentDir) {
        return Err("the destination must be an absolute path without ..".into());
    }
    let mut path = root.to_path_buf();
    for c in d.components().skip(1) {
        path.push(c);
        if let Ok(real) = path.canonicalize() {
            if !real.starts_with(root) {
                return Err(format!(
                    "{} leads out of the container's root",
                    path.display()
                ));
            }
            path = real;
        }
    }
    Ok(path)
}

/// Makes the mount point: a folder, or an empty file for a file's bind.
fn make_target(target: &Path, file: bool) -> Result<(), String> {
    let made = match file {
        false => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(target),
        true => {
            if let Some(parent) = target.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(|e| e.to_string())?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(target)
                .map(drop)
        }
    };
    made.map_err(|e| format!("cannot make the mount point: {e}"))
}

/// The standard device nodes and links of a container's /dev.
fn populate_dev(dev: &Path) -> std::io::Result<()> {
    for (name, major, minor) in DEVICES {
        let path = std::ffi::CString::new(dev.join(name).as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: mknod(2) on a NUL-terminated path with a character
        // device's mode and number.
        let rc = unsafe {
            libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(*major, *minor),
            )
        };
        if rc != 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::AlreadyExists {
            return Err(std::io::Error::last_os_error());
        }
        // mknod(2) takes the umask off the mode: every user may use these.
        std::fs::set_permissions(dev.join(name), std::fs::Permissions::from_mode(0o666))?;
    }
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        match symlink(to, dev.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_stay_inside_the_root() {
        let root = std::env::temp_dir().join(format!("vmm-agent-container-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/etc", root.join("escape")).unwrap();
        symlink("etc", root.join("inside")).unwrap();
        let root = root.canonicalize().unwrap();
        assert_eq!(target(&root, "/proc").unwrap(), root.join("proc"));
        assert_eq!(target(&root, "/inside/x").unwrap(), root.join("etc/x"));
        assert!(target(&root, "/escape/x")
            .unwrap_err()
            .contains("leads out"));
        assert!(target(&root, "/a/../b").is_err());
        assert!(target(&root, "relative").is_err());
        let m = Mount {
            destination: "/x".into(),
            kind: "nfs".into(),
            source: String::new(),
            options: vec![],
        };
        let err = mount_all(root.to_str().unwrap(), &[m]).unwrap_err();
        assert!(
            err.contains("cannot mount nfs on /x: the type is not one of"),
            "{err}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
