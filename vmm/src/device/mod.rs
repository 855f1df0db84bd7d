//! `vmm device fs|vsock`: our virtio-fs and virtio-vsock devices as
//! vhost-user daemons, for QEMU, Cloud Hypervisor, crosvm or any other
//! vhost-user frontend (docs/vhost-user.md). Linux only (vhost-user's
//! memory sharing and eventfds).
//!
//! A daemon listens on its socket (mode 0600), serves one frontend at a
//! time and exits with status 0 once that frontend disconnects (with
//! `persistent`, it waits for the next one). A connection that breaks the
//! protocol (a truncated or unknown message, a bad size or memory table),
//! or that closes before its first request, is dropped with a log line and
//! the daemon waits for the next connection. SIGTERM and SIGINT end it at once. Before it accepts a
//! connection, the daemon drops its capabilities, confines itself with
//! Landlock to its folders and installs its seccomp filter.

#[cfg(target_os = "linux")]
mod daemon;

use std::path::PathBuf;

/// Which device the daemon serves.
#[derive(Debug, Clone)]
pub enum Device {
    /// virtio-fs: `shared_dir` under the same confinement as a share of
    /// our own VMs (docs/security.md).
    Fs {
        shared_dir: PathBuf,
        /// None when the frontend supplies the tag (QEMU's `tag=`).
        tag: Option<String>,
        read_only: bool,
    },
    /// virtio-vsock with the host side on Unix sockets: host clients
    /// connect to `uds_path` and write `CONNECT <port>`; guest connections
    /// go to `<uds_path>_<port>`.
    Vsock { guest_cid: u64, uds_path: PathBuf },
}

impl Device {
    /// The device's name in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Device::Fs { .. } => "fs",
            Device::Vsock { .. } => "vsock",
        }
    }
}

/// What `vmm device` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The vhost-user socket the frontend connects to.
    pub socket: PathBuf,
    pub device: Device,
    /// Serve the next frontend once one disconnects, instead of exiting.
    pub persistent: bool,
    /// Run under the `device daemon` seccomp filter (docs/security.md).
    pub seccomp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Share(#[from] devices::virtio::fs::Error),
    #[error("the tag {tag:?} is {len} bytes long; virtio-fs tags hold at most {max} bytes: choose a shorter --tag", len = .tag.len(), max = devices::virtio::fs::MAX_TAG_LEN)]
    TagTooLong { tag: String },
    #[error("guest CID {0} is reserved (0, 1 and 2 are the hypervisor, local and host, and 2^32-1 means any): choose --guest-cid 3 or above, below 4294967295")]
    ReservedCid(u64),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen for host vsock clients on {path}: {source}")]
    VsockSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the daemon: {0}")]
    Setup(String),
    #[error("cannot confine the daemon to its folders ({0})")]
    Confine(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
    #[error("vhost-user daemons run on Linux only: other VMMs on this host cannot share our memory through vhost-user")]
    NotOnThisHost,
}

/// Checks what the command line gave before anything is opened.
fn check(options: &Options) -> Result<(), Error> {
    match &options.device {
        Device::Fs { tag: Some(tag), .. } if tag.len() > devices::virtio::fs::MAX_TAG_LEN => {
            Err(Error::TagTooLong { tag: tag.clone() })
        }
        Device::Vsock { guest_cid, .. } if *guest_cid < 3 || *guest_cid >= u64::from(u32::MAX) => {
            Err(Error::ReservedCid(*guest_cid))
        }
        _ => Ok(()),
    }
}

/// Runs the daemon until its frontend disconnects (or, `persistent`,
/// until a signal); `listening` is called once the socket accepts
/// connections.
pub fn run(options: &Options, listening: impl FnOnce(&Options)) -> Result<(), Error> {
    check(options)?;
    #[cfg(target_os = "linux")]
    return daemon::run(options, listening);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = listening;
        Err(Error::NotOnThisHost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(tag: &str) -> Options {
        Options {
            socket: "/nonexistent/s".into(),
            device: Device::Fs {
                shared_dir: "/nonexistent".into(),
                tag: Some(tag.into()),
                read_only: false,
            },
            persistent: false,
            seccomp: false,
        }
    }

    #[test]
    fn bad_arguments_get_a_sentence_before_anything_opens() {
        let long = "t".repeat(37);
        let e = run(&fs(&long), |_| {}).unwrap_err().to_string();
        assert!(e.contains("at most 36 bytes"), "{e}");
        for cid in [0, 1, 2, u64::from(u32::MAX)] {
            let o = Options {
                device: Device::Vsock {
                    guest_cid: cid,
                    uds_path: "/nonexistent/v".into(),
                },
                ..fs("t")
            };
            let e = run(&o, |_| {}).unwrap_err().to_string();
            assert!(e.contains("--guest-cid 3"), "{e}");
        }
        let e = run(&fs("t"), |_| {}).unwrap_err().to_string();
        assert!(e.contains("/nonexistent"), "{e}");
    }
}
