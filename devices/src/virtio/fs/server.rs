//! FUSE request handling: parses one request from the guest, calls the
//! share, writes the reply. Every length and name comes from the guest and
//! is checked before use; a malformed request gets an error reply
//! (EINVAL, or ENOSYS for an opcode we do not serve), never a panic.

use std::io;

use vm_memory::ByteValued;

use super::abi::{self, InHeader, OutHeader};
use super::iobuf::IoBuf;
use super::passthrough::{attr_of, PassthroughFs, CACHE_TIMEOUT_SECS};

/// Largest READ/WRITE payload (1 MiB, as `max_pages` 256 tells the guest).
pub const MAX_IO: u32 = 1 << 20;
/// Largest non-data part of a request (two names, or a symlink target, or
/// an xattr value).
const MAX_ARGS: usize = 64 * 1024 + 2 * 4096;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// A request's bytes after the header.
struct Args<'b, 'a> {
    buf: &'b IoBuf<'a>,
    pos: usize,
    end: usize,
}

impl Args<'_, '_> {
    fn obj<T: ByteValued + Default>(&mut self) -> io::Result<T> {
        let mut v = T::default();
        if self.pos + std::mem::size_of::<T>() > self.end {
            return Err(einval());
        }
        self.buf.read_at(self.pos, v.as_mut_slice())?;
        self.pos += std::mem::size_of::<T>();
        Ok(v)
    }

    /// The rest of the request, copied (bounded).
    fn rest(&mut self) -> io::Result<Vec<u8>> {
        let len = self.end - self.pos;
        if len > MAX_ARGS {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        let mut v = vec![0u8; len];
        self.buf.read_at(self.pos, &mut v)?;
        self.pos = self.end;
        Ok(v)
    }
}

/// Splits NUL-terminated strings off the front of `bytes`.
fn strings<const N: usize>(bytes: &[u8]) -> io::Result<[&[u8]; N]> {
    let mut out = [&bytes[..0]; N];
    let mut rest = bytes;
    for slot in out.iter_mut() {
        let nul = rest.iter().position(|&b| b == 0).ok_or_else(einval)?;
        *slot = &rest[..nul];
        rest = &rest[nul + 1..];
    }
    Ok(out)
}

/// What a request produced: reply bytes after the header, or file data
/// already placed in the reply buffer.
enum Answer {
    None,
    Bytes(Vec<u8>),
    /// `n` bytes of file data are in the reply after the header.
    Data(usize),
}

fn bytes<T: ByteValued>(v: T) -> Answer {
    Answer::Bytes(v.as_slice().to_vec())
}

/// The FUSE server for one share.
pub struct Server {
    fs: PassthroughFs,
}

impl Server {
    pub fn new(fs: PassthroughFs) -> Self {
        Server { fs }
    }

    pub fn fs(&self) -> &PassthroughFs {
        &self.fs
    }

    pub fn fs_mut(&mut self) -> &mut PassthroughFs {
        &mut self.fs
    }

    /// Handles one request; returns the bytes written into `reply`.
    pub fn handle(&mut self, req: &IoBuf, reply: &mut IoBuf) -> usize {
        let mut hdr = InHeader::default();
        if req.read_at(0, hdr.as_mut_slice()).is_err() {
            return 0;
        }
        let hsize = std::mem::size_of::<InHeader>();
        let len = hdr.len as usize;
        let result = if len < hsize || len > req.len() {
            Err(einval())
        } else {
            let mut args = Args {
                buf: req,
                pos: hsize,
                end: len,
            };
            self.dispatch(&hdr, &mut args, req, reply)
        };
        let out_len = std::mem::size_of::<OutHeader>();
        let (error, body) = match result {
            // FORGET, BATCH_FORGET and INTERRUPT have no reply.
            Ok(Answer::None) => return 0,
            Ok(Answer::Bytes(b)) => {
                if reply.write_at(out_len, &b).is_err() {
                    (-libc::ERANGE, 0)
                } else {
                    (0, b.len())
                }
            }
            Ok(Answer::Data(n)) => (0, n),
            Err(e) => (-super::guest_abi::guest_errno(&e), 0),
        };
        let out = OutHeader {
            len: (out_len + body) as u32,
            error,
            unique: hdr.unique,
        };
        match reply.write_at(0, out.as_slice()) {
            Ok(()) => out_len + body,
            Err(_) => 0,
        }
    }

