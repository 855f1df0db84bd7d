//! What this host lets a jail use: user namespaces (the jail's base, for
//! an unprivileged user too), Landlock and cgroup v2 delegation. Each
//! probe asks the kernel itself where it can, and says how to allow what
//! is missing.

#[cfg(target_os = "linux")]
use std::io;
#[cfg(target_os = "linux")]
use std::path::Path;
use std::path::PathBuf;

#[cfg(target_os = "linux")]
/// Namespaces a jail enters (the network namespace only for VMs without a
/// network, so it is not probed).
const JAIL_NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// Why the jail's namespaces cannot be made here, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this host does not let the VMM make its jail's namespaces ({why}): {fix}")]
pub struct NoNamespaces {
    pub why: String,
    pub fix: String,
}

/// Whether a process of this user can enter new user, mount, PID, IPC and
/// UTS namespaces: a child process tries it.
#[cfg(target_os = "linux")]
pub fn user_namespaces() -> Result<(), NoNamespaces> {
    match try_in_child(JAIL_NAMESPACES) {
        Ok(0) => Ok(()),
        Ok(errno) => Err(refusal(io::Error::from_raw_os_error(errno))),
        Err(e) => Err(NoNamespaces {
            why: format!("cannot start a probe process: {e}"),
            fix: "check the process limit (ulimit -u)".into(),
        }),
    }
}

/// Other hosts have no namespaces (and so no jail).
#[cfg(not(target_os = "linux"))]
pub fn user_namespaces() -> Result<(), NoNamespaces> {
    Err(not_on_this_host())
}

/// Why a host other than Linux has no jail.
#[cfg(not(target_os = "linux"))]
pub fn not_on_this_host() -> NoNamespaces {
    NoNamespaces {
        why: "namespaces exist on Linux only".into(),
        fix: "on this host the VMM runs without the jail: the hypervisor is the boundary \
              (docs/macos.md); leave the jail off"
            .into(),
    }
}

/// What to say when making the namespaces failed with `error`.
#[cfg(target_os = "linux")]
pub fn refusal(error: io::Error) -> NoNamespaces {
    NoNamespaces {
        why: format!("unshare of user, mount, PID, IPC and UTS namespaces failed: {error}"),
        fix: namespace_fix(Path::new("/proc/sys")),
    }
}

/// The sentence that says how to allow user namespaces, from the knobs
/// that forbid them (`sys` is /proc/sys, a parameter for tests).
#[cfg(target_os = "linux")]
fn namespace_fix(sys: &Path) -> String {
    let knob = |name: &str| -> Option<i64> {
        std::fs::read_to_string(sys.join(name))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    };
    if knob("user/max_user_namespaces") == Some(0) {
        return "user namespaces are turned off: allow them with `sysctl -w user.max_user_namespaces=15000` (as root; add it to /etc/sysctl.d/ to keep it)".into();
    }
    if knob("kernel/unprivileged_userns_clone") == Some(0) {
        return "unprivileged user namespaces are turned off: allow them with `sysctl -w kernel.unprivileged_userns_clone=1` (as root; add it to /etc/sysctl.d/ to keep it)".into();
    }
    if knob("kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        return "AppArmor restricts unprivileged user namespaces: give the vmm binary a profile that allows `userns,` (see docs/security.md), or `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` as root".into();
    }
    "the kernel knobs allow them, so something around this process forbids them (a container's seccomp profile or missing privileges): run the VMM where unshare(CLONE_NEWUSER) is allowed, for example outside the container or with a profile that allows it".into()
}

/// Forks a child that calls unshare(`flags`) and reports its errno (0 on
/// success) as its exit status.
#[cfg(target_os = "linux")]
fn try_in_child(flags: libc::c_int) -> io::Result<i32> {
    // SAFETY: the child only makes the async-signal-safe calls unshare,
    // __errno_location and _exit before it ends; the parent waits for it.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: as above, in the child.
        unsafe {
            let code = if libc::unshare(flags) == 0 {
                0
            } else {
                *libc::__errno_location() & 0xff
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for the child made above; `status` is a valid int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(io::Error::other("the probe process was killed"))
    }
}

/// The Landlock ABI version the kernel offers (None: no Landlock, because
/// the kernel lacks it or it is not among the enabled security modules).
#[cfg(target_os = "linux")]
pub fn landlock_abi() -> Option<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and
    // the VERSION flag only returns a number; nothing is read or written.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(abi).ok().filter(|&v| v > 0)
}

/// Other hosts have no Landlock.
#[cfg(not(target_os = "linux"))]
pub fn landlock_abi() -> Option<u32> {
    None
}

/// The controllers of the jail's cgroup limits.
pub const CGROUP_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Where this process could make a cgroup v2 of its own with the `needed`
/// controllers (the cgroup it is in), or why not.
#[cfg(not(target_os = "linux"))]
pub fn cgroup_delegation(_needed: &[&str]) -> Result<PathBuf, String> {
    Err("cgroups exist on Linux only".into())
}

/// Where this process could make a cgroup v2 of its own with the `needed`
/// controllers (the cgroup it is in), or why not.
#[cfg(target_os = "linux")]
pub fn cgroup_delegation(needed: &[&str]) -> Result<PathBuf, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    delegated_cgroup(&own, &mounts, needed, |p| {
        std::fs::read_to_string(p)
            .ok()
            .map(|t| t.trim().to_string())
    })
}

