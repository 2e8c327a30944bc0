//! The i8042 keyboard controller, kept for one job: its "pulse reset line" command (0xFE on
//! port 0x64) is how a guest asks for a reset, which ends a lockstep VM.

use crate::bus::BusDevice;
use crate::EventFdTrigger;

/// vm-superio's i8042, signalling `reset` when the guest asks for a CPU reset.
pub struct I8042 {
    inner: vm_superio::I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that writes to `reset` when the guest requests a reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042 {
            inner: vm_superio::I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.inner.write(offset, value) {
                log::error!("i8042: cannot signal the reset request: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn reset_command_signals_only_on_the_command_port() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        dev.write(0, &[0xfe]);
        assert!(evt.read().is_err(), "data port must not reset");
        dev.write(4, &[0xaa]);
        assert!(evt.read().is_err(), "other commands must not reset");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [0xffu8; 2];
        dev.read(4, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
