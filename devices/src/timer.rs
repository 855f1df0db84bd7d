//! Timers an event loop can read without blocking.
//!
//! A timerfd reported readable in one `epoll_wait` batch may have been
//! re-armed or stopped by an earlier event of the same batch; a blocking
//! read would then wait for the next expiry, or forever, with the whole
//! loop. These timers are non-blocking: such a read returns at once.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_os::timerfd::{nonblocking, TimerFd};

/// A periodic non-blocking timer that runs exactly while its owner has
/// something to check (deadlines pending), so an idle loop never wakes.
pub struct Ticker {
    timer: TimerFd,
    period: Duration,
    running: bool,
}

impl Ticker {
    pub fn new(period: Duration) -> io::Result<Self> {
        Ok(Ticker {
            timer: nonblocking()?,
            period,
            running: false,
        })
    }

    /// Starts or stops the ticks; failures are logged as `owner`'s.
    pub fn run_while(&mut self, wanted: bool, owner: &str) {
        if wanted == self.running {
            return;
        }
        let result = if wanted {
            self.timer.reset(self.period, Some(self.period))
        } else {
            self.timer.clear()
        };
        match result {
            Ok(()) => self.running = wanted,
            Err(e) => tracing::warn!("{owner}: cannot set its timer: {e}"),
        }
    }

    /// Takes the expirations (the descriptor was readable).
    pub fn acknowledge(&mut self) {
        let _ = self.timer.wait();
    }
}

impl AsRawFd for Ticker {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }
}

/// A one-shot non-blocking timer for waits several callers may ask for
/// (rate limits holding queues): it keeps the earliest wake-up asked for
/// since it last fired; the callers that asked later ask again then.
pub struct Alarm {
    timer: TimerFd,
    at: Option<Instant>,
}

impl Alarm {
    pub fn new() -> io::Result<Self> {
        Ok(Alarm {
            timer: nonblocking()?,
            at: None,
        })
    }

    /// Fires in `wait` unless it already fires sooner; failures are
    /// logged as `owner`'s.
    pub fn wake_after(&mut self, wait: Duration, owner: impl std::fmt::Display) {
        let at = Instant::now() + wait;
        if self.at.is_some_and(|armed| armed <= at) {
            return;
        }
        match self.timer.reset(wait, None) {
            Ok(()) => self.at = Some(at),
            Err(e) => tracing::error!("{owner}: cannot arm its timer: {e}"),
        }
    }

    /// Takes the expiration (the descriptor was readable).
    pub fn acknowledge(&mut self) {
        let _ = self.timer.wait();
        self.at = None;
    }
}

impl AsRawFd for Alarm {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn reading_a_stopped_or_rearmed_timer_returns_at_once() {
        let mut timer = nonblocking().unwrap();
        timer.reset(Duration::from_secs(60), None).unwrap();
        let start = Instant::now();
        assert!(timer.wait().is_err(), "not expired: no count");
        timer.clear().unwrap();
        assert!(timer.wait().is_err());
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn an_alarm_keeps_the_earliest_wake_up() {
        let mut alarm = Alarm::new().unwrap();
        alarm.wake_after(Duration::from_secs(60), "test");
        alarm.wake_after(Duration::from_millis(1), "test");
        alarm.wake_after(Duration::from_secs(30), "test");
        let mut pfd = libc::pollfd {
            fd: alarm.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(ready, 1, "the 1 ms wake-up fires, not the later ones");
        alarm.acknowledge();
        assert_eq!(alarm.at, None);
    }
}
