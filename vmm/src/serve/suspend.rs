//! Paused sandboxes past the server's limit (`--keep-paused SECS`) move to
//! disk: the VM is snapshotted into its folder on disk and its VMM ends,
//! so it holds no memory. A connect brings it back: a VMM restored from
//! that snapshot under the same sockets, with the host-side settings it
//! had (its egress policy as last set among them).
//! Only a sandbox whose VMM this server started, with no fork children
//! alive (their VMMs are its VMM's children), moves.

use std::sync::Arc;

use super::sandboxes::{make_folder, Boot, Error, Registry, Result, Sandbox, State};

/// The snapshot of a sandbox on disk, in its folder there.
fn snapshot_dir(s: &Sandbox) -> std::path::PathBuf {
    s.vm.state.join(format!("{}.paused", s.id))
}

impl Registry {
    /// Starts moving every sandbox paused past the limit to disk (each in a
    /// task of its own; one already moving is left to it).
    pub async fn move_paused_to_disk(self: &Arc<Self>) {
        let Some(limit) = self.settings.keep_paused else {
            return;
        };
        let all = self.all();
        for s in &all {
            let due = s
                .paused_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|at| at.elapsed() >= limit);
            let shared = all.iter().any(|o| o.id != s.id && o.vm.dir == s.vm.dir);
            if !due || shared || !s.vm.own_process || s.state() != State::Paused {
                continue;
            }
            let s = s.clone();
            tokio::spawn(async move {
                let Ok(_moving) = s.transition.try_lock() else {
                    return;
                };
                if s.state() != State::Paused {
                    return;
                }
                match to_disk(&s).await {
                    Ok(()) => {
                        tracing::info!("sandbox {}: paused past the limit; on disk now", s.id)
                    }
                    Err(e) => {
                        tracing::warn!("sandbox {}: cannot move it to disk: {e}", s.id);
                        // Tried again after another limit's time, not every tick.
                        s.set_state(State::Paused);
                    }
                }
            });
        }
    }

    /// Brings a sandbox on disk back (the caller holds its `transition`
    /// and records it running). The snapshot is this server's own, so its host-side
    /// settings (the egress policy as last set among them) are trusted.
    pub async fn from_disk(&self, s: &Sandbox) -> Result<()> {
        let snapshot = snapshot_dir(s);
        let boot = Boot::Snapshot { dir: &snapshot };
        let vm = &s.vm;
        // Its socket folder went with its VMM.
        make_folder(&vm.dir)?;
        let (child, _vsock) = self.spawn(boot, &vm.api_socket, &vm.dir, &vm.state).await?;
        s.vm.set_process(child).await;
        let _ = std::fs::remove_dir_all(&snapshot);
        Ok(())
    }
}

/// Snapshots a paused sandbox into its folder and ends its VMM.
async fn to_disk(s: &Sandbox) -> Result<()> {
    let snapshot = snapshot_dir(s);
    let dir = snapshot.clone();
    let api = s.vm.api();
    let taken = tokio::task::spawn_blocking(move || {
        crate::action::Control::snapshot(&api, &dir, None).map(drop)
    })
    .await
    .map_err(|e| Error::Api(e.to_string()))?;
    if let Err(e) = taken {
        let _ = std::fs::remove_dir_all(&snapshot);
        return Err(Error::Api(e.to_string()));
    }
    s.vm.stop().await;
    s.set_state(State::OnDisk);
    Ok(())
}

/// Removes what a sandbox on disk left (it is killed).
pub fn remove_snapshot(s: &Sandbox) {
    let _ = std::fs::remove_dir_all(snapshot_dir(s));
}
