//! vhost-user backends of our devices, for other VMMs (QEMU, Cloud
//! Hypervisor, crosvm) and for running a device in a process of its own.
//!
//! The framework (rust-vmm's `vhost-user-backend`) speaks the protocol,
//! maps the guest memory the frontend sends and owns the rings; each
//! backend here hands the rings to the same device core the in-process
//! device runs ([`crate::virtio::fs::serve_queue`],
//! [`crate::virtio::vsock::VsockCore`]). Nothing the frontend or the guest
//! sends may stop a backend's thread: a broken ring stops that device with
//! a warning, as in-process.

pub mod fs;
pub mod vsock;

use std::cell::Cell;
use std::sync::Mutex;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
pub use vmm_sys_util::event::EventNotifier;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag};

use crate::virtio::{BrokenRing, Drained, SignalUsed, VIRTIO_F_VERSION_1};

/// The guest memory the frontend shares, as the framework maps it.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;
/// A ring, as the framework keeps it.
pub type Vring = VringRwLock<Memory>;

/// The end of a backend's worker thread: the framework watches the
/// consumer (handed over by `exit_event`), the daemon keeps the notifier
/// and notifies it once the frontend's connection ended, so a daemon that
/// serves connection after connection leaves no thread behind.
pub struct WorkerExit(Mutex<Option<(EventConsumer, EventNotifier)>>);

impl WorkerExit {
    /// A worker's end and the notifier that ends it.
    pub fn new() -> std::io::Result<(WorkerExit, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let ours = notifier.try_clone()?;
        Ok((WorkerExit(Mutex::new(Some((consumer, notifier)))), ours))
    }

    /// For `exit_event` (the framework asks once per worker; the backends
    /// have one worker).
    fn take(&self) -> Option<(EventConsumer, EventNotifier)> {
        self.0.lock().ok()?.take()
    }
}

/// The virtio features both backends offer: those of the in-process
/// devices, plus the vhost-user protocol features.
fn features() -> u64 {
    (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// Records that used buffers must be signalled: the vring's call eventfd
/// is written once its lock is released.
#[derive(Default)]
struct Deferred(Cell<bool>);

impl SignalUsed for Deferred {
    fn signal_used_queue(&self) {
        self.0.set(true);
    }
}

/// Runs `work` on the queue of `vring` until it reports that nothing is
/// left to do now (a spent budget runs it again: the thread has nothing
/// else to serve meanwhile that this ring's lock would hold up), then
/// tells the driver if buffers were used.
fn drive<T>(
    vring: &Vring,
    memory: &Memory,
    mut work: impl FnMut(&mut Queue, &GuestMemoryMmap, &dyn SignalUsed) -> Result<T, BrokenRing>,
    done: impl Fn(&T) -> bool,
) -> Result<(), BrokenRing> {
    loop {
        let signal = Deferred::default();
        let result = {
            let mem = memory.memory();
            let mut state = vring.get_mut();
            work(state.get_queue_mut(), &mem, &signal)
        };
        if signal.0.get() {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!("vhost-user: cannot signal the frontend: {e}");
            }
        }
        if done(&result?) {
            return Ok(());
        }
    }
}

/// Whether a request queue's run finished (see [`drive`]).
fn drained(d: &Drained) -> bool {
    !matches!(d, Drained::Budget)
}

/// Reads `size` bytes at `offset` of a configuration space, as
/// VHOST_USER_GET_CONFIG asks (a size past the space is cut to it).
fn config_bytes(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let size = (size as usize).min(space.len());
    let mut out = vec![0u8; size];
    crate::virtio::read_config_bytes(space, u64::from(offset), &mut out);
    out
}
