//! A TAP device as the network backend (`"network": {"mode": "tap"}`):
//! frames go to and come from a host interface the host bridges or routes.
//! Opening one needs CAP_NET_ADMIN, or a persistent TAP device created for
//! the VMM's user beforehand (`ip tuntap add NAME mode tap user USER`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use super::NetBackend;

/// Why a TAP device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TAP interface name {0:?} is not valid: use 1 to 15 characters without '/' or spaces")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}; load the tun module (modprobe tun)")]
    OpenTun(io::Error),
    #[error("cannot attach to TAP interface {name}: {source}; the VMM needs CAP_NET_ADMIN, or create it for this user first: ip tuntap add {name} mode tap user $USER")]
    Attach { name: String, source: io::Error },
    #[error("TAP interfaces exist on Linux only: on this host use the user network (\"network\": {{\"mode\": \"user\"}})")]
    NotOnThisHost,
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[cfg(target_os = "linux")]
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[cfg(target_os = "linux")]
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// An open TAP interface.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or, with CAP_NET_ADMIN, creates) the TAP interface
    /// `name`, non-blocking.
    pub fn open(name: &str) -> Result<Tap, Error> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(Error::BadName(name.to_string()));
        }
        Self::attach(name)
    }

    #[cfg(not(target_os = "linux"))]
    fn attach(_name: &str) -> Result<Tap, Error> {
        Err(Error::NotOnThisHost)
    }

    #[cfg(target_os = "linux")]
    fn attach(name: &str) -> Result<Tap, Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may write the name back into) an
        // ifreq-sized buffer, which `req` is.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(Error::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            // The interface's queue is full (or it is down): the frame is
            // lost, as on a real link.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for name in ["", "a/b", "with space", "sixteen-chars-xx"] {
            assert!(matches!(Tap::open(name), Err(Error::BadName(_))), "{name}");
        }
    }
}
