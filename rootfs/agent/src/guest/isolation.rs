//! A container's isolation inside the guest (`vmm_agent::Isolation`): the
//! namespaces its process gets new or joins, its hostname and its cgroup.
//!
//! Whatever needs allocating, opening or writing is done before the fork
//! ([`Prepared::new`]); the child only makes system calls on what was made
//! ([`Prepared::enter`], [`Prepared::enter_root`],
//! [`Prepared::mount_deferred`]), as code between
//! fork and exec must. A pid namespace is the exception: a process is
//! created in one, so the spawning thread sets the pid namespace its
//! children get around the spawn ([`Prepared::spawn`]) and sets its own
//! back after.
//!
//! A mount whose file system belongs to a namespace (proc to the pid
//! namespace, mqueue to the ipc one, cgroup to the cgroup one) is made by
//! the process itself once it is in its namespace, new or joined
//! ([`Deferred`]), so that the container sees its own processes, queues
//! and cgroup.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use vmm_agent::{Cgroup, Isolation, Mount, NAMESPACE_KINDS};

use super::capabilities::Sets;

/// Where the guest mounts its cgroup v2 hierarchy (vmm-init).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The controllers vmm-init gives the groups under [`CGROUP_ROOT`].
pub const CONTROLLERS: &str = "+memory +pids +cpu";

/// The clone flag of a namespace kind and its name under /proc/PID/ns.
fn kind(kind: &str) -> Option<(libc::c_int, &'static str)> {
    Some(match kind {
        "pid" => (libc::CLONE_NEWPID, "pid"),
        "ipc" => (libc::CLONE_NEWIPC, "ipc"),
        "uts" => (libc::CLONE_NEWUTS, "uts"),
        "mount" => (libc::CLONE_NEWNS, "mnt"),
        "cgroup" => (libc::CLONE_NEWCGROUP, "cgroup"),
        _ => return None,
    })
}

#[derive(Debug)]
enum PidNamespace {
    Vm,
    New,
    Join(File),
}

/// A mount the process makes itself, in its root: `target` is absolute
/// inside the container's root.
#[derive(Debug)]
pub struct Deferred {
    pub source: CString,
    pub target: CString,
    pub kind: CString,
    pub flags: libc::c_ulong,
    pub data: CString,
}

