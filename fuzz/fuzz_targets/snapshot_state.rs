//! Fuzzes the snapshot reader with hostile state: the input is either a whole state file (magic,
//! header, checksums) or, more usefully, a machine state that is framed with valid checksums
//! and a header matching what it claims, so the fuzzer gets past the CRCs to the decoder and
//! every restore check before KVM (regions, vCPUs, devices, queues). Nothing may panic, abort,
//! hang or allocate past the decoder's limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_api::HostLimits;
use lockstep_vmm::vm::snapshot::{
    decode_and_check, decode_state, regions_total, state_file_bytes, SnapshotPaths,
};

const LIMITS: HostLimits = HostLimits {
    mem_mib: 64 << 10,
    max_vcpus: 254,
};

fuzz_target!(|data: &[u8]| {
    let paths = SnapshotPaths {
        state: "fuzz.state".into(),
        memory: "fuzz.mem".into(),
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // A whole file, framing included; the memory file's length from the next 8 bytes.
        let (len, file) = rest.split_at(rest.len().min(8));
        let mut word = [0u8; 8];
        word[..len.len()].copy_from_slice(len);
        let _ = decode_and_check(&paths, file, u64::from_le_bytes(word), &LIMITS);
        return;
    }
    // A machine state, framed as the writer frames it.
    let Ok(snapshot) = decode_state(rest) else {
        return;
    };
    let memory = regions_total(&snapshot.regions).unwrap_or(0);
    let vcpus = u32::try_from(snapshot.vcpus.len()).unwrap_or(u32::MAX);
    let Ok(file) = state_file_bytes(rest, "fuzz", vcpus, memory) else {
        return;
    };
    let _ = decode_and_check(&paths, &file, memory, &LIMITS);
    // The memory file disagreeing with the state must be refused, never trusted.
    if memory != 0 {
        assert!(decode_and_check(&paths, &file, memory - 1, &LIMITS).is_err());
    }
});
