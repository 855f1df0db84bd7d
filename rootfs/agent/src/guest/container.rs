//! A container's mounts (`Request::Mount`): the file systems an OCI
//! runtime spec asks for, mounted inside the container's root before its
//! processes run there (chrooted; `command::Settings::root`).
//!
//! Staged mounts: when the VMM asks at boot (`VMM_STAGE_MOUNTS`, what the
//! containerd shim's VMs have), the agent mounts the file systems of
//! containerd's default spec once, in a folder of its own; a container
//! whose spec asks for one of them exactly gets it moved in (MS_MOVE)
//! instead of a new one. A template's snapshot holds them made, so the
//! first container of each VM restored from it skips making them (each
//! mount's kernel work is slow in a guest). Each is moved out once: later
//! containers of the VM get new ones.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path};

use vmm_agent::{Mount, MOUNT_KINDS};

use super::isolation::{Deferred, Prepared};

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

/// The mounts containerd's default spec (`oci.WithDefaultSpec`, which
/// `ctr run` and the CRI plugin start from) asks for, staged by [`stage`]:
/// destination, type, source and options, as the spec has them. Not its
/// /proc and /dev/mqueue: they belong to the container's new pid and ipc
/// namespaces, and its process mounts them itself (isolation.rs).
const STAGED: &[(&str, &str, &str, &[&str])] = &[
    (
        "/dev",
        "tmpfs",
        "tmpfs",
        &["nosuid", "strictatime", "mode=755", "size=65536k"],
    ),
    (
        "/dev/pts",
        "devpts",
        "devpts",
        &[
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
            "gid=5",
        ],
    ),
    (
        "/dev/shm",
        "tmpfs",
        "shm",
        &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    ),
    (
        "/sys",
        "sysfs",
        "sysfs",
        &["nosuid", "noexec", "nodev", "ro"],
    ),
    (
        "/run",
        "tmpfs",
        "tmpfs",
        &["nosuid", "strictatime", "mode=755", "size=65536k"],
    ),
];

/// Where [`stage`] mounts them: `<STAGE_DIR>/<index in STAGED>`.
const STAGE_DIR: &str = "/run/vmm-agent/staged";

fn staged_mount(i: usize) -> Mount {
    let (destination, kind, source, options) = STAGED[i];
    Mount {
        destination: destination.into(),
        kind: kind.into(),
        source: source.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
    }
}

/// Mounts the [`STAGED`] file systems in [`STAGE_DIR`] (a private tmpfs,
/// so that they can be moved out).
pub fn stage() -> Result<(), String> {
    let fail = |e: io::Error| format!("cannot stage the containers' mounts: {e}");
    std::fs::create_dir_all(STAGE_DIR).map_err(fail)?;
    vmm_agent::mount::mount("tmpfs", STAGE_DIR, "tmpfs", 0, "mode=700").map_err(fail)?;
    vmm_agent::mount::mount("", STAGE_DIR, "", libc::MS_PRIVATE, "").map_err(fail)?;
    let dir = File::open(STAGE_DIR).map_err(fail)?;
    for i in 0..STAGED.len() {
        let m = staged_mount(i);
        mount_new(&dir, &m, &i.to_string())
            .map_err(|e| format!("cannot stage {} on {}: {e}", m.kind, m.destination))?;
    }
    // The mount points of those that go inside another (/dev/pts in
    // /dev), made in it beforehand.
    for (inner, ..) in STAGED {
        for (j, (outer, ..)) in STAGED.iter().enumerate() {
            if let Some(rest) = inner.strip_prefix(outer).and_then(|r| r.strip_prefix('/')) {
                std::fs::create_dir_all(format!("{STAGE_DIR}/{j}/{rest}")).map_err(fail)?;
            }
        }
    }
    Ok(())
}

/// Which staged mount `m` is, if one is exactly.
fn staged_index(m: &Mount) -> Option<usize> {
    (0..STAGED.len()).find(|&i| staged_mount(i) == *m)
}

