//! ioeventfds, which Hypervisor.framework lacks: the vCPU loop looks up
//! each MMIO write here, and a match signals its event instead of
//! reaching the device on the bus (a virtio queue notification then costs
//! no lock of the device).

/// Registered (address, value to match, event) triples.
#[derive(Debug)]
pub struct IoEvents<T> {
    entries: Vec<(u64, Option<u32>, T)>,
}

impl<T> Default for IoEvents<T> {
    fn default() -> Self {
        IoEvents {
            entries: Vec::new(),
        }
    }
}

impl<T> IoEvents<T> {
    /// Adds an event for writes to `addr` (of `datamatch` only, if given).
    pub fn add(&mut self, addr: u64, datamatch: Option<u32>, event: T) {
        self.entries.push((addr, datamatch, event));
    }

    /// The event a write of `data` to `addr` signals. A `datamatch` entry
    /// matches 4-byte writes of that value only, as a KVM ioeventfd with a
    /// 4-byte length does.
    pub fn find(&self, addr: u64, data: &[u8]) -> Option<&T> {
        self.entries
            .iter()
            .find(|(a, datamatch, _)| {
                *a == addr
                    && match datamatch {
                        None => true,
                        Some(want) => {
                            <[u8; 4]>::try_from(data).is_ok_and(|d| u32::from_le_bytes(d) == *want)
                        }
                    }
            })
            .map(|(_, _, event)| event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_address_and_value() {
        let mut events = IoEvents::default();
        events.add(0x1000, Some(2), "queue 2");
        events.add(0x1000, Some(0), "queue 0");
        events.add(0x2000, None, "any");
        assert_eq!(events.find(0x1000, &2u32.to_le_bytes()), Some(&"queue 2"));
        assert_eq!(events.find(0x1000, &0u32.to_le_bytes()), Some(&"queue 0"));
        assert_eq!(events.find(0x1000, &1u32.to_le_bytes()), None);
        // A datamatch entry needs a 4-byte write.
        assert_eq!(events.find(0x1000, &[2]), None);
        assert_eq!(events.find(0x1000, &2u64.to_le_bytes()), None);
        assert_eq!(events.find(0x2000, &[7]), Some(&"any"));
        assert_eq!(events.find(0x2004, &[7]), None);
    }
}
