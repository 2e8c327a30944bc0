//! Puts the VM's devices on its buses and wires their interrupts to KVM. Device logic itself is
//! in the `lockstep-devices` crate.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use lockstep_devices::legacy::{
    SerialDevice, COM1_IRQ, COM1_PORT, I8042, I8042_PORT, I8042_PORT_LEN, SERIAL_PORT_LEN,
};
use lockstep_devices::EventFdTrigger;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::IoBuses;

/// Why a device could not be added.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// An eventfd could not be made.
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        /// The device.
        what: &'static str,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the interrupt line.
    #[error("cannot connect {what} to IRQ {irq}: {source}")]
    Irqfd {
        /// The device.
        what: &'static str,
        /// The interrupt line.
        irq: u32,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Two devices claimed the same addresses.
    #[error("cannot place {what} on its bus: {source}")]
    Bus {
        /// The device.
        what: &'static str,
        /// The conflict.
        #[source]
        source: lockstep_devices::bus::BusError,
    },
}

fn eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source })
}

/// The VM's devices and the buses that reach them.
pub struct DeviceManager {
    buses: IoBuses,
    serial: Arc<Mutex<SerialDevice>>,
    serial_rx_ready: EventFd,
    reset_evt: EventFd,
}

impl DeviceManager {
    /// Creates COM1 (writing to `serial_out`, interrupting on IRQ 4) and the i8042 reset line.
    pub fn new(vm: &VmFd, serial_out: Box<dyn Write + Send>) -> Result<Self, DeviceError> {
        let mut buses = IoBuses::default();

        let serial_irq = eventfd("the serial port")?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|source| DeviceError::Irqfd {
                what: "the serial port",
                irq: COM1_IRQ,
                source,
            })?;
        let serial_rx_ready = eventfd("the serial port")?;
        let rx_ready_clone =
            serial_rx_ready
                .try_clone()
                .map_err(|source| DeviceError::EventFd {
                    what: "the serial port",
                    source,
                })?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new(serial_irq),
            rx_ready_clone,
            serial_out,
        )));
        buses
            .pio
            .insert(serial.clone(), COM1_PORT, SERIAL_PORT_LEN)
            .map_err(|source| DeviceError::Bus {
                what: "COM1",
                source,
            })?;

        let reset_evt = eventfd("the i8042")?;
        let reset_trigger = reset_evt
            .try_clone()
            .map_err(|source| DeviceError::EventFd {
                what: "the i8042",
                source,
            })?;
        let i8042 = Arc::new(Mutex::new(I8042::new(EventFdTrigger::new(reset_trigger))));
        buses
            .pio
            .insert(i8042, I8042_PORT, I8042_PORT_LEN)
            .map_err(|source| DeviceError::Bus {
                what: "the i8042",
                source,
            })?;

        Ok(DeviceManager {
            buses,
            serial,
            serial_rx_ready,
            reset_evt,
        })
    }

    /// The buses, for the vCPUs.
    pub fn buses(&self) -> &IoBuses {
        &self.buses
    }

    /// COM1.
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// Signalled when the guest drains COM1's receive FIFO.
    pub fn serial_rx_ready(&self) -> &EventFd {
        &self.serial_rx_ready
    }

    /// Signalled when the guest pulses the i8042 reset line.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset_evt
    }
}
