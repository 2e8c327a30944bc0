//! Deterministic data that the host can regenerate, and the checksums printed over it.
//!
//! * Sector pattern: sector `s` written with seed `k` holds 64 little-endian u64 words from an
//!   xorshift64 generator (shifts 13, 7, 17) whose state starts at
//!   `k * 0x9e3779b97f4a7c15 ^ s * 0xbf58476d1ce4e5b9` (wrapping; 1 if that is 0); each word is the
//!   state after one step.
//! * UDP test payload: `"LKS1"`, the sequence number (u32 LE), the FNV-1a 64 of the data (u64 LE),
//!   then the data: byte `i` is `(seq * 7 + i) mod 256`.

use crate::report::fnv1a64;

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// The UDP payload magic.
pub const UDP_MAGIC: &[u8; 4] = b"LKS1";
/// Header of a UDP test payload.
pub const UDP_HEADER: usize = 16;

/// FNV-1a 64 over data that arrives in pieces.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Fnv {
    /// The offset basis.
    pub fn new() -> Self {
        Fnv(fnv1a64(&[]))
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(PRIME);
        }
    }

    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

/// The xorshift64 generator of the sector pattern (also the benchmarks' random numbers).
#[derive(Clone, Copy, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// Starts from `state` (0 becomes 1).
    pub fn new(state: u64) -> Self {
        XorShift(state.max(1))
    }

    /// The next state.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn sector_generator(seed: u64, sector: u64) -> XorShift {
    XorShift::new(
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector.wrapping_mul(0xbf58_476d_1ce4_e5b9),
    )
}

/// Fills `bytes` (whole sectors) with the pattern of sectors `first..` for `seed`.
pub fn fill_sectors(bytes: &mut [u8], seed: u64, first: u64) {
    for (index, sector) in bytes.chunks_exact_mut(SECTOR).enumerate() {
        let mut generator = sector_generator(seed, first + index as u64);
        for word in sector.chunks_exact_mut(8) {
            word.copy_from_slice(&generator.next_u64().to_le_bytes());
        }
    }
}

/// Compares `bytes` (whole sectors from `first`) with the pattern for `seed`: returns how many
/// sectors differ and the first one that does.
pub fn check_sectors(bytes: &[u8], seed: u64, first: u64) -> (u64, Option<u64>) {
    let mut bad = 0;
    let mut first_bad = None;
    for (index, sector) in bytes.chunks_exact(SECTOR).enumerate() {
        let mut generator = sector_generator(seed, first + index as u64);
        let matches = sector
            .chunks_exact(8)
            .all(|word| *word == generator.next_u64().to_le_bytes());
        if !matches {
            bad += 1;
            first_bad.get_or_insert(first + index as u64);
        }
    }
    (bad, first_bad)
}

/// Writes a UDP test payload with sequence number `seq` into `payload` (at least 16 bytes).
pub fn fill_udp(payload: &mut [u8], seq: u32) {
    let (header, data) = payload.split_at_mut(UDP_HEADER);
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (seq.wrapping_mul(7) as usize + i) as u8;
    }
    header[..4].copy_from_slice(UDP_MAGIC);
    header[4..8].copy_from_slice(&seq.to_le_bytes());
    header[8..16].copy_from_slice(&fnv1a64(data).to_le_bytes());
}

/// Checks a UDP test payload: `Some(seq)` if its checksum matches, `None` if not (or it is not one).
pub fn check_udp(payload: &[u8]) -> Option<u32> {
    if payload.len() < UDP_HEADER || !payload.starts_with(UDP_MAGIC) {
        return None;
    }
    let seq = u32::from_le_bytes(payload[4..8].try_into().ok()?);
    let sum = u64::from_le_bytes(payload[8..16].try_into().ok()?);
    (fnv1a64(&payload[UDP_HEADER..]) == sum).then_some(seq)
}

/// Whether a payload is a UDP test payload at all (magic and length).
pub fn is_udp_test(payload: &[u8]) -> bool {
    payload.len() >= UDP_HEADER && payload.starts_with(UDP_MAGIC)
}
