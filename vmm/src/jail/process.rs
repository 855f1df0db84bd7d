//! The three processes of a jail.
//!
//! - The launcher (the `vmm` the user started) enters a new user
//!   namespace (its own user id mapped to itself) and PID namespace, then
//!   forks. It stays outside the jail's root, forwards SIGINT, SIGTERM and
//!   SIGHUP, and exits with the VMM's status once the jail reports it.
//! - The jail's init (PID 1 of the new PID namespace) enters new mount,
//!   IPC and UTS namespaces (and network, if asked), builds the private
//!   root and pivots into it, sets limits, Landlock and drops every
//!   capability; then forks the VMM and reaps: the VMM, and the fork
//!   children the VMM starts, which outlive it in the same jail. It
//!   reports the VMM's status to the launcher and ends with the last of
//!   them.
//! - The VMM returns from [`super::enter`] and runs the VM.
//!
//! Runs before the launcher has any thread: unshare(CLONE_NEWUSER) needs
//! a single-threaded process, and a fork copies only the calling thread.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::folder::JailFolder;
use super::{limits, probe, root, Error, Plan};

/// The signals the launcher and the init pass on.
const FORWARDED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn last_err(what: &str) -> Error {
    Error::Setup {
        what: what.into(),
        source: io::Error::last_os_error(),
    }
}

/// A pipe, both ends close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors this function then owns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_err("make a pipe"));
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn fork() -> Result<libc::pid_t, Error> {
    // SAFETY: the process has one thread (see the module comment), so the
    // child has every lock it can need.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_err("start a jail process"));
    }
    Ok(pid)
}

/// Maps this user's ids to themselves in the new user namespace.
fn map_ids(uid: libc::uid_t, gid: libc::gid_t) -> Result<(), Error> {
    let write = |file: &str, text: String| {
        std::fs::write(file, text).map_err(|source| Error::Setup {
            what: format!("write {file}"),
            source,
        })
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1"))
}

/// Blocks the forwarded signals (and SIGCHLD) and returns a signalfd that
/// reads them.
fn signal_fd(with_child: bool) -> Result<OwnedFd, Error> {
    // SAFETY: sigset operations on a local set; sigprocmask and signalfd
    // read it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        if with_child {
            libc::sigaddset(&mut set, libc::SIGCHLD);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(last_err("block signals"));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(last_err("make a signalfd"));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Unblocks what [`signal_fd`] blocked (the VMM installs its own handlers).
fn unblock_signals() {
    // SAFETY: as in `signal_fd`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Reads one signal number from a signalfd.
fn read_signal(fd: &OwnedFd) -> Option<libc::c_int> {
    // SAFETY: a signalfd_siginfo is plain data of the size read.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as libc::c_int)
}

/// Enters the jail. Returns only in the VMM process.
pub fn enter(plan: &Plan, folder: &JailFolder) -> Result<(), Error> {
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // SAFETY: unshare with flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID) } != 0 {
        return Err(probe::refusal(io::Error::last_os_error()).into());
    }
    map_ids(uid, gid)?;
    let (status_r, status_w) = pipe()?;
    let signals = signal_fd(false)?;
    let init = fork()?;
    if init > 0 {
        drop(status_w);
        filter(plan, init);
        let code = launcher(init, status_r, signals, &folder.dir);
        std::process::exit(code);
    }
    drop(status_r);
    drop(signals);
    // The jail's init: any failure from here on ends it with a message.
    if let Err(e) = init_setup(plan, &folder.root, &folder.tmp) {
        eprintln!("vmm: error: {e}");
        // SAFETY: _exit ends this process at once.
        unsafe { libc::_exit(1) };
    }
    // A launcher killed before the VMM ends (SIGKILL cannot be passed on)
    // stops the VMM through the init.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP) };
    let signals = match signal_fd(true) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            // SAFETY: as above.
            unsafe { libc::_exit(1) };
        }
    };
    let vmm = match fork() {
        Ok(pid) => pid,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            // SAFETY: as above.
            unsafe { libc::_exit(1) };
        }
    };
    if vmm == 0 {
        drop(status_w);
        drop(signals);
        unblock_signals();
        return Ok(());
    }
    filter(plan, vmm);
    reap(vmm, status_w, signals)
}

