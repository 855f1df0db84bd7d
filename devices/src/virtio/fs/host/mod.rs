//! The host calls behind a share, per OS: how an inode is held without
//! I/O access, opened for I/O, found again by path, linked, changed and
//! listed. Linux: `O_PATH` descriptors, `/proc/self/fd` and `openat2`.
//! macOS: `O_EVTONLY` descriptors, `F_GETPATH` with `O_NOFOLLOW_ANY` and a
//! check that the same file was opened, and a walk one component at a
//! time. The confinement rules they keep are in docs/security.md
//! ("Shared folders") and docs/macos.md.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;
#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
pub use macos::*;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

// The file-type and set-ID bits, as POSIX numbers them (a host's libc may
// give them another integer type: macOS's are 16 bits).
pub const S_IFMT: u32 = 0o170_000;
pub const S_IFSOCK: u32 = 0o140_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFIFO: u32 = 0o010_000;
pub const S_ISUID: u32 = 0o4000;
pub const S_ISGID: u32 = 0o2000;

/// What `read_dir` calls per entry: (inode, the cookie after it, type,
/// name); false stops the listing.
pub type EachEntry<'a> = dyn FnMut(u64, u64, u8, &[u8]) -> bool + 'a;

/// The mode of `st` (type and permission bits).
// st_mode is 32 bits on Linux, 16 on macOS.
#[allow(clippy::unnecessary_cast)]
pub fn mode(st: &libc::stat) -> u32 {
    st.st_mode as u32
}

/// The identity of the file `st` describes: (device, inode).
#[allow(clippy::unnecessary_cast)]
pub fn key(st: &libc::stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

pub fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

pub fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `openat` with close-on-exec.
pub fn openat(
    dir: RawFd,
    name: &std::ffi::CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is a descriptor the caller owns (or AT_FDCWD) and
    // `name` a valid C string.
    let fd = check(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The share's statistics, from any descriptor on it.
// The statvfs fields' widths differ between hosts.
#[allow(clippy::unnecessary_cast)]
pub fn statfs(fd: RawFd) -> io::Result<super::abi::StatfsOut> {
    // SAFETY: zeroed statvfs is a valid value to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is the caller's and `st` writable.
    check(unsafe { libc::fstatvfs(fd, &mut st) })?;
    Ok(super::abi::StatfsOut {
        blocks: st.f_blocks as u64,
        bfree: st.f_bfree as u64,
        bavail: st.f_bavail as u64,
        files: st.f_files as u64,
        ffree: st.f_ffree as u64,
        bsize: st.f_bsize as u32,
        namelen: st.f_namemax as u32,
        frsize: st.f_frsize as u32,
        padding: 0,
        spare: [0; 6],
    })
}
