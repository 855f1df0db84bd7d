//! An eventfd made of a pipe, for hosts without eventfd (macOS).
//!
//! `write(n)` adds `n` to the counter; `read` returns the counter and
//! resets it, as an eventfd does. The counter lives in the pipe: each write
//! puts `n` as 8 bytes, each read drains the pipe and sums what it finds.
//! A full pipe (the reader is far behind) loses nothing that matters: the
//! reader is already due to wake, and a counter used as a doorbell needs
//! no exact count, so a write that would block counts as done.
//!
//! The read end is what a poller (kqueue, `poll`) waits on: readable while
//! the counter is not zero.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `EventFd::new(EFD_NONBLOCK)`: `read` returns `WouldBlock` when the
/// counter is zero instead of waiting.
pub const EFD_NONBLOCK: i32 = 1;

/// A pipe that counts like an eventfd.
#[derive(Debug)]
pub struct PipeEventFd {
    read: OwnedFd,
    write: OwnedFd,
    nonblocking: bool,
}

impl PipeEventFd {
    /// A counter at zero. `flags` is 0 or [`EFD_NONBLOCK`].
    pub fn new(flags: i32) -> io::Result<PipeEventFd> {
        if flags & !EFD_NONBLOCK != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown event flags {flags:#x}: only EFD_NONBLOCK is known"),
            ));
        }
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe() succeeded: both descriptors are new and ours.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&read, &write] {
            set_flag(
                fd.as_raw_fd(),
                libc::F_SETFD,
                libc::F_GETFD,
                libc::FD_CLOEXEC,
            )?;
        }
        // The read end is always non-blocking: a blocking `read` waits in
        // `poll` instead, so that it never sleeps in the middle of a drain.
        set_flag(
            read.as_raw_fd(),
            libc::F_SETFL,
            libc::F_GETFL,
            libc::O_NONBLOCK,
        )?;
        set_flag(
            write.as_raw_fd(),
            libc::F_SETFL,
            libc::F_GETFL,
            libc::O_NONBLOCK,
        )?;
        Ok(PipeEventFd {
            read,
            write,
            nonblocking: flags & EFD_NONBLOCK != 0,
        })
    }

    /// The write end, for code that must wake the reader with a bare
    /// `write(2)` of 8 bytes (a signal handler, where `write` is the
    /// async-signal-safe call). It stays open as long as `self`.
    pub fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// Adds `value` to the counter and wakes a waiting reader.
    pub fn write(&self, value: u64) -> io::Result<()> {
        let bytes = value.to_ne_bytes();
        loop {
            // SAFETY: writes from a live 8-byte buffer to our own pipe.
            let n = unsafe { libc::write(self.write.as_raw_fd(), bytes.as_ptr().cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                // Full: the reader has plenty to wake for.
                io::ErrorKind::WouldBlock => return Ok(()),
                _ => return Err(err),
            }
        }
    }

    /// Returns the counter and resets it to zero; waits for a write first
    /// unless made with [`EFD_NONBLOCK`] (then `WouldBlock` at zero).
    pub fn read(&self) -> io::Result<u64> {
        loop {
            let sum = self.drain()?;
            if sum != 0 {
                return Ok(sum);
            }
            if self.nonblocking {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.wait_readable()?;
        }
    }

    /// Sums every whole 8-byte value in the pipe. A pipe write of 8 bytes
    /// is atomic (below PIPE_BUF), so values never arrive split.
    fn drain(&self) -> io::Result<u64> {
        let mut sum = 0u64;
        let mut buf = [0u8; 512];
        loop {
            // SAFETY: reads into a live buffer of `buf.len()` bytes.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(sum),
                    _ => return Err(err),
                }
            }
            if n == 0 {
                return Ok(sum);
            }
            for value in buf[..n as usize].chunks_exact(8) {
                let mut word = [0u8; 8];
                word.copy_from_slice(value);
                sum = sum.saturating_add(u64::from_ne_bytes(word));
            }
        }
    }

    fn wait_readable(&self) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one live pollfd.
        if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Another handle on the same counter.
    pub fn try_clone(&self) -> io::Result<PipeEventFd> {
        Ok(PipeEventFd {
            read: self.read.try_clone()?,
            write: self.write.try_clone()?,
            nonblocking: self.nonblocking,
        })
    }
}

/// The read end: what a poller waits on.
impl AsRawFd for PipeEventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

impl AsFd for PipeEventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

fn set_flag(fd: RawFd, set: i32, get: i32, flag: i32) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let old = unsafe { libc::fcntl(fd, get) };
    if old < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, set, old | flag) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(e: &PipeEventFd) -> bool {
        let mut pfd = libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one live pollfd without waiting.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn counts_like_an_eventfd() {
        let e = PipeEventFd::new(EFD_NONBLOCK).unwrap();
        assert!(!readable(&e));
        assert_eq!(e.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        e.write(1).unwrap();
        e.write(5).unwrap();
        assert!(readable(&e));
        assert_eq!(e.read().unwrap(), 6);
        assert!(!readable(&e), "a read resets the counter");
        assert_eq!(e.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_clone_shares_the_counter() {
        let e = PipeEventFd::new(EFD_NONBLOCK).unwrap();
        let c = e.try_clone().unwrap();
        c.write(3).unwrap();
        assert_eq!(e.read().unwrap(), 3);
    }

    #[test]
    fn a_full_pipe_still_counts_as_written() {
        let e = PipeEventFd::new(EFD_NONBLOCK).unwrap();
        // Far more than any pipe buffer holds: no write fails or blocks.
        for _ in 0..100_000 {
            e.write(1).unwrap();
        }
        let n = e.read().unwrap();
        assert!(n > 0 && n <= 100_000, "{n}");
        assert!(!readable(&e));
    }

    #[test]
    fn a_blocking_read_waits_for_a_write() {
        let e = PipeEventFd::new(0).unwrap();
        let writer = e.try_clone().unwrap();
        let t = std::thread::spawn(move || e.read().unwrap());
        writer.write(7).unwrap();
        assert_eq!(t.join().unwrap(), 7);
    }

    #[test]
    fn unknown_flags_are_refused() {
        let err = PipeEventFd::new(0x80).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn descriptors_close_on_exec() {
        let e = PipeEventFd::new(0).unwrap();
        for fd in [e.read.as_raw_fd(), e.write.as_raw_fd()] {
            // SAFETY: fcntl F_GETFD on a live descriptor.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
    }
}
