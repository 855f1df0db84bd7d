//! virtio-vsock, in-process (no /dev/vhost-vsock), with the host side on
//! Unix sockets (see [`muxer`]).
//!
//! Queues: 0 = receive (host to guest), 1 = transmit (guest to host),
//! 2 = events (transport resets after a restore or fork). [`VsockCore`]
//! is the device's work on those queues and on the host sockets; the
//! in-process device ([`Vsock`]) and the vhost-user backend both drive it.

mod device;
pub mod muxer;
pub mod packet;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use virtio_queue::{Queue, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_os::event_manager::EventSet;

use super::{process_chains, process_requests, BrokenRing, Drained, SignalUsed};
pub use device::{Vsock, VsockBackend};
use muxer::{FdChange, Muxer};
use packet::{Header, HDR_LEN};

/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX: usize = 0;
/// Index of the transmit queue.
pub const TX: usize = 1;
/// Index of the event queue.
pub const EVENTS: usize = 2;
/// Event id telling the driver that every connection is gone and the CID
/// may have changed (virtio 1.2, 5.10.6.5).
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Largest payload the guest may send in one packet (Linux sends up to 64 KiB).
const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// The device's configuration space: the guest's CID.
pub fn config_space(cid: u64) -> [u8; 8] {
    cid.to_le_bytes()
}

/// The vsock device's work, whichever transport carries its queues: the
/// guest's packets in, the host sockets' data out, transport resets.
pub struct VsockCore {
    muxer: Muxer,
    /// A transport reset was sent and the driver has not handled it yet
    /// (it kicks the event queue when it has): packets for the guest wait,
    /// or the reset would also drop the connections made meanwhile.
    reset_pending: bool,
}

impl VsockCore {
    /// The core for guest `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> std::io::Result<Self> {
        Ok(VsockCore {
            muxer: Muxer::new(cid, uds_path)?,
            reset_pending: false,
        })
    }

    /// Takes the guest's packets from the transmit queue.
    pub fn process_tx(
        &mut self,
        tx: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &dyn SignalUsed,
    ) -> Result<Drained, BrokenRing> {
        let muxer = &mut self.muxer;
        process_requests(tx, mem, interrupt, |chain| {
            match read_packet(mem, chain) {
                Some((hdr, payload)) => muxer.handle_guest_packet(&hdr, &payload),
                None => tracing::warn!("vsock: dropped a malformed packet from the guest"),
            }
            Ok(0)
        })
        .inspect_err(|_| tracing::warn!("vsock: the transmit ring is broken; the device stops"))
    }

    /// Fills the guest's receive buffers with what the host side has.
    pub fn process_rx(
        &mut self,
        rx: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &dyn SignalUsed,
    ) -> Result<(), BrokenRing> {
        if self.reset_pending {
            return Ok(());
        }
        let muxer = &mut self.muxer;
        process_chains(rx, mem, interrupt, |chain| {
            let Ok(mut writer) = Writer::new(mem, chain) else {
                tracing::warn!("vsock: malformed receive buffer from the guest");
                return Some(0);
            };
            let room = writer.available_bytes();
            if room < HDR_LEN {
                return Some(0);
            }
            // Nothing to send: the buffer stays with the device for later.
            let (hdr, data) = muxer.next_packet(room - HDR_LEN)?;
            let written = writer
                .write_all(&hdr.to_bytes())
                .and_then(|_| writer.write_all(&data))
                .map(|_| writer.bytes_written() as u32)
                .unwrap_or(0);
            Some(written)
        })
        .inspect_err(|_| tracing::warn!("vsock: the receive ring is broken; the device stops"))
    }

    /// The driver returned an event buffer: it handled the transport reset.
    pub fn events_returned(&mut self) {
        if self.reset_pending {
            tracing::debug!("vsock: the driver handled the transport reset");
        }
        self.reset_pending = false;
    }

    /// Tells the driver to drop every connection and read the (possibly
    /// new) CID again, through a buffer of the event queue.
    pub fn send_transport_reset(
        &mut self,
        events: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &dyn SignalUsed,
    ) {
        let mut sent = false;
        let done = process_chains(events, mem, interrupt, |chain| {
            if sent {
                return None;
            }
            sent = true;
            let mut writer = Writer::new(mem, chain).ok()?;
            Some(
                writer
                    .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                    .map_or(0, |_| 4),
            )
        });
        if done.is_err() || !sent {
            tracing::warn!(
                "vsock: cannot tell the guest its connections were reset (no event buffer)"
            );
        } else {
            tracing::debug!("vsock: transport reset sent to the driver");
            self.reset_pending = true;
        }
    }

