//! The test guest's data formats (tests/guest/README.md, "Data formats"), regenerated on the
//! host so tests can check what reached a disk image or the network.

/// FNV-1a, 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The 512 bytes the guest writes to `sector` with `seed` (`blk <n> write`): 64 xorshift64
/// words from a state derived from both.
pub fn sector_pattern(seed: u64, sector: u64) -> [u8; 512] {
    let mut x =
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    if x == 0 {
        x = 1;
    }
    let mut out = [0u8; 512];
    for word in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// The guest's UDP test payload number `seq` of `size` bytes: "LKS1", seq, FNV-1a 64 of the
/// data, then data byte i = (seq * 7 + i) mod 256.
pub fn udp_payload(seq: u32, size: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..size.saturating_sub(16))
        .map(|i| (seq as usize * 7 + i) as u8)
        .collect();
    let mut p = Vec::with_capacity(size);
    p.extend_from_slice(b"LKS1");
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&fnv1a64(&data).to_le_bytes());
    p.extend_from_slice(&data);
    p
}

/// The sequence number of a valid test payload.
pub fn udp_check(payload: &[u8]) -> Option<u32> {
    if payload.len() < 16 || &payload[..4] != b"LKS1" {
        return None;
    }
    let sum = u64::from_le_bytes(payload[8..16].try_into().ok()?);
    (fnv1a64(&payload[16..]) == sum).then(|| u32::from_le_bytes(payload[4..8].try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_check() {
        let p = udp_payload(42, 100);
        assert_eq!(udp_check(&p), Some(42));
        let mut bad = p.clone();
        bad[50] ^= 1;
        assert_eq!(udp_check(&bad), None);
        assert_ne!(sector_pattern(1, 0), sector_pattern(1, 1));
    }
}
