//! The staging tree: a private host folder that layers are applied to, and
//! the image's own metadata (owners, modes, extended attributes, device
//! numbers, times) that an unprivileged user cannot give host files.
//!
//! Every path from a layer is resolved the way it would be inside the
//! image: symbolic links in its parent components are followed with the
//! staging root as `/` (an absolute link or `..` never leaves the tree), and
//! the last component is never followed. The folder is 0700 and nothing else
//! writes to it, so a path resolved here stays valid while it is used.
//!
//! Host files only ever get harmless modes (owner read/write, no set-id
//! bits) and no device nodes: what the image really has is kept in a table
//! keyed by inode number and written into the ext4 image afterwards
//! (see `ext4.rs`).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// How many symbolic links one path may pass through (as Linux's limit).
const MAX_LINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("path {0:?} passes through more than 40 symbolic links: the image is malformed")]
    LinkLoop(PathBuf),
    #[error("path {0:?} goes through {1:?}, which is not a folder in the image")]
    NotADirectory(PathBuf, OsString),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a node is, beyond what its host file shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// A character device (major, minor); the host file is an empty
    /// placeholder.
    Char(u32, u32),
    /// A block device (major, minor); the host file is a placeholder.
    Block(u32, u32),
}

/// A node's metadata as the image gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits with set-user-id, set-group-id and sticky (0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Extended attributes (name, value), file capabilities included.
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub special: Option<Special>,
}

impl Meta {
    /// A folder the image implies but never lists: root's, 0755.
    pub fn implied_dir() -> Self {
        Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
            special: None,
        }
    }
}

/// The mode a host file gets for an image mode: no set-id or sticky bits,
/// always readable and writable by its owner (folders also searchable), so
/// that later layers can change it and mkfs can read it.
pub fn host_mode(mode: u32, is_dir: bool) -> u32 {
    let owner = if is_dir { 0o700 } else { 0o600 };
    (mode & 0o777) | owner
}

/// A layer path split into its normal components; `None` for the root
/// itself. `..` and absolute prefixes are dropped the way a chroot would
/// resolve them (`..` at the root stays at the root).
pub fn components(path: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(name) => out.push(name.to_owned()),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The staging folder and the image metadata of every node in it.
pub struct Tree {
    root: PathBuf,
    meta: HashMap<u64, Meta>,
    root_meta: Meta,
}

impl Tree {
    /// Makes `root` (which must not exist) a private staging folder.
    pub fn create(root: &Path) -> Result<Self, Error> {
        std::fs::create_dir(root).map_err(io(root))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(io(root))?;
        Ok(Tree {
            root: root.to_owned(),
            meta: HashMap::new(),
            root_meta: Meta::implied_dir(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image metadata of the root folder.
    pub fn root_meta(&self) -> &Meta {
        &self.root_meta
    }

    /// The image metadata of the host node `inode`, if it was recorded.
    pub fn meta(&self, inode: u64) -> Option<&Meta> {
        self.meta.get(&inode)
    }

    /// Records `meta` for the node at host path `path` and gives the host
    /// file its harmless mode and the image's modification time.
    pub fn record(&mut self, path: &Path, meta: Meta) -> Result<(), Error> {
        let st = std::fs::symlink_metadata(path).map_err(io(path))?;
        if path == self.root {
            self.root_meta = meta;
            return Ok(());
        }
        if !st.file_type().is_symlink() {
            let want = host_mode(meta.mode, st.is_dir());
            if st.mode() & 0o7777 != want {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))
                    .map_err(io(path))?;
            }
        }
        set_mtime(path, meta.mtime)?;
        self.meta.insert(st.ino(), meta);
        Ok(())
    }

    /// Resolves the folder that holds `parts`' last component, following
    /// links in the image's terms. With `create`, missing folders are made
    /// (root's, 0755, as the image implies them); without, `Ok(None)` says
    /// one is missing.
    pub fn parent_of(
        &mut self,
        path: &Path,
        parts: &[OsString],
        create: bool,
    ) -> Result<Option<PathBuf>, Error> {
        let Some((_, dirs)) = parts.split_last() else {
            return Ok(None);
        };
        let mut links = 0;
        let mut stack: Vec<OsString> = dirs.iter().rev().cloned().collect();
        let mut here: Vec<OsString> = Vec::new();
        while let Some(name) = stack.pop() {
            if name == ".." {
                here.pop();
                continue;
            }
            let mut candidate = self.host_path(&here);
            candidate.push(&name);
            match std::fs::symlink_metadata(&candidate) {
                Ok(st) if st.is_dir() => here.push(name),
                Ok(st) if st.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(Error::LinkLoop(path.to_owned()));
                    }
                    let target = std::fs::read_link(&candidate).map_err(io(&candidate))?;
                    if target.is_absolute() {
                        here.clear();
                    }
                    for part in target.components().rev() {
                        match part {
                            Component::Normal(n) => stack.push(n.to_owned()),
                            Component::ParentDir => stack.push("..".into()),
                            _ => {}
                        }
                    }
                }
                Ok(_) => {
                    return Err(Error::NotADirectory(path.to_owned(), name));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    std::fs::create_dir(&candidate).map_err(io(&candidate))?;
                    self.record(&candidate, Meta::implied_dir())?;
                    here.push(name);
                }
                Err(e) => return Err(io(&candidate)(e)),
            }
        }
        Ok(Some(self.host_path(&here)))
    }

    fn host_path(&self, parts: &[OsString]) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(parts);
        p
    }
}

