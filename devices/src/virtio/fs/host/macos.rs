//! macOS: no `O_PATH`, no `/proc`, no `openat2`. An inode is held by an
//! `O_EVTONLY` descriptor (no read or write access; a symlink held as
//! itself with `O_SYMLINK`); device nodes are never opened at all. An I/O
//! open goes through the held inode's current path (`F_GETPATH`), opened
//! with `O_NOFOLLOW_ANY` (no symlink anywhere on it) and then checked to
//! be the very file held (device and inode), else ESTALE. A saved path is
//! walked one component at a time, refusing every symlink on the way.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::{check, err, key, mode, openat, S_IFMT};
use crate::virtio::fs::guest_abi::linux as guest;

const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;

/// No flag holds an inode without I/O access on macOS: nothing to mask.
pub const O_PATH: libc::c_int = 0;

/// How an inode is held: event-only access, never following a symlink
/// (`O_SYMLINK` holds the link itself), never waiting (a FIFO).
const HOLD: libc::c_int = libc::O_EVTONLY | libc::O_SYMLINK | libc::O_NONBLOCK;

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a descriptor the caller owns and `st` is writable.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// The share's root directory, held.
pub fn open_root(path: &CStr) -> io::Result<OwnedFd> {
    openat(libc::AT_FDCWD, path, libc::O_EVTONLY | libc::O_DIRECTORY, 0)
}

fn is_device(st: &libc::stat) -> bool {
    matches!(mode(st) & S_IFMT, S_IFCHR | S_IFBLK)
}

/// Holds `name` in directory `dir`, never following a symlink. A device
/// node is refused (EACCES) before it is opened: opening one would run
/// its driver's open.
pub fn open_inode(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is the caller's, `name` a valid C string, `st`
    // writable.
    check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    if is_device(&st) {
        return Err(err(libc::EACCES));
    }
    let fd = openat(dir, name, HOLD, 0)?;
    // Swapped for a device node between the two calls (by a host
    // program): do not keep it.
    if is_device(&fstat(fd.as_raw_fd())?) {
        return Err(err(libc::EACCES));
    }
    Ok(fd)
}

/// The current path of the file `fd` refers to.
fn path_of(fd: RawFd) -> io::Result<CString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: F_GETPATH writes at most PATH_MAX bytes into `buf`.
    check(unsafe { libc::fcntl(fd, libc::F_GETPATH, buf.as_mut_ptr()) })?;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    buf.truncate(len);
    CString::new(buf).map_err(|_| err(libc::EINVAL))
}

/// Opens the held inode `fd` for I/O with host `flags` (the caller has
/// checked it is a regular file or a directory): by its current path,
/// with no symlink on the way, and only if the file opened is the one
/// held.
pub fn open_for_io(fd: RawFd, flags: libc::c_int) -> io::Result<File> {
    let held = key(&fstat(fd)?);
    let path = path_of(fd)?;
    let file = File::from(openat(
        libc::AT_FDCWD,
        &path,
        flags | libc::O_NOFOLLOW_ANY,
        0,
    )?);
    if key(&fstat(file.as_raw_fd())?) != held {
        return Err(err(libc::ESTALE));
    }
    Ok(file)
}

/// A held inode for an open file: a second descriptor of it.
pub fn inode_of(file: &File) -> io::Result<OwnedFd> {
    // SAFETY: duplicates a descriptor the caller owns.
    let fd = check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The host path a descriptor refers to now; None once it was deleted.
pub fn fd_path(fd: RawFd) -> Option<PathBuf> {
    if fstat(fd).ok()?.st_nlink == 0 {
        return None;
    }
    let path = path_of(fd).ok()?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(path.as_bytes())))
}

/// Holds `rel` below `root`, one component at a time, refusing `..`,
/// absolute paths and every symlink on the way (a trailing symlink is
/// held as itself).
pub fn open_beneath(root: RawFd, rel: &Path) -> io::Result<OwnedFd> {
    let mut names = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => {
                names.push(CString::new(n.as_bytes()).map_err(|_| err(libc::EINVAL))?)
            }
            _ => return Err(err(libc::EXDEV)),
        }
    }
    let Some((last, dirs)) = names.split_last() else {
        return Err(err(libc::EINVAL));
    };
    let mut dir: Option<OwnedFd> = None;
    for name in dirs {
        let at = dir.as_ref().map_or(root, |d| d.as_raw_fd());
        // O_NOFOLLOW: a symlink here is ELOOP, never followed.
        dir = Some(openat(
            at,
            name,
            libc::O_EVTONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?);
    }
    open_inode(dir.as_ref().map_or(root, |d| d.as_raw_fd()), last)
}

