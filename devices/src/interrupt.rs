//! How a device raises its interrupt.

use std::io;

use vmm_os::EventFd;

/// An edge-triggered interrupt line of a device.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt.
    fn trigger(&self) -> io::Result<()>;
}

/// An interrupt line backed by an eventfd (registered with the hypervisor as
/// an irqfd, so a write injects the interrupt without a VM exit).
#[derive(Debug)]
pub struct EventFdLine(pub EventFd);

impl InterruptLine for EventFdLine {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for EventFdLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
