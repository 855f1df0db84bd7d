//! A jail's folder on the host, `<runtime dir>/jail-<random>`: `root` (the
//! mount point of its private root), `tmp` (its `/tmp`), `run` (its
//! runtime folder, fork children's sockets) and `lock`, which the jail's
//! processes hold locked for as long as the jail lives. The launcher
//! removes the folder when the jail ends; a folder whose lock nobody holds
//! (its launcher was killed) is removed by the next jail made.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::Error;

pub struct JailFolder {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub tmp: PathBuf,
    pub run: PathBuf,
    /// Held locked by the launcher, the init and the VMM (inherited).
    _lock: File,
}

fn setup(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Setup { what, source }
}

/// Takes the lock of `file` without waiting; false when a jail holds it.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a descriptor `file` owns.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl JailFolder {
    /// A new folder in this user's runtime directory, after removing the
    /// folders of jails that ended without their launcher.
    pub fn create() -> Result<JailFolder, Error> {
        let base = crate::runtime::user_dir()?;
        sweep(&base);
        let dir = crate::runtime::RuntimeDir::create("jail")?.keep();
        // The lock is made under another name and takes its own name only
        // once held: another launcher's sweep never finds it unheld.
        let lock_path = dir.join("lock");
        let new_lock = dir.join("lock.new");
        let made = File::create(&new_lock)
            .map_err(setup(format!("make {}", new_lock.display())))
            .and_then(|lock| {
                if !try_lock(&lock) {
                    return Err(setup(format!("lock {}", new_lock.display()))(
                        std::io::Error::last_os_error(),
                    ));
                }
                std::fs::rename(&new_lock, &lock_path)
                    .map_err(setup(format!("rename {}", new_lock.display())))?;
                let folder = JailFolder {
                    root: dir.join("root"),
                    tmp: dir.join("tmp"),
                    run: dir.join("run"),
                    dir: dir.clone(),
                    _lock: lock,
                };
                for d in [&folder.root, &folder.tmp, &folder.run] {
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(d)
                        .map_err(setup(format!("make {}", d.display())))?;
                }
                Ok(folder)
            });
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }
}

/// Removes the jail folders in `base` whose lock nobody holds.
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("jail-") {
            continue;
        }
        let dir = entry.path();
        // A folder without its lock file is being made (or was left
        // half-made): left alone.
        let Ok(lock) = File::open(dir.join("lock")) else {
            continue;
        };
        if try_lock(&lock) {
            tracing::info!(
                "jail: removing {}, left by a jail that ended",
                dir.display()
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_no_jail_holds_are_swept() {
        let base = std::env::temp_dir().join(format!("vmm-jailsweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let made = |name: &str, with_lock: bool| {
            let d = base.join(name);
            std::fs::create_dir_all(d.join("tmp")).unwrap();
            if with_lock {
                File::create(d.join("lock")).unwrap();
            }
            d
        };
        let ended = made("jail-ended", true);
        let live = made("jail-live", true);
        let half = made("jail-half", false);
        let other = made("sandbox-x", true);
        let held = File::open(live.join("lock")).unwrap();
        assert!(try_lock(&held));
        sweep(&base);
        assert!(!ended.exists(), "an ended jail's folder goes");
        assert!(live.exists() && half.exists() && other.exists());
        // Unlocked explicitly: a process another test forks meanwhile holds
        // a copy of the descriptor, which would keep a lock that only
        // closing released.
        // SAFETY: flock on a descriptor `held` owns.
        unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_UN) };
        drop(held);
        sweep(&base);
        assert!(!live.exists(), "once its lock is free");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn jails_made_at_once_never_sweep_each_other() {
        // Each launcher sweeps before making its folder; a folder being
        // made must never look like an ended jail's.
        let makers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..40 {
                        let folder = JailFolder::create().expect("a jail folder");
                        assert!(folder.root.is_dir() && folder.run.is_dir());
                        std::fs::remove_dir_all(&folder.dir).unwrap();
                    }
                })
            })
            .collect();
        for maker in makers {
            maker.join().unwrap();
        }
    }
}
