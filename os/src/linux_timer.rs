//! `timerfd` on Linux: vmm-sys-util's, and a non-blocking constructor.

use std::io;
use std::os::fd::AsRawFd;

pub use vmm_sys_util::timerfd::TimerFd;

/// A new, disarmed timer whose reads return `WouldBlock` instead of
/// waiting when it has not expired.
pub fn nonblocking() -> io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(io::Error::from)?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns, with integer
    // arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_unexpired_timer_does_not_block() {
        let mut t = nonblocking().unwrap();
        t.reset(Duration::from_secs(60), None).unwrap();
        let e = io::Error::from(t.wait().unwrap_err());
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
