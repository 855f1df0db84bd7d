//! Folders a build fills before it installs them (templates, images):
//! named `.NAME.partial-RANDOM`, locked with `flock` for as long as their
//! build holds them. The lock, not a process id, tells a live build: jailed
//! builds run in PID namespaces of their own. A sweep removes the partial
//! folders nobody holds: those of builds that ended without installing.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What a partial folder's name holds after the name of what it builds.
const MARKER: &str = ".partial-";

#[derive(Debug, thiserror::Error)]
#[error("cannot {what} the build folder {path}: {source}")]
pub struct Error {
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A new partial folder in `store` for `name`, locked for as long as the
/// returned descriptor is open.
pub fn create(store: &Path, name: &str) -> Result<(PathBuf, std::fs::File), Error> {
    let mut tries = 0;
    loop {
        let partial = store.join(format!(".{name}{MARKER}{}", crate::runtime::random_hex(8)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&partial)
            .map_err(io("create", &partial))?;
        let held = std::fs::File::open(&partial).map_err(io("open", &partial))?;
        held.lock().map_err(io("lock", &partial))?;
        // A sweep that took the lock first (between the folder's making
        // and the lock) removed it.
        let inode = held.metadata().map_err(io("read", &partial))?.ino();
        if std::fs::symlink_metadata(&partial).is_ok_and(|m| m.ino() == inode) {
            return Ok((partial, held));
        }
        tries += 1;
        if tries == 3 {
            return Err(io("keep", &partial)(std::io::ErrorKind::NotFound.into()));
        }
    }
}

/// Removes the partial folders in `store` that no build holds locked.
pub fn sweep(store: &Path) {
    for entry in std::fs::read_dir(store).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().contains(MARKER) {
            continue;
        }
        let Ok(folder) = std::fs::File::open(entry.path()) else {
            continue;
        };
        if folder.try_lock().is_ok() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_of_ended_builds_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        let (live, held) = create(store, "t").unwrap();
        // An ended build's folder: nobody holds it (an old build's name
        // with a process id is swept the same way).
        let ended = store.join(".t.partial-4294967294-cd");
        let other = store.join("t");
        for d in [&ended, &other] {
            std::fs::create_dir(d).unwrap();
        }
        sweep(store);
        assert!(live.exists() && other.exists() && !ended.exists());
        // Unlocked explicitly: a process another test forks meanwhile holds
        // a copy of the descriptor, which would keep the lock past a drop.
        held.unlock().unwrap();
        drop(held);
        sweep(store);
        assert!(!live.exists() && other.exists());
    }
}
