//! Host side of the guest agent: typed calls over the VM's vsock Unix
//! socket (docs/agent-protocol.md).

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

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
}

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
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub timeout: Option<Duration>,
}

/// Talks to the agent of one VM through its vsock Unix socket.
#[derive(Debug, Clone)]
pub struct AgentClient {
    uds_path: PathBuf,
}

impl AgentClient {
    /// `uds_path` is the VM's `vsock.uds_path`.
    pub fn new(uds_path: &Path) -> Self {
        AgentClient {
            uds_path: uds_path.to_path_buf(),
        }
    }

    fn connect(&self) -> Result<UnixStream> {
        let mut stream = UnixStream::connect(&self.uds_path).map_err(|source| Error::Connect {
            path: self.uds_path.clone(),
            source,
        })?;
        stream.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
        let mut line = Vec::new();
        // Read the `OK <port>` line byte by byte: nothing after it may be lost.
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' && line.len() < 64 {
            if stream.read(&mut byte)? == 0 {
                break;
            }
            line.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&line).trim().to_string();
        if !text.starts_with("OK ") {
            return Err(Error::Refused(text));
        }
        Ok(stream)
    }

    fn finish(
        stream: &mut UnixStream,
        mut on_data: impl FnMut(FrameType, &[u8]) -> io::Result<()>,
    ) -> Result<Response> {
        loop {
            match read_frame(stream)? {
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
        let request = Request::Exec {
            argv: cmd.argv.clone(),
            env: cmd.env.clone(),
            cwd: cmd.cwd.clone(),
            stdin: stdin.is_some(),
            timeout_ms: cmd.timeout.map(|t| t.as_millis() as u64),
        };
        write_json(&mut s, FrameType::Request, &request)?;
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
        Ok(match (resp.timed_out, resp.exit_code, resp.signal) {
            (true, _, _) => ExitStatus::TimedOut,
            (_, Some(code), _) => ExitStatus::Code(code),
            (_, None, Some(sig)) => ExitStatus::Signal(sig),
            _ => return Err(Error::Protocol("no exit status in the response".into())),
        })
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

    /// Reads `path` from the guest into `out`; returns its size.
    pub fn get(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let mut s = self.connect()?;
        write_json(
            &mut s,
            FrameType::Request,
            &Request::Get { path: path.into() },
        )?;
        Ok(Self::finish(&mut s, |_, data| out.write_all(data))?
            .size
            .unwrap_or(0))
    }

    /// Gives the guest fresh randomness and has it reseed its generator
    /// (after a fork or restore).
    pub fn reseed(&self, seed: &[u8]) -> Result<()> {
        let mut s = self.connect()?;
        // The agent answers at once; a guest that does not must not hold
        // the caller forever.
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let seed = seed.iter().map(|b| format!("{b:02x}")).collect();
        write_json(&mut s, FrameType::Request, &Request::Reseed { seed })?;
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
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| Error::Connect {
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
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
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
