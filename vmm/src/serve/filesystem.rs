//! envd's `filesystem.Filesystem` service and its HTTP `/files` upload
//! and download, over the guest agent's file requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{HeaderMap, Response, StatusCode};
use vmm_agent::{Entry, FrameType, Request};

use super::connect::{Code, Error, Result};
use super::envd::filesystem::{EntryInfo, EventType, FileType, FilesystemEvent};
use super::guest;
use super::http::{self, HttpBody};
use super::sandboxes::Sandbox;

/// The largest file upload accepted, in bytes.
pub const MAX_UPLOAD: u64 = 1 << 30;

/// An agent entry as envd describes it.
pub fn entry_info(e: Entry) -> EntryInfo {
    let kind = match e.kind.as_str() {
        "file" => FileType::File,
        "dir" => FileType::Directory,
        "symlink" => FileType::Symlink,
        _ => FileType::Unspecified,
    };
    EntryInfo {
        permissions: permissions(&e.kind, e.mode),
        name: e.name,
        r#type: kind as i32,
        path: e.path,
        size: e.size as i64,
        mode: e.mode,
        owner: e.owner,
        group: e.group,
        modified_time: Some(pbjson_types::Timestamp {
            seconds: e.mtime_ns.div_euclid(1_000_000_000),
            nanos: e.mtime_ns.rem_euclid(1_000_000_000) as i32,
        }),
        symlink_target: e.symlink_target,
        metadata: Default::default(),
    }
}

/// `ls -l`'s permission text, as Go's `FileMode.String()` writes it.
fn permissions(kind: &str, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        "dir" => 'd',
        "symlink" => 'L',
        _ => '-',
    });
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// One file request; its entries.
pub async fn call(sandbox: &Sandbox, req: &Request) -> Result<Vec<Entry>> {
    let resp = guest::call(&sandbox.vm.vsock, req).await?;
    Ok(resp.entries.unwrap_or_default())
}

/// The first entry of an answer that must have one.
pub fn first(entries: Vec<Entry>) -> Result<EntryInfo> {
    entries
        .into_iter()
        .next()
        .map(entry_info)
        .ok_or_else(|| Error::new(Code::Internal, "the agent answered without the entry"))
}

/// An E2B `/files` error: `{"code", "message"}` with the HTTP status.
fn files_error(e: Error) -> Response<HttpBody> {
    let status = match e.code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::AlreadyExists => StatusCode::BAD_REQUEST,
        Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
        Code::Unavailable => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    http::error(status, e.message)
}

/// `GET /files?path=...&username=...`: the file's bytes, streamed.
pub async fn download(sandbox: &Sandbox, query: Option<&str>) -> Response<HttpBody> {
    let Some(path) = http::query_param(query, "path").filter(|p| !p.is_empty()) else {
        return http::error(
            StatusCode::BAD_REQUEST,
            "the path query parameter is missing",
        );
    };
    let user = http::query_param(query, "username").filter(|u| !u.is_empty());
    let req = Request::Get { path, user };
    let (mut reader, _w) = match guest::open(&sandbox.vm.vsock, &req).await {
        Ok(c) => c,
        Err(e) => return files_error(Error::from(e)),
    };
    // The first frame tells an error (a response) from data.
    let first = match reader.next().await {
        Ok(guest::Frame::Response(r)) if r.error.is_some() => {
            return files_error(Error::from(guest::Error::Agent(r)))
        }
        Ok(f) => f,
        Err(e) => return files_error(Error::from(e)),
    };
    let (mut tx, body) = http::channel(8);
    tokio::spawn(async move {
        let mut frame = Ok(first);
        loop {
            match frame {
                Ok(guest::Frame::Stdout(d)) => {
                    if tx.send_data(Bytes::from(d)).await.is_err() {
                        return;
                    }
                }
                Ok(guest::Frame::Response(r)) if r.error.is_none() => return,
                // A failure after the data started: the body is cut short.
                _ => {
                    tx.abort(std::io::Error::other(
                        "reading the file in the guest failed",
                    ));
                    return;
                }
            }
            frame = reader.next().await;
        }
    });
    http::streamed(StatusCode::OK, "application/octet-stream", body)
}

