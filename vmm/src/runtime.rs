//! Private runtime directories: where a VM's sockets and scratch files go
//! when the caller did not choose a path.
//!
//! Every user has one base directory, `$XDG_RUNTIME_DIR/vmm` when that
//! variable is set, else `<temp dir>/vmm-<uid>`: created 0700, and before
//! each use checked to be a real directory (not a symlink) owned by this
//! user with no access for group or others. Another local user can create
//! `/tmp/vmm-<uid>` first; that is then refused, never used. Each VM gets
//! its own directory in the base, named with random bytes and created
//! with `mkdir` (0700) so a name that already exists is an error, never
//! reused.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the private runtime directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("the runtime directory {path} is not private ({why}): another local user may have made it to capture this user's VM sockets; remove it, or set XDG_RUNTIME_DIR to a directory only you can reach")]
    NotPrivate { path: PathBuf, why: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// This process's effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Random hex, for names nobody can guess.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if vmm_os::fill_random(&mut buf).is_err() {
        // No entropy source at all: fall back to time and pid (still
        // unique, not secret; mkdir's exclusivity is what protects).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return format!("{:x}{:x}", t, std::process::id());
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that `path` is a directory (not a symlink) owned by this user
/// with no access for anyone else.
fn check_private(path: &Path) -> Result<()> {
    let not_private = |why: String| Error::NotPrivate {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|source| Error::Create {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_dir() {
        return Err(not_private("it is not a directory".into()));
    }
    if meta.uid() != euid() {
        return Err(not_private(format!(
            "it belongs to uid {}, not {}",
            meta.uid(),
            euid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(not_private(format!(
            "its mode is {:o}",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Creates `path` with mode 0700; with `exclusive`, a directory already
/// there is an error.
fn make_dir(path: &Path, exclusive: bool) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {
            // The umask may have taken bits away, never added: make it 0700
            // exactly.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| Error::Create {
                    path: path.to_path_buf(),
                    source,
                },
            )
        }
        Err(e) if !exclusive && e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(Error::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// This user's base directory under `parent` (`vmm` in
/// `$XDG_RUNTIME_DIR`, `vmm-<uid>` in the temp dir), created if missing
/// and checked.
fn user_dir_in(parent: &Path, name: &str) -> Result<PathBuf> {
    let dir = parent.join(name);
    make_dir(&dir, false)?;
    check_private(&dir)?;
    Ok(dir)
}

/// A base directory that replaces [`user_dir`]'s choice in this process
/// (a jailed VMM's: the host's is not in its jail).
static BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes `dir` this process's base directory (see [`BASE`]); the first
/// call wins.
pub fn set_user_dir(dir: PathBuf) {
    let _ = BASE.set(dir);
}

/// This user's private base directory (see the module documentation).
pub fn user_dir() -> Result<PathBuf> {
    if let Some(base) = BASE.get() {
        make_dir(base, false)?;
        check_private(base)?;
        return Ok(base.clone());
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(xdg) => user_dir_in(Path::new(&xdg), "vmm"),
        None => user_dir_in(&std::env::temp_dir(), &format!("vmm-{}", euid())),
    }
}

/// One VM's private directory, removed with what it holds when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// A new directory `<prefix>-<random>` in [`user_dir`].
    pub fn create(prefix: &str) -> Result<RuntimeDir> {
        Self::create_in(&user_dir()?, prefix)
    }

    fn create_in(base: &Path, prefix: &str) -> Result<RuntimeDir> {
        let path = base.join(format!("{prefix}-{}", random_hex(8)));
        make_dir(&path, true)?;
        Ok(RuntimeDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's path; it is no longer removed when this is dropped
    /// (its owner removes it).
    pub fn keep(self) -> PathBuf {
        std::mem::ManuallyDrop::new(self).path.clone()
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Runs `f` on a thread whose credentials are uid/gid 65534 (a raw
    /// setresuid changes only the calling thread); None when this process
    /// is not root.
    pub fn as_nobody<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        if !cfg!(target_os = "linux") {
            eprintln!("skipped: switching this thread's ids is Linux's (setresuid per thread)");
            return None;
        }
        if euid() != 0 {
            eprintln!("skipped: switching to uid 65534 needs root");
            return None;
        }
        Some(
            std::thread::spawn(move || {
                // SAFETY: raw syscalls that change this thread's ids only.
                #[cfg(target_os = "linux")]
                unsafe {
                    assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
                    assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
                }
                f()
            })
            .join()
            .unwrap(),
        )
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-rt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Others must be able to enter it for the uid-65534 part.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        dir
    }

    #[test]
    fn directories_are_private_whatever_the_umask() {
        let tmp = scratch("umask");
        // SAFETY: umask only changes this process's creation mask.
        let old = unsafe { libc::umask(0) };
        let made = user_dir_in(&tmp, "vmm-test")
            .and_then(|b| RuntimeDir::create_in(&b, "vm").map(|vm| (b, vm)));
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let (base, vm) = made.unwrap();
        for dir in [&base, &vm.path().to_path_buf()] {
            let mode = std::fs::metadata(dir).unwrap().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
        }
        // The base is reused once it exists and is ours.
        assert_eq!(user_dir_in(&tmp, "vmm-test").unwrap(), base);
        let path = vm.path().to_path_buf();
        drop(vm);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn a_base_made_by_someone_else_or_opened_up_is_refused() {
        let tmp = scratch("foreign");
        // A symlink where the base should be.
        std::os::unix::fs::symlink("/tmp", tmp.join("vmm-link")).unwrap();
        let err = user_dir_in(&tmp, "vmm-link").unwrap_err();
        assert!(matches!(err, Error::NotPrivate { .. }), "{err}");
        // Group- or world-accessible.
        std::fs::create_dir(tmp.join("vmm-open")).unwrap();
        std::fs::set_permissions(tmp.join("vmm-open"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let err = user_dir_in(&tmp, "vmm-open").unwrap_err();
        assert!(err.to_string().contains("mode"), "{err}");
        // Made first by another user (uid 65534), even with mode 0700.
        let t = tmp.clone();
        if as_nobody(move || {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(t.join("vmm-taken"))
                .unwrap()
        })
        .is_some()
        {
            let err = user_dir_in(&tmp, "vmm-taken").unwrap_err();
            assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn another_user_cannot_enter_or_plant_in_a_vm_directory() {
        let tmp = scratch("enter");
        let base = user_dir_in(&tmp, "vmm-test").unwrap();
        let vm = RuntimeDir::create_in(&base, "vm").unwrap();
        let (b, v) = (base.clone(), vm.path().to_path_buf());
        if let Some((list_base, plant)) = as_nobody(move || {
            (
                std::fs::read_dir(&b).map(drop),
                std::fs::write(v.join("api.sock"), b"x"),
            )
        }) {
            assert!(list_base.is_err(), "uid 65534 listed the base");
            assert!(plant.is_err(), "uid 65534 planted a file");
        }
        // A VM directory name that exists already is an error.
        let taken = base.join("vm-fixed");
        std::fs::create_dir(&taken).unwrap();
        assert!(make_dir(&taken, true).is_err());
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