    /// The host descriptors to watch (for reading) from the start; the
    /// connections' come and go through [`VsockCore::take_changes`].
    pub fn host_fds(&self) -> [RawFd; 3] {
        [
            self.muxer.listener_fd(),
            self.muxer.wake_fd().as_raw_fd(),
            self.muxer.timer_fd(),
        ]
    }

    /// Serves an event on a watched host descriptor. Then the caller fills
    /// the receive queue, applies [`VsockCore::take_changes`] and calls
    /// [`VsockCore::release_closed`].
    pub fn host_event(&mut self, fd: RawFd, set: EventSet) {
        let muxer = &mut self.muxer;
        if fd == muxer.listener_fd() {
            muxer.accept_host();
        } else if fd == muxer.timer_fd() {
            muxer.on_timer();
        } else if muxer.owns(fd) {
            muxer.host_event(fd, set);
        }
    }

    /// The watch changes to make.
    pub fn take_changes(&mut self) -> Vec<FdChange> {
        self.muxer.take_changes()
    }

    /// Closes the sockets unwatched by the changes just applied.
    pub fn release_closed(&mut self) {
        self.muxer.release_closed();
    }
}

fn read_packet(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Option<(Header, Vec<u8>)> {
    let mut reader = Reader::new(mem, chain).ok()?;
    let mut raw = [0u8; HDR_LEN];
    reader.read_exact(&mut raw).ok()?;
    let hdr = Header::parse(&raw);
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD || len > reader.available_bytes() {
        return None;
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).ok()?;
    Some((hdr, payload))
}

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::*;
    use crate::interrupt::EventFdLine;
    use crate::virtio::{Interrupt, VirtioDevice};
    use std::sync::Arc;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_os::EventFd;

    const CID: u64 = 3;

    fn chain(descs: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
            })
            .collect()
    }

    fn used_len(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, slot: u64) -> u32 {
        // Used ring: flags u16, idx u16, then (id u32, len u32) elements.
        mem.read_obj(q.used_addr().unchecked_add(4 + slot * 8 + 4))
            .unwrap()
    }

    fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        mem.read_obj(q.used_addr().unchecked_add(2)).unwrap()
    }

    #[test]
    fn hostile_transmit_chains_are_dropped_and_requests_get_answers() {
        let dir = std::env::temp_dir().join(format!("vmm-vsockdev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let evq = MockSplitQueue::create(&mem, GuestAddress(0x3_0000), 16);
        let mut dev = Vsock::new(CID, &dir.join("v.sock")).unwrap();
        let irq = EventFd::new(vmm_os::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(Box::new(EventFdLine(irq))));
        let queues = vec![
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            evq.create_queue().unwrap(),
        ];
        dev.activate(mem.clone(), interrupt, queues).unwrap();

        // 1: a header cut short. 2: a length past the buffers. 3: a length
        // past the packet bound. 4: a buffer outside guest memory.
        let req = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 4242,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: 4096,
            ..Default::default()
        };
        let mut long = req;
        long.op = OP_RW;
        long.len = 1000;
        mem.write_slice(&long.to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        let mut huge = long;
        huge.len = u32::MAX;
        mem.write_slice(&huge.to_bytes(), GuestAddress(0x10_1000))
            .unwrap();
        mem.write_slice(&req.to_bytes(), GuestAddress(0x10_2000))
            .unwrap();
        let mut descs = chain(&[(0x10_0000, 10, false)]);
        descs.extend(chain(&[(0x10_0000, 44, false), (0x10_3000, 16, false)]));
        descs.extend(chain(&[(0x10_1000, 44, false)]));
        descs.extend(chain(&[(0x1f_ff00, 0x1000, false)]));
        // 5: a valid REQUEST to a port nobody listens on.
        descs.extend(chain(&[(0x10_2000, 44, false)]));
        txq.add_desc_chains(&descs, 0).unwrap();
        dev.process_queue(TX);
        assert_eq!(used_idx(&mem, &txq), 5, "every chain is completed");

        // The refused REQUEST is answered with RST once the guest posts a
        // receive buffer; a buffer too small for a header is returned empty.
        rxq.add_desc_chains(&chain(&[(0x11_0000, 8, true)]), 0)
            .unwrap();
        rxq.add_desc_chains(&chain(&[(0x12_0000, 4096, true)]), 1)
            .unwrap();
        dev.process_queue(RX);
        assert_eq!(used_idx(&mem, &rxq), 2);
        assert_eq!(used_len(&mem, &rxq, 0), 0);
        assert_eq!(used_len(&mem, &rxq, 1), HDR_LEN as u32);
        let mut raw = [0u8; HDR_LEN];
        mem.read_slice(&mut raw, GuestAddress(0x12_0000)).unwrap();
        let rst = Header::parse(&raw);
        assert_eq!(
            (rst.op, rst.dst_port, rst.src_port, rst.dst_cid),
            (OP_RST, 5000, 4242, CID)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