/// An [`Isolation`] made ready for a fork.
#[derive(Debug)]
pub struct Prepared {
    /// Namespaces the child enters (not pid), the mount one first.
    join: Vec<(File, libc::c_int)>,
    /// The flags of the namespaces the child makes (not pid).
    unshare: libc::c_int,
    pid: PidNamespace,
    hostname: Option<CString>,
    /// The cgroup's cgroup.procs, which the child writes itself into.
    cgroup_procs: Option<File>,
    /// The cgroup folder this request made (removed by [`Prepared::finish`]).
    made: Option<PathBuf>,
    deferred: Vec<Deferred>,
    capabilities: Option<Sets>,
    no_new_privileges: bool,
    /// With a new mount namespace: the base namespace it is a copy of and
    /// the root moved into it (mount_namespace.rs), when there is one.
    small_root: Option<(&'static File, OwnedFd)>,
}

/// A system call's 0 as Ok, else its errno.
pub(super) fn check(rc: libc::c_int) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl Prepared {
    /// Opens the namespaces to join, makes the cgroup and writes its
    /// limits.
    pub fn new(iso: &Isolation) -> io::Result<Prepared> {
        let mut p = Prepared {
            join: Vec::new(),
            unshare: 0,
            pid: PidNamespace::Vm,
            hostname: None,
            cgroup_procs: None,
            made: None,
            deferred: Vec::new(),
            capabilities: iso.capabilities.as_ref().map(Sets::new).transpose()?,
            no_new_privileges: iso.no_new_privileges,
            small_root: None,
        };
        for ns in &iso.namespaces {
            let (flag, name) = kind(&ns.kind).ok_or_else(|| {
                invalid(format!(
                    "the namespace type {:?} is not one of {}",
                    ns.kind,
                    NAMESPACE_KINDS.join(", ")
                ))
            })?;
            if p.enters(&ns.kind) {
                return Err(invalid(format!("the namespace {} is named twice", ns.kind)));
            }
            match (ns.join, flag) {
                (None, libc::CLONE_NEWPID) => p.pid = PidNamespace::New,
                (None, _) => p.unshare |= flag,
                (Some(pid), _) if pid <= 0 => {
                    return Err(invalid(format!(
                        "cannot join the {} namespace of process {pid}",
                        ns.kind
                    )))
                }
                (Some(pid), _) => {
                    let file = File::open(format!("/proc/{pid}/ns/{name}")).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!(
                                "cannot join the {} namespace of process {pid}: {e}",
                                ns.kind
                            ),
                        )
                    })?;
                    match flag {
                        libc::CLONE_NEWPID => p.pid = PidNamespace::Join(file),
                        libc::CLONE_NEWNS => p.join.insert(0, (file, flag)),
                        _ => p.join.push((file, flag)),
                    }
                }
            }
        }
        if let Some(name) = &iso.hostname {
            if p.unshare & libc::CLONE_NEWUTS == 0 {
                return Err(invalid(
                    "a hostname needs a new uts namespace (it would rename the VM)".into(),
                ));
            }
            p.hostname = Some(
                CString::new(name.as_str()).map_err(|_| invalid("a NUL in the hostname".into()))?,
            );
        }
        if let Some(c) = &iso.cgroup {
            let (procs, made) = cgroup(c)?;
            p.cgroup_procs = Some(procs);
            p.made = made;
        }
        Ok(p)
    }

    /// Whether the process gets a new namespace of `kind`.
    fn makes(&self, kind_name: &str) -> bool {
        match kind(kind_name) {
            Some((libc::CLONE_NEWPID, _)) => matches!(self.pid, PidNamespace::New),
            Some((flag, _)) => self.unshare & flag != 0,
            None => false,
        }
    }

    /// Whether the process gets a namespace of `kind` other than the
    /// agent's: a new one, or one it joins.
    fn enters(&self, kind_name: &str) -> bool {
        match kind(kind_name) {
            Some((libc::CLONE_NEWPID, _)) => !matches!(self.pid, PidNamespace::Vm),
            Some((flag, _)) => self.makes(kind_name) || self.join.iter().any(|(_, f)| *f == flag),
            None => false,
        }
    }

    /// Whether `m` is made by the process itself (its file system belongs
    /// to a namespace the process enters: new or joined).
    pub fn defers(&self, m: &Mount) -> bool {
        match m.kind.as_str() {
            "proc" => self.enters("pid"),
            "mqueue" => self.enters("ipc"),
            "cgroup" | "cgroup2" => self.enters("cgroup"),
            _ => false,
        }
    }

    pub fn defer(&mut self, d: Deferred) {
        self.deferred.push(d);
    }

    /// With a new mount namespace: takes a detached copy of `root` (the
    /// container's, its mounts made) to make it the root of a small one
    /// (mount_namespace.rs).
    pub fn clone_root(&mut self, root: &str) -> io::Result<()> {
        if self.unshare & libc::CLONE_NEWNS == 0 {
            return Ok(());
        }
        if let Some(base) = super::mount_namespace::base() {
            let tree = super::mount_namespace::clone_root(root).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot copy the root's mounts: {e}"))
            })?;
            self.small_root = Some((base, tree));
        }
        Ok(())
    }

    /// Runs `spawn` with the pid namespace the process goes in set for
    /// this thread's children, and this thread's own set back after.
    pub fn spawn<T>(&self, spawn: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        if matches!(self.pid, PidNamespace::Vm) {
            return spawn();
        }
        let own = File::open("/proc/thread-self/ns/pid")?;
        let entered = match &self.pid {
            // SAFETY: unshare(2) with one namespace flag; it changes only
            // the namespace this thread's children are made in.
            PidNamespace::New => unsafe { libc::unshare(libc::CLONE_NEWPID) },
            // SAFETY: setns(2) on an open namespace descriptor.
            PidNamespace::Join(ns) => unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) },
            PidNamespace::Vm => 0,
        };
        if entered != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot enter the pid namespace: {e}"),
            ));
        }
        let spawned = spawn();
        // SAFETY: setns(2) on an open namespace descriptor (the thread's
        // own pid namespace, which it is still in: only its children's
        // changed).
        if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
            eprintln!(
                "vmm-agent: cannot set this thread's pid namespace back: {}",
                io::Error::last_os_error()
            );
        }
        spawned
    }

    /// In the child, before its chroot: into the cgroup, then into the
    /// namespaces it joins and the new ones, and the hostname set.
    /// Async-signal-safe: system calls on what [`Prepared::new`] made.
    pub fn enter(&self) -> io::Result<()> {
        if let Some(procs) = &self.cgroup_procs {
            // SAFETY: write(2) of a 1-byte buffer to an open descriptor.
            if unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        for (ns, flag) in &self.join {
            // SAFETY: setns(2) on an open namespace descriptor.
            check(unsafe { libc::setns(ns.as_raw_fd(), *flag) })?;
        }
        if let Some((base, _)) = &self.small_root {
            super::mount_namespace::enter_base(base)?;
        }
        if self.unshare != 0 {
            // SAFETY: unshare(2) with namespace flags, in the child.
            check(unsafe { libc::unshare(self.unshare) })?;
        }
        if self.unshare & libc::CLONE_NEWNS != 0 && self.small_root.is_none() {
            // What the process mounts stays in its namespace, whatever
            // the guest's mounts' propagation (as runc's default).
            // SAFETY: mount(2) changing propagation, with a static path.
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                )
            })?;
        }
        if let Some(name) = &self.hostname {
            // SAFETY: sethostname(2) with a buffer and its length.
            check(unsafe { libc::sethostname(name.as_ptr(), name.as_bytes().len()) })?;
        }
        Ok(())
    }

    /// In the child, after [`Prepared::enter`]: makes `root` its root.
    /// With a new mount namespace as runc does (pivot_root to it and the
    /// guest's mounts detached, so that nothing outside is left to escape
    /// to); in a joined one (an exec into a container) its root is the
    /// container's already; else chroot. Async-signal-safe.
    pub fn enter_root(&self, root: &std::ffi::CStr) -> io::Result<()> {
        if self.join.iter().any(|(_, f)| *f == libc::CLONE_NEWNS) {
            return Ok(());
        }
        if let Some((_, tree)) = &self.small_root {
            return super::mount_namespace::enter(tree);
        }
        let (dot, bind) = (c".".as_ptr(), libc::MS_BIND | libc::MS_REC);
        // SAFETY: chroot(2), mount(2), chdir(2), pivot_root(2) and
        // umount2(2) on NUL-terminated paths made before the fork or
        // static; none keeps a pointer past the call.
        unsafe {
            if self.unshare & libc::CLONE_NEWNS == 0 {
                return check(libc::chroot(root.as_ptr()));
            }
            // pivot_root takes a mount point: the root bound on itself.
            let null = std::ptr::null();
            check(libc::mount(
                root.as_ptr(),
                root.as_ptr(),
                null,
                bind,
                null.cast(),
            ))?;
            check(libc::chdir(root.as_ptr()))?;
            if libc::syscall(libc::SYS_pivot_root, dot, dot) != 0 {
                // A guest without a root disk runs on the initramfs, which
                // cannot be pivoted away from.
                return check(libc::chroot(dot));
            }
            // The old root is stacked on the new one: detach it.
            check(libc::umount2(dot, libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))
        }
    }

    /// In the child, after [`Prepared::enter_root`]: the [`Deferred`]
    /// mounts.
    /// Async-signal-safe.
    pub fn mount_deferred(&self) -> io::Result<()> {
        for d in &self.deferred {
            // SAFETY: mount(2) with NUL-terminated strings made before
            // the fork.
            check(unsafe {
                libc::mount(
                    d.source.as_ptr(),
                    d.target.as_ptr(),
                    d.kind.as_ptr(),
                    d.flags,
                    d.data.as_ptr().cast(),
                )
            })?;
        }
        Ok(())
    }

    /// In the child, before it changes user: its bounding set limited
    /// (capabilities.rs). Async-signal-safe.
    pub fn limit_capabilities(&self) -> io::Result<()> {
        match &self.capabilities {
            Some(c) => c.limit(),
            None => Ok(()),
        }
    }

    /// In the child, after it changed user: its capability sets, and no
    /// new privileges when asked. Async-signal-safe.
    pub fn set_capabilities(&self) -> io::Result<()> {
        if let Some(c) = &self.capabilities {
            c.set()?;
        }
        if self.no_new_privileges {
            // SAFETY: prctl(2) with integer arguments.
            check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        }
        Ok(())
    }

    /// After the process ended: removes the cgroup this request made
    /// (left when processes of it still run).
    pub fn finish(&self) {
        if let Some(dir) = &self.made {
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("vmm-agent: cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// The folder of cgroup `name`: one folder right under [`CGROUP_ROOT`],
/// never one of its files.
fn cgroup_dir(name: &str) -> io::Result<PathBuf> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && !name.starts_with("cgroup.")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    match ok {
        true => Ok(PathBuf::from(CGROUP_ROOT).join(name)),
        false => Err(invalid(format!(
            "the cgroup name {name:?} is not 1 to 200 of A-Z a-z 0-9 _ . - (not starting with . or cgroup.)"
        ))),
    }
}

/// Makes cgroup `c` (when missing) with its limits; its cgroup.procs,
/// open for writing, and its folder when this made it.
fn cgroup(c: &Cgroup) -> io::Result<(File, Option<PathBuf>)> {
    let dir = cgroup_dir(&c.name)?;
    let context = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let made = match std::fs::create_dir(&dir) {
        Ok(()) => Some(dir.clone()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
        Err(e) => {
            return Err(context(
                &format!("cannot make the cgroup {}", dir.display()),
                e,
            ))
        }
    };
    let limits = [
        ("memory.max", c.memory_max.map(|m| m.to_string())),
        (
            "cpu.max",
            c.cpu_max.map(|(quota, period)| format!("{quota} {period}")),
        ),
        ("pids.max", c.pids_max.map(|p| p.to_string())),
    ];
    let written = limits.iter().try_for_each(|(file, value)| match value {
        None => Ok(()),
        Some(v) => std::fs::write(dir.join(file), v)
            .map_err(|e| context(&format!("cannot set {file} of the cgroup to {v}"), e)),
    });
    let procs = written.and_then(|()| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| context("cannot open the cgroup's cgroup.procs", e))
    });
    match procs {
        Ok(p) => Ok((p, made)),
        Err(e) => {
            if let Some(d) = &made {
                let _ = std::fs::remove_dir(d);
            }
            Err(e)
        }
    }
}

/// Sets up the guest's cgroup v2 hierarchy at boot: mounted at
/// [`CGROUP_ROOT`], with [`CONTROLLERS`] for the groups under it.
pub fn set_up_cgroups() -> Result<(), String> {
    vmm_agent::mount::mount(
        "cgroup2",
        CGROUP_ROOT,
        "cgroup2",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )
    .map_err(|e| format!("cannot mount cgroup2 on {CGROUP_ROOT}: {e}"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("{CGROUP_ROOT}/cgroup.subtree_control"))
        .and_then(|mut f| f.write_all(CONTROLLERS.as_bytes()))
        .map_err(|e| format!("cannot enable the cgroup controllers {CONTROLLERS}: {e}"))
}

/// The figures of cgroup `name`.
pub fn stats(name: &str) -> io::Result<vmm_agent::CgroupStats> {
    let dir = cgroup_dir(name)?;
    let read = |file: &str| std::fs::read_to_string(dir.join(file));
    let number = |text: &str| text.trim().parse::<u64>().ok();
    let cpu = read("cpu.stat")?;
    let field = |key: &str| {
        cpu.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').and_then(number))
            .unwrap_or(0)
    };
    Ok(vmm_agent::CgroupStats {
        memory: number(&read("memory.current")?).unwrap_or(0),
        memory_max: number(&read("memory.max")?),
        cpu_usec: field("usage_usec"),
        cpu_user_usec: field("user_usec"),
        cpu_system_usec: field("system_usec"),
        pids: number(&read("pids.current")?).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::command::Settings;
    use crate::guest::spawn_command;
    use std::sync::Arc;
    use vmm_agent::Namespace;

    fn ns(kind: &str, join: Option<i32>) -> Namespace {
        Namespace {
            kind: kind.into(),
            join,
        }
    }

    #[test]
    fn namespaces_are_checked_before_anything_is_made() {
        let iso = |namespaces: Vec<Namespace>, hostname: Option<&str>| Isolation {
            namespaces,
            hostname: hostname.map(String::from),
            ..Default::default()
        };
        let err = |i: Isolation| Prepared::new(&i).unwrap_err().to_string();
        assert!(err(iso(vec![ns("network", None)], None)).contains("is not one of pid, ipc"));
        assert!(err(iso(vec![ns("ipc", None), ns("ipc", None)], None)).contains("named twice"));
        assert!(err(iso(vec![ns("pid", None), ns("pid", Some(1))], None)).contains("named twice"));
        assert!(err(iso(vec![ns("ipc", Some(0))], None)).contains("cannot join"));
        assert!(err(iso(vec![], Some("x"))).contains("needs a new uts namespace"));
        let p = Prepared::new(&iso(
            vec![
                ns("pid", None),
                ns("ipc", None),
                ns("uts", None),
                ns("mount", None),
            ],
            Some("box"),
        ))
        .unwrap();
        assert!(p.makes("pid") && p.makes("ipc") && p.makes("mount") && !p.makes("cgroup"));
        let m = |kind: &str| Mount {
            destination: "/x".into(),
            kind: kind.into(),
            source: kind.into(),
            options: vec![],
        };
        assert!(p.defers(&m("proc")) && p.defers(&m("mqueue")) && !p.defers(&m("tmpfs")));
        // Joining opens the other process's namespace at once (ours here).
        let me = std::process::id() as i32;
        let j =
            Prepared::new(&iso(vec![ns("mount", Some(me)), ns("uts", Some(me))], None)).unwrap();
        assert_eq!(j.join.len(), 2);
        assert_eq!(
            j.join[0].1,
            libc::CLONE_NEWNS,
            "the mount namespace is entered first"
        );
        // A joined uts namespace has no file system; a joined mount one
        // is not where proc belongs.
        assert!(!j.defers(&m("proc")));
        let ipc = Prepared::new(&iso(vec![ns("ipc", Some(me))], None)).unwrap();
        assert!(
            ipc.defers(&m("mqueue")),
            "mqueue belongs to the joined ipc namespace"
        );
        assert!(err(iso(vec![ns("ipc", Some(i32::MAX))], None)).contains("cannot join the ipc"));
    }

    /// Runs `script` with `iso` chrooted at / (as root: CI runs the tests
    /// as root), its output.
    fn run_isolated(iso: &Isolation, script: &str) -> String {
        run_prepared(Prepared::new(iso).unwrap(), script)
    }

    fn run_prepared(prepared: Prepared, script: &str) -> String {
        let settings = Settings {
            root: Some("/"),
            isolation: Some(Arc::new(prepared)),
            ..Default::default()
        };
        let argv = ["/bin/sh", "-c", script].map(String::from);
        let child = spawn_command(&argv, &settings, |cmd| {
            cmd.stdout(std::process::Stdio::piped());
        })
        .expect("spawning in new namespaces needs root (CAP_SYS_ADMIN)");
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn a_process_gets_its_namespaces_and_this_thread_keeps_its_own() {
        let new = |k: &str| ns(k, None);
        let iso = Isolation {
            namespaces: vec![new("pid"), new("uts"), new("ipc"), new("mount")],
            hostname: Some("boxed".into()),
            ..Default::default()
        };
        let mut prepared = Prepared::new(&iso).unwrap();
        // Its own /proc, of its pid namespace, mounted by itself.
        let proc_mount = Mount {
            destination: "/proc".into(),
            kind: "proc".into(),
            source: "proc".into(),
            options: vec!["nosuid".into()],
        };
        assert!(prepared.defers(&proc_mount));
        prepared.defer(Deferred {
            source: c"proc".into(),
            target: c"/proc".into(),
            kind: c"proc".into(),
            flags: libc::MS_NOSUID,
            data: c"".into(),
        });
        prepared.clone_root("/").unwrap();
        assert!(prepared.small_root.is_some(), "no base mount namespace");
        // Its namespace holds its root's mounts only (the base's tmpfs
        // detached): fewer than the host's.
        let script = "echo $$; hostname; readlink /proc/self/ns/ipc; readlink /proc/self; \
                      grep -c vmm-base /proc/self/mountinfo || true";
        let out = run_prepared(prepared, script);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[..2], ["1", "boxed"], "{out}");
        // readlink's pid in its own /proc: the shell's 4th process.
        assert_eq!(lines[3], "4", "{out}");
        assert_eq!(lines[4], "0", "the base's tmpfs is left: {out}");
        let own_ipc = std::fs::read_link("/proc/self/ns/ipc").unwrap();
        assert_ne!(lines[2], own_ipc.to_str().unwrap());
        // This thread's children are in its own pid namespace again, and
        // the host's name did not change.
        let plain = run_isolated(&Isolation::default(), "readlink /proc/$$/ns/pid; hostname");
        let own_pid = std::fs::read_link("/proc/self/ns/pid").unwrap();
        let mut plain = plain.lines();
        assert_eq!(plain.next(), own_pid.to_str());
        assert_ne!(plain.next(), Some("boxed"));
    }

    #[test]
    fn a_process_gets_its_capability_sets() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let iso = Isolation {
            capabilities: Some(vmm_agent::Capabilities {
                bounding: names(&["CAP_CHOWN", "CAP_KILL"]),
                effective: names(&["CAP_KILL"]),
                permitted: names(&["CAP_CHOWN", "CAP_KILL"]),
                ..Default::default()
            }),
            no_new_privileges: true,
            ..Default::default()
        };
        let out = run_isolated(&iso, "grep -E '^(CapBnd|NoNewPrivs)' /proc/self/status");
        let fields: Vec<&str> = out.split_whitespace().collect();
        // As root, exec gives the whole bounding set (CHOWN 0, KILL 5).
        assert_eq!(
            fields,
            ["CapBnd:", "0000000000000021", "NoNewPrivs:", "1"],
            "{out}"
        );
    }

    #[test]
    fn cgroup_names_stay_one_folder_under_the_root() {
        for bad in ["", "..", "a/b", ".x", "cgroup.procs", "a b"] {
            let c = Cgroup {
                name: bad.into(),
                ..Default::default()
            };
            let e = cgroup(&c).unwrap_err().to_string();
            assert!(e.contains("is not 1 to 200 of"), "{bad:?}: {e}");
            assert!(stats(bad).is_err(), "{bad:?}");
        }
        assert!(stats("../x").is_err());
    }
}
