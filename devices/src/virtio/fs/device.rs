//! The virtio-fs device: its queues and config, driving the server.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::super::{
    process_requests, read_config_bytes, ActivateError, BrokenRing, DeviceState, Drained,
    Interrupt, QueueSnapshot, Running, SignalUsed, VirtioDevice, VIRTIO_F_VERSION_1,
};
use super::iobuf::IoBuf;
use super::server::Server;
use super::{PassthroughFs, MAX_TAG_LEN, VIRTIO_ID_FS};

/// Ring size: a 1 MiB request needs 256 page descriptors plus headers.
pub const QUEUE_SIZE: u16 = 1024;

/// Serves the FUSE requests of `queue` (either of the two): the device's
/// core, which the in-process device and the vhost-user backend both run.
/// A broken ring is reported (the device must stop); a malformed request
/// is dropped with a warning.
pub fn serve_queue(
    server: &mut Server,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn SignalUsed,
) -> Result<Drained, BrokenRing> {
    process_requests(queue, mem, interrupt, |chain| {
        match IoBuf::from_chain(mem, chain) {
            Ok((req, mut reply)) => Ok(server.handle(&req, &mut reply) as u32),
            Err(e) => {
                tracing::warn!("virtio-fs: dropped a request: {e}");
                Ok(0)
            }
        }
    })
    .inspect_err(|_| tracing::warn!("virtio-fs: a ring is broken; the device stops"))
}

/// The device's configuration space: the tag (cut at 36 bytes) and the
/// number of request queues (one).
pub fn config_space(tag: &str) -> [u8; MAX_TAG_LEN + 4] {
    let mut config = [0u8; MAX_TAG_LEN + 4];
    let tag = tag.as_bytes();
    let n = tag.len().min(MAX_TAG_LEN);
    config[..n].copy_from_slice(&tag[..n]);
    config[MAX_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
    config
}

/// The virtio-fs device of one share.
pub struct Fs {
    tag: String,
    server: Server,
    running: Option<Running>,
    queue_sizes: [u16; 2],
}

impl Fs {
    /// A device that shows `fs` to the guest under `tag` (at most 36 bytes).
    pub fn new(tag: &str, fs: PassthroughFs) -> Self {
        Fs {
            tag: tag.to_string(),
            server: Server::new(fs),
            running: None,
            queue_sizes: [QUEUE_SIZE; 2],
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&config_space(&self.tag), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.running = Some(Running::new(mem, interrupt, queues, 2)?);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Drained {
        let Fs {
            server, running, ..
        } = self;
        let Some(run) = running.as_mut() else {
            return Drained::All;
        };
        let Some(queue) = run.queues.get_mut(index) else {
            return Drained::All;
        };
        serve_queue(server, queue, &run.mem, run.interrupt.as_ref()).unwrap_or_else(|_| {
            *running = None;
            Drained::All
        })
    }

    fn reset(&mut self) {
        self.running = None;
        self.server.fs_mut().destroy();
    }

    fn save_device(&self) -> Option<DeviceState> {
        Some(DeviceState::Fs(self.server.fs().save()))
    }

    fn restore_device(&mut self, state: &DeviceState) -> Result<(), ActivateError> {
        let DeviceState::Fs(state) = state;
        self.server.fs_mut().restore(state);
        Ok(())
    }

    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        Running::queue_snapshots(self.running.as_ref())
    }
}
