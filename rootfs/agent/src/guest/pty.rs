//! Commands on a pseudo-terminal (an exec request with `pty`): the command
//! is a session leader whose controlling terminal, stdin, stdout and
//! stderr are the terminal's secondary side; the agent holds the primary
//! side. What the command writes comes back in `Stdout` frames; `Stdin`
//! frames are typed into the terminal and `Resize` frames change its size.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

use vmm_agent::{read_frame, write_frame, FrameType, PtySize};

use super::command::Settings;
use super::spawn_command;

/// Opens the terminal multiplexer: a container root's own (its /dev/pts,
/// so the command finds its terminal's name there), else the guest's.
fn open_ptmx(root: Option<&str>) -> libc::c_int {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    let own = root
        .and_then(|r| std::ffi::CString::new(format!("{r}/dev/ptmx")).ok())
        // SAFETY: open(2) on a NUL-terminated path; the result is checked.
        .map(|path| unsafe { libc::open(path.as_ptr(), flags) })
        .filter(|fd| *fd >= 0);
    // SAFETY: posix_openpt(3) with valid flags; the result is checked.
    own.unwrap_or_else(|| unsafe { libc::posix_openpt(flags) })
}

/// Opens a terminal pair of `size`: (primary, secondary), both close-on-exec.
fn open(size: PtySize, root: Option<&str>) -> io::Result<(File, File)> {
    let fd = open_ptmx(root);
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::other(format!(
            "cannot open a terminal (/dev/ptmx; is devpts mounted on /dev/pts?): {e}"
        )));
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let primary = unsafe { File::from_raw_fd(fd) };
    // SAFETY: unlockpt(3) on our terminal's primary side.
    if unsafe { libc::unlockpt(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // TIOCGPTPEER opens the secondary side without a path (so without a
    // window in which another thread's fork inherits it without CLOEXEC).
    // SAFETY: the ioctl takes open(2) flags by value; the result is checked.
    let sfd = unsafe {
        libc::ioctl(
            fd,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if sfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sfd` is a new descriptor nothing else owns.
    let secondary = unsafe { File::from_raw_fd(sfd) };
    resize(&primary, size)?;
    Ok((primary, secondary))
}

/// Sets the terminal's size (the command gets SIGWINCH).
fn resize(primary: &File, size: PtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one valid winsize.
    if unsafe { libc::ioctl(primary.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts `argv` on a new terminal of `size`; returns it and the
/// terminal's primary side.
pub fn spawn(argv: &[String], settings: &Settings, size: PtySize) -> io::Result<(Child, File)> {
    let (primary, secondary) = open(size, settings.root)?;
    let child = spawn_command(argv, settings, |cmd| {
        let [i, o, e] = [(); 3].map(|()| secondary.try_clone().map(OwnedFd::from));
        if let (Ok(i), Ok(o), Ok(e)) = (i, o, e) {
            cmd.stdin(Stdio::from(i))
                .stdout(Stdio::from(o))
                .stderr(Stdio::from(e));
        }
        // SAFETY: runs in the child between fork and exec (after its
        // stdio became the terminal) and only makes async-signal-safe
        // calls: setsid(2) and ioctl(2) on descriptor 0.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })?;
    Ok((child, primary))
}

/// Threads for a command on a terminal: the output pump (returned) and the
/// input pump; and the write end of the pipe to drop when the command has
/// ended.
pub fn pumps(
    terminal: File,
    reader: File,
    writer: &Arc<Mutex<File>>,
) -> io::Result<(std::thread::JoinHandle<()>, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills two descriptors; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors nothing else owns.
    let (exited_r, exited_w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let input = terminal.try_clone()?;
    std::thread::spawn(move || pump_input(reader, input));
    let w = writer.clone();
    let out = std::thread::spawn(move || pump_output(terminal, exited_r, w));
    Ok((out, exited_w))
}

/// Copies what the terminal shows into `Stdout` frames until every
/// holder of its secondary side closed it, or, once `exited` (the read
/// end of a pipe whose write end is dropped when the command ends) says
/// the command is gone, until nothing more is waiting: a background
/// process that keeps the terminal open does not hold the answer back.
fn pump_output(primary: File, exited: File, writer: Arc<Mutex<File>>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut primary = primary;
    let mut fds = [
        libc::pollfd {
            fd: primary.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: exited.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll(2) on two valid pollfds we own, no timeout.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            // Readable, or hung up (every secondary closed): read says which.
            if !forward(&mut primary, &mut buf, &writer) {
                return;
            }
        } else if fds[1].revents != 0 {
            // The command ended and nothing is waiting in the terminal
            // (a read flushes what the kernel still had in flight).
            set_nonblocking(&primary);
            while forward(&mut primary, &mut buf, &writer) {}
            return;
        }
    }
}

/// Reads once from the terminal and sends it; false at its end.
fn forward(primary: &mut File, buf: &mut [u8], writer: &Mutex<File>) -> bool {
    loop {
        return match primary.read(buf) {
            Ok(0) => false,
            Ok(n) => {
                let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                write_frame(&mut *w, FrameType::Stdout, &buf[..n]).is_ok()
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EIO: every secondary side is closed; EAGAIN: nothing waits.
            Err(_) => false,
        };
    }
}

fn set_nonblocking(f: &File) {
    // SAFETY: fcntl(2) F_GETFL/F_SETFL on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// Types `Stdin` frames into the terminal and applies `Resize` frames
/// until the host closes the connection. An empty `Stdin` frame (end of
/// input) changes nothing: a terminal has no end of input but the ^D its
/// user types.
fn pump_input(mut reader: File, mut primary: File) {
    while let Ok(Some((kind, data))) = read_frame(&mut reader) {
        let ok = match kind {
            FrameType::Stdin => primary.write_all(&data).is_ok(),
            FrameType::Resize => match serde_json::from_slice::<PtySize>(&data) {
                Ok(size) => resize(&primary, size).is_ok(),
                Err(e) => {
                    eprintln!("vmm-agent: ignoring a bad resize frame: {e}");
                    true
                }
            },
            _ => false,
        };
        if !ok {
            return;
        }
    }
}
