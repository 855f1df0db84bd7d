//! A VM with its agent, run in this process: what `vmm run` uses, and the
//! Rust embedding API. A [`Sandbox`] starts (or restores) a VM on a thread
//! of this process; its [`MachineHandle`] takes typed actions ([`Control`]:
//! pause, resume, snapshot, fork, describe, stop) without HTTP, and its
//! agent runs commands and moves files. Fork children are VMs in their own
//! processes ([`Forked`]), controlled through their sockets with the same
//! typed calls. `examples/sandboxes.rs` does all of it.
//!
//! ```no_run
//! use vmm::action::Control;
//! vmm::fork_child::run_child_if_asked(); // first in main: fork children re-enter here
//! let sandbox = vmm::sandbox::Sandbox::start(vmm::VmConfig::default())?;
//! let cmd = vmm::agent::Exec { argv: vec!["python3".into(), "-c".into(), "print(6*7)".into()], ..Default::default() };
//! let status = sandbox.agent().exec(&cmd, None, &mut std::io::stdout(), &mut std::io::stderr())?;
//! sandbox.machine().pause()?;
//! sandbox.machine().resume()?;
//! for child in sandbox.fork(2)? {
//!     child.agent()?.exec(&cmd, None, &mut std::io::stdout(), &mut std::io::stderr())?;
//! }
//! let outcome = sandbox.stop()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::action::{Action, ActionError, Control};
use crate::agent::AgentClient;
use crate::api::ApiClient;
use crate::config::{SerialOutput, VmConfig};
use crate::fork::ChildInfo;
use crate::machine::MachineHandle;
use crate::runtime::RuntimeDir;
use crate::snapshot::host::HostSettings;
use crate::snapshot::RestoreOptions;
use crate::{RunOptions, RunOutcome, Vm};

