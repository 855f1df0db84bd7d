//! The VM's network interface (the one the virtio-net driver runs) as a
//! copy of a VM finds it: the host picks its MAC address, and on a TAP
//! link its IPv4 address and default route (a sandbox started from a
//! template joins a network the template never saw, such as a pod's).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::{io, mem};

/// What a copy of a VM's interface changes to (a `reseed` request's).
#[derive(Debug, Default)]
pub struct Link<'a> {
    /// Six hex bytes, `02:...`.
    pub mac: Option<&'a str>,
    /// "a.b.c.d/len", with the default gateway.
    pub address: Option<&'a str>,
    pub gateway: Option<&'a str>,
    pub mtu: Option<u16>,
}

/// Moves the interface to `link`. A guest that moved or renamed its
/// interface away keeps its MAC address and starts anyway (the user
/// network follows any); an address (a TAP link's, the network's to give)
/// or MTU that cannot be set fails: the sandbox would be unreachable.
pub fn apply(link: &Link) -> Result<(), String> {
    if let Err(e) = link.mac.map(set_mac).transpose() {
        eprintln!("vmm-agent: the network interface keeps its MAC address: {e}");
    }
    if let Some(mtu) = link.mtu {
        set_mtu(mtu)
            .map_err(|e| format!("cannot set the network interface's MTU to {mtu}: {e}"))?;
    }
    if let Some(cidr) = link.address {
        set_address(cidr, link.gateway)
            .map_err(|e| format!("cannot give the network interface {cidr}: {e}"))?;
    }
    Ok(())
}

/// Moves the interface to `mac` (six hex bytes, `02:...`).
fn set_mac(mac: &str) -> io::Result<()> {
    let bytes = vmm_agent::parse_mac(mac)
        .ok_or_else(|| invalid(format!("{mac:?} is not a MAC address")))?;
    let mut req = request()?;
    // SAFETY: the union's hardware-address member is the one SIOCSIFHWADDR
    // reads; writing it has no other effect.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(bytes) {
            *d = s as libc::c_char;
        }
    }
    ioctl(&inet_socket()?, libc::SIOCSIFHWADDR, &req)
}

/// Sets the interface's MTU.
fn set_mtu(mtu: u16) -> io::Result<()> {
    let mut req = request()?;
    req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    ioctl(&inet_socket()?, libc::SIOCSIFMTU, &req)
}

/// Gives the interface the IPv4 address `cidr` ("a.b.c.d/len") in place
/// of its own, and a default route through `gateway` in place of any
/// other (none without one).
fn set_address(cidr: &str, gateway: Option<&str>) -> io::Result<()> {
    let (address, len) = parse_cidr(cidr).ok_or_else(|| {
        invalid(format!(
            "{cidr:?} is not an IPv4 address with a prefix length"
        ))
    })?;
    let gateway = gateway
        .map(|g| {
            g.parse::<Ipv4Addr>()
                .map_err(|_| invalid(format!("{g:?} is not an IPv4 address")))
        })
        .transpose()?;
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0));
    let sock = inet_socket()?;
    let mut req = request()?;
    // SAFETY: the union's address member is what SIOCSIFADDR and
    // SIOCSIFNETMASK read; it is as large as a sockaddr_in.
    unsafe { write_inet(&mut req.ifr_ifru.ifru_addr, address) };
    // The interface's address replaced (with the routes of its subnet).
    ioctl(&sock, libc::SIOCSIFADDR, &req)?;
    // SAFETY: as above.
    unsafe { write_inet(&mut req.ifr_ifru.ifru_netmask, mask) };
    ioctl(&sock, libc::SIOCSIFNETMASK, &req)?;
    // Any default route (the template's gateway) goes; none left is the
    // kernel's ESRCH.
    loop {
        match ioctl(&sock, libc::SIOCDELRT, &default_route(None)) {
            Ok(()) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => break,
            Err(e) => return Err(e),
        }
    }
    match gateway {
        Some(g) => ioctl(&sock, libc::SIOCADDRT, &default_route(Some(g))),
        None => Ok(()),
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, len) = text.split_once('/')?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((address.parse().ok()?, len))
}

/// A route to 0.0.0.0/0, through `gateway` when given (the kernel matches
/// any gateway when deleting one without).
fn default_route(gateway: Option<Ipv4Addr>) -> libc::rtentry {
    // SAFETY: an all-zero rtentry is valid: no device, zero addresses.
    let mut route: libc::rtentry = unsafe { mem::zeroed() };
    // SAFETY: sockaddr and sockaddr_in are the same size on Linux.
    unsafe {
        write_inet(&mut route.rt_dst, Ipv4Addr::UNSPECIFIED);
        write_inet(&mut route.rt_genmask, Ipv4Addr::UNSPECIFIED);
        write_inet(
            &mut route.rt_gateway,
            gateway.unwrap_or(Ipv4Addr::UNSPECIFIED),
        );
    }
    route.rt_flags = libc::RTF_UP
        | if gateway.is_some() {
            libc::RTF_GATEWAY
        } else {
            0
        };
    route
}

/// Writes an AF_INET socket address into a `sockaddr` slot.
///
/// # Safety
/// `slot` must be at least as large as a `sockaddr_in` (a `sockaddr` is).
unsafe fn write_inet(slot: &mut libc::sockaddr, address: Ipv4Addr) {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the caller's promise: the slot holds a sockaddr_in.
    unsafe { std::ptr::write_unaligned((slot as *mut libc::sockaddr).cast(), inet) };
}

/// An ifreq naming the interface the virtio-net driver runs.
fn request() -> io::Result<libc::ifreq> {
    let name = virtio_interface()?;
    // SAFETY: an all-zero ifreq is valid (a name and a zeroed union).
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::other(format!(
            "interface name {name:?} is too long"
        )));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// The socket the interface ioctls go through.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned here alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An interface or routing ioctl that reads `arg`.
fn ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, arg: &T) -> io::Result<()> {
    // SAFETY: every request passed here (SIOCSIF*, SIOC*RT) reads one
    // struct of the type `arg` is and writes nothing through it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request as _, arg as *const T) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The name of the interface the virtio-net driver runs.
fn virtio_interface() -> io::Result<String> {
    for entry in std::fs::read_dir("/sys/class/net")? {
        let entry = entry?;
        let driver = std::fs::read_link(entry.path().join("device/driver"));
        if driver.is_ok_and(|d| d.ends_with("virtio_net")) {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no network interface is run by the virtio-net driver",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_prefixes_parse() {
        assert_eq!(
            parse_cidr("10.1.2.3/24"),
            Some((Ipv4Addr::new(10, 1, 2, 3), 24))
        );
        assert_eq!(
            parse_cidr("10.1.2.3/0"),
            Some((Ipv4Addr::new(10, 1, 2, 3), 0))
        );
        for bad in [
            "10.1.2.3",
            "10.1.2.3/33",
            "10.1.2/24",
            "x/24",
            "10.1.2.3/-1",
            "",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_default_route_has_its_gateway_and_flags() {
        let r = default_route(Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(r.rt_flags, libc::RTF_UP | libc::RTF_GATEWAY);
        // SAFETY: default_route wrote a sockaddr_in there.
        let gw: libc::sockaddr_in =
            unsafe { std::ptr::read_unaligned((&r.rt_gateway as *const libc::sockaddr).cast()) };
        assert_eq!(gw.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(
            u32::from_be(gw.sin_addr.s_addr),
            u32::from(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(default_route(None).rt_flags, libc::RTF_UP);
    }
}
