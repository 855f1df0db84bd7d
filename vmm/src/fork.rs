//! Fork children: new VMM processes that continue a paused VM.
//!
//! The parent freezes its memory into a copy-on-write image
//! (`GuestRam::freeze`: no copy on the first fork), copies its root disk's
//! changed blocks into a frozen layer, and starts one process per child:
//! the `vmm` binary with [`CHILD_COMMAND`], whose standard input is one end
//! of a Unix socket pair. Over it the parent sends one message: an 8-byte
//! length, with the memory files, the base image and the frozen layer
//! attached (SCM_RIGHTS), then the child's [`Message`] as JSON. The child
//! maps the memory copy-on-write, restores the machine, starts its vCPUs
//! and answers with a [`ChildAnswer`] line on the same socket.
//!
//! A child is a new machine: its own vsock socket and CID, its own API
//! socket, a throwaway disk layer over the frozen one; its vsock
//! connections are reset and its agent reseeds the guest's random
//! generator (docs/snapshot.md).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::config::{NetworkConfig, SerialOutput, VmConfig};
use crate::memory::MemoryImage;
use crate::snapshot::MachineState;

/// A fork child's one line to its parent (JSON): its vCPUs run, or it
/// could not start and why.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ChildAnswer {
    Started,
    Failed(String),
}

impl ChildAnswer {
    /// The answer as one line, newline included.
    pub(crate) fn line(&self) -> String {
        // A unit variant or one string: serialising cannot fail.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// The hidden subcommand a fork child runs.
pub const CHILD_COMMAND: &str = "__fork-child";
/// Tells a child to prepare its VM while it waits: a first message gives
/// it the memory size (8 bytes) and the frozen memory base (attached).
pub(crate) const PREPARE_ARG: &str = "--prepare";
/// Names the VMM binary to start children with, for programs that embed
/// the VMM (default: this executable, which must then call
/// `fork_child::run_child_if_asked` first thing in `main`).
pub const CHILD_BINARY_ENV: &str = "VMM_CHILD_BINARY";
/// How long a child may take to start its vCPUs.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Most file descriptors one message carries.
pub(crate) const MAX_FDS: usize = 64;
/// What `receive` reports when the parent closed without sending.
pub(crate) const NO_MESSAGE: &str = "no message";
/// Largest message accepted.
pub(crate) const MAX_MESSAGE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start the fork child's VMM process {binary}: {source}; set {CHILD_BINARY_ENV} to the vmm binary")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("fork child {id} did not start: {message}")]
    Child { id: String, message: String },
    #[error("the fork message is not valid: {0}")]
    Message(String),
    #[error("this VM has {0} memory overlays (forks of forks); at most {MAX_FDS} fit in one fork message")]
    TooManyLayers(usize),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Action::Fork`'s arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many children (1 to `action::MAX_FORK_COUNT`).
    pub count: u32,
    /// Where the children's sockets go (default: this user's private
    /// runtime directory, see `runtime::user_dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// The children's ids (one per child, valid VM names): their sockets
    /// are `<dir>/<id>.api.sock` and `<dir>/<id>.vsock`. Default
    /// `<parent pid>-<n>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
}

pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// One child, as the fork call reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildInfo {
    pub id: String,
    pub pid: u32,
    pub api_socket: PathBuf,
    pub vsock_socket: Option<PathBuf>,
}

/// A started child process.
pub struct Spawned {
    pub info: ChildInfo,
    pub process: std::process::Child,
}

/// A child process started ahead of a fork: it prepares a VM over the
/// parent's frozen memory base and waits for its message.
pub struct Spare {
    process: std::process::Child,
    stream: UnixStream,
}

impl Spare {
    /// Stops an unused spare and reaps it.
    pub fn stop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    /// Starts a spare child that prepares a VM of `memory_size` bytes over
    /// the frozen memory base `base` (the parent's, after a fork).
    pub fn spawn(memory_size: u64, base: &File) -> Result<Spare> {
        let (process, stream) = start_child(true)?;
        let mut spare = Spare { process, stream };
        if let Err(e) = spare
            .stream
            .send_with_fds(&[&memory_size.to_le_bytes()[..]], &[base.as_raw_fd()])
        {
            spare.stop();
            return Err(Error::Io {
                what: "send a spare fork child its memory",
                source: std::io::Error::from_raw_os_error(e.errno()),
            });
        }
        Ok(spare)
    }
}

