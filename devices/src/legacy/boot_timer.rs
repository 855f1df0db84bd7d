//! Boot timer: the guest's init writes `BOOT_TIMER_MAGIC` to this MMIO page
//! as its first act; the VMM records the time since its own process start.

use crate::sync::Locked;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// The byte the guest writes at offset 0 of the device.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Time from VMM start to the guest's write (None until it happens).
pub type BootTime = Arc<Mutex<Option<Duration>>>;

pub struct BootTimer {
    start: Instant,
    booted: BootTime,
}

impl BootTimer {
    pub const LEN: u64 = 0x1000;

    /// `start` is the VMM's process start.
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            booted: Arc::default(),
        }
    }

    pub fn handle(&self) -> BootTime {
        self.booted.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            let elapsed = self.start.elapsed();
            let mut slot = self.booted.locked();
            if slot.is_none() {
                tracing::info!(
                    "guest init started {:.1} ms after VMM start",
                    elapsed.as_secs_f64() * 1000.0
                );
                *slot = Some(elapsed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_magic_write_only() {
        let mut t = BootTimer::new(Instant::now());
        let h = t.handle();
        t.write(0, &[1]);
        t.write(8, &[BOOT_TIMER_MAGIC]);
        assert!(h.lock().unwrap().is_none());
        t.write(0, &[BOOT_TIMER_MAGIC]);
        let first = h.lock().unwrap().unwrap();
        t.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(h.lock().unwrap().unwrap(), first);
    }
}
