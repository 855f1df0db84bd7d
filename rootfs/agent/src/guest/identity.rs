//! The guest's identity: a machine id (`/etc/machine-id`) and a hostname
//! (`sandbox-` and the machine id's first 8 digits), made at boot and
//! made again when the VM was forked or restored (after the random
//! generator is reseeded), so no two sandboxes share them (the network
//! interface's address is `interface`'s).
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
        if let Err(e) = vmm_agent::mount::mount(&kept, &etc, "", libc::MS_BIND, "") {
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
