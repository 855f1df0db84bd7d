//! Applying one layer (an uncompressed tar stream) to the staging tree, as
//! the OCI image spec's "applying changesets" says: entries are added or
//! replace what is there (folders merge), `.wh.NAME` deletes NAME from the
//! layers below, and `.wh..wh..opq` empties its folder of everything the
//! layers below put there.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::tree::{self, Meta, Special, Tree};

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of the overlay/aufs bookkeeping names layers may carry
/// (`.wh..wh.plnk`, `.wh..wh.aufs`): not part of the image.
const META_PREFIX: &[u8] = b".wh..wh.";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the layer: {0}")]
    Read(std::io::Error),
    #[error("{path:?}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tree(#[from] tree::Error),
    #[error("hard link {path:?} points at {target:?}, which is not in the image: the layer is malformed")]
    MissingLinkTarget { path: PathBuf, target: PathBuf },
    #[error("{path:?} is a hard link to a folder ({target:?}), which file systems cannot hold: the layer is malformed")]
    LinkToFolder { path: PathBuf, target: PathBuf },
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Write {
        path: path.to_owned(),
        source,
    }
}

/// Applies the tar stream `layer` to `tree`.
pub fn apply(tree: &mut Tree, layer: impl Read) -> Result<(), Error> {
    let mut archive = tar::Archive::new(layer);
    let mut ours: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(Error::Read)? {
        let mut entry = entry.map_err(Error::Read)?;
        let raw = entry.path_bytes().into_owned();
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(&raw));
        let parts = tree::components(&path);
        let Some(name) = parts.last().cloned() else {
            let meta = meta_of(&mut entry)?;
            let root = tree.root().to_owned();
            tree.record(&root, meta)?;
            continue;
        };
        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE {
            if let Some(dir) = tree.parent_of(&path, &parts, false)? {
                empty_below(&dir, &ours)?;
            }
            continue;
        }
        if name_bytes.starts_with(META_PREFIX) {
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT) {
            if let Some(dir) = tree.parent_of(&path, &parts, false)? {
                tree::remove(&dir.join(std::ffi::OsStr::from_bytes(hidden)))?;
            }
            continue;
        }
        let dir = tree
            .parent_of(&path, &parts, true)?
            .expect("a path with a last component has a parent");
        let host = dir.join(&name);
        add(tree, &mut entry, &path, &host)?;
        ours.insert(host);
    }
    Ok(())
}

/// Removes everything in `dir` that this layer did not add.
fn empty_below(dir: &Path, ours: &HashSet<PathBuf>) -> Result<(), Error> {
    let children = match std::fs::read_dir(dir) {
        Ok(children) => children,
        Err(e) => return Err(write_err(dir)(e)),
    };
    for child in children {
        let child = child.map_err(write_err(dir))?.path();
        if !ours.contains(&child) {
            tree::remove(&child)?;
        }
    }
    Ok(())
}

/// Adds one entry at host path `host`.
fn add<R: Read>(
    tree: &mut Tree,
    entry: &mut tar::Entry<R>,
    path: &Path,
    host: &Path,
) -> Result<(), Error> {
    use tar::EntryType as T;
    let kind = entry.header().entry_type();
    let existing = std::fs::symlink_metadata(host).ok();
    let merge = kind == T::Directory && existing.as_ref().is_some_and(|m| m.is_dir());
    if existing.is_some() && !merge {
        tree::remove(host)?;
    }
    let mut special = None;
    match kind {
        T::Directory => {
            if !merge {
                std::fs::create_dir(host).map_err(write_err(host))?;
            }
        }
        T::Symlink => {
            let target = link_target(entry)?;
            std::os::unix::fs::symlink(&target, host).map_err(write_err(host))?;
        }
        T::Link => {
            let target = link_target(entry)?;
            return hard_link(tree, path, &target, host);
        }
        T::Char | T::Block => {
            let (major, minor) = device(entry)?;
            special = Some(if kind == T::Char {
                Special::Char(major, minor)
            } else {
                Special::Block(major, minor)
            });
            placeholder(host)?;
        }
        T::Fifo => {
            let c = std::ffi::CString::new(host.as_os_str().as_bytes())
                .map_err(|_| write_err(host)(std::io::ErrorKind::InvalidInput.into()))?;
            // SAFETY: a valid NUL-terminated path; mkfifo creates a node.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(write_err(host)(std::io::Error::last_os_error()));
            }
        }
        // Regular files; anything else a tar may carry (sockets, contiguous
        // files, GNU sparse files) is stored as a regular file.
        _ => {
            let mut file = placeholder(host)?;
            std::io::copy(entry, &mut file).map_err(Error::Read)?;
        }
    }
    let mut meta = meta_of(entry)?;
    meta.special = special;
    tree.record(host, meta)?;
    Ok(())
}

