//! Host side of the guest agent: typed calls over the VM's vsock Unix
//! socket (docs/agent-protocol.md).

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_os::EventFd;

use vmm_agent::{read_frame, write_frame, write_json, FrameType};
pub use vmm_agent::{Request, Response, AGENT_PORT, READY_PORT};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the VM's vsock socket {path}: {source}; is the VM running with \"vsock\" configured?")]
    Connect { path: PathBuf, source: io::Error },
    #[error(
        "the guest agent did not accept the connection (answer: {0:?}); it may not be running yet"
    )]
    Refused(String),
    #[error("the connection to the guest agent broke: {0}")]
    Io(#[from] io::Error),
    #[error("the guest agent sent something unexpected: {0}")]
    Protocol(String),
    #[error("the guest agent refused the request: {0}")]
    Agent(String),
    #[error("the guest agent did not announce itself within {0:?} (or the VM stopped first)")]
    NotReady(Duration),
    #[error("the guest agent did not answer within {0:?}; the guest may be hung or overloaded")]
    Silent(Duration),
    #[error("the guest agent sent more than the {0} bytes allowed; raise the limit or fetch less")]
    TooLarge(u64),
}

/// An I/O error from a read that ran out of time is the agent being silent.
fn timed(e: io::Error, limit: Duration) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Silent(limit),
        _ => Error::Io(e),
    }
}

/// How long the host waits for each answer of the agent (the `OK` of a
/// connection, a response, a file chunk) unless a call says otherwise.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest ready announcement read (`ready\n`).
const MAX_READY_LINE: u64 = 64;

pub type Result<T> = std::result::Result<T, Error>;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// Killed after its timeout.
    TimedOut,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
            ExitStatus::TimedOut => 124,
        }
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default)]
pub struct Exec {
    pub argv: Vec<String>,
    /// Variables set over the image's (an OCI image's `Env`) and the
    /// agent's PATH.
    pub env: BTreeMap<String, String>,
    /// Default: the image's `WorkingDir`, else /.
    pub cwd: Option<String>,
    /// `NAME`, `UID`, `NAME:GROUP` or `UID:GID`; default: the image's
    /// `User`, else root.
    pub user: Option<String>,
    pub timeout: Option<Duration>,
    /// A container's root file system in the guest: the command runs
    /// chrooted there, with `env` only (no image defaults).
    pub root: Option<String>,
    /// Mounted inside `root` before the command runs (a container's
    /// first process); the command does not start when one fails.
    pub mounts: Vec<vmm_agent::Mount>,
    /// A container's namespaces, hostname and cgroup in the guest (with
    /// `root`).
    pub isolation: Option<vmm_agent::Isolation>,
}

impl Exec {
    fn request(&self, stdin: bool, pty: Option<vmm_agent::PtySize>) -> Request {
        Request::Exec {
            argv: self.argv.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            pty,
            stdin,
            timeout_ms: self.timeout.map(|t| t.as_millis() as u64),
            root: self.root.clone(),
            mounts: self.mounts.clone(),
            isolation: self.isolation.clone().map(Box::new),
        }
    }
}

/// How a command's end is told in an answer.
fn exit_status(resp: &Response) -> Result<ExitStatus> {
    Ok(match (resp.timed_out, resp.exit_code, resp.signal) {
        (true, _, _) => ExitStatus::TimedOut,
        (_, Some(code), _) => ExitStatus::Code(code),
        (_, None, Some(sig)) => ExitStatus::Signal(sig),
        _ => return Err(Error::Protocol("no exit status in the response".into())),
    })
}

/// What a host connection sends first to reach the agent through the
/// VMM's vsock socket (Firecracker's host-initiated scheme).
pub fn connect_line() -> String {
    format!("CONNECT {AGENT_PORT}\n")
}

/// The longest answer line read back.
const CONNECT_ANSWER_MAX: usize = 64;

/// Whether `line`, the answer read so far, is complete.
pub fn connect_answer_done(line: &[u8]) -> bool {
    line.last() == Some(&b'\n') || line.len() >= CONNECT_ANSWER_MAX
}

/// The VMM's answer: `OK <port>` when it reached the agent, else the
/// refusal's text.
pub fn connect_answer(line: &[u8]) -> std::result::Result<(), String> {
    let text = String::from_utf8_lossy(line).trim().to_string();
    match text.starts_with("OK ") {
        true => Ok(()),
        false => Err(text),
    }
}

