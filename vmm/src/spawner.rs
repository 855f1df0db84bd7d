//! Starting child processes (fork children) for a device loop whose
//! seccomp filter forbids it.
//!
//! A process started by a filtered thread inherits that thread's filter
//! for good, and the device loop's filter has no `execve`. So a VMM with
//! filters on starts one spawner thread before any filter is installed;
//! it installs the spawner role's filter (what a whole VMM process needs,
//! plus starting one) and starts the processes the device loop asks for.
//! Each child then narrows its own threads to their roles.

use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Mutex, OnceLock};

use crate::seccomp::{self, Role};

type Request = (Command, SyncSender<std::io::Result<Child>>);

static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();

/// Starts the spawner thread of this process (once; later calls return
/// at once). Call it before the calling thread's own filter.
pub fn start() -> seccomp::Result<()> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    let started = STARTED.get_or_init(|| {
        let (tx, requests) = mpsc::channel::<Request>();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                // A fork child's threads start under the filter its parent's
                // spawner had: this one already holds it.
                let applied = match seccomp::filtered() {
                    true => seccomp::name_thread(Role::Spawner.name()),
                    false => seccomp::apply(Role::Spawner),
                };
                let ok = applied.is_ok();
                let _ = ready_tx.send(applied.map_err(|e| e.to_string()));
                if ok {
                    serve(requests);
                }
            });
        if let Err(e) = spawned {
            return Err(format!("cannot start the spawner thread: {e}"));
        }
        ready
            .recv()
            .unwrap_or_else(|_| Err("the spawner thread ended at start".into()))?;
        SPAWNER
            .set(Mutex::new(tx))
            .map_err(|_| "the spawner started twice".to_string())
    });
    started.clone().map_err(|message| seccomp::Error::Install {
        role: Role::Spawner.name(),
        message,
    })
}

fn serve(requests: Receiver<Request>) {
    for (mut cmd, reply) in requests {
        let _ = reply.send(cmd.spawn());
    }
}

/// Starts `cmd`: on the spawner thread when it runs, else here.
pub fn spawn(mut cmd: Command) -> std::io::Result<Child> {
    let Some(spawner) = SPAWNER.get() else {
        return cmd.spawn();
    };
    let (reply, answer) = mpsc::sync_channel(1);
    let sent = spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply));
    let gone = || std::io::Error::other("the spawner thread has ended");
    sent.map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}
