//! The virtio-mmio transport, register layout version 2 (virtio 1.x, section 4.2.2): identification,
//! reset, the status handshake with feature negotiation, split-queue set-up, notifications, the
//! interrupt status and the device's configuration space.

use crate::phys::{load, mmio_read32, mmio_write32};
use crate::time::Deadline;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// "virt" in little-endian.
pub const MAGIC: u32 = 0x7472_6976;

/// Device status bits (section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Device-independent feature bits (section 6).
pub mod feature {
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x (non-legacy) device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// InterruptStatus: a used buffer was returned.
pub const INTERRUPT_USED_BUFFER: u32 = 1;

/// Why a device could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// No "virt" magic at the base.
    BadMagic,
    /// Register layout other than version 2 (1 is the legacy layout).
    Version(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device did not accept the features (FEATURES_OK did not stick).
    FeaturesRejected,
    /// A queue the driver needs is missing (QueueNumMax 0) or already live.
    QueueUnavailable,
    /// The allocator has no room for rings or buffers.
    OutOfMemory,
    /// The device did not finish a reset.
    ResetTimeout,
    /// The device answered a set-up request with an error or not at all.
    SetupFailed,
}

impl InitError {
    /// The name used in result lines (`error=<name>`).
    pub fn name(self) -> &'static str {
        match self {
            InitError::BadMagic => "bad-magic",
            InitError::Version(1) => "legacy-version-1",
            InitError::Version(_) => "unknown-version",
            InitError::NoVersion1 => "no-version-1",
            InitError::FeaturesRejected => "features-rejected",
            InitError::QueueUnavailable => "queue-unavailable",
            InitError::OutOfMemory => "out-of-memory",
            InitError::ResetTimeout => "reset-timeout",
            InitError::SetupFailed => "setup-failed",
        }
    }
}

/// One virtio-mmio register window.
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    base: u64,
}

/// Guest-physical addresses of one split virtqueue's three parts.
#[derive(Clone, Copy, Debug)]
pub struct QueueAddresses {
    /// Descriptor table (16-byte aligned).
    pub desc: u64,
    /// Driver area, the available ring (2-byte aligned).
    pub avail: u64,
    /// Device area, the used ring (4-byte aligned).
    pub used: u64,
}

impl Transport {
    /// The window at `base`.
    pub fn new(base: u64) -> Self {
        Transport { base }
    }

    fn read(&self, register: u64) -> u32 {
        mmio_read32(self.base + register)
    }

    fn write(&self, register: u64, value: u32) {
        mmio_write32(self.base + register, value);
    }

    /// Checks the magic value and the layout version (2).
    pub fn identify(&self) -> Result<(), InitError> {
        if self.read(MAGIC_VALUE) != MAGIC {
            return Err(InitError::BadMagic);
        }
        match self.read(VERSION) {
            2 => Ok(()),
            other => Err(InitError::Version(other)),
        }
    }

    /// The device type (1 net, 2 blk, 4 rng, 19 vsock, ...; 0 = no device behind the window).
    pub fn device_id(&self) -> u32 {
        self.read(DEVICE_ID)
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    fn add_status(&self, bits: u32) {
        self.write(STATUS, self.status() | bits);
    }

    /// Resets the device (status 0) and waits, bounded, until it reads back 0.
    pub fn reset(&self) -> Result<(), InitError> {
        self.write(STATUS, 0);
        let deadline = Deadline::after_ms(1000);
        while self.status() != 0 {
            if deadline.passed() {
                return Err(InitError::ResetTimeout);
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then accepts the offered features among `wanted` (VERSION_1 is
    /// required; RING_EVENT_IDX is taken when offered) and sets FEATURES_OK, checking that it
    /// stuck. Returns the negotiated features; on failure the device is marked FAILED.
    pub fn begin(&self, wanted: u64) -> Result<u64, InitError> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        let offered = self.device_features();
        if offered & feature::VERSION_1 == 0 {
            self.fail();
            return Err(InitError::NoVersion1);
        }
        let accepted = offered & (wanted | feature::VERSION_1 | feature::RING_EVENT_IDX);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, accepted as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (accepted >> 32) as u32);
        self.add_status(status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err(InitError::FeaturesRejected);
        }
        Ok(accepted)
    }

    /// Sets DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        self.add_status(status::DRIVER_OK);
    }

    /// Sets FAILED: the driver gave up.
    pub fn fail(&self) {
        self.add_status(status::FAILED);
    }

    /// The largest size queue `index` may have; 0 if the queue does not exist or is already live.
    pub fn queue_max(&self, index: u16) -> u16 {
        self.write(QUEUE_SEL, u32::from(index));
        if self.read(QUEUE_READY) != 0 {
            return 0;
        }
        self.read(QUEUE_NUM_MAX).min(u32::from(u16::MAX)) as u16
    }

    /// Gives queue `index` its size and ring addresses and makes it ready.
    pub fn setup_queue(&self, index: u16, size: u16, rings: QueueAddresses) {
        self.write(QUEUE_SEL, u32::from(index));
        self.write(QUEUE_NUM, u32::from(size));
        for (register, addr) in [
            (QUEUE_DESC, rings.desc),
            (QUEUE_DRIVER, rings.avail),
            (QUEUE_DEVICE, rings.used),
        ] {
            self.write(register, addr as u32);
            self.write(register + 4, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
    }

    /// Tells the device that queue `index` has new buffers (the VMM may turn this write into an
    /// ioeventfd signal).
    pub fn notify(&self, index: u16) {
        self.write(QUEUE_NOTIFY, u32::from(index));
    }

    /// Reads InterruptStatus and acknowledges the bits it had; returns them.
    pub fn ack_interrupt(&self) -> u32 {
        let pending = self.read(INTERRUPT_STATUS);
        if pending != 0 {
            self.write(INTERRUPT_ACK, pending);
        }
        pending
    }

    /// Reads configuration bytes `offset..offset + N` consistently (retrying while the
    /// configuration generation changes), with accesses no wider than their alignment allows.
    pub fn config<const N: usize>(&self, offset: u64) -> [u8; N] {
        let mut bytes = [0u8; N];
        loop {
            let generation = self.read(CONFIG_GENERATION);
            let mut at = 0;
            while at < N {
                let addr = self.base + CONFIG + offset + at as u64;
                if addr.is_multiple_of(4) && N - at >= 4 {
                    bytes[at..at + 4].copy_from_slice(&load::<u32>(addr).to_le_bytes());
                    at += 4;
                } else {
                    bytes[at] = load::<u8>(addr);
                    at += 1;
                }
            }
            if self.read(CONFIG_GENERATION) == generation {
                return bytes;
            }
        }
    }
}
