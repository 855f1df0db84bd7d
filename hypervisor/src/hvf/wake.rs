//! Waking a vCPU thread that sleeps in WFI or powered off: one doorbell
//! (an eventfd, a pipe on macOS) per vCPU, rung by the interrupt thread,
//! by PSCI CPU_ON and by a kick.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_os::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result};

/// One wake-up event per vCPU, rung when an interrupt may need it.
#[derive(Default)]
pub struct Doorbells(Mutex<Vec<Arc<EventFd>>>);

impl Doorbells {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<EventFd>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPU `id`'s doorbell (created on first use).
    pub fn get(&self, id: u32) -> Result<Arc<EventFd>> {
        let mut bells = self.lock();
        while bells.len() <= id as usize {
            let bell = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::call("pipe", e))?;
            bells.push(Arc::new(bell));
        }
        Ok(bells[id as usize].clone())
    }

    /// Wakes vCPU `id` (a full doorbell already wakes it).
    pub fn ring(&self, id: u32) {
        if let Some(bell) = self.lock().get(id as usize) {
            let _ = bell.write(1);
        }
    }

    /// Wakes every vCPU.
    pub fn ring_all(&self) {
        for bell in self.lock().iter() {
            let _ = bell.write(1);
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes (`None`: no limit);
/// whether it became readable.
pub fn wait_readable(fd: i32, timeout: Option<Duration>) -> Result<bool> {
    // Round up: a sleep shorter than asked would only spin.
    let ms = timeout.map_or(-1, |d| {
        i32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
    });
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(true);
        }
        return Err(Error::call("poll", e));
    }
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_ring_wakes_only_its_vcpu() {
        let bells = Doorbells::default();
        let zero = bells.get(0).unwrap();
        let two = bells.get(2).unwrap();
        assert!(Arc::ptr_eq(&zero, &bells.get(0).unwrap()));
        bells.ring(2);
        assert!(wait_readable(two.as_raw_fd(), Some(Duration::ZERO)).unwrap());
        assert!(!wait_readable(zero.as_raw_fd(), Some(Duration::ZERO)).unwrap());
        assert_eq!(two.read().unwrap(), 1);
        // Ringing a vCPU that does not exist is harmless.
        bells.ring(9);
        bells.ring_all();
        for id in 0..3 {
            let bell = bells.get(id).unwrap();
            assert!(wait_readable(bell.as_raw_fd(), Some(Duration::ZERO)).unwrap());
        }
    }

    #[test]
    fn a_wait_ends_at_its_timeout_or_a_ring() {
        let bells = Arc::new(Doorbells::default());
        let bell = bells.get(0).unwrap();
        // Nothing rung: a short wait times out (rounded up to 1 ms).
        assert!(!wait_readable(bell.as_raw_fd(), Some(Duration::from_micros(10))).unwrap());
        let ringer = {
            let bells = bells.clone();
            std::thread::spawn(move || bells.ring(0))
        };
        // No limit: only the ring ends it.
        assert!(wait_readable(bell.as_raw_fd(), None).unwrap());
        ringer.join().unwrap();
    }
}