/// `POST /files?path=...&username=...`: an `application/octet-stream`
/// body (the file) or a `multipart/form-data` one (each part a file,
/// named by `path`, else by its file name). Parent folders are made.
pub async fn upload(
    sandbox: &Sandbox,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Incoming,
) -> Response<HttpBody> {
    let path = http::query_param(query, "path").filter(|p| !p.is_empty());
    let user = http::query_param(query, "username").filter(|u| !u.is_empty());
    let ct = headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let result = match multer::parse_boundary(&ct) {
        Ok(boundary) => upload_multipart(sandbox, path, user, boundary, body).await,
        Err(_) => match path {
            Some(p) => {
                let data = body.into_data_stream();
                upload_one(sandbox, p, user.clone(), data)
                    .await
                    .map(|e| vec![e])
            }
            None => Err(Error::new(
                Code::InvalidArgument,
                "the path query parameter is missing",
            )),
        },
    };
    match result {
        Ok(entries) => {
            let list: Vec<_> = entries
                .into_iter()
                .map(|e| serde_json::json!({"name": e.name, "path": e.path, "type": "file"}))
                .collect();
            http::json(StatusCode::OK, &list)
        }
        Err(e) => files_error(e),
    }
}

async fn upload_multipart(
    sandbox: &Sandbox,
    path: Option<String>,
    user: Option<String>,
    boundary: String,
    body: Incoming,
) -> Result<Vec<Entry>> {
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(MAX_UPLOAD));
    let mut form =
        multer::Multipart::with_constraints(body.into_data_stream(), boundary, constraints);
    let bad =
        |e: multer::Error| Error::new(Code::InvalidArgument, format!("bad multipart body: {e}"));
    let mut out = Vec::new();
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let target = match (&path, field.file_name()) {
            (Some(p), _) => p.clone(),
            (None, Some(name)) if !name.is_empty() => name.to_string(),
            _ => {
                return Err(Error::new(
                    Code::InvalidArgument,
                    "a part has no file name and the request no path",
                ))
            }
        };
        out.push(upload_one(sandbox, target, user.clone(), field).await?);
    }
    Ok(out)
}

/// Streams one file to the agent's `put`.
async fn upload_one<S, E>(
    sandbox: &Sandbox,
    path: String,
    user: Option<String>,
    data: S,
) -> Result<Entry>
where
    S: futures_util::Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    use futures_util::StreamExt;
    let req = Request::Put {
        path,
        mode: 0o644,
        user,
        parents: true,
    };
    let (mut reader, mut writer) = guest::open(&sandbox.vm.vsock, &req).await?;
    let mut data = data;
    let mut total = 0u64;
    loop {
        match data.next().await {
            Some(Ok(chunk)) => {
                total += chunk.len() as u64;
                if total > MAX_UPLOAD {
                    return Err(Error::new(
                        Code::ResourceExhausted,
                        format!("the file is larger than {MAX_UPLOAD} bytes"),
                    ));
                }
                if chunk.is_empty() {
                    continue;
                }
                writer.send(FrameType::Stdin, &chunk).await?;
            }
            Some(Err(e)) => {
                return Err(Error::new(
                    Code::InvalidArgument,
                    format!("the upload failed: {e}"),
                ))
            }
            None => break,
        }
    }
    writer.send(FrameType::Stdin, &[]).await?;
    let resp = reader.finish(|_| {}).await?;
    resp.entries
        .unwrap_or_default()
        .into_iter()
        .next()
        .ok_or_else(|| Error::new(Code::Internal, "the agent answered without the entry"))
}

/// The most events a polled watcher keeps between two reads; past it,
/// newer ones are dropped until the next read.
const MAX_PENDING_EVENTS: usize = 10_000;

