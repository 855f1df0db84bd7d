//! Unix sockets that only this process's user (and root) can use: the
//! VMM's control socket and vsock socket are how a VM is driven, so
//! another local user must neither connect to them nor plant one in
//! their place.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Listens at `path` with mode 0600 whatever the umask. A socket left at
/// `path` by this user (a VMM that died) is replaced; anything else there
/// (a file, another user's socket) is an error, never removed.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.file_type().is_socket() || meta.uid() != me {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket of this user; remove it or choose another path",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The user id of the process at the other end of `stream`.
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    vmm_os::peer_uid(stream.as_raw_fd())
}

/// Whether the peer of `stream` runs as this process's user or as root.
pub fn peer_is_trusted(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    matches!(peer_uid(stream), Ok(uid) if uid == me || uid == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_private_and_only_stale_sockets_are_replaced() {
        let dir = std::env::temp_dir().join(format!("vmm-unixsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let first = bind_private(&path);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(old) };
        let first = first.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let client = UnixStream::connect(&path).unwrap();
        let (server, _) = first.accept().unwrap();
        assert!(peer_is_trusted(&server));
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(peer_uid(&client).unwrap(), me);
        drop(first);
        // A stale socket of ours is replaced.
        bind_private(&path).unwrap();
        // A regular file is never removed.
        let file = dir.join("file");
        std::fs::write(&file, b"keep").unwrap();
        let err = bind_private(&file).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
