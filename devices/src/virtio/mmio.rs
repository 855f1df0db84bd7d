//! The virtio-mmio transport, version 2 (virtio 1.x), one 4 KiB page per
//! device. The Linux driver finds it through `virtio_mmio.device=` on the
//! kernel command line.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Drained, Interrupt, QueueSnapshot, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of one device's register page.
pub const MMIO_LEN: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4d4d_5652; // "RVMM"

// Register offsets (virtio 1.2, 4.2.2); public for drivers in tests and
// fuzz targets.
pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// The offset of the queue-notify register, for ioeventfd registration.
pub const NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;

/// The transport's saved registers and queues.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state, for devices that have some to carry
    /// (`VirtioDevice::save_device`).
    #[serde(default)]
    pub device: Option<super::DeviceState>,
}

/// Why a saved transport cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the saved virtio device has type {saved}, this one {found}")]
    DeviceType { saved: u32, found: u32 },
    #[error("the saved virtio device has {saved} queues, this one {found}")]
    QueueCount { saved: usize, found: usize },
    #[error("saved virtio queue {0} is not valid")]
    BadQueue(usize),
    #[error("the restored virtio device did not start: {0}")]
    Activate(#[from] super::ActivateError),
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect()
    }

    /// Number of queues (one notification eventfd each).
    pub fn queue_count(&self) -> usize {
        self.device.queue_max_sizes().len()
    }

    /// Whether the driver started the device.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Saves the registers, the queues and the device's own state (for
    /// most devices that is their configuration plus what
    /// `VirtioDevice::restored` re-creates).
    pub fn save(&self) -> TransportSnapshot {
        let queues = if self.activated {
            self.device.queue_snapshots()
        } else {
            self.queues.iter().map(QueueSnapshot::of).collect()
        };
        TransportSnapshot {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues,
            device: self.device.save_device(),
        }
    }

    /// Restores a fresh transport (same device kind) to a saved state; an
    /// activated device is activated again with its saved queues. Then call
    /// `finish_restore`.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), RestoreError> {
        let found = self.device.device_type();
        if s.device_type != found {
            return Err(RestoreError::DeviceType {
                saved: s.device_type,
                found,
            });
        }
        if s.queues.len() != self.queue_count() {
            return Err(RestoreError::QueueCount {
                saved: s.queues.len(),
                found: self.queue_count(),
            });
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            let queue = q.to_queue().ok_or(RestoreError::BadQueue(i))?;
            if s.activated && queue.ready() && !queue.is_valid(&self.mem) {
                return Err(RestoreError::BadQueue(i));
            }
            queues.push(queue);
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.interrupt.set_status(s.interrupt_status);
        if let Some(state) = &s.device {
            self.device.restore_device(state)?;
        }
        if s.activated {
            self.device.ack_features(s.driver_features);
            self.device
                .activate(self.mem.clone(), self.interrupt.clone(), queues)?;
            self.activated = true;
        } else {
            self.queues = queues;
        }
        Ok(())
    }

    /// Tells a restored, running device that the machine is about to run
    /// (`VirtioDevice::restored`). Call it once the vCPUs and interrupt
    /// controllers have their state, so interrupts it raises are kept.
    pub fn finish_restore(&mut self) {
        if self.activated {
            self.device.restored();
        }
    }

    /// The driver notified queue `index` (through the ioeventfd or a trapped
    /// write). Ignored until the device runs. [`Drained::Budget`]: call
    /// again after serving other events.
    pub fn process_queue(&mut self, index: usize) -> Drained {
        if self.activated && index < self.queue_count() {
            self.device.process_queue(index)
        } else {
            Drained::All
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn fail(&mut self, why: &str) {
        tracing::warn!(
            "virtio device {} needs a reset: {why}",
            self.device.device_type()
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (besides a reset).
        let added = value & !self.status;
        if value & self.status != self.status {
            self.fail("the driver cleared status bits without a reset");
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                // Leave FEATURES_OK unset: the driver sees the refusal.
                self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        self.status = value;
        let ready = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && value & ready == ready && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
        {
            self.fail(&format!("queue {i} is not valid"));
            return;
        }
        // The queues move to the device; a reset makes fresh ones.
        let queues = std::mem::take(&mut self.queues);
        match self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
        {
            Ok(()) => self.activated = true,
            Err(e) => self.fail(&e.to_string()),
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        // Queue and feature setup is only allowed before the device runs.
        let setting_up = !self.activated && self.status & VIRTIO_CONFIG_S_FAILED == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if setting_up => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            REG_QUEUE_READY if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if setting_up =>
            {
                if let Some(q) = self.selected_queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(value), None)
                    } else {
                        (None, Some(value))
                    };
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            // A trapped notification (no ioeventfd): served here, on the
            // vCPU thread, with nothing else waiting on this loop. A queue
            // a rate limit holds waits for the next notification (the VMM
            // gives every queue an ioeventfd, whose loop has the timer).
            REG_QUEUE_NOTIFY => while self.process_queue(value as usize) == Drained::Budget {},
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => tracing::debug!("virtio-mmio: ignored write of {value:#x} at {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::EventFdLine;
    use crate::virtio::ActivateError;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;
    use vmm_os::EventFd;

    #[derive(Default)]
    struct Log {
        acked: u64,
        activated: usize,
        queues: Vec<QueueSnapshot>,
        notified: Vec<usize>,
        resets: usize,
    }

    struct Dummy(Arc<Mutex<Log>>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 1
        }
        fn ack_features(&mut self, features: u64) {
            self.0.lock().unwrap().acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[7, 8], offset, data);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _interrupt: Arc<Interrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            let mut log = self.0.lock().unwrap();
            log.activated = queues.len();
            log.queues = queues.iter().map(QueueSnapshot::of).collect();
            Ok(())
        }
        fn process_queue(&mut self, index: usize) -> Drained {
            self.0.lock().unwrap().notified.push(index);
            Drained::All
        }
        fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
            self.0.lock().unwrap().queues.clone()
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Log>>, EventFd) {
        let log = Arc::new(Mutex::new(Log::default()));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(vmm_os::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(Box::new(EventFdLine(
            irq.try_clone().unwrap(),
        ))));
        (
            MmioTransport::new(Box::new(Dummy(log.clone())), mem, interrupt),
            log,
            irq,
        )
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Sets up both queues at valid addresses, as the Linux driver does.
    fn setup_queues(t: &mut MmioTransport) {
        for (i, base) in [(0u32, 0x1_0000u32), (1, 0x2_0000)] {
            write(t, REG_QUEUE_SEL, i);
            assert_eq!(read(t, REG_QUEUE_NUM_MAX), 16);
            write(t, REG_QUEUE_NUM, 16);
            write(t, REG_QUEUE_DESC_LOW, base);
            write(t, REG_QUEUE_DRIVER_LOW, base + 0x1000);
            write(t, REG_QUEUE_DEVICE_LOW, base + 0x2000);
            write(t, REG_QUEUE_READY, 1);
        }
    }

    fn drive_to(t: &mut MmioTransport, features_hi: u32) {
        write(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write(
            t,
            REG_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, features_hi);
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, 1);
        write(
            t,
            REG_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _, _) = transport();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 42);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1);
        let mut cfg = [0u8; 4];
        t.read(CONFIG_SPACE, &mut cfg);
        assert_eq!(cfg, [7, 8, 0, 0]);
        // Odd-sized or unaligned register accesses read as zero.
        let mut two = [0xffu8; 2];
        t.read(REG_MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
    }

    #[test]
    fn full_handshake_activates_and_forwards_notifications() {
        let (mut t, log, _irq) = transport();
        setup_queues(&mut t);
        drive_to(&mut t, 1);
        assert_ne!(read(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        write(&mut t, REG_QUEUE_NOTIFY, 1);
        assert!(log.lock().unwrap().notified.is_empty(), "not running yet");
        let status = read(&mut t, REG_STATUS) | VIRTIO_CONFIG_S_DRIVER_OK;
        write(&mut t, REG_STATUS, status);
        assert!(t.is_activated());
        assert_eq!(log.lock().unwrap().activated, 2);
        assert_eq!(log.lock().unwrap().acked, (1 << VIRTIO_F_VERSION_1) | 1);
        write(&mut t, REG_QUEUE_NOTIFY, 1);
        write(&mut t, REG_QUEUE_NOTIFY, 7); // no such queue: ignored
        assert_eq!(log.lock().unwrap().notified, vec![1]);
        // Reset.
        write(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(log.lock().unwrap().resets, 1);
        assert_eq!(read(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn driver_without_version_1_is_refused() {
        let (mut t, _, _) = transport();
        drive_to(&mut t, 0);
        assert_eq!(read(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn bad_queue_addresses_mark_the_device_broken() {
        let (mut t, log, irq) = transport();
        write(&mut t, REG_QUEUE_SEL, 0);
        write(&mut t, REG_QUEUE_NUM, 16);
        // Rings past the end of guest memory.
        write(&mut t, REG_QUEUE_DESC_LOW, 0xfff0_0000);
        write(&mut t, REG_QUEUE_DRIVER_LOW, 0xfff1_0000);
        write(&mut t, REG_QUEUE_DEVICE_LOW, 0xfff2_0000);
        write(&mut t, REG_QUEUE_READY, 1);
        drive_to(&mut t, 1);
        let status = read(&mut t, REG_STATUS) | VIRTIO_CONFIG_S_DRIVER_OK;
        write(&mut t, REG_STATUS, status);
        assert!(!t.is_activated());
        assert_eq!(log.lock().unwrap().activated, 0);
        assert_ne!(read(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_ne!(
            read(&mut t, REG_INTERRUPT_STATUS) & super::super::INT_CONFIG,
            0
        );
        assert!(irq.read().is_ok());
        write(&mut t, REG_INTERRUPT_ACK, super::super::INT_CONFIG);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_setup_after_activation_is_ignored() {
        let (mut t, _, _) = transport();
        setup_queues(&mut t);
        drive_to(&mut t, 1);
        let status = read(&mut t, REG_STATUS) | VIRTIO_CONFIG_S_DRIVER_OK;
        write(&mut t, REG_STATUS, status);
        write(&mut t, REG_QUEUE_SEL, 0);
        write(&mut t, REG_QUEUE_NUM, 2);
        assert_eq!(
            read(&mut t, REG_QUEUE_NUM_MAX),
            0,
            "queues belong to the device now"
        );
        write(&mut t, REG_STATUS, 0);
        assert_eq!(
            read(&mut t, REG_QUEUE_NUM_MAX),
            16,
            "a reset gives fresh queues"
        );
    }

    #[test]
    fn saved_transport_restores_and_bad_states_are_refused() {
        let (mut t, _, _irq) = transport();
        setup_queues(&mut t);
        drive_to(&mut t, 1);
        let status = read(&mut t, REG_STATUS) | VIRTIO_CONFIG_S_DRIVER_OK;
        write(&mut t, REG_STATUS, status);
        let saved = t.save();
        assert!(saved.activated);
        assert_eq!(saved.queues.len(), 2);
        assert_eq!(saved.queues[1].desc_table, 0x2_0000);

        let (mut back, log, _irq2) = transport();
        back.restore(&saved).unwrap();
        back.finish_restore();
        assert!(back.is_activated());
        assert_eq!(read(&mut back, REG_STATUS), status);
        assert_eq!(log.lock().unwrap().activated, 2);
        assert_eq!(back.save().queues, saved.queues);

        let refused = |s: &TransportSnapshot| transport().0.restore(s).is_err();
        let mut wrong_type = saved.clone();
        wrong_type.device_type = 1;
        assert!(refused(&wrong_type));
        let mut short = saved.clone();
        short.queues.pop();
        assert!(refused(&short));
        let mut bad_size = saved.clone();
        bad_size.queues[0].size = 3;
        assert!(refused(&bad_size));
        let mut outside = saved;
        outside.queues[1].desc_table = 1 << 40;
        assert!(refused(&outside));
    }
}
