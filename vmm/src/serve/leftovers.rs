//! What a server that did not end cleanly (killed, crashed, its machine
//! lost power) left behind: its folders (`<runtime dir>/serve-<hex>`,
//! sockets; `<cache>/serve/serve-<hex>`, snapshots of paused sandboxes,
//! which can be as large as their memory) and the VMM processes its
//! sandboxes ran in. A running server holds a `lock` file in each of its
//! two folders locked; the next server to start stops the VMMs of the
//! folders nobody holds (through their control sockets) and removes them.
//!
//! The VMMs a server starts itself also end with it (`PR_SET_PDEATHSIG`,
//! see [`spawn`]); a fork's children, started by their parent's VMM, are
//! the ones the sweep stops.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::action::Control;
use crate::api::ApiClient;

/// The prefix of a server's folders.
pub const PREFIX: &str = "serve";
/// How long a left VMM gets to answer its stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot hold the server's folder {path} locked: {source}")]
pub struct Error {
    path: PathBuf,
    source: std::io::Error,
}

/// The locks of a running server's folders; released when it ends.
#[derive(Debug)]
pub struct Claim {
    _held: Vec<File>,
}

/// Locks `folders` for this server: each gets a `lock` file that exists
/// only while a live server holds it (made under another name, locked,
/// then renamed), so a sweep never takes a folder being made.
pub fn claim(folders: &[&Path]) -> Result<Claim, Error> {
    let mut held = Vec::new();
    for folder in folders {
        let err = |source| Error {
            path: folder.to_path_buf(),
            source,
        };
        let making = folder.join("lock.new");
        let file = File::create(&making).map_err(err)?;
        file.try_lock().map_err(|e| err(e.into()))?;
        std::fs::rename(&making, folder.join("lock")).map_err(err)?;
        held.push(file);
    }
    Ok(Claim { _held: held })
}

/// The server folders in `base` whose lock nobody holds.
fn ended(base: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{PREFIX}-"))
        })
        .map(|e| e.path())
        .filter(|dir| {
            // Without a lock file: a server of an older version, or one
            // being made; left alone.
            File::open(dir.join("lock")).is_ok_and(|lock| lock.try_lock().is_ok())
        })
        .collect()
}

/// The control sockets under `dir` (a sandbox's `api.sock`, a fork
/// child's `<id>.api.sock`), two levels down at most.
fn api_sockets(dir: &Path, depth: u32) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        match entry.file_type() {
            Ok(t) if t.is_dir() && depth > 0 => found.extend(api_sockets(&path, depth - 1)),
            Ok(t) if !t.is_dir() && (name == "api.sock" || name.ends_with(".api.sock")) => {
                found.push(path)
            }
            _ => {}
        }
    }
    found
}

/// Stops the VMMs of servers that ended without stopping them and removes
/// those servers' folders, in `runtime_base` (sockets) and `state_base`
/// (snapshots). Returns how many VMMs answered the stop.
pub fn sweep(runtime_base: &Path, state_base: &Path) -> usize {
    let runtime_dirs = ended(runtime_base);
    let stopped = runtime_dirs
        .iter()
        .flat_map(|dir| api_sockets(dir, 2))
        .filter(|socket| Control::stop(&ApiClient::new(socket).with_timeout(STOP_TIMEOUT)).is_ok())
        .count();
    for dir in runtime_dirs.into_iter().chain(ended(state_base)) {
        tracing::info!(
            "serve: removing {}, left by a server that ended",
            dir.display()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    stopped
}

/// Starts `cmd` so that it gets SIGKILL when this server process ends,
/// however it ends. PR_SET_PDEATHSIG follows the thread that started the
/// process, so every VMM is started from one thread that lives as long as
/// the process (not a runtime worker, which may come and go).
pub async fn spawn(mut cmd: Command) -> std::io::Result<Child> {
    use std::sync::mpsc;
    use std::sync::{Mutex, OnceLock};
    type Reply = tokio::sync::oneshot::Sender<std::io::Result<Child>>;
    type Job = (Command, tokio::runtime::Handle, Reply);
    /// The spawner's queue; `None` when its thread could not start.
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<Job>>>> = OnceLock::new();
    let server = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe calls (prctl on Linux, getppid).
    unsafe {
        cmd.pre_exec(move || {
            vmm_os::process::die_with_parent(libc::SIGKILL)?;
            // The server ended before the signal was asked for.
            if libc::getppid() as u32 != server {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            Ok(())
        });
    }
    let jobs = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("vmm-spawner".into())
            .spawn(move || {
                for (mut cmd, runtime, reply) in rx {
                    // The child is watched by its caller's runtime.
                    let _entered = runtime.enter();
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    let gone = || std::io::Error::other("the thread that starts VMMs could not start or ended");
    let jobs = jobs.as_ref().ok_or_else(gone)?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = (cmd, tokio::runtime::Handle::current(), reply);
    jobs.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_no_server_holds_are_swept() {
        let base = std::env::temp_dir().join(format!("vmm-servesweep-{}", std::process::id()));
        let (runtime, state) = (base.join("run"), base.join("state"));
        let made = |parent: &Path, name: &str| {
            let d = parent.join(name);
            std::fs::create_dir_all(d.join("sbx")).unwrap();
            d
        };
        let live = [made(&runtime, "serve-live"), made(&state, "serve-live")];
        let dead = [made(&runtime, "serve-dead"), made(&state, "serve-dead")];
        let old = made(&runtime, "serve-old");
        let other = made(&runtime, "jail-x");
        let claim = claim(&[&live[0], &live[1]]).unwrap();
        drop(super::claim(&[&dead[0], &dead[1]]).unwrap());
        File::create(other.join("lock")).unwrap();
        // A socket file of a VMM that is gone: its stop fails, quickly.
        let sock = dead[0].join("sbx").join("api.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        assert_eq!(api_sockets(&dead[0], 2), vec![sock]);
        assert_eq!(sweep(&runtime, &state), 0);
        assert!(
            dead.iter().all(|d| !d.exists()),
            "an ended server's folders go"
        );
        assert!(live.iter().all(|d| d.exists()) && old.exists() && other.exists());
        drop(claim);
        sweep(&runtime, &state);
        assert!(
            live.iter().all(|d| !d.exists()),
            "once their locks are free"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
