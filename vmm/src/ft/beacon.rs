//! The second heartbeat path: each side of a pair sends a small UDP datagram to the other every
//! heartbeat interval, on an address of its own choosing (best on another network than the
//! replication connection). A side that hears the other on it knows the other is alive even
//! when the replication connection has gone silent. Datagrams carry a sequence number and an
//! HMAC-SHA256 under the pairing's token: a forged or replayed one is not heard.
//!
//! The primary names its address in the handshake (`FtHello::heartbeat`); the secondary sends
//! there, and the primary answers the address the first good datagram came from.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"LKB1";
/// Magic, sender's role, sequence number, MAC.
const DATAGRAM: usize = 4 + 1 + 8 + 32;

/// Which side sends a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Primary = 0,
    Secondary = 1,
}

/// What both sides share: the pairing's token (the key) and the pair's id.
#[derive(Clone)]
pub(crate) struct BeaconKey {
    pub(crate) token: String,
    pub(crate) pair: String,
}

impl BeaconKey {
    fn mac(&self, role: u8, seq: u64) -> Option<Hmac<Sha256>> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.token.as_bytes()).ok()?;
        m.update(MAGIC);
        m.update(&[role]);
        m.update(&seq.to_le_bytes());
        m.update(self.pair.as_bytes());
        Some(m)
    }

    /// The datagram `role` sends as its `seq`th.
    fn seal(&self, role: Role, seq: u64) -> Option<[u8; DATAGRAM]> {
        let tag = self.mac(role as u8, seq)?.finalize().into_bytes();
        let mut out = [0u8; DATAGRAM];
        out[..4].copy_from_slice(MAGIC);
        out[4] = role as u8;
        out[5..13].copy_from_slice(&seq.to_le_bytes());
        out[13..].copy_from_slice(&tag);
        Some(out)
    }

    /// The sequence number of a good datagram from `from`, checked in constant time.
    fn open(&self, from: Role, datagram: &[u8]) -> Option<u64> {
        if datagram.len() != DATAGRAM || &datagram[..4] != MAGIC || datagram[4] != from as u8 {
            return None;
        }
        let seq = u64::from_le_bytes(datagram[5..13].try_into().ok()?);
        self.mac(from as u8, seq)?
            .verify_slice(&datagram[13..])
            .ok()?;
        Some(seq)
    }
}

/// A running beacon: sends this side's datagrams and listens for the other side's.
pub(crate) struct Beacon {
    heard: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Beacon {
    /// Starts sending as `me` every `every` on (a handle of) `socket` (to `peer`; a primary
    /// learns its peer from the first good datagram) and listening for the other side.
    pub(crate) fn start(
        socket: &UdpSocket,
        me: Role,
        peer: Option<SocketAddr>,
        key: BeaconKey,
        every: Duration,
    ) -> std::io::Result<Beacon> {
        let socket = socket.try_clone()?;
        let heard = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        socket.set_read_timeout(Some(every.min(Duration::from_millis(50))))?;
        let thread = {
            let (heard, stop) = (heard.clone(), stop.clone());
            crate::migration::spawn_thread(format!("ft-beacon-{}", key.pair), move || {
                run(&socket, me, peer, &key, every, &heard, &stop)
            })?
        };
        Ok(Beacon {
            heard,
            stop,
            thread: Some(thread),
        })
    }

    /// True when a good datagram of the other side's came within `window`.
    pub(crate) fn heard_within(&self, window: Duration) -> bool {
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() <= window)
    }
}

impl Drop for Beacon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    socket: &UdpSocket,
    me: Role,
    mut peer: Option<SocketAddr>,
    key: &BeaconKey,
    every: Duration,
    heard: &Mutex<Option<Instant>>,
    stop: &AtomicBool,
) {
    let other = match me {
        Role::Primary => Role::Secondary,
        Role::Secondary => Role::Primary,
    };
    let (mut seq, mut last_seen) = (0u64, 0u64);
    let mut sent_at: Option<Instant> = None;
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::SeqCst) {
        if let (Some(to), true) = (peer, sent_at.is_none_or(|at| at.elapsed() >= every)) {
            seq += 1;
            if let Some(datagram) = key.seal(me, seq) {
                // A lost datagram is what this path is there to notice: no retry.
                let _ = socket.send_to(&datagram, to);
            }
            sent_at = Some(Instant::now());
        }
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        match key.open(other, &buf[..len]) {
            // Only newer datagrams count: an old one replayed says nothing about now.
            Some(n) if n > last_seen => {
                last_seen = n;
                *heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                if me == Role::Primary {
                    peer = Some(from);
                }
            }
            _ => log::debug!("ft beacon: a datagram from {from} that is not the other side's"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> BeaconKey {
        BeaconKey {
            token: "secret".into(),
            pair: "web".into(),
        }
    }

    #[test]
    fn only_the_other_sides_good_datagrams_are_heard() {
        let k = key();
        let d = k.seal(Role::Secondary, 7).unwrap();
        assert_eq!(k.open(Role::Secondary, &d), Some(7));
        // Another role, another key, another pair, a flipped bit, a short datagram.
        assert_eq!(k.open(Role::Primary, &d), None);
        let other = BeaconKey {
            token: "other".into(),
            ..key()
        };
        assert_eq!(other.open(Role::Secondary, &d), None);
        let pair = BeaconKey {
            pair: "db".into(),
            ..key()
        };
        assert_eq!(pair.open(Role::Secondary, &d), None);
        let mut bad = d;
        bad[6] ^= 1;
        assert_eq!(k.open(Role::Secondary, &bad), None);
        assert_eq!(k.open(Role::Secondary, &d[..20]), None);
    }

    #[test]
    fn two_beacons_hear_each_other_and_stop_hearing_when_one_ends() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a_addr = a.local_addr().unwrap();
        let every = Duration::from_millis(10);
        let primary = Beacon::start(&a, Role::Primary, None, key(), every).unwrap();
        let secondary = Beacon::start(&b, Role::Secondary, Some(a_addr), key(), every).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(primary.heard_within(every * 5) && secondary.heard_within(every * 5)) {
            assert!(
                Instant::now() < deadline,
                "the beacons do not hear each other"
            );
            std::thread::sleep(every);
        }
        drop(secondary);
        std::thread::sleep(every * 20);
        assert!(!primary.heard_within(every * 10));
    }

    #[test]
    fn a_replayed_datagram_is_not_heard() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a_addr = a.local_addr().unwrap();
        let every = Duration::from_millis(10);
        let primary = Beacon::start(&a, Role::Primary, None, key(), every).unwrap();
        let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
        let good = key().seal(Role::Secondary, 5).unwrap();
        attacker.send_to(&good, a_addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !primary.heard_within(Duration::from_secs(1)) {
            assert!(Instant::now() < deadline, "the first datagram is not heard");
            std::thread::sleep(every);
        }
        std::thread::sleep(Duration::from_millis(300));
        // The same datagram again, and forged ones: none counts.
        attacker.send_to(&good, a_addr).unwrap();
        attacker.send_to(&[0u8; DATAGRAM], a_addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!primary.heard_within(Duration::from_millis(250)));
    }
}
