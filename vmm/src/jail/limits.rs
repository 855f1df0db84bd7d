//! What a jailed process may still do once its root is private: no
//! capabilities (none in the bounding or ambient sets either), no new
//! privileges through exec, resource limits, and Landlock rules that
//! allow only the exposed paths (where the kernel has Landlock).

use std::io;
use std::path::Path;

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

use super::{Error, Exposed, Plan};

/// The Landlock ABI whose rights the jail asks for: the rules are written
/// for it, and an older kernel enforces what it knows of them.
const LANDLOCK_ABI: ABI = ABI::V5;

/// Descriptors a jailed VMM may hold (its soft limit is raised to this).
const MAX_OPEN_FILES: u64 = 1 << 16;
/// Locked memory: the VMM locks none.
const MAX_LOCKED_MEMORY: u64 = 64 << 10;

/// Sets the resource limits: `plan`'s file size, and the jail's own for
/// locked memory and open files.
pub fn set_rlimits(plan: &Plan) -> Result<(), Error> {
    for (resource, value, name) in [
        (libc::RLIMIT_FSIZE, plan.max_file_size, "file size"),
        (libc::RLIMIT_MEMLOCK, MAX_LOCKED_MEMORY, "locked memory"),
    ] {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads one valid rlimit.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(Error::Setup {
                what: format!("set the {name} limit"),
                source: io::Error::last_os_error(),
            });
        }
    }
    // Open files: the hard limit stays what it is (the VMM raises its soft
    // limit to it), never above the jail's cap.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_max > MAX_OPEN_FILES {
            lim.rlim_max = MAX_OPEN_FILES;
            lim.rlim_cur = lim.rlim_cur.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(Error::Setup {
                    what: "set the open-file limit".into(),
                    source: io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

/// Restricts file access to the exposed paths (inside the jail, where
/// they have their host paths), `/tmp` and `/proc`. Returns the Landlock
/// status for the log: a kernel without Landlock still runs the jail.
pub fn landlock(plan: &Plan) -> Result<RulesetStatus, Error> {
    let mut ro = vec![Path::new("/proc")];
    let mut rw = vec![Path::new("/tmp")];
    for e in &plan.exposed {
        match e {
            Exposed::ReadOnly(p) => ro.push(p),
            Exposed::ReadWrite(p) | Exposed::Device(p) => rw.push(p),
        }
    }
    restrict_paths(ro, rw)
}

/// Lets the calling process (and what it starts) reach only `ro` (read)
/// and `rw` (every right) and what is beneath them.
pub fn restrict_paths(ro: Vec<&Path>, rw: Vec<&Path>) -> Result<RulesetStatus, Error> {
    let abi = LANDLOCK_ABI;
    let read = AccessFs::from_read(abi);
    let all = AccessFs::from_all(abi);
    let err = |e: landlock::RulesetError| Error::Landlock(e.to_string());
    let status = Ruleset::default()
        .handle_access(all)
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(ro, read))
        .map_err(err)?
        .add_rules(path_beneath_rules(rw, all))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(status.ruleset)
}

/// Drops every capability: effective, permitted, inheritable, ambient and
/// bounding; and sets no_new_privs, so no exec gets any back.
pub fn drop_privileges() -> Result<(), Error> {
    let fail = |what: &str| Error::Setup {
        what: what.into(),
        source: io::Error::last_os_error(),
    };
    // SAFETY: prctl with integer arguments only.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(fail("set no_new_privs"));
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return Err(fail("clear the ambient capabilities"));
        }
        // Capabilities past the kernel's last one answer EINVAL.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(fail("drop the bounding capabilities"));
            }
        }
    }
    // capset(2), version 3: two 32-bit words per set, all zero.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a valid version-3 header and two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(fail("drop the capabilities"));
    }
    Ok(())
}
