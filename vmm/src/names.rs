//! Named VMs: `vmm launch --name dev` registers the VM in the user's
//! private runtime directory ([`crate::runtime::user_dir`]), so later
//! commands find it by name (`vmm exec dev -- CMD`, `vmm ps`).
//!
//! The registry is the folder `<runtime dir>/vms`: for VM `NAME`, the
//! entry `NAME.json` ([`Entry`]: pid, the process's start time, parent,
//! console file, control socket) and the control socket `NAME.api.sock`.
//! A jailed VM's sockets and console are in a folder of its own,
//! `NAME.jail` (the jail sees that folder, not the registry), and so are
//! its fork children's; their entries say where. An entry is
//! created exclusively, so two VMs never hold one name; an entry whose
//! process is gone (killed, or a fork child that stopped) is stale and is
//! removed by whoever meets it next.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest name.
pub const MAX_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{name:?} is not a VM name: use 1 to {MAX_NAME} of a-z, 0-9, '-', '_' and '.', starting with a letter or digit")]
    BadName { name: String },
    #[error("a VM named {name:?} is running (pid {pid}); stop it with `vmm stop {name}` or choose another name")]
    InUse { name: String, pid: u32 },
    #[error("no VM named {name:?} runs; `vmm ps` lists the running ones")]
    NoSuchVm { name: String },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A registered VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub pid: u32,
    /// The process's start time (field 22 of /proc/PID/stat), so a reused
    /// pid is not taken for the VM.
    pub pid_start: u64,
    /// The VM this one was forked from.
    pub parent: Option<String>,
    /// When the VM started, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// Where its console goes, for `vmm logs`.
    pub console: Option<PathBuf>,
    /// Its control socket, when not `NAME.api.sock` in the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
}

/// Checks that `name` is a valid VM name.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName {
            name: name.to_string(),
        })
    }
}

/// The registry folder (created 0700 in the private runtime directory).
pub fn registry() -> Result<PathBuf> {
    let dir = crate::runtime::user_dir()?.join("vms");
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(dir),
        Err(source) => Err(Error::Io {
            what: "create",
            path: dir,
            source,
        }),
    }
}

/// The control socket of VM `name` (in `registry`).
pub fn api_socket(registry: &Path, name: &str) -> PathBuf {
    registry.join(format!("{name}.api.sock"))
}

/// The control socket of the VM `entry` names.
pub fn entry_api_socket(registry: &Path, entry: &Entry) -> PathBuf {
    entry
        .api_socket
        .clone()
        .unwrap_or_else(|| api_socket(registry, &entry.name))
}

/// The folder of jailed VM `name`'s sockets and console (created 0700).
pub fn jail_folder(registry: &Path, name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = registry.join(format!("{name}.jail"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(dir),
        Err(source) => Err(Error::Io {
            what: "create",
            path: dir,
            source,
        }),
    }
}

/// The console file a named VM gets when its config names none.
pub fn console_file(registry: &Path, name: &str) -> PathBuf {
    registry.join(format!("{name}.console"))
}

fn entry_path(registry: &Path, name: &str) -> PathBuf {
    registry.join(format!("{name}.json"))
}

/// The start time of process `pid`, if it runs.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    // A process that has ended but is not reaped yet (a fork child whose
    // parent VMM has not seen its end) runs no VM.
    if matches!(rest.next(), Some("Z" | "X")) {
        return None;
    }
    rest.nth(18)?.parse().ok()
}

/// The parent and the pids (outermost first, as `NSpid` lists them) of
/// process `pid`.
fn parent_and_pids(pid: u32) -> Option<(u32, Vec<u32>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()))
    };
    let parent = field("PPid:")?.next()?;
    Some((parent, field("NSpid:")?.collect()))
}

