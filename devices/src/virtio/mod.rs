//! Virtio devices and their MMIO transport (virtio 1.x, split queues).
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] puts it on
//! the MMIO bus. Queue notifications arrive as eventfds (ioeventfd); the VMM's
//! event loop calls [`mmio::MmioTransport::process_queue`] for them.
//! Interrupts go out through an [`Interrupt`] (an irqfd line plus the
//! transport's interrupt-status register).
//!
//! Everything a guest puts in a queue is untrusted: a malformed chain fails
//! that request (or marks the device as needing a reset), never the VMM.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::interrupt::InterruptLine;

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Interrupt-status bit: a used ring was updated.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt-status bit: the configuration changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A device's interrupt: the status bits the driver reads and acknowledges,
/// and the line that tells it to look.
pub struct Interrupt {
    status: AtomicU32,
    line: Box<dyn InterruptLine>,
}

impl Interrupt {
    pub fn new(line: Box<dyn InterruptLine>) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the driver that used rings changed.
    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    /// Tells the driver that the device configuration (or status) changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// How a device tells the driver that it put buffers in a used ring: the
/// in-process transport's [`Interrupt`], or a vhost-user vring's call
/// eventfd (written once the ring's lock is released).
pub trait SignalUsed {
    fn signal_used_queue(&self);
}

impl SignalUsed for Interrupt {
    fn signal_used_queue(&self) {
        Interrupt::signal_used_queue(self);
    }
}

/// A queue's saved state: its setup and ring positions (the rings
/// themselves are in guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueSnapshot {
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// The queue again; None when the saved values are impossible (a size
    /// that is not a power of two, or above the maximum).
    pub fn to_queue(&self) -> Option<Queue> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .ok()
    }
}

/// What an activated device works with: guest memory, its interrupt and
/// the driver's queues.
pub struct Running {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    pub queues: Vec<Queue>,
}

