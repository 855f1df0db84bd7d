//! File requests: put, get, stat, list, mkdir, move, remove
//! (docs/agent-protocol.md). Paths are the guest's own: the agent runs as
//! root in the guest, and the guest is the sandbox; nothing here guards a
//! boundary. A relative path starts from the requesting user's home.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmm_agent::{read_frame, Entry, FrameType, Response, MAX_LIST_DEPTH, MAX_LIST_ENTRIES};

use super::command;

/// The error answer for `e`, flagged when it is "not found" or "exists".
fn failed(what: String, e: &io::Error) -> Response {
    let mut r = Response::error(format!("{what}: {e}"));
    r.not_found = e.kind() == io::ErrorKind::NotFound;
    r.exists = e.kind() == io::ErrorKind::AlreadyExists;
    r
}

/// `path` made absolute: a relative one starts from `user`'s home.
pub fn resolve(path: &str, user: Option<&str>) -> io::Result<PathBuf> {
    if path.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
    }
    let p = Path::new(path);
    Ok(match p.is_absolute() {
        true => p.to_path_buf(),
        false => Path::new(&command::home(user)?).join(p),
    })
}

/// Uid and gid to names, read once per request from the guest's files.
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn load() -> Names {
        let table = |file: &str| -> HashMap<u32, String> {
            fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
                })
                .collect()
        };
        Names {
            users: table("/etc/passwd"),
            groups: table("/etc/group"),
        }
    }

    fn entry(&self, path: &Path, meta: &Metadata) -> Entry {
        let ft = meta.file_type();
        let kind = if ft.is_symlink() {
            "symlink"
        } else if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else {
            "other"
        };
        let name_of =
            |t: &HashMap<u32, String>, id: u32| t.get(&id).cloned().unwrap_or(id.to_string());
        Entry {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "/".into()),
            path: path.to_string_lossy().into_owned(),
            kind: kind.into(),
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            owner: name_of(&self.users, meta.uid()),
            group: name_of(&self.groups, meta.gid()),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            symlink_target: ft
                .is_symlink()
                .then(|| fs::read_link(path).ok())
                .flatten()
                .map(|t| t.to_string_lossy().into_owned()),
        }
    }
}

fn answer(entries: Vec<Entry>) -> Response {
    Response {
        entries: Some(entries),
        ..Default::default()
    }
}

fn stat_entry(path: &Path) -> io::Result<Entry> {
    let meta = fs::symlink_metadata(path)?;
    Ok(Names::load().entry(path, &meta))
}

pub fn stat(path: &str, user: Option<&str>) -> Response {
    let path = match resolve(path, user) {
        Ok(p) => p,
        Err(e) => return failed(format!("cannot resolve {path}"), &e),
    };
    match stat_entry(&path) {
        Ok(e) => answer(vec![e]),
        Err(e) => failed(format!("cannot stat {}", path.display()), &e),
    }
}

pub fn list(path: &str, depth: u32, user: Option<&str>) -> Response {
    let root = match resolve(path, user) {
        Ok(p) => p,
        Err(e) => return failed(format!("cannot resolve {path}"), &e),
    };
    if depth == 0 || depth > MAX_LIST_DEPTH {
        return Response::error(format!(
            "the depth must be 1 to {MAX_LIST_DEPTH}, not {depth}"
        ));
    }
    match fs::metadata(&root) {
        Ok(m) if !m.is_dir() => {
            return Response::error(format!("{} is not a folder", root.display()))
        }
        Ok(_) => {}
        Err(e) => return failed(format!("cannot list {}", root.display()), &e),
    }
    let names = Names::load();
    let mut out = Vec::new();
    let mut truncated = false;
    // Breadth first, so a truncated answer holds the shallow entries.
    let mut level = vec![root.clone()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in level {
            let Ok(read) = fs::read_dir(&dir) else {
                if dir == root {
                    return Response::error(format!("cannot list {}", dir.display()));
                }
                continue;
            };
            let mut items: Vec<_> = read.filter_map(Result::ok).collect();
            items.sort_by_key(|e| e.file_name());
            for item in items {
                if out.len() == MAX_LIST_ENTRIES {
                    truncated = true;
                    break;
                }
                let Ok(meta) = fs::symlink_metadata(item.path()) else {
                    continue;
                };
                if meta.is_dir() {
                    next.push(item.path());
                }
                out.push(names.entry(&item.path(), &meta));
            }
        }
        level = next;
    }
    Response {
        entries: Some(out),
        truncated,
        ..Default::default()
    }
}

pub fn mkdir(path: &str, user: Option<&str>) -> Response {
    let path = match resolve(path, user) {
        Ok(p) => p,
        Err(e) => return failed(format!("cannot resolve {path}"), &e),
    };
    if fs::symlink_metadata(&path).is_ok() {
        let e = io::Error::from(io::ErrorKind::AlreadyExists);
        return failed(format!("cannot make {}", path.display()), &e);
    }
    let made = fs::create_dir_all(&path).and_then(|()| own(&path, user));
    match made.and_then(|()| stat_entry(&path)) {
        Ok(e) => answer(vec![e]),
        Err(e) => failed(format!("cannot make {}", path.display()), &e),
    }
}