/// The pid here of the process that a jail started under process
/// `ancestor` (a jail's launcher) knows as `inner` (fork children of a
/// jailed VMM are reported with the jail's pids). `inner` itself when
/// no descendant of `ancestor` has it as its pid in a namespace below.
pub fn host_pid(ancestor: u32, inner: u32) -> u32 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return inner;
    };
    let procs: Vec<(u32, u32, Vec<u32>)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(|pid| parent_and_pids(pid).map(|(ppid, ns)| (pid, ppid, ns)))
        .collect();
    let descends = |mut pid: u32| {
        // The chain ends at pid 0; a bound keeps a racing reuse finite.
        for _ in 0..procs.len() {
            match procs.iter().find(|(p, _, _)| *p == pid) {
                Some((_, ppid, _)) if *ppid == ancestor => return true,
                Some((_, ppid, _)) if *ppid != 0 => pid = *ppid,
                _ => return false,
            }
        }
        false
    };
    procs
        .iter()
        .find(|(pid, _, ns)| ns.len() > 1 && ns.last() == Some(&inner) && descends(*pid))
        .map_or(inner, |(pid, _, _)| *pid)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Entry {
    /// An entry for process `pid`, started now.
    pub fn new(name: &str, pid: u32, parent: Option<String>, console: Option<PathBuf>) -> Entry {
        Entry {
            name: name.to_string(),
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            parent,
            started_unix: now_unix(),
            console,
            api_socket: None,
        }
    }

    /// Whether the process this entry names still runs.
    pub fn alive(&self) -> bool {
        self.pid != 0 && process_start(self.pid) == Some(self.pid_start)
    }

    /// Waits up to `timeout` for the process to end; whether it did.
    pub fn wait_exit(&self, timeout: std::time::Duration) -> bool {
        let Ok(pidfd) = vmm_os::process::exit_fd(self.pid) else {
            return !self.alive();
        };
        // The pid may have been reused between reading the entry and
        // opening the pidfd.
        if !self.alive() {
            return true;
        }
        vmm_os::process::ended_within(&pidfd, timeout) || !self.alive()
    }

    /// Seconds since the VM started.
    pub fn uptime_s(&self) -> u64 {
        now_unix().saturating_sub(self.started_unix)
    }
}

/// A name held by this process; released (entry removed) on drop.
pub struct Claim {
    path: PathBuf,
    entry: Entry,
}