/// Starts `vmm __fork-child [--prepare]`; returns it and the parent's end
/// of its socket.
fn start_child(prepare: bool) -> Result<(std::process::Child, UnixStream)> {
    let binary = child_binary();
    let (parent_end, child_end) = UnixStream::pair().map_err(io("create a socket pair"))?;
    let mut cmd = Command::new(&binary);
    cmd.arg(CHILD_COMMAND);
    if prepare {
        cmd.arg(PREPARE_ARG);
    }
    cmd.stdin(Stdio::from(OwnedFd::from(child_end)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let process = crate::spawner::spawn(cmd).map_err(|source| Error::Spawn { binary, source })?;
    Ok((process, parent_end))
}

/// Children that have their message and are starting. Each answers one
/// line on its socket once its vCPUs run; the parent's event loop watches
/// the sockets ([`Pending::fds`]) and feeds what arrives to
/// [`Pending::on_readable`], so a slow start never holds the loop.
pub struct Pending {
    children: Vec<Starting>,
    /// When every child must have answered.
    pub deadline: Instant,
}

struct Starting {
    spawned: Spawned,
    stream: UnixStream,
    /// What the child has written of its answer line so far.
    line: Vec<u8>,
    started: bool,
}

/// The longest answer line a child may write.
const MAX_ANSWER: usize = 4096;

/// What the parent sends a child (with the files attached).
#[derive(Serialize, Deserialize)]
pub(crate) struct Message {
    pub(crate) id: String,
    pub(crate) api_socket: PathBuf,
    pub(crate) state: MachineState,
    /// Runs of each memory overlay, in the order their files are attached
    /// (after the base file).
    pub(crate) overlays: Vec<Vec<(u64, u64)>>,
    /// Whether the base image and the frozen disk layer are attached last.
    pub(crate) disk: bool,
}

/// The binary children run.
pub fn child_binary() -> PathBuf {
    std::env::var_os(CHILD_BINARY_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("vmm"))
}

/// The configuration of child `id`: the parent's, with its own sockets and
/// CID, a throwaway disk layer and its own console file (if any).
fn child_config(parent: &VmConfig, id: &str, dir: &Path) -> VmConfig {
    let mut config = parent.clone();
    if let Some(v) = &mut config.vsock {
        v.uds_path = dir.join(format!("{id}.vsock"));
        v.renew_cid();
    }
    if let Some(r) = &mut config.rootfs {
        r.layer = None;
    }
    // Each child gets a user-mode network of its own; the host ports of
    // port forwards stay with the parent.
    if let Some(NetworkConfig::User { port_forwards, .. }) = &mut config.network {
        port_forwards.clear();
    }
    // A console file gets one per child, `<file>.<id>`; stdout none.
    config.serial = match &parent.serial {
        SerialOutput::File(p) => SerialOutput::File(PathBuf::from(format!("{}.{id}", p.display()))),
        _ => SerialOutput::Off,
    };
    config
}

/// Starts children of the paused machine `state` whose memory is
/// `image`; `disk` is the base image and frozen layer of its root disk.
/// A matching spare from `spares` is used first. One child is started
/// per id in `ids`; their sockets go into `dir`.
/// Returns once every child has its message; wait for them with
/// [`Pending::on_readable`].
pub fn spawn_children(
    state: &MachineState,
    image: &MemoryImage,
    disk: Option<(&File, &File)>,
    ids: &[String],
    dir: &Path,
    spares: &mut Vec<Spare>,
) -> Result<Pending> {
    let mut fds: Vec<RawFd> = vec![image.base.as_raw_fd()];
    fds.extend(image.overlays.iter().map(|o| o.file.as_raw_fd()));
    if let Some((base, layer)) = disk {
        fds.extend([base.as_raw_fd(), layer.as_raw_fd()]);
    }
    if fds.len() > MAX_FDS {
        return Err(Error::TooManyLayers(image.overlays.len()));
    }
    let mut pending = Pending {
        children: Vec::with_capacity(ids.len()),
        deadline: Instant::now() + START_TIMEOUT,
    };
    for id in ids {
        let id = id.clone();
        // A spare prepared over another base restores the usual way.
        let started = match spares.pop() {
            Some(spare) => Ok((spare.process, spare.stream)),
            None => start_child(false),
        };
        let (process, parent_end) = match started {
            Ok(s) => s,
            Err(e) => {
                pending.kill_all();
                return Err(e);
            }
        };
        let pid = process.id();
        let config = child_config(&state.config, &id, dir);
        let info = ChildInfo {
            id: id.clone(),
            pid,
            api_socket: dir.join(format!("{id}.api.sock")),
            vsock_socket: config.vsock.as_ref().map(|v| v.uds_path.clone()),
        };
        let message = Message {
            id,
            api_socket: info.api_socket.clone(),
            state: MachineState {
                config,
                ..state.clone()
            },
            overlays: image.overlays.iter().map(|o| o.runs.clone()).collect(),
            disk: disk.is_some(),
        };
        let sent = serde_json::to_vec(&message)
            .map_err(std::io::Error::other)
            .and_then(|body| {
                parent_end
                    .send_with_fds(&[&(body.len() as u64).to_le_bytes()[..]], &fds)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
                (&parent_end).write_all(&body)
            });
        let sent = sent.and_then(|()| parent_end.set_nonblocking(true));
        pending.children.push(Starting {
            spawned: Spawned { info, process },
            stream: parent_end,
            line: Vec::new(),
            started: false,
        });
        if let Err(source) = sent {
            pending.kill_all();
            return Err(Error::Io {
                what: "send a fork child its state",
                source,
            });
        }
    }
    Ok(pending)
}

impl Pending {
    /// Stops every child of this fork and reaps it.
    pub fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.spawned.process.kill();
            let _ = c.spawned.process.wait();
        }
    }

    /// The sockets on which the children answer.
    pub fn fds(&self) -> Vec<RawFd> {
        self.children.iter().map(|c| c.stream.as_raw_fd()).collect()
    }

    /// Reads what the child behind `fd` answered so far (without
    /// blocking). Ok(true) once every child runs its vCPUs; an error when
    /// one failed (then stop them all with [`Pending::kill_all`]).
    pub fn on_readable(&mut self, fd: RawFd) -> Result<bool> {
        if let Some(c) = self
            .children
            .iter_mut()
            .find(|c| c.stream.as_raw_fd() == fd)
        {
            c.read_answer()?;
        }
        Ok(self.children.iter().all(|c| c.started))
    }

    /// The children, once [`Pending::on_readable`] said they all run.
    pub fn finish(self) -> Vec<Spawned> {
        self.children.into_iter().map(|c| c.spawned).collect()
    }

    /// The error for a child that did not answer by the deadline.
    pub fn timed_out(&self) -> Error {
        let id = self
            .children
            .iter()
            .find(|c| !c.started)
            .map(|c| c.spawned.info.id.clone())
            .unwrap_or_default();
        Error::Child {
            id,
            message: format!("it did not start within {START_TIMEOUT:?}"),
        }
    }
}

