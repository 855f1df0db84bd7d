//! A virtio driver that the fuzzer steers: it sets a device up through its
//! MMIO registers as Linux does, then turns the input into register
//! accesses, raw guest-memory writes and descriptor chains.
//!
//! Input format (a sequence of records, each starting with a tag byte;
//! `tools/fuzz-seeds.py` writes seeds in it):
//! - `0`: a chain: queue (1 byte), descriptor count - 1 (1 byte, at most
//!   8), then per descriptor a flags byte (bit 0: device-writable), a
//!   length (u16 LE, at most 4096) and, for a driver-written descriptor,
//!   its bytes (what the input has left, up to the length); the driver
//!   places the buffers, publishes the chain and notifies the queue;
//! - `1`: a register write: offset (u16 LE), value (u32 LE);
//! - `2`: a register read: offset (u16 LE);
//! - `3`: a raw write to guest memory: address (u16 LE), length (1 byte),
//!   bytes (rings and descriptor tables live below 0x4000);
//! - `4`: the standard set-up again (after a reset, say).

use std::sync::Arc;

use devices::virtio::mmio::{
    MmioTransport, NOTIFY_OFFSET, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DRIVER_LOW, REG_QUEUE_NUM, REG_QUEUE_NUM_MAX, REG_QUEUE_READY, REG_QUEUE_SEL,
    REG_STATUS,
};
use devices::virtio::{Drained, Interrupt, VirtioDevice};
use devices::{BusDevice, EventFdLine};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 1 << 20;
/// Queue `q`'s descriptor table; its available ring at +0x400 and used
/// ring at +0x800.
const QUEUE_BASE: u64 = 0x1000;
const QUEUE_STRIDE: u64 = 0x1000;
const QUEUE_SIZE: u16 = 16;
/// Where the driver puts the buffers of its chains (a ring it wraps in).
const DATA_START: u64 = 0x8000;
const DATA_END: u64 = MEM_SIZE as u64;
const MAX_DESC_LEN: usize = 4096;
/// How often a queue is served after a notification before the driver
/// moves on (a device that keeps answering Budget must still finish).
const MAX_RUNS: usize = 64;

/// The driver of one device, over its own guest memory.
pub struct Driver {
    pub transport: MmioTransport,
    pub mem: GuestMemoryMmap,
    queues: usize,
    /// Per queue: the next free descriptor and the available index.
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
    data_at: u64,
}

