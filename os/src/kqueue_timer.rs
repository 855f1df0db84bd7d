//! `timerfd` on macOS: the interface of `vmm_sys_util::timerfd::TimerFd`
//! over a kqueue of its own holding one `EVFILT_TIMER`, so the timer is a
//! descriptor an event loop can watch (a kqueue is readable while it has
//! events).
//!
//! A difference: a periodic timer's first expiry comes after the period,
//! not after `dur` (a kqueue timer has one period); the VMM's periodic
//! timers use the same value for both.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The timer's identifier in its kqueue.
const IDENT: usize = 1;

/// A timer that is also a pollable descriptor.
#[derive(Debug)]
pub struct TimerFd {
    kq: OwnedFd,
    armed: bool,
    /// `wait` returns `WouldBlock` instead of waiting for an expiry.
    nonblocking: bool,
}

/// A new, disarmed timer whose `wait` returns `WouldBlock` instead of
/// waiting when it has not expired.
pub fn nonblocking() -> io::Result<TimerFd> {
    let mut timer = TimerFd::new()?;
    timer.nonblocking = true;
    Ok(timer)
}

fn timer_change(flags: u16, ns: i64) -> libc::kevent {
    libc::kevent {
        ident: IDENT,
        filter: libc::EVFILT_TIMER,
        flags,
        fflags: libc::NOTE_NSECONDS,
        data: ns as libc::intptr_t,
        udata: std::ptr::null_mut(),
    }
}

impl TimerFd {
    /// A disarmed timer.
    pub fn new() -> io::Result<TimerFd> {
        let kq = crate::epoll::new_kqueue()?;
        Ok(TimerFd {
            kq,
            armed: false,
            nonblocking: false,
        })
    }

    fn apply(&self, change: libc::kevent) -> io::Result<()> {
        // SAFETY: one live change, no events out.
        let rc = unsafe {
            libc::kevent(
                self.kq.as_raw_fd(),
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
        Ok(())
    }

    /// Arms the timer to expire after `dur`, then every `interval` if
    /// given (see the module's note). A zero `dur` disarms it.
    pub fn reset(&mut self, dur: Duration, interval: Option<Duration>) -> io::Result<()> {
        self.clear()?;
        if dur.is_zero() {
            return Ok(());
        }
        let (period, flags) = match interval {
            Some(i) if !i.is_zero() => (i, libc::EV_ADD | libc::EV_ENABLE),
            _ => (dur, libc::EV_ADD | libc::EV_ENABLE | libc::EV_ONESHOT),
        };
        let ns = i64::try_from(period.as_nanos()).unwrap_or(i64::MAX).max(1);
        self.apply(timer_change(flags, ns))?;
        self.armed = true;
        Ok(())
    }

    /// Returns how many times the timer expired since the last call,
    /// waiting for an expiry first unless made by [`nonblocking`] (then
    /// `WouldBlock` when none came).
    pub fn wait(&mut self) -> io::Result<u64> {
        let nonblocking = self.nonblocking;
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut out = timer_change(0, 0);
        loop {
            // SAFETY: room for one event; the timeout, if any, is live.
            let n = unsafe {
                libc::kevent(
                    self.kq.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    &mut out,
                    1,
                    if nonblocking { &zero } else { std::ptr::null() },
                )
            };
            match n {
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                0 => return Err(io::Error::from(io::ErrorKind::WouldBlock)),
                _ => {
                    if out.flags & libc::EV_ONESHOT != 0 {
                        self.armed = false;
                    }
                    return Ok(u64::try_from(out.data).unwrap_or(1).max(1));
                }
            }
        }
    }

    pub fn is_armed(&self) -> io::Result<bool> {
        Ok(self.armed)
    }

    /// Disarms the timer.
    pub fn clear(&mut self) -> io::Result<()> {
        if self.armed {
            match self.apply(timer_change(libc::EV_DELETE, 0)) {
                // A one-shot timer that fired is gone already.
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
                _ => {}
            }
            self.armed = false;
        }
        Ok(())
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.kq.as_raw_fd()
    }
}