/// Moves staged mount `i` onto `point`; false when it is not there (not
/// staged, or moved out already).
fn move_staged(i: usize, point: &OwnedFd) -> bool {
    let from = format!("{STAGE_DIR}/{i}");
    // EINVAL once it was moved out: `from` is no mount point any more.
    vmm_agent::mount::mount(&from, fd_path(point), "", libc::MS_MOVE, "").is_ok()
}

/// Mounts `mounts` inside `root`, in order; stops at the first that fails
/// and says which. Those the process of `isolation` makes itself (see
/// `Prepared::defers`) get their mount point here and go to it.
pub fn mount_all(
    root: &str,
    mounts: &[Mount],
    mut isolation: Option<&mut Prepared>,
) -> Result<(), String> {
    let root = match File::open(root) {
        Ok(r) if r.metadata().is_ok_and(|m| m.is_dir()) => r,
        _ => return Err(format!("the container root {root} is not a folder")),
    };
    for m in mounts {
        let done = match isolation.as_deref_mut().filter(|i| i.defers(m)) {
            Some(i) => deferred(&root, m).map(|d| i.defer(d)),
            None => mount_one(&root, m),
        };
        done.map_err(|e| format!("cannot mount {} on {}: {e}", m.kind, m.destination))?;
    }
    Ok(())
}

/// `m` for its process to mount after its chroot, its mount point made.
fn deferred(root: &File, m: &Mount) -> Result<Deferred, String> {
    let destination = relative(&m.destination)?;
    mount_point(root, &destination, false)
        .map_err(|e| format!("cannot make the mount point: {e}"))?;
    let options = vmm_agent::mount::Options::parse(&m.options);
    let source = match m.source.is_empty() {
        true => &m.kind,
        false => &m.source,
    };
    let c = |s: &str| CString::new(s).map_err(|_| "a NUL in the mount".to_string());
    Ok(Deferred {
        source: c(source)?,
        target: c(&format!("/{destination}"))?,
        kind: c(file_system(&m.kind))?,
        flags: options.flags,
        data: c(&options.data)?,
    })
}

/// Unmounts everything at or under `root`.
pub fn unmount_all(root: &str) -> Result<(), String> {
    vmm_agent::mount::unmount_under(Path::new(root)).map_err(|e| e.to_string())
}

fn mount_one(root: &File, m: &Mount) -> Result<(), String> {
    if !MOUNT_KINDS.contains(&m.kind.as_str()) {
        return Err(format!("the type is not one of {}", MOUNT_KINDS.join(", ")));
    }
    let destination = relative(&m.destination)?;
    if let Some(i) = staged_index(m) {
        let point = mount_point(root, &destination, false)
            .map_err(|e| format!("cannot make the mount point: {e}"))?;
        if move_staged(i, &point) {
            return Ok(());
        }
    }
    mount_new(root, m, &destination)
}

fn is_bind(m: &Mount) -> bool {
    m.kind == "bind" || vmm_agent::mount::Options::parse(&m.options).flags & libc::MS_BIND != 0
}

