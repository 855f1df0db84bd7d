//! `vmm device fs|vsock`: our devices as vhost-user daemons for other VMMs
//! (docs/vhost-user.md, `vmm::device`).

use std::path::PathBuf;
use std::process::ExitCode;

use vmm::device::{Device, Options};

use super::fail;

/// `vmm device ...`.
#[derive(clap::Subcommand)]
pub enum DeviceCommand {
    /// Serve a host folder as virtio-fs over vhost-user (QEMU's
    /// vhost-user-fs-pci / -device, Cloud Hypervisor's --fs).
    Fs {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// The folder the guest sees (confined to it: docs/security.md).
        #[arg(long)]
        shared_dir: PathBuf,
        /// The tag the guest mounts; leave it out when the frontend sets
        /// it (QEMU's tag=, Cloud Hypervisor's tag=).
        #[arg(long)]
        tag: Option<String>,
        /// Refuse every change to the folder, on the host side.
        #[arg(long)]
        read_only: bool,
    },
    /// Serve virtio-vsock over vhost-user with the host side on Unix
    /// sockets: host clients connect to --uds-path and write
    /// `CONNECT <port>\n`; guest connections to port P reach
    /// `<uds-path>_P` (QEMU's vhost-user-vsock-pci / -device).
    Vsock {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// The guest's context id (3 or above).
        #[arg(long)]
        guest_cid: u64,
        /// The Unix socket of the host side.
        #[arg(long)]
        uds_path: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct DaemonArgs {
    /// The vhost-user socket the VMM connects to (made with mode 0600).
    #[arg(long)]
    socket: PathBuf,
    /// Serve the next VMM once one disconnects, instead of exiting.
    #[arg(long)]
    persistent: bool,
    /// Run without the seccomp filter (debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

pub fn command(command: DeviceCommand) -> ExitCode {
    let (daemon, device) = match command {
        DeviceCommand::Fs {
            daemon,
            shared_dir,
            tag,
            read_only,
        } => (
            daemon,
            Device::Fs {
                shared_dir,
                tag,
                read_only,
            },
        ),
        DeviceCommand::Vsock {
            daemon,
            guest_cid,
            uds_path,
        } => (
            daemon,
            Device::Vsock {
                guest_cid,
                uds_path,
            },
        ),
    };
    let options = Options {
        socket: daemon.socket,
        device,
        persistent: daemon.persistent,
        seccomp: !daemon.no_seccomp && cfg!(target_os = "linux"),
    };
    let listening = |o: &Options| {
        eprintln!(
            "vmm device {}: listening on {}",
            o.device.name(),
            o.socket.display()
        );
    };
    match vmm::device::run(&options, listening) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
