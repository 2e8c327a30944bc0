//! A tiny IPv4 stack on the virtio-net driver: Ethernet, ARP (answers requests for our address,
//! resolves peers, a small cache), IPv4 without options or fragments, ICMP echo (answers pings,
//! sends them) and UDP. Addresses come from the command line: `lks.ip=<a.b.c.d>/<prefix>` and,
//! for destinations off the subnet, `lks.gw=<a.b.c.d>`.
//!
//! [`Interface::poll`] does all receiving: it answers ARP and echo requests in passing and hands
//! back UDP datagrams for the port asked about.

pub mod wire;

use crate::boot::BootInfo;
use crate::cpu::rdtsc;
use crate::virtio::net::{ChecksumOffload, Net, RxFrame, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM};
use crate::virtio::Waiter;
use wire::*;

const ARP_ENTRIES: usize = 8;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// Identifier of the echo requests the kit sends.
const PING_ID: u16 = 0x4c4b;
/// How long one ARP attempt waits, and how many are made.
const ARP_WAIT_MS: u64 = 300;
const ARP_ATTEMPTS: usize = 3;
/// How long a transmit waits for a free slot.
const TX_WAIT_MS: u64 = 1000;

/// The interface's address, from `lks.ip` and `lks.gw`.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Config {
    /// Our address.
    pub addr: Ip,
    /// Subnet prefix length.
    pub prefix: u8,
    /// Router for destinations off the subnet.
    pub gateway: Option<Ip>,
}

impl Ipv4Config {
    /// Reads `lks.ip=<a.b.c.d>/<prefix>` (prefix 24 if left out) and `lks.gw=<a.b.c.d>`.
    pub fn from_cmdline(boot: &BootInfo) -> Option<Self> {
        let mut config = None;
        let mut gateway = None;
        for (key, value) in boot.cmdline_options() {
            match key {
                b"lks.ip" => {
                    let (addr, prefix) = match value.iter().position(|b| *b == b'/') {
                        Some(slash) => (&value[..slash], &value[slash + 1..]),
                        None => (value, &b"24"[..]),
                    };
                    let prefix = core::str::from_utf8(prefix).ok()?.parse().ok()?;
                    if prefix <= 32 {
                        config = parse_ip_text(addr).map(|addr| (addr, prefix));
                    }
                }
                b"lks.gw" => gateway = parse_ip_text(value),
                _ => {}
            }
        }
        let (addr, prefix) = config?;
        Some(Ipv4Config {
            addr,
            prefix,
            gateway,
        })
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    fn on_link(&self, ip: Ip) -> bool {
        (u32::from_be_bytes(ip) ^ u32::from_be_bytes(self.addr)) & self.mask() == 0
    }

    fn is_broadcast(&self, ip: Ip) -> bool {
        ip == [255; 4] || u32::from_be_bytes(ip) == u32::from_be_bytes(self.addr) | !self.mask()
    }
}

/// Counters shown by `net info`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// ARP requests for our address answered.
    pub arp_answered: u64,
    /// Echo requests answered.
    pub echo_answered: u64,
    /// Frames dropped: malformed, not for us, unknown protocol, or UDP nobody waited for.
    pub dropped: u64,
    /// UDP datagrams with a wrong checksum.
    pub bad_checksum: u64,
}

/// A received UDP datagram, handed out by [`Interface::poll`]; give it back with
/// [`Interface::release`].
#[derive(Debug)]
pub struct Datagram {
    frame: RxFrame,
    /// Sender's address.
    pub src_ip: Ip,
    /// Sender's MAC address.
    pub src_mac: [u8; 6],
    /// Sender's port.
    pub src_port: u16,
    /// Our port.
    pub dst_port: u16,
    offset: usize,
    len: usize,
}

impl Datagram {
    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.frame.frame()[self.offset..self.offset + self.len]
    }
}

/// The network interface: the driver plus the stack's state.
pub struct Interface {
    /// The driver.
    pub dev: Net,
    /// Our address, if the command line gave one.
    pub config: Option<Ipv4Config>,
    arp: [(Ip, [u8; 6]); ARP_ENTRIES],
    arp_next: usize,
    ip_id: u16,
    /// Counters.
    pub stats: Stats,
    /// The last echo reply to our identifier: (sequence number, TSC when it arrived).
    last_echo_reply: Option<(u16, u64)>,
}

