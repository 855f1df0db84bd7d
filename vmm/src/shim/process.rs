//! One process of a container (its init or an exec): run by the guest
//! agent, its stdio carried between containerd's FIFOs and the agent, its
//! end told to whoever waits.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use vmm_os::EventFd;

use crate::agent::{AgentClient, Exec, ExitStatus, SessionInput};

use super::{Error, Result};

/// The status containerd reports for a process that ended without one
/// the guest could tell (its VM went away).
const LOST: u32 = 255;
/// A new terminal's size until containerd sends one.
const TERMINAL: vmm_agent::PtySize = vmm_agent::PtySize { cols: 80, rows: 24 };

/// containerd's FIFOs for a process (empty: none).
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped { code: u32, at: SystemTime },
}

struct State {
    status: Status,
    guest_pid: i32,
    input: Option<SessionInput>,
}

pub struct Process {
    command: Exec,
    pub stdio: Stdio,
    state: Mutex<State>,
    ended: Condvar,
    /// Tells the stdin copier the process has ended.
    done: EventFd,
}

impl Process {
    pub fn new(command: Exec, stdio: Stdio) -> Result<Arc<Process>> {
        let done = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::Io(format!("cannot make an eventfd: {e}")))?;
        Ok(Arc::new(Process {
            command,
            stdio,
            state: Mutex::new(State {
                status: Status::Created,
                guest_pid: 0,
                input: None,
            }),
            ended: Condvar::new(),
            done,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> Status {
        self.state().status
    }

    /// The process's pid in the guest (0 before it runs).
    pub fn guest_pid(&self) -> i32 {
        self.state().guest_pid
    }

    /// Runs the process in the guest; `on_exit` is called with its status
    /// once it has ended. Returns its guest pid.
    pub fn start(
        self: &Arc<Self>,
        agent: &AgentClient,
        on_exit: impl FnOnce(u32, SystemTime) + Send + 'static,
    ) -> Result<i32> {
        if self.status() != Status::Created {
            return Err(Error::State("the process was started already".into()));
        }
        let mut stdout = open_writer(&self.stdio.stdout)?;
        let mut stderr = open_writer(&self.stdio.stderr)?;
        let stdin = match self.stdio.stdin.is_empty() {
            true => None,
            false => Some(open_reader(&self.stdio.stdin)?),
        };
        let pty = self.stdio.terminal.then_some(TERMINAL);
        let session = agent.start(&self.command, stdin.is_some(), pty)?;
        let pid = session.pid();
        let input = session.input()?;
        {
            let mut state = self.state();
            state.status = Status::Running;
            state.guest_pid = pid;
            state.input = Some(session.input()?);
        }
        if let Some(fifo) = stdin {
            let done = self
                .done
                .try_clone()
                .map_err(|e| Error::Io(e.to_string()))?;
            std::thread::spawn(move || copy_input(fifo, input, done));
        }
        let me = self.clone();
        std::thread::spawn(move || {
            let (mut out, mut err) = (sink(&mut stdout), sink(&mut stderr));
            let code = match session.finish(&mut out, &mut err) {
                Ok(ExitStatus::Code(c)) => c as u32,
                Ok(ExitStatus::Signal(s)) => 128 + s as u32,
                Ok(ExitStatus::TimedOut) => 128 + libc::SIGKILL as u32,
                Err(e) => {
                    log::warn!("lost the process's end: {e}");
                    LOST
                }
            };
            let at = me.stopped(code);
            on_exit(code, at);
        });
        Ok(pid)
    }

    /// Marks the process ended with `code` (a process killed before it
    /// ran, or one whose VM is gone); returns when.
    pub fn stopped(&self, code: u32) -> SystemTime {
        let mut state = self.state();
        if let Status::Stopped { at, .. } = state.status {
            return at;
        }
        let at = SystemTime::now();
        state.status = Status::Stopped { code, at };
        state.input = None;
        drop(state);
        let _ = self.done.write(1);
        self.ended.notify_all();
        at
    }

    /// Blocks until the process has ended; its status and when.
    pub fn wait(&self) -> (u32, SystemTime) {
        let mut state = self.state();
        loop {
            if let Status::Stopped { code, at } = state.status {
                return (code, at);
            }
            state = self.ended.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sends `signal` to the running process; a created one ends as if
    /// killed by it.
    pub fn signal(&self, agent: &AgentClient, signal: u32) -> Result<()> {
        let (status, pid) = {
            let s = self.state();
            (s.status, s.guest_pid)
        };
        match status {
            Status::Created => {
                self.stopped(128 + signal);
                Ok(())
            }
            Status::Running => match agent.signal(pid, signal as i32)? {
                true => Ok(()),
                false => Err(Error::NotFound("the process has ended".into())),
            },
            Status::Stopped { .. } => Err(Error::NotFound("the process has ended".into())),
        }
    }

    /// Sets the process's terminal size.
    pub fn resize(&self, cols: u32, rows: u32) -> Result<()> {
        let clamp = |v: u32| v.clamp(1, u16::MAX as u32) as u16;
        match self.state().input.as_mut() {
            Some(input) => Ok(input.resize(clamp(cols), clamp(rows))?),
            None => Err(Error::State("the process is not running".into())),
        }
    }

    /// Ends the process's input.
    pub fn close_stdin(&self) -> Result<()> {
        if let Some(input) = self.state().input.as_mut() {
            input.write(&[])?;
        }
        Ok(())
    }
}

/// A write end of containerd's FIFO (read-write: it never blocks on a
/// reader that is not there yet); `None` without one.
fn open_writer(path: &str) -> Result<Option<File>> {
    if path.is_empty() {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::Io(format!("cannot open the FIFO {path}: {e}")))?;
    Ok(Some(file))
}

/// The read end of containerd's stdin FIFO, non-blocking: the copier polls.
fn open_reader(path: &str) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::Io(format!("cannot open the FIFO {path}: {e}")))
}

/// Where a process's output goes: its FIFO, or nowhere.
fn sink(file: &mut Option<File>) -> Box<dyn std::io::Write + '_> {
    match file {
        Some(f) => Box::new(f),
        None => Box::new(std::io::sink()),
    }
}

/// Copies the stdin FIFO into the process until the writer has gone (then
/// ends its input) or the process has ended (`done`).
fn copy_input(mut fifo: File, mut input: SessionInput, done: EventFd) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: fifo.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: done.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two valid pollfds we own. A FIFO no writer
        // ever opened reports nothing (not a hang-up) until one does.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        match fifo.read(&mut buf) {
            Ok(0) => {
                let _ = input.write(&[]);
                return;
            }
            Ok(n) => {
                if input.write(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
