//! The in-sandbox API (envd's): Connect RPC `process.Process` and
//! `filesystem.Filesystem`, HTTP `/files`, `/health` and `/envs`, routed
//! by the `E2b-Sandbox-Id` header to one sandbox.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Response, StatusCode};
use vmm_agent::Request as AgentRequest;

use super::connect::{self, Code, Codec, Error, Stream};
use super::envd::filesystem as fs;
use super::envd::process as proc_pb;
use super::filesystem;
use super::http::{self, HttpBody};
use super::process::{self, CallInfo};
use super::sandboxes::Sandbox;

/// Whether a request is for the in-sandbox API.
pub fn is_sandbox_route(headers: &HeaderMap, path: &str) -> bool {
    headers.contains_key("e2b-sandbox-id")
        || path.starts_with("/process.Process/")
        || path.starts_with("/filesystem.Filesystem/")
        || matches!(path, "/files" | "/health" | "/envs")
}

/// The user a call runs as: `Authorization: Basic base64("user:")`.
fn user_of(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split(':').next()?.to_string();
    (!user.is_empty()).then_some(user)
}

fn call_info(headers: &HeaderMap) -> CallInfo {
    let secs = |name: &str, scale: u64| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n > 0)
            .map(|n| Duration::from_millis(n.saturating_mul(scale)))
    };
    CallInfo {
        user: user_of(headers),
        keepalive: secs("keepalive-ping-interval", 1000),
        deadline: secs("connect-timeout-ms", 1),
    }
}

/// Answers one in-sandbox request for `sandbox` (already authorized).
pub async fn handle(
    sandbox: Arc<Sandbox>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Incoming,
) -> Response<HttpBody> {
    match (method, path) {
        (&Method::GET, "/health") => http::empty(StatusCode::NO_CONTENT),
        (&Method::GET, "/envs") => http::json(StatusCode::OK, &sandbox.env_vars),
        (&Method::GET, "/files") => filesystem::download(&sandbox, query).await,
        (&Method::POST, "/files") => filesystem::upload(&sandbox, query, headers, body).await,
        (&Method::POST, rpc)
            if rpc.starts_with("/process.Process/")
                || rpc.starts_with("/filesystem.Filesystem/") =>
        {
            let (codec, streaming) = match Codec::of(headers) {
                Ok(c) => c,
                Err(e) => return connect::failed(Codec::Json, false, e),
            };
            rpc_call(sandbox, &rpc[1..], codec, streaming, headers, body).await
        }
        _ => http::error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
    }
}

/// Reads the request message of a unary or server-streaming call.
macro_rules! request {
    ($ty:ty, $headers:expr, $body:expr, $codec:expr, $streaming:expr) => {
        match connect::read_request::<$ty>($headers, $body, $codec, $streaming).await {
            Ok(r) => r,
            Err(e) => return connect::failed($codec, $streaming, e),
        }
    };
}

