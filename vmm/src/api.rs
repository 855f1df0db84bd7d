//! The control socket: HTTP/1.1 with JSON bodies on a Unix socket, one
//! request per connection, served by the VMM's event loop. Described by
//! docs/api.yaml; usable with `curl --unix-socket PATH http://vm/...`.
//!
//! - `GET /vm`: the VM's description and state, with `"agent"` `"starting"`
//!   or `"ready"`.
//! - `GET /vm/agent`: answers once the guest agent serves (at once if it
//!   does), so a client never polls.
//! - `PUT /vm/stop`: stop the VM now (the guest gets no chance to sync; use
//!   the agent's shutdown for a clean stop, as `vmm stop` does).
//! - `PUT /vm/pause`, `PUT /vm/resume`.
//! - `PUT /vm/snapshot` `{"dir": PATH}`: write a snapshot directory.
//! - `PUT /vm/fork` `{"count": N, "dir": PATH?}`: start N children that
//!   continue from this instant; answers with their ids and sockets.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::control::Controller;
use crate::fork::ForkOptions;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};

use crate::exit::{ExitReason, ExitSignal};

/// Longest request head or body accepted.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on the API socket {path}: {source}; check that its folder exists and is writable")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot reach the VMM's API socket {path}: {source}; is `vmm launch --api-socket {path}` running?")]
    Connect { path: PathBuf, source: io::Error },
    #[error("the API call failed: {0}")]
    Io(#[from] io::Error),
    #[error("the VMM answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the VMM's answer is not valid: {0}")]
    BadAnswer(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads one HTTP/1.1 request (request line, headers, Content-Length body).
pub fn read_request(stream: &mut impl Read) -> io::Result<HttpRequest> {
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64 * 2));
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not HTTP/1.x"));
    }
    let (method, path) = (method.to_string(), path.to_string());
    let mut length = 0usize;
    let mut head = line.len();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("headers end early"));
        }
        head += line.len();
        if head > MAX_REQUEST {
            return Err(bad("request head too large"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| bad("bad Content-Length"))?;
            }
        }
    }
    if length > MAX_REQUEST {
        return Err(bad("body too large"));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(HttpRequest { method, path, body })
}

fn write_response(stream: &mut impl Write, status: u16, body: &Value) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        _ => "Error",
    };
    let text = if status == 204 {
        String::new()
    } else {
        body.to_string()
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
}

/// What the API reports about the VM.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub vsock: Option<(u64, PathBuf)>,
}

/// The API server, an event-loop subscriber. With a vsock device it also
/// listens for the agent's ready announcement (`<uds_path>_1023`).
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    info: VmInfo,
    exit: Arc<ExitSignal>,
    ready_listener: Option<UnixListener>,
    ready_path: Option<PathBuf>,
    agent_ready: bool,
    /// `GET /vm/agent` callers waiting for the agent.
    waiting: Vec<UnixStream>,
    /// Pause, resume, snapshot and fork (absent in unit tests).
    control: Option<Arc<Mutex<Controller>>>,
    /// Written when a restored guest's agent is ready (after its reseed).
    agent_ready_evt: Option<EventFd>,
    /// Fork children still running, by pidfd (reaped when they end).
    children: Vec<(OwnedFd, std::process::Child)>,
    /// pidfds of new children, to watch.
    new_pidfds: Vec<RawFd>,
    /// A fork was answered: start a spare child for the next one.
    forked: bool,
}