impl Interface {
    /// Wraps a live driver.
    pub fn new(dev: Net, config: Option<Ipv4Config>) -> Self {
        Interface {
            dev,
            config,
            arp: [([0; 4], [0; 6]); ARP_ENTRIES],
            arp_next: 0,
            ip_id: 1,
            stats: Stats::default(),
            last_echo_reply: None,
        }
    }

    /// Processes received frames until a UDP datagram for `port` turns up (returned, still
    /// holding its receive buffer) or none are left.
    pub fn poll(&mut self, port: Option<u16>) -> Option<Datagram> {
        while let Some(frame) = self.dev.recv() {
            self.stats.rx_frames += 1;
            match self.handle(frame, port) {
                Ok(datagram) => return Some(datagram),
                Err(frame) => self.dev.recycle(frame),
            }
        }
        self.dev.flush_rx();
        None
    }

    /// Gives a datagram's receive buffer back.
    pub fn release(&mut self, datagram: Datagram) {
        self.dev.recycle(datagram.frame);
    }

    /// Waits (bounded by `waiter`) for frames; false on timeout.
    pub fn wait(&mut self, waiter: &Waiter) -> bool {
        self.dev.wait_rx(waiter)
    }

    /// Handles one frame; returns it as a datagram if it is UDP for `port`.
    fn handle(&mut self, frame: RxFrame, port: Option<u16>) -> Result<Datagram, RxFrame> {
        let Some(config) = self.config else {
            self.stats.dropped += 1;
            return Err(frame);
        };
        let bytes = frame.frame();
        if bytes.len() < ETH_LEN {
            self.stats.dropped += 1;
            return Err(frame);
        }
        let src_mac = get_mac(bytes, 6);
        match get16(bytes, 12) {
            ETHERTYPE_ARP => {
                self.handle_arp(&config, bytes);
                Err(frame)
            }
            ETHERTYPE_IPV4 => {
                let Some(ip) = parse_ip(bytes, ETH_LEN)
                    .filter(|ip| ip.dst == config.addr || config.is_broadcast(ip.dst))
                else {
                    self.stats.dropped += 1;
                    return Err(frame);
                };
                match ip.protocol {
                    PROTO_ICMP => {
                        self.handle_icmp(&config, bytes, &ip, src_mac);
                        Err(frame)
                    }
                    PROTO_UDP => self.handle_udp(frame, &ip, src_mac, port),
                    _ => {
                        self.stats.dropped += 1;
                        Err(frame)
                    }
                }
            }
            _ => {
                self.stats.dropped += 1;
                Err(frame)
            }
        }
    }

    fn handle_arp(&mut self, config: &Ipv4Config, bytes: &[u8]) {
        let Some(arp) = bytes.get(ETH_LEN..ETH_LEN + ARP_LEN) else {
            return;
        };
        if get16(arp, 0) != 1 || get16(arp, 2) != ETHERTYPE_IPV4 || arp[4] != 6 || arp[5] != 4 {
            return;
        }
        let sender = (get_mac(arp, 8), get_ip(arp, 14));
        let target_ip = get_ip(arp, 24);
        if target_ip != config.addr {
            return;
        }
        self.learn(sender.1, sender.0);
        if get16(arp, 6) == ARP_REQUEST {
            let mac = self.dev.mac;
            let sent = self.send_frame(ETH_LEN + ARP_LEN, None, |frame| {
                put_eth(frame, sender.0, mac, ETHERTYPE_ARP);
                put_arp(frame, ETH_LEN, ARP_REPLY, (mac, config.addr), sender);
            });
            if sent {
                self.stats.arp_answered += 1;
            }
        }
    }

