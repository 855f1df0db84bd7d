//! The host side of a share: every guest inode is a descriptor the VMM
//! holds without I/O access, opened one validated name at a time below the
//! share's root, never following a symlink. That is the confinement
//! (docs/security.md). The host calls are per OS (`super::host`); the
//! rules below name Linux's, and docs/macos.md gives macOS's:
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
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::abi::{self, Attr, EntryOut, ROOT_ID};
use super::guest_abi;
use super::host::{
    self, check, err, fstat, key, mode as mode_of, openat, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT,
    S_IFREG, S_IFSOCK, S_ISGID, S_ISUID,
};

/// How long the guest may trust a name or attributes before asking again
/// (the consistency window for changes made on the host).
pub const CACHE_TIMEOUT_SECS: u64 = 1;
/// Most inodes the guest may hold at once (each holds a host descriptor).
pub const MAX_INODES: usize = 200_000;
/// Most open files and directories the guest may hold at once.
pub const MAX_HANDLES: usize = 50_000;

pub use super::Error;

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

/// The FUSE attributes of a host `stat`.
// The stat fields' widths differ between architectures (st_nlink is 64
// bits on x86_64, 32 on aarch64): the casts are needed on some.
#[allow(clippy::unnecessary_cast)]
pub fn attr_of(st: &libc::stat) -> Attr {
    Attr {
        ino: st.st_ino as u64,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: mode_of(st),
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
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
    let strip = if dir { S_ISUID } else { S_ISUID | S_ISGID };
    mode & !strip
}

pub use super::state::{FsState, SavedHandle, SavedInode};

/// Opens the inode that the `O_PATH` descriptor `fd` (of type `kind`)
/// holds for I/O, through `/proc/self/fd`, so the very inode that was
/// checked is opened. Only regular files and directories are: symlinks
/// are ELOOP, FIFOs, sockets and device nodes EACCES (opening a FIFO could
/// block the VMM; a device node would be the host's device).
fn open_for_io(fd: RawFd, kind: u32, flags: libc::c_int) -> io::Result<File> {
    match kind {
        S_IFREG | S_IFDIR => {}
        S_IFLNK => return Err(err(libc::ELOOP)),
        _ => return Err(err(libc::EACCES)),
    }
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | host::O_PATH))
        | libc::O_NOCTTY;
    host::open_for_io(fd, flags)
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
            let fd = host::open_root(&c)?;
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
        let key = key(&st);
        fs.by_key.insert(key, ROOT_ID);
        fs.inodes.insert(
            ROOT_ID,
            Inode {
                fd,
                kind: S_IFDIR,
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
        let key = key(&st);
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
                kind: mode_of(&st) & S_IFMT,
                key,
                lookups: 1,
            },
        );
        Ok(Self::entry(id, &st))
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> io::Result<EntryOut> {
        let name = validate_name(name)?;
        let dir = self.inode(parent)?.fd.as_raw_fd();
        let fd = host::open_inode(dir, &name)?;
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
        let mut flags = guest_abi::host_open_flags(flags);
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
        let flags = guest_abi::host_open_flags(flags);
        let mode = safe_mode(mode & !umask, false) & 0o7777;
        // A new file is made with O_EXCL, so nothing that already exists is
        // opened by name: an existing one is pinned with O_PATH, checked to
        // be a regular file and only then opened (a FIFO opened for reading
        // would block the event loop; a device node must never be opened).
        let new_flags = (flags & !(libc::O_DIRECTORY | host::O_PATH))
            | libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOFOLLOW
            | libc::O_NOCTTY;
        let file = match openat(dir, &name, new_flags, mode) {
            Ok(fd) => File::from(fd),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                let existing = host::open_inode(dir, &name)?;
                let kind = mode_of(&fstat(existing.as_raw_fd())?) & S_IFMT;
                if kind == S_IFDIR {
                    return Err(err(libc::EISDIR));
                }
                open_for_io(existing.as_raw_fd(), kind, flags)?
            }
            Err(e) => return Err(e),
        };
        let entry = self.remember(host::inode_of(&file)?)?;
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
        host::mkdir(dir, &cname, mode)?;
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
        let kind = mode & S_IFMT;
        if !matches!(kind, S_IFREG | S_IFIFO | S_IFSOCK) {
            // No device nodes: the VMM would open the host's devices.
            return Err(err(libc::EPERM));
        }
        let cname = validate_name(name)?;
        let dir = self.inode(parent)?.fd.as_raw_fd();
        let mode = kind | (safe_mode(mode & !umask, false) & 0o7777);
        host::mknod(dir, &cname, mode)?;
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
        if inode.kind == S_IFDIR {
            return Err(err(libc::EPERM));
        }
        let fd = inode.fd.as_raw_fd();
        let kind = inode.kind;
        let dir = self.inode(newparent)?.fd.as_raw_fd();
        host::link(fd, kind == S_IFLNK, dir, &cname)?;
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
        if flags & !(guest_abi::linux::RENAME_NOREPLACE | guest_abi::linux::RENAME_EXCHANGE) != 0 {
            return Err(err(libc::EINVAL));
        }
        let old = validate_name(oldname)?;
        let new = validate_name(newname)?;
        let ofd = self.inode(olddir)?.fd.as_raw_fd();
        let nfd = self.inode(newdir)?.fd.as_raw_fd();
        host::rename(ofd, &old, nfd, &new, flags)
    }

    pub fn readlink(&self, nodeid: u64) -> io::Result<Vec<u8>> {
        let inode = self.inode(nodeid)?;
        if inode.kind != S_IFLNK {
            return Err(err(libc::EINVAL));
        }
        host::readlink(inode.fd.as_raw_fd())
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
            if kind == S_IFLNK {
                Err(err(libc::EOPNOTSUPP))
            } else {
                Ok(())
            }
        };
        if s.valid & abi::FATTR_MODE != 0 {
            not_link()?;
            let mode = safe_mode(s.mode, kind == S_IFDIR) & 0o7777;
            host::chmod(path_fd, mode)?;
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
            host::chown(path_fd, uid, gid)?;
        }
        if s.valid & abi::FATTR_SIZE != 0 {
            let size = libc::off_t::try_from(s.size).map_err(|_| err(libc::EFBIG))?;
            let own;
            let file = match fh_file {
                Some(f) => f,
                None => {
                    if kind != S_IFREG {
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
            host::utimens(path_fd, &times)?;
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
        host::fsync(self.file_fd(fh)?, datasync)
    }

    pub fn syncfs(&self) -> io::Result<()> {
        host::syncfs(self.inode(ROOT_ID)?.fd.as_raw_fd())
    }

    pub fn statfs(&self, nodeid: u64) -> io::Result<abi::StatfsOut> {
        host::statfs(self.inode(nodeid)?.fd.as_raw_fd())
    }

    pub fn fallocate(&self, fh: u64, mode: u32, offset: u64, length: u64) -> io::Result<()> {
        self.writable()?;
        let fd = self.file_fd(fh)?;
        let off = libc::off_t::try_from(offset).map_err(|_| err(libc::EFBIG))?;
        let len = libc::off_t::try_from(length).map_err(|_| err(libc::EFBIG))?;
        host::fallocate(fd, mode, off, len)
    }

    pub fn lseek(&self, fh: u64, offset: u64, whence: u32) -> io::Result<u64> {
        let whence = guest_abi::host_whence(whence)?;
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
        let mut out = Vec::with_capacity(size.min(64 * 1024));
        host::read_dir(fd, offset, &mut |ino, next, typ, name| {
            let entry_len = (std::mem::size_of::<abi::Dirent>() + name.len() + 7) & !7;
            if out.len() + entry_len > size {
                return false;
            }
            let dirent = abi::Dirent {
                ino,
                off: next,
                namelen: name.len() as u32,
                typ: u32::from(typ),
            };
            out.extend_from_slice(vm_memory::ByteValued::as_slice(&dirent));
            out.extend_from_slice(name);
            out.resize(
                out.len() + (entry_len - std::mem::size_of::<abi::Dirent>() - name.len()),
                0,
            );
            true
        })?;
        Ok(out)
    }

    /// The inode xattr calls act on: regular files and directories only
    /// (never a symlink, whose calls could follow it).
    fn xattr_inode(&self, nodeid: u64) -> io::Result<RawFd> {
        let inode = self.inode(nodeid)?;
        if inode.kind != S_IFREG && inode.kind != S_IFDIR {
            return Err(err(libc::EPERM));
        }
        Ok(inode.fd.as_raw_fd())
    }

    /// GETXATTR/LISTXATTR: with `size` 0 the length, else the value.
    pub fn getxattr(&self, nodeid: u64, name: Option<&[u8]>, size: u32) -> io::Result<Vec<u8>> {
        let fd = self.xattr_inode(nodeid)?;
        let mut buf = vec![0u8; (size as usize).min(64 * 1024)];
        let name = name
            .map(|n| CString::new(n).map_err(|_| err(libc::EINVAL)))
            .transpose()?;
        let n = host::getxattr(fd, name.as_deref(), &mut buf)?;
        buf.truncate(n);
        if size == 0 {
            return Ok((n as u32).to_le_bytes().to_vec());
        }
        Ok(buf)
    }

    pub fn setxattr(&self, nodeid: u64, name: &[u8], value: &[u8], flags: u32) -> io::Result<()> {
        self.writable()?;
        user_xattr(name)?;
        let fd = self.xattr_inode(nodeid)?;
        let name = CString::new(name).map_err(|_| err(libc::EINVAL))?;
        host::setxattr(fd, &name, value, guest_abi::host_xattr_flags(flags))
    }

    pub fn removexattr(&self, nodeid: u64, name: &[u8]) -> io::Result<()> {
        self.writable()?;
        user_xattr(name)?;
        let fd = self.xattr_inode(nodeid)?;
        let name = CString::new(name).map_err(|_| err(libc::EINVAL))?;
        host::removexattr(fd, &name)
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
            .and_then(|i| host::fd_path(i.fd.as_raw_fd()));
        let relative = |fd: RawFd| -> Option<PathBuf> {
            let path = host::fd_path(fd)?;
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
            let Ok(fd) = host::open_beneath(root, &saved.path) else {
                tracing::info!(
                    "virtio-fs: {} is gone; the guest sees it as stale",
                    saved.path.display()
                );
                continue;
            };
            let Ok(st) = fstat(fd.as_raw_fd()) else {
                continue;
            };
            let key = key(&st);
            if self.by_key.contains_key(&key) {
                continue;
            }
            self.by_key.insert(key, saved.id);
            self.inodes.insert(
                saved.id,
                Inode {
                    fd,
                    kind: mode_of(&st) & S_IFMT,
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
