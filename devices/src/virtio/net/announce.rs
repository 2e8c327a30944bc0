//! Telling the network where a guest is after it moved: RARP frames sent for the guest's MAC
//! out of its new tap, as QEMU's self-announce does, so that bridges and switches learn the
//! port at once instead of when the guest next speaks. A guest that chose its own MAC (no
//! `guest_mac` in the config) cannot be announced: the device never learns that address.
//!
//! VIRTIO_NET_F_GUEST_ANNOUNCE is not offered: it needs the control queue, which this device
//! does not have.

use super::frame::VNET_HDR_LEN;
use super::{Net, Tap};

/// An Ethernet frame's minimum length without its FCS.
const MIN_FRAME: usize = 60;
/// EtherType of RARP.
const ETHERTYPE_RARP: u16 = 0x8035;
/// RARP opcode "request reverse".
const RARP_REQUEST_REVERSE: u16 = 3;

/// The RARP frame (vnet header in front) that announces `mac`: broadcast, from `mac`, asking
/// for the address of `mac` itself (sender and target hardware address both `mac`, protocol
/// addresses zero).
pub fn rarp_frame(mac: [u8; 6]) -> [u8; VNET_HDR_LEN + MIN_FRAME] {
    let mut frame = [0u8; VNET_HDR_LEN + MIN_FRAME];
    let eth = &mut frame[VNET_HDR_LEN..];
    eth[0..6].copy_from_slice(&[0xff; 6]);
    eth[6..12].copy_from_slice(&mac);
    eth[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    // Hardware Ethernet (1), protocol IPv4 (0x0800), lengths 6 and 4.
    eth[14..16].copy_from_slice(&1u16.to_be_bytes());
    eth[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    eth[18] = 6;
    eth[19] = 4;
    eth[20..22].copy_from_slice(&RARP_REQUEST_REVERSE.to_be_bytes());
    eth[22..28].copy_from_slice(&mac);
    eth[32..38].copy_from_slice(&mac);
    frame
}

/// A second handle on a net device's tap with the guest's MAC: sends the announcements from
/// any thread (a tap takes whole frames, so they never mix with the device's own).
#[derive(Debug)]
pub struct Announcer {
    tap: Tap,
    mac: [u8; 6],
}

impl Announcer {
    /// The MAC announced.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Sends one announcement.
    pub fn send(&self) -> std::io::Result<()> {
        self.tap.write(&rarp_frame(self.mac)).map(|_| ())
    }
}

impl Net {
    /// An announcer for this interface; None when the guest's MAC is not known here.
    pub fn announcer(&self) -> std::io::Result<Option<Announcer>> {
        let Some(mac) = self.mac else {
            return Ok(None);
        };
        Ok(Some(Announcer {
            tap: self.tap.try_clone()?,
            mac,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rarp_frame_is_a_broadcast_reverse_request_for_the_mac() {
        let mac = [0x06, 0, 0x0a, 0x4d, 0, 0x0b];
        let frame = rarp_frame(mac);
        assert!(frame[..VNET_HDR_LEN].iter().all(|&b| b == 0), "no offload");
        let eth = &frame[VNET_HDR_LEN..];
        assert_eq!(eth.len(), 60);
        assert_eq!(&eth[..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &mac);
        assert_eq!(&eth[12..22], &[0x80, 0x35, 0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&eth[22..28], &mac);
        assert_eq!(&eth[28..32], &[0; 4]);
        assert_eq!(&eth[32..38], &mac);
        assert!(eth[38..].iter().all(|&b| b == 0));
    }

    #[test]
    fn an_announcer_writes_the_frame_to_the_tap() {
        let (tap, host) = Tap::socket_pair();
        let announcer = Announcer {
            tap: tap.try_clone().unwrap(),
            mac: [2, 0, 0, 0, 0, 1],
        };
        announcer.send().unwrap();
        let mut buf = [0u8; 128];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &rarp_frame([2, 0, 0, 0, 0, 1])[..]);
    }
}
