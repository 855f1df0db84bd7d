//! Putting virtio devices on the VM: an MMIO page and an interrupt line
//! each, queue notifications through ioeventfds, and the kernel
//! command-line entry the guest's virtio-mmio driver discovers them by.

use devices::sync::Locked;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{MmioTransport, MMIO_LEN, NOTIFY_OFFSET};
use devices::virtio::{Drained, Interrupt, VirtioDevice};
use devices::{Bus, EventFdLine};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use hypervisor::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::x86_64::layout::{IOAPIC_PINS, VIRTIO_IRQ_START, VIRTIO_MMIO_START};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too many virtio devices: the most is {0}")]
    TooMany(u32),
    #[error("cannot create an eventfd for a virtio device: {0}")]
    EventFd(std::io::Error),
    #[error("cannot wire a virtio device to the hypervisor: {0}")]
    Hypervisor(#[from] hypervisor::Error),
    #[error("cannot place a virtio device on the bus: {0}")]
    Bus(#[from] devices::bus::Error),
}

/// One virtio device on the VM.
pub struct VirtioSlot {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub queue_evts: Vec<EventFd>,
    /// The `virtio_mmio.device=` kernel argument that announces it.
    pub cmdline: String,
}

/// Adds virtio devices one after the other: device n gets the n-th MMIO
/// page from `VIRTIO_MMIO_START` and interrupt line `VIRTIO_IRQ_START + n`.
pub struct VirtioPlacer<'a> {
    vm: &'a dyn hypervisor::Vm,
    mmio: &'a Bus,
    mem: &'a GuestMemoryMmap,
    next: u32,
}

impl<'a> VirtioPlacer<'a> {
    pub fn new(vm: &'a dyn hypervisor::Vm, mmio: &'a Bus, mem: &'a GuestMemoryMmap) -> Self {
        VirtioPlacer {
            vm,
            mmio,
            mem,
            next: 0,
        }
    }

    pub fn add(&mut self, device: Box<dyn VirtioDevice>) -> Result<VirtioSlot, Error> {
        let max = u32::from(IOAPIC_PINS) - VIRTIO_IRQ_START;
        if self.next >= max {
            return Err(Error::TooMany(max));
        }
        let base = VIRTIO_MMIO_START + u64::from(self.next) * MMIO_LEN;
        let irq = VIRTIO_IRQ_START + self.next;
        self.next += 1;

        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        self.vm.register_irqfd(&irq_evt, irq)?;
        let interrupt = Arc::new(Interrupt::new(Box::new(EventFdLine(irq_evt))));
        let transport = MmioTransport::new(device, self.mem.clone(), interrupt);
        let mut queue_evts = Vec::with_capacity(transport.queue_count());
        for index in 0..transport.queue_count() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
            self.vm.register_ioevent(
                &evt,
                IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                Some(index as u32),
            )?;
            queue_evts.push(evt);
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(transport.clone(), base, MMIO_LEN)?;
        Ok(VirtioSlot {
            transport,
            queue_evts,
            cmdline: format!("virtio_mmio.device=4K@{base:#x}:{irq}"),
        })
    }
}

impl MutEventSubscriber for VirtioSlot {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("cannot watch a virtio queue eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(index) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_evts[index].read();
            let drained = self.transport.locked().process_queue(index);
            if drained == Drained::Budget {
                // More is queued: come back once the loop served the other
                // ready descriptors (the control socket among them).
                let _ = self.queue_evts[index].write(1);
            }
        }
    }
}