pub fn rename(from: &str, to: &str, user: Option<&str>) -> Response {
    let (from, to) = match (resolve(from, user), resolve(to, user)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return failed("cannot resolve the paths".into(), &e),
    };
    match fs::rename(&from, &to).and_then(|()| stat_entry(&to)) {
        Ok(e) => answer(vec![e]),
        Err(e) => failed(
            format!("cannot move {} to {}", from.display(), to.display()),
            &e,
        ),
    }
}

pub fn remove(path: &str, user: Option<&str>) -> Response {
    let path = match resolve(path, user) {
        Ok(p) => p,
        Err(e) => return failed(format!("cannot resolve {path}"), &e),
    };
    let removed = match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
        Ok(_) => fs::remove_file(&path),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Response::default(),
        Err(e) => failed(format!("cannot remove {}", path.display()), &e),
    }
}

/// Gives `path` to `user` (when the request names one).
fn own(path: &Path, user: Option<&str>) -> io::Result<()> {
    let Some(spec) = user else { return Ok(()) };
    let Some(who) = command::credentials(Some(spec))? else {
        return Ok(());
    };
    std::os::unix::fs::lchown(path, Some(who.uid), Some(who.gid))
}

/// The request for a put, as it came.
pub struct PutRequest<'a> {
    pub path: &'a str,
    pub mode: u32,
    pub user: Option<&'a str>,
    pub parents: bool,
}

pub fn put(req: PutRequest, reader: &mut File) -> Response {
    let path = match resolve(req.path, req.user) {
        Ok(p) => p,
        Err(e) => return failed(format!("cannot resolve {}", req.path), &e),
    };
    if req.parents {
        if let Some(parent) = path.parent() {
            if let Err(e) = make_parents(parent, req.user) {
                return failed(format!("cannot make {}", parent.display()), &e);
            }
        }
    }
    let mut file = match fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(req.mode)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => return failed(format!("cannot create {}", path.display()), &e),
    };
    let mut size = 0u64;
    loop {
        match read_frame(reader) {
            Ok(Some((FrameType::Stdin, data))) if data.is_empty() => break,
            Ok(Some((FrameType::Stdin, data))) => {
                if let Err(e) = file.write_all(&data) {
                    return failed(format!("cannot write {}", path.display()), &e);
                }
                size += data.len() as u64;
            }
            _ => return Response::error("the file data ended early"),
        }
    }
    if let Err(e) = file.sync_all().and_then(|()| own(&path, req.user)) {
        return failed(format!("cannot finish {}", path.display()), &e);
    }
    match stat_entry(&path) {
        Ok(e) => Response {
            size: Some(size),
            entries: Some(vec![e]),
            ..Default::default()
        },
        Err(e) => failed(format!("cannot stat {}", path.display()), &e),
    }
}

/// Makes the missing folders of `dir`, each owned by `user`.
fn make_parents(dir: &Path, user: Option<&str>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(up) = dir.parent() {
        make_parents(up, user)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => own(dir, user),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn get(path: &str, user: Option<&str>, writer: &Arc<Mutex<File>>) -> Response {
    let path = match resolve(path, user) {
        Ok(p) => p,
        Err(e) => return failed(format!("cannot resolve {path}"), &e),
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return failed(format!("cannot open {}", path.display()), &e),
    };
    let meta = match file.metadata() {
        Ok(m) if m.is_dir() => return Response::error(format!("{} is a folder", path.display())),
        Ok(m) => m,
        Err(e) => return failed(format!("cannot stat {}", path.display()), &e),
    };
    super::server::pump(file, FrameType::Stdout, writer.clone());
    Response {
        size: Some(meta.len()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths_stay_and_empty_ones_are_refused() {
        assert_eq!(resolve("/a/b", None).unwrap(), PathBuf::from("/a/b"));
        assert!(resolve("", None).is_err());
    }

    #[test]
    fn list_walks_breadth_first_to_the_depth_asked() {
        let dir = std::env::temp_dir().join(format!("vmm-agent-list-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/deep"), b"x").unwrap();
        fs::write(dir.join("top"), b"xy").unwrap();
        std::os::unix::fs::symlink("top", dir.join("link")).unwrap();
        let root = dir.to_str().unwrap();
        let one = list(root, 1, None).entries.unwrap();
        let names: Vec<_> = one
            .iter()
            .map(|e| (e.name.as_str(), e.kind.as_str()))
            .collect();
        assert_eq!(names, [("a", "dir"), ("link", "symlink"), ("top", "file")]);
        assert_eq!(one[1].symlink_target.as_deref(), Some("top"));
        assert_eq!(one[2].size, 2);
        let three = list(root, 3, None).entries.unwrap();
        assert_eq!(three.len(), 5);
        assert_eq!(three.last().unwrap().name, "deep");
        assert!(list(root, 0, None).error.is_some());
        assert!(list(root, MAX_LIST_DEPTH + 1, None).error.is_some());
        let missing = list(&format!("{root}/nope"), 1, None);
        assert!(missing.not_found);
        assert!(mkdir(root, None).exists);
        let _ = fs::remove_dir_all(&dir);
    }
}