/// Makes `name` in `dir` a new link to the held inode `fd`: through its
/// current path (a symlink is linked as itself), checked to still be the
/// file held.
pub fn link(fd: RawFd, _is_symlink: bool, dir: RawFd, name: &CStr) -> io::Result<()> {
    let held = key(&fstat(fd)?);
    let path = path_of(fd)?;
    // SAFETY: valid C strings; `dir` is the caller's.
    check(unsafe { libc::linkat(libc::AT_FDCWD, path.as_ptr(), dir, name.as_ptr(), 0) })?;
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` writable.
    check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    if key(&st) != held {
        // The path named another file by then: undo.
        // SAFETY: as above.
        unsafe { libc::unlinkat(dir, name.as_ptr(), 0) };
        return Err(err(libc::ESTALE));
    }
    Ok(())
}

/// The target of the held symlink `fd`.
pub fn readlink(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `buf` is writable for its length; `fd` holds the link
    // itself (O_SYMLINK).
    let n = check(unsafe { libc::freadlink(fd, buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn chmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: `fd` is the caller's; mode bits only.
    check(unsafe { libc::fchmod(fd, mode as libc::mode_t) })?;
    Ok(())
}

pub fn chown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `fd` is the caller's (a symlink is held as itself).
    check(unsafe { libc::fchown(fd, uid, gid) })?;
    Ok(())
}

pub fn utimens(fd: RawFd, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: `fd` is the caller's; `times` has two entries.
    check(unsafe { libc::futimens(fd, times.as_ptr()) })?;
    Ok(())
}

/// Renames with the guest's flags: RENAME_NOREPLACE is RENAME_EXCL here,
/// RENAME_EXCHANGE is RENAME_SWAP.
pub fn rename(ofd: RawFd, old: &CStr, nfd: RawFd, new: &CStr, flags: u32) -> io::Result<()> {
    let mut host = 0;
    if flags & guest::RENAME_NOREPLACE != 0 {
        host |= libc::RENAME_EXCL;
    }
    if flags & guest::RENAME_EXCHANGE != 0 {
        host |= libc::RENAME_SWAP;
    }
    // SAFETY: both descriptors are ours; both names valid C strings.
    check(unsafe { libc::renameatx_np(ofd, old.as_ptr(), nfd, new.as_ptr(), host) })?;
    Ok(())
}

pub fn mkdir(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `dir` is our descriptor and `name` a valid C string.
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

/// Makes a regular file or FIFO `name` in `dir`; sockets are made by
/// binding, which a share does not do here (EOPNOTSUPP).
pub fn mknod(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    let perms = mode & 0o7777;
    match mode & S_IFMT {
        super::S_IFREG => {
            openat(
                dir,
                name,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                perms,
            )?;
        }
        super::S_IFIFO => {
            // SAFETY: `dir` is ours and `name` a valid C string.
            check(unsafe { libc::mkfifoat(dir, name.as_ptr(), perms as libc::mode_t) })?;
        }
        _ => return Err(err(libc::EOPNOTSUPP)),
    }
    Ok(())
}

/// Flushes the file system holding the share: macOS flushes them all.
pub fn syncfs(_fd: RawFd) -> io::Result<()> {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
    Ok(())
}

/// Flushes an open file to the disk itself (F_FULLFSYNC; fsync where the
/// file system lacks it). macOS has no separate data-only flush.
pub fn fsync(fd: RawFd, _datasync: bool) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor.
    if unsafe { libc::fcntl(fd, libc::F_FULLFSYNC) } == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    check(unsafe { libc::fsync(fd) })?;
    Ok(())
}

/// macOS has no fallocate (its F_PREALLOCATE has other semantics).
pub fn fallocate(_fd: RawFd, _mode: u32, _off: libc::off_t, _len: libc::off_t) -> io::Result<()> {
    Err(err(libc::EOPNOTSUPP))
}

/// Calls `each(inode, next cookie, type, name)` for the entries of the
/// open directory `fd` from `cookie` on. A cookie is the number of
/// entries before it (macOS's own positions are valid only in the stream
/// that made them), so a later call rewinds and skips that many.
pub fn read_dir(fd: RawFd, cookie: u64, each: &mut super::EachEntry) -> io::Result<()> {
    // SAFETY: duplicates the caller's directory descriptor, for a stream
    // that owns (and closes) the copy.
    let copy = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `copy` is a new descriptor; fdopendir takes it over.
    let stream = unsafe { libc::fdopendir(copy) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `copy` is still ours to close.
        unsafe { libc::close(copy) };
        return Err(e);
    }
    // SAFETY: a live stream.
    unsafe { libc::rewinddir(stream) };
    let mut index = 0u64;
    let result = loop {
        // SAFETY: `stream` is live; errno is cleared to tell the end
        // from an error.
        let entry = unsafe {
            *libc::__error() = 0;
            libc::readdir(stream)
        };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(e)
            };
        }
        index += 1;
        if index <= cookie {
            continue;
        }
        // SAFETY: readdir returned a valid entry, live until the next call.
        let (ino, typ, name) = unsafe {
            let e = &*entry;
            let name = CStr::from_ptr(e.d_name.as_ptr()).to_bytes();
            (e.d_ino, e.d_type, name)
        };
        if !each(ino, index, typ, name) {
            break Ok(());
        }
    };
    // SAFETY: closes the stream (and the copy) once.
    unsafe { libc::closedir(stream) };
    result
}

// The xattr calls act on the held descriptor itself (a regular file or
// a directory; the caller refuses symlinks), never on a path.

/// GETXATTR (`name`) or LISTXATTR (None) into `buf`; the length.
pub fn getxattr(fd: RawFd, name: Option<&CStr>, buf: &mut [u8]) -> io::Result<usize> {
    let n = match name {
        // SAFETY: a valid C string; `buf` writable for its length.
        Some(name) => unsafe {
            libc::fgetxattr(fd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len(), 0, 0)
        },
        // SAFETY: `buf` writable for its length.
        None => unsafe { libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len(), 0) },
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// SETXATTR with the host's `flags` (XATTR_CREATE, XATTR_REPLACE).
pub fn setxattr(fd: RawFd, name: &CStr, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid C string; `value` readable for its length.
    check(unsafe {
        libc::fsetxattr(
            fd,
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
            flags,
        )
    })?;
    Ok(())
}

pub fn removexattr(fd: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: a valid C string.
    check(unsafe { libc::fremovexattr(fd, name.as_ptr(), 0) })?;
    Ok(())
}