    fn dispatch(
        &mut self,
        hdr: &InHeader,
        args: &mut Args,
        req: &IoBuf,
        reply: &mut IoBuf,
    ) -> io::Result<Answer> {
        let node = hdr.nodeid;
        let fs = &mut self.fs;
        let entry = |e: abi::EntryOut| Ok(bytes(e));
        match hdr.opcode {
            abi::INIT => {
                let init: abi::InitIn = args.obj()?;
                if init.major < abi::KERNEL_VERSION {
                    return Err(io::Error::from_raw_os_error(libc::EPROTO));
                }
                let offered = abi::ASYNC_READ
                    | abi::ATOMIC_O_TRUNC
                    | abi::BIG_WRITES
                    | abi::AUTO_INVAL_DATA
                    | abi::PARALLEL_DIROPS
                    | abi::MAX_PAGES;
                Ok(bytes(abi::InitOut {
                    major: abi::KERNEL_VERSION,
                    minor: abi::KERNEL_MINOR_VERSION.min(init.minor),
                    max_readahead: init.max_readahead,
                    flags: init.flags & offered,
                    max_background: 64,
                    congestion_threshold: 48,
                    max_write: MAX_IO,
                    time_gran: 1,
                    max_pages: (MAX_IO / 4096) as u16,
                    ..Default::default()
                }))
            }
            abi::DESTROY => {
                fs.destroy();
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::LOOKUP => {
                let name = args.rest()?;
                let [name] = strings(&name)?;
                entry(fs.lookup(node, name)?)
            }
            abi::FORGET => {
                let f: abi::ForgetIn = args.obj()?;
                fs.forget(node, f.nlookup);
                Ok(Answer::None)
            }
            abi::BATCH_FORGET => {
                let b: abi::BatchForgetIn = args.obj()?;
                for _ in 0..b.count {
                    let Ok(one) = args.obj::<abi::ForgetOne>() else {
                        break;
                    };
                    fs.forget(one.nodeid, one.nlookup);
                }
                Ok(Answer::None)
            }
            abi::INTERRUPT => Ok(Answer::None),
            abi::GETATTR => {
                let g: abi::GetattrIn = args.obj()?;
                let fh = (g.flags & abi::GETATTR_FH != 0).then_some(g.fh);
                let st = fs.getattr(node, fh)?;
                Ok(attr_out(&st))
            }
            abi::SETATTR => {
                let s: abi::SetattrIn = args.obj()?;
                let st = fs.setattr(node, &s)?;
                Ok(attr_out(&st))
            }
            abi::READLINK => Ok(Answer::Bytes(fs.readlink(node)?)),
            abi::SYMLINK => {
                let rest = args.rest()?;
                let [name, target] = strings(&rest)?;
                entry(fs.symlink(node, name, target)?)
            }
            abi::MKNOD => {
                let m: abi::MknodIn = args.obj()?;
                let rest = args.rest()?;
                let [name] = strings(&rest)?;
                entry(fs.mknod(node, name, m.mode, m.umask)?)
            }
            abi::MKDIR => {
                let m: abi::MkdirIn = args.obj()?;
                let rest = args.rest()?;
                let [name] = strings(&rest)?;
                entry(fs.mkdir(node, name, m.mode, m.umask)?)
            }
            abi::UNLINK | abi::RMDIR => {
                let rest = args.rest()?;
                let [name] = strings(&rest)?;
                fs.unlink(node, name, hdr.opcode == abi::RMDIR)?;
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::RENAME | abi::RENAME2 => {
                let (newdir, flags) = if hdr.opcode == abi::RENAME {
                    (args.obj::<abi::RenameIn>()?.newdir, 0)
                } else {
                    let r: abi::Rename2In = args.obj()?;
                    (r.newdir, r.flags)
                };
                let rest = args.rest()?;
                let [old, new] = strings(&rest)?;
                fs.rename(node, old, newdir, new, flags)?;
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::LINK => {
                let l: abi::LinkIn = args.obj()?;
                let rest = args.rest()?;
                let [name] = strings(&rest)?;
                entry(fs.link(l.oldnodeid, node, name)?)
            }
            abi::OPEN | abi::OPENDIR => {
                let o: abi::OpenIn = args.obj()?;
                let fh = fs.open(node, o.flags, hdr.opcode == abi::OPENDIR)?;
                Ok(bytes(abi::OpenOut {
                    fh,
                    open_flags: 0,
                    padding: 0,
                }))
            }
            abi::CREATE => {
                let c: abi::CreateIn = args.obj()?;
                let rest = args.rest()?;
                let [name] = strings(&rest)?;
                let created = fs.create(node, name, c.flags, c.mode, c.umask)?;
                let mut out = created.entry.as_slice().to_vec();
                out.extend_from_slice(
                    abi::OpenOut {
                        fh: created.fh,
                        open_flags: 0,
                        padding: 0,
                    }
                    .as_slice(),
                );
                Ok(Answer::Bytes(out))
            }
            abi::READ => {
                let r: abi::ReadIn = args.obj()?;
                let fd = fs.file_fd(r.fh)?;
                let start = std::mem::size_of::<OutHeader>();
                let want = (r.size.min(MAX_IO) as usize).min(reply.len().saturating_sub(start));
                let mut done = 0;
                while done < want {
                    let n = reply.read_from_file(
                        start + done,
                        want - done,
                        fd,
                        r.offset + done as u64,
                    )?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                Ok(Answer::Data(done))
            }
            abi::WRITE => {
                let w: abi::WriteIn = args.obj()?;
                fs.check_write()?;
                let fd = fs.file_fd(w.fh)?;
                let size = w.size as usize;
                if w.size > MAX_IO || size > args.end - args.pos {
                    return Err(einval());
                }
                let mut done = 0;
                while done < size {
                    let n = req.write_to_file(
                        args.pos + done,
                        size - done,
                        fd,
                        w.offset + done as u64,
                    )?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                Ok(bytes(abi::WriteOut {
                    size: done as u32,
                    padding: 0,
                }))
            }
            abi::STATFS => Ok(bytes(fs.statfs(node)?)),
            abi::RELEASE | abi::RELEASEDIR => {
                let r: abi::ReleaseIn = args.obj()?;
                fs.release(r.fh);
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::FLUSH => {
                let f: abi::FlushIn = args.obj()?;
                fs.file_fd(f.fh)?;
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::FSYNC | abi::FSYNCDIR => {
                let f: abi::FsyncIn = args.obj()?;
                fs.fsync(f.fh, f.fsync_flags & abi::FSYNC_FDATASYNC != 0)?;
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::SYNCFS => {
                fs.syncfs()?;
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::READDIR => {
                let r: abi::ReadIn = args.obj()?;
                let room = reply.len().saturating_sub(std::mem::size_of::<OutHeader>());
                let size = (r.size.min(MAX_IO) as usize).min(room);
                Ok(Answer::Bytes(fs.readdir(r.fh, r.offset, size)?))
            }
            abi::GETXATTR | abi::LISTXATTR => {
                let g: abi::GetxattrIn = args.obj()?;
                let rest = args.rest()?;
                let name = if hdr.opcode == abi::GETXATTR {
                    Some(strings::<1>(&rest)?[0])
                } else {
                    None
                };
                let value = fs.getxattr(node, name, g.size)?;
                if g.size == 0 {
                    let size = u32::from_le_bytes(value[..4].try_into().map_err(|_| einval())?);
                    return Ok(bytes(abi::GetxattrOut { size, padding: 0 }));
                }
                Ok(Answer::Bytes(value))
            }
            abi::SETXATTR => {
                let s: abi::SetxattrIn = args.obj()?;
                let rest = args.rest()?;
                let [name] = strings(&rest)?;
                let value = rest
                    .get(name.len() + 1..name.len() + 1 + s.size as usize)
                    .ok_or_else(einval)?;
                fs.setxattr(node, name, value, s.flags)?;
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::REMOVEXATTR => {
                let rest = args.rest()?;
                let [name] = strings(&rest)?;
                fs.removexattr(node, name)?;
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::FALLOCATE => {
                let f: abi::FallocateIn = args.obj()?;
                fs.fallocate(f.fh, f.mode, f.offset, f.length)?;
                Ok(Answer::Bytes(Vec::new()))
            }
            abi::LSEEK => {
                let l: abi::LseekIn = args.obj()?;
                let offset = fs.lseek(l.fh, l.offset, l.whence)?;
                Ok(bytes(abi::LseekOut { offset }))
            }
            // ACCESS: permissions are checked by the guest kernel
            // (virtio-fs mounts use default_permissions); ENOSYS makes it
            // stop asking. Locks stay inside the guest kernel (not offered).
            _ => Err(io::Error::from_raw_os_error(libc::ENOSYS)),
        }
    }
}

fn attr_out(st: &libc::stat) -> Answer {
    bytes(abi::AttrOut {
        attr_valid: CACHE_TIMEOUT_SECS,
        attr_valid_nsec: 0,
        dummy: 0,
        attr: attr_of(st),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fs::guest_abi::linux as g;
    use crate::virtio::fs::host::{S_IFLNK, S_IFMT, S_IFREG};
    use crate::virtio::fs::passthrough;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    /// A scratch folder: `share/` is shared, `outside` must stay untouched.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("fs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("share/sub")).unwrap();
            std::fs::write(dir.join("outside"), b"secret").unwrap();
            std::fs::write(dir.join("share/file"), b"hello").unwrap();
            Scratch(dir)
        }
        fn share(&self) -> PathBuf {
            self.0.join("share")
        }
        fn outside_untouched(&self) -> bool {
            std::fs::read(self.0.join("outside")).unwrap() == b"secret"
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn server(s: &Scratch, read_only: bool) -> Server {
        server_at(&s.share(), read_only)
    }

    fn server_at(share: &std::path::Path, read_only: bool) -> Server {
        let mut srv = Server::new(PassthroughFs::new(share, read_only).unwrap());
        let init = abi::InitIn {
            major: 7,
            minor: 36,
            max_readahead: 1 << 17,
            flags: 0xffff_ffff,
        };
        let (err, body) = call(&mut srv, abi::INIT, 0, init.as_slice());
        assert_eq!(err, 0);
        let out = abi::InitOut::from_slice(&body[..64]).unwrap();
        assert_eq!((out.major, out.minor), (7, 31));
        srv
    }

    /// Sends a request with `args` after the header; returns (error, body).
    fn call(srv: &mut Server, opcode: u32, nodeid: u64, args: &[u8]) -> (i32, Vec<u8>) {
        call_raw(srv, opcode, nodeid, args, None, 1 << 16)
    }

    fn call_raw(
        srv: &mut Server,
        opcode: u32,
        nodeid: u64,
        args: &[u8],
        len: Option<u32>,
        reply_len: usize,
    ) -> (i32, Vec<u8>) {
        let hdr = InHeader {
            len: len.unwrap_or((40 + args.len()) as u32),
            opcode,
            unique: 77,
            nodeid,
            ..Default::default()
        };
        let mut req = [hdr.as_slice().to_vec(), args.to_vec()];
        let mut reply = [vec![0u8; reply_len]];
        let n = {
            let req = IoBuf::from_vecs(&mut req);
            let mut out = IoBuf::from_vecs(&mut reply);
            srv.handle(&req, &mut out)
        };
        if n == 0 {
            return (i32::MIN, Vec::new());
        }
        let out = OutHeader::from_slice(&reply[0][..16]).unwrap();
        assert_eq!(out.unique, 77);
        assert_eq!(out.len as usize, n);
        (out.error, reply[0][16..n].to_vec())
    }

    fn named(name: &[u8]) -> Vec<u8> {
        let mut v = name.to_vec();
        v.push(0);
        v
    }

    fn lookup(srv: &mut Server, parent: u64, name: &[u8]) -> Result<abi::EntryOut, i32> {
        match call(srv, abi::LOOKUP, parent, &named(name)) {
            (0, body) => Ok(*abi::EntryOut::from_slice(&body).unwrap()),
            (e, _) => Err(e),
        }
    }

    fn open(srv: &mut Server, node: u64, flags: u32) -> Result<u64, i32> {
        let o = abi::OpenIn {
            flags,
            open_flags: 0,
        };
        match call(srv, abi::OPEN, node, o.as_slice()) {
            (0, body) => Ok(abi::OpenOut::from_slice(&body).unwrap().fh),
            (e, _) => Err(e),
        }
    }

    fn create(srv: &mut Server, parent: u64, name: &[u8], mode: u32) -> Result<(u64, u64), i32> {
        create_with(srv, parent, name, mode, g::O_RDWR | g::O_CREAT)
    }

    fn create_with(
        srv: &mut Server,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: u32,
    ) -> Result<(u64, u64), i32> {
        let c = abi::CreateIn {
            flags,
            mode: S_IFREG | mode,
            umask: 0o022,
            open_flags: 0,
        };
        let mut args = c.as_slice().to_vec();
        args.extend(named(name));
        match call(srv, abi::CREATE, parent, &args) {
            (0, body) => {
                let e = abi::EntryOut::from_slice(&body[..128]).unwrap();
                let o = abi::OpenOut::from_slice(&body[128..]).unwrap();
                Ok((e.nodeid, o.fh))
            }
            (e, _) => Err(e),
        }
    }

    fn write(srv: &mut Server, fh: u64, offset: u64, data: &[u8]) -> (i32, Vec<u8>) {
        let w = abi::WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        let mut args = w.as_slice().to_vec();
        args.extend_from_slice(data);
        call(srv, abi::WRITE, 0, &args)
    }

    fn read(srv: &mut Server, fh: u64, offset: u64, size: u32) -> (i32, Vec<u8>) {
        let r = abi::ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        call(srv, abi::READ, 0, r.as_slice())
    }

    #[test]
    fn files_are_created_written_read_and_renamed() {
        let s = Scratch::new("basic");
        let mut srv = server(&s, false);
        let (node, fh) = create(&mut srv, ROOT, b"new", 0o644).unwrap();
        assert_eq!(write(&mut srv, fh, 0, b"abcdef").0, 0);
        assert_eq!(read(&mut srv, fh, 2, 100), (0, b"cdef".to_vec()));
        assert_eq!(std::fs::read(s.share().join("new")).unwrap(), b"abcdef");
        let mut args = abi::RenameIn { newdir: ROOT }.as_slice().to_vec();
        args.extend(named(b"new"));
        args.extend(named(b"file"));
        assert_eq!(call(&mut srv, abi::RENAME, ROOT, &args).0, 0);
        assert_eq!(std::fs::read(s.share().join("file")).unwrap(), b"abcdef");
        // The inode follows the rename; its open handle still works.
        assert_eq!(lookup(&mut srv, ROOT, b"file").unwrap().nodeid, node);
        assert_eq!(read(&mut srv, fh, 0, 3), (0, b"abc".to_vec()));
        // Readdir lists the folder.
        let dir = call(
            &mut srv,
            abi::OPENDIR,
            ROOT,
            abi::OpenIn::default().as_slice(),
        );
        let dfh = abi::OpenOut::from_slice(&dir.1).unwrap().fh;
        let r = abi::ReadIn {
            fh: dfh,
            size: 4096,
            ..Default::default()
        };
        let (err, body) = call(&mut srv, abi::READDIR, ROOT, r.as_slice());
        assert_eq!(err, 0);
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("file") && text.contains("sub"), "{text}");
    }

    const ROOT: u64 = abi::ROOT_ID;

    #[test]
    fn a_large_directory_is_listed_over_several_replies() {
        let s = Scratch::new("readdir");
        for i in 0..300 {
            std::fs::write(s.share().join(format!("entry-{i:03}")), b"").unwrap();
        }
        let mut srv = server(&s, false);
        let dir = call(
            &mut srv,
            abi::OPENDIR,
            ROOT,
            abi::OpenIn::default().as_slice(),
        );
        let fh = abi::OpenOut::from_slice(&dir.1).unwrap().fh;
        let mut names = Vec::new();
        let mut offset = 0;
        let mut replies = 0;
        loop {
            let r = abi::ReadIn {
                fh,
                offset,
                size: 1024,
                ..Default::default()
            };
            let (err, body) = call(&mut srv, abi::READDIR, ROOT, r.as_slice());
            assert_eq!(err, 0);
            if body.is_empty() {
                break;
            }
            replies += 1;
            let mut pos = 0;
            while pos < body.len() {
                let d = abi::Dirent::from_slice(&body[pos..pos + 24]).unwrap();
                let name = &body[pos + 24..pos + 24 + d.namelen as usize];
                names.push(String::from_utf8(name.to_vec()).unwrap());
                offset = d.off;
                pos += (24 + d.namelen as usize + 7) & !7;
            }
        }
        assert!(replies > 5, "{replies} replies");
        names.sort();
        let mut want: Vec<String> = (0..300).map(|i| format!("entry-{i:03}")).collect();
        want.extend([".", "..", "file", "sub"].map(String::from));
        want.sort();
        assert_eq!(names, want);
    }

    #[test]
    fn names_that_leave_the_folder_are_refused() {
        let s = Scratch::new("names");
        let mut srv = server(&s, false);
        for bad in [
            &b".."[..],
            b".",
            b"",
            b"sub/../../outside",
            b"/etc",
            &[b'x'; 256],
        ] {
            assert_eq!(
                lookup(&mut srv, ROOT, bad).unwrap_err(),
                -libc::EINVAL,
                "{bad:?}"
            );
        }
        // A name without its NUL is refused, not read past.
        assert_eq!(call(&mut srv, abi::LOOKUP, ROOT, b"file").0, -libc::EINVAL);
        // The same checks guard every call that takes a name.
        let mut args = abi::MkdirIn {
            mode: 0o755,
            umask: 0,
        }
        .as_slice()
        .to_vec();
        args.extend(named(b".."));
        assert_eq!(call(&mut srv, abi::MKDIR, ROOT, &args).0, -libc::EINVAL);
        let mut args = abi::RenameIn { newdir: ROOT }.as_slice().to_vec();
        args.extend(named(b"file"));
        args.extend(named(b"../stolen"));
        assert_eq!(call(&mut srv, abi::RENAME, ROOT, &args).0, -libc::EINVAL);
        assert!(s.outside_untouched());
        assert!(!s.0.join("stolen").exists());
    }

    #[test]
    fn symlinks_are_never_followed_on_the_host() {
        let s = Scratch::new("links");
        std::os::unix::fs::symlink(s.0.join("outside"), s.share().join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside", s.share().join("rel")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root", s.share().join("proc")).unwrap();
        std::os::unix::fs::symlink("..", s.share().join("up")).unwrap();
        let mut srv = server(&s, false);
        for name in [&b"abs"[..], b"rel", b"proc", b"up"] {
            let e = lookup(&mut srv, ROOT, name).unwrap();
            assert_eq!(e.attr.mode & S_IFMT, S_IFLNK);
            // Opening a symlink inode fails; the guest resolves links itself.
            assert_eq!(
                open(&mut srv, e.nodeid, g::O_RDWR).unwrap_err(),
                -libc::ELOOP
            );
            // A symlink is no directory to look up in or create in.
            assert!(lookup(&mut srv, e.nodeid, b"outside").is_err());
            assert!(create(&mut srv, e.nodeid, b"planted", 0o644).is_err());
            let sa = abi::SetattrIn {
                valid: abi::FATTR_MODE,
                mode: 0o777,
                ..Default::default()
            };
            assert_ne!(call(&mut srv, abi::SETATTR, e.nodeid, sa.as_slice()).0, 0);
            let sa = abi::SetattrIn {
                valid: abi::FATTR_SIZE,
                size: 0,
                ..Default::default()
            };
            assert_ne!(call(&mut srv, abi::SETATTR, e.nodeid, sa.as_slice()).0, 0);
            // Hard-linking the symlink makes another symlink, not a link to
            // its target.
            let mut args = abi::LinkIn {
                oldnodeid: e.nodeid,
            }
            .as_slice()
            .to_vec();
            args.extend(named(b"hard"));
            if call(&mut srv, abi::LINK, ROOT, &args).0 == 0 {
                let meta = std::fs::symlink_metadata(s.share().join("hard")).unwrap();
                assert!(meta.file_type().is_symlink());
                std::fs::remove_file(s.share().join("hard")).unwrap();
            }
        }
        let rel = lookup(&mut srv, ROOT, b"rel").unwrap().nodeid;
        let (err, target) = call(&mut srv, abi::READLINK, rel, &[]);
        assert_eq!((err, target), (0, b"../outside".to_vec()));
        assert!(s.outside_untouched());
        assert!(!s.0.join("planted").exists());
    }

    #[test]
    fn read_only_shares_refuse_changes() {
        let s = Scratch::new("ro");
        let mut srv = server(&s, true);
        let file = lookup(&mut srv, ROOT, b"file").unwrap().nodeid;
        assert_eq!(open(&mut srv, file, g::O_WRONLY).unwrap_err(), -libc::EROFS);
        assert_eq!(
            open(&mut srv, file, g::O_RDONLY | g::O_TRUNC).unwrap_err(),
            -libc::EROFS
        );
        let fh = open(&mut srv, file, g::O_RDONLY).unwrap();
        assert_eq!(write(&mut srv, fh, 0, b"x").0, -libc::EROFS);
        assert_eq!(
            create(&mut srv, ROOT, b"new", 0o644).unwrap_err(),
            -libc::EROFS
        );
        let sa = abi::SetattrIn {
            valid: abi::FATTR_SIZE,
            ..Default::default()
        };
        assert_eq!(
            call(&mut srv, abi::SETATTR, file, sa.as_slice()).0,
            -libc::EROFS
        );
        assert_eq!(
            call(&mut srv, abi::UNLINK, ROOT, &named(b"file")).0,
            -libc::EROFS
        );
        assert_eq!(std::fs::read(s.share().join("file")).unwrap(), b"hello");
        assert_eq!(read(&mut srv, fh, 0, 10), (0, b"hello".to_vec()));
    }

    #[test]
    fn no_device_nodes_whiteouts_or_set_id_bits() {
        let s = Scratch::new("nodes");
        let mut srv = server(&s, false);
        let mut args = abi::MknodIn {
            // S_IFBLK.
            mode: 0o060_000 | 0o666,
            rdev: 0x0800,
            ..Default::default()
        }
        .as_slice()
        .to_vec();
        args.extend(named(b"sda"));
        assert_eq!(call(&mut srv, abi::MKNOD, ROOT, &args).0, -libc::EPERM);
        let mut args = abi::Rename2In {
            newdir: ROOT,
            flags: g::RENAME_WHITEOUT,
            padding: 0,
        }
        .as_slice()
        .to_vec();
        args.extend(named(b"file"));
        args.extend(named(b"other"));
        assert_eq!(call(&mut srv, abi::RENAME2, ROOT, &args).0, -libc::EINVAL);
        let (node, _) = create(&mut srv, ROOT, b"suid", 0o4755 | 0o2000).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.share().join("suid"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        let sa = abi::SetattrIn {
            valid: abi::FATTR_MODE,
            mode: 0o6777,
            ..Default::default()
        };
        assert_eq!(call(&mut srv, abi::SETATTR, node, sa.as_slice()).0, 0);
        let mode = std::fs::metadata(s.share().join("suid"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o777);
        // Only user.* extended attributes can be set.
        for (name, want) in [
            (&b"security.capability"[..], -libc::EPERM),
            (b"trusted.x", -libc::EPERM),
        ] {
            let mut args = abi::SetxattrIn { size: 4, flags: 0 }.as_slice().to_vec();
            args.extend(named(name));
            args.extend_from_slice(b"\x01\0\0\x02");
            assert_eq!(call(&mut srv, abi::SETXATTR, node, &args).0, want);
        }
        let mut args = abi::SetxattrIn { size: 2, flags: 0 }.as_slice().to_vec();
        args.extend(named(b"user.ok"));
        args.extend_from_slice(b"hi");
        assert_eq!(call(&mut srv, abi::SETXATTR, node, &args).0, 0);
    }

    /// Runs `f` on another thread and fails the test if it does not finish
    /// in 20 s (a blocking open would otherwise hang the test forever).
    fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{what} blocked for 20 s"))
    }

    #[test]
    fn fifos_and_device_nodes_in_the_share_are_never_opened() {
        let s = Scratch::new("special");
        let fifo = CString::new(s.share().join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
        // A device node: Linux's /dev/null (1, 3).
        #[cfg(target_os = "linux")]
        let have_dev = {
            let dev = CString::new(s.share().join("null").as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid path string.
            unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) == 0 }
        };
        #[cfg(not(target_os = "linux"))]
        let have_dev = false;
        if !have_dev {
            eprintln!("device-node part skipped: mknod needs CAP_MKNOD (run the tests as root)");
        }
        std::fs::write(s.share().join("plain"), b"old").unwrap();
        let names: &[&[u8]] = if have_dev {
            &[b"fifo", b"null"]
        } else {
            &[b"fifo"]
        };
        let names: Vec<Vec<u8>> = names.iter().map(|n| n.to_vec()).collect();
        let share = s.share();
        let outcome = within_deadline("opening a FIFO or device node", move || {
            let mut srv = server_at(&share, false);
            let mut errors = Vec::new();
            for name in &names {
                for flags in [
                    g::O_RDONLY | g::O_CREAT,
                    g::O_WRONLY | g::O_CREAT | g::O_TRUNC,
                    g::O_RDWR | g::O_CREAT | g::O_NONBLOCK,
                ] {
                    errors.push(create_with(&mut srv, ROOT, name, 0o644, flags).map(|_| ()));
                }
                errors.push(
                    create_with(
                        &mut srv,
                        ROOT,
                        name,
                        0o644,
                        g::O_RDWR | g::O_CREAT | g::O_EXCL,
                    )
                    .map(|_| ()),
                );
                let node = lookup(&mut srv, ROOT, name).unwrap().nodeid;
                for flags in [g::O_RDONLY, g::O_WRONLY, g::O_RDWR | g::O_NONBLOCK] {
                    errors.push(open(&mut srv, node, flags).map(|_| ()));
                }
            }
            // An existing regular file is opened (and truncated) as asked.
            let plain = create_with(
                &mut srv,
                ROOT,
                b"plain",
                0o644,
                g::O_WRONLY | g::O_CREAT | g::O_TRUNC,
            );
            (errors, plain.is_ok())
        });
        let (errors, plain_ok) = outcome;
        for (i, e) in errors.iter().enumerate() {
            let want = if i % 7 == 3 {
                -libc::EEXIST
            } else {
                -libc::EACCES
            };
            assert_eq!(*e, Err(want), "attempt {i}");
        }
        assert!(plain_ok);
        assert_eq!(std::fs::read(s.share().join("plain")).unwrap(), b"");
    }

    #[test]
    fn malformed_requests_get_errors() {
        let s = Scratch::new("hostile");
        let mut srv = server(&s, false);
        // Header length past the buffer, or shorter than the header.
        assert_eq!(
            call_raw(&mut srv, abi::GETATTR, ROOT, &[0; 16], Some(4096), 4096).0,
            -libc::EINVAL
        );
        assert_eq!(
            call_raw(&mut srv, abi::GETATTR, ROOT, &[0; 16], Some(8), 4096).0,
            -libc::EINVAL
        );
        // A request shorter than a header gets no reply at all.
        let mut req = [vec![0u8; 10]];
        let mut reply = [vec![0u8; 64]];
        assert_eq!(
            srv.handle(
                &IoBuf::from_vecs(&mut req),
                &mut IoBuf::from_vecs(&mut reply)
            ),
            0
        );
        // Unknown opcodes, unknown nodes and handles.
        assert_eq!(call(&mut srv, 9999, ROOT, &[]).0, -libc::ENOSYS);
        assert_eq!(
            call(&mut srv, abi::GETATTR, 12345, &[0; 16]).0,
            -libc::ESTALE
        );
        assert_eq!(read(&mut srv, 999, 0, 10).0, -libc::EBADF);
        // Truncated arguments.
        assert_eq!(call(&mut srv, abi::READ, ROOT, &[0; 8]).0, -libc::EINVAL);
        // A WRITE claiming more data than it carries.
        let (_, fh) = create(&mut srv, ROOT, b"w", 0o644).unwrap();
        let w = abi::WriteIn {
            fh,
            size: 1 << 19,
            ..Default::default()
        };
        let mut args = w.as_slice().to_vec();
        args.extend_from_slice(b"tiny");
        assert_eq!(call(&mut srv, abi::WRITE, 0, &args).0, -libc::EINVAL);
        let w = abi::WriteIn {
            fh,
            size: u32::MAX,
            ..Default::default()
        };
        assert_eq!(call(&mut srv, abi::WRITE, 0, w.as_slice()).0, -libc::EINVAL);
        // Offsets past what a file can have.
        assert_ne!(write(&mut srv, fh, u64::MAX - 1, b"x").0, 0);
        assert_ne!(read(&mut srv, fh, u64::MAX, 10).0, 0);
        // A huge READ is clipped to the reply buffer.
        assert_eq!(write(&mut srv, fh, 0, &[7u8; 5000]).0, 0);
        let (err, body) = call_raw(
            &mut srv,
            abi::READ,
            0,
            abi::ReadIn {
                fh,
                size: u32::MAX,
                ..Default::default()
            }
            .as_slice(),
            None,
            16 + 100,
        );
        assert_eq!((err, body.len()), (0, 100));
        // A reply buffer too small for the answer: an error, not an overrun.
        let (err, _) = call_raw(&mut srv, abi::GETATTR, ROOT, &[0; 16], None, 20);
        assert_eq!(err, -libc::ERANGE);
        // Too many arguments.
        assert_eq!(
            call(&mut srv, abi::LOOKUP, ROOT, &vec![b'a'; 200_000]).0,
            -libc::E2BIG
        );
        // Forgetting unknown nodes or too much is harmless; the root stays.
        let f = abi::ForgetIn { nlookup: u64::MAX };
        assert_eq!(call(&mut srv, abi::FORGET, ROOT, f.as_slice()).0, i32::MIN);
        assert_eq!(call(&mut srv, abi::FORGET, 4242, f.as_slice()).0, i32::MIN);
        let b = abi::BatchForgetIn {
            count: u32::MAX,
            dummy: 0,
        };
        assert_eq!(
            call(&mut srv, abi::BATCH_FORGET, 0, b.as_slice()).0,
            i32::MIN
        );
        assert_eq!(call(&mut srv, abi::GETATTR, ROOT, &[0; 16]).0, 0);
    }

    #[test]
    fn saved_inodes_and_handles_reopen_in_a_new_server() {
        let s = Scratch::new("save");
        std::fs::write(s.share().join("sub/inner"), b"inner").unwrap();
        let mut srv = server(&s, false);
        let sub = lookup(&mut srv, ROOT, b"sub").unwrap().nodeid;
        let inner = lookup(&mut srv, sub, b"inner").unwrap().nodeid;
        let fh = open(&mut srv, inner, g::O_RDWR).unwrap();
        let gone = lookup(&mut srv, ROOT, b"file").unwrap().nodeid;
        std::fs::remove_file(s.share().join("file")).unwrap();
        let mut state = srv.fs().save();
        assert_eq!(state.inodes.len(), 2, "{state:?}");
        // A hostile or stale state cannot point outside the share.
        state.inodes.push(passthrough::SavedInode {
            id: 900,
            path: "../outside".into(),
            lookups: 1,
        });
        state.inodes.push(passthrough::SavedInode {
            id: 901,
            path: s.0.join("outside"),
            lookups: 1,
        });
        let mut copy = Server::new(PassthroughFs::new(&s.share(), false).unwrap());
        copy.fs_mut().restore(&state);
        assert_eq!(read(&mut copy, fh, 0, 100), (0, b"inner".to_vec()));
        assert_eq!(lookup(&mut copy, sub, b"inner").unwrap().nodeid, inner);
        assert_eq!(
            call(&mut copy, abi::GETATTR, gone, &[0; 16]).0,
            -libc::ESTALE
        );
        assert_eq!(
            call(&mut copy, abi::GETATTR, 900, &[0; 16]).0,
            -libc::ESTALE
        );
        assert_eq!(
            call(&mut copy, abi::GETATTR, 901, &[0; 16]).0,
            -libc::ESTALE
        );
        // New nodeids do not collide with the restored ones.
        let (new, _) = create(&mut copy, ROOT, b"again", 0o644).unwrap();
        assert!(new > inner);
    }

    #[test]
    fn forgotten_inodes_release_their_descriptors() {
        let s = Scratch::new("forget");
        let mut srv = server(&s, false);
        let a = lookup(&mut srv, ROOT, b"file").unwrap().nodeid;
        let b = lookup(&mut srv, ROOT, b"file").unwrap().nodeid;
        assert_eq!(a, b);
        assert_eq!(srv.fs().counts().0, 2);
        let f = abi::ForgetIn { nlookup: 1 };
        call(&mut srv, abi::FORGET, a, f.as_slice());
        assert_eq!(srv.fs().counts().0, 2);
        call(&mut srv, abi::FORGET, a, f.as_slice());
        assert_eq!(srv.fs().counts().0, 1);
        assert_eq!(call(&mut srv, abi::GETATTR, a, &[0; 16]).0, -libc::ESTALE);
    }
}
