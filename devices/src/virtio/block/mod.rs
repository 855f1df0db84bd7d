//! virtio-blk over a [`disk::LayeredDisk`]: one request queue, read, write,
//! flush and get-id requests, an optional read-only mode.
//!
//! Request handling (`handle_chain`) works on guest memory and a disk only,
//! so it is unit-tested on mock guest memory with hostile chains.
//!
//! A [`RateLimiter`] may hold requests: each costs its data bytes and one
//! operation, and one the limiter refuses stays in the ring, with the
//! requests behind it, until the limiter allows it.

pub mod disk;

use crate::sync::Locked;
use std::io::{Read, Write};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use crate::rate_limit::{RateLimitConfig, RateLimiter};

use super::{
    process_requests, read_config_bytes, ActivateError, Drained, Interrupt, QueueSnapshot, Running,
    VirtioDevice, VIRTIO_F_VERSION_1,
};
pub use disk::LayeredDisk;

/// A disk shared between the device and the VMM (which copies its layers
/// when the VM forks or is snapshotted).
pub type SharedDisk = std::sync::Arc<std::sync::Mutex<LayeredDisk>>;

const QUEUE_SIZE: u16 = 256;
const SECTOR_SIZE: u64 = 512;
/// Largest data transfer of one request (the guest's max_sectors default is
/// far below): a bound on what a hostile chain can make the VMM buffer.
const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Length of the GET_ID answer.
const ID_BYTES: usize = 20;

/// The virtio-blk device.
pub struct Block {
    disk: SharedDisk,
    id: String,
    queue_sizes: [u16; 1],
    running: Option<Running>,
    limiter: RateLimiter,
}

impl Block {
    /// `id` is what the guest reads as the serial (`/sys/block/vda/serial`).
    pub fn new(disk: SharedDisk, id: &str) -> Self {
        Block {
            disk,
            id: id.chars().take(ID_BYTES).collect(),
            queue_sizes: [QUEUE_SIZE],
            running: None,
            limiter: RateLimiter::default(),
        }
    }

    /// Limits the guest's requests (bytes and requests per time).
    pub fn with_rate_limit(mut self, limit: &RateLimitConfig) -> Self {
        self.limiter = RateLimiter::new(limit);
        self
    }

    fn disk(&self) -> std::sync::MutexGuard<'_, LayeredDisk> {
        self.disk.locked()
    }

    fn config(&self) -> [u8; 8] {
        (self.disk().size() / SECTOR_SIZE).to_le_bytes()
    }
}

/// Outcome of one request: the status byte and how many bytes were written
/// into the guest's buffers (status byte included).
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub used_len: u32,
}

/// Handles one request chain. Returns None when the chain is too malformed
/// to carry a status (then the request is completed with length 0).
pub fn handle_chain<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    disk: &mut LayeredDisk,
    id: &str,
) -> Option<Completion>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let mut reader = Reader::new(mem, chain.clone()).ok()?;
    let mut writer = Writer::new(mem, chain).ok()?;
    // The status byte is the last writable byte.
    let writable = writer.available_bytes();
    if writable == 0 {
        return None;
    }
    let mut status_writer = writer.split_at(writable - 1).ok()?;
    let mut data_writer = writer;

    let status = match request(&mut reader, &mut data_writer, disk, id) {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(status) => status,
    } as u8;
    status_writer.write_all(&[status]).ok()?;
    Some(Completion {
        status,
        used_len: data_writer.bytes_written() as u32 + 1,
    })
}

/// What a request costs a rate limit: its data bytes (every byte of the
/// chain but the 16-byte header and the status byte, at most what one
/// request may move).
pub fn request_cost<M>(chain: &DescriptorChain<M>) -> u64
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let total = chain
        .clone()
        .fold(0u64, |sum, d| sum.saturating_add(u64::from(d.len())));
    total.saturating_sub(17).min(MAX_REQUEST_BYTES as u64)
}

/// A data length must be whole sectors and within the per-request bound.
fn check_len(len: usize) -> Result<usize, u32> {
    if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    Ok(len)
}

