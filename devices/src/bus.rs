//! The MMIO and port-I/O buses: address ranges mapped to devices.

use crate::sync::{Locked, RwLocked};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    /// Fills `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors when building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("device range {base:#x}+{len:#x} overlaps another device on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} is empty or wraps around the address space")]
    BadRange { base: u64, len: u64 },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address ranges and the devices behind them. Lookups take a read lock only.
#[derive(Default)]
pub struct Bus {
    // Start address -> (length, device).
    ranges: RwLock<BTreeMap<u64, (u64, SharedDevice)>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `base .. base + len`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(Error::BadRange { base, len });
        }
        let mut ranges = self.ranges.write_locked();
        let overlaps_prev = ranges
            .range(..=base)
            .next_back()
            .is_some_and(|(start, (l, _))| start + l > base);
        let overlaps_next = ranges.range(base..base + len).next().is_some();
        if overlaps_prev || overlaps_next {
            return Err(Error::Overlap { base, len });
        }
        ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, access_len: usize) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read_locked();
        let (start, (len, dev)) = ranges.range(..=addr).next_back()?;
        let offset = addr - start;
        // The whole access must fall inside the device's range.
        if offset.checked_add(access_len as u64)? > *len {
            return None;
        }
        Some((offset, dev.clone()))
    }

    /// Dispatches a read. Returns false (and fills `data` with ones, as an
    /// open bus reads) when no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.locked().read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.locked().write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x105, &mut buf));
        assert_eq!(buf, [5, 5]);
        assert!(bus.write(0x10e, &[1, 2]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0xe, vec![1, 2])));
    }

    #[test]
    fn misses_read_as_ones() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10)
            .unwrap();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0xff, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        // An access straddling the end of a range is not the device's.
        assert!(!bus.read(0x10e, &mut buf));
        assert!(!bus.write(0x110, &[0]));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x10f, 1),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf0, 0x11),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x0, 0),
            Err(Error::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(Error::BadRange { .. })
        ));
        bus.insert(dev(), 0x110, 0x10).unwrap();
        bus.insert(dev(), 0xf0, 0x10).unwrap();
    }
}
