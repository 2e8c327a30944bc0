//! What the guest can observe of an interface, saved and restored the same way for snapshots,
//! live migration and FT.

use serde::{Deserialize, Serialize};

use super::frame::{MAX_FRAME_LEN, VNET_HDR_LEN};
use super::Net;
use crate::virtio::{ActivateError, DeviceBaseState};
use crate::GuestMemoryMmap;

/// Saved state of a virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Features and queues.
    pub base: DeviceBaseState,
    /// The interface's id.
    pub iface_id: String,
    /// The MAC the guest saw, if the device offered one.
    pub mac: Option<[u8; 6]>,
    /// A frame (vnet header first) read from the tap that the guest had no room for yet; it is
    /// delivered first after the restore, so no frame is lost across a snapshot.
    pub rx_pending: Option<Vec<u8>>,
}

impl Net {
    /// The interface's guest-visible state.
    pub fn save_state(&self) -> NetState {
        NetState {
            base: self.base.save(),
            iface_id: self.iface_id().to_string(),
            mac: self.mac,
            rx_pending: self.rx_pending.map(|len| self.rx_frame[..len].to_vec()),
        }
    }

    /// Restores a saved interface on this device's tap. The guest keeps the MAC it saw; a
    /// device built with a MAC cannot take a state saved without one, or the reverse, as the
    /// offered features would differ.
    pub fn restore_state(
        &mut self,
        state: &NetState,
        mem: GuestMemoryMmap,
    ) -> Result<(), ActivateError> {
        if state.mac.is_some() != self.mac.is_some() {
            return Err(ActivateError::BadState(format!(
                "interface {} was saved {} a MAC and is configured {} one",
                state.iface_id,
                if state.mac.is_some() {
                    "with"
                } else {
                    "without"
                },
                if self.mac.is_some() {
                    "with"
                } else {
                    "without"
                },
            )));
        }
        if let Some(frame) = &state.rx_pending {
            if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&frame.len()) {
                return Err(ActivateError::BadState(format!(
                    "interface {}: a pending frame of {} bytes",
                    state.iface_id,
                    frame.len()
                )));
            }
        }
        self.base.restore(&state.base, mem)?;
        if self.mac != state.mac {
            log::info!(
                "virtio-net {}: keeping the saved MAC, not the configured one",
                self.iface_id()
            );
        }
        self.mac = state.mac;
        self.rx_pending = state.rx_pending.as_ref().map(|frame| {
            self.rx_frame[..frame.len()].copy_from_slice(frame);
            frame.len()
        });
        self.tx_blocked = false;
        if state.base.activated {
            self.apply_offloads()?;
        }
        Ok(())
    }
}