async fn rpc_call(
    sandbox: Arc<Sandbox>,
    method: &str,
    codec: Codec,
    streaming: bool,
    headers: &HeaderMap,
    body: Incoming,
) -> Response<HttpBody> {
    let want_stream = matches!(
        method,
        "process.Process/Start"
            | "process.Process/Connect"
            | "process.Process/StreamInput"
            | "filesystem.Filesystem/WatchDir"
    );
    if want_stream != streaming {
        let e = Error::new(
            Code::InvalidArgument,
            format!(
                "{method} is a {} call",
                if want_stream { "streaming" } else { "unary" }
            ),
        );
        return connect::failed(codec, streaming, e);
    }
    match method {
        "process.Process/Start" => {
            let req = request!(proc_pb::StartRequest, headers, body, codec, true);
            let (stream, resp) = Stream::open(codec);
            let info = call_info(headers);
            tokio::spawn(process::start(sandbox, req, info, stream));
            resp
        }
        "process.Process/Connect" => {
            let req = request!(proc_pb::ConnectRequest, headers, body, codec, true);
            let (stream, resp) = Stream::open(codec);
            let info = call_info(headers);
            tokio::spawn(process::connect(sandbox, req.process, info, stream));
            resp
        }
        "process.Process/StreamInput" => {
            let (stream, resp) = Stream::open(codec);
            tokio::spawn(async move {
                let mut stream = stream;
                match process::stream_input(&sandbox, codec, body).await {
                    Ok(()) => {
                        stream.send(&proc_pb::StreamInputResponse {}).await;
                        stream.end(None).await
                    }
                    Err(e) => stream.end(Some(e)).await,
                }
            });
            resp
        }
        "process.Process/List" => {
            let _ = request!(proc_pb::ListRequest, headers, body, codec, false);
            connect::unary(codec, Ok(process::list(&sandbox)))
        }
        "process.Process/SendSignal" => {
            let req = request!(proc_pb::SendSignalRequest, headers, body, codec, false);
            let r = process::send_signal(&sandbox, req.process, req.signal).await;
            connect::unary(codec, r.map(|()| proc_pb::SendSignalResponse {}))
        }
        "process.Process/SendInput" => {
            let req = request!(proc_pb::SendInputRequest, headers, body, codec, false);
            let input = req.input.unwrap_or_default();
            let r = process::send_input(&sandbox, req.process, Some(input)).await;
            connect::unary(codec, r.map(|()| proc_pb::SendInputResponse {}))
        }
        "process.Process/CloseStdin" => {
            let req = request!(proc_pb::CloseStdinRequest, headers, body, codec, false);
            let r = process::send_input(&sandbox, req.process, None).await;
            connect::unary(codec, r.map(|()| proc_pb::CloseStdinResponse {}))
        }
        "process.Process/Update" => {
            let req = request!(proc_pb::UpdateRequest, headers, body, codec, false);
            let r = process::update(&sandbox, req.process, req.pty).await;
            connect::unary(codec, r.map(|()| proc_pb::UpdateResponse {}))
        }
        "filesystem.Filesystem/WatchDir" => {
            let req = request!(fs::WatchDirRequest, headers, body, codec, true);
            let (stream, resp) = Stream::open(codec);
            let info = call_info(headers);
            tokio::spawn(watch_dir(sandbox, req, info, stream));
            resp
        }
        fs_method if fs_method.starts_with("filesystem.Filesystem/") => {
            filesystem_call(
                &sandbox,
                &fs_method["filesystem.Filesystem/".len()..],
                codec,
                headers,
                body,
            )
            .await
        }
        other => connect::failed(
            codec,
            streaming,
            Error::new(Code::Unimplemented, format!("no method {other}")),
        ),
    }
}

