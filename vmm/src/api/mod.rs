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
//!
//! The loop never waits on a client: requests are read as they arrive,
//! each must be complete within [`REQUEST_DEADLINE`] of its connection
//! (408 otherwise, however slowly it trickles in), at most [`MAX_CLIENTS`]
//! are read at once and [`MAX_WAITING`] wait for the agent (503 past
//! either), and a fork answers once its children run without the loop
//! waiting for them. The socket is 0600 and a peer of another user (other
//! than root) gets 403.

mod client;
mod http;

use devices::sync::Locked;
use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::action::{
    Action, ActionError, AgentReply, AgentState, ForkInfo, ForkRequest, Reply, SnapshotRequest,
    VmDescription, VmState, VsockInfo,
};
use crate::control::Controller;
use crate::exit::{ExitReason, ExitSignal};
use crate::fork;

pub use client::ApiClient;
pub use http::{parse_request, HttpRequest, MAX_REQUEST};

/// A request must be complete this long after its connection was accepted.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Requests being read at once; more connections get 503 at once.
pub const MAX_CLIENTS: usize = 32;
/// `GET /vm/agent` callers waiting for the agent at once; more get 503.
pub const MAX_WAITING: usize = 64;
/// How often deadlines are checked while any is pending.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on the API socket {path}: {source}; check that its folder exists and is writable")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot reach the VMM's API socket {path}: {source}; is `vmm launch --api-socket {path}` running?")]
    Connect { path: PathBuf, source: io::Error },
    #[error("the API call failed: {0}")]
    Io(#[from] io::Error),
    #[error("the VMM refused ({status}): {message}")]
    Status { status: u16, message: String },
    #[error("the VMM's answer is not valid: {0}")]
    BadAnswer(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What the API reports about the VM.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub vsock: Option<(u64, PathBuf)>,
}

/// A connection whose request is still arriving.
struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// A fork whose children are starting, and the client waiting for it.
struct ForkWait {
    stream: UnixStream,
    pending: fork::Pending,
    parent_pause_ms: f64,
}

/// Answers `stream` without waiting: a client that does not read its
/// (small) answer loses it. What the client sent and nobody read is
/// drained first (closing over unread bytes would reset the connection
/// and lose the answer).
fn respond(mut stream: UnixStream, status: u16, body: &Value) {
    let _ = stream.set_nonblocking(true);
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < 2 * MAX_REQUEST {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
    let _ = http::write_response(&mut stream, status, body);
}

fn respond_error(stream: UnixStream, error: &ActionError) {
    respond(
        stream,
        error.status(),
        &json!({ "error": error.to_string() }),
    );
}

fn respond_reply(stream: UnixStream, reply: std::result::Result<Reply, ActionError>) {
    match reply {
        Ok(reply) => {
            let (status, body) = reply.to_http();
            respond(stream, status, &body);
        }
        Err(e) => respond_error(stream, &e),
    }
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

fn listen(path: &Path) -> Result<UnixListener> {
    let listener = devices::unix_socket::bind_private(path).map_err(|source| Error::Listen {
        path: path.to_path_buf(),
        source,
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
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
    /// Requests being read, by descriptor.
    clients: HashMap<RawFd, Client>,
    /// `GET /vm/agent` callers waiting for the agent.
    waiting: Vec<UnixStream>,
    /// The fork whose children are starting (one at a time).
    forking: Option<ForkWait>,
    /// Fires every [`TICK`] while a deadline is pending.
    timer: TimerFd,
    timer_armed: bool,
    /// Pause, resume, snapshot and fork (absent in unit tests).
    control: Option<Arc<Mutex<Controller>>>,
    /// Written when a restored guest's agent is ready (after its reseed).
    agent_ready_evt: Option<EventFd>,
    /// Fork children still running, by pidfd (reaped when they end).
    children: Vec<(OwnedFd, std::process::Child)>,
}

impl ApiServer {
    pub fn bind(path: &Path, info: VmInfo, exit: Arc<ExitSignal>) -> Result<Self> {
        let listener = listen(path)?;
        let ready_path = info
            .vsock
            .as_ref()
            .map(|(_, uds)| crate::agent::ready_socket_path(uds));
        let ready_listener = ready_path.as_deref().map(listen).transpose()?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            info,
            exit,
            ready_listener,
            ready_path,
            agent_ready: false,
            clients: HashMap::new(),
            waiting: Vec::new(),
            forking: None,
            timer: devices::timer::nonblocking()?,
            timer_armed: false,
            control: None,
            agent_ready_evt: None,
            children: Vec::new(),
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
            for w in self.waiting.drain(..) {
                respond_reply(
                    w,
                    Ok(Reply::Agent(AgentReply {
                        agent: AgentState::Ready,
                    })),
                );
            }
        }
    }

    fn control(&self) -> std::result::Result<std::sync::MutexGuard<'_, Controller>, ActionError> {
        let control = self.control.as_ref().ok_or(ActionError::NotControllable)?;
        Ok(control.locked())
    }

    fn describe(&self) -> VmDescription {
        let paused = self.control().is_ok_and(|c| c.is_paused());
        VmDescription {
            state: if paused {
                VmState::Paused
            } else {
                VmState::Running
            },
            vcpus: self.info.vcpus,
            memory_mib: self.info.memory_mib,
            vsock: self.info.vsock.as_ref().map(|(cid, path)| VsockInfo {
                cid: *cid,
                uds_path: path.clone(),
            }),
            agent: self.agent_state(),
        }
    }

    /// Does an action that answers at once.
    fn perform(&mut self, action: Action) -> std::result::Result<Reply, ActionError> {
        match action {
            Action::Describe => Ok(Reply::Vm(self.describe())),
            Action::WaitAgent => Ok(Reply::Agent(AgentReply {
                agent: self.agent_state(),
            })),
            Action::Stop => {
                self.exit.report(ExitReason::Stopped { signal: None });
                Ok(Reply::Done)
            }
            Action::Pause => {
                self.control()?.pause()?;
                Ok(Reply::Done)
            }
            Action::Resume => {
                self.control()?.resume();
                Ok(Reply::Done)
            }
            Action::Snapshot(SnapshotRequest { dir, key }) => {
                let ready = self.agent_ready;
                let info = self.control()?.snapshot(&dir, ready, key.as_deref())?;
                Ok(Reply::Snapshot(info))
            }
            Action::Fork(_) => Err(ActionError::BadRequest(
                "a fork answers when its children run".into(),
            )),
        }
    }

    /// Starts a fork; the client is answered once the children run.
    fn fork(&mut self, stream: UnixStream, request: &ForkRequest, ops: &mut EventOps) {
        if self.forking.is_some() {
            return respond_error(stream, &ActionError::ForkInProgress);
        }
        let ready = self.agent_ready;
        let started = self.control().and_then(|mut c| Ok(c.fork(request, ready)?));
        let (mut pending, parent_pause_ms) = match started {
            Ok(p) => p,
            Err(e) => return respond_error(stream, &e),
        };
        for fd in pending.fds() {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                pending.kill_all();
                let error = format!("cannot watch a fork child: {e:?}");
                return respond(stream, 500, &json!({ "error": error }));
            }
        }
        self.forking = Some(ForkWait {
            stream,
            pending,
            parent_pause_ms,
        });
    }

    /// A starting fork child answered (or the fork's deadline passed).
    fn fork_progress(&mut self, fd: Option<RawFd>, ops: &mut EventOps) {
        let Some(wait) = self.forking.as_mut() else {
            return;
        };
        let outcome = match fd {
            Some(fd) => wait.pending.on_readable(fd),
            None if Instant::now() >= wait.pending.deadline => Err(wait.pending.timed_out()),
            None => Ok(false),
        };
        if outcome.as_ref().is_ok_and(|done| !done) {
            return;
        }
        let Some(mut wait) = self.forking.take() else {
            return;
        };
        for fd in wait.pending.fds() {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        if let Err(e) = outcome {
            wait.pending.kill_all();
            return respond_error(wait.stream, &ActionError::Control(e.into()));
        }
        let spawned = wait.pending.finish();
        let info = ForkInfo {
            children: spawned.iter().map(|s| s.info.clone()).collect(),
            parent_pause_ms: wait.parent_pause_ms,
        };
        for s in spawned {
            match pidfd_open(s.process.id()) {
                Ok(fd) => {
                    if let Err(e) = ops.add(Events::new_raw(fd.as_raw_fd(), EventSet::IN)) {
                        tracing::warn!("cannot watch fork child {}: {e:?}", s.info.id);
                    }
                    self.children.push((fd, s.process));
                }
                // Without a pidfd the child is reaped when the VMM ends.
                Err(e) => tracing::warn!("cannot watch fork child {}: {e}", s.info.id),
            }
        }
        respond_reply(wait.stream, Ok(Reply::Fork(info)));
        // A VM forked once is likely forked again.
        if let Some(c) = &self.control {
            c.locked().prepare_spare();
        }
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

    fn agent_state(&self) -> AgentState {
        match (&self.info.vsock, self.agent_ready) {
            (None, _) => AgentState::None,
            (Some(_), false) => AgentState::Starting,
            (Some(_), true) => AgentState::Ready,
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

    /// Serves a complete request.
    fn dispatch(&mut self, stream: UnixStream, req: HttpRequest, ops: &mut EventOps) {
        let action = match Action::from_http(&req.method, &req.path, &req.body) {
            Ok(a) => a,
            Err(e) => return respond_error(stream, &e),
        };
        match action {
            Action::WaitAgent if self.agent_state() == AgentState::Starting => {
                // Answered when the agent announces itself.
                if self.waiting.len() >= MAX_WAITING {
                    let error =
                        format!("{MAX_WAITING} clients already wait for the agent; try again");
                    return respond_error(stream, &ActionError::Busy(error));
                }
                self.waiting.push(stream);
            }
            Action::Fork(request) => self.fork(stream, &request, ops),
            action => {
                let reply = self.perform(action);
                respond_reply(stream, reply);
            }
        }
    }

    /// Accepts new connections: other users' get 403, connections past
    /// [`MAX_CLIENTS`] 503; the rest are read as their bytes arrive.
    fn accept_clients(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if !devices::unix_socket::peer_is_trusted(&stream) {
                tracing::warn!("API: a process of another user connected; refused");
                respond(
                    stream,
                    403,
                    &json!({"error": "this VM belongs to another user"}),
                );
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                let error = format!("{MAX_CLIENTS} requests are being read; try again");
                respond(stream, 503, &json!({ "error": error }));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if ops.add(Events::new_raw(fd, EventSet::IN)).is_err() {
                continue;
            }
            self.clients.insert(
                fd,
                Client {
                    stream,
                    buf: Vec::new(),
                    deadline: Instant::now() + REQUEST_DEADLINE,
                },
            );
        }
    }

    /// Reads what a client sent; serves the request once it is complete.
    fn read_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let outcome = loop {
            match client.stream.read(&mut chunk) {
                Ok(0) => break Err("the request ended early".to_string()),
                Ok(n) => {
                    client.buf.extend_from_slice(&chunk[..n]);
                    match http::parse_request(&client.buf) {
                        Ok(None) => continue,
                        other => break other,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e.to_string()),
            }
        };
        if let Ok(None) = outcome {
            return;
        }
        let _ = ops.remove(Events::empty_raw(fd));
        let Some(client) = self.clients.remove(&fd) else {
            return;
        };
        match outcome {
            Ok(Some(req)) => self.dispatch(client.stream, req, ops),
            Err(e) => respond(client.stream, 400, &json!({ "error": e })),
            Ok(None) => {}
        }
    }

    /// Answers 408 to clients past their deadline; checks the fork's.
    fn expire(&mut self, ops: &mut EventOps) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let late: Vec<RawFd> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            let _ = ops.remove(Events::empty_raw(fd));
            if let Some(c) = self.clients.remove(&fd) {
                let error = format!("the request was not complete within {REQUEST_DEADLINE:?}");
                respond(c.stream, 408, &json!({ "error": error }));
            }
        }
        self.fork_progress(None, ops);
    }

    /// Runs the deadline timer exactly while a deadline is pending.
    fn update_timer(&mut self) {
        let wanted = !self.clients.is_empty() || self.forking.is_some();
        if wanted == self.timer_armed {
            return;
        }
        let result = if wanted {
            self.timer.reset(TICK, Some(TICK))
        } else {
            self.timer.clear()
        };
        match result {
            Ok(()) => self.timer_armed = wanted,
            Err(e) => tracing::warn!("API: cannot set the deadline timer: {e}"),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(p) = &self.ready_path {
            let _ = std::fs::remove_file(p);
        }
        if let Some(mut wait) = self.forking.take() {
            wait.pending.kill_all();
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![self.listener.as_raw_fd(), self.timer.as_raw_fd()];
        fds.extend(self.ready_listener.as_ref().map(|l| l.as_raw_fd()));
        fds.extend(self.agent_ready_evt.as_ref().map(|e| e.as_raw_fd()));
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("API: cannot watch descriptor {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_clients(ops);
        } else if self.clients.contains_key(&fd) {
            self.read_client(fd, ops);
        } else if fd == self.timer.as_raw_fd() {
            self.expire(ops);
        } else if self.ready_listener.as_ref().map(|l| l.as_raw_fd()) == Some(fd) {
            self.on_agent_ready();
        } else if self.agent_ready_evt.as_ref().map(|e| e.as_raw_fd()) == Some(fd) {
            if let Some(evt) = &self.agent_ready_evt {
                let _ = evt.read();
            }
            self.agent_ready = true;
            self.answer_waiting();
        } else if self
            .forking
            .as_ref()
            .is_some_and(|w| w.pending.fds().contains(&fd))
        {
            self.fork_progress(Some(fd), ops);
        } else {
            self.on_child_exit(fd, ops);
        }
        self.update_timer();
    }
}

#[cfg(test)]
mod tests;
