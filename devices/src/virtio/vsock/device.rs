//! The in-process virtio-vsock device: its queues on the virtio-mmio
//! transport, and the event-loop subscriber for the host sockets
//! ([`VsockBackend`]), sharing one [`VsockCore`].

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_os::event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::muxer::FdChange;
use super::{config_space, VsockCore, EVENTS, QUEUE_SIZE, RX, TX};
use crate::sync::Locked;
use crate::virtio::{
    read_config_bytes, ActivateError, Drained, Interrupt, QueueSnapshot, Running, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

struct Inner {
    core: VsockCore,
    running: Option<Running>,
}

impl Inner {
    fn process_tx(&mut self) -> Drained {
        let Inner { core, running } = self;
        let Some(run) = running.as_mut() else {
            return Drained::All;
        };
        core.process_tx(&mut run.queues[TX], &run.mem, run.interrupt.as_ref())
            .unwrap_or_else(|_| {
                *running = None;
                Drained::All
            })
    }

    fn process_rx(&mut self) {
        let Inner { core, running } = self;
        let Some(run) = running.as_mut() else {
            return;
        };
        if core
            .process_rx(&mut run.queues[RX], &run.mem, run.interrupt.as_ref())
            .is_err()
        {
            *running = None;
        }
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    inner: Arc<Mutex<Inner>>,
    queue_sizes: [u16; 3],
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Vsock {
            cid,
            inner: Arc::new(Mutex::new(Inner {
                core: VsockCore::new(cid, uds_path)?,
                running: None,
            })),
            queue_sizes: [QUEUE_SIZE; 3],
        })
    }

    /// The event-loop subscriber for the host sockets.
    pub fn backend(&self) -> VsockBackend {
        VsockBackend {
            inner: self.inner.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&config_space(self.cid), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let mut inner = self.lock();
        inner.running = Some(Running::new(mem, interrupt, queues, 3)?);
        inner.process_rx();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Drained {
        let mut inner = self.lock();
        let drained = match index {
            TX => inner.process_tx(),
            EVENTS => {
                inner.core.events_returned();
                Drained::All
            }
            _ => Drained::All,
        };
        // Transmitted packets may have produced answers; new receive
        // buffers may unblock waiting data.
        inner.process_rx();
        drained
    }

    fn reset(&mut self) {
        self.lock().running = None;
    }

    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        Running::queue_snapshots(self.lock().running.as_ref())
    }

    /// The host-side connections did not come along: the driver is told to
    /// drop every connection and read the (possibly new) CID again.
    fn restored(&mut self) {
        let mut inner = self.lock();
        let Inner { core, running } = &mut *inner;
        if let Some(run) = running.as_mut() {
            core.send_transport_reset(&mut run.queues[EVENTS], &run.mem, run.interrupt.as_ref());
        }
    }
}

/// Watches the listening socket and the connections' host sockets.
pub struct VsockBackend {
    inner: Arc<Mutex<Inner>>,
}

impl MutEventSubscriber for VsockBackend {
    fn init(&mut self, ops: &mut EventOps) {
        let inner = self.inner.locked();
        for fd in inner.core.host_fds() {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("vsock: cannot watch fd {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut inner = self.inner.locked();
        inner.core.host_event(events.fd(), events.event_set());
        inner.process_rx();
        for change in inner.core.take_changes() {
            let result = match change {
                FdChange::Watch(fd, set) => ops.add(Events::new_raw(fd, set)),
                FdChange::Modify(fd, set) => ops.modify(Events::new_raw(fd, set)),
                FdChange::Unwatch(fd) => ops.remove(Events::empty_raw(fd)),
            };
            if let Err(e) = result {
                tracing::debug!("vsock: watch change failed: {e:?}");
            }
        }
        inner.core.release_closed();
    }
}