/// An fd that becomes readable when process `pid` ends.
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl ApiServer {
    pub fn bind(path: &Path, info: VmInfo, exit: Arc<ExitSignal>) -> Result<Self> {
        if path.exists() {
            std::fs::remove_file(path).map_err(|source| Error::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::Listen {
            path: path.to_path_buf(),
            source,
        })?;
        listener.set_nonblocking(true)?;
        let ready_path = info
            .vsock
            .as_ref()
            .map(|(_, uds)| crate::agent::ready_socket_path(uds));
        let ready_listener = match &ready_path {
            Some(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p).map_err(|source| Error::Listen {
                    path: p.clone(),
                    source,
                })?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            info,
            exit,
            ready_listener,
            ready_path,
            agent_ready: false,
            waiting: Vec::new(),
            control: None,
            agent_ready_evt: None,
            children: Vec::new(),
            new_pidfds: Vec::new(),
            forked: false,
        })
    }

    /// Serves pause, resume, snapshot and fork through `control`.
    pub fn set_control(&mut self, control: Arc<Mutex<Controller>>) {
        self.control = Some(control);
    }

    /// The agent is reported ready once `evt` is written (a restored guest,
    /// whose agent does not announce itself again).
    pub fn set_agent_ready_evt(&mut self, evt: EventFd) {
        self.agent_ready_evt = Some(evt);
    }

    fn answer_waiting(&mut self) {
        if self.agent_ready {
            for mut w in self.waiting.drain(..) {
                let _ = write_response(&mut w, 200, &json!({"agent": "ready"}));
            }
        }
    }

    fn vm_state(&self) -> &'static str {
        match &self.control {
            Some(c) if c.lock().unwrap_or_else(|e| e.into_inner()).is_paused() => "paused",
            _ => "running",
        }
    }

    /// Runs a control operation; 409 when there is no controller.
    fn with_control(
        &mut self,
        f: impl FnOnce(&mut Controller, bool, &mut Self) -> std::result::Result<Value, String>,
    ) -> (u16, Value) {
        let Some(control) = self.control.clone() else {
            return (409, json!({"error": "this VM cannot be controlled"}));
        };
        let mut c = control.lock().unwrap_or_else(|e| e.into_inner());
        let ready = self.agent_ready;
        match f(&mut c, ready, self) {
            Ok(Value::Null) => (204, Value::Null),
            Ok(v) => (200, v),
            Err(e) => (500, json!({ "error": e })),
        }
    }

    fn fork(&mut self, body: &[u8]) -> (u16, Value) {
        let opts: ForkOptions = match serde_json::from_slice(body) {
            Ok(o) => o,
            Err(e) => return (400, json!({"error": format!("bad fork request: {e}")})),
        };
        if opts.count == 0 || opts.count > 1024 {
            return (400, json!({"error": "\"count\" must be 1 to 1024"}));
        }
        self.with_control(|c, ready, server| {
            let (info, spawned) = c.fork(&opts, ready).map_err(|e| e.to_string())?;
            for s in spawned {
                match pidfd_open(s.process.id()) {
                    Ok(fd) => {
                        server.new_pidfds.push(fd.as_raw_fd());
                        server.children.push((fd, s.process));
                    }
                    // Without a pidfd the child is reaped when the VMM ends.
                    Err(e) => tracing::warn!("cannot watch fork child {}: {e}", s.info.id),
                }
            }
            server.forked = true;
            serde_json::to_value(info).map_err(|e| e.to_string())
        })
    }

    fn snapshot(&mut self, body: &[u8]) -> (u16, Value) {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Req {
            dir: PathBuf,
        }
        let req: Req = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return (400, json!({"error": format!("bad snapshot request: {e}")})),
        };
        self.with_control(|c, ready, _| {
            let info = c.snapshot(&req.dir, ready).map_err(|e| e.to_string())?;
            serde_json::to_value(info).map_err(|e| e.to_string())
        })
    }

    /// A fork child ended: reap it.
    fn on_child_exit(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(i) = self.children.iter().position(|(p, _)| p.as_raw_fd() == fd) {
            let _ = ops.remove(Events::empty_raw(fd));
            let (pidfd, mut child) = self.children.swap_remove(i);
            // Closed before the reap: once the child is gone from /proc,
            // nothing of it is left in this process.
            drop(pidfd);
            let _ = child.wait();
        }
    }

    fn agent_state(&self) -> &'static str {
        match (&self.info.vsock, self.agent_ready) {
            (None, _) => "none",
            (Some(_), false) => "starting",
            (Some(_), true) => "ready",
        }
    }

    /// The agent connected to the ready port: answer everyone waiting.
    fn on_agent_ready(&mut self) {
        let Some(listener) = &self.ready_listener else {
            return;
        };
        while let Ok((stream, _)) = listener.accept() {
            // The announcement is the connection itself; its `ready` line
            // is not needed.
            drop(stream);
            self.agent_ready = true;
        }
        self.answer_waiting();
    }

    fn route(&mut self, req: &HttpRequest) -> (u16, Value) {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/vm") => (
                200,
                json!({
                    "state": self.vm_state(),
                    "vcpus": self.info.vcpus,
                    "memory_mib": self.info.memory_mib,
                    "vsock": self.info.vsock.as_ref().map(|(cid, path)| json!({"cid": cid, "uds_path": path})),
                    "agent": self.agent_state(),
                }),
            ),
            ("GET", "/vm/agent") => (200, json!({"agent": self.agent_state()})),
            ("PUT", "/vm/stop") => {
                self.exit.report(ExitReason::Stopped { signal: None });
                (204, Value::Null)
            }
            ("PUT", "/vm/pause") => self.with_control(|c, _, _| {
                c.pause().map_err(|e| e.to_string())?;
                Ok(Value::Null)
            }),
            ("PUT", "/vm/resume") => self.with_control(|c, _, _| {
                c.resume();
                Ok(Value::Null)
            }),
            ("PUT", "/vm/snapshot") => self.snapshot(&req.body),
            ("PUT", "/vm/fork") => self.fork(&req.body),
            (
                _,
                "/vm" | "/vm/stop" | "/vm/agent" | "/vm/pause" | "/vm/resume" | "/vm/snapshot"
                | "/vm/fork",
            ) => (405, json!({"error": "method not allowed"})),
            _ => (
                404,
                json!({"error": format!("no such endpoint: {}", req.path)}),
            ),
        }
    }

    fn serve_one(&mut self, mut stream: UnixStream) {
        // A slow or silent client must not stall the VMM's event loop.
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let (status, body) = match read_request(&mut stream) {
            Ok(req)
                if req.method == "GET"
                    && req.path == "/vm/agent"
                    && self.agent_state() == "starting" =>
            {
                // Answered when the agent announces itself.
                self.waiting.push(stream);
                return;
            }
            Ok(req) => self.route(&req),
            Err(e) => (400, json!({"error": e.to_string()})),
        };
        let _ = write_response(&mut stream, status, &body);
        drop(stream);
        if std::mem::take(&mut self.forked) {
            if let Some(c) = &self.control {
                c.lock().unwrap_or_else(|e| e.into_inner()).prepare_spare();
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(p) = &self.ready_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("cannot watch the API socket: {e:?}");
        }
        if let Some(l) = &self.ready_listener {
            if let Err(e) = ops.add(Events::new(l, EventSet::IN)) {
                tracing::error!("cannot watch the agent's ready socket: {e:?}");
            }
        }
        if let Some(evt) = &self.agent_ready_evt {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("cannot watch the agent reseed: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.ready_listener.as_ref().map(|l| l.as_raw_fd()) == Some(fd) {
            self.on_agent_ready();
        } else if self.agent_ready_evt.as_ref().map(|e| e.as_raw_fd()) == Some(fd) {
            if let Some(evt) = &self.agent_ready_evt {
                let _ = evt.read();
            }
            self.agent_ready = true;
            self.answer_waiting();
        } else if fd == self.listener.as_raw_fd() {
            while let Ok((stream, _)) = self.listener.accept() {
                self.serve_one(stream);
            }
            for pidfd in self.new_pidfds.drain(..) {
                if let Err(e) = ops.add(Events::new_raw(pidfd, EventSet::IN)) {
                    tracing::warn!("cannot watch a fork child: {e:?}");
                }
            }
        } else {
            self.on_child_exit(fd, ops);
        }
    }
}

/// A client of a VMM's API socket.
pub struct ApiClient {
    path: PathBuf,
}

impl ApiClient {
    pub fn new(path: &Path) -> Self {
        ApiClient {
            path: path.to_path_buf(),
        }
    }

    /// Sends one request; returns the JSON body (Null when empty).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut stream = UnixStream::connect(&self.path).map_err(|source| Error::Connect {
            path: self.path.clone(),
            source,
        })?;
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: vm\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .ok_or_else(|| Error::BadAnswer("no header end".into()))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::BadAnswer(head.lines().next().unwrap_or("").into()))?;
        if !(200..300).contains(&status) {
            return Err(Error::Status {
                status,
                body: body.to_string(),
            });
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(body).map_err(|e| Error::BadAnswer(e.to_string()))
    }

    /// Waits until the VM's agent serves (`GET /vm/agent`).
    pub fn wait_agent(&self) -> Result<()> {
        let answer = self.call("GET", "/vm/agent", None)?;
        match answer["agent"].as_str() {
            Some("ready") => Ok(()),
            other => Err(Error::BadAnswer(format!("the agent is {other:?}"))),
        }
    }

    /// Pauses the VM (`PUT /vm/pause`).
    pub fn pause(&self) -> Result<()> {
        self.call("PUT", "/vm/pause", None).map(drop)
    }

    /// Resumes a paused VM (`PUT /vm/resume`).
    pub fn resume(&self) -> Result<()> {
        self.call("PUT", "/vm/resume", None).map(drop)
    }

    /// Writes a snapshot into the new directory `dir` (absolute, or
    /// relative to the VMM's working directory); returns the answer
    /// (`dir`, `memory_bytes`, `pause_ms`).
    pub fn snapshot(&self, dir: &Path) -> Result<Value> {
        self.call("PUT", "/vm/snapshot", Some(&json!({ "dir": dir })))
    }

    /// Forks the VM into `count` children (sockets in `dir`, default next
    /// to this API socket); returns them once their vCPUs run.
    pub fn fork(&self, count: u32, dir: Option<&Path>) -> Result<Vec<crate::fork::ChildInfo>> {
        let answer = self.call(
            "PUT",
            "/vm/fork",
            Some(&json!({ "count": count, "dir": dir })),
        )?;
        serde_json::from_value(answer["children"].clone())
            .map_err(|e| Error::BadAnswer(e.to_string()))
    }

    /// The VM's vsock Unix socket, from `GET /vm`.
    pub fn vsock_path(&self) -> Result<PathBuf> {
        let vm = self.call("GET", "/vm", None)?;
        vm["vsock"]["uds_path"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| Error::BadAnswer("the VM has no vsock device".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_with_and_without_bodies() {
        let raw = b"PUT /vm/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        let req = read_request(&mut &raw[..]).unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), req.body.as_slice()),
            ("PUT", "/vm/stop", &b"{}"[..])
        );
        let req = read_request(&mut &b"GET /vm HTTP/1.1\r\n\r\n"[..]).unwrap();
        assert!(req.body.is_empty());
    }

    #[test]
    fn rejects_malformed_requests() {
        assert!(read_request(&mut &b"GARBAGE\r\n\r\n"[..]).is_err());
        assert!(read_request(&mut &b"GET /vm SPDY/3\r\n\r\n"[..]).is_err());
        assert!(
            read_request(&mut &b"GET /vm HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"[..])
                .is_err()
        );
        assert!(
            read_request(&mut &b"GET /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"[..]).is_err()
        );
        assert!(read_request(&mut &b"GET /vm HTTP/1.1\r\n"[..]).is_err());
    }

    #[test]
    fn server_answers_a_client() {
        let dir = std::env::temp_dir().join(format!("vmm-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let exit = Arc::new(ExitSignal::new().unwrap());
        let info = VmInfo {
            vcpus: 2,
            memory_mib: 256,
            vsock: Some((3, dir.join("v.sock"))),
        };
        let mut server = ApiServer::bind(&path, info, exit.clone()).unwrap();
        let client_path = path.clone();
        let client = std::thread::spawn(move || {
            let c = ApiClient::new(&client_path);
            let vm = c.call("GET", "/vm", None).unwrap();
            let missing = c.call("GET", "/nope", None);
            let stop = c.call("PUT", "/vm/stop", Some(&json!({})));
            (vm, missing.is_err(), stop.is_ok())
        });
        // Serve the three calls on this thread (blocking accepts).
        server.listener.set_nonblocking(false).unwrap();
        for _ in 0..3 {
            let (stream, _) = server.listener.accept().unwrap();
            server.serve_one(stream);
        }
        let (vm, missing_failed, stopped) = client.join().unwrap();
        assert_eq!(vm["vcpus"], 2);
        assert_eq!(vm["vsock"]["cid"], 3);
        assert!(missing_failed && stopped);
        assert_eq!(exit.reason(), Some(ExitReason::Stopped { signal: None }));
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
