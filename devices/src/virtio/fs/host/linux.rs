//! Linux: an inode is an `O_PATH` descriptor; I/O opens go through
//! `/proc/self/fd` (the very inode that was checked); saved paths are
//! reopened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{check, err, openat};
use crate::virtio::fs::guest_abi::linux as guest;

/// The flag that holds an inode without I/O access, for masks.
pub const O_PATH: libc::c_int = libc::O_PATH;

/// `fstat` of a descriptor (an `O_PATH` one too).
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a descriptor the caller owns, the empty path is a
    // valid C string and `st` is writable.
    check(unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// The share's root directory, held.
pub fn open_root(path: &CStr) -> io::Result<OwnedFd> {
    openat(libc::AT_FDCWD, path, libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Holds `name` in directory `dir`, never following a symlink (a
/// symlink is held as itself).
pub fn open_inode(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Opens the held inode `fd` for I/O with host `flags` (the caller has
/// checked it is a regular file or a directory).
pub fn open_for_io(fd: RawFd, flags: libc::c_int) -> io::Result<File> {
    Ok(File::from(openat(
        libc::AT_FDCWD,
        &proc_path(fd),
        flags,
        0,
    )?))
}

/// A held inode for an open file.
pub fn inode_of(file: &File) -> io::Result<OwnedFd> {
    openat(
        libc::AT_FDCWD,
        &proc_path(file.as_raw_fd()),
        libc::O_PATH,
        0,
    )
}

/// The host path a descriptor refers to now; None once it was deleted.
pub fn fd_path(fd: RawFd) -> Option<PathBuf> {
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    if path.as_os_str().as_bytes().ends_with(b" (deleted)") {
        return None;
    }
    Some(path)
}

/// Holds `rel` below `root`, refusing `..`, absolute paths and every
/// symlink on the way (a trailing symlink is held as itself).
pub fn open_beneath(root: RawFd, rel: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(rel.as_os_str().as_bytes()).map_err(|_| err(libc::EINVAL))?;
    // `struct open_how` (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `root` is our descriptor, `c` a valid C string and `how` a
    // valid open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Makes `name` in `dir` a new link to the held inode `fd`.
pub fn link(fd: RawFd, is_symlink: bool, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: `fd` and `dir` are the caller's, the strings are valid.
    let rc = unsafe { libc::linkat(fd, c"".as_ptr(), dir, name.as_ptr(), libc::AT_EMPTY_PATH) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // Without CAP_DAC_READ_SEARCH: link through /proc, which only follows
    // the descriptor's own magic link (never for symlinks).
    if e.raw_os_error() != Some(libc::ENOENT) || is_symlink {
        return Err(e);
    }
    // SAFETY: as above.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path(fd).as_ptr(),
            dir,
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })?;
    Ok(())
}

/// The target of the held symlink `fd`.
pub fn readlink(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `buf` is writable for its length; the empty path reads the
    // link the descriptor itself refers to.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Changes the permission bits of the held inode `fd` (not a symlink).
pub fn chmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: the path is a valid C string naming our descriptor.
    check(unsafe { libc::chmod(proc_path(fd).as_ptr(), mode) })?;
    Ok(())
}

/// Changes the owner of the held inode `fd` (u32::MAX: unchanged).
pub fn chown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `fd` is ours; AT_EMPTY_PATH changes that inode.
    check(unsafe {
        libc::fchownat(
            fd,
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// Sets the access and modification times of the held inode `fd` (not a
/// symlink).
pub fn utimens(fd: RawFd, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: the path is a valid C string naming our (non-symlink)
    // descriptor; `times` has two entries.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, proc_path(fd).as_ptr(), times.as_ptr(), 0) })?;
    Ok(())
}

/// Renames with the guest's flags (RENAME_NOREPLACE, RENAME_EXCHANGE).
pub fn rename(ofd: RawFd, old: &CStr, nfd: RawFd, new: &CStr, flags: u32) -> io::Result<()> {
    // SAFETY: both descriptors are ours; both names valid C strings.
    check(unsafe { libc::renameat2(ofd, old.as_ptr(), nfd, new.as_ptr(), flags) })?;
    Ok(())
}

/// Makes directory `name` in `dir`.
pub fn mkdir(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `dir` is our descriptor and `name` a valid C string.
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) })?;
    Ok(())
}

/// Makes a regular file, FIFO or socket node `name` in `dir`.
pub fn mknod(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `dir` is our descriptor and `name` a valid C string.
    check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, 0) })?;
    Ok(())
}

/// Flushes the file system holding the share (root `fd`).
pub fn syncfs(fd: RawFd) -> io::Result<()> {
    let dir = openat(
        libc::AT_FDCWD,
        &proc_path(fd),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )?;
    // SAFETY: `dir` is an open descriptor.
    check(unsafe { libc::syncfs(dir.as_raw_fd()) })?;
    Ok(())
}

/// Flushes an open file (its data only with `datasync`).
pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })?;
    Ok(())
}

