//! A VM with its agent, run in this process: what `vmm run` uses, and the
//! simplest way to embed the VMM.
//!
//! ```no_run
//! let sandbox = vmm::sandbox::Sandbox::start(vmm::VmConfig::default())?;
//! let cmd = vmm::agent::Exec { argv: vec!["python3".into(), "-c".into(), "print(6*7)".into()], ..Default::default() };
//! let status = sandbox.agent().exec(&cmd, None, &mut std::io::stdout(), &mut std::io::stderr())?;
//! let outcome = sandbox.stop()?;
//! # Ok::<(), vmm::sandbox::Error>(())
//! ```

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::agent::{AgentClient, ReadyListener};
use crate::config::{RootfsConfig, SerialOutput, VmConfig, VsockConfig};
use crate::runtime::RuntimeDir;
use crate::{RunOptions, RunOutcome, Vm};

/// How long a guest may take to boot to its agent (PVM hosts are slow).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Guest context id used when the config has no vsock section.
pub const DEFAULT_CID: u64 = 3;

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
    #[error("the VM thread panicked")]
    Panicked,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Fills in what running commands needs: the default root disk (with a
/// throwaway layer) and a vsock device on a socket in `scratch` (a
/// private runtime directory).
/// The console goes nowhere unless the config names a file.
pub fn with_sandbox_defaults(mut config: VmConfig, scratch: &std::path::Path) -> VmConfig {
    if config.rootfs.is_none() {
        config.rootfs = Some(RootfsConfig::default());
    }
    if config.vsock.is_none() {
        config.vsock = Some(VsockConfig {
            cid: DEFAULT_CID,
            uds_path: scratch.join("vsock.sock"),
        });
    }
    if config.serial == SerialOutput::Stdout {
        config.serial = SerialOutput::Off;
    }
    config
}

/// A running VM whose agent answers.
pub struct Sandbox {
    agent: AgentClient,
    thread: Option<JoinHandle<crate::vm::Result<RunOutcome>>>,
    /// Holds the vsock sockets; removed when the sandbox is dropped.
    _scratch: RuntimeDir,
}

impl Sandbox {
    /// Boots `config` (with [`with_sandbox_defaults`]) and waits for the agent.
    pub fn start(config: VmConfig) -> Result<Sandbox> {
        let start = Instant::now();
        let scratch = RuntimeDir::create("sandbox")?;
        let config = with_sandbox_defaults(config, scratch.path());
        let uds = config
            .vsock
            .as_ref()
            .map(|v| v.uds_path.clone())
            .unwrap_or_default();
        let ready = ReadyListener::bind(&uds)?;
        let hv = crate::open_hypervisor()?;
        let vm = Vm::build(&config, hv.as_ref(), start)?;
        let ended = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Setup)?;
        let ended_signal = ended.try_clone().map_err(Error::Setup)?;
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                let _hv = hv;
                let outcome = vm.run(RunOptions::default());
                let _ = ended_signal.write(1);
                outcome
            })
            .map_err(Error::Setup)?;
        let mut sandbox = Sandbox {
            agent: AgentClient::new(&uds),
            thread: Some(thread),
            _scratch: scratch,
        };
        if let Err(e) = ready.wait(BOOT_TIMEOUT, Some(&ended)) {
            return Err(match sandbox.join() {
                Ok(outcome) => Error::EndedEarly(outcome.reason.to_string()),
                Err(_) => Error::Agent(e),
            });
        }
        Ok(sandbox)
    }

    /// The agent client, for exec, put and get.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    fn join(&mut self) -> Result<RunOutcome> {
        let thread = self.thread.take().ok_or(Error::Panicked)?;
        Ok(thread.join().map_err(|_| Error::Panicked)??)
    }

    /// Shuts the guest down through the agent (it syncs first) and waits
    /// for the VM to end.
    pub fn stop(mut self) -> Result<RunOutcome> {
        self.agent.shutdown()?;
        self.join()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // Not stopped explicitly: ask the guest to power off, and wait.
            let _ = self.agent.shutdown();
            let _ = self.join();
        }
    }
}
