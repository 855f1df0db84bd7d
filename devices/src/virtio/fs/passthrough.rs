//! The host side of a share: every guest inode is an `O_PATH` descriptor
//! the VMM holds, opened one validated name at a time below the share's
//! root, never following a symlink. That is the confinement (docs/security.md):
//!
//! - names from the guest are single components: not empty, not `.` or
//!   `..`, no `/`, no NUL, at most 255 bytes;
//! - every lookup is `openat(parent, name, O_PATH | O_NOFOLLOW)`, so a
//!   symlink is an inode of its own (the guest reads it with READLINK and
//!   resolves it inside the guest), never a way out;
//! - creating, linking, renaming and removing use `*at` calls on the parent
//!   inode's descriptor with a validated name;
//! - an inode is opened for I/O (through `/proc/self/fd`) only when it is a
//!   regular file or a directory; symlinks are never reopened or followed,
//!   device nodes and FIFOs are never opened by the VMM, and the guest
//!   cannot create device nodes;
//! - the guest never passes a path or a file handle, only nodeids and fhs
//!   that index the VMM's own tables;
//! - a read-only share refuses every change with EROFS here, whatever the
//!   guest's mount flags;
//! - set-user-ID and set-group-ID bits are never set on files the guest
//!   creates or changes.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::abi::{self, Attr, EntryOut, ROOT_ID};

/// How long the guest may trust a name or attributes before asking again
/// (the consistency window for changes made on the host).
pub const CACHE_TIMEOUT_SECS: u64 = 1;
/// Most inodes the guest may hold at once (each holds a host descriptor).
pub const MAX_INODES: usize = 200_000;
/// Most open files and directories the guest may hold at once.
pub const MAX_HANDLES: usize = 50_000;

pub use super::Error;

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cstr(text: &str) -> CString {
    CString::new(text).expect("no NUL in a path the VMM builds")
}

/// Checks a name the guest sent: one path component.
pub fn validate_name(name: &[u8]) -> io::Result<CString> {
    if name.is_empty() || name.len() > 255 || name == b"." || name == b".." || name.contains(&b'/')
    {
        return Err(err(libc::EINVAL));
    }
    CString::new(name).map_err(|_| err(libc::EINVAL))
}

struct Inode {
    fd: OwnedFd,
    /// `S_IFMT` bits: the file type never changes for an inode.
    kind: u32,
    key: (u64, u64),
    lookups: u64,
}

