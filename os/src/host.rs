//! Small host services: random bytes and a socket peer's user.

use std::io;
use std::os::fd::RawFd;

/// Fills `buf` from the host's random generator.
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let mut filled = 0;
        while filled < buf.len() {
            let rest = &mut buf[filled..];
            // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n > 0 {
                filled += n as usize;
            } else {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        fill_with_getentropy(buf)
    }
}

/// macOS's way (also glibc's, where the tests run it).
#[cfg(any(not(target_os = "linux"), all(test, target_env = "gnu")))]
fn fill_with_getentropy(buf: &mut [u8]) -> io::Result<()> {
    // getentropy gives at most 256 bytes a call.
    for chunk in buf.chunks_mut(256) {
        // SAFETY: writes `chunk.len()` (at most 256) bytes into `chunk`.
        if unsafe { libc::getentropy(chunk.as_mut_ptr().cast(), chunk.len()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The user id of the process at the other end of Unix socket `fd`.
pub fn peer_uid(fd: RawFd) -> io::Result<u32> {
    #[cfg(target_os = "linux")]
    {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.uid)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (mut uid, mut gid) = (0, 0);
        // SAFETY: writes the two ids into live locals.
        if unsafe { libc::getpeereid(fd, &mut uid, &mut gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn random_bytes_fill_large_buffers() {
        type Fill = fn(&mut [u8]) -> io::Result<()>;
        for fill in [fill_random as Fill, fill_with_getentropy] {
            // Past getentropy's 256 bytes a call.
            let mut a = vec![0u8; 1000];
            let mut b = vec![0u8; 1000];
            fill(&mut a).unwrap();
            fill(&mut b).unwrap();
            assert_ne!(a, b);
            assert!(a[900..].iter().any(|&x| x != 0));
        }
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_us() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(peer_uid(a.as_raw_fd()).unwrap(), unsafe { libc::geteuid() });
    }
}