/// Creates a new empty host file only its owner can use.
fn placeholder(host: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(host)
        .map_err(write_err(host))
}

fn hard_link(tree: &mut Tree, path: &Path, target: &Path, host: &Path) -> Result<(), Error> {
    let parts = tree::components(target);
    let missing = || Error::MissingLinkTarget {
        path: path.to_owned(),
        target: target.to_owned(),
    };
    let name = parts.last().ok_or_else(missing)?;
    let dir = tree.parent_of(target, &parts, false)?.ok_or_else(missing)?;
    let source = dir.join(name);
    match std::fs::symlink_metadata(&source) {
        Ok(st) if st.is_dir() => {
            return Err(Error::LinkToFolder {
                path: path.to_owned(),
                target: target.to_owned(),
            })
        }
        Ok(_) => {}
        Err(_) => return Err(missing()),
    }
    std::fs::hard_link(&source, host).map_err(write_err(host))
}

fn link_target<R: Read>(entry: &tar::Entry<R>) -> Result<PathBuf, Error> {
    let target = entry
        .link_name_bytes()
        .ok_or_else(|| Error::Read(std::io::Error::other("a link entry has no target")))?;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&target)))
}

fn device<R: Read>(entry: &tar::Entry<R>) -> Result<(u32, u32), Error> {
    let h = entry.header();
    let major = h.device_major().map_err(Error::Read)?.unwrap_or(0);
    let minor = h.device_minor().map_err(Error::Read)?.unwrap_or(0);
    Ok((major, minor))
}

/// The entry's metadata: its header, with PAX records (`uid`, `gid`,
/// `mtime`, `SCHILY.xattr.*`) taking precedence.
fn meta_of<R: Read>(entry: &mut tar::Entry<R>) -> Result<Meta, Error> {
    let h = entry.header();
    let mut meta = Meta {
        mode: h.mode().map_err(Error::Read)? & 0o7777,
        uid: h.uid().map_err(Error::Read)? as u32,
        gid: h.gid().map_err(Error::Read)? as u32,
        mtime: h.mtime().map_err(Error::Read)? as i64,
        xattrs: Vec::new(),
        special: None,
    };
    if let Some(records) = entry.pax_extensions().map_err(Error::Read)? {
        for record in records {
            let record = record.map_err(Error::Read)?;
            let Ok(key) = record.key() else { continue };
            let text = || std::str::from_utf8(record.value_bytes()).ok();
            match key {
                "uid" => meta.uid = text().and_then(|v| v.parse().ok()).unwrap_or(meta.uid),
                "gid" => meta.gid = text().and_then(|v| v.parse().ok()).unwrap_or(meta.gid),
                "mtime" => {
                    meta.mtime = text()
                        .and_then(|v| v.split('.').next()?.parse().ok())
                        .unwrap_or(meta.mtime)
                }
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        meta.xattrs
                            .push((name.to_owned(), record.value_bytes().to_vec()));
                    }
                }
            }
        }
    }
    Ok(meta)
}