struct Handle {
    file: File,
    nodeid: u64,
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a descriptor we own, the empty path is a valid C
    // string and `st` is writable.
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

/// The FUSE attributes of a host `stat`.
// The stat fields' widths differ between architectures (st_nlink is 64
// bits on x86_64, 32 on aarch64): the casts are needed on some.
#[allow(clippy::unnecessary_cast)]
pub fn attr_of(st: &libc::stat) -> Attr {
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn openat(dir: RawFd, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is a descriptor we own and `name` a valid C string.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn proc_path(fd: RawFd) -> CString {
    cstr(&format!("/proc/self/fd/{fd}"))
}

/// The guest may only change `user.*` attributes: `security.capability`
/// would give a host program capabilities, and `trusted.*` or
/// `security.*` steer host features (overlayfs, LSMs).
fn user_xattr(name: &[u8]) -> io::Result<()> {
    if name.starts_with(b"user.") {
        Ok(())
    } else {
        Err(err(libc::EPERM))
    }
}

/// Strips the set-ID bits from a mode the guest asks for (a directory may
/// keep set-group-ID, which only passes the group on).
fn safe_mode(mode: u32, dir: bool) -> u32 {
    let strip = if dir {
        libc::S_ISUID
    } else {
        libc::S_ISUID | libc::S_ISGID
    };
    mode & !strip
}

pub use super::state::{FsState, SavedHandle, SavedInode};

/// The host path a descriptor refers to now; None once it was deleted.
fn fd_path(fd: RawFd) -> Option<PathBuf> {
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    if path.as_os_str().as_bytes().ends_with(b" (deleted)") {
        return None;
    }
    Some(path)
}

/// `O_PATH` open of `rel` below `root`, refusing `..`, absolute paths and
/// every symlink on the way (a trailing symlink is opened as itself).
fn open_beneath(root: RawFd, rel: &Path) -> io::Result<OwnedFd> {
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

/// Opens the inode that the `O_PATH` descriptor `fd` (of type `kind`)
/// holds for I/O, through `/proc/self/fd`, so the very inode that was
/// checked is opened. Only regular files and directories are: symlinks
/// are ELOOP, FIFOs, sockets and device nodes EACCES (opening a FIFO could
/// block the VMM; a device node would be the host's device).
fn open_for_io(fd: RawFd, kind: u32, flags: libc::c_int) -> io::Result<File> {
    match kind {
        libc::S_IFREG | libc::S_IFDIR => {}
        libc::S_IFLNK => return Err(err(libc::ELOOP)),
        _ => return Err(err(libc::EACCES)),
    }
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_PATH))
        | libc::O_NOCTTY;
    let fd = openat(libc::AT_FDCWD, &proc_path(fd), flags, 0)?;
    Ok(File::from(fd))
}

/// One shared folder.
pub struct PassthroughFs {
    read_only: bool,
    inodes: HashMap<u64, Inode>,
    by_key: HashMap<(u64, u64), u64>,
    next_id: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
}

/// What CREATE gives back.
pub struct Created {
    pub entry: EntryOut,
    pub fh: u64,
}

impl PassthroughFs {
    /// Shares `root` (a directory anywhere on the host).
    pub fn new(root: &Path, read_only: bool) -> Result<Self, Error> {
        let open_root = || -> io::Result<(OwnedFd, libc::stat)> {
            let c = CString::new(root.as_os_str().as_bytes()).map_err(|_| err(libc::EINVAL))?;
            let fd = openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            let st = fstat(fd.as_raw_fd())?;
            Ok((fd, st))
        };
        let (fd, st) = open_root().map_err(|source| Error::OpenRoot {
            path: root.to_path_buf(),
            source,
        })?;
        let mut fs = PassthroughFs {
            read_only,
            inodes: HashMap::new(),
            by_key: HashMap::new(),
            next_id: ROOT_ID + 1,
            handles: HashMap::new(),
            next_fh: 1,
        };
        let key = (st.st_dev, st.st_ino);
        fs.by_key.insert(key, ROOT_ID);
        fs.inodes.insert(
            ROOT_ID,
            Inode {
                fd,
                kind: libc::S_IFDIR,
                key,
                lookups: u64::MAX / 2,
            },
        );
        Ok(fs)
    }

    fn inode(&self, nodeid: u64) -> io::Result<&Inode> {
        self.inodes.get(&nodeid).ok_or_else(|| err(libc::ESTALE))
    }

    fn handle(&self, fh: u64) -> io::Result<&Handle> {
        self.handles.get(&fh).ok_or_else(|| err(libc::EBADF))
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn entry(nodeid: u64, st: &libc::stat) -> EntryOut {
        EntryOut {
            nodeid,
            generation: 0,
            entry_valid: CACHE_TIMEOUT_SECS,
            attr_valid: CACHE_TIMEOUT_SECS,
            entry_valid_nsec: 0,
            attr_valid_nsec: 0,
            attr: attr_of(st),
        }
    }

    /// Adds (or counts another lookup of) the inode `fd` refers to.
    fn remember(&mut self, fd: OwnedFd) -> io::Result<EntryOut> {
        let st = fstat(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        if let Some(&id) = self.by_key.get(&key) {
            if let Some(inode) = self.inodes.get_mut(&id) {
                inode.lookups = inode.lookups.saturating_add(1);
                return Ok(Self::entry(id, &st));
            }
        }
        if self.inodes.len() >= MAX_INODES {
            return Err(err(libc::ENFILE));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.by_key.insert(key, id);
        self.inodes.insert(
            id,
            Inode {
                fd,
                kind: st.st_mode & libc::S_IFMT,
                key,
                lookups: 1,
            },
        );
        Ok(Self::entry(id, &st))
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> io::Result<EntryOut> {
        let name = validate_name(name)?;
        let dir = self.inode(parent)?.fd.as_raw_fd();
        let fd = openat(dir, &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        self.remember(fd)
    }

    pub fn forget(&mut self, nodeid: u64, count: u64) {
        if nodeid == ROOT_ID {
            return;
        }
        let Some(inode) = self.inodes.get_mut(&nodeid) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(count);
        if inode.lookups == 0 {
            let key = inode.key;
            self.inodes.remove(&nodeid);
            self.by_key.remove(&key);
        }
    }

    pub fn getattr(&self, nodeid: u64, fh: Option<u64>) -> io::Result<libc::stat> {
        match fh.and_then(|fh| self.handles.get(&fh)) {
            Some(h) => fstat(h.file.as_raw_fd()),
            None => fstat(self.inode(nodeid)?.fd.as_raw_fd()),
        }
    }

    /// Opens an inode for I/O: regular files and directories only.
    fn reopen(&self, nodeid: u64, flags: libc::c_int) -> io::Result<File> {
        let inode = self.inode(nodeid)?;
        open_for_io(inode.fd.as_raw_fd(), inode.kind, flags)
    }

    fn add_handle(&mut self, file: File, nodeid: u64) -> io::Result<u64> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(err(libc::ENFILE));
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { file, nodeid });
        Ok(fh)
    }

    fn check_open_flags(&self, flags: libc::c_int) -> io::Result<()> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.writable()?;
        }
        Ok(())
    }

    pub fn open(&mut self, nodeid: u64, flags: u32, dir: bool) -> io::Result<u64> {
        let mut flags = flags as libc::c_int;
        if dir {
            flags = libc::O_RDONLY | libc::O_DIRECTORY;
        } else {
            self.check_open_flags(flags)?;
        }
        let file = self.reopen(nodeid, flags)?;
        self.add_handle(file, nodeid)
    }

    pub fn release(&mut self, fh: u64) {
        self.handles.remove(&fh);
    }

    pub fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        flags: u32,
        mode: u32,
        umask: u32,
    ) -> io::Result<Created> {
        self.writable()?;
        let name = validate_name(name)?;
        let dir = self.inode(parent)?.fd.as_raw_fd();
        let flags = flags as libc::c_int;
        let mode = safe_mode(mode & !umask, false) & 0o7777;
        // A new file is made with O_EXCL, so nothing that already exists is
        // opened by name: an existing one is pinned with O_PATH, checked to
        // be a regular file and only then opened (a FIFO opened for reading
        // would block the event loop; a device node must never be opened).
        let new_flags = (flags & !(libc::O_DIRECTORY | libc::O_PATH))
            | libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOFOLLOW
            | libc::O_NOCTTY;
        let file = match openat(dir, &name, new_flags, mode) {
            Ok(fd) => File::from(fd),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                let existing = openat(dir, &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                let kind = fstat(existing.as_raw_fd())?.st_mode & libc::S_IFMT;
                if kind == libc::S_IFDIR {
                    return Err(err(libc::EISDIR));
                }
                open_for_io(existing.as_raw_fd(), kind, flags)?
            }
            Err(e) => return Err(e),
        };
        let path_fd = openat(
            libc::AT_FDCWD,
            &proc_path(file.as_raw_fd()),
            libc::O_PATH,
            0,
        )?;
        let entry = self.remember(path_fd)?;
        match self.add_handle(file, entry.nodeid) {
            Ok(fh) => Ok(Created { entry, fh }),
            Err(e) => {
                self.forget(entry.nodeid, 1);
                Err(e)
            }
        }
    }

    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> io::Result<EntryOut> {
        self.writable()?;
        let cname = validate_name(name)?;
        let dir = self.inode(parent)?.fd.as_raw_fd();
        let mode = safe_mode(mode & !umask, true) & 0o7777;
        // SAFETY: `dir` is our descriptor and `cname` a valid C string.
        check(unsafe { libc::mkdirat(dir, cname.as_ptr(), mode) })?;
        self.lookup(parent, name)
    }

    pub fn mknod(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> io::Result<EntryOut> {
        self.writable()?;
        let kind = mode & libc::S_IFMT;
        if !matches!(kind, libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK) {
            // No device nodes: the VMM would open the host's devices.
            return Err(err(libc::EPERM));
        }
        let cname = validate_name(name)?;
        let dir = self.inode(parent)?.fd.as_raw_fd();
        let mode = kind | (safe_mode(mode & !umask, false) & 0o7777);
        // SAFETY: `dir` is our descriptor and `cname` a valid C string.
        check(unsafe { libc::mknodat(dir, cname.as_ptr(), mode, 0) })?;
        self.lookup(parent, name)
    }

    pub fn symlink(&mut self, parent: u64, name: &[u8], target: &[u8]) -> io::Result<EntryOut> {
        self.writable()?;
        let cname = validate_name(name)?;
        if target.is_empty() || target.len() > libc::PATH_MAX as usize {
            return Err(err(libc::EINVAL));
        }
        let ctarget = CString::new(target).map_err(|_| err(libc::EINVAL))?;
        let dir = self.inode(parent)?.fd.as_raw_fd();
        // SAFETY: both strings are valid C strings; `dir` is ours. The
        // target is stored, never resolved by the VMM.
        check(unsafe { libc::symlinkat(ctarget.as_ptr(), dir, cname.as_ptr()) })?;
        self.lookup(parent, name)
    }

    pub fn link(&mut self, nodeid: u64, newparent: u64, newname: &[u8]) -> io::Result<EntryOut> {
        self.writable()?;
        let cname = validate_name(newname)?;
        let inode = self.inode(nodeid)?;
        if inode.kind == libc::S_IFDIR {
            return Err(err(libc::EPERM));
        }
        let fd = inode.fd.as_raw_fd();
        let kind = inode.kind;
        let dir = self.inode(newparent)?.fd.as_raw_fd();
        // SAFETY: `fd` and `dir` are ours, the strings are valid.
        let rc =
            unsafe { libc::linkat(fd, c"".as_ptr(), dir, cname.as_ptr(), libc::AT_EMPTY_PATH) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // Without CAP_DAC_READ_SEARCH: link through /proc, which only
            // follows the descriptor's own magic link (never for symlinks).
            if e.raw_os_error() != Some(libc::ENOENT) || kind == libc::S_IFLNK {
                return Err(e);
            }
            // SAFETY: as above.
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc_path(fd).as_ptr(),
                    dir,
                    cname.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })?;
        }
        self.lookup(newparent, newname)
    }

    pub fn unlink(&mut self, parent: u64, name: &[u8], dir: bool) -> io::Result<()> {
        self.writable()?;
        let cname = validate_name(name)?;
        let pfd = self.inode(parent)?.fd.as_raw_fd();
        let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: `pfd` is ours and `cname` a valid C string.
        check(unsafe { libc::unlinkat(pfd, cname.as_ptr(), flags) })?;
        Ok(())
    }

    pub fn rename(
        &mut self,
        olddir: u64,
        oldname: &[u8],
        newdir: u64,
        newname: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        // RENAME_WHITEOUT would create a device node.
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(err(libc::EINVAL));
        }
        let old = validate_name(oldname)?;
        let new = validate_name(newname)?;
        let ofd = self.inode(olddir)?.fd.as_raw_fd();
        let nfd = self.inode(newdir)?.fd.as_raw_fd();
        // SAFETY: both descriptors are ours; both names valid C strings.
        check(unsafe { libc::renameat2(ofd, old.as_ptr(), nfd, new.as_ptr(), flags) })?;
        Ok(())
    }