/// Talks to the agent of one VM through its vsock Unix socket.
///
/// The guest is not trusted: every wait for the agent is bounded by the
/// client's timeout ([`AGENT_TIMEOUT`] unless set), frames are at most
/// [`vmm_agent::MAX_FRAME`] bytes, and `get` takes a size limit. `exec`
/// waits as long as the command runs: with a command timeout, at most that
/// timeout plus the client's.
#[derive(Debug, Clone)]
pub struct AgentClient {
    uds_path: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    /// `uds_path` is the VM's `vsock.uds_path`.
    pub fn new(uds_path: &Path) -> Self {
        AgentClient {
            uds_path: uds_path.to_path_buf(),
            timeout: AGENT_TIMEOUT,
        }
    }

    /// The same client, waiting at most `timeout` for each answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn connect(&self) -> Result<UnixStream> {
        let mut stream = UnixStream::connect(&self.uds_path).map_err(|source| Error::Connect {
            path: self.uds_path.clone(),
            source,
        })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.write_all(connect_line().as_bytes())?;
        let mut line = Vec::new();
        // Byte by byte: nothing after the answer's line may be lost.
        let mut byte = [0u8; 1];
        while !connect_answer_done(&line) {
            if stream.read(&mut byte).map_err(|e| timed(e, self.timeout))? == 0 {
                break;
            }
            line.push(byte[0]);
        }
        connect_answer(&line).map_err(Error::Refused)?;
        Ok(stream)
    }

    /// Reads frames until the response; `on_data` gets the data frames.
    /// Each read waits at most as long as `stream`'s read timeout.
    fn finish(
        stream: &mut UnixStream,
        mut on_data: impl FnMut(FrameType, &[u8]) -> io::Result<()>,
    ) -> Result<Response> {
        let limit = stream.read_timeout()?.unwrap_or(Duration::MAX);
        loop {
            match read_frame(stream).map_err(|e| timed(e, limit))? {
                Some((FrameType::Response, payload)) => {
                    let resp: Response = serde_json::from_slice(&payload)
                        .map_err(|e| Error::Protocol(e.to_string()))?;
                    if let Some(err) = resp.error {
                        return Err(Error::Agent(err));
                    }
                    return Ok(resp);
                }
                Some((kind @ (FrameType::Stdout | FrameType::Stderr), data)) => {
                    on_data(kind, &data)?
                }
                // The command's pid: this client has no use for it.
                Some((FrameType::Started, _)) => {}
                Some((kind, _)) => {
                    return Err(Error::Protocol(format!("unexpected {kind:?} frame")))
                }
                None => {
                    return Err(Error::Protocol(
                        "the agent closed the connection early".into(),
                    ))
                }
            }
        }
    }

    /// Checks the agent answers; returns its version.
    pub fn ping(&self) -> Result<String> {
        let mut s = self.connect()?;
        write_json(&mut s, FrameType::Request, &Request::Ping)?;
        let resp = Self::finish(&mut s, |_, _| Ok(()))?;
        Ok(resp.agent.unwrap_or_default())
    }

    /// Runs a command, streaming `stdin` (if given) to it and its output to
    /// `stdout` and `stderr`.
    pub fn exec(
        &self,
        cmd: &Exec,
        stdin: Option<Box<dyn Read + Send>>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus> {
        let mut s = self.connect()?;
        // The command's own time, then the usual wait for the agent.
        s.set_read_timeout(cmd.timeout.map(|t| t.saturating_add(self.timeout)))?;
        write_json(
            &mut s,
            FrameType::Request,
            &cmd.request(stdin.is_some(), None),
        )?;
        let feeder = match stdin {
            Some(mut input) => {
                let mut w = s.try_clone()?;
                Some(std::thread::spawn(move || -> io::Result<()> {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = input.read(&mut buf)?;
                        write_frame(&mut w, FrameType::Stdin, &buf[..n])?;
                        if n == 0 {
                            return Ok(());
                        }
                    }
                }))
            }
            None => None,
        };
        let resp = Self::finish(&mut s, |kind, data| match kind {
            FrameType::Stdout => stdout.write_all(data),
            _ => stderr.write_all(data),
        })?;
        // The command may end before reading all its input; then the
        // feeder's writes fail, which is expected.
        if let Some(f) = feeder {
            let _ = f.join();
        }
        exit_status(&resp)
    }

    /// Starts a command whose input, output and end the caller handles
    /// apart (a container's process): returns once the guest has started
    /// it, with its guest pid. Its input is typed in through
    /// [`Session::input`]; [`Session::finish`] streams its output and
    /// returns how it ended.
    pub fn start(
        &self,
        cmd: &Exec,
        stdin: bool,
        pty: Option<vmm_agent::PtySize>,
    ) -> Result<Session> {
        let mut stream = self.connect()?;
        write_json(&mut stream, FrameType::Request, &cmd.request(stdin, pty))?;
        let pid = match read_frame(&mut stream).map_err(|e| timed(e, self.timeout))? {
            Some((FrameType::Started, payload)) => {
                serde_json::from_slice::<vmm_agent::Started>(&payload)
                    .map_err(|e| Error::Protocol(e.to_string()))?
                    .pid
            }
            Some((FrameType::Response, payload)) => {
                let resp: Response =
                    serde_json::from_slice(&payload).map_err(|e| Error::Protocol(e.to_string()))?;
                return Err(Error::Agent(
                    resp.error
                        .unwrap_or_else(|| "the command did not start".into()),
                ));
            }
            Some((kind, _)) => {
                return Err(Error::Protocol(format!(
                    "unexpected {kind:?} frame before the start"
                )))
            }
            None => {
                return Err(Error::Protocol(
                    "the agent closed the connection early".into(),
                ))
            }
        };
        // The command runs as long as it runs: no limit on its answer.
        stream.set_read_timeout(None)?;
        Ok(Session { pid, stream })
    }

    /// Unmounts everything at or under `root` in the guest.
    pub fn unmount(&self, root: &str) -> Result<()> {
        let mut s = self.connect()?;
        let request = Request::Unmount {
            root: root.to_string(),
        };
        write_json(&mut s, FrameType::Request, &request)?;
        Self::finish(&mut s, |_, _| Ok(()))?;
        Ok(())
    }

    /// The figures of the guest cgroup `name` (a container's).
    pub fn cgroup_stats(&self, name: &str) -> Result<vmm_agent::CgroupStats> {
        let mut s = self.connect()?;
        let request = Request::CgroupStats {
            name: name.to_string(),
        };
        write_json(&mut s, FrameType::Request, &request)?;
        Self::finish(&mut s, |_, _| Ok(()))?
            .cgroup
            .ok_or_else(|| Error::Protocol("the answer has no cgroup figures".into()))
    }

    /// Sends `signal` to the guest process `pid`; `false` when it is gone.
    pub fn signal(&self, pid: i32, signal: i32) -> Result<bool> {
        let mut s = self.connect()?;
        write_json(&mut s, FrameType::Request, &Request::Signal { pid, signal })?;
        match Self::finish(&mut s, |_, _| Ok(())) {
            Ok(_) => Ok(true),
            Err(Error::Agent(e)) if e.contains("No such process") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes `data` to `path` in the guest; returns the bytes written.
    pub fn put(&self, path: &str, data: &mut dyn Read, mode: u32) -> Result<u64> {
        let mut s = self.connect()?;
        write_json(
            &mut s,
            FrameType::Request,
            &Request::Put {
                path: path.into(),
                mode,
                user: None,
                parents: false,
            },
        )?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = data.read(&mut buf)?;
            write_frame(&mut s, FrameType::Stdin, &buf[..n])?;
            if n == 0 {
                break;
            }
        }
        Ok(Self::finish(&mut s, |_, _| Ok(()))?.size.unwrap_or(0))
    }

    /// Reads `path` from the guest into `out`; returns its size. More than
    /// `max_bytes` is an error ([`Error::TooLarge`]), whatever the guest
    /// claims the size is.
    pub fn get(&self, path: &str, out: &mut dyn Write, max_bytes: u64) -> Result<u64> {
        let mut s = self.connect()?;
        write_json(
            &mut s,
            FrameType::Request,
            &Request::Get {
                path: path.into(),
                user: None,
            },
        )?;
        let mut got = 0u64;
        let resp = Self::finish(&mut s, |_, data| {
            got += data.len() as u64;
            if got > max_bytes {
                return Err(io::Error::other(Error::TooLarge(max_bytes)));
            }
            out.write_all(data)
        });
        match resp {
            Err(Error::Io(e)) if got > max_bytes => {
                drop(e);
                Err(Error::TooLarge(max_bytes))
            }
            r => Ok(r?.size.unwrap_or(0)),
        }
    }

    /// Gives the guest fresh randomness and has it reseed its generator,
    /// steps its wall clock to `now` and moves its network interface to
    /// `interface` (after a fork or restore).
    pub fn reseed(
        &self,
        seed: &[u8],
        now: Option<std::time::SystemTime>,
        interface: &NewInterface,
    ) -> Result<()> {
        let mut s = self.connect()?;
        let seed = seed.iter().map(|b| format!("{b:02x}")).collect();
        let unix_ns = now
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as u64);
        let mac = interface.mac.map(|m| vmm_agent::format_mac(&m));
        let (address, gateway) = match &interface.address {
            Some((a, g)) => (Some(a.clone()), g.clone()),
            None => (None, None),
        };
        let request = Request::Reseed {
            seed,
            unix_ns,
            mac,
            address,
            gateway,
            mtu: interface.mtu,
        };
        write_json(&mut s, FrameType::Request, &request)?;
        Self::finish(&mut s, |_, _| Ok(()))?;
        Ok(())
    }

    /// Asks the guest to sync and power off.
    pub fn shutdown(&self) -> Result<()> {
        let mut s = self.connect()?;
        write_json(&mut s, FrameType::Request, &Request::Shutdown)?;
        Self::finish(&mut s, |_, _| Ok(()))?;
        Ok(())
    }
}