/// Puts this process (the launcher or the init, one thread) under the
/// `jail` seccomp filter; if that fails, ends `child` and this process.
fn filter(plan: &Plan, child: libc::pid_t) {
    if !plan.seccomp {
        return;
    }
    if let Err(e) = crate::seccomp::apply(crate::seccomp::Role::Jail) {
        eprintln!("vmm: error: {e}");
        // SAFETY: kill and _exit with plain arguments.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::_exit(1);
        }
    }
}

/// The jail's init before it starts the VMM.
fn init_setup(plan: &Plan, root_dir: &Path, tmp_dir: &Path) -> Result<(), Error> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if plan.new_network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare and sethostname with valid arguments.
    unsafe {
        if libc::unshare(flags) != 0 {
            return Err(last_err("enter the jail's mount, IPC and UTS namespaces"));
        }
        let name = b"vmm-jail";
        if libc::sethostname(name.as_ptr().cast(), name.len()) != 0 {
            return Err(last_err("name the jail's host"));
        }
    }
    root::enter(plan, root_dir, tmp_dir)?;
    limits::set_rlimits(plan)?;
    match limits::landlock(plan)? {
        landlock::RulesetStatus::FullyEnforced => {}
        other => {
            tracing::info!("jail: Landlock {other:?} (the kernel's ABI is older than the rules')")
        }
    }
    limits::drop_privileges()
}

/// The launcher: passes signals to the jail's init until the jail reports
/// the VMM's status, and returns it as an exit code. When the VMM was the
/// jail's last process it waits for the init and removes the jail's
/// folder (from outside the jail, where it holds no mounts: inside, host
/// folders are bound into its `/tmp`); fork children that outlive the VMM
/// keep the jail, and its folder stays.
fn launcher(init: libc::pid_t, status: OwnedFd, signals: OwnedFd, dir: &Path) -> i32 {
    let mut status = std::fs::File::from(status);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: status.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            if let Some(sig) = read_signal(&signals) {
                // SAFETY: kill with a pid and signal number.
                unsafe { libc::kill(init, sig) };
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        let mut report = [0u8; 5];
        let got = status.read_exact(&mut report);
        if got.is_err() || report[4] == 1 {
            // The jail has ended (or is ending): nothing uses its folder.
            let mut ws = 0;
            // SAFETY: waits for the init, which is ending.
            unsafe { libc::waitpid(init, &mut ws, 0) };
            let _ = std::fs::remove_dir_all(dir);
        }
        if got.is_err() {
            eprintln!("vmm: error: the jail ended without the VMM's status");
            return 1;
        }
        return i32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
    }
}

/// The jail's init after it started the VMM: reaps every process, passes
/// signals to the VMM, reports the VMM's exit status (and whether it was
/// the last process), and ends when no process is left.
fn reap(vmm: libc::pid_t, status: OwnedFd, signals: OwnedFd) -> ! {
    let mut status = Some(std::fs::File::from(status));
    let mut vmm_code = None;
    let report = |code: i32, last: bool, status: &mut Option<std::fs::File>| {
        if let Some(mut s) = status.take() {
            let mut bytes = [0u8; 5];
            bytes[..4].copy_from_slice(&code.to_ne_bytes());
            bytes[4] = u8::from(last);
            let _ = s.write_all(&bytes);
        }
    };
    loop {
        let mut wstatus = 0;
        // SAFETY: waitpid on any child with a valid status int.
        let pid = unsafe { libc::waitpid(-1, &mut wstatus, libc::WNOHANG) };
        if pid == vmm {
            vmm_code = Some(if libc::WIFEXITED(wstatus) {
                libc::WEXITSTATUS(wstatus)
            } else {
                128 + libc::WTERMSIG(wstatus)
            });
            continue;
        }
        if pid > 0 {
            continue;
        }
        if pid < 0 {
            // No process is left: the jail ends.
            report(vmm_code.unwrap_or(1), true, &mut status);
            // SAFETY: _exit ends the jail's last process.
            unsafe { libc::_exit(0) };
        }
        if let Some(code) = vmm_code {
            // Fork children outlive the VMM: its launcher returns now.
            report(code, false, &mut status);
        }
        // Wait for a signal: a child's end, or one to pass on. SIGHUP (a
        // hangup, or the launcher's death) stops the VMM like SIGTERM.
        if let Some(sig) = read_signal(&signals) {
            if sig != libc::SIGCHLD && vmm_code.is_none() {
                let sig = if sig == libc::SIGHUP {
                    libc::SIGTERM
                } else {
                    sig
                };
                // SAFETY: kill with a pid and signal number.
                unsafe { libc::kill(vmm, sig) };
            }
        }
    }
}