async fn filesystem_call(
    sandbox: &Sandbox,
    method: &str,
    codec: Codec,
    headers: &HeaderMap,
    body: Incoming,
) -> Response<HttpBody> {
    let user = user_of(headers);
    match method {
        "Stat" => {
            let req = request!(fs::StatRequest, headers, body, codec, false);
            let r = filesystem::call(
                sandbox,
                &AgentRequest::Stat {
                    path: req.path,
                    user,
                },
            )
            .await;
            connect::unary(
                codec,
                r.and_then(filesystem::first)
                    .map(|e| fs::StatResponse { entry: Some(e) }),
            )
        }
        "ListDir" => {
            let req = request!(fs::ListDirRequest, headers, body, codec, false);
            let depth = req.depth.max(1);
            let r = filesystem::call(
                sandbox,
                &AgentRequest::List {
                    path: req.path,
                    depth,
                    user,
                },
            )
            .await;
            let entries = r.map(|es| es.into_iter().map(filesystem::entry_info).collect());
            connect::unary(
                codec,
                entries.map(|entries| fs::ListDirResponse { entries }),
            )
        }
        "MakeDir" => {
            let req = request!(fs::MakeDirRequest, headers, body, codec, false);
            let r = filesystem::call(
                sandbox,
                &AgentRequest::Mkdir {
                    path: req.path,
                    user,
                },
            )
            .await;
            connect::unary(
                codec,
                r.and_then(filesystem::first)
                    .map(|e| fs::MakeDirResponse { entry: Some(e) }),
            )
        }
        "Move" => {
            let req = request!(fs::MoveRequest, headers, body, codec, false);
            let r = filesystem::call(
                sandbox,
                &AgentRequest::Move {
                    from: req.source,
                    to: req.destination,
                    user,
                },
            )
            .await;
            connect::unary(
                codec,
                r.and_then(filesystem::first)
                    .map(|e| fs::MoveResponse { entry: Some(e) }),
            )
        }
        "Remove" => {
            let req = request!(fs::RemoveRequest, headers, body, codec, false);
            let r = filesystem::call(
                sandbox,
                &AgentRequest::Remove {
                    path: req.path,
                    user,
                },
            )
            .await;
            connect::unary(codec, r.map(|_| fs::RemoveResponse {}))
        }
        "CreateWatcher" => {
            let req = request!(fs::CreateWatcherRequest, headers, body, codec, false);
            let r = sandbox
                .watchers
                .create(sandbox, req.path, req.recursive, user)
                .await;
            connect::unary(
                codec,
                r.map(|watcher_id| fs::CreateWatcherResponse { watcher_id }),
            )
        }
        "GetWatcherEvents" => {
            let req = request!(fs::GetWatcherEventsRequest, headers, body, codec, false);
            let r = sandbox.watchers.take(&req.watcher_id);
            connect::unary(
                codec,
                r.map(|events| fs::GetWatcherEventsResponse { events }),
            )
        }
        "RemoveWatcher" => {
            let req = request!(fs::RemoveWatcherRequest, headers, body, codec, false);
            let r = sandbox.watchers.remove(&req.watcher_id);
            connect::unary(codec, r.map(|()| fs::RemoveWatcherResponse {}))
        }
        other => connect::failed(
            codec,
            false,
            Error::new(
                Code::Unimplemented,
                format!("no method filesystem.Filesystem/{other}"),
            ),
        ),
    }
}

/// `WatchDir`: the folder's changes, streamed until the caller leaves,
/// its deadline passes or the folder goes.
async fn watch_dir(
    sandbox: Arc<Sandbox>,
    req: fs::WatchDirRequest,
    info: CallInfo,
    mut stream: Stream,
) {
    use fs::watch_dir_response::{Event, KeepAlive, StartEvent};
    let wrap = |e| fs::WatchDirResponse { event: Some(e) };
    let (mut reader, _writer) =
        match filesystem::open_watch(&sandbox, req.path, req.recursive, info.user.clone()).await {
            Ok(w) => w,
            Err(e) => return stream.end(Some(e)).await,
        };
    if !stream.send(&wrap(Event::Start(StartEvent {}))).await {
        return;
    }
    let keepalive = info.keepalive.unwrap_or(Duration::from_secs(3600));
    let deadline =
        tokio::time::Instant::now() + info.deadline.unwrap_or(Duration::from_secs(365 * 86400));
    loop {
        let next = tokio::time::timeout_at(
            deadline,
            tokio::time::timeout(keepalive, filesystem::next_event(&mut reader)),
        );
        let sent = match next.await {
            Err(_) => {
                return stream
                    .end(Some(Error::new(
                        Code::DeadlineExceeded,
                        "the watch's timeout passed",
                    )))
                    .await
            }
            Ok(Err(_quiet)) => stream.send(&wrap(Event::Keepalive(KeepAlive {}))).await,
            Ok(Ok(None)) => return stream.end(None).await,
            Ok(Ok(Some(ev))) => stream.send(&wrap(Event::Filesystem(ev))).await,
        };
        if !sent {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_comes_from_basic_auth() {
        let mut h = HeaderMap::new();
        assert_eq!(user_of(&h), None);
        h.insert(
            hyper::header::AUTHORIZATION,
            "Basic dXNlcjo=".parse().unwrap(),
        );
        assert_eq!(user_of(&h).as_deref(), Some("user"));
        h.insert(hyper::header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(user_of(&h), None);
        h.insert("connect-timeout-ms", "1500".parse().unwrap());
        h.insert("keepalive-ping-interval", "50".parse().unwrap());
        let info = call_info(&h);
        assert_eq!(info.deadline, Some(Duration::from_millis(1500)));
        assert_eq!(info.keepalive, Some(Duration::from_secs(50)));
    }
}
