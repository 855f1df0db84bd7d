//! virtio-net, in-process, in front of a [`NetBackend`] that carries
//! Ethernet frames: the user-mode NAT network in [`user`] or a TAP device
//! in [`tap`].
//!
//! Queues: 0 = receive (to the guest), 1 = transmit (from the guest). Every
//! buffer starts with the 12-byte `virtio_net_hdr_v1`. With MRG_RXBUF
//! (always offered) the driver posts small receive buffers and a frame
//! spans as many as it needs (`num_buffers`); without it, one buffer per
//! frame. Small buffers matter: without them a 65520-byte MTU makes the
//! driver fill its ring with 64 KiB buffers at boot (seconds of guest
//! kernel work on a PVM host) and refill one per received frame, however
//! small. Offloads follow the backend: the user-mode
//! network offers a 65520-byte MTU (big frames instead of segmentation
//! offloads: the guest sends and receives 64 KiB TCP segments without
//! splitting them) and checksum offload both ways (partial checksums from
//! the guest are accepted, frames to it are marked DATA_VALID); TAP gets
//! plain 1500-byte frames with full checksums. Indirect descriptors are
//! offered (a big transmit chain takes one ring entry).
//!
//! The backend is read only while the guest has receive buffers; otherwise
//! frames wait in the backend (the TAP device's queue, or the user-mode
//! stack's bounded queue and socket buffers), not here. Its descriptor is
//! watched edge-triggered: a new frame wakes the device, and buffers the
//! driver posts later drain whatever waited.
//!
//! Rate limits ([`Net::with_rate_limit`]) charge each frame its length and
//! one packet. A transmit frame the limit refuses stays in the ring (the
//! event loop's timer brings the queue back, [`Drained::Throttled`]); a
//! received one waits here, the backend unread behind it, until the
//! device's own receive timer fires. Nothing is dropped for a limit.

pub mod tap;
pub mod user;

use crate::sync::Locked;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_os::event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::rate_limit::{RateLimitConfig, RateLimiter};
use crate::timer::Alarm;