/// Removes whatever is at host path `path` (a folder with its contents);
/// nothing there is fine.
pub fn remove(path: &Path) -> Result<(), Error> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(st) if st.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io(path))
}

/// Sets a node's modification (and access) time without following a link.
fn set_mtime(path: &Path, mtime: i64) -> Result<(), Error> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Io {
        path: path.to_owned(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    let t = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: a valid NUL-terminated path and two timespecs; no link is
    // followed.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io(path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets a folder's time again after its contents changed it.
pub fn restore_mtime(path: &Path, meta: &Meta) -> Result<(), Error> {
    set_mtime(path, meta.mtime)
}

/// The last component of a host path as text.
pub fn file_name(path: &Path) -> &OsStr {
    path.file_name().unwrap_or_else(|| OsStr::from_bytes(b"/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(p: &str) -> Vec<OsString> {
        components(Path::new(p))
    }

    fn parent(tree: &mut Tree, p: &str, create: bool) -> Result<Option<PathBuf>, Error> {
        tree.parent_of(Path::new(p), &parts(p), create)
    }

    #[test]
    fn components_resolve_like_a_chroot() {
        assert_eq!(parts("./usr/bin/"), vec!["usr", "bin"]);
        assert_eq!(parts("/../../etc/passwd"), vec!["etc", "passwd"]);
        assert_eq!(parts("a/b/../c"), vec!["a", "c"]);
        assert!(parts("./").is_empty());
    }

    #[test]
    fn links_in_parents_stay_inside_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::create(&dir.path().join("root")).unwrap();
        let root = tree.root().to_owned();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("hostetc")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();

        assert_eq!(
            parent(&mut tree, "lib/x.so", false).unwrap(),
            Some(root.join("usr/lib"))
        );
        assert_eq!(
            parent(&mut tree, "up/tmp/x", true).unwrap(),
            Some(root.join("tmp"))
        );
        // An absolute link means the image's /etc, made inside the tree.
        assert_eq!(
            parent(&mut tree, "hostetc/passwd", true).unwrap(),
            Some(root.join("etc"))
        );
        assert!(matches!(
            parent(&mut tree, "loop/x", true),
            Err(Error::LinkLoop(_))
        ));
        std::fs::write(root.join("file"), b"").unwrap();
        assert!(matches!(
            parent(&mut tree, "file/x", true),
            Err(Error::NotADirectory(..))
        ));
        assert_eq!(parent(&mut tree, "missing/x", false).unwrap(), None);
    }

    #[test]
    fn host_files_get_harmless_modes() {
        assert_eq!(host_mode(0o4755, false), 0o755);
        assert_eq!(host_mode(0o000, false), 0o600);
        assert_eq!(host_mode(0o1777, true), 0o777);
        assert_eq!(host_mode(0o555, true), 0o755);
    }
}
