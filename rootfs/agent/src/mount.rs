//! Mounts as OCI runtime specs and containerd describe them (Linux): their
//! options split into what mount(2) takes, mount(2) itself and unmounting
//! a tree. Used by the guest agent (its boot and a container's mounts) and
//! by the containerd shim on the host.

use std::ffi::{CString, OsStr};
use std::io;

/// mount(2)'s flags, the propagation flags (a second call applies them)
/// and the file system's data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub flags: libc::c_ulong,
    pub propagation: libc::c_ulong,
    pub data: String,
}

impl Options {
    /// Splits `options` (`nosuid`, `ro`, `rbind`, `rprivate`, `mode=755`,
    /// `lowerdir=...`).
    pub fn parse(options: &[String]) -> Options {
        let mut out = Options::default();
        let mut data = Vec::new();
        for o in options {
            let (set, clear): (libc::c_ulong, libc::c_ulong) = match o.as_str() {
                "ro" => (libc::MS_RDONLY, 0),
                "rw" => (0, libc::MS_RDONLY),
                "nosuid" => (libc::MS_NOSUID, 0),
                "suid" => (0, libc::MS_NOSUID),
                "nodev" => (libc::MS_NODEV, 0),
                "dev" => (0, libc::MS_NODEV),
                "noexec" => (libc::MS_NOEXEC, 0),
                "exec" => (0, libc::MS_NOEXEC),
                "sync" => (libc::MS_SYNCHRONOUS, 0),
                "async" => (0, libc::MS_SYNCHRONOUS),
                "dirsync" => (libc::MS_DIRSYNC, 0),
                "noatime" => (libc::MS_NOATIME, 0),
                "atime" => (0, libc::MS_NOATIME),
                "nodiratime" => (libc::MS_NODIRATIME, 0),
                "diratime" => (0, libc::MS_NODIRATIME),
                "relatime" => (libc::MS_RELATIME, 0),
                "norelatime" => (0, libc::MS_RELATIME),
                "strictatime" => (libc::MS_STRICTATIME, 0),
                "bind" => (libc::MS_BIND, 0),
                "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
                "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave"
                | "unbindable" | "runbindable" => {
                    let recursive = match o.starts_with('r') {
                        true => libc::MS_REC,
                        false => 0,
                    };
                    out.propagation |= recursive
                        | match o.trim_start_matches('r') {
                            "private" => libc::MS_PRIVATE,
                            "shared" => libc::MS_SHARED,
                            "slave" => libc::MS_SLAVE,
                            _ => libc::MS_UNBINDABLE,
                        };
                    continue;
                }
                "defaults" => continue,
                _ => {
                    data.push(o.as_str());
                    continue;
                }
            };
            out.flags = (out.flags | set) & !clear;
        }
        out.data = data.join(",");
        out
    }
}

/// mount(2): `source` on `target`, a file system of type `fstype` with
/// `flags` and `data` (its options; none when empty). Empty `source` and
/// `fstype` are for binds, moves and propagation changes.
pub fn mount(
    source: impl AsRef<OsStr>,
    target: impl AsRef<OsStr>,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &OsStr| {
        CString::new(s.as_encoded_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (source, target) = (c(source.as_ref())?, c(target.as_ref())?);
    let (fstype, options) = (c(OsStr::new(fstype))?, c(OsStr::new(data))?);
    let data_ptr = match data.is_empty() {
        true => std::ptr::null(),
        false => options.as_ptr().cast(),
    };
    // SAFETY: mount(2) with NUL-terminated strings (or null data) that
    // outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Unmounts everything mounted at or under `root` in this mount
/// namespace, deepest first, detaching (a busy mount goes once unused).
pub fn unmount_under(root: &std::path::Path) -> std::io::Result<()> {
    use std::path::PathBuf;
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: umount2(2) on a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot unmount {}: {e}", p.display()),
            ));
        }
    }
    Ok(())
}

/// A mountinfo path with its octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mount_table_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\"), "/x\\");
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = Options::parse(&opts(&["nosuid", "strictatime", "mode=755", "size=65536k"]));
        assert_eq!(o.flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert_eq!(o.propagation, 0);
        assert_eq!(o.data, "mode=755,size=65536k");
        let o = Options::parse(&opts(&["rbind", "ro", "rprivate", "rw"]));
        assert_eq!(o.flags, libc::MS_BIND | libc::MS_REC);
        assert_eq!(o.propagation, libc::MS_PRIVATE | libc::MS_REC);
        assert_eq!(o.data, "");
        let o = Options::parse(&opts(&[
            "index=off",
            "lowerdir=/a:/b",
            "upperdir=/u",
            "workdir=/w",
        ]));
        assert_eq!(
            (o.flags, o.data.as_str()),
            (0, "index=off,lowerdir=/a:/b,upperdir=/u,workdir=/w")
        );
    }
}
