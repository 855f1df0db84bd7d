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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
pub use vmm_sys_util::event::EventNotifier;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag};

use crate::virtio::{BrokenRing, Drained, SignalUsed, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;

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

/// Whether a connection's frontend made a request: GET_FEATURES, the first
/// request of every frontend, reads the features through [`Asked::features`].
/// A connection that ends before is not a frontend that left.
#[derive(Default)]
pub struct Asked(AtomicBool);

impl Asked {
    /// [`features`], noting that the frontend asked.
    fn features(&self) -> u64 {
        self.0.store(true, Ordering::Relaxed);
        features()
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A backend that says whether its frontend made a request.
pub trait Served {
    fn served(&self) -> bool;
}

/// The virtio features both backends offer: those of the in-process
/// devices, the vhost-user protocol features, and the ring features that
/// spare the guest kernel work (fewer notifications each way, one ring
/// slot per request): every ring's driver ([`drive`]) keeps to them.
fn features() -> u64 {
    (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
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

/// How [`drive`] treats buffers that arrive while it works.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ring {
    /// The guest's buffers are requests: new ones are more work.
    Requests,
    /// The guest's buffers wait for the host's data (a receive queue):
    /// new ones are work only once there is data.
    Receive,
}

/// Runs `work` on the queue of `vring` until nothing is left to do now,
/// telling the driver after each run if buffers were used. A spent budget
/// runs it again (the thread has nothing else that this ring's lock
/// would hold up), and so do requests that arrived while notifications
/// were off (off during a run; with EVENT_IDX, re-armed at its end).
fn drive<T>(
    vring: &Vring,
    memory: &Memory,
    ring: Ring,
    mut work: impl FnMut(&mut Queue, &GuestMemoryMmap, &dyn SignalUsed) -> Result<T, BrokenRing>,
    done: impl Fn(&T) -> bool,
) -> Result<(), BrokenRing> {
    loop {
        let signal = Deferred::default();
        let (result, arrived) = {
            let mem = memory.memory();
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let _ = queue.disable_notification(&*mem);
            let result = work(queue, &mem, &signal);
            let arrived = queue.enable_notification(&*mem).unwrap_or(false);
            (result, arrived)
        };
        if signal.0.get() {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!("vhost-user: cannot signal the frontend: {e}");
            }
        }
        if done(&result?) && !(arrived && ring == Ring::Requests) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// A vring over `mem` as the framework sets one up, with `chains`
    /// one-descriptor chains available, and its call eventfd.
    fn vring(mem: &GuestMemoryMmap, chains: u16) -> (Vring, std::fs::File) {
        let q = MockSplitQueue::new(mem, 256);
        let descs: Vec<RawDescriptor> = (0..chains)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(0x8000 + u64::from(i) * 16, 16, 0, 0))
            })
            .collect();
        q.add_desc_chains(&descs, 0).unwrap();
        let vring = Vring::new(Memory::new(mem.clone()), 256).unwrap();
        vring.set_queue_size(256);
        vring
            .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        // SAFETY: eventfd(2) with valid flags; the descriptor is checked
        // and then owned by the File alone.
        let call = unsafe {
            let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
            assert!(fd >= 0);
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        };
        vring.set_call(Some(call.try_clone().unwrap()));
        (vring, call)
    }

    #[test]
    fn a_spent_budget_runs_again_and_the_driver_hears_once_the_lock_is_free() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let chains = crate::virtio::MAX_CHAINS_PER_RUN as u16 + 5;
        let (vring, call) = vring(&mem, chains);
        let memory = Memory::new(mem);
        let mut runs = 0;
        let mut seen = 0;
        drive(
            &vring,
            &memory,
            Ring::Requests,
            |queue, mem, signal| {
                runs += 1;
                // The ring's lock is held here: signalling must not take it.
                crate::virtio::process_requests(queue, mem, signal, |_| {
                    seen += 1;
                    Ok(0)
                })
            },
            drained,
        )
        .unwrap();
        assert_eq!((runs, seen), (2, usize::from(chains)));
        let mut count = [0u8; 8];
        assert!(
            (&call).read_exact(&mut count).is_ok() && u64::from_ne_bytes(count) >= 1,
            "the call eventfd was written"
        );
        assert_eq!(vring.get_ref().get_queue().next_avail(), chains);
        // Nothing used, nothing signalled.
        drive(&vring, &memory, Ring::Receive, |_, _, _| Ok(()), |_| true).unwrap();
        assert!(
            (&call).read_exact(&mut count).is_err(),
            "no call without used buffers"
        );
    }

    #[test]
    fn config_reads_are_cut_to_the_space_and_the_worker_exit_is_handed_once() {
        assert_eq!(config_bytes(&[1, 2, 3, 4], 1, 2), vec![2, 3]);
        assert_eq!(config_bytes(&[1, 2, 3, 4], 2, 100), vec![3, 4, 0, 0]);
        assert_eq!(config_bytes(&[1, 2], u32::MAX, 2), vec![0, 0]);
        let (exit, notifier) = WorkerExit::new().unwrap();
        let (consumer, _) = exit.take().expect("the first ask gets it");
        assert!(exit.take().is_none());
        notifier.notify().unwrap();
        consumer.consume().unwrap();
    }
}
