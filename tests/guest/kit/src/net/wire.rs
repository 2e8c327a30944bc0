//! Wire formats of the tiny network stack: Ethernet, ARP, IPv4, ICMP and UDP header layouts, and the
//! Internet checksum (RFC 1071). Everything is big-endian on the wire.

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options (the stack sends no options).
pub const IP_LEN: usize = 20;
/// UDP header length.
pub const UDP_LEN: usize = 8;
/// ICMP echo header length.
pub const ICMP_LEN: usize = 8;
/// ARP packet length for Ethernet/IPv4.
pub const ARP_LEN: usize = 28;
/// Largest UDP payload in one 1500-byte-MTU frame.
pub const UDP_PAYLOAD_MAX: usize = 1500 - IP_LEN - UDP_LEN;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// The broadcast MAC address.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// An IPv4 address.
pub type Ip = [u8; 4];

/// Reads a big-endian u16 at `at`.
pub fn get16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Writes a big-endian u16 at `at`.
pub fn put16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Reads 4 bytes at `at` (an IPv4 address).
pub fn get_ip(bytes: &[u8], at: usize) -> Ip {
    [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]
}

/// Reads 6 bytes at `at` (a MAC address).
pub fn get_mac(bytes: &[u8], at: usize) -> [u8; 6] {
    let mut mac = [0; 6];
    mac.copy_from_slice(&bytes[at..at + 6]);
    mac
}

/// Adds `bytes` to a one's-complement sum as big-endian 16-bit words (an odd last byte is padded).
pub fn sum(mut acc: u64, bytes: &[u8]) -> u64 {
    let mut pairs = bytes.chunks_exact(2);
    for pair in &mut pairs {
        acc += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum to 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `bytes`: the complement of their folded sum.
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum(0, bytes))
}

/// The sum of the TCP/UDP pseudo-header.
pub fn pseudo_sum(src: Ip, dst: Ip, protocol: u8, len: u16) -> u64 {
    let acc = sum(sum(0, &src), &dst);
    acc + u64::from(protocol) + u64::from(len)
}

/// Writes an Ethernet header.
pub fn put_eth(frame: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    put16(frame, 12, ethertype);
}

/// Writes an IPv4 header (no options, don't-fragment, TTL 64) with its checksum at `at`.
pub fn put_ip(
    frame: &mut [u8],
    at: usize,
    src: Ip,
    dst: Ip,
    protocol: u8,
    payload: usize,
    id: u16,
) {
    let header = &mut frame[at..at + IP_LEN];
    header[0] = 0x45;
    header[1] = 0;
    put16(header, 2, (IP_LEN + payload) as u16);
    put16(header, 4, id);
    put16(header, 6, 0x4000);
    header[8] = 64;
    header[9] = protocol;
    put16(header, 10, 0);
    header[12..16].copy_from_slice(&src);
    header[16..20].copy_from_slice(&dst);
    let check = checksum(header);
    put16(header, 10, check);
}

/// Writes an ARP packet at `at` (operation 1 = request, 2 = reply).
pub fn put_arp(
    frame: &mut [u8],
    at: usize,
    operation: u16,
    sender: ([u8; 6], Ip),
    target: ([u8; 6], Ip),
) {
    let arp = &mut frame[at..at + ARP_LEN];
    put16(arp, 0, 1);
    put16(arp, 2, ETHERTYPE_IPV4);
    arp[4] = 6;
    arp[5] = 4;
    put16(arp, 6, operation);
    arp[8..14].copy_from_slice(&sender.0);
    arp[14..18].copy_from_slice(&sender.1);
    arp[18..24].copy_from_slice(&target.0);
    arp[24..28].copy_from_slice(&target.1);
}

/// A validated IPv4 packet inside a frame.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4 {
    /// Source address.
    pub src: Ip,
    /// Destination address.
    pub dst: Ip,
    /// Protocol number.
    pub protocol: u8,
    /// Offset of the payload in the frame.
    pub payload: usize,
    /// Payload length (from the header's total length).
    pub len: usize,
}

/// Parses the IPv4 header at `at`: version 4, sane lengths, correct header checksum, not a fragment.
pub fn parse_ip(frame: &[u8], at: usize) -> Option<Ipv4> {
    let header = frame.get(at..at + IP_LEN)?;
    let header_len = usize::from(header[0] & 0xf) * 4;
    let total = usize::from(get16(header, 2));
    let fragment = get16(header, 6) & 0x3fff;
    if header[0] >> 4 != 4 || header_len < IP_LEN || total < header_len || fragment != 0 {
        return None;
    }
    let full = frame.get(at..at + header_len)?;
    if at + total > frame.len() || fold(sum(0, full)) != 0xffff {
        return None;
    }
    Some(Ipv4 {
        src: get_ip(header, 12),
        dst: get_ip(header, 16),
        protocol: header[9],
        payload: at + header_len,
        len: total - header_len,
    })
}

/// Formats an IPv4 address as dotted decimal.
pub struct ShowIp(pub Ip);

impl core::fmt::Display for ShowIp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// Formats a MAC address as colon-separated hex.
pub struct ShowMac(pub [u8; 6]);

impl core::fmt::Display for ShowMac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Parses dotted-decimal IPv4.
pub fn parse_ip_text(text: &[u8]) -> Option<Ip> {
    let mut ip = [0u8; 4];
    let mut parts = text.split(|b| *b == b'.');
    for byte in &mut ip {
        let part = core::str::from_utf8(parts.next()?).ok()?;
        *byte = part.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}
