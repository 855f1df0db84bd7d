//! A container's new mount namespace, made small: not a copy of the
//! agent's (every mount of the guest, each copied when the container
//! starts, detached by its pivot_root and torn down when it ends; under
//! the development host's nested PVM each costs), but a copy of a base
//! namespace that holds one empty tmpfs, made once ([`base`]; at boot for
//! the containerd shim's VMs, so a template's snapshot holds it), into
//! which a detached copy of the container's root and its mounts
//! ([`clone_root`], `open_tree`) is moved and pivoted to ([`enter`]).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use super::isolation::check;

/// Where, in the base namespace, a container's root is moved to.
const ROOT: &std::ffi::CStr = c"/root";

/// The base namespace, made on first use; `None` where it cannot be
/// (a guest without a root disk, whose initramfs root cannot be pivoted
/// away from): containers then get a copy of the agent's.
pub fn base() -> Option<&'static File> {
    static BASE: OnceLock<Option<File>> = OnceLock::new();
    BASE.get_or_init(|| match std::thread::spawn(make_base).join() {
        Ok(Ok(ns)) => Some(ns),
        Ok(Err(e)) => {
            eprintln!("vmm-agent: containers get a copy of the guest's mounts: {e}");
            None
        }
        Err(_) => None,
    })
    .as_ref()
}

/// On a thread of its own (its file system context and mount namespace
/// are its own after the unshare; the thread ends after): a new mount
/// namespace whose only mount is an empty tmpfs with the folder [`ROOT`],
/// by pivot_root onto a tmpfs mounted on /tmp there (private to it) and
/// the rest detached.
fn make_base() -> io::Result<File> {
    let fail = |what: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(
            e.kind(),
            format!("cannot make the base mount namespace: {what}: {e}"),
        )
    };
    let null = std::ptr::null();
    // SAFETY: unshare(2) and mount(2) with static strings; they change
    // this thread's own namespace.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS)).map_err(|_| fail("unshare"))?;
        let private = libc::MS_REC | libc::MS_PRIVATE;
        check(libc::mount(null, c"/".as_ptr(), null, private, null.cast()))
            .map_err(|_| fail("private"))?;
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let data = c"mode=755,size=4k";
        check(libc::mount(
            c"vmm-base".as_ptr(),
            c"/tmp".as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            data.as_ptr().cast(),
        ))
        .map_err(|_| fail("tmpfs"))?;
    }
    let ns = File::open("/proc/thread-self/ns/mnt")?;
    std::fs::create_dir("/tmp/root")?;
    let dot = c".".as_ptr();
    // SAFETY: chdir(2), pivot_root(2) and umount2(2) with static strings,
    // in this thread's own namespace.
    unsafe {
        check(libc::chdir(c"/tmp".as_ptr())).map_err(|_| fail("chdir"))?;
        check(libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int)
            .map_err(|_| fail("pivot_root"))?;
        check(libc::umount2(dot, libc::MNT_DETACH)).map_err(|_| fail("detach"))?;
    }
    Ok(ns)
}

/// A detached copy of `root` and the mounts under it, to move into a
/// container's namespace.
pub fn clone_root(root: &str) -> io::Result<OwnedFd> {
    let path = CString::new(root).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags =
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: open_tree(2) with a NUL-terminated path; it returns a new
    // descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// In the child, before it makes its new namespaces: into the base one,
/// so that the new mount namespace is a copy of it. Async-signal-safe.
pub fn enter_base(base: &File) -> io::Result<()> {
    // SAFETY: setns(2) on an open namespace descriptor.
    check(unsafe { libc::setns(base.as_raw_fd(), libc::CLONE_NEWNS) })
}

/// In the child, in its new copy of the base namespace: `tree` moved in
/// and made its root (pivot_root; the base's tmpfs detached), its mounts
/// made slaves (what the container mounts stays in it). Async-signal-safe.
pub fn enter(tree: &OwnedFd) -> io::Result<()> {
    let (dot, null) = (c".".as_ptr(), std::ptr::null());
    let empty = libc::MOVE_MOUNT_F_EMPTY_PATH;
    // SAFETY: move_mount(2), chdir(2), pivot_root(2), umount2(2) and
    // mount(2) on an open mount descriptor and static strings.
    unsafe {
        let moved = libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            ROOT.as_ptr(),
            empty,
        );
        check(moved as libc::c_int)?;
        check(libc::chdir(ROOT.as_ptr()))?;
        check(libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int)?;
        check(libc::umount2(dot, libc::MNT_DETACH))?;
        check(libc::chdir(c"/".as_ptr()))?;
        let slave = libc::MS_REC | libc::MS_SLAVE;
        check(libc::mount(null, c"/".as_ptr(), null, slave, null.cast()))
    }
}