/// Starts a watch of `path` in the guest; returns once it is on.
/// The write half goes with it: closing it ends the watch.
pub async fn open_watch(
    sandbox: &Sandbox,
    path: String,
    recursive: bool,
    user: Option<String>,
) -> Result<(guest::Reader, guest::Writer)> {
    let req = Request::Watch {
        path,
        recursive,
        user,
    };
    let (mut reader, writer) = guest::open(&sandbox.vm.vsock, &req).await?;
    match reader.next().await? {
        guest::Frame::Event(e) if e.kind == "start" => Ok((reader, writer)),
        guest::Frame::Response(r) => Err(Error::from(guest::Error::Agent(r))),
        other => Err(Error::new(
            Code::Internal,
            format!("the agent answered {other:?} first"),
        )),
    }
}

/// The next change a watch saw; `None` when the watch ended.
pub async fn next_event(reader: &mut guest::Reader) -> Option<FilesystemEvent> {
    loop {
        let guest::Frame::Event(e) = reader.next().await.ok()? else {
            return None;
        };
        let kind = match e.kind.as_str() {
            "create" => EventType::Create,
            "write" => EventType::Write,
            "remove" => EventType::Remove,
            "rename" => EventType::Rename,
            "chmod" => EventType::Chmod,
            _ => continue,
        };
        return Some(FilesystemEvent {
            name: e.name,
            r#type: kind as i32,
            entry: None,
        });
    }
}

/// A watch the SDK polls (`CreateWatcher`, `GetWatcherEvents`,
/// `RemoveWatcher`): its events wait here between reads.
struct Watcher {
    events: Arc<Mutex<Vec<FilesystemEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

/// A sandbox's polled watchers.
#[derive(Default)]
pub struct Watchers(Mutex<HashMap<String, Watcher>>);

impl Watchers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watcher>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts one; its id.
    pub async fn create(
        &self,
        sandbox: &Sandbox,
        path: String,
        recursive: bool,
        user: Option<String>,
    ) -> Result<String> {
        let (mut reader, writer) = open_watch(sandbox, path, recursive, user).await?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let _writer = writer;
            while let Some(ev) = next_event(&mut reader).await {
                let mut q = sink.lock().unwrap_or_else(|e| e.into_inner());
                if q.len() < MAX_PENDING_EVENTS {
                    q.push(ev);
                }
            }
        });
        let id = crate::runtime::random_hex(16);
        self.map().insert(id.clone(), Watcher { events, task });
        Ok(id)
    }

    /// The events since the last read.
    pub fn take(&self, id: &str) -> Result<Vec<FilesystemEvent>> {
        let map = self.map();
        let w = map
            .get(id)
            .ok_or_else(|| Error::new(Code::NotFound, format!("no watcher {id:?}")))?;
        let mut q = w.events.lock().unwrap_or_else(|e| e.into_inner());
        Ok(std::mem::take(&mut *q))
    }

    /// Stops one (its connection to the agent closes, which ends the
    /// watch in the guest).
    pub fn remove(&self, id: &str) -> Result<()> {
        let w = self
            .map()
            .remove(id)
            .ok_or_else(|| Error::new(Code::NotFound, format!("no watcher {id:?}")))?;
        w.task.abort();
        Ok(())
    }

    /// Stops them all (the sandbox ends).
    pub fn close_all(&self) {
        for (_, w) in self.map().drain() {
            w.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_like_envd() {
        let e = entry_info(Entry {
            name: "a".into(),
            path: "/x/a".into(),
            kind: "dir".into(),
            size: 4096,
            mode: 0o755,
            owner: "root".into(),
            group: "root".into(),
            mtime_ns: 1_500_000_000,
            symlink_target: None,
        });
        assert_eq!(e.r#type, FileType::Directory as i32);
        assert_eq!(e.permissions, "drwxr-xr-x");
        let t = e.modified_time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1, 500_000_000));
        assert_eq!(permissions("file", 0o640), "-rw-r-----");
    }
}
