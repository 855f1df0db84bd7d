//! The agent's vsock service: one thread per connection, one request per
//! connection (docs/agent-protocol.md).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_agent::{read_frame, write_frame, write_json, FrameType, Request, Response, Started};

use super::command::Settings;
use super::isolation::Prepared;
use super::{files, power_off, spawn_command};

/// Listens on vsock `port` and serves requests until the VM powers off.
pub fn serve(port: u32) -> io::Result<()> {
    let listener = vsock_listen(port)?;
    announce_ready();
    loop {
        // SAFETY: accept4(2) on a listening socket we own; null address
        // pointers are allowed. The result is checked.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: `fd` is a new connected socket that nothing else owns.
        let conn = unsafe { File::from_raw_fd(fd) };
        std::thread::spawn(move || {
            if let Err(e) = handle(conn) {
                eprintln!("vmm-agent: connection failed: {e}");
            }
        });
    }
}

/// Tells the host the agent listens: connect to host port READY_PORT and say
/// so. Nobody listening there is fine.
fn announce_ready() {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` is a new socket nothing else owns; File closes it.
    let mut sock = unsafe { File::from_raw_fd(fd) };
    let addr = vsock_addr(libc::VMADDR_CID_HOST, vmm_agent::READY_PORT);
    // SAFETY: `addr` is a valid sockaddr_vm of the size passed.
    let rc = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        let _ = sock.write_all(b"ready\n");
    }
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    addr
}

fn vsock_listen(port: u32) -> io::Result<File> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns; File closes it.
    let sock = unsafe { File::from_raw_fd(fd) };
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the size passed.
    let rc = unsafe {
        libc::bind(
            fd,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen(2) on our socket.
    if rc != 0 || unsafe { libc::listen(fd, 64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn handle(conn: File) -> io::Result<()> {
    let mut reader = conn.try_clone()?;
    let writer = Arc::new(Mutex::new(conn));
    let request = match read_frame(&mut reader)? {
        Some((FrameType::Request, payload)) => serde_json::from_slice::<Request>(&payload),
        _ => {
            let resp = Response::error("the first frame must be a request");
            return respond(&writer, &resp);
        }
    };
    let response = match request {
        Err(e) => Response::error(format!("bad request: {e}")),
        Ok(Request::Ping) => Response {
            agent: Some(format!("vmm-agent {}", env!("CARGO_PKG_VERSION"))),
            ..Default::default()
        },
        Ok(Request::Exec {
            argv,
            env,
            cwd,
            stdin,
            timeout_ms,
            user,
            pty,
            root,
            mounts,
            isolation,
        }) => {
            let request = ExecRequest {
                argv: &argv,
                env: &env,
                cwd: cwd.as_deref(),
                user: user.as_deref(),
                root: root.as_deref(),
                mounts: &mounts,
                isolation: isolation.as_deref(),
                io: match pty {
                    Some(size) => Io::Terminal(size),
                    None => Io::Pipes { stdin },
                },
                timeout_ms,
            };
            match exec_in_container(request, reader, &writer) {
                Ok(response) => response,
                Err(e) => return respond(&writer, &Response::error(e)),
            }
        }
        Ok(Request::Put {
            path,
            mode,
            user,
            parents,
        }) => {
            let req = files::PutRequest {
                path: &path,
                mode,
                user: user.as_deref(),
                parents,
            };
            files::put(req, &mut reader)
        }
        Ok(Request::Reseed {
            seed,
            unix_ns,
            mac,
            address,
            gateway,
            mtu,
        }) => {
            let link = super::interface::Link {
                mac: mac.as_deref(),
                address: address.as_deref(),
                gateway: gateway.as_deref(),
                mtu,
            };
            match renew(&seed, unix_ns, &link) {
                Ok(()) => Response::default(),
                Err(e) => Response::error(e),
            }
        }
        Ok(Request::Mount { root, mounts }) => {
            match super::container::mount_all(&root, &mounts, None) {
                Ok(()) => Response::default(),
                Err(e) => Response::error(e),
            }
        }
        Ok(Request::Unmount { root }) => match super::container::unmount_all(&root) {
            Ok(()) => Response::default(),
            Err(e) => Response::error(e),
        },
        Ok(Request::CgroupStats { name }) => match super::isolation::stats(&name) {
            Ok(figures) => Response {
                cgroup: Some(figures),
                ..Default::default()
            },
            Err(e) => Response::error(format!("cannot read the cgroup {name}: {e}")),
        },
        Ok(Request::Get { path, user }) => files::get(&path, user.as_deref(), &writer),
        Ok(Request::Signal { pid, signal }) => send_signal(pid, signal),
        Ok(Request::Stat { path, user }) => files::stat(&path, user.as_deref()),
        Ok(Request::List { path, depth, user }) => files::list(&path, depth, user.as_deref()),
        Ok(Request::Mkdir { path, user }) => files::mkdir(&path, user.as_deref()),
        Ok(Request::Move { from, to, user }) => files::rename(&from, &to, user.as_deref()),
        Ok(Request::Remove { path, user }) => files::remove(&path, user.as_deref()),
        Ok(Request::Watch {
            path,
            recursive,
            user,
        }) => match files::resolve(&path, user.as_deref()) {
            Ok(p) => super::watch::watch(&p, recursive, &mut reader, &writer),
            Err(e) => Response::error(format!("cannot resolve {path}: {e}")),
        },
        Ok(Request::Shutdown) => {
            respond(&writer, &Response::default())?;
            // Power off once the host has the answer: it closes the
            // connection after reading it (the guest's vsock transmits
            // asynchronously, so powering off at once could lose it).
            // A host that never closes delays the power-off by 10 s at most.
            set_recv_timeout(&reader, Duration::from_secs(10));
            let mut sink = [0u8; 64];
            while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
            power_off();
        }
    };
    respond(&writer, &response)
}

/// An exec request's fields.
struct ExecRequest<'a> {
    argv: &'a [String],
    env: &'a BTreeMap<String, String>,
    cwd: Option<&'a str>,
    user: Option<&'a str>,
    root: Option<&'a str>,
    mounts: &'a [vmm_agent::Mount],
    isolation: Option<&'a vmm_agent::Isolation>,
    io: Io,
    timeout_ms: Option<u64>,
}

/// Runs an exec request: first a container's isolation and mounts (an
/// error then, before the command runs), then the command, and the
/// container's cgroup removed after it when the request made it.
fn exec_in_container(
    req: ExecRequest,
    reader: File,
    writer: &Arc<Mutex<File>>,
) -> Result<Response, String> {
    if req.root.is_none() && (!req.mounts.is_empty() || req.isolation.is_some()) {
        return Err("mounts and isolation need a root (a container's)".into());
    }
    let mut prepared = req
        .isolation
        .map(Prepared::new)
        .transpose()
        .map_err(|e| format!("cannot isolate the command: {e}"))?;
    if let Some(root) = req.root {
        let mounted = match req.mounts.is_empty() {
            true => Ok(()),
            false => super::container::mount_all(root, req.mounts, prepared.as_mut()),
        };
        let ready = mounted.and_then(|()| match prepared.as_mut() {
            Some(p) => p
                .clone_root(root)
                .map_err(|e| format!("cannot isolate the command: {e}")),
            None => Ok(()),
        });
        if let Err(e) = ready {
            if let Some(p) = &prepared {
                p.finish();
            }
            return Err(e);
        }
    }
    let prepared = prepared.map(Arc::new);
    let settings = Settings {
        env: Some(req.env),
        cwd: req.cwd,
        user: req.user,
        root: req.root,
        isolation: prepared.clone(),
    };
    let response = exec(req.argv, &settings, req.io, req.timeout_ms, reader, writer);
    if let Some(p) = prepared {
        p.finish();
    }
    Ok(response)
}

/// A copy of a VM is a new machine: its random generator reseeded with
/// `seed_hex`, its wall clock stepped to `unix_ns`, a new machine id and
/// hostname, and its network interface moved to `link`.
fn renew(
    seed_hex: &str,
    unix_ns: Option<u64>,
    link: &super::interface::Link,
) -> Result<(), String> {
    reseed(seed_hex).map_err(|e| format!("cannot reseed the random generator: {e}"))?;
    if let Some(ns) = unix_ns {
        set_clock(ns).map_err(|e| format!("cannot set the wall clock: {e}"))?;
    }
    super::interface::apply(link)?;
    super::identity::renew().map_err(|e| format!("cannot renew the machine id: {e}"))?;
    Ok(())
}

/// Credits `seed_hex` to the input pool (RNDADDENTROPY) and forces a
/// reseed of the generator (RNDRESEEDCRNG), so every read of /dev/urandom
/// after this depends on the seed.
fn reseed(seed_hex: &str) -> io::Result<()> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "the seed is not hex");
    if !seed_hex.len().is_multiple_of(2) || seed_hex.len() > 1024 {
        return Err(bad());
    }
    let seed = (0..seed_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&seed_hex[i..i + 2], 16).map_err(|_| bad()))
        .collect::<io::Result<Vec<u8>>>()?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(&seed);
    info.resize(info.len().next_multiple_of(4), 0);
    let random = File::open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of `buf_size` bytes of
    // data from the buffer, which holds the header and all of them.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Steps the wall clock (CLOCK_REALTIME) to `unix_ns`.
fn set_clock(unix_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as _,
        tv_nsec: (unix_ns % 1_000_000_000) as _,
    };
    // SAFETY: clock_settime reads one valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_recv_timeout(sock: &File, timeout: Duration) {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().try_into().unwrap_or(10),
        tv_usec: 0,
    };
    // SAFETY: setsockopt(2) on our socket with a valid timeval of the size passed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

fn respond(writer: &Mutex<File>, response: &Response) -> io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    write_json(&mut *w, FrameType::Response, response)?;
    // SAFETY: shutdown(2) on our socket: tells the host no more frames come.
    unsafe { libc::shutdown(w.as_raw_fd(), libc::SHUT_WR) };
    Ok(())
}

fn spawn(argv: &[String], settings: &Settings, stdin: bool) -> io::Result<std::process::Child> {
    spawn_command(argv, settings, |cmd| {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    })
}

/// Sends `signal` to `pid`. Only processes, not groups: the pid must be
/// positive, and the signal a real one.
fn send_signal(pid: i32, signal: i32) -> Response {
    if pid <= 1 || !(1..=64).contains(&signal) {
        return Response::error(format!("cannot send signal {signal} to process {pid}"));
    }
    // SAFETY: kill(2) with a positive pid and a valid signal number.
    if unsafe { libc::kill(pid, signal) } != 0 {
        let e = io::Error::last_os_error();
        let mut r = Response::error(format!("cannot signal process {pid}: {e}"));
        r.not_found = e.raw_os_error() == Some(libc::ESRCH);
        return r;
    }
    Response::default()
}

/// Copies `src` into frames of `kind` until end of file.
pub(crate) fn pump(mut src: impl Read, kind: FrameType, writer: Arc<Mutex<File>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match src.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                if write_frame(&mut *w, kind, &buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// How a command's stdio reaches the host.
enum Io {
    /// Pipes: stdout and stderr frames, stdin frames when `stdin`.
    Pipes { stdin: bool },
    /// A terminal of this size (super::pty).
    Terminal(vmm_agent::PtySize),
}

fn exec(
    argv: &[String],
    settings: &Settings,
    io: Io,
    timeout_ms: Option<u64>,
    reader: File,
    writer: &Arc<Mutex<File>>,
) -> Response {
    let spawned = match io {
        Io::Pipes { stdin } => spawn(argv, settings, stdin).map(|c| (c, None)),
        Io::Terminal(size) => super::pty::spawn(argv, settings, size).map(|(c, t)| (c, Some(t))),
    };
    let (mut child, terminal) = match spawned {
        Ok(c) => c,
        Err(e) => {
            let name = argv.first().map(String::as_str).unwrap_or("");
            return Response::error(format!("cannot run {name}: {e}"));
        }
    };
    let pid = child.id() as libc::pid_t;
    {
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        // The host may have gone; the command still runs to its end.
        let _ = write_json(&mut *w, FrameType::Started, &Started { pid });
    }
    let (pumps, exited) = match terminal {
        Some(t) => match super::pty::pumps(t, reader, writer) {
            Ok((pump, exited)) => (vec![pump], Some(exited)),
            Err(e) => {
                // SAFETY: kill(2) on our unreaped child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = child.wait();
                return Response::error(format!("cannot serve the terminal: {e}"));
            }
        },
        None => (pipe_pumps(&mut child, reader, writer), None),
    };
    let (cancel, cancelled) = mpsc::channel::<()>();
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(ms) = timeout_ms {
        let flag = timed_out.clone();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) =
                cancelled.recv_timeout(Duration::from_millis(ms))
            {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                // SAFETY: kill(2) on the command's pid, which is not reaped
                // before the cancel message is sent.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
    }
    let status = child.wait();
    let _ = cancel.send(());
    // The terminal's pump drains what is left, then ends.
    drop(exited);
    for t in pumps {
        let _ = t.join();
    }
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => Response {
            exit_code: s.code(),
            signal: s.signal(),
            timed_out: timed_out.load(std::sync::atomic::Ordering::SeqCst),
            ..Default::default()
        },
        Err(e) => Response::error(format!("wait failed: {e}")),
    }
}

/// Threads that copy a piped command's stdout and stderr into frames (the
/// ones returned; they end with the command's output) and its stdin frames
/// into its stdin.
fn pipe_pumps(
    child: &mut std::process::Child,
    mut reader: File,
    writer: &Arc<Mutex<File>>,
) -> Vec<std::thread::JoinHandle<()>> {
    let out = child.stdout.take().map(|o| {
        let w = writer.clone();
        std::thread::spawn(move || pump(o, FrameType::Stdout, w))
    });
    let err = child.stderr.take().map(|e| {
        let w = writer.clone();
        std::thread::spawn(move || pump(e, FrameType::Stderr, w))
    });
    if let Some(mut child_in) = child.stdin.take() {
        std::thread::spawn(move || {
            while let Ok(Some((FrameType::Stdin, data))) = read_frame(&mut reader) {
                if data.is_empty() || child_in.write_all(&data).is_err() {
                    break;
                }
            }
            // Dropping the pipe is the command's end of input.
        });
    }
    [out, err].into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    use vmm_agent::{write_frame, PtySize};

    use super::*;

    /// Runs `script` on a terminal of 80x24 the way an exec request does
    /// (a terminal is plain Linux: this runs on the host), with `frames`
    /// already sent; what the terminal showed, the answer and how long it
    /// took.
    fn on_terminal(script: &str, frames: &[(FrameType, &[u8])]) -> (String, Response, Duration) {
        let (mut host, guest) = UnixStream::pair().unwrap();
        for (kind, payload) in frames {
            write_frame(&mut host, *kind, payload).unwrap();
        }
        let guest = File::from(std::os::fd::OwnedFd::from(guest));
        let reader = guest.try_clone().unwrap();
        let writer = Arc::new(Mutex::new(guest));
        let argv = ["sh", "-c", script].map(String::from);
        let size = PtySize { cols: 80, rows: 24 };
        let start = Instant::now();
        let response = exec(
            &argv,
            &Settings::default(),
            Io::Terminal(size),
            None,
            reader,
            &writer,
        );
        let took = start.elapsed();
        // Every frame was written before exec returned.
        host.set_nonblocking(true).unwrap();
        let mut shown = Vec::new();
        while let Ok(Some((kind, payload))) = read_frame(&mut host) {
            match kind {
                FrameType::Stdout => shown.extend_from_slice(&payload),
                FrameType::Started => {}
                other => panic!("a terminal sent a {other:?} frame"),
            }
        }
        (String::from_utf8_lossy(&shown).into_owned(), response, took)
    }

    #[test]
    fn a_command_on_a_terminal_sees_one_of_the_size_asked() {
        let (shown, response, _) = on_terminal("stty size; tty; exit 3", &[]);
        assert_eq!(response.exit_code, Some(3), "{response:?}");
        assert!(
            shown.contains("24 80") && shown.contains("/dev/pts/"),
            "{shown:?}"
        );
    }

    #[test]
    fn resize_frames_change_the_size_and_stdin_frames_are_typed() {
        let resize = serde_json::to_vec(&PtySize {
            cols: 120,
            rows: 40,
        })
        .unwrap();
        let frames = [
            (FrameType::Resize, &resize[..]),
            (FrameType::Resize, &b"not json"[..]),
            (FrameType::Stdin, &b"go\n"[..]),
        ];
        let (shown, response, _) = on_terminal("read line; echo got-$line; stty size", &frames);
        assert_eq!(response.exit_code, Some(0), "{response:?}");
        assert!(
            shown.contains("got-go") && shown.contains("40 120"),
            "{shown:?}"
        );
    }

    #[test]
    fn a_background_process_holding_the_terminal_does_not_hold_the_answer() {
        // The background sleep ignores (from its start) the hangup its
        // session's end sends, and keeps the terminal open for 30 s.
        let script = "trap '' HUP; sleep 30 & echo started";
        let (shown, response, took) = on_terminal(script, &[]);
        assert_eq!(response.exit_code, Some(0), "{response:?}");
        assert!(shown.contains("started"), "{shown:?}");
        assert!(took < Duration::from_secs(15), "the answer took {took:?}");
    }
}