impl Running {
    /// The driver's queues, which must be `count`.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        count: usize,
    ) -> Result<Running, ActivateError> {
        if queues.len() != count {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        Ok(Running {
            mem,
            interrupt,
            queues,
        })
    }

    /// The saved state of the queues of `running` (none before activation).
    pub fn queue_snapshots(running: Option<&Running>) -> Vec<QueueSnapshot> {
        running
            .map(|r| r.queues.iter().map(QueueSnapshot::of).collect())
            .unwrap_or_default()
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not set up correctly by the driver")]
    BadQueue(usize),
    #[error("{0}")]
    Device(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (2 = block, 19 = vsock, ...).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`. [`Drained::Budget`] asks to be
    /// called again once the event loop served other events.
    fn process_queue(&mut self, index: usize) -> Drained;
    /// Returns the device to its pre-activation state (driver reset).
    fn reset(&mut self);
    /// The running device's queues (empty before activation), for saving.
    fn queue_snapshots(&self) -> Vec<QueueSnapshot>;
    /// Called once a restored device is activated again with its saved
    /// queues, in a new VMM process: the host side of the device is new
    /// (sockets, connections), so the device tells the driver whatever it
    /// must (vsock resets its connections). Nothing by default.
    fn restored(&mut self) {}
    /// State of the device itself that a snapshot or fork child needs
    /// (virtio-fs: its inode table). None by default.
    fn save_device(&self) -> Option<DeviceState> {
        None
    }
    /// Takes back what `save_device` gave, before activation. A device
    /// without state of its own refuses any.
    fn restore_device(&mut self, state: &DeviceState) -> Result<(), ActivateError> {
        Err(ActivateError::Device(format!(
            "the saved state is of a {} device, this device keeps none",
            state.kind()
        )))
    }
}

/// A device's own saved state (beyond its transport and queues), by kind.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// virtio-fs: the share's inodes and open files.
    Fs(fs::state::FsState),
}

impl DeviceState {
    /// The kind of device the state belongs to, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Fs(_) => "virtio-fs",
        }
    }
}

/// The used ring of a queue cannot be written: the device must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokenRing;

/// Chains one queue notification handles before the event loop serves
/// other events ([`process_requests`]).
pub const MAX_CHAINS_PER_RUN: usize = 64;
/// Time one queue notification may take before the event loop serves
/// other events (checked between chains: one slow request, an fsync,
/// still takes its time).
pub const MAX_TIME_PER_RUN: Duration = Duration::from_millis(10);

/// Whether a queue's work is done or its budget ran out first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Nothing is left that can be done now.
    All,
    /// The budget ran out: call the device again (after other events).
    Budget,
    /// A rate limit holds the queue: call the device again after this
    /// long (from a timer; the requests wait in the ring meanwhile).
    Throttled(Duration),
}

/// Completes the guest's available chains on `queue` in order: `handle`
/// returns how many bytes it wrote into a chain, or None to leave that chain
/// (and the ones after it) for later. Raises the used-ring interrupt when the
/// driver asks for one. For queues filled from the host side (receive
/// queues), which stop when the host has nothing more.
pub fn process_chains<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn SignalUsed,
    handle: F,
) -> Result<(), BrokenRing>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
{
    run_chains(queue, mem, interrupt, None, handle).map(|_| ())
}

/// [`process_chains`] for request queues the guest fills (block, fs,
/// transmit): at most [`MAX_CHAINS_PER_RUN`] chains and
/// [`MAX_TIME_PER_RUN`] per call, so one guest cannot hold the event loop
/// (and with it the control socket and the other devices). `handle`
/// returns how many bytes it wrote into a chain, or how long a rate limit
/// holds it: the chain and the ones after it then stay in the ring, and
/// the call returns [`Drained::Throttled`].
pub fn process_requests<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn SignalUsed,
    mut handle: F,
) -> Result<Drained, BrokenRing>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> Result<u32, Duration>,
{
    let until = Instant::now() + MAX_TIME_PER_RUN;
    let mut held = None;
    let drained = run_chains(queue, mem, interrupt, Some(until), |chain| {
        handle(chain).map_err(|wait| held = Some(wait)).ok()
    })?;
    Ok(held.map_or(drained, Drained::Throttled))
}

fn run_chains<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn SignalUsed,
    until: Option<Instant>,
    mut handle: F,
) -> Result<Drained, BrokenRing>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
{
    let mut used = false;
    let mut done = 0usize;
    let mut drained = Drained::All;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let Some(len) = handle(chain) else {
            queue.go_to_previous_position();
            break;
        };
        queue.add_used(mem, head, len).map_err(|_| BrokenRing)?;
        used = true;
        done += 1;
        if let Some(until) = until {
            if done >= MAX_CHAINS_PER_RUN || Instant::now() >= until {
                drained = Drained::Budget;
                break;
            }
        }
    }
    if used && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
    Ok(drained)
}

/// Reads `data.len()` bytes at `offset` of a configuration-space image,
/// zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = config.len().min(start.saturating_add(data.len()));
    data[..end - start].copy_from_slice(&config[start..end]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::EventFdLine;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_os::EventFd;

    #[test]
    fn a_request_queue_gives_the_loop_back_after_its_budget() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let q = MockSplitQueue::new(&mem, 256);
        let chains = MAX_CHAINS_PER_RUN as u16 * 2 + 10;
        let descs: Vec<RawDescriptor> = (0..chains)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(0x1000 + u64::from(i) * 16, 16, 0, 0))
            })
            .collect();
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let interrupt = Interrupt::new(Box::new(EventFdLine(
            EventFd::new(vmm_os::EFD_NONBLOCK).unwrap(),
        )));
        let mut seen = 0usize;
        let mut runs = Vec::new();
        loop {
            let before = seen;
            let drained = process_requests(&mut queue, &mem, &interrupt, |_| {
                seen += 1;
                Ok(0)
            })
            .unwrap();
            runs.push(seen - before);
            if drained == Drained::All {
                break;
            }
        }
        assert_eq!(seen, chains as usize);
        assert_eq!(runs, vec![MAX_CHAINS_PER_RUN, MAX_CHAINS_PER_RUN, 10]);
        // Slow requests: the time budget stops a run early.
        q.add_desc_chains(&descs[..8], 0).ok();
        let mut queue: Queue = q.create_queue().unwrap();
        let mut slow = 0;
        let drained = process_requests(&mut queue, &mem, &interrupt, |_| {
            slow += 1;
            let t = Instant::now();
            while t.elapsed() < MAX_TIME_PER_RUN / 2 {}
            Ok(0)
        })
        .unwrap();
        assert_eq!(drained, Drained::Budget);
        assert!(slow < 8, "{slow} slow requests in one run");
        // A receive queue is never cut short.
        let mut all = 0;
        process_chains(&mut queue, &mem, &interrupt, |_| {
            all += 1;
            Some(0)
        })
        .unwrap();
        assert!(all > 0);
    }

    #[test]
    fn config_reads_are_clipped() {
        let config = [1u8, 2, 3, 4];
        let mut out = [9u8; 4];
        read_config_bytes(&config, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut out);
        assert_eq!(out, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
