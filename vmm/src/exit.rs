//! How a VM ends: the first reason reported wins and wakes the VM's event loop.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 reset line or KVM reset event).
    GuestReset,
    /// The guest triple-faulted: a crash, or the last-resort reset of a guest with no reset
    /// device.
    TripleFault,
    /// The guest powered itself off.
    GuestShutdown,
    /// The operator asked the VMM to stop the VM: the console escape, or a signal.
    Requested {
        /// The signal that asked, if one did.
        signal: Option<i32>,
    },
    /// A vCPU hit an error the VMM cannot recover from.
    VcpuError(String),
}

impl ExitReason {
    /// True when the guest ended itself, which lockstep reports as success.
    pub fn is_guest_initiated(&self) -> bool {
        matches!(
            self,
            ExitReason::GuestReset | ExitReason::GuestShutdown | ExitReason::TripleFault
        )
    }
}

/// Collects the reason a VM ends and wakes whoever waits on [`ExitSignal::eventfd`].
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitSignal {
    /// A signal with no reason yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` unless an earlier one was recorded, and wakes the waiter.
    pub fn signal(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            log::debug!("VM exit requested: {reason:?}");
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the VM event loop: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd written on every signal.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.signal(ExitReason::GuestReset);
        s.signal(ExitReason::VcpuError("late".into()));
        assert_eq!(s.reason(), Some(ExitReason::GuestReset));
        assert_eq!(s.eventfd().read().unwrap(), 2);
        assert!(ExitReason::GuestShutdown.is_guest_initiated());
        assert!(!ExitReason::Requested { signal: None }.is_guest_initiated());
    }
}
