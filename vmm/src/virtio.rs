//! Putting virtio devices on the VM: an MMIO page and an interrupt line
//! each, and queue notifications through ioeventfds. How the guest's
//! virtio-mmio driver learns where they are is the architecture's
//! (`crate::arch::Machine`).

use devices::sync::Locked;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::timer::Alarm;
use devices::virtio::mmio::{MmioTransport, MMIO_LEN, NOTIFY_OFFSET};
use devices::virtio::{Drained, Interrupt, VirtioDevice};
use devices::{Bus, EventFdLine};
use hypervisor::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_os::event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_os::EventFd;

use crate::arch::layout::{VIRTIO_IRQ_END, VIRTIO_IRQ_START, VIRTIO_MMIO_START};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too many virtio devices: the most is {0}")]
    TooMany(u32),
    #[error("cannot create an eventfd or timer for a virtio device: {0}")]
    EventFd(std::io::Error),
    #[error("cannot wire a virtio device to the hypervisor: {0}")]
    Hypervisor(#[from] hypervisor::Error),
    #[error("cannot place a virtio device on the bus: {0}")]
    Bus(#[from] devices::bus::Error),
    #[error("the saved machine has {0}, its configuration does not: restore with the devices (root disk, vsock, network, shares by tag) it was saved with")]
    NotConfigured(DeviceId),
    #[error("the configuration has {0}, the saved machine does not: restore with the devices (root disk, vsock, network, shares by tag) it was saved with")]
    NotSaved(DeviceId),
}

/// Which device of the configuration a virtio device is: what its saved
/// state is matched by on restore (not its place on the bus).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceId {
    RootDisk,
    Vsock,
    Network,
    /// A shared folder, by its tag.
    Share(String),
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceId::RootDisk => f.write_str("the root disk"),
            DeviceId::Vsock => f.write_str("vsock"),
            DeviceId::Network => f.write_str("the network"),
            DeviceId::Share(tag) => write!(f, "the share {tag:?}"),
        }
    }
}

/// Puts `devices` in the order of `saved` (the bus order of the saved
/// machine, which its guest found them in). Every saved device must be
/// among `devices` and the other way round.
pub fn order_as_saved<T>(
    mut devices: Vec<(DeviceId, T)>,
    saved: &[DeviceId],
) -> Result<Vec<(DeviceId, T)>, Error> {
    let mut ordered = Vec::with_capacity(devices.len());
    for id in saved {
        let at = devices
            .iter()
            .position(|(d, _)| d == id)
            .ok_or_else(|| Error::NotConfigured(id.clone()))?;
        ordered.push(devices.remove(at));
    }
    match devices.into_iter().next() {
        Some((id, _)) => Err(Error::NotSaved(id)),
        None => Ok(ordered),
    }
}

/// One virtio device on the VM.
pub struct VirtioSlot {
    pub id: DeviceId,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub queue_evts: Vec<EventFd>,
    /// Its MMIO page and interrupt line, for the guest to find it by.
    pub base: u64,
    pub irq: u32,
    /// Wakes the queues a rate limit holds ([`Drained::Throttled`]).
    throttle: Alarm,
    throttled: Vec<bool>,
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

    pub fn add(
        &mut self,
        id: DeviceId,
        device: Box<dyn VirtioDevice>,
    ) -> Result<VirtioSlot, Error> {
        let max = VIRTIO_IRQ_END - VIRTIO_IRQ_START;
        if self.next >= max {
            return Err(Error::TooMany(max));
        }
        let base = VIRTIO_MMIO_START + u64::from(self.next) * MMIO_LEN;
        let irq = VIRTIO_IRQ_START + self.next;
        self.next += 1;

        let irq_evt = EventFd::new(vmm_os::EFD_NONBLOCK).map_err(Error::EventFd)?;
        self.vm.register_irqfd(&irq_evt, irq)?;
        let interrupt = Arc::new(Interrupt::new(Box::new(EventFdLine(irq_evt))));
        let transport = MmioTransport::new(device, self.mem.clone(), interrupt);
        let mut queue_evts = Vec::with_capacity(transport.queue_count());
        for index in 0..transport.queue_count() {
            let evt = EventFd::new(vmm_os::EFD_NONBLOCK).map_err(Error::EventFd)?;
            self.vm.register_ioevent(
                &evt,
                IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                Some(index as u32),
            )?;
            queue_evts.push(evt);
        }
        let throttled = vec![false; queue_evts.len()];
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(transport.clone(), base, MMIO_LEN)?;
        Ok(VirtioSlot {
            id,
            transport,
            queue_evts,
            base,
            irq,
            throttle: Alarm::new().map_err(Error::EventFd)?,
            throttled,
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
        if let Err(e) = ops.add(Events::new(&self.throttle, EventSet::IN)) {
            tracing::error!("cannot watch a virtio device's throttle timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.throttle.as_raw_fd() {
            self.throttle.acknowledge();
            // Every held queue tries again; one still held re-arms the timer.
            for index in 0..self.throttled.len() {
                if std::mem::take(&mut self.throttled[index]) {
                    self.serve(index);
                }
            }
        } else if let Some(index) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_evts[index].read();
            self.serve(index);
        }
    }
}

impl VirtioSlot {
    /// Lets the device work on queue `index` and arranges the next call.
    fn serve(&mut self, index: usize) {
        match self.transport.locked().process_queue(index) {
            Drained::All => {}
            // More is queued: come back once the loop served the other
            // ready descriptors (the control socket among them).
            Drained::Budget => {
                let _ = self.queue_evts[index].write(1);
            }
            // A rate limit holds the queue: come back when it allows more.
            // The timer keeps the earliest wake-up any held queue asked
            // for; the others ask again then.
            Drained::Throttled(wait) => {
                self.throttled[index] = true;
                self.throttle.wake_after(wait, &self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_take_the_saved_order_and_must_match_it() {
        let share = |t: &str| DeviceId::Share(t.into());
        let config = vec![
            (DeviceId::RootDisk, 0),
            (DeviceId::Vsock, 1),
            (share("a"), 2),
            (share("b"), 3),
        ];
        let saved = [DeviceId::RootDisk, DeviceId::Vsock, share("b"), share("a")];
        let ordered = order_as_saved(config.clone(), &saved).unwrap();
        let values: Vec<i32> = ordered.iter().map(|(_, v)| *v).collect();
        assert_eq!(values, [0, 1, 3, 2]);

        let err = order_as_saved(config.clone(), &[DeviceId::Network]).unwrap_err();
        assert!(matches!(err, Error::NotConfigured(DeviceId::Network)));
        assert!(err.to_string().contains("the network"), "{err}");
        let err = order_as_saved(config, &saved[..3]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the configuration has the share \"a\", the saved machine does not"),
            "{err}"
        );
    }
}
