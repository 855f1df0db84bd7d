//! The `watch` request: a folder's changes, streamed as `Event` frames
//! (inotify), until the host closes the connection or the folder goes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmm_agent::{write_json, FrameType, Response, WatchEvent};

/// The most folders one recursive watch follows.
const MAX_WATCHED: usize = 8192;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_ONLYDIR;

struct Watcher {
    fd: File,
    /// Watch descriptor to the folder's path relative to the root.
    dirs: HashMap<i32, PathBuf>,
    root: PathBuf,
    recursive: bool,
}

impl Watcher {
    fn add(&mut self, rel: PathBuf) -> io::Result<()> {
        if self.dirs.len() >= MAX_WATCHED {
            return Ok(());
        }
        let full = self.root.join(&rel);
        let c = std::ffi::CString::new(full.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
        // SAFETY: inotify_add_watch on our inotify fd with a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, rel.clone());
        if self.recursive {
            for entry in std::fs::read_dir(&full)?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    // A folder that went meanwhile is fine.
                    let _ = self.add(rel.join(entry.file_name()));
                }
            }
        }
        Ok(())
    }
}

/// Streams the changes under `path` to `writer` until `reader` (the
/// host's side) closes.
pub fn watch(
    path: &Path,
    recursive: bool,
    reader: &mut File,
    writer: &Arc<Mutex<File>>,
) -> Response {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Response::error(format!("{} is not a folder", path.display())),
        Err(e) => {
            let mut r = Response::error(format!("cannot watch {}: {e}", path.display()));
            r.not_found = e.kind() == io::ErrorKind::NotFound;
            return r;
        }
    }
    // SAFETY: plain inotify_init1(2); the result is checked.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Response::error(format!("cannot watch: {}", io::Error::last_os_error()));
    }
    let mut w = Watcher {
        // SAFETY: `fd` is a new descriptor nothing else owns.
        fd: unsafe { File::from_raw_fd(fd) },
        dirs: HashMap::new(),
        root: path.to_path_buf(),
        recursive,
    };
    if let Err(e) = w.add(PathBuf::new()) {
        return Response::error(format!("cannot watch {}: {e}", path.display()));
    }
    // The first event frame (empty name) says the watch is on.
    if send(writer, "", "start").is_err() {
        return Response::default();
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: w.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: reader.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Response::error("poll failed");
        }
        if fds[1].revents != 0 {
            // Anything from the host (or its end) ends the watch.
            let mut sink = [0u8; 64];
            if matches!(reader.read(&mut sink), Ok(0) | Err(_)) {
                return Response::default();
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        let n = match w.fd.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Response::error(format!("reading changes failed: {e}")),
        };
        let mut off = 0;
        let head = std::mem::size_of::<libc::inotify_event>();
        while off + head <= n {
            // SAFETY: the kernel wrote whole inotify_event records; the
            // header is read unaligned from within the bytes read.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
            let name_bytes = &buf[off + head..(off + head + ev.len as usize).min(n)];
            off += head + ev.len as usize;
            let name = name_bytes.split(|b| *b == 0).next().unwrap_or(&[]);
            let name = String::from_utf8_lossy(name).into_owned();
            if ev.mask & (libc::IN_DELETE_SELF | libc::IN_IGNORED) != 0
                && w.dirs.get(&ev.wd) == Some(&PathBuf::new())
            {
                return Response::default();
            }
            let Some(dir) = w.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let rel = dir.join(&name);
            let new_dir = w.recursive
                && ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
                && ev.mask & libc::IN_ISDIR != 0;
            if new_dir {
                let _ = w.add(rel.clone());
            }
            let kind = if ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                "create"
            } else if ev.mask & libc::IN_MODIFY != 0 {
                "write"
            } else if ev.mask & libc::IN_DELETE != 0 {
                "remove"
            } else if ev.mask & libc::IN_MOVED_FROM != 0 {
                "rename"
            } else if ev.mask & libc::IN_ATTRIB != 0 {
                "chmod"
            } else {
                continue;
            };
            if send(writer, &rel.to_string_lossy(), kind).is_err() {
                return Response::default();
            }
            // What was made in a new folder before its watch was on is
            // reported as made.
            if new_dir && announce_contents(&w.root, &rel, writer).is_err() {
                return Response::default();
            }
        }
    }
}

/// Sends a `create` for everything under `rel` (a folder just watched).
fn announce_contents(root: &Path, rel: &Path, writer: &Arc<Mutex<File>>) -> io::Result<()> {
    let Ok(entries) = std::fs::read_dir(root.join(rel)) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let child = rel.join(entry.file_name());
        send(writer, &child.to_string_lossy(), "create")?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            announce_contents(root, &child, writer)?;
        }
    }
    Ok(())
}

fn send(writer: &Arc<Mutex<File>>, name: &str, kind: &str) -> io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    let ev = WatchEvent {
        name: name.into(),
        kind: kind.into(),
    };
    write_json(&mut *w, FrameType::Event, &ev)
}
