//! The jail's private root: a small tmpfs holding only the host paths the
//! VM uses, each bind-mounted at its own absolute path (so the VMM's
//! configuration needs no rewriting), a private `/tmp`, a `/proc` of the
//! jail's own PID namespace with nothing but its processes, and the
//! device nodes it needs. The process pivots into it and detaches the
//! host's root. Runs in the jail's first process, in its own mount
//! namespace, before any thread exists.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{Error, Exposed, Plan};

/// Converts a path for a system call.
fn c_path(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Setup {
        what: format!("use the path {} (it holds a NUL byte)", path.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn os_err(what: impl Into<String>) -> Error {
    Error::Setup {
        what: what.into(),
        source: io::Error::last_os_error(),
    }
}

/// mount(2) with optional source, type and data.
fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Error> {
    let source = source.map(c_path).transpose()?;
    let target_c = c_path(target)?;
    let fstype = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // across the call.
    let r = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if r != 0 {
        return Err(os_err(format!("mount {}", target.display())));
    }
    Ok(())
}

/// The flags a bind mount of `path` must keep when it is remounted (a user
/// namespace may not clear the ones its source mount has).
fn locked_flags(path: &Path) -> Result<libc::c_ulong, Error> {
    let c = c_path(path)?;
    // SAFETY: statvfs fills `st`, a plain struct, for a valid path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(os_err(format!(
            "read the mount flags of {}",
            path.display()
        )));
    }
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

/// Where host path `path` goes under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Makes the mount point for `source` at `target`: a directory for a
/// directory, an empty file for anything else.
fn mount_point(source: &Path, target: &Path) -> Result<(), Error> {
    let is_dir = std::fs::metadata(source)
        .map_err(|e| Error::Missing {
            path: source.to_path_buf(),
            source: e,
        })?
        .is_dir();
    let made = if is_dir {
        std::fs::create_dir_all(target)
    } else {
        let parent = target.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(target)
                .map(drop)
        })
    };
    made.map_err(|source| Error::Setup {
        what: format!("make the mount point {}", target.display()),
        source,
    })
}

/// Binds `source` at the same path under `root`, read-only unless
/// `writable`.
fn bind(root: &Path, source: &Path, writable: bool) -> Result<(), Error> {
    let target = inside(root, source);
    mount_point(source, &target)?;
    mount(
        Some(source),
        &target,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    if !writable {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked_flags(source)?;
        mount(None, &target, None, flags, None)?;
    }
    Ok(())
}

/// Builds the root at `root` (an empty directory) from `plan` and pivots
/// into it. `tmp` becomes the jail's `/tmp`.
pub fn enter(plan: &Plan, root: &Path, tmp: &Path) -> Result<(), Error> {
    // Nothing mounted here reaches the host's mount namespace; what the
    // host mounts later under an exposed folder that it made a shared
    // mount reaches the jail (the containerd shim's pod folder, where a
    // pod's later containers and volumes are mounted).
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_SLAVE,
        None,
    )?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=1m,mode=0755"),
    )?;
    // /tmp first: exposed paths under the host's /tmp go on top of it.
    let jail_tmp = root.join("tmp");
    std::fs::create_dir_all(&jail_tmp).map_err(|source| Error::Setup {
        what: "make /tmp in the jail".into(),
        source,
    })?;
    mount(
        Some(tmp),
        &jail_tmp,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    // Shallow paths first, so a folder never hides a file bound inside it.
    let mut exposed: Vec<&Exposed> = plan.exposed.iter().collect();
    exposed.sort_by_key(|e| e.path().components().count());
    for e in exposed {
        match e {
            Exposed::ReadOnly(p) => bind(root, p, false)?,
            Exposed::ReadWrite(p) | Exposed::Device(p) => bind(root, p, true)?,
        }
    }
    let proc = root.join("proc");
    std::fs::create_dir_all(&proc).map_err(|source| Error::Setup {
        what: "make /proc in the jail".into(),
        source,
    })?;
    // Only the jail's own processes, none of /proc's host-wide files.
    mount(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("subset=pid"),
    )?;
    pivot(root)?;
    // The root itself: nothing more is made in it.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

/// pivot_root into `root` and detaches the old root (the host's).
fn pivot(root: &Path) -> Result<(), Error> {
    let c_root = c_path(root)?;
    // SAFETY: chdir and pivot_root on valid C strings; "." names the new
    // root as both the new and the put-old directory, the old root is then
    // stacked under it and detached.
    unsafe {
        if libc::chdir(c_root.as_ptr()) != 0 {
            return Err(os_err("enter the jail's root"));
        }
        let dot = c".";
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(os_err("pivot_root into the jail's root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(os_err("detach the host's root"));
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(os_err("enter the jail's root"));
        }
    }
    Ok(())
}