fn request(
    reader: &mut Reader<'_, ()>,
    writer: &mut Writer<'_, ()>,
    disk: &mut LayeredDisk,
    id: &str,
) -> Result<(), u32> {
    let mut header = [0u8; 16];
    reader
        .read_exact(&mut header)
        .map_err(|_| VIRTIO_BLK_S_IOERR)?;
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(VIRTIO_BLK_S_IOERR)?;
    let io_err = |e: std::io::Error| {
        tracing::debug!("virtio-blk request failed: {e}");
        VIRTIO_BLK_S_IOERR
    };
    match kind {
        VIRTIO_BLK_T_IN => {
            let len = check_len(writer.available_bytes())?;
            let mut buf = vec![0u8; len];
            disk.read_at(&mut buf, offset).map_err(io_err)?;
            writer.write_all(&buf).map_err(io_err)
        }
        VIRTIO_BLK_T_OUT => {
            let len = check_len(reader.available_bytes())?;
            let mut buf = vec![0u8; len];
            reader.read_exact(&mut buf).map_err(io_err)?;
            disk.write_at(&buf, offset).map_err(io_err)
        }
        VIRTIO_BLK_T_FLUSH => disk.flush().map_err(io_err),
        VIRTIO_BLK_T_GET_ID => {
            let mut answer = [0u8; ID_BYTES];
            let bytes = id.as_bytes();
            answer[..bytes.len().min(ID_BYTES)]
                .copy_from_slice(&bytes[..bytes.len().min(ID_BYTES)]);
            let len = writer.available_bytes().min(ID_BYTES);
            writer.write_all(&answer[..len]).map_err(io_err)
        }
        _ => Err(VIRTIO_BLK_S_UNSUPP),
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH);
        if self.disk().is_read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    // Nothing depends on the negotiated features: flush is always served and
    // a read-only disk refuses writes whatever the driver accepted.
    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.running = Some(Running::new(mem, interrupt, queues, 1)?);
        Ok(())
    }

    fn process_queue(&mut self, _index: usize) -> Drained {
        let Some(run) = self.running.as_mut() else {
            return Drained::All;
        };
        let mut disk = self.disk.locked();
        let id = &self.id;
        let limiter = &mut self.limiter;
        let done = process_requests(
            &mut run.queues[0],
            &run.mem,
            run.interrupt.as_ref(),
            |chain| {
                if !limiter.is_unlimited() {
                    limiter.consume(request_cost(&chain), 1)?;
                }
                let head = chain.head_index();
                Ok(match handle_chain(&run.mem, chain, &mut disk, id) {
                    Some(c) => c.used_len,
                    None => {
                        tracing::warn!("virtio-blk: malformed request chain {head} from the guest");
                        0
                    }
                })
            },
        );
        drop(disk);
        done.unwrap_or_else(|_| {
            tracing::warn!("virtio-blk: the used ring is broken; the queue stops");
            self.running = None;
            Drained::All
        })
    }

    fn reset(&mut self) {
        self.running = None;
    }

    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        Running::queue_snapshots(self.running.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Address, Bytes, GuestAddress};

    struct Fixture {
        _dir: PathGuard,
        disk: LayeredDisk,
        mem: GuestMemoryMmap,
    }

    struct PathGuard(std::path::PathBuf);
    impl Drop for PathGuard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fixture(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("vmm-blk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base");
        // 64 blocks of 4 KiB: the layer bitmap is exactly one word.
        std::fs::write(&base, vec![0x11u8; 256 * 1024]).unwrap();
        let disk = LayeredDisk::open(&base, None, false).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Fixture {
            _dir: PathGuard(dir),
            disk,
            mem,
        }
    }

    /// Builds a chain from (address, length, device-writable) descriptors and
    /// runs it through `handle_chain`.
    fn run(f: &mut Fixture, descs: &[(u64, u32, bool)]) -> Option<Completion> {
        let q = MockSplitQueue::new(&f.mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = 0;
                if w {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                if i + 1 < descs.len() {
                    flags |= virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (i + 1) as u16))
            })
            .collect();
        q.build_desc_chain(&raw).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&f.mem).unwrap();
        let id = "disk0".to_string();
        handle_chain(&f.mem, chain, &mut f.disk, &id)
    }

    fn header(f: &Fixture, addr: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        f.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn write_then_read_back() {
        let mut f = fixture("rw");
        header(&f, 0x1000, VIRTIO_BLK_T_OUT, 2);
        f.mem
            .write_slice(&[0xab; 1024], GuestAddress(0x2000))
            .unwrap();
        let c = run(
            &mut f,
            &[
                (0x1000, 16, false),
                (0x2000, 1024, false),
                (0x3000, 1, true),
            ],
        );
        assert_eq!(
            c,
            Some(Completion {
                status: 0,
                used_len: 1
            })
        );
        header(&f, 0x1000, VIRTIO_BLK_T_IN, 2);
        let c = run(
            &mut f,
            &[(0x1000, 16, false), (0x4000, 1536, true), (0x3000, 1, true)],
        );
        assert_eq!(
            c,
            Some(Completion {
                status: 0,
                used_len: 1537
            })
        );
        let mut back = [0u8; 1536];
        f.mem.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert!(back[..1024].iter().all(|&b| b == 0xab));
        assert!(back[1024..].iter().all(|&b| b == 0x11));
    }

    #[test]
    fn requests_past_the_end_fail_with_ioerr() {
        let mut f = fixture("end");
        header(&f, 0x1000, VIRTIO_BLK_T_IN, 511); // last sector: 512 bytes ok, 1024 not
        let c = run(
            &mut f,
            &[(0x1000, 16, false), (0x4000, 1024, true), (0x3000, 1, true)],
        );
        assert_eq!(c.unwrap().status, VIRTIO_BLK_S_IOERR as u8);
        header(&f, 0x1000, VIRTIO_BLK_T_OUT, u64::MAX / 2);
        let c = run(
            &mut f,
            &[(0x1000, 16, false), (0x2000, 512, false), (0x3000, 1, true)],
        );
        assert_eq!(c.unwrap().status, VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn empty_writes_at_the_first_and_past_the_last_sector_complete() {
        let mut f = fixture("empty");
        // Sector 512 is the capacity: a zero-length write there once indexed
        // the layer bitmap out of bounds (and aborted the VMM).
        for sector in [0, 511, 512] {
            header(&f, 0x1000, VIRTIO_BLK_T_OUT, sector);
            let c = run(&mut f, &[(0x1000, 16, false), (0x3000, 1, true)]);
            assert_eq!(c.unwrap().status, VIRTIO_BLK_S_OK as u8, "sector {sector}");
            header(&f, 0x1000, VIRTIO_BLK_T_IN, sector);
            let c = run(&mut f, &[(0x1000, 16, false), (0x3000, 1, true)]);
            assert_eq!(c.unwrap().status, VIRTIO_BLK_S_OK as u8, "sector {sector}");
        }
        header(&f, 0x1000, VIRTIO_BLK_T_OUT, 513);
        let c = run(&mut f, &[(0x1000, 16, false), (0x3000, 1, true)]);
        assert_eq!(c.unwrap().status, VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn hostile_chains_fail_the_request_not_the_vmm() {
        let mut f = fixture("hostile");
        // Buffer past the end of guest memory.
        header(&f, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(
                &mut f,
                &[
                    (0x1000, 16, false),
                    (0xffff_0000, 4096, true),
                    (0x3000, 1, true)
                ]
            ),
            None
        );
        // No writable descriptor for the status.
        assert_eq!(run(&mut f, &[(0x1000, 16, false)]), None);
        // Header shorter than 16 bytes.
        let c = run(&mut f, &[(0x1000, 8, false), (0x3000, 1, true)]);
        assert_eq!(c.unwrap().status, VIRTIO_BLK_S_IOERR as u8);
        // Unknown request type.
        header(&f, 0x1000, 0x77, 0);
        let c = run(&mut f, &[(0x1000, 16, false), (0x3000, 1, true)]);
        assert_eq!(c.unwrap().status, VIRTIO_BLK_S_UNSUPP as u8);
        // Data length not a multiple of the sector size.
        header(&f, 0x1000, VIRTIO_BLK_T_IN, 0);
        let c = run(
            &mut f,
            &[(0x1000, 16, false), (0x4000, 100, true), (0x3000, 1, true)],
        );
        assert_eq!(c.unwrap().status, VIRTIO_BLK_S_IOERR as u8);
        // A length that wraps the address space.
        assert_eq!(
            run(
                &mut f,
                &[
                    (0x1000, 16, false),
                    (u64::MAX - 10, 0xffff_ffff, true),
                    (0x3000, 1, true)
                ]
            ),
            None
        );
    }

    #[test]
    fn a_rate_limit_holds_requests_in_the_ring_until_it_allows_them() {
        let f = fixture("limit");
        let q = MockSplitQueue::new(&f.mem, 16);
        // Three reads of 1536 bytes under 2048 bytes per 10 s.
        let mut raw = Vec::new();
        for i in 0..3u64 {
            let hdr = 0x1000 + i * 0x100;
            header(&f, hdr, VIRTIO_BLK_T_IN, i * 2);
            let w = VRING_DESC_F_WRITE as u16;
            let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
            let at = raw.len() as u16;
            raw.push(RawDescriptor::from(SplitDescriptor::new(
                hdr,
                16,
                next,
                at + 1,
            )));
            raw.push(RawDescriptor::from(SplitDescriptor::new(
                0x4000 + i * 0x1000,
                1536,
                w | next,
                at + 2,
            )));
            raw.push(RawDescriptor::from(SplitDescriptor::new(
                0x3000 + i,
                1,
                w,
                0,
            )));
        }
        q.add_desc_chains(&raw, 0).unwrap();
        let limit = RateLimitConfig {
            bandwidth: Some(crate::rate_limit::BucketConfig {
                size: 2048,
                refill_time_ms: 10_000,
            }),
            ops: None,
        };
        let mut dev =
            Block::new(Arc::new(std::sync::Mutex::new(f.disk)), "d").with_rate_limit(&limit);
        let irq = vmm_os::EventFd::new(vmm_os::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(Box::new(crate::EventFdLine(irq))));
        dev.activate(f.mem.clone(), interrupt, vec![q.create_queue().unwrap()])
            .unwrap();
        let Drained::Throttled(wait) = dev.process_queue(0) else {
            panic!("the third read is held");
        };
        // The second read went ahead into debt: 1024 bytes of it and one
        // token at 204.8 bytes per second.
        assert!(
            (Duration::from_millis(5000)..=Duration::from_millis(5010)).contains(&wait),
            "{wait:?}"
        );
        let used = |mem: &GuestMemoryMmap| -> u16 {
            mem.read_obj(q.used_addr().checked_add(2).unwrap()).unwrap()
        };
        assert_eq!(
            used(&f.mem),
            2,
            "two reads done, the third still in the ring"
        );
        // Asked again too early, the queue is still held and nothing moves.
        assert!(matches!(dev.process_queue(0), Drained::Throttled(_)));
        assert_eq!(used(&f.mem), 2);
    }

    #[test]
    fn flush_and_get_id() {
        let mut f = fixture("flush");
        header(&f, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let c = run(&mut f, &[(0x1000, 16, false), (0x3000, 1, true)]);
        assert_eq!(c.unwrap().status, 0);
        header(&f, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let c = run(
            &mut f,
            &[(0x1000, 16, false), (0x4000, 20, true), (0x3000, 1, true)],
        );
        assert_eq!(c.unwrap().used_len, 21);
        let mut id = [0u8; 5];
        f.mem.read_slice(&mut id, GuestAddress(0x4000)).unwrap();
        assert_eq!(&id, b"disk0");
    }
}
