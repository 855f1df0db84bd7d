//! A container process's capability sets (`vmm_agent::Capabilities`), as
//! runc applies an OCI spec's: the bounding set dropped to the spec's
//! before the process changes user (keeping its capabilities across that
//! change), then its effective, permitted and inheritable sets and its
//! ambient capabilities set after. The names are checked and turned into
//! bit masks before the fork ([`Sets::new`]); the child only makes system
//! calls.

use std::io;

use vmm_agent::Capabilities;

use super::isolation::check;

/// The capabilities by number (linux/capability.h), up to Linux 6.1's
/// last.
const NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// capset(2)'s version 3 (two 32-bit words per set).
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The sets as bit masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sets {
    bounding: u64,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    ambient: u64,
}

fn mask(names: &[String]) -> io::Result<u64> {
    names.iter().try_fold(0u64, |m, name| {
        let bit = NAMES.iter().position(|n| n == name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown capability {name:?}"),
            )
        })?;
        Ok(m | 1 << bit)
    })
}

impl Sets {
    pub fn new(c: &Capabilities) -> io::Result<Sets> {
        Ok(Sets {
            bounding: mask(&c.bounding)?,
            effective: mask(&c.effective)?,
            permitted: mask(&c.permitted)?,
            inheritable: mask(&c.inheritable)?,
            ambient: mask(&c.ambient)?,
        })
    }

    /// In the child, before it changes user: drops from the bounding set
    /// what it does not hold, and keeps the capabilities across the
    /// change of user. Async-signal-safe.
    pub fn limit(&self) -> io::Result<()> {
        for cap in 0..64 {
            if self.bounding & 1 << cap != 0 {
                continue;
            }
            // SAFETY: prctl(2) with an integer capability number.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                let e = io::Error::last_os_error();
                // Past the kernel's last capability.
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(e);
            }
        }
        // SAFETY: prctl(2) with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) })
    }

    /// In the child, after it changed user: its effective, permitted and
    /// inheritable sets, then its ambient capabilities. Async-signal-safe.
    pub fn set(&self) -> io::Result<()> {
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let word = |m: u64, i: u32| (m >> (32 * i)) as u32;
        let data = [0, 1].map(|i| Data {
            effective: word(self.effective, i),
            permitted: word(self.permitted, i),
            inheritable: word(self.inheritable, i),
        });
        // SAFETY: capset(2) with a version-3 header and its two data
        // structures, which outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        check(rc as libc::c_int)?;
        for cap in 0..64 {
            if self.ambient & 1 << cap == 0 {
                continue;
            }
            let raise = libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong;
            // SAFETY: prctl(2) with integer arguments.
            check(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, raise, cap, 0, 0) })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_their_bits() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = Capabilities {
            bounding: names(&["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_CHECKPOINT_RESTORE"]),
            effective: names(&["CAP_KILL"]),
            ..Default::default()
        };
        let s = Sets::new(&c).unwrap();
        assert_eq!(s.bounding, 1 | 1 << 21 | 1 << 40);
        assert_eq!((s.effective, s.permitted, s.ambient), (1 << 5, 0, 0));
        let bad = Capabilities {
            ambient: names(&["CAP_FLY"]),
            ..Default::default()
        };
        let e = Sets::new(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown capability \"CAP_FLY\""), "{e}");
    }
}
