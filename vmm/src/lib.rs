//! A microVM monitor for AI-agent sandboxes.
//!
//! Embedding: build a [`VmConfig`], open the hypervisor, build a [`Vm`] and
//! run it:
//!
//! ```no_run
//! use std::time::Instant;
//! let config = vmm::VmConfig { vcpus: 2, memory_mib: 256, ..Default::default() };
//! let hv = vmm::open_hypervisor()?;
//! let vm = vmm::Vm::build(&config, hv.as_ref(), Instant::now())?;
//! let outcome = vm.run(vmm::RunOptions::default())?;
//! println!("{}", outcome.reason);
//! # Ok::<(), vmm::vm::Error>(())
//! ```

pub mod action;
pub mod agent;
pub mod api;
pub mod arch;
pub mod artifacts;
pub mod config;
pub mod control;
pub mod device;
pub mod doctor;
pub mod exit;
pub mod fork;
pub mod fork_child;
pub mod image;
pub mod jail;
pub mod machine;
pub mod memory;
pub mod names;
pub mod partial;
pub mod runtime;
pub mod sandbox;
pub mod seccomp;
pub mod serve;
#[cfg(target_os = "linux")]
pub mod shim;
pub mod signals;
pub mod snapshot;
pub mod spawner;
pub mod template;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use config::VmConfig;
pub use exit::ExitReason;
pub use vm::{open_hypervisor, BootTimings, RunOptions, RunOutcome, Vm};

/// Logs to standard error, filtered by `VMM_LOG` (tracing filter syntax;
/// `warn` when unset). For the `vmm` and `vmm-bench` programs.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // A program that set up its own logging keeps it.
        .try_init()
        .ok();
}

#[cfg(test)]
mod module_graph;