/// Reads input bytes front to back; past the end everything is zero.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>) -> Driver {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("guest memory for the fuzz driver");
        let line = EventFdLine(EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"));
        let interrupt = Arc::new(Interrupt::new(Box::new(line)));
        let queues = device.queue_max_sizes().len();
        let transport = MmioTransport::new(device, mem.clone(), interrupt);
        Driver {
            transport,
            mem,
            queues,
            next_desc: vec![0; queues],
            avail_idx: vec![0; queues],
            data_at: DATA_START,
        }
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut v = [0u8; 4];
        self.transport.read(offset, &mut v);
        u32::from_le_bytes(v)
    }

    /// Linux's set-up: reset, acknowledge, take every offered feature,
    /// place every queue, start the device.
    pub fn setup(&mut self) {
        self.write_reg(REG_STATUS, 0);
        self.write_reg(REG_STATUS, ACKNOWLEDGE | DRIVER);
        for sel in 0..2 {
            self.write_reg(REG_DEVICE_FEATURES_SEL, sel);
            let offered = self.read_reg(REG_DEVICE_FEATURES);
            self.write_reg(REG_DRIVER_FEATURES_SEL, sel);
            self.write_reg(REG_DRIVER_FEATURES, offered);
        }
        self.write_reg(REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        for q in 0..self.queues {
            self.write_reg(REG_QUEUE_SEL, q as u32);
            let max = self.read_reg(REG_QUEUE_NUM_MAX);
            self.write_reg(REG_QUEUE_NUM, max.min(u32::from(QUEUE_SIZE)));
            let base = QUEUE_BASE + q as u64 * QUEUE_STRIDE;
            for (reg, addr) in [
                (REG_QUEUE_DESC_LOW, base),
                (REG_QUEUE_DRIVER_LOW, base + 0x400),
                (REG_QUEUE_DEVICE_LOW, base + 0x800),
            ] {
                self.write_reg(reg, addr as u32);
                self.write_reg(reg + 4, 0);
            }
            self.write_reg(REG_QUEUE_READY, 1);
        }
        self.write_reg(REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(
            self.transport.is_activated(),
            "the standard set-up did not start the device"
        );
        self.next_desc.fill(0);
        self.avail_idx.fill(0);
    }

    /// Runs every record of `input`.
    pub fn run(&mut self, mut input: Input) {
        while !input.is_empty() {
            match input.u8() % 5 {
                0 => self.chain(&mut input),
                1 => {
                    let offset = u64::from(input.u16() & 0xffc);
                    let value = input.u32();
                    self.write_reg(offset, value);
                    // A notification through the register: serve it.
                    if offset == NOTIFY_OFFSET {
                        self.serve(value as usize);
                    }
                }
                2 => {
                    let offset = u64::from(input.u16() & 0xfff);
                    let mut v = [0u8; 4];
                    self.transport.read(offset, &mut v);
                }
                3 => {
                    let addr = u64::from(input.u16());
                    let len = usize::from(input.u8());
                    let bytes = input.bytes(len).to_vec();
                    let _ = self.mem.write_slice(&bytes, GuestAddress(addr));
                }
                _ => self.setup(),
            }
        }
    }

    /// Serves queue `q` until it says it drained or is held (or `MAX_RUNS`
    /// runs).
    pub fn serve(&mut self, q: usize) {
        for _ in 0..MAX_RUNS {
            if self.transport.process_queue(q) != Drained::Budget {
                break;
            }
        }
    }

    /// Serves every queue once more (frames or packets the host side has
    /// for the guest).
    pub fn serve_all(&mut self) {
        for q in 0..self.queues {
            self.serve(q);
        }
    }

    fn chain(&mut self, input: &mut Input) {
        let q = usize::from(input.u8()) % self.queues.max(1);
        let count = usize::from(input.u8() % 8) + 1;
        let base = QUEUE_BASE + q as u64 * QUEUE_STRIDE;
        let head = self.next_desc[q];
        for i in 0..count {
            let flags = input.u8();
            let len = usize::from(input.u16()).min(MAX_DESC_LEN);
            let writable = flags & 1 != 0;
            if self.data_at + len as u64 > DATA_END {
                self.data_at = DATA_START;
            }
            let addr = self.data_at;
            self.data_at += len as u64;
            if !writable {
                let bytes = input.bytes(len).to_vec();
                let _ = self.mem.write_slice(&bytes, GuestAddress(addr));
            }
            let slot = (head + i as u16) % QUEUE_SIZE;
            let mut desc_flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = (slot + 1) % QUEUE_SIZE;
            if i + 1 < count {
                desc_flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut desc = [0u8; 16];
            desc[..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            desc[12..14].copy_from_slice(&desc_flags.to_le_bytes());
            desc[14..16].copy_from_slice(&next.to_le_bytes());
            let _ = self
                .mem
                .write_slice(&desc, GuestAddress(base + u64::from(slot) * 16));
        }
        self.next_desc[q] = (head + count as u16) % QUEUE_SIZE;
        // The available ring: flags, idx, ring[QUEUE_SIZE].
        let avail = base + 0x400;
        let idx = self.avail_idx[q];
        let entry = avail + 4 + u64::from(idx % QUEUE_SIZE) * 2;
        let _ = self.mem.write_obj(head, GuestAddress(entry));
        self.avail_idx[q] = idx.wrapping_add(1);
        let _ = self
            .mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2));
        self.serve(q);
    }
}
