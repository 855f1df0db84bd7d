//! The fork child's side (`vmm __fork-child`, or an embedding program's
//! own executable through [`run_child_if_asked`]): receives the parent's
//! message (crate::fork), maps the frozen memory copy-on-write, restores
//! the machine, answers [`ChildAnswer::Started`] once its vCPUs run, and
//! runs it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::fork::{
    io, ChildAnswer, Error, Message, Result, CHILD_COMMAND, MAX_FDS, MAX_MESSAGE, NO_MESSAGE,
    PREPARE_ARG,
};
use crate::memory::{MemoryImage, Overlay};
use crate::snapshot::{MachineState, RestoreSource};

/// First thing in `main` of the `vmm` binary, and of a program that embeds
/// the VMM and starts fork children with its own executable: when this
/// process was started as a fork child, runs it (logging set up as
/// [`crate::init_logging`] does, unless the program already did) and exits;
/// returns otherwise.
pub fn run_child_if_asked() {
    if std::env::args().nth(1).as_deref() == Some(CHILD_COMMAND) {
        crate::init_logging();
        // Started under its parent's spawner filter: say so if it trips.
        if crate::seccomp::filtered() {
            let _ = crate::seccomp::name_thread("fork child set-up");
        }
        std::process::exit(match child_main() {
            Ok(()) => 0,
            Err(code) => code,
        });
    }
}

/// The fork child's main (`vmm __fork-child`): reads the message on
/// standard input, restores the machine and runs it. Returns the exit
/// status on failure.
fn child_main() -> std::result::Result<(), i32> {
    // Nothing but the socket on stdin (and stdout, stderr) is ours: close
    // whatever else the parent let through.
    vmm_os::process::close_fds_from(3);
    // SAFETY: fd 0 is the socket the parent passed as standard input, and
    // nothing else in this process owns it.
    let stream = unsafe { UnixStream::from_raw_fd(0) };
    let fail = |stream: &UnixStream, msg: String| {
        let _ = (&*stream).write_all(ChildAnswer::Failed(msg.clone()).line().as_bytes());
        eprintln!("vmm fork child: error: {msg}");
        1
    };
    let hv = match crate::open_hypervisor() {
        Ok(hv) => hv,
        Err(e) => return Err(fail(&stream, e.to_string())),
    };
    // A spare prepares its VM before the message comes; if that fails it
    // restores the usual way.
    let prepared = if std::env::args().any(|a| a == PREPARE_ARG) {
        match receive_prepare(&stream) {
            Ok(None) => return Ok(()), // the parent ended without a fork
            Ok(Some((size, base))) => {
                match crate::vm::Prepared::new(hv.as_ref(), Arc::new(base), size) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::warn!("spare fork child: cannot prepare its VM: {e}");
                        None
                    }
                }
            }
            Err(e) => return Err(fail(&stream, e.to_string())),
        }
    } else {
        None
    };
    let (message, files) = match receive(&stream) {
        Ok(m) => m,
        // A spare whose parent ended without using it.
        Err(Error::Message(m)) if m == NO_MESSAGE => return Ok(()),
        Err(e) => return Err(fail(&stream, e.to_string())),
    };
    let start = Instant::now();
    tracing::debug!("fork child: message received");
    let source = match restore_source(message.state, &message.overlays, message.disk, files) {
        Ok(s) => s,
        Err(e) => return Err(fail(&stream, e.to_string())),
    };
    let built = match prepared {
        Some(p) => crate::Vm::restore_prepared(source, hv.as_ref(), start, p),
        None => crate::Vm::restore(source, hv.as_ref(), start),
    };
    let vm = match built {
        Ok(vm) => vm,
        Err(e) => return Err(fail(&stream, e.to_string())),
    };
    let stop = match crate::signals::install() {
        Ok(evt) => evt,
        Err(e) => {
            return Err(fail(
                &stream,
                format!("cannot install signal handlers: {e}"),
            ))
        }
    };
    let ack = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => return Err(fail(&stream, e.to_string())),
    };
    let opts = crate::RunOptions {
        stop_evt: Some(stop),
        api_socket: Some(message.api_socket),
        watch_agent: true,
        on_started: Some(Box::new(move |_| {
            let _ = (&ack).write_all(ChildAnswer::Started.line().as_bytes());
        })),
    };
    drop(stream);
    match vm.run(opts) {
        Ok(outcome) if outcome.reason.is_clean() => Ok(()),
        Ok(outcome) => {
            eprintln!("vmm fork child: {}", outcome.reason);
            Err(outcome.reason.exit_code())
        }
        Err(e) => {
            eprintln!("vmm fork child: error: {e}");
            Err(1)
        }
    }
}

