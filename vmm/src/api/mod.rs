//! The control socket: HTTP/1.1 with JSON bodies on a Unix socket, one
//! request per connection, served on its own thread, which turns each
//! request into an [`Action`] for the machine (`crate::machine`) and its
//! answer back into HTTP. Described by
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
//! No client ever reaches the device loop, and the API thread never waits
//! on one: requests are read as they arrive, each must be complete within
//! [`REQUEST_DEADLINE`] of its connection (408 otherwise, however slowly
//! it trickles in), at most [`MAX_CLIENTS`] are read at once (503 past
//! them; the machine bounds those waiting for the agent), and answers come
//! back from the machine as they are ready. The socket is 0600 and a peer
//! of another user (other than root) gets 403.

mod client;
mod http;

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use devices::timer::Ticker;
use serde_json::{json, Value};
use vmm_os::event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps,
};
use vmm_os::EventFd;

use crate::action::{Action, ActionError};
use crate::machine::{ActionResult, MachineHandle, Responder};

pub use client::ApiClient;
pub use http::{parse_request, HttpRequest, MAX_REQUEST};

/// A request must be complete this long after its connection was accepted.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Requests being read at once; more connections get 503 at once.
pub const MAX_CLIENTS: usize = 32;
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
    #[error("cannot start the API thread: {0}")]
    Thread(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A connection whose request is still arriving.
struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
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

fn respond_reply(stream: UnixStream, reply: ActionResult) {
    match reply {
        Ok(reply) => {
            let (status, body) = reply.to_http();
            respond(stream, status, &body);
        }
        Err(e) => respond_error(stream, &e),
    }
}

/// Listens on `path` (0600, without blocking).
fn listen(path: &Path) -> Result<UnixListener> {
    let listener = devices::unix_socket::bind_private(path).map_err(|source| Error::Listen {
        path: path.to_path_buf(),
        source,
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The API server: a subscriber of its own event loop (see [`ApiThread`]).
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    machine: MachineHandle,
    /// Requests being read, by descriptor.
    clients: HashMap<RawFd, Client>,
    /// Requests the machine is doing, by token.
    pending: HashMap<u64, UnixStream>,
    next_token: u64,
    /// The machine's answers, by token; `answered` is written with each.
    answers_tx: mpsc::Sender<(u64, ActionResult)>,
    answers: mpsc::Receiver<(u64, ActionResult)>,
    answered: Arc<EventFd>,
    /// Written to end the API thread.
    stop: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
    /// Fires every [`TICK`] while a request is being read.
    timer: Ticker,
}

impl ApiServer {
    /// Listens on `path` for requests to `machine`.
    pub fn bind(path: &Path, machine: MachineHandle) -> Result<Self> {
        let (answers_tx, answers) = mpsc::channel();
        Ok(ApiServer {
            listener: listen(path)?,
            path: path.to_path_buf(),
            machine,
            clients: HashMap::new(),
            pending: HashMap::new(),
            next_token: 0,
            answers_tx,
            answers,
            answered: Arc::new(EventFd::new(vmm_os::EFD_NONBLOCK)?),
            stop: Arc::new(EventFd::new(vmm_os::EFD_NONBLOCK)?),
            stopped: Arc::new(AtomicBool::new(false)),
            timer: Ticker::new(TICK)?,
        })
    }

    /// Sends a complete request to the machine; its answer comes back
    /// through `answers`.
    fn dispatch(&mut self, stream: UnixStream, req: HttpRequest) {
        let action = match Action::from_http(&req.method, &req.path, &req.body) {
            Ok(a) => a,
            Err(e) => return respond_error(stream, &e),
        };
        let token = self.next_token;
        self.next_token += 1;
        self.pending.insert(token, stream);
        let (tx, answered) = (self.answers_tx.clone(), self.answered.clone());
        self.machine.submit(
            action,
            Responder::new(move |result| {
                if tx.send((token, result)).is_ok() {
                    let _ = answered.write(1);
                }
            }),
        );
    }

    /// Writes the answers the machine has given.
    fn answer(&mut self) {
        let _ = self.answered.read();
        while let Ok((token, result)) = self.answers.try_recv() {
            if let Some(stream) = self.pending.remove(&token) {
                respond_reply(stream, result);
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
            Ok(Some(req)) => self.dispatch(client.stream, req),
            Err(e) => respond(client.stream, 400, &json!({ "error": e })),
            Ok(None) => {}
        }
    }

    /// Answers 408 to clients past their deadline.
    fn expire(&mut self, ops: &mut EventOps) {
        self.timer.acknowledge();
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
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.listener.as_raw_fd(),
            self.timer.as_raw_fd(),
            self.answered.as_raw_fd(),
            self.stop.as_raw_fd(),
        ];
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
        } else if fd == self.answered.as_raw_fd() {
            self.answer();
        } else if fd == self.stop.as_raw_fd() {
            // Answers given before the stop (a `PUT /vm/stop` among them)
            // are written first.
            self.answer();
            self.stopped.store(true, Ordering::SeqCst);
        }
        self.timer.run_while(!self.clients.is_empty(), "API");
    }
}

/// The API server's thread; [`ApiThread::stop`] ends it.
pub struct ApiThread {
    stop: Arc<EventFd>,
    thread: std::thread::JoinHandle<()>,
}

impl ApiThread {
    /// Starts the control socket's thread; with `seccomp` it installs its
    /// filter before it takes a connection.
    pub fn spawn(server: ApiServer, seccomp: bool) -> Result<ApiThread> {
        let stop = server.stop.clone();
        let stopped = server.stopped.clone();
        let mut manager = EventManager::<Arc<Mutex<ApiServer>>>::new()
            .map_err(|e| Error::Thread(format!("{e:?}")))?;
        manager.add_subscriber(Arc::new(Mutex::new(server)));
        let (filtered_tx, filtered) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if seccomp {
                    let applied = crate::seccomp::apply(crate::seccomp::Role::Control);
                    let failed = applied.is_err();
                    let _ = filtered_tx.send(applied.map_err(|e| e.to_string()));
                    if failed {
                        return;
                    }
                } else {
                    let _ = filtered_tx.send(Ok(()));
                }
                while !stopped.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        tracing::error!("API: the event loop failed: {e:?}");
                        break;
                    }
                }
            })
            .map_err(|e| Error::Thread(e.to_string()))?;
        match filtered.recv() {
            Ok(Ok(())) => Ok(ApiThread { stop, thread }),
            Ok(Err(message)) => Err(Error::Thread(message)),
            Err(_) => Err(Error::Thread("it ended at start".into())),
        }
    }

    /// Writes the answers already given, then ends the thread.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests;
