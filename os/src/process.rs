//! Processes and signals, per OS:
//!
//! - [`exit_fd`]: a descriptor that becomes readable when a process ends
//!   (Linux: a pidfd; macOS: a kqueue watching the process's exit), and
//!   [`ended_within`] to wait on one with a deadline.
//! - [`close_fds_from`]: close every descriptor from a number on (Linux:
//!   close_range; elsewhere one by one up to the table's size).
//! - [`die_with_parent`]: in a child before exec, ask for a signal when
//!   the parent ends (Linux: PR_SET_PDEATHSIG; macOS has no such request:
//!   the child then outlives a parent that dies without stopping it).
//! - [`set_signal_handler`]: a `SA_SIGINFO` handler, restarting calls.
//! - [`kick_signal`]: the signal that kicks a vCPU thread out of the guest
//!   (Linux: SIGRTMIN; macOS, which has no real-time signals: SIGUSR2).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// A descriptor that becomes readable once process `pid` has ended.
pub fn exit_fd(pid: u32) -> io::Result<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags, no pointers; the
        // result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
    #[cfg(not(target_os = "linux"))]
    {
        use std::os::fd::AsRawFd;
        let kq = crate::epoll::new_kqueue()?;
        let change = libc::kevent {
            ident: pid as usize,
            filter: libc::EVFILT_PROC,
            flags: libc::EV_ADD | libc::EV_ENABLE | libc::EV_ONESHOT,
            fflags: libc::NOTE_EXIT,
            data: 0,
            udata: std::ptr::null_mut(),
        };
        // SAFETY: one live change, no events out; the kqueue is ours.
        let rc = unsafe {
            libc::kevent(
                kq.as_raw_fd(),
                &change,
                1,
                std::ptr::null_mut(),
                0,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(kq)
    }
}

/// Waits up to `timeout` for `exit` (from [`exit_fd`]) to say its process
/// has ended; whether it did. Signals interrupting the wait do not cut it
/// short.
pub fn ended_within(exit: &OwnedFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd: exit.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll(2) on one pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut poll, 1, ms) };
        if n > 0 {
            return true;
        }
        if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Closes every descriptor numbered `first` or more (errors ignored: a
/// number not open is nothing to close).
pub fn close_fds_from(first: u32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: close_range takes numbers only; the caller owns nothing
        // at or above `first` that it still uses.
        unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    }
    #[cfg(not(target_os = "linux"))]
    {
        // SAFETY: getdtablesize has no preconditions.
        let top = unsafe { libc::getdtablesize() }.max(0) as u32;
        for fd in first..top {
            // SAFETY: as above.
            unsafe { libc::close(fd as i32) };
        }
    }
}

/// In a child between fork and exec: asks for `signal` when the parent
/// ends (a no-op where the OS cannot; see the module's notes).
/// Async-signal-safe.
pub fn die_with_parent(signal: i32) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = signal;
    Ok(())
}

/// A signal handler that gets the signal's details.
pub type SignalHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` for `signal` (SA_SIGINFO, interrupted calls
/// restart).
pub fn set_signal_handler(signal: i32, handler: SignalHandler) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is "no flags, empty mask"; the handler is
    // a valid extern "C" function for as long as the process lives.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The signal that kicks a vCPU thread out of the guest.
pub fn kick_signal() -> i32 {
    #[cfg(target_os = "linux")]
    {
        libc::SIGRTMIN()
    }
    #[cfg(not(target_os = "linux"))]
    {
        libc::SIGUSR2
    }
}

/// Sends `signal` to thread `thread` of this process.
pub fn signal_thread(thread: libc::pthread_t, signal: i32) -> io::Result<()> {
    // SAFETY: pthread_kill with a handle of a live thread of this process
    // (the caller's) and a signal number.
    match unsafe { libc::pthread_kill(thread, signal) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicI32, Ordering};

    fn readable(fd: &OwnedFd, ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
    }

    #[test]
    fn the_exit_fd_turns_readable_when_the_process_ends() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = exit_fd(child.id()).unwrap();
        assert!(!readable(&fd, 0));
        child.kill().unwrap();
        assert!(readable(&fd, 10_000));
        child.wait().unwrap();
    }

    static SEEN: AtomicI32 = AtomicI32::new(0);
    extern "C" fn record(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        SEEN.store(sig, Ordering::SeqCst);
    }

    #[test]
    fn a_kick_reaches_its_handler() {
        set_signal_handler(kick_signal(), record).unwrap();
        // SAFETY: pthread_self has no preconditions.
        signal_thread(unsafe { libc::pthread_self() }, kick_signal()).unwrap();
        // Delivered to this thread before pthread_kill returns.
        assert_eq!(SEEN.load(Ordering::SeqCst), kick_signal());
    }
}
