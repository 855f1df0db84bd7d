//! The guest's identity: a machine id (`/etc/machine-id`) and a hostname
//! (`sandbox-` and the machine id's first 8 digits), made at boot and
//! made again when the VM was forked or restored (after the random
//! generator is reseeded), so no two sandboxes share them; and the network
//! interface's MAC address, which the host picks for a copy of a VM.
//!
//! The two files live in memory (`/run/vmm-identity`, bound over the ones
//! in `/etc` at boot): renewing them after a restore writes no root disk,
//! whose file system work was most of a template start's renewal.

use std::io::{self, Read};

/// Where the identity files are kept.
const DIR: &str = "/run/vmm-identity";
/// The files in /etc, each bound to its namesake in [`DIR`].
const FILES: [&str; 2] = ["machine-id", "hostname"];

/// At boot: binds the memory-backed identity files over /etc's. Where an
/// /etc file cannot be made (a read-only root disk without it), it stays
/// the image's.
pub fn set_up() -> io::Result<()> {
    std::fs::create_dir_all(DIR)?;
    for name in FILES {
        let kept = format!("{DIR}/{name}");
        let etc = format!("/etc/{name}");
        std::fs::write(&kept, "")?;
        // A symlink (to a daemon's file) would be bound through: it is
        // replaced with a file.
        let regular = std::fs::symlink_metadata(&etc).is_ok_and(|m| m.is_file());
        if !regular {
            let _ = std::fs::remove_file(&etc);
            let _ = std::fs::write(&etc, "");
        }
        if let Err(e) = super::sys_mount(&kept, &etc, "", libc::MS_BIND) {
            eprintln!("vmm-init: {etc} stays the root disk's (cannot bind {kept} over it: {e})");
        }
    }
    Ok(())
}

/// Makes a new machine id and hostname; returns the hostname.
/// Fails only when the hostname cannot be set.
pub fn renew() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let hostname = format!("sandbox-{}", &id[..8]);
    // SAFETY: the pointer and length describe `hostname`'s bytes.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Without the files (their folder could not be made at boot) the
    // hostname is still set.
    let _ = std::fs::write(format!("{DIR}/machine-id"), format!("{id}\n"));
    let _ = std::fs::write(format!("{DIR}/hostname"), format!("{hostname}\n"));
    Ok(hostname)
}

/// Moves the VM's network interface (the one the virtio-net driver runs)
/// to `mac` (six hex bytes, `02:...`).
pub fn set_mac(mac: &str) -> io::Result<()> {
    let bytes = vmm_agent::parse_mac(mac).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{mac:?} is not a MAC address"),
        )
    })?;
    let name = virtio_interface()?;
    // SAFETY: an all-zero ifreq is valid (a name and a zeroed union).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::other(format!(
            "interface name {name:?} is too long"
        )));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: the union's hardware-address member is the one SIOCSIFHWADDR
    // reads; writing it has no other effect.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(bytes) {
            *d = s as libc::c_char;
        }
    }
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned here alone.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCSIFHWADDR reads one ifreq, which `req` is.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCSIFHWADDR as _,
            &req,
        )
    };
    if r != 0 {
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