/// Mounts a new `m` on `point` inside `root` (relative; made where
/// missing).
fn mount_new(root: &File, m: &Mount, point: &str) -> Result<(), String> {
    let vmm_agent::mount::Options {
        flags,
        propagation,
        data,
    } = vmm_agent::mount::Options::parse(&m.options);
    let bind = is_bind(m);
    let (source, file) = match bind {
        true => {
            let s = Path::new(&m.source);
            if !s.is_absolute() || !s.exists() {
                return Err(format!(
                    "the bind source {:?} does not exist in the guest",
                    m.source
                ));
            }
            (m.source.clone(), !s.is_dir())
        }
        false if m.source.is_empty() => (m.kind.clone(), false),
        false => (m.source.clone(), false),
    };
    let at =
        mount_point(root, point, file).map_err(|e| format!("cannot make the mount point: {e}"))?;
    let kind = match bind {
        true => "",
        false => file_system(&m.kind),
    };
    let first = flags & !(libc::MS_RDONLY * bind as libc::c_ulong);
    let sys = |e: io::Error| e.to_string();
    vmm_agent::mount::mount(&source, fd_path(&at), kind, first, &data).map_err(sys)?;
    if !(bind && flags & libc::MS_RDONLY != 0) && propagation == 0 && !is_dev(m) {
        return Ok(());
    }
    // The new mount itself (the descriptor holds the folder under it).
    let mounted = open_in_root(root, point, file).map_err(sys)?;
    // A bind mount takes its read-only flag (and the others) on a remount.
    if bind && flags & libc::MS_RDONLY != 0 {
        let again = flags | libc::MS_REMOUNT | libc::MS_BIND;
        vmm_agent::mount::mount("", fd_path(&mounted), "", again, "").map_err(sys)?;
    }
    if propagation != 0 {
        vmm_agent::mount::mount("", fd_path(&mounted), "", propagation, "").map_err(sys)?;
    }
    if is_dev(m) {
        populate_dev(&mounted).map_err(|e| format!("cannot make the device nodes: {e}"))?;
    }
    Ok(())
}

/// The file system type mount(2) takes for a (non-bind) mount kind.
fn file_system(kind: &str) -> &str {
    match kind {
        // A cgroup v1 request gets the unified hierarchy: the guest runs v2.
        "cgroup" => "cgroup2",
        k => k,
    }
}

fn is_dev(m: &Mount) -> bool {
    m.kind == "tmpfs" && m.destination.trim_end_matches('/') == "/dev"
}

/// `destination` relative to the root: absolute in the spec, without
/// `..`.
fn relative(destination: &str) -> Result<String, String> {
    let d = Path::new(destination);
    if !d.is_absolute() || d.components().any(|c| c == Component::ParentDir) {
        return Err("the destination must be an absolute path without ..".into());
    }
    let parts: Vec<&str> = destination
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    Ok(parts.join("/"))
}

