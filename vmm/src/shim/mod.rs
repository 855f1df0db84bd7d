//! `containerd-shim-vmm-v2`: containerd's runtime v2 shim, so containerd
//! and Kubernetes run containers in our microVMs (docs/containerd.md).
//!
//! containerd runs the shim's `start` per container (it forks the
//! long-lived shim of the container's pod, or finds it, and prints its
//! socket), then calls the task API over ttrpc (containerd's
//! `containerd-shim` crate). Each pod gets a VM, started from a template
//! (a container without a pod is a pod of its own): its containers' root
//! file systems (the snapshots containerd mounted) reach the guest through
//! the pod's virtio-fs share, and the guest agent runs their processes
//! chrooted there, their stdio carried to containerd's FIFOs.

mod container;
mod network;
mod options;
mod pod;
mod process;
mod spec;
mod stats;
mod task;
mod vm;

use std::sync::Arc;

use containerd_shim::{api, publisher::RemotePublisher, ExitSignal, Flags, StartOpts};

pub use options::Settings;

/// The runtime's name in containerd (`--runtime io.containerd.vmm.v2`
/// runs the binary `containerd-shim-vmm-v2`).
pub const RUNTIME_ID: &str = "io.containerd.vmm.v2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the bundle's OCI spec cannot be used: {0}")]
    BadSpec(String),
    #[error("not supported by the vmm runtime: {0} (docs/containerd.md lists what is)")]
    Unsupported(String),
    #[error("the vmm runtime's settings: {0}")]
    Settings(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    State(String),
    #[error("cannot mount the container's root file system: {0}")]
    Rootfs(String),
    #[error("the container's VM did not start: {0}")]
    Start(String),
    #[error("the container's VM: {0}")]
    Api(String),
    #[error("the pod's network: {0}")]
    Network(String),
    #[error("the guest agent: {0}")]
    Agent(#[from] crate::agent::Error),
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for containerd_shim::protos::ttrpc::Error {
    fn from(e: Error) -> Self {
        use containerd_shim::protos::ttrpc::{get_status, Code, Error as T};
        let code = match &e {
            Error::BadSpec(_) | Error::Settings(_) => Code::INVALID_ARGUMENT,
            Error::Unsupported(_) => Code::UNIMPLEMENTED,
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::Exists(_) => Code::ALREADY_EXISTS,
            Error::State(_) => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        };
        T::RpcStatus(get_status(code, e.to_string()))
    }
}

/// The shim binary's `main`.
pub fn main() {
    let config = containerd_shim::Config {
        // The shim waits for its own children (the VMMs) itself.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<Shim>(RUNTIME_ID, Some(config));
}

struct Shim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for Shim {
    type T = task::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Shim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Starts the long-lived shim process for this container and prints
    /// its socket's address (a running one's when it exists already).
    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // A pod's containers share its shim (and VM): containerd runs
        // `start` in the bundle, whose spec names the pod.
        let grouping = std::env::current_dir()
            .ok()
            .and_then(|bundle| container::pod_of(&bundle))
            .unwrap_or_else(|| opts.id.clone());
        let (_, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    /// Cleans up after a shim that is gone (containerd runs `delete` in
    /// the bundle): its VMM, the root file system's mount, the runtime
    /// folder.
    fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        let bundle =
            std::env::current_dir().map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        container::clean_up(&self.namespace, &self.id, &bundle);
        let mut response = api::DeleteResponse::new();
        response.exit_status = 128 + libc::SIGKILL as u32;
        response.exited_at = Some(containerd_shim::util::timestamp()?).into();
        Ok(response)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> task::Service {
        task::Service::new(&self.namespace, publisher, self.exit.clone())
    }
}