impl Starting {
    fn read_answer(&mut self) -> Result<()> {
        let fail = |message: String| Error::Child {
            id: self.spawned.info.id.clone(),
            message,
        };
        if self.started {
            return Ok(());
        }
        let mut buf = [0u8; 512];
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    return Err(fail(
                        "it exited before starting (see its error output)".into(),
                    ))
                }
                Ok(n) => self.line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail(format!("no answer: {e}"))),
            }
            if let Some(end) = self.line.iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.line[..end]).into_owned();
                return match serde_json::from_str::<ChildAnswer>(&line) {
                    Ok(ChildAnswer::Started) => {
                        self.started = true;
                        Ok(())
                    }
                    Ok(ChildAnswer::Failed(message)) => Err(fail(message)),
                    Err(_) => Err(fail(format!("unexpected answer {:?}", line.trim()))),
                };
            }
            if self.line.len() > MAX_ANSWER {
                return Err(fail("its answer is too long".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ChildAnswer;

    #[test]
    fn a_child_answer_is_one_json_line_both_ways() {
        for answer in [
            ChildAnswer::Started,
            ChildAnswer::Failed("no memory".into()),
        ] {
            let line = answer.line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(serde_json::from_str::<ChildAnswer>(&line).unwrap(), answer);
        }
        assert!(serde_json::from_str::<ChildAnswer>(r#"{"ok":true}"#).is_err());
    }
}