    pub fn readlink(&self, nodeid: u64) -> io::Result<Vec<u8>> {
        let inode = self.inode(nodeid)?;
        if inode.kind != libc::S_IFLNK {
            return Err(err(libc::EINVAL));
        }
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: `buf` is writable for its length; the empty path reads
        // the link the descriptor itself refers to.
        let n = unsafe {
            libc::readlinkat(
                inode.fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// SETATTR; returns the new attributes.
    pub fn setattr(&mut self, nodeid: u64, s: &abi::SetattrIn) -> io::Result<libc::stat> {
        let changes = abi::FATTR_MODE
            | abi::FATTR_UID
            | abi::FATTR_GID
            | abi::FATTR_SIZE
            | abi::FATTR_ATIME
            | abi::FATTR_MTIME;
        if s.valid & changes != 0 {
            self.writable()?;
        }
        let inode = self.inode(nodeid)?;
        let kind = inode.kind;
        let path_fd = inode.fd.as_raw_fd();
        let fh_file = if s.valid & abi::FATTR_FH != 0 {
            self.handles.get(&s.fh).map(|h| &h.file)
        } else {
            None
        };
        // Changes through /proc are for regular files and directories only:
        // /proc/self/fd of a symlink could be followed.
        let not_link = || {
            if kind == libc::S_IFLNK {
                Err(err(libc::EOPNOTSUPP))
            } else {
                Ok(())
            }
        };
        if s.valid & abi::FATTR_MODE != 0 {
            not_link()?;
            let mode = safe_mode(s.mode, kind == libc::S_IFDIR) & 0o7777;
            // SAFETY: the path is a valid C string naming our descriptor.
            check(unsafe { libc::chmod(proc_path(path_fd).as_ptr(), mode) })?;
        }
        if s.valid & (abi::FATTR_UID | abi::FATTR_GID) != 0 {
            let uid = if s.valid & abi::FATTR_UID != 0 {
                s.uid
            } else {
                u32::MAX
            };
            let gid = if s.valid & abi::FATTR_GID != 0 {
                s.gid
            } else {
                u32::MAX
            };
            // SAFETY: `path_fd` is ours; AT_EMPTY_PATH changes that inode.
            check(unsafe {
                libc::fchownat(
                    path_fd,
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if s.valid & abi::FATTR_SIZE != 0 {
            let size = libc::off_t::try_from(s.size).map_err(|_| err(libc::EFBIG))?;
            let own;
            let file = match fh_file {
                Some(f) => f,
                None => {
                    if kind != libc::S_IFREG {
                        return Err(err(libc::EINVAL));
                    }
                    own = self.reopen(nodeid, libc::O_WRONLY)?;
                    &own
                }
            };
            // SAFETY: `file` is an open descriptor.
            check(unsafe { libc::ftruncate(file.as_raw_fd(), size) })?;
        }
        if s.valid & (abi::FATTR_ATIME | abi::FATTR_MTIME) != 0 {
            not_link()?;
            let time = |set: u32, now: u32, sec: u64, nsec: u32| {
                if s.valid & set == 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                } else if s.valid & now != 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                } else {
                    libc::timespec {
                        tv_sec: sec as libc::time_t,
                        tv_nsec: libc::c_long::from(nsec.min(999_999_999) as i32),
                    }
                }
            };
            let times = [
                time(abi::FATTR_ATIME, abi::FATTR_ATIME_NOW, s.atime, s.atimensec),
                time(abi::FATTR_MTIME, abi::FATTR_MTIME_NOW, s.mtime, s.mtimensec),
            ];
            // SAFETY: the path is a valid C string naming our (non-symlink)
            // descriptor; `times` has two entries.
            check(unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    proc_path(path_fd).as_ptr(),
                    times.as_ptr(),
                    0,
                )
            })?;
        }
        self.getattr(nodeid, fh_file.map(|_| s.fh))
    }

    /// The descriptor of an open file for READ/WRITE.
    pub fn file_fd(&self, fh: u64) -> io::Result<RawFd> {
        Ok(self.handle(fh)?.file.as_raw_fd())
    }

    pub fn check_write(&self) -> io::Result<()> {
        self.writable()
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> io::Result<()> {
        let fd = self.file_fd(fh)?;
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

    pub fn syncfs(&self) -> io::Result<()> {
        let fd = self.inode(ROOT_ID)?.fd.as_raw_fd();
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

    pub fn statfs(&self, nodeid: u64) -> io::Result<abi::StatfsOut> {
        let fd = self.inode(nodeid)?.fd.as_raw_fd();
        // SAFETY: zeroed statvfs is a valid value to overwrite.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is ours (O_PATH allows fstatvfs) and `st` writable.
        check(unsafe { libc::fstatvfs(fd, &mut st) })?;
        Ok(abi::StatfsOut {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: st.f_namemax as u32,
            frsize: st.f_frsize as u32,
            padding: 0,
            spare: [0; 6],
        })
    }

    pub fn fallocate(&self, fh: u64, mode: u32, offset: u64, length: u64) -> io::Result<()> {
        self.writable()?;
        let fd = self.file_fd(fh)?;
        let off = libc::off_t::try_from(offset).map_err(|_| err(libc::EFBIG))?;
        let len = libc::off_t::try_from(length).map_err(|_| err(libc::EFBIG))?;
        // SAFETY: `fd` is an open descriptor.
        check(unsafe { libc::fallocate(fd, mode as libc::c_int, off, len) })?;
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: u64, whence: u32) -> io::Result<u64> {
        let whence = whence as libc::c_int;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(err(libc::EINVAL));
        }
        let fd = self.file_fd(fh)?;
        let off = libc::off_t::try_from(offset).map_err(|_| err(libc::EINVAL))?;
        // SAFETY: `fd` is an open descriptor; we only read with pread, so
        // moving its offset affects nothing else.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as u64)
    }

    /// Fills `out` (at most `size` bytes) with FUSE dirents of the open
    /// directory `fh`, starting at the host's offset cookie `offset`. Each
    /// call seeks to the cookie the guest sends (the `off` of the last
    /// entry it got), so entries read but not sent are simply read again.
    pub fn readdir(&self, fh: u64, offset: u64, size: usize) -> io::Result<Vec<u8>> {
        let fd = self.file_fd(fh)?;
        let off = libc::off_t::try_from(offset).map_err(|_| err(libc::EINVAL))?;
        // SAFETY: `fd` is an open directory descriptor.
        if unsafe { libc::lseek(fd, off, libc::SEEK_SET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::with_capacity(size.min(64 * 1024));
        let mut raw = vec![0u8; size.clamp(512, 64 * 1024)];
        'outer: loop {
            // SAFETY: `raw` is writable for its length.
            let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, raw.as_mut_ptr(), raw.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
            let n = n as usize;
            let mut pos = 0;
            while pos + 19 <= n {
                // linux_dirent64: ino u64, off i64, reclen u16, type u8, name.
                let ino = u64::from_ne_bytes(raw[pos..pos + 8].try_into().unwrap_or_default());
                let next =
                    u64::from_ne_bytes(raw[pos + 8..pos + 16].try_into().unwrap_or_default());
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
                let entry_len = (std::mem::size_of::<abi::Dirent>() + name_len + 7) & !7;
                if out.len() + entry_len > size {
                    break 'outer;
                }
                let dirent = abi::Dirent {
                    ino,
                    off: next,
                    namelen: name_len as u32,
                    typ: u32::from(typ),
                };
                out.extend_from_slice(vm_memory::ByteValued::as_slice(&dirent));
                out.extend_from_slice(&name_area[..name_len]);
                out.resize(
                    out.len() + (entry_len - std::mem::size_of::<abi::Dirent>() - name_len),
                    0,
                );
                pos += reclen;
            }
        }
        Ok(out)
    }

    /// The `/proc` path xattr calls go through (not for symlinks).
    fn xattr_path(&self, nodeid: u64) -> io::Result<CString> {
        let inode = self.inode(nodeid)?;
        if inode.kind != libc::S_IFREG && inode.kind != libc::S_IFDIR {
            return Err(err(libc::EPERM));
        }
        Ok(proc_path(inode.fd.as_raw_fd()))
    }

    /// GETXATTR/LISTXATTR: with `size` 0 the length, else the value.
    pub fn getxattr(&self, nodeid: u64, name: Option<&[u8]>, size: u32) -> io::Result<Vec<u8>> {
        let path = self.xattr_path(nodeid)?;
        let mut buf = vec![0u8; (size as usize).min(64 * 1024)];
        let n = match name {
            Some(name) => {
                let name = CString::new(name).map_err(|_| err(libc::EINVAL))?;
                // SAFETY: valid C strings; `buf` writable for its length.
                unsafe {
                    libc::getxattr(
                        path.as_ptr(),
                        name.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                }
            }
            // SAFETY: valid C string; `buf` writable for its length.
            None => unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) },
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        if size == 0 {
            return Ok((n as u32).to_le_bytes().to_vec());
        }
        Ok(buf)
    }

    pub fn setxattr(&self, nodeid: u64, name: &[u8], value: &[u8], flags: u32) -> io::Result<()> {
        self.writable()?;
        user_xattr(name)?;
        let path = self.xattr_path(nodeid)?;
        let name = CString::new(name).map_err(|_| err(libc::EINVAL))?;
        // SAFETY: valid C strings; `value` readable for its length.
        check(unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags as libc::c_int,
            )
        })?;
        Ok(())
    }

    pub fn removexattr(&self, nodeid: u64, name: &[u8]) -> io::Result<()> {
        self.writable()?;
        user_xattr(name)?;
        let path = self.xattr_path(nodeid)?;
        let name = CString::new(name).map_err(|_| err(libc::EINVAL))?;
        // SAFETY: valid C strings.
        check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })?;
        Ok(())
    }

    /// DESTROY (unmount): everything but the root goes.
    pub fn destroy(&mut self) {
        self.handles.clear();
        self.inodes.retain(|&id, _| id == ROOT_ID);
        self.by_key.retain(|_, id| *id == ROOT_ID);
    }

    /// Where each inode and open file is, by path below the root, for a
    /// snapshot or a fork child (another process, which reopens them).
    /// Inodes without a path inside the share (deleted, or moved out by
    /// the host) are left out: the guest gets ESTALE for them.
    pub fn save(&self) -> FsState {
        let root = self
            .inodes
            .get(&ROOT_ID)
            .and_then(|i| fd_path(i.fd.as_raw_fd()));
        let relative = |fd: RawFd| -> Option<PathBuf> {
            let path = fd_path(fd)?;
            let rel = path.strip_prefix(root.as_ref()?).ok()?;
            Some(rel.to_path_buf())
        };
        let mut inodes: Vec<SavedInode> = self
            .inodes
            .iter()
            .filter(|(&id, _)| id != ROOT_ID)
            .filter_map(|(&id, inode)| {
                Some(SavedInode {
                    id,
                    path: relative(inode.fd.as_raw_fd())?,
                    lookups: inode.lookups,
                })
            })
            .collect();
        inodes.sort_by_key(|i| i.id);
        let mut handles: Vec<SavedHandle> = self
            .handles
            .iter()
            .map(|(&fh, h)| {
                // SAFETY: F_GETFL on a descriptor we own.
                let flags = unsafe { libc::fcntl(h.file.as_raw_fd(), libc::F_GETFL) };
                SavedHandle {
                    fh,
                    nodeid: h.nodeid,
                    flags: flags.max(0) & !libc::O_TRUNC,
                }
            })
            .collect();
        handles.sort_by_key(|h| h.fh);
        FsState {
            inodes,
            handles,
            next_id: self.next_id,
            next_fh: self.next_fh,
        }
    }

    /// Reopens what `save` recorded (in a new process). Paths are opened
    /// below the root with RESOLVE_BENEATH and without following any
    /// symlink, so a saved state cannot point outside the share either.
    pub fn restore(&mut self, state: &FsState) {
        self.destroy();
        let root = self.inode(ROOT_ID).map(|i| i.fd.as_raw_fd()).ok();
        for saved in &state.inodes {
            let Some(root) = root else { break };
            if saved.id <= ROOT_ID || saved.lookups == 0 {
                continue;
            }
            let Ok(fd) = open_beneath(root, &saved.path) else {
                tracing::info!(
                    "virtio-fs: {} is gone; the guest sees it as stale",
                    saved.path.display()
                );
                continue;
            };
            let Ok(st) = fstat(fd.as_raw_fd()) else {
                continue;
            };
            let key = (st.st_dev, st.st_ino);
            if self.by_key.contains_key(&key) {
                continue;
            }
            self.by_key.insert(key, saved.id);
            self.inodes.insert(
                saved.id,
                Inode {
                    fd,
                    kind: st.st_mode & libc::S_IFMT,
                    key,
                    lookups: saved.lookups,
                },
            );
        }
        for saved in &state.handles {
            let flags = saved.flags & !(libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL);
            if let Ok(file) = self.reopen(saved.nodeid, flags) {
                self.handles.insert(
                    saved.fh,
                    Handle {
                        file,
                        nodeid: saved.nodeid,
                    },
                );
            }
        }
        self.next_id = state.next_id.max(self.next_id);
        self.next_fh = state.next_fh.max(self.next_fh);
    }

    /// Inodes and open files held (for limits and tests).
    pub fn counts(&self) -> (usize, usize) {
        (self.inodes.len(), self.handles.len())
    }
}
