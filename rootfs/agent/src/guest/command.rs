//! How a command is set up: the image's defaults (environment, working
//! directory, user; `vmm_agent::ImageDefaults`) under what the request
//! says, and the user resolved from the guest's /etc/passwd and
//! /etc/group the way container runtimes do.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use vmm_agent::ImageDefaults;

use super::isolation::Prepared;

static DEFAULTS: OnceLock<ImageDefaults> = OnceLock::new();

/// Reads the image's defaults from the initramfs, if the VMM put them
/// there; call before switching to the root disk.
pub fn load_defaults() {
    let path = vmm_agent::IMAGE_DEFAULTS_PATH;
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    match serde_json::from_slice(&bytes) {
        Ok(defaults) => {
            let _ = DEFAULTS.set(defaults);
        }
        Err(e) => eprintln!("vmm-init: ignoring {path}: {e}"),
    }
}

fn defaults() -> &'static ImageDefaults {
    DEFAULTS.get_or_init(ImageDefaults::default)
}

/// What a command runs with, as the request gives it.
#[derive(Debug, Default, Clone)]
pub struct Settings<'a> {
    pub env: Option<&'a BTreeMap<String, String>>,
    pub cwd: Option<&'a str>,
    pub user: Option<&'a str>,
    /// A container's root file system: the command's root (chroot, or
    /// pivot_root with `isolation`'s new mount namespace).
    pub root: Option<&'a str>,
    /// A container's namespaces and cgroup (with `root`).
    pub isolation: Option<Arc<Prepared>>,
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: Option<String>,
}