/// How long a guest may take to boot to its agent (PVM hosts are slow).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a stopped fork child's process gets to end.
const STOP_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
    #[error(transparent)]
    Agent(#[from] crate::agent::Error),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
    #[error("cannot set up the VM thread: {0}")]
    Setup(std::io::Error),
    #[error("the VM ended before its agent came up: {0}")]
    EndedEarly(String),
    #[error(transparent)]
    Action(#[from] ActionError),
    #[error(transparent)]
    Api(#[from] crate::api::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    #[error("the saved machine has no vsock device, so no agent: restore it with `vmm restore`")]
    NoAgent,
    #[error("the VM thread panicked")]
    Panicked,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Fills in what running commands needs: the vsock socket in `scratch` (a
/// private runtime directory) and, with `root_disk`, the default root disk
/// ([`VmConfig::ensure_agent`]). The console goes nowhere unless the
/// config names a file.
fn with_sandbox_defaults(mut config: VmConfig, scratch: &Path, root_disk: bool) -> VmConfig {
    let vsock = scratch.join("vsock.sock");
    if root_disk {
        config.ensure_agent(vsock);
    } else {
        config.ensure_vsock(vsock);
    }
    if config.serial == SerialOutput::Stdout {
        config.serial = SerialOutput::Off;
    }
    config
}

/// A running VM whose agent answers.
pub struct Sandbox {
    agent: AgentClient,
    machine: MachineHandle,
    /// Runs the VM; removes the sandbox's scratch folder (its sockets and
    /// disk layer) when the VM has ended.
    thread: Option<JoinHandle<crate::vm::Result<RunOutcome>>>,
}

impl Sandbox {
    /// Boots `config` and waits for the agent. Where the config leaves
    /// them out, the sandbox gets the default root disk (Debian, with a
    /// throwaway layer) and a vsock device; the console goes nowhere unless
    /// the config names a file.
    pub fn start(config: VmConfig) -> Result<Sandbox> {
        Self::boot(config, true)
    }

    /// As [`Sandbox::start`], but without a root disk unless the config
    /// names one: for a guest whose agent runs from its initramfs (the
    /// default initramfs has one), which boots faster and has less memory
    /// to copy.
    pub fn start_without_root_disk(config: VmConfig) -> Result<Sandbox> {
        Self::boot(config, false)
    }

    fn boot(config: VmConfig, root_disk: bool) -> Result<Sandbox> {
        let start = Instant::now();
        let scratch = RuntimeDir::create("sandbox")?;
        let config = with_sandbox_defaults(config, scratch.path(), root_disk);
        let hv = crate::open_hypervisor()?;
        let vm = Vm::build(&config, hv.as_ref(), start)?;
        Self::run(vm, hv, &config, scratch)
    }

    /// Restores snapshot directory `dir` in this process and waits for its
    /// agent. Host-side settings come from `host` (see `snapshot::host`;
    /// its config gets the defaults [`Sandbox::start`] gives); `key`
    /// checks the snapshot's MAC.
    pub fn restore(dir: &Path, mut host: HostSettings, key: Option<Vec<u8>>) -> Result<Sandbox> {
        let start = Instant::now();
        let scratch = RuntimeDir::create("sandbox")?;
        host.config = host
            .config
            .map(|c| with_sandbox_defaults(c, scratch.path(), true));
        let opts = RestoreOptions {
            vsock_socket: scratch.path().join("vsock.sock"),
            host,
            key,
        };
        let source = crate::snapshot::restore_source(dir, &opts)?;
        let config = source.state.config.clone();
        if config.vsock.is_none() {
            return Err(Error::NoAgent);
        }
        let hv = crate::open_hypervisor()?;
        let vm = Vm::restore(source, hv.as_ref(), start)?;
        Self::run(vm, hv, &config, scratch)
    }

    /// Runs `vm` (built from `config`) on its own thread and waits for its
    /// agent.
    fn run(
        vm: Vm,
        hv: Box<dyn hypervisor::Hypervisor>,
        config: &VmConfig,
        scratch: RuntimeDir,
    ) -> Result<Sandbox> {
        let uds = config
            .vsock
            .as_ref()
            .map(|v| v.uds_path.clone())
            .ok_or(Error::NoAgent)?;
        let (started_tx, started) = mpsc::sync_channel(1);
        let opts = RunOptions {
            on_started: Some(Box::new(move |machine| {
                let _ = started_tx.send(machine);
            })),
            watch_agent: true,
            ..Default::default()
        };
        let mut thread = Some(
            std::thread::Builder::new()
                .name("vmm".into())
                .spawn(move || {
                    let _hv = hv;
                    // Removed by this thread once the VM has ended (its
                    // filter allows that; the caller's may not).
                    let _scratch = scratch;
                    vm.run(opts)
                })
                .map_err(Error::Setup)?,
        );
        let ended_early = |thread: &mut Option<JoinHandle<_>>| match join(thread) {
            Ok(outcome) => Error::EndedEarly(outcome.reason.to_string()),
            Err(e) => e,
        };
        // No handle: the VM ended before its vCPUs ran.
        let Ok(machine) = started.recv() else {
            return Err(ended_early(&mut thread));
        };
        match machine.perform_within(Action::WaitAgent, BOOT_TIMEOUT) {
            Ok(_) => {}
            Err(ActionError::Stopped) => return Err(ended_early(&mut thread)),
            Err(e) => {
                let _ = machine.stop();
                let _ = join(&mut thread);
                return Err(e.into());
            }
        }
        Ok(Sandbox {
            agent: AgentClient::new(&uds),
            machine,
            thread,
        })
    }

    /// Forks the sandbox into `count` children, each a VM in its own
    /// process that continues from this instant; returns once they run.
    /// The children's processes run this program's executable (see
    /// `fork_child::run_child_if_asked`) or the `vmm` binary that
    /// `VMM_CHILD_BINARY` names.
    pub fn fork(&self, count: u32) -> Result<Vec<Forked>> {
        let info = self.machine.fork(count, None)?;
        Ok(info.children.into_iter().map(Forked::from).collect())
    }

    /// The agent client, for exec, put and get.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Sends the machine actions: pause, resume, snapshot, fork, describe.
    pub fn machine(&self) -> &MachineHandle {
        &self.machine
    }

    /// Shuts the guest down through the agent (it syncs first) and waits
    /// for the VM to end.
    pub fn stop(mut self) -> Result<RunOutcome> {
        self.agent.shutdown()?;
        join(&mut self.thread)
    }

    /// Stops the VM at once, without shutting the guest down: for a
    /// sandbox whose root disk layer is thrown away, where nothing the
    /// guest has not written out yet would outlive it (what it writes to
    /// a share reaches the host folder as it writes: no write-back cache).
    pub fn discard(mut self) -> Result<RunOutcome> {
        self.machine.stop()?;
        join(&mut self.thread)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // Not stopped explicitly: ask the guest to power off, and wait.
            let _ = self.agent.shutdown();
            let _ = join(&mut self.thread);
        }
    }
}

/// Waits for the VM thread to end.
fn join(thread: &mut Option<JoinHandle<crate::vm::Result<RunOutcome>>>) -> Result<RunOutcome> {
    let thread = thread.take().ok_or(Error::Panicked)?;
    Ok(thread.join().map_err(|_| Error::Panicked)??)
}

/// A fork child: a VM in its own process, controlled through its control
/// socket ([`Control`] on [`Forked::control`]) and its agent. Stopped when
/// dropped.
pub struct Forked {
    info: ChildInfo,
    control: ApiClient,
    agent: Option<AgentClient>,
    stopped: bool,
}

impl From<ChildInfo> for Forked {
    /// The handle of a child a fork made ([`Control::fork`] on
    /// [`Sandbox::machine`]).
    fn from(info: ChildInfo) -> Self {
        Forked {
            control: ApiClient::new(&info.api_socket),
            agent: info.vsock_socket.as_deref().map(AgentClient::new),
            info,
            stopped: false,
        }
    }
}

impl Forked {
    /// Its id, process and sockets.
    pub fn info(&self) -> &ChildInfo {
        &self.info
    }

    /// Pause, resume, snapshot, fork, describe, stop.
    pub fn control(&self) -> &ApiClient {
        &self.control
    }

    /// The agent client, for exec, put and get (the parent's agent, which
    /// the child continues, answers once the child's vsock reset is done).
    pub fn agent(&self) -> Result<&AgentClient> {
        self.control.wait_agent()?;
        self.agent.as_ref().ok_or(Error::NoAgent)
    }

    /// Stops the child at once and waits for its process to end.
    pub fn stop(mut self) -> Result<()> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        let Ok(pidfd) = vmm_os::process::exit_fd(self.info.pid) else {
            return Ok(());
        };
        self.control.stop()?;
        vmm_os::process::ended_within(&pidfd, STOP_WAIT);
        Ok(())
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}