    fn handle_icmp(&mut self, config: &Ipv4Config, bytes: &[u8], ip: &Ipv4, src_mac: [u8; 6]) {
        let icmp = &bytes[ip.payload..ip.payload + ip.len];
        if icmp.len() < ICMP_LEN || checksum(icmp) != 0 {
            return;
        }
        match icmp[0] {
            ICMP_ECHO_REQUEST if ip.dst == config.addr => {
                let (mac, len) = (self.dev.mac, icmp.len());
                let id = self.next_ip_id();
                let sent = self.send_frame(ETH_LEN + IP_LEN + len, None, |frame| {
                    put_eth(frame, src_mac, mac, ETHERTYPE_IPV4);
                    put_ip(frame, ETH_LEN, config.addr, ip.src, PROTO_ICMP, len, id);
                    let reply = &mut frame[ETH_LEN + IP_LEN..ETH_LEN + IP_LEN + len];
                    reply.copy_from_slice(icmp);
                    reply[0] = ICMP_ECHO_REPLY;
                    put16(reply, 2, 0);
                    let check = checksum(reply);
                    put16(reply, 2, check);
                });
                if sent {
                    self.stats.echo_answered += 1;
                }
            }
            ICMP_ECHO_REPLY if get16(icmp, 4) == PING_ID => {
                self.last_echo_reply = Some((get16(icmp, 6), rdtsc()));
            }
            _ => {}
        }
    }

    fn handle_udp(
        &mut self,
        frame: RxFrame,
        ip: &Ipv4,
        src_mac: [u8; 6],
        port: Option<u16>,
    ) -> Result<Datagram, RxFrame> {
        let bytes = frame.frame();
        let udp = &bytes[ip.payload..ip.payload + ip.len];
        let len = if udp.len() >= UDP_LEN {
            usize::from(get16(udp, 4))
        } else {
            0
        };
        if len < UDP_LEN || len > udp.len() || Some(get16(udp, 2)) != port {
            self.stats.dropped += 1;
            return Err(frame);
        }
        // A zero checksum means none; partial (NEEDS_CSUM) or device-checked ones are trusted.
        let trusted = frame.flags() & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0;
        if get16(udp, 6) != 0 && !trusted {
            let acc = sum(
                pseudo_sum(ip.src, ip.dst, PROTO_UDP, len as u16),
                &udp[..len],
            );
            if fold(acc) != 0xffff {
                self.stats.bad_checksum += 1;
                return Err(frame);
            }
        }
        Ok(Datagram {
            src_ip: ip.src,
            src_mac,
            src_port: get16(udp, 0),
            dst_port: get16(udp, 2),
            offset: ip.payload + UDP_LEN,
            len: len - UDP_LEN,
            frame,
        })
    }

    fn learn(&mut self, ip: Ip, mac: [u8; 6]) {
        if let Some(entry) = self.arp.iter_mut().find(|(known, _)| *known == ip) {
            entry.1 = mac;
            return;
        }
        self.arp[self.arp_next] = (ip, mac);
        self.arp_next = (self.arp_next + 1) % ARP_ENTRIES;
    }

    fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    /// Builds a `len`-byte frame with `build` in a free transmit slot and sends it now.
    fn send_frame(
        &mut self,
        len: usize,
        offload: Option<ChecksumOffload>,
        build: impl FnOnce(&mut [u8]),
    ) -> bool {
        let Some(mut slot) = self.dev.tx_slot(&Waiter::new(TX_WAIT_MS)) else {
            return false;
        };
        build(slot.frame_mut());
        self.dev.transmit(slot, len, offload, true);
        self.stats.tx_frames += 1;
        true
    }

    /// The MAC address to send to for `ip`: from the cache, else by ARP (bounded); through the
    /// gateway for destinations off the subnet.
    pub fn resolve(&mut self, ip: Ip) -> Option<[u8; 6]> {
        let config = self.config?;
        if config.is_broadcast(ip) {
            return Some(BROADCAST_MAC);
        }
        let next_hop = if config.on_link(ip) {
            ip
        } else {
            config.gateway?
        };
        for _ in 0..ARP_ATTEMPTS {
            if let Some((_, mac)) = self.arp.iter().find(|(known, _)| *known == next_hop) {
                return Some(*mac);
            }
            let mac = self.dev.mac;
            self.send_frame(ETH_LEN + ARP_LEN, None, |frame| {
                put_eth(frame, BROADCAST_MAC, mac, ETHERTYPE_ARP);
                put_arp(
                    frame,
                    ETH_LEN,
                    ARP_REQUEST,
                    (mac, config.addr),
                    ([0; 6], next_hop),
                );
            });
            let waiter = Waiter::new(ARP_WAIT_MS);
            loop {
                if let Some(datagram) = self.poll(None) {
                    self.release(datagram);
                }
                if self.arp.iter().any(|(known, _)| *known == next_hop) || !self.wait(&waiter) {
                    break;
                }
            }
        }
        self.arp
            .iter()
            .find(|(known, _)| *known == next_hop)
            .map(|(_, mac)| *mac)
    }