/// What a copy of a VM's network interface changes to
/// ([`AgentClient::reseed`]); nothing by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewInterface {
    pub mac: Option<[u8; 6]>,
    /// An IPv4 address with its prefix length ("a.b.c.d/len") and the
    /// default gateway, if any.
    pub address: Option<(String, Option<String>)>,
    pub mtu: Option<u16>,
}

/// A command started by [`AgentClient::start`].
#[derive(Debug)]
pub struct Session {
    pid: i32,
    stream: UnixStream,
}

/// What types into a [`Session`]'s command: stdin frames, terminal sizes.
#[derive(Debug)]
pub struct SessionInput(UnixStream);

impl Session {
    /// The command's pid in the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A writer of the command's input, usable from another thread.
    pub fn input(&self) -> Result<SessionInput> {
        Ok(SessionInput(self.stream.try_clone()?))
    }

    /// Streams the command's output to `stdout` and `stderr` (a terminal's
    /// all to `stdout`) until it ends; how it ended.
    pub fn finish(mut self, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<ExitStatus> {
        let resp = AgentClient::finish(&mut self.stream, |kind, data| {
            // A reader that went away does not stop the command.
            let _ = match kind {
                FrameType::Stdout => stdout.write_all(data),
                _ => stderr.write_all(data),
            };
            Ok(())
        })?;
        exit_status(&resp)
    }
}

impl SessionInput {
    /// Types `data` in; empty `data` is the end of input.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(vmm_agent::MAX_FRAME) {
            write_frame(&mut self.0, FrameType::Stdin, chunk)?;
        }
        if data.is_empty() {
            write_frame(&mut self.0, FrameType::Stdin, &[])?;
        }
        Ok(())
    }

    /// Sets the command's terminal to `cols` x `rows`.
    pub fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        let size = vmm_agent::PtySize { cols, rows };
        write_json(&mut self.0, FrameType::Resize, &size)?;
        Ok(())
    }
}