use super::{
    process_requests, read_config_bytes, ActivateError, BrokenRing, Drained, Interrupt,
    QueueSnapshot, Running, VirtioDevice, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// `virtio_net_hdr_v1` (with `num_buffers`, always there in virtio 1.x).
pub const HDR_LEN: usize = 12;
/// Largest frame either way on a standard link: Ethernet header, 1500
/// bytes of payload and a VLAN tag.
pub const MAX_FRAME: usize = 1518;

/// Where the guest's frames go and come from.
pub trait NetBackend: Send {
    /// Readable when `recv` has a frame.
    fn fd(&self) -> RawFd;
    /// Sends one frame from the guest.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The next frame for the guest into `buf`, or None when there is none.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Does pending work: called after a batch of `send`s and whenever
    /// `fd` is readable.
    fn poll(&mut self) {}
    /// A receive rate limit lets `bytes_per_sec` through to the guest: a
    /// backend that queues frames for the guest itself keeps its queue to
    /// a fraction of a second of them, so that the TCP it speaks for the
    /// host does not time out behind them (the user network). Nothing by
    /// default (a TAP device's queue is the host kernel's).
    fn pace(&mut self, _bytes_per_sec: u64) {}
    /// The link's MTU when it is not Ethernet's 1500 or the backend knows
    /// it (offered to the driver as VIRTIO_NET_F_MTU).
    fn mtu(&self) -> Option<u16> {
        None
    }
    /// Whether frames from the guest may carry partial checksums and frames
    /// to it need no checking (VIRTIO_NET_F_CSUM and GUEST_CSUM).
    fn checksum_offload(&self) -> bool {
        false
    }
}

struct Inner {
    backend: Box<dyn NetBackend>,
    running: Option<Running>,
    /// Frames dropped because they were malformed or too large.
    dropped: u64,
    /// The largest frame either way.
    max_frame: usize,
    /// The first byte of every receive header: DATA_VALID when the driver
    /// took GUEST_CSUM.
    rx_flags: u8,
    /// Whether the driver took MRG_RXBUF (a frame may span buffers).
    mergeable: bool,
    /// One frame on its way to the guest: its first `pending` bytes when
    /// it waits for receive buffers.
    scratch: Vec<u8>,
    pending: usize,
    /// One frame from the guest (reused: no allocation per frame).
    tx_frame: Vec<u8>,
    tx_limit: RateLimiter,
    rx_limit: RateLimiter,
    /// Whether the frame in `scratch` was charged to `rx_limit`.
    pending_paid: bool,
    /// Wakes the receive path a limit holds (only with a receive limit).
    rx_timer: Option<Alarm>,
}

impl Inner {
    fn process_tx(&mut self) -> Drained {
        let Inner {
            backend,
            running,
            dropped,
            max_frame,
            tx_frame,
            tx_limit,
            ..
        } = self;
        let Some(run) = running.as_mut() else {
            return Drained::All;
        };
        let mem = &run.mem;
        let done = process_requests(&mut run.queues[TX], mem, run.interrupt.as_ref(), |chain| {
            let Ok(mut r) = Reader::new(mem, chain) else {
                *dropped += 1;
                return Ok(0);
            };
            let len = r.available_bytes();
            if !(HDR_LEN..=HDR_LEN + *max_frame).contains(&len) {
                *dropped += 1;
                return Ok(0);
            }
            tx_limit.consume((len - HDR_LEN) as u64, 1)?;
            tx_frame.resize(len, 0);
            if r.read_exact(tx_frame).is_err() {
                *dropped += 1;
            } else if let Err(e) = backend.send(&tx_frame[HDR_LEN..]) {
                tracing::debug!("virtio-net: frame not sent: {e}");
            }
            Ok(0)
        });
        let drained = done.unwrap_or_else(|_| {
            tracing::warn!("virtio-net: the transmit ring is broken; the device stops");
            *running = None;
            Drained::All
        });
        backend.poll();
        self.process_rx();
        drained
    }

    fn process_rx(&mut self) {
        let Inner {
            backend,
            running,
            dropped,
            max_frame,
            rx_flags,
            mergeable,
            scratch,
            pending,
            rx_limit,
            pending_paid,
            ..
        } = self;
        let Some(run) = running.as_mut() else {
            return;
        };
        scratch.resize(*max_frame, 0);
        let mut used = false;
        let mut throttled = None;
        loop {
            if *pending == 0 {
                match backend.recv(scratch) {
                    Ok(Some(n)) if n > 0 => *pending = n.min(scratch.len()),
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!("virtio-net: backend read failed: {e}");
                        break;
                    }
                }
            }
            if !*pending_paid {
                if let Err(wait) = rx_limit.consume(*pending as u64, 1) {
                    throttled = Some(wait);
                    break;
                }
                *pending_paid = true;
            }
            let frame = &scratch[..*pending];
            let queue = &mut run.queues[RX];
            match deliver(queue, &run.mem, frame, *rx_flags, *mergeable, dropped) {
                Ok(true) => {
                    *pending = 0;
                    *pending_paid = false;
                    used = true;
                }
                // Not enough buffers: the frame waits for the driver's next.
                Ok(false) => break,
                Err(BrokenRing) => {
                    tracing::warn!("virtio-net: the receive ring is broken; the device stops");
                    *running = None;
                    return;
                }
            }
        }
        let queue = &mut run.queues[RX];
        if used && queue.needs_notification(&run.mem).unwrap_or(true) {
            run.interrupt.signal_used_queue();
        }
        if let (Some(wait), Some(timer)) = (throttled, self.rx_timer.as_mut()) {
            timer.wake_after(wait, "virtio-net receive rate limit");
        }
    }
}

/// Writes `frame` behind a receive header into the guest's buffers: one
/// buffer, or with MRG_RXBUF as many as it takes (`num_buffers` says how
/// many). False when the ring has too few buffers now (none is used then).
/// A single buffer too small for the frame is returned empty and the frame
/// is lost.
fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &[u8],
    flags: u8,
    mergeable: bool,
    dropped: &mut u64,
) -> Result<bool, BrokenRing> {
    let need = HDR_LEN + frame.len();
    let mut buffers = Vec::new();
    let mut room = 0;
    while room < need && (mergeable || buffers.is_empty()) {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            for _ in 0..buffers.len() {
                queue.go_to_previous_position();
            }
            return Ok(false);
        };
        let head = chain.head_index();
        let writer = Writer::new(mem, chain).ok();
        room += writer.as_ref().map_or(0, Writer::available_bytes);
        buffers.push((head, writer));
    }
    if room < need {
        *dropped += 1;
        queue
            .add_used(mem, buffers[0].0, 0)
            .map_err(|_| BrokenRing)?;
        return Ok(true);
    }
    let mut hdr = [0u8; HDR_LEN];
    hdr[0] = flags;
    hdr[10..].copy_from_slice(&(buffers.len() as u16).to_le_bytes());
    let mut parts = [&hdr[..], frame];
    for (head, writer) in buffers {
        let mut written = 0;
        if let Some(mut w) = writer {
            for part in parts.iter_mut() {
                let n = part.len().min(w.available_bytes());
                if n == 0 || w.write_all(&part[..n]).is_err() {
                    continue;
                }
                *part = &part[n..];
                written += n;
            }
        }
        queue
            .add_used(mem, head, written as u32)
            .map_err(|_| BrokenRing)?;
    }
    Ok(true)
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    mtu: Option<u16>,
    checksum_offload: bool,
    inner: Arc<Mutex<Inner>>,
    queue_sizes: [u16; 2],
}

