//! Interrupt lines from the devices. Hypervisor.framework has no irqfd:
//! one thread waits on every registered event; when one fires it calls
//! `fire` with the line's INTID (the backend pulses the SPI on the
//! platform GIC; the lines are edge-triggered in the device tree) and
//! rings every vCPU's doorbell, so that a vCPU asleep in WFI goes back
//! into the guest to take the interrupt.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_os::{EventFd, EFD_NONBLOCK};

use super::wake::Doorbells;
use crate::{Error, Result};

struct Lines {
    /// (event, INTID) of every registered line.
    lines: Mutex<Vec<(EventFd, u32)>>,
    /// Written when `lines` changes or the thread must stop.
    changed: EventFd,
    stop: AtomicBool,
}

/// The interrupt thread and its lines.
pub struct IrqLines {
    lines: Arc<Lines>,
    thread: Option<JoinHandle<()>>,
}

impl IrqLines {
    /// Starts the thread, which calls `fire` with the INTID of each line
    /// signalled, then rings `doorbells`.
    pub fn start(
        doorbells: Arc<Doorbells>,
        fire: impl Fn(u32) + Send + 'static,
    ) -> Result<IrqLines> {
        let lines = Arc::new(Lines {
            lines: Mutex::new(Vec::new()),
            changed: EventFd::new(EFD_NONBLOCK).map_err(|e| Error::call("pipe", e))?,
            stop: AtomicBool::new(false),
        });
        let for_thread = lines.clone();
        let thread = std::thread::Builder::new()
            .name("hvf-irq".into())
            .spawn(move || serve(&for_thread, &doorbells, fire))
            .map_err(|e| Error::call("spawn the interrupt thread", e))?;
        Ok(IrqLines {
            lines,
            thread: Some(thread),
        })
    }

    /// Pulses INTID `intid` whenever `fd` is written.
    pub fn add(&self, fd: &EventFd, intid: u32) -> Result<()> {
        let fd = fd
            .try_clone()
            .map_err(|e| Error::call("clone an interrupt event", e))?;
        self.lines
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((fd, intid));
        self.lines
            .changed
            .write(1)
            .map_err(|e| Error::call("wake the interrupt thread", e))
    }

    /// Stops the thread and waits for it (also on drop).
    pub fn stop(&mut self) {
        self.lines.stop.store(true, Ordering::SeqCst);
        // A failed write leaves the thread blocked; it then ends with
        // the process rather than hang here.
        if self.lines.changed.write(1).is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for IrqLines {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(lines: &Lines, doorbells: &Doorbells, fire: impl Fn(u32)) {
    while !lines.stop.load(Ordering::SeqCst) {
        // The set is rebuilt after each wake: registrations are rare
        // (device setup) and the set is a handful of fds.
        let watched: Vec<(i32, u32)> = lines
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(fd, intid)| (fd.as_raw_fd(), *intid))
            .collect();
        let mut fds: Vec<libc::pollfd> = std::iter::once(lines.changed.as_raw_fd())
            .chain(watched.iter().map(|&(fd, _)| fd))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a live array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(
                "the interrupt thread cannot wait: {}; device interrupts stop",
                io::Error::last_os_error()
            );
            return;
        }
        if fds[0].revents != 0 {
            let _ = lines.changed.read();
        }
        let mut fired = false;
        for (pfd, &(_, intid)) in fds[1..].iter().zip(&watched) {
            if pfd.revents == 0 {
                continue;
            }
            // Drain through the registered event (its pipe or eventfd).
            if let Some((event, _)) = lines
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(e, _)| e.as_raw_fd() == pfd.fd)
            {
                let _ = event.read();
            }
            fire(intid);
            fired = true;
        }
        if fired {
            doorbells.ring_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_signalled_line_fires_its_intid_and_rings_every_doorbell() {
        let doorbells = Arc::new(Doorbells::default());
        let bell0 = doorbells.get(0).unwrap();
        let bell1 = doorbells.get(1).unwrap();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let mut lines = IrqLines::start(doorbells, move |intid| {
            tx.lock().unwrap().send(intid).unwrap();
        })
        .unwrap();
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        lines.add(&a, 37).unwrap();
        lines.add(&b, 38).unwrap();
        b.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(38));
        // Drained: it does not fire again by itself.
        a.write(3).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(37));
        assert!(
            crate::hvf::wake::wait_readable(bell0.as_raw_fd(), Some(Duration::from_secs(10)))
                .unwrap()
        );
        assert!(
            crate::hvf::wake::wait_readable(bell1.as_raw_fd(), Some(Duration::from_secs(10)))
                .unwrap()
        );
        lines.stop();
        // The thread has ended and dropped `fire`, and with it the sender.
        assert_eq!(rx.recv(), Err(mpsc::RecvError));
    }
}