    /// Sends one echo request with sequence number `seq` and `payload` bytes of data.
    pub fn send_ping(&mut self, dst: Ip, mac: [u8; 6], seq: u16, payload: usize) -> bool {
        let Some(config) = self.config else {
            return false;
        };
        let (our_mac, len) = (self.dev.mac, ICMP_LEN + payload);
        let id = self.next_ip_id();
        self.last_echo_reply = None;
        self.send_frame(ETH_LEN + IP_LEN + len, None, |frame| {
            put_eth(frame, mac, our_mac, ETHERTYPE_IPV4);
            put_ip(frame, ETH_LEN, config.addr, dst, PROTO_ICMP, len, id);
            let icmp = &mut frame[ETH_LEN + IP_LEN..ETH_LEN + IP_LEN + len];
            icmp[0] = ICMP_ECHO_REQUEST;
            icmp[1] = 0;
            put16(icmp, 2, 0);
            put16(icmp, 4, PING_ID);
            put16(icmp, 6, seq);
            for (i, byte) in icmp[ICMP_LEN..].iter_mut().enumerate() {
                *byte = i as u8;
            }
            let check = checksum(icmp);
            put16(icmp, 2, check);
        })
    }

    /// The TSC at which the echo reply with sequence number `seq` arrived, if it has.
    pub fn echo_reply(&self, seq: u16) -> Option<u64> {
        self.last_echo_reply
            .filter(|(got, _)| *got == seq)
            .map(|(_, tsc)| tsc)
    }

    /// Sends one UDP datagram whose payload `fill` writes into a `len`-byte buffer. The device
    /// completes the checksum when it offered to, else the stack computes it. Notifies the
    /// device now if `kick` (else at a later [`Net::flush_tx`], for batches).
    pub fn send_udp(
        &mut self,
        to: (Ip, [u8; 6], u16),
        src_port: u16,
        len: usize,
        kick: bool,
        fill: impl FnOnce(&mut [u8]),
    ) -> bool {
        let Some(config) = self.config else {
            return false;
        };
        let len = len.min(UDP_PAYLOAD_MAX);
        let Some(mut slot) = self.dev.tx_slot(&Waiter::new(TX_WAIT_MS)) else {
            return false;
        };
        let (dst_ip, dst_mac, dst_port) = to;
        let udp_len = UDP_LEN + len;
        let id = self.next_ip_id();
        let offload = self.dev.tx_checksum_offload();
        let frame = slot.frame_mut();
        put_eth(frame, dst_mac, self.dev.mac, ETHERTYPE_IPV4);
        put_ip(frame, ETH_LEN, config.addr, dst_ip, PROTO_UDP, udp_len, id);
        let udp = &mut frame[ETH_LEN + IP_LEN..ETH_LEN + IP_LEN + udp_len];
        put16(udp, 0, src_port);
        put16(udp, 2, dst_port);
        put16(udp, 4, udp_len as u16);
        fill(&mut udp[UDP_LEN..]);
        let pseudo = pseudo_sum(config.addr, dst_ip, PROTO_UDP, udp_len as u16);
        let csum = if offload {
            // The device adds the datagram to this partial sum and stores the complement.
            put16(udp, 6, fold(pseudo));
            Some(ChecksumOffload {
                start: (ETH_LEN + IP_LEN) as u16,
                offset: 6,
            })
        } else {
            put16(udp, 6, 0);
            let check = !fold(sum(pseudo, udp));
            put16(udp, 6, if check == 0 { 0xffff } else { check });
            None
        };
        self.dev
            .transmit(slot, ETH_LEN + IP_LEN + udp_len, csum, kick);
        self.stats.tx_frames += 1;
        true
    }
}
