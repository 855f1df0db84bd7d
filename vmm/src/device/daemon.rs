//! The daemon on Linux: one vhost-user connection at a time, each with a
//! fresh backend (a new frontend is a new guest).

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use devices::vhost_user::fs::FsBackend;
use devices::vhost_user::vsock::{VsockBackend, HOST_EVENTS};
use devices::vhost_user::{EventNotifier, Served, Vring, WorkerExit};
use devices::virtio::fs::PassthroughFs;
use vhost::vhost_user::{Error as ProtocolError, Listener};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_os::epoll::EventSet;

use super::{Device, Error, Options};
use crate::seccomp::Role;

/// How a connection ended.
enum Ended {
    /// The frontend closed it.
    Disconnected,
    /// The frontend broke the protocol: it was disconnected.
    Broken(String),
}

pub fn run(options: &Options, listening: impl FnOnce(&Options)) -> Result<(), Error> {
    // The share is opened first: a wrong folder is reported before the
    // socket exists.
    let share = match &options.device {
        Device::Fs {
            shared_dir,
            read_only,
            ..
        } => Some(PassthroughFs::new(shared_dir, *read_only)?),
        Device::Vsock { .. } => None,
    };
    let listener =
        devices::unix_socket::bind_private(&options.socket).map_err(|source| Error::Listen {
            path: options.socket.clone(),
            source,
        })?;
    let mut listener = Listener::from(listener);
    let served = remove_at_stop(options)
        .and_then(|()| confine(options))
        .and_then(|()| serve_all(options, &mut listener, share, listening));
    remove_files();
    served
}

/// Serves frontend after frontend until one disconnects (`persistent`:
/// until a signal). `share`: the first connection's, opened already.
fn serve_all(
    options: &Options,
    listener: &mut Listener,
    mut share: Option<PassthroughFs>,
    listening: impl FnOnce(&Options),
) -> Result<(), Error> {
    if options.seccomp {
        crate::seccomp::apply(Role::DeviceDaemon)?;
    }
    listening(options);
    loop {
        let (exit, notifier) = WorkerExit::new().map_err(setup)?;
        let ended = match &options.device {
            Device::Fs {
                shared_dir,
                tag,
                read_only,
            } => {
                let fs = match share.take() {
                    Some(fs) => fs,
                    None => PassthroughFs::new(shared_dir, *read_only)?,
                };
                serve(
                    listener,
                    FsBackend::new(fs, tag.clone(), exit),
                    notifier,
                    None,
                )?
            }
            Device::Vsock {
                guest_cid,
                uds_path,
            } => {
                let backend = VsockBackend::new(*guest_cid, uds_path, exit).map_err(|source| {
                    Error::VsockSocket {
                        path: uds_path.clone(),
                        source,
                    }
                })?;
                let host = backend.host_events_fd();
                serve(listener, backend, notifier, Some(host))?
            }
        };
        let name = options.device.name();
        match ended {
            Ended::Disconnected if !options.persistent => {
                tracing::info!("vmm device {name}: the frontend disconnected; the daemon ends");
                return Ok(());
            }
            Ended::Disconnected => {
                tracing::info!("vmm device {name}: the frontend disconnected; waiting for the next")
            }
            Ended::Broken(why) => tracing::warn!(
                "vmm device {name}: a frontend broke the vhost-user protocol ({why}): it was disconnected; waiting for the next"
            ),
        }
    }
}

/// Drops every capability and lets the daemon reach only its folders:
/// the share (read-only with --read-only), the folders of its sockets
/// (removed at the end; vsock's host side binds and connects there), and
/// /proc (the share's calls through /proc/self/fd).
fn confine(options: &Options) -> Result<(), Error> {
    let socket_dir = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut ro = vec![PathBuf::from("/proc")];
    let mut rw = vec![socket_dir(&options.socket)];
    match &options.device {
        Device::Fs {
            shared_dir,
            read_only: true,
            ..
        } => ro.push(shared_dir.clone()),
        Device::Fs { shared_dir, .. } => rw.push(shared_dir.clone()),
        Device::Vsock { uds_path, .. } => rw.push(socket_dir(uds_path)),
    }
    let enforced = crate::jail::confine(
        ro.iter().map(PathBuf::as_path).collect(),
        rw.iter().map(PathBuf::as_path).collect(),
    )
    .map_err(|e| Error::Confine(e.to_string()))?;
    if !enforced {
        tracing::info!("this kernel does not enforce every Landlock rule: the daemon's file access is limited only as far as it does");
    }
    Ok(())
}

fn setup(e: impl std::fmt::Display) -> Error {
    Error::Setup(e.to_string())
}

/// Serves the next connection on `listener` with `backend` until it ends.
/// `host_events`: a descriptor of the backend's own that the worker thread
/// watches as event [`HOST_EVENTS`].
fn serve<B>(
    listener: &mut Listener,
    backend: B,
    exit: EventNotifier,
    host_events: Option<RawFd>,
) -> Result<Ended, Error>
where
    B: VhostUserBackendMut<Bitmap = (), Vring = Vring> + Served + 'static,
{
    let backend = Arc::new(RwLock::new(backend));
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon =
        VhostUserDaemon::new("vmm-device".into(), backend.clone(), memory).map_err(setup)?;
    if let Some(fd) = host_events {
        for worker in daemon.get_epoll_handlers() {
            worker
                .register_listener(fd, EventSet::IN, HOST_EVENTS.into())
                .map_err(setup)?;
        }
    }
    daemon.start(listener).map_err(setup)?;
    tracing::info!("a frontend connected");
    let result = daemon.wait();
    // The worker thread ends with the connection.
    if let Err(e) = exit.notify() {
        tracing::warn!("cannot end the connection's worker thread: {e}");
    }
    let served = backend.read().is_ok_and(|b| b.served());
    Ok(match result {
        Ok(()) | Err(vhost_user_backend::Error::HandleRequest(ProtocolError::Disconnected))
            if served =>
        {
            Ended::Disconnected
        }
        Ok(()) | Err(vhost_user_backend::Error::HandleRequest(ProtocolError::Disconnected)) => {
            Ended::Broken("it closed the connection before its first request".into())
        }
        Err(e) => Ended::Broken(e.to_string()),
    })
}

/// The files the daemon made, removed when it stops (by a signal too).
static MADE: OnceLock<Vec<CString>> = OnceLock::new();

extern "C" fn on_stop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    remove_files();
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(0) };
}

/// Removes the files in [`MADE`] (async-signal-safe: unlink only).
fn remove_files() {
    for path in MADE.get().into_iter().flatten() {
        // SAFETY: `path` is a NUL-terminated string that lives for the
        // rest of the process.
        unsafe { libc::unlink(path.as_ptr()) };
    }
}

/// SIGTERM and SIGINT stop the daemon: its sockets are removed and it
/// exits with status 0 (a device holds nothing that needs saving: every
/// FUSE request has reached the host's files when it is answered).
fn remove_at_stop(options: &Options) -> Result<(), Error> {
    let mut paths: Vec<PathBuf> = vec![options.socket.clone()];
    if let Device::Vsock { uds_path, .. } = &options.device {
        paths.push(uds_path.clone());
    }
    let made = paths
        .iter()
        .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    let _ = MADE.set(made);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        vmm_os::process::set_signal_handler(signal, on_stop).map_err(setup)?;
    }
    Ok(())
}
