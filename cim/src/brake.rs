//! The brake on failed logins. Failures are counted per source subnet (an IPv4 /24, an IPv6
//! /64), whatever the user name, so neither another address next door nor another user name
//! escapes it; each recent failure spaces that subnet's next attempts further apart, and the
//! attempts a subnet may have pending at once are bounded, so waiting attempts cannot pile up.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures are forgotten after this long without another.
const FAILURE_MEMORY: Duration = Duration::from_secs(900);
/// Most subnets remembered.
const MAX_TRACKED: usize = 10_000;

/// The subnet an address is braked with: its /24 for IPv4, its /64 for IPv6 (an IPv4 address
/// mapped into IPv6 counts as IPv4).
pub fn subnet_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => subnet_of(IpAddr::V4(v4)),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !0u128 << 64)),
        },
    }
}

/// What the brake knows about one subnet.
struct Subnet {
    failures: u32,
    last_failure: Option<Instant>,
    /// When the latest attempt admitted was (or will be) let through to its check, or the
    /// latest failure, whichever is later.
    last_start: Option<Instant>,
    /// Attempts admitted and not finished.
    pending: usize,
}

impl Subnet {
    fn forgotten(&self, now: Instant) -> bool {
        self.pending == 0
            && self
                .last_failure
                .is_none_or(|t| now.duration_since(t) > FAILURE_MEMORY)
    }
}

/// The brake's settings and bookkeeping.
pub struct Brake {
    step: Duration,
    max: Duration,
    pending_max: usize,
    subnets: Mutex<HashMap<IpAddr, Subnet>>,
}

/// An admitted attempt: it must wait `wait` before its check, and holds its subnet's pending
/// place until dropped.
pub struct Ticket<'a> {
    brake: &'a Brake,
    subnet: IpAddr,
    /// How long to wait before checking the credentials.
    pub wait: Duration,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut map = self.brake.lock();
        if let Some(s) = map.get_mut(&self.subnet) {
            s.pending = s.pending.saturating_sub(1);
            if s.forgotten(Instant::now()) {
                map.remove(&self.subnet);
            }
        }
    }
}

impl Brake {
    /// Each recent failure adds `step` to the gap between a subnet's attempts, up to `max`; at
    /// most `pending_max` attempts per subnet wait or are checked at once.
    pub fn new(step: Duration, max: Duration, pending_max: usize) -> Brake {
        Brake {
            step,
            max,
            pending_max,
            subnets: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Subnet>> {
        self.subnets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits an attempt from `addr`, or refuses it (`None`) when its subnet already has its
    /// most attempts pending. The ticket says how long to wait: nothing for a subnet without
    /// recent failures; otherwise until one gap (`step` per failure) after the subnet's
    /// previous attempt, a slot the ticket reserves, so that parallel attempts queue up one gap
    /// apart.
    pub fn admit(&self, addr: IpAddr) -> Option<Ticket<'_>> {
        let subnet = subnet_of(addr);
        let now = Instant::now();
        let mut map = self.lock();
        let s = subnet_entry(&mut map, subnet, now);
        if s.last_failure
            .is_some_and(|t| now.duration_since(t) > FAILURE_MEMORY)
        {
            s.failures = 0;
            s.last_failure = None;
        }
        if s.pending >= self.pending_max {
            return None;
        }
        s.pending += 1;
        let gap = self.step.saturating_mul(s.failures).min(self.max);
        let start = s.last_start.map_or(now, |last| (last + gap).max(now));
        s.last_start = Some(start);
        Some(Ticket {
            brake: self,
            subnet,
            wait: start - now,
        })
    }

    /// Counts a failed login from `addr` against its subnet.
    pub fn record_failure(&self, addr: IpAddr) {
        let subnet = subnet_of(addr);
        let now = Instant::now();
        let mut map = self.lock();
        let s = subnet_entry(&mut map, subnet, now);
        s.failures = s.failures.saturating_add(1);
        s.last_failure = Some(now);
        // The next attempt waits a gap after this failure at least.
        s.last_start = Some(s.last_start.map_or(now, |t| t.max(now)));
    }
}

/// Keeps the map under its bound: forgets expired subnets, then (if still full) the oldest
/// tenth of those with nothing pending.
/// The record of `subnet`, made (with room for it) if there is none yet.
fn subnet_entry(map: &mut HashMap<IpAddr, Subnet>, subnet: IpAddr, now: Instant) -> &mut Subnet {
    if !map.contains_key(&subnet) {
        make_room(map, now);
    }
    map.entry(subnet).or_insert(Subnet {
        failures: 0,
        last_failure: None,
        last_start: None,
        pending: 0,
    })
}

fn make_room(map: &mut HashMap<IpAddr, Subnet>, now: Instant) {
    if map.len() < MAX_TRACKED {
        return;
    }
    map.retain(|_, s| !s.forgotten(now));
    if map.len() < MAX_TRACKED {
        return;
    }
    let mut ages: Vec<(IpAddr, Option<Instant>)> = map
        .iter()
        .filter(|(_, s)| s.pending == 0)
        .map(|(a, s)| (*a, s.last_failure))
        .collect();
    ages.sort_by_key(|(_, t)| *t);
    for (a, _) in ages.into_iter().take(MAX_TRACKED / 10) {
        map.remove(&a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn subnets() {
        assert_eq!(subnet_of(ip("192.0.2.77")), ip("192.0.2.0"));
        assert_eq!(subnet_of(ip("::ffff:192.0.2.77")), ip("192.0.2.0"));
        assert_eq!(subnet_of(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn failures_space_out_the_whole_subnet_and_pending_is_bounded() {
        let brake = Brake::new(Duration::from_millis(100), Duration::from_millis(250), 2);
        let t = brake.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(t.wait, Duration::ZERO);
        drop(t);
        brake.record_failure(ip("10.0.0.1"));
        brake.record_failure(ip("10.0.0.2"));
        // Another address of the subnet waits two steps after the first attempt; the next
        // one two more.
        let a = brake.admit(ip("10.0.0.3")).unwrap();
        let b = brake.admit(ip("10.0.0.4")).unwrap();
        assert!(a.wait > Duration::from_millis(150), "{:?}", a.wait);
        assert!(b.wait > Duration::from_millis(350), "{:?}", b.wait);
        // Two pending: a third from the subnet is refused; another subnet is not braked.
        assert!(brake.admit(ip("10.0.0.5")).is_none());
        assert_eq!(brake.admit(ip("10.0.1.5")).unwrap().wait, Duration::ZERO);
        drop(a);
        // Three failures would be 300 ms; the gap stops at 250.
        brake.record_failure(ip("10.0.0.9"));
        let c = brake.admit(ip("10.0.0.5")).unwrap();
        assert!(c.wait.saturating_sub(b.wait) <= Duration::from_millis(250));
        assert!(c.wait.saturating_sub(b.wait) >= Duration::from_millis(200));
    }
}