/// FALLOCATE with the guest's mode (Linux's own).
pub fn fallocate(fd: RawFd, mode: u32, off: libc::off_t, len: libc::off_t) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor.
    check(unsafe { libc::fallocate(fd, mode as libc::c_int, off, len) })?;
    Ok(())
}

/// Calls `each(inode, next cookie, type, name)` for the entries of the
/// open directory `fd` from `cookie` on (0: the start), until it returns
/// false or the directory ends.
pub fn read_dir(fd: RawFd, cookie: u64, each: &mut super::EachEntry) -> io::Result<()> {
    let off = libc::off_t::try_from(cookie).map_err(|_| err(libc::EINVAL))?;
    // SAFETY: `fd` is an open directory descriptor.
    if unsafe { libc::lseek(fd, off, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut raw = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `raw` is writable for its length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, raw.as_mut_ptr(), raw.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        let n = n as usize;
        let mut pos = 0;
        while pos + 19 <= n {
            // linux_dirent64: ino u64, off i64, reclen u16, type u8, name.
            let ino = u64::from_ne_bytes(raw[pos..pos + 8].try_into().unwrap_or_default());
            let next = u64::from_ne_bytes(raw[pos + 8..pos + 16].try_into().unwrap_or_default());
            let reclen = u16::from_ne_bytes([raw[pos + 16], raw[pos + 17]]) as usize;
            let typ = raw[pos + 18];
            if reclen < 19 || pos + reclen > n {
                break;
            }
            let name_area = &raw[pos + 19..pos + reclen];
            let name_len = name_area
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_area.len());
            if !each(ino, next, typ, &name_area[..name_len]) {
                return Ok(());
            }
            pos += reclen;
        }
    }
}

/// The `/proc` path xattr calls go through (regular files and
/// directories only: never a symlink).
fn xattr_path(fd: RawFd) -> CString {
    proc_path(fd)
}

/// GETXATTR (`name`) or LISTXATTR (None) into `buf`; the length.
pub fn getxattr(fd: RawFd, name: Option<&CStr>, buf: &mut [u8]) -> io::Result<usize> {
    let path = xattr_path(fd);
    let n = match name {
        // SAFETY: valid C strings; `buf` writable for its length.
        Some(name) => unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        },
        // SAFETY: valid C string; `buf` writable for its length.
        None => unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) },
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// SETXATTR with the host's `flags` (XATTR_CREATE, XATTR_REPLACE).
pub fn setxattr(fd: RawFd, name: &CStr, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let path = xattr_path(fd);
    // SAFETY: valid C strings; `value` readable for its length.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })?;
    Ok(())
}

pub fn removexattr(fd: RawFd, name: &CStr) -> io::Result<()> {
    let path = xattr_path(fd);
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })?;
    Ok(())
}

// The guest's rename flags are this host's.
const _: () = assert!(guest::RENAME_NOREPLACE == libc::RENAME_NOREPLACE);