/// The path mount(2) takes for an open descriptor.
fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Opens `path` (relative) inside `root` as the kernel resolves it for a
/// process chrooted there (openat2's RESOLVE_IN_ROOT: `..` and symbolic
/// links, absolute ones too, stay inside the root), as an O_PATH
/// descriptor: one system call, where walking it component by component
/// cost one per component and level (a guest's system calls are slow).
fn open_in_root(root: &File, path: &str, file: bool) -> io::Result<OwnedFd> {
    let path = CString::new(if path.is_empty() { "." } else { path })
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let directory = if file { 0 } else { libc::O_DIRECTORY };
    // SAFETY: an all-zero open_how is valid; its three fields are set.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC | directory) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) with an open directory, a NUL-terminated path
    // and an open_how of the size passed; it returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The mount point `path` inside `root`, made where missing: folders, and
/// an empty file last for a file's bind.
fn mount_point(root: &File, path: &str, file: bool) -> io::Result<OwnedFd> {
    match open_in_root(root, path, file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let parts: Vec<&str> = path.split('/').collect();
    for i in 0..parts.len() {
        let parent = open_in_root(root, &parts[..i].join("/"), false)?;
        let name =
            CString::new(parts[i]).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let last_file = file && i == parts.len() - 1;
        // SAFETY: mkdirat(2)/openat(2) on an open folder and a
        // NUL-terminated name; a descriptor openat returns is closed at once.
        let rc = unsafe {
            match last_file {
                false => libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755),
                true => {
                    let fd = libc::openat(
                        parent.as_raw_fd(),
                        name.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                        0o644,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    fd.min(0)
                }
            }
        };
        if rc != 0 && io::Error::last_os_error().kind() != io::ErrorKind::AlreadyExists {
            return Err(io::Error::last_os_error());
        }
    }
    open_in_root(root, path, file)
}

/// The standard device nodes and links of a container's /dev (`dev`, the
/// new tmpfs).
fn populate_dev(dev: &OwnedFd) -> io::Result<()> {
    let name = |n: &str| CString::new(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let check = |rc: libc::c_int| match rc {
        0 => Ok(()),
        _ if io::Error::last_os_error().kind() == io::ErrorKind::AlreadyExists => Ok(()),
        _ => Err(io::Error::last_os_error()),
    };
    for (node, major, minor) in DEVICES {
        let n = name(node)?;
        // SAFETY: mknodat(2) and fchmodat(2) on an open folder and a
        // NUL-terminated name, with a character device's mode and number.
        check(unsafe {
            libc::mknodat(
                dev.as_raw_fd(),
                n.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(*major, *minor),
            )
        })?;
        // mknod takes the umask off the mode: every user may use these.
        // SAFETY: as above.
        check(unsafe { libc::fchmodat(dev.as_raw_fd(), n.as_ptr(), 0o666, 0) })?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let (l, t) = (name(link)?, name(to)?);
        // SAFETY: symlinkat(2) with NUL-terminated strings and an open
        // folder.
        check(unsafe { libc::symlinkat(t.as_ptr(), dev.as_raw_fd(), l.as_ptr()) })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_stay_inside_the_root() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("vmm-agent-container-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        symlink("/etc", dir.join("escape")).unwrap();
        symlink("etc", dir.join("inside")).unwrap();
        let root = File::open(&dir).unwrap();
        let same = |fd: OwnedFd, p: &str| {
            let made = std::fs::metadata(fd_path(&fd)).unwrap();
            let want = std::fs::metadata(dir.join(p)).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!((made.dev(), made.ino()), (want.dev(), want.ino()), "{p}");
        };
        same(mount_point(&root, "proc", false).unwrap(), "proc");
        same(mount_point(&root, "inside/x", false).unwrap(), "etc/x");
        // A container's absolute link is its root's path, never the guest's.
        same(mount_point(&root, "escape/y/z", false).unwrap(), "etc/y/z");
        same(mount_point(&root, "etc/hosts", true).unwrap(), "etc/hosts");
        assert!(std::fs::metadata(dir.join("etc/hosts")).unwrap().is_file());
        assert!(relative("/a/../b").is_err());
        assert!(relative("relative").is_err());
        assert_eq!(relative("/dev//pts/").unwrap(), "dev/pts");
        let m = Mount {
            destination: "/x".into(),
            kind: "nfs".into(),
            source: String::new(),
            options: vec![],
        };
        let err = mount_all(dir.to_str().unwrap(), &[m], None).unwrap_err();
        assert!(
            err.contains("cannot mount nfs on /x: the type is not one of"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_mount_exactly_as_staged_is_taken_from_the_stage() {
        // containerd's default spec, as `ctr run` hands it over.
        let spec: Vec<Mount> = serde_json::from_str(
            r#"[{"destination":"/proc","type":"proc","source":"proc","options":["nosuid","noexec","nodev"]},
            {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]},
            {"destination":"/dev/pts","type":"devpts","source":"devpts","options":["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620","gid=5"]},
            {"destination":"/dev/shm","type":"tmpfs","source":"shm","options":["nosuid","noexec","nodev","mode=1777","size=65536k"]},
            {"destination":"/dev/mqueue","type":"mqueue","source":"mqueue","options":["nosuid","noexec","nodev"]},
            {"destination":"/sys","type":"sysfs","source":"sysfs","options":["nosuid","noexec","nodev","ro"]},
            {"destination":"/run","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]}]"#,
        )
        .unwrap();
        let found: Vec<Option<usize>> = spec.iter().map(staged_index).collect();
        let (proc, mqueue) = (None, None);
        let all = [proc, Some(0), Some(1), Some(2), mqueue, Some(3), Some(4)];
        assert_eq!(found, all);
        // Another size, place or source is a new mount.
        let mut other = spec[1].clone();
        other.options[3] = "size=1m".into();
        assert_eq!(staged_index(&other), None);
        other = spec[2].clone();
        other.destination = "/dev/pts2".into();
        assert_eq!(staged_index(&other), None);
        other = spec[3].clone();
        other.source = "tmpfs".into();
        assert_eq!(staged_index(&other), None);
    }
}
