//! The guest's identity: a machine id (`/etc/machine-id`) and a hostname
//! (`sandbox-` and the machine id's first 8 digits), made at boot and
//! made again when the VM was forked or restored (after the random
//! generator is reseeded), so no two sandboxes share them.

use std::io::{self, Read};

/// Makes a new machine id and hostname; returns the hostname. The
/// hostname is set even where the files cannot be written (a read-only
/// root disk: they stay the image's).
pub fn renew() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let hostname = format!("sandbox-{}", &id[..8]);
    // SAFETY: the pointer and length describe `hostname`'s bytes.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // On a read-only root disk the files stay the image's. A symlink
    // would be written through: it is replaced with a file.
    let _ = std::fs::remove_file("/etc/machine-id");
    let _ = std::fs::write("/etc/machine-id", format!("{id}\n"));
    let _ = std::fs::write("/etc/hostname", format!("{hostname}\n"));
    Ok(hostname)
}