impl Net {
    pub fn new(mac: [u8; 6], backend: Box<dyn NetBackend>) -> Self {
        let mtu = backend.mtu();
        let checksum_offload = backend.checksum_offload();
        Net {
            mac,
            mtu,
            checksum_offload,
            inner: Arc::new(Mutex::new(Inner {
                backend,
                running: None,
                dropped: 0,
                // Ethernet header and a VLAN tag around the MTU.
                max_frame: mtu.map_or(MAX_FRAME, |m| usize::from(m) + 18),
                rx_flags: 0,
                mergeable: false,
                scratch: Vec::new(),
                pending: 0,
                tx_frame: Vec::new(),
                tx_limit: RateLimiter::default(),
                rx_limit: RateLimiter::default(),
                pending_paid: false,
                rx_timer: None,
            })),
            queue_sizes: [QUEUE_SIZE; 2],
        }
    }

    /// Limits the guest's traffic each way (bytes and packets per time).
    /// Fails only when the receive limit's timer cannot be made.
    pub fn with_rate_limit(self, rx: &RateLimitConfig, tx: &RateLimitConfig) -> io::Result<Self> {
        {
            let mut inner = self.lock();
            inner.tx_limit = RateLimiter::new(tx);
            inner.rx_limit = RateLimiter::new(rx);
            if !inner.rx_limit.is_unlimited() {
                inner.rx_timer = Some(Alarm::new()?);
            }
            let max_frame = inner.max_frame as u64;
            if let Some(rate) = rx.bytes_per_sec(max_frame) {
                inner.backend.pace(rate);
            }
        }
        Ok(self)
    }

    /// The event-loop subscriber for the backend's descriptor.
    /// The MTU offered to the guest, if any (VIRTIO_NET_F_MTU).
    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    pub fn handle(&self) -> NetHandle {
        NetHandle {
            inner: self.inner.clone(),
        }
    }

    /// Frames dropped as malformed or oversized so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF);
        if self.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        if self.checksum_offload {
            f |= (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM);
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        let valid = features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
        let mut inner = self.lock();
        inner.rx_flags = if valid {
            VIRTIO_NET_HDR_F_DATA_VALID as u8
        } else {
            0
        };
        inner.mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..].copy_from_slice(&self.mtu.unwrap_or(1500).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let mut inner = self.lock();
        inner.running = Some(Running::new(mem, interrupt, queues, 2)?);
        inner.process_rx();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Drained {
        let mut inner = self.lock();
        match index {
            TX => inner.process_tx(),
            RX => {
                inner.process_rx();
                Drained::All
            }
            _ => Drained::All,
        }
    }

    fn reset(&mut self) {
        self.lock().running = None;
    }

    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        Running::queue_snapshots(self.lock().running.as_ref())
    }
}

/// Watches the backend: frames for the guest go into its receive queue.
pub struct NetHandle {
    inner: Arc<Mutex<Inner>>,
}