/// [`cgroup_delegation`] on the text of /proc/self/cgroup and
/// /proc/self/mountinfo, reading cgroup files with `read`.
#[cfg(target_os = "linux")]
fn delegated_cgroup(
    own: &str,
    mountinfo: &str,
    needed: &[&str],
    read: impl Fn(&Path) -> Option<String>,
) -> Result<PathBuf, String> {
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2 hierarchy (the host uses cgroup v1 only)")?;
    // mountinfo: id parent major:minor root mount-point options - type ...
    let mount = mountinfo
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .and_then(|l| l.split_whitespace().nth(4))
        .ok_or("no cgroup v2 file system is mounted")?;
    let dir = match path.trim_start_matches('/') {
        "" => PathBuf::from(mount),
        rel => Path::new(mount).join(rel),
    };
    let controllers = read(&dir.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|c| !controllers.split_whitespace().any(|x| x == *c))
        .collect();
    // A hybrid host: cgroup v1 hierarchies hold the controllers.
    let in_v1: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|c| {
            mountinfo.lines().any(|l| {
                l.split(" - ").nth(1).is_some_and(|t| {
                    t.starts_with("cgroup ")
                        && t.rsplit(' ')
                            .next()
                            .is_some_and(|o| o.split(',').any(|x| x == *c))
                })
            })
        })
        .collect();
    if !in_v1.is_empty() {
        return Err(format!(
            "cgroup v1 hierarchies hold the {} controller(s) (a hybrid host), so no cgroup v2 can have them; boot the host with systemd.unified_cgroup_hierarchy=1 to move them to cgroup v2",
            in_v1.join(", ")
        ));
    }
    if !missing.is_empty() {
        return Err(format!(
            "the cgroup {} does not offer the {} controller(s); systemd delegates them with `systemd-run --user --scope -p Delegate=yes vmm ...`",
            dir.display(),
            missing.join(", ")
        ));
    }
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| "the cgroup path holds a NUL byte")?;
    // SAFETY: access on a valid C string; nothing else is touched.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!(
            "the cgroup {} is not writable by this user; systemd delegates one with `systemd-run --user --scope -p Delegate=yes vmm ...`",
            dir.display()
        ));
    }
    Ok(dir)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_fix_names_the_knob_that_forbids_namespaces() {
        let dir = std::env::temp_dir().join(format!("vmm-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("user")).unwrap();
        std::fs::create_dir_all(dir.join("kernel")).unwrap();
        assert!(namespace_fix(&dir).contains("a container's seccomp profile"));
        std::fs::write(
            dir.join("kernel/apparmor_restrict_unprivileged_userns"),
            "1\n",
        )
        .unwrap();
        assert!(namespace_fix(&dir).contains("AppArmor"));
        std::fs::write(dir.join("kernel/unprivileged_userns_clone"), "0\n").unwrap();
        assert!(namespace_fix(&dir).contains("kernel.unprivileged_userns_clone=1"));
        std::fs::write(dir.join("user/max_user_namespaces"), "0\n").unwrap();
        assert!(namespace_fix(&dir).contains("user.max_user_namespaces"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn probes_answer_on_this_host() {
        // Whatever the answer, the probe neither hangs nor panics, and a
        // refusal carries a fix.
        if let Err(e) = user_namespaces() {
            assert!(!e.fix.is_empty(), "{e}");
        }
        if let Some(abi) = landlock_abi() {
            assert!(abi >= 1);
        }
        let _ = cgroup_delegation(&CGROUP_CONTROLLERS);
    }

    #[test]
    fn cgroup_delegation_needs_v2_the_controllers_and_write_access() {
        let mounts = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        let v1 = "4:memory:/user.slice\n";
        assert!(delegated_cgroup(v1, mounts, &CGROUP_CONTROLLERS, |_| None)
            .unwrap_err()
            .contains("cgroup v1 only"));
        let own = "0::/user.slice/vmm\n";
        assert!(delegated_cgroup(own, "", &CGROUP_CONTROLLERS, |_| None)
            .unwrap_err()
            .contains("no cgroup v2"));
        let hybrid =
            format!("{mounts}35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n");
        let err = delegated_cgroup(own, &hybrid, &CGROUP_CONTROLLERS, |_| Some("cpu".into()));
        assert!(err
            .unwrap_err()
            .contains("v1 hierarchies hold the memory controller"));
        let err = delegated_cgroup(own, mounts, &CGROUP_CONTROLLERS, |_| Some("cpu io".into()))
            .unwrap_err();
        assert!(err.contains("memory, pids controller(s)"), "{err}");
        // All controllers; whether /sys/fs/cgroup/user.slice/vmm is
        // writable decides the rest (it does not exist here).
        let only_cpu = delegated_cgroup(own, mounts, &["cpu"], |_| Some("cpu io".into()));
        assert!(only_cpu.unwrap_err().contains("not writable"));
        let err = delegated_cgroup(own, mounts, &CGROUP_CONTROLLERS, |p| {
            assert_eq!(
                p,
                Path::new("/sys/fs/cgroup/user.slice/vmm/cgroup.controllers")
            );
            Some("cpuset cpu io memory pids".into())
        })
        .unwrap_err();
        assert!(err.contains("not writable"), "{err}");
    }
}