/// Receives 8 bytes with up to `max_fds` descriptors attached. Returns
/// how many bytes came (0: the parent closed the socket) and the files.
fn receive_head(
    stream: &UnixStream,
    max_fds: usize,
    what: &'static str,
) -> Result<(usize, [u8; 8], Vec<File>)> {
    let mut head = [0u8; 8];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: head.as_mut_ptr().cast(),
        iov_len: head.len(),
    }];
    // SAFETY: the iovec points at `head`, 8 writable bytes that outlive the
    // call; `raw_fds` has room for `max_fds` (at most MAX_FDS) descriptors.
    let (read, nfds) =
        unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds[..max_fds.min(MAX_FDS)]) }.map_err(
            |e| Error::Io {
                what,
                source: std::io::Error::from_raw_os_error(e.errno()),
            },
        )?;
    let files = raw_fds[..nfds]
        .iter()
        // SAFETY: each descriptor was just received and is owned by nobody else.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    Ok((read, head, files))
}

/// A spare's first message: the memory size and base. None when the
/// parent closed the socket first.
fn receive_prepare(stream: &UnixStream) -> Result<Option<(u64, File)>> {
    let (read, size, mut files) = receive_head(stream, 1, "receive the spare's memory")?;
    if read == 0 {
        return Ok(None);
    }
    match (read, files.pop()) {
        (8, Some(base)) => Ok(Some((u64::from_le_bytes(size), base))),
        _ => Err(Error::Message(
            "the spare's memory message is malformed".into(),
        )),
    }
}

fn receive(stream: &UnixStream) -> Result<(Message, Vec<File>)> {
    let (read, len, files) = receive_head(stream, MAX_FDS, "receive the fork message")?;
    if read == 0 {
        return Err(Error::Message(NO_MESSAGE.into()));
    }
    if read != 8 {
        return Err(Error::Message("the length is cut short".into()));
    }
    let len = u64::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(Error::Message(format!("{len} bytes is too long")));
    }
    let mut body = Vec::with_capacity(len as usize);
    stream
        .take(len)
        .read_to_end(&mut body)
        .map_err(io("read the fork message"))?;
    let message = serde_json::from_slice(&body).map_err(|e| Error::Message(e.to_string()))?;
    Ok((message, files))
}

fn restore_source(
    state: MachineState,
    overlays: &[Vec<(u64, u64)>],
    disk: bool,
    files: Vec<File>,
) -> Result<RestoreSource> {
    let expected = 1 + overlays.len() + if disk { 2 } else { 0 };
    if files.len() != expected {
        return Err(Error::Message(format!(
            "{} files attached, {expected} expected",
            files.len()
        )));
    }
    let mut files = files.into_iter();
    let mut next = || {
        files
            .next()
            .ok_or_else(|| Error::Message("a file is missing".into()))
    };
    let base = Arc::new(next()?);
    let mut layers = Vec::with_capacity(overlays.len());
    for runs in overlays {
        layers.push(Overlay {
            file: Arc::new(next()?),
            runs: runs.clone(),
        });
    }
    let (disk_base_file, disk_layer) = if disk {
        let base = next()?;
        let layer = next()?;
        (
            Some(base),
            Some((layer, PathBuf::from("(the parent's frozen disk layer)"))),
        )
    } else {
        (None, None)
    };
    Ok(RestoreSource {
        memory: MemoryImage {
            size: state.memory_size,
            base,
            overlays: layers,
        },
        // A child's network is its parent's.
        saved_network: state.config.network.clone(),
        state,
        disk_layer,
        disk_base_file,
    })
}