/// Where a host program listens for the agent's ready announcement:
/// `<uds_path>_1023` (vsock host port READY_PORT in the hybrid scheme).
pub fn ready_socket_path(uds_path: &Path) -> PathBuf {
    PathBuf::from(format!("{}_{READY_PORT}", uds_path.display()))
}

/// Learns when a VM's agent is up: listens on `<uds_path>_1023`, where the
/// agent connects once it serves. Bind it before the VM boots.
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    pub fn bind(uds_path: &Path) -> Result<Self> {
        let path = ready_socket_path(uds_path);
        let listener =
            devices::unix_socket::bind_private(&path).map_err(|source| Error::Connect {
                path: path.clone(),
                source,
            })?;
        Ok(ReadyListener { listener, path })
    }

    /// Waits until the agent announces itself, at most `timeout`; gives up
    /// early when `abort` (an eventfd, say "the VM ended") becomes readable.
    pub fn wait(&self, timeout: Duration, abort: Option<&EventFd>) -> Result<()> {
        let mut fds = vec![libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(evt) = abort {
            fds.push(libc::pollfd {
                fd: evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll(2) on a valid array of `fds.len()` pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc <= 0 || fds[0].revents & libc::POLLIN == 0 {
            return Err(Error::NotReady(timeout));
        }
        let (stream, _) = self.listener.accept()?;
        // The line is short and comes at once; a guest that sends an
        // endless one, or nothing, gets no more than that.
        stream.set_read_timeout(Some(timeout.clamp(Duration::from_millis(1), AGENT_TIMEOUT)))?;
        let mut line = String::new();
        BufReader::new(stream.take(MAX_READY_LINE))
            .read_line(&mut line)
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => {
                    Error::Protocol("a ready line that is not text".into())
                }
                _ => timed(e, timeout),
            })?;
        if line.trim() != "ready" {
            return Err(Error::Protocol(format!("unexpected ready line {line:?}")));
        }
        Ok(())
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_answers_are_read_to_their_line_and_checked() {
        assert_eq!(connect_line(), "CONNECT 1024\n");
        assert!(!connect_answer_done(b"OK 10"));
        assert!(connect_answer_done(b"OK 1024\n"));
        // A peer that never ends its line stops being read at 64 bytes.
        assert!(connect_answer_done(&[b'x'; 64]));
        assert_eq!(connect_answer(b"OK 1024\n"), Ok(()));
        assert_eq!(connect_answer(b"NO\n"), Err("NO".to_string()));
        assert_eq!(connect_answer(b""), Err(String::new()));
    }
    use std::time::Instant;

    /// A scratch directory with a hostile "VMM side" of the vsock socket.
    struct Fake {
        dir: PathBuf,
    }

    impl Fake {
        fn new(name: &str) -> Fake {
            let dir = std::env::temp_dir().join(format!("vmm-agent-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Fake { dir }
        }

        fn uds(&self) -> PathBuf {
            self.dir.join("v.sock")
        }

        /// Serves one connection: answers `OK`, then runs `behave`.
        fn serve(&self, behave: impl FnOnce(UnixStream) + Send + 'static) {
            let listener = UnixListener::bind(self.uds()).unwrap();
            std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut line = [0u8; 13];
                s.read_exact(&mut line).unwrap();
                s.write_all(b"OK 1\n").unwrap();
                behave(s);
            });
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_silent_agent_times_out() {
        let f = Fake::new("silent");
        f.serve(|mut s| {
            // Reads the request and says nothing, until the client leaves.
            let mut sink = [0u8; 256];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        });
        let client = AgentClient::new(&f.uds()).with_timeout(Duration::from_millis(300));
        let start = Instant::now();
        let err = client.ping().unwrap_err();
        assert!(matches!(err, Error::Silent(_)), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn an_endless_file_stops_at_the_limit() {
        let f = Fake::new("endless");
        f.serve(|mut s| {
            let chunk = vec![0x41u8; 64 * 1024];
            while write_frame(&mut s, FrameType::Stdout, &chunk).is_ok() {}
        });
        let client = AgentClient::new(&f.uds());
        let mut out = Vec::new();
        let err = client.get("/dev/zero", &mut out, 1 << 20).unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)), "{err}");
        assert!(out.len() <= 1 << 20);
    }

    #[test]
    fn ready_lines_are_bounded_in_length_and_time() {
        let f = Fake::new("ready");
        let uds = f.uds();
        let ready = ReadyListener::bind(&uds).unwrap();
        let path = ready_socket_path(&uds);
        // An endless line without a newline.
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(path).unwrap();
                let junk = vec![b'x'; 4096];
                while s.write_all(&junk).is_ok() {}
            })
        };
        let err = ready.wait(Duration::from_secs(10), None).unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err}");
        drop(ready);
        writer.join().unwrap();
        // A connection that says nothing.
        let ready = ReadyListener::bind(&uds).unwrap();
        let _silent = UnixStream::connect(&path).unwrap();
        let start = Instant::now();
        let err = ready.wait(Duration::from_millis(300), None).unwrap_err();
        assert!(matches!(err, Error::Silent(_)), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