/// Sets `cmd` up with `settings` over the image's defaults.
pub fn apply(cmd: &mut Command, settings: &Settings) -> std::io::Result<()> {
    if let Some(root) = settings.root {
        return apply_in_root(cmd, root, settings);
    }
    let d = defaults();
    let mut env: BTreeMap<String, String> = d
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if let Some(asked) = settings.env {
        env.extend(asked.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let cwd = match settings.cwd {
        Some(dir) => Some(dir),
        None => {
            let dir = d.working_dir.as_deref().filter(|w| !w.is_empty());
            if let Some(dir) = dir {
                // Runtimes create an image's working directory it lacks.
                let _ = std::fs::create_dir_all(dir);
            }
            dir
        }
    };
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    if let Some(who) = credentials(settings.user)? {
        if let Some(home) = &who.home {
            env.entry("HOME".into()).or_insert_with(|| home.clone());
        }
        switch_user(cmd, who);
    }
    cmd.envs(env);
    Ok(())
}

/// Sets `cmd` up to run in a container's root: in its cgroup and
/// namespaces (`isolation`), with `root` as its root, in `cwd` there (default
/// /), as `user` from the root's own /etc/passwd and /etc/group, with the
/// request's environment only (over the agent's PATH when it names none).
fn apply_in_root(cmd: &mut Command, root: &str, settings: &Settings) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let root_c = std::ffi::CString::new(root).map_err(|_| bad("a NUL in the root"))?;
    let cwd = settings.cwd.unwrap_or("/");
    let cwd_c = std::ffi::CString::new(cwd).map_err(|_| bad("a NUL in the working directory"))?;
    let who = match settings.user.filter(|u| !u.is_empty()) {
        None => None,
        Some(spec) => {
            let read =
                |f: &str| std::fs::read_to_string(format!("{root}/etc/{f}")).unwrap_or_default();
            Some(resolve(spec, &read("passwd"), &read("group"))?)
        }
    };
    let isolation = settings.isolation.clone();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (those of Prepared's enter,
    // enter_root and mount_deferred, chroot, chdir) on what was made
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            match &isolation {
                Some(i) => {
                    i.enter()?;
                    i.enter_root(&root_c)?;
                    i.mount_deferred()?;
                    i.limit_capabilities()?;
                }
                None if libc::chroot(root_c.as_ptr()) != 0 => {
                    return Err(std::io::Error::last_os_error());
                }
                None => {}
            }
            if libc::chdir(cwd_c.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(who) = who {
        if let Some(home) = &who.home {
            cmd.env("HOME", home);
        }
        switch_user(cmd, who);
    }
    if let Some(isolation) = settings.isolation.clone() {
        // SAFETY: runs in the child after the closures above (the user's
        // change); Prepared::set_capabilities only makes async-signal-safe
        // system calls on values made before the fork.
        unsafe {
            cmd.pre_exec(move || isolation.set_capabilities());
        }
    }
    if let Some(env) = settings.env {
        cmd.envs(env);
    }
    Ok(())
}

/// Makes `cmd` drop to `who` before it runs.
fn switch_user(cmd: &mut Command, who: Credentials) {
    let Credentials {
        uid, gid, groups, ..
    } = who;
    // SAFETY: the closure runs in the child between fork and exec and
    // only makes async-signal-safe system calls (setgroups, setgid,
    // setuid) on values computed before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The user a request runs as: `user` (`NAME`, `UID`, `NAME:GROUP`,
/// `UID:GID`), else the image's; `None` for root by default.
pub fn credentials(user: Option<&str>) -> std::io::Result<Option<Credentials>> {
    let Some(spec) = user
        .or(defaults().user.as_deref())
        .filter(|u| !u.is_empty())
    else {
        return Ok(None);
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve(spec, &passwd, &group).map(Some)
}

/// The home folder relative paths of `user`'s file requests start from:
/// theirs from /etc/passwd, else /root for root, else /.
pub fn home(user: Option<&str>) -> std::io::Result<String> {
    Ok(match credentials(user)? {
        None => "/root".into(),
        Some(c) => c.home.unwrap_or_else(|| "/".into()),
    })
}

/// Resolves `NAME`, `UID`, `NAME:GROUP` or `UID:GID` with the given
/// /etc/passwd and /etc/group texts. A numeric user missing from passwd
/// runs with group 0 and no home, as Docker does.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> std::io::Result<Credentials> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::NotFound, what);
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user)));
    let (uid, mut gid, name, home) = match (&entry, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| bad(format!("bad /etc/passwd entry for {user}")))?,
            f[3].parse().unwrap_or(0),
            Some(f[0]),
            Some(f[5].to_owned()),
        ),
        (None, Ok(uid)) => (uid, 0, None, None),
        (None, Err(_)) => {
            return Err(bad(format!(
                "user {user} is not in the image's /etc/passwd"
            )))
        }
    };
    let groups_of = |f: &[&str]| f.get(2).and_then(|g| g.parse::<u32>().ok());
    let group_lines: Vec<Vec<&str>> = group.lines().map(|l| l.split(':').collect()).collect();
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group_lines
                .iter()
                .find(|f| f.first() == Some(&g))
                .and_then(|f| groups_of(f))
                .ok_or_else(|| bad(format!("group {g} is not in the image's /etc/group")))?,
        };
    }
    let mut groups = vec![gid];
    if let (Some(name), None) = (name, grp) {
        for f in &group_lines {
            let members = f.get(3).copied().unwrap_or("");
            if members.split(',').any(|m| m == name) {
                if let Some(g) = groups_of(f) {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    Ok(Credentials {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1001:\nstaff:x:50:app,other\nwheel:x:10:root\n";

    #[test]
    fn users_resolve_like_container_runtimes() {
        let app = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1001));
        assert_eq!(app.groups, vec![1001, 50]);
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        let by_id = resolve("1000", PASSWD, GROUP).unwrap();
        assert_eq!((by_id.uid, by_id.gid), (1000, 1001));
        let with_group = resolve("app:staff", PASSWD, GROUP).unwrap();
        assert_eq!((with_group.gid, with_group.groups.clone()), (50, vec![50]));
        let numeric = resolve("4242:77", PASSWD, GROUP).unwrap();
        assert_eq!((numeric.uid, numeric.gid, numeric.home), (4242, 77, None));
        let unknown = resolve("4243", "", "").unwrap();
        assert_eq!((unknown.uid, unknown.gid), (4243, 0));
        assert!(resolve("nobody-here", PASSWD, GROUP).is_err());
        assert!(resolve("app:nogroup", PASSWD, GROUP).is_err());
    }
}