impl MutEventSubscriber for NetHandle {
    fn init(&mut self, ops: &mut EventOps) {
        let inner = self.inner.locked();
        let fd = inner.backend.fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN | EventSet::EDGE_TRIGGERED)) {
            tracing::error!("virtio-net: cannot watch the backend: {e:?}");
        }
        if let Some(timer) = &inner.rx_timer {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                tracing::error!("virtio-net: cannot watch the receive rate-limit timer: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut inner = self.inner.locked();
        if let Some(timer) = inner.rx_timer.as_mut() {
            if timer.as_raw_fd() == events.fd() {
                timer.acknowledge();
                inner.process_rx();
                return;
            }
        }
        inner.backend.poll();
        inner.process_rx();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::EventFdLine;
    use std::collections::VecDeque;
    use std::time::Duration;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_os::EventFd;

    /// Frames in both directions, kept in memory.
    type Sent = Arc<Mutex<Vec<Vec<u8>>>>;
    type ToGuest = Arc<Mutex<VecDeque<Vec<u8>>>>;

    struct Loop {
        sent: Sent,
        to_guest: ToGuest,
        evt: EventFd,
    }

    impl NetBackend for Loop {
        fn fd(&self) -> RawFd {
            use std::os::fd::AsRawFd;
            self.evt.as_raw_fd()
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
            let Some(f) = self.to_guest.lock().unwrap().pop_front() else {
                return Ok(None);
            };
            buf[..f.len()].copy_from_slice(&f);
            Ok(Some(f.len()))
        }
    }

    /// Descriptors for `chains`, stored from table index `offset` on (the
    /// `next` fields point at the following entry of the same chain).
    fn chains(chains: &[&[(u64, u32, bool)]], offset: u16) -> Vec<RawDescriptor> {
        let mut out = Vec::new();
        for descs in chains {
            for (i, &(addr, len, writable)) in descs.iter().enumerate() {
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = offset + out.len() as u16 + 1;
                out.push(RawDescriptor::from(SplitDescriptor::new(
                    addr, len, flags, next,
                )));
            }
        }
        out
    }

    fn used(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> (u16, Vec<u32>) {
        let idx: u16 = mem.read_obj(q.used_addr().unchecked_add(2)).unwrap();
        let lens = (0..idx as u64)
            .map(|i| {
                mem.read_obj(q.used_addr().unchecked_add(4 + i * 8 + 4))
                    .unwrap()
            })
            .collect();
        (idx, lens)
    }

    /// A backend, and the frames it sent and has for the guest.
    fn looped() -> (Box<Loop>, Sent, ToGuest) {
        let sent = Sent::default();
        let to_guest = ToGuest::default();
        let backend = Loop {
            sent: sent.clone(),
            to_guest: to_guest.clone(),
            evt: EventFd::new(vmm_os::EFD_NONBLOCK).unwrap(),
        };
        (Box::new(backend), sent, to_guest)
    }

    /// Activates `dev` with the receive and transmit queues on `mem`.
    fn activate(
        dev: &mut Net,
        mem: &GuestMemoryMmap,
        rxq: &MockSplitQueue<GuestMemoryMmap>,
        txq: &MockSplitQueue<GuestMemoryMmap>,
    ) {
        let irq = EventFd::new(vmm_os::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(Box::new(EventFdLine(irq))));
        let queues = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
        dev.activate(mem.clone(), interrupt, queues).unwrap();
    }

    #[test]
    fn frames_flow_both_ways_and_hostile_chains_are_dropped() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let (backend, sent, to_guest) = looped();
        let mut dev = Net::new([2, 0, 0, 0, 0, 1], backend);
        let mut cfg = [0u8; 12];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [2, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0xdc, 0x05]);
        activate(&mut dev, &mem, &rxq, &txq);

        // Transmit: a good frame split over two buffers; one shorter than
        // the header; one past the largest frame; one outside memory.
        mem.write_slice(&[0u8; HDR_LEN], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(b"frame-bytes", GuestAddress(0x10_1000))
            .unwrap();
        let descs = chains(
            &[
                &[(0x10_0000, HDR_LEN as u32, false), (0x10_1000, 11, false)],
                &[(0x10_0000, 4, false)],
                &[(0x10_0000, 70_000, false)],
                &[(0x1f_ff00, 0x1000, false)],
            ],
            0,
        );
        txq.add_desc_chains(&descs, 0).unwrap();
        dev.process_queue(TX);
        assert_eq!(used(&mem, &txq).0, 4, "every chain is completed");
        assert_eq!(*sent.lock().unwrap(), vec![b"frame-bytes".to_vec()]);
        assert_eq!(dev.dropped(), 3);

        // Receive: a frame fits the first buffer; the second frame is too
        // big for a tiny buffer (dropped, buffer returned empty); the third
        // waits for a buffer.
        to_guest
            .lock()
            .unwrap()
            .extend([vec![7u8; 60], vec![8u8; 100], vec![9u8; 42]]);
        rxq.add_desc_chains(&chains(&[&[(0x11_0000, 2048, true)]], 0), 0)
            .unwrap();
        rxq.add_desc_chains(&chains(&[&[(0x12_0000, 50, true)]], 1), 1)
            .unwrap();
        dev.process_queue(RX);
        let (idx, lens) = used(&mem, &rxq);
        assert_eq!((idx, lens), (2, vec![(HDR_LEN + 60) as u32, 0]));
        let mut got = vec![0u8; HDR_LEN + 60];
        mem.read_slice(&mut got, GuestAddress(0x11_0000)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert!(got[HDR_LEN..].iter().all(|&b| b == 7));
        rxq.add_desc_chains(&chains(&[&[(0x13_0000, 2048, true)]], 2), 2)
            .unwrap();
        dev.process_queue(RX);
        assert_eq!(used(&mem, &rxq).1[2], (HDR_LEN + 42) as u32);
    }

    #[test]
    fn rate_limits_hold_frames_both_ways_and_drop_none() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let (backend, sent, to_guest) = looped();
        let packets = |size, refill_time_ms| RateLimitConfig {
            bandwidth: None,
            ops: Some(crate::rate_limit::BucketConfig {
                size,
                refill_time_ms,
            }),
        };
        // Transmit: 2 frames per minute. Receive: 2 frames per 50 ms.
        let mut dev = Net::new([2, 0, 0, 0, 0, 1], backend)
            .with_rate_limit(&packets(2, 50), &packets(2, 60_000))
            .unwrap();
        activate(&mut dev, &mem, &rxq, &txq);

        mem.write_slice(&[0u8; HDR_LEN + 4], GuestAddress(0x10_0000))
            .unwrap();
        let frame: &[(u64, u32, bool)] = &[(0x10_0000, HDR_LEN as u32 + 4, false)];
        txq.add_desc_chains(&chains(&[frame, frame, frame], 0), 0)
            .unwrap();
        let Drained::Throttled(wait) = dev.process_queue(TX) else {
            panic!("the third frame is held");
        };
        assert!(wait > Duration::from_secs(29), "{wait:?}");
        assert_eq!(used(&mem, &txq).0, 2, "the third frame stays in the ring");
        assert_eq!(sent.lock().unwrap().len(), 2);

        to_guest
            .lock()
            .unwrap()
            .extend([vec![1u8; 60], vec![2u8; 60], vec![3u8; 60]]);
        let bufs: Vec<&[(u64, u32, bool)]> = vec![
            &[(0x11_0000, 2048, true)],
            &[(0x12_0000, 2048, true)],
            &[(0x13_0000, 2048, true)],
        ];
        rxq.add_desc_chains(&chains(&bufs, 0), 0).unwrap();
        dev.process_queue(RX);
        assert_eq!(used(&mem, &rxq).0, 2, "the third frame waits");
        assert!(to_guest.lock().unwrap().is_empty(), "read, and held here");
        // The receive timer is armed; when it fires the frame goes in.
        let inner = dev.inner.clone();
        let fd = inner.locked().rx_timer.as_ref().unwrap().as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(ready, 1, "the timer fires");
        inner.locked().process_rx();
        assert_eq!(used(&mem, &rxq).1[2], (HDR_LEN + 60) as u32);
        assert_eq!(dev.dropped(), 0);
    }

    #[test]
    fn with_mergeable_buffers_a_frame_spans_several_and_waits_for_enough() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let (backend, _, to_guest) = looped();
        let mut dev = Net::new([2, 0, 0, 0, 0, 1], backend);
        assert_ne!(dev.features() & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
        dev.ack_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF));
        activate(&mut dev, &mem, &rxq, &txq);

        // 100 bytes behind the 12-byte header need three 50-byte buffers;
        // with two posted the frame waits and nothing is used.
        let frame: Vec<u8> = (0..100u8).collect();
        to_guest.lock().unwrap().push_back(frame.clone());
        let buf = |i: u64| 0x10_0000 + i * 0x1000;
        rxq.add_desc_chains(
            &chains(&[&[(buf(0), 50, true)], &[(buf(1), 50, true)]], 0),
            0,
        )
        .unwrap();
        dev.process_queue(RX);
        assert_eq!(used(&mem, &rxq).0, 0, "waits for a third buffer");
        rxq.add_desc_chains(&chains(&[&[(buf(2), 50, true)]], 2), 2)
            .unwrap();
        dev.process_queue(RX);
        let (idx, lens) = used(&mem, &rxq);
        assert_eq!((idx, lens), (3, vec![50, 50, 12]));
        let mut got = [0u8; 150];
        for i in 0..3 {
            mem.read_slice(&mut got[i * 50..i * 50 + 50], GuestAddress(buf(i as u64)))
                .unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[HDR_LEN..HDR_LEN + 100], &frame[..]);
    }
}
