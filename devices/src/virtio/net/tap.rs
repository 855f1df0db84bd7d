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
    #[error("cannot make TAP interface {name} {what}: {source}; it needs CAP_NET_ADMIN")]
    Persist {
        name: String,
        what: &'static str,
        source: io::Error,
    },
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
#[cfg(target_os = "linux")]
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
#[cfg(target_os = "linux")]
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;

/// An open TAP interface.
pub struct Tap {
    file: File,
    name: String,
    /// The interface's MTU when opened (the guest's, offered as
    /// VIRTIO_NET_F_MTU).
    mtu: Option<u16>,
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
            mtu: interface_mtu(&req.name),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keeps the interface when closed, for `owner` (a user id) to attach
    /// to without privileges: a TAP made ready for a jailed VMM.
    #[cfg(target_os = "linux")]
    pub fn persist(&self, owner: u32) -> Result<(), Error> {
        self.set(TUNSETOWNER, owner as libc::c_ulong, "owned by that user")?;
        self.set(TUNSETPERSIST, 1, "persistent")
    }

    /// Ends a persistent interface's persistence: it goes once closed.
    #[cfg(target_os = "linux")]
    pub fn remove(self) -> Result<(), Error> {
        self.set(TUNSETPERSIST, 0, "temporary")
    }

    #[cfg(target_os = "linux")]
    fn set(
        &self,
        request: libc::c_ulong,
        value: libc::c_ulong,
        what: &'static str,
    ) -> Result<(), Error> {
        // SAFETY: TUNSETOWNER and TUNSETPERSIST take their value as the
        // argument itself; no memory is passed.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request as _, value) };
        if rc < 0 {
            return Err(Error::Persist {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// The MTU of the interface named by `name` (an ifreq name), if it can be
/// read.
#[cfg(target_os = "linux")]
fn interface_mtu(name: &[u8; libc::IFNAMSIZ]) -> Option<u16> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just opened and is owned here alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into one
    // ifreq, which `req` is.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU as _, &mut req) } != 0 {
        return None;
    }
    // SAFETY: SIOCGIFMTU filled the union's MTU member.
    u16::try_from(unsafe { req.ifr_ifru.ifru_mtu }).ok()
}

impl NetBackend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn mtu(&self) -> Option<u16> {
        self.mtu
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