impl Claim {
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// Records that another process (a fork child, whose console is
    /// `console` and control socket `api_socket`) now holds the name.
    pub fn hand_over(
        mut self,
        pid: u32,
        console: Option<PathBuf>,
        api_socket: Option<PathBuf>,
    ) -> Result<()> {
        self.entry.pid = pid;
        self.entry.console = console;
        self.entry.api_socket = api_socket;
        self.entry.pid_start = process_start(pid).unwrap_or(0);
        write_entry(&self.path, &self.entry, false).map_err(|source| Error::Io {
            what: "write",
            path: self.path.clone(),
            source,
        })?;
        // The child keeps the name: nothing to remove.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn write_entry(path: &Path, entry: &Entry, exclusive: bool) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let body = serde_json::to_vec(entry).map_err(io::Error::other)?;
    if exclusive {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(&body)
    } else {
        // Replaced whole, so a reader never sees half an entry.
        let tmp = path.with_extension(format!("json.{}", crate::runtime::random_hex(4)));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        std::fs::rename(&tmp, path)
    }
}

fn read_entry(path: &Path) -> Option<Entry> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Removes a stale entry and its control socket (its console stays, and
/// so does a jailed VM's folder, where its fork children may still run).
fn remove_stale(registry: &Path, name: &str) {
    let path = entry_path(registry, name);
    let socket = read_entry(&path).filter(|e| e.name == name).map_or_else(
        || api_socket(registry, name),
        |e| entry_api_socket(registry, &e),
    );
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(socket);
}

/// Takes `entry.name` for `entry`: refused while a live VM holds it; a
/// stale holder is cleared first.
pub fn claim(registry: &Path, entry: Entry) -> Result<Claim> {
    check_name(&entry.name)?;
    let path = entry_path(registry, &entry.name);
    for _ in 0..2 {
        match write_entry(&path, &entry, true) {
            Ok(()) => return Ok(Claim { path, entry }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match read_entry(&path) {
                Some(held) if held.alive() => {
                    return Err(Error::InUse {
                        name: entry.name,
                        pid: held.pid,
                    })
                }
                _ => remove_stale(registry, &entry.name),
            },
            Err(source) => {
                return Err(Error::Io {
                    what: "create",
                    path,
                    source,
                })
            }
        }
    }
    Err(Error::InUse {
        name: entry.name,
        pid: 0,
    })
}

/// The live VM called `name`.
pub fn lookup(registry: &Path, name: &str) -> Result<Entry> {
    check_name(name)?;
    match read_entry(&entry_path(registry, name)) {
        Some(e) if e.alive() => Ok(e),
        Some(_) => {
            remove_stale(registry, name);
            Err(Error::NoSuchVm { name: name.into() })
        }
        None => Err(Error::NoSuchVm { name: name.into() }),
    }
}

/// Every live VM, by name; stale entries are removed on the way.
pub fn list(registry: &Path) -> Result<Vec<Entry>> {
    let read = std::fs::read_dir(registry).map_err(|source| Error::Io {
        what: "read",
        path: registry.to_path_buf(),
        source,
    })?;
    let mut live = Vec::new();
    for item in read.flatten() {
        let file = item.file_name();
        let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
            continue;
        };
        match read_entry(&item.path()) {
            Some(e) if e.alive() && e.name == name => live.push(e),
            // Being written by `claim`: leave it.
            None if std::fs::metadata(item.path()).is_ok_and(|m| m.len() == 0) => {}
            _ => remove_stale(registry, name),
        }
    }
    live.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(live)
}

/// The first `count` free names `PREFIX-1`, `PREFIX-2`, ... claimed for
/// this process (handed to fork children once they run).
pub fn claim_series(
    registry: &Path,
    prefix: &str,
    count: u32,
    parent: Option<&str>,
) -> Result<Vec<Claim>> {
    let mut claims = Vec::with_capacity(count as usize);
    let mut n = 0u32;
    while claims.len() < count as usize {
        n += 1;
        let name = format!("{prefix}-{n}");
        let entry = Entry::new(&name, std::process::id(), parent.map(str::to_string), None);
        match claim(registry, entry) {
            Ok(c) => claims.push(c),
            Err(Error::InUse { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-names-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_ended_process_not_yet_reaped_does_not_run() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pidfd = vmm_os::process::exit_fd(child.id()).unwrap();
        let mut poll = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 10_000) }, 1);
        // Ended, not reaped: a zombie.
        assert_eq!(process_start(child.id()), None);
        child.wait().unwrap();
        assert!(process_start(std::process::id()).is_some());
    }

    #[test]
    fn a_pid_outside_any_jail_is_its_own_host_pid() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        // Not in a namespace below ours: the answer is the pid it was given.
        assert_eq!(host_pid(std::process::id(), child.id()), child.id());
        assert_eq!(host_pid(std::process::id(), u32::MAX), u32::MAX);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn names_are_checked() {
        for good in ["dev", "a", "web-1", "x.y_z", "0abc"] {
            check_name(good).unwrap();
        }
        let long = "a".repeat(MAX_NAME + 1);
        for bad in ["", "-dev", "Dev", "a/b", "..", "a b", long.as_str(), "é"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_live_name_is_refused_and_a_stale_one_taken_over() {
        let dir = scratch("claim");
        let me = std::process::id();
        let first = claim(&dir, Entry::new("dev", me, None, None)).unwrap();
        let again = claim(&dir, Entry::new("dev", me, None, None));
        assert!(matches!(again, Err(Error::InUse { pid, .. }) if pid == me));
        assert_eq!(lookup(&dir, "dev").unwrap().pid, me);
        assert_eq!(list(&dir).unwrap().len(), 1);
        drop(first);
        assert!(matches!(lookup(&dir, "dev"), Err(Error::NoSuchVm { .. })));

        // A holder that is gone (pid start time does not match) is stale.
        let mut dead = Entry::new("old", me, None, None);
        dead.pid_start += 1;
        std::fs::write(entry_path(&dir, "old"), serde_json::to_vec(&dead).unwrap()).unwrap();
        std::fs::write(api_socket(&dir, "old"), b"").unwrap();
        assert!(list(&dir).unwrap().is_empty());
        assert!(!api_socket(&dir, "old").exists());
        let taken = claim(&dir, Entry::new("old", me, None, None)).unwrap();
        assert!(taken.entry().alive());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_series_skips_names_in_use_and_hands_over() {
        let dir = scratch("series");
        let me = std::process::id();
        let _held = claim(&dir, Entry::new("dev-1", me, None, None)).unwrap();
        let series = claim_series(&dir, "dev", 2, Some("dev")).unwrap();
        let names: Vec<&str> = series.iter().map(|c| c.entry().name.as_str()).collect();
        assert_eq!(names, ["dev-2", "dev-3"]);
        for c in series {
            c.hand_over(me, None, None).unwrap();
        }
        let listed = list(&dir).unwrap();
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[1].parent.as_deref(), Some("dev"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
