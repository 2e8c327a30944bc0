//! Address buses (port I/O and MMIO) that route a vCPU's access to the device owning the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device reachable at a range of guest I/O ports or MMIO addresses.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Another device already owns part of the range.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A shared handle on a device placed on a bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Slot {
    len: u64,
    device: SharedBusDevice,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by the range's first address.
    slots: BTreeMap<u64, Slot>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_before = self
            .slots
            .range(..end)
            .next_back()
            .is_some_and(|(&b, s)| b + s.len > base);
        if overlaps_before {
            return Err(BusError::Overlap { base, len });
        }
        self.slots.insert(base, Slot { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Slot, u64)> {
        let (&base, slot) = self.slots.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(size as u64)? <= slot.len).then_some((slot, offset))
    }

    /// Routes a read; returns false (and leaves `data` alone) when no device owns the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                lock(&slot.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false when no device owns the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                lock(&slot.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on if another thread panicked while holding it: device state is
/// plain register values, never left half-updated across a panic point that matters.
fn lock(device: &SharedBusDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last_write: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder {
            last_write: Vec::new(),
        }))
    }

    #[test]
    fn routes_by_offset() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, vec![(7, vec![7])]);
    }

    #[test]
    fn misses_outside_and_across_the_end() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x60, 5).unwrap();
        let mut b = [0u8; 2];
        assert!(!bus.read(0x5f, &mut b[..1]));
        assert!(!bus.read(0x65, &mut b[..1]));
        // Starts inside, ends past the range.
        assert!(!bus.read(0x64, &mut b));
        assert!(!bus.write(u64::MAX, &[1, 2]));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        assert!(bus.insert(recorder(), 0x10f, 1).is_err());
        assert!(bus.insert(recorder(), 0xf8, 0x9).is_err());
        assert!(bus.insert(recorder(), 0x110, 0).is_err());
        assert!(bus.insert(recorder(), u64::MAX, 2).is_err());
        bus.insert(recorder(), 0x110, 1).unwrap();
        bus.insert(recorder(), 0xf0, 0x10).unwrap();
    }
}
