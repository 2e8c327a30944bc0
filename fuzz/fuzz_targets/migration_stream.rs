//! Fuzzes the destination's side of a migration stream: the `Auth` frame (MAC checked before the
//! handshake is decoded) and the pre-copy frames landing in a small guest memory, then the
//! machine state they end with through the snapshot decoder. Nothing may panic, write outside
//! guest memory, hang, or allocate past a frame type's bound.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lockstep_api::HostLimits;
use lockstep_vmm::memory::{create_guest_memory, GuestMemoryMmap};
use lockstep_vmm::migration::land_pages;
use lockstep_vmm::migration::protocol::{open_auth, read_frame, Kind};
use lockstep_vmm::vm::snapshot::{decode_and_check, SnapshotPaths};

const LIMITS: HostLimits = HostLimits {
    mem_mib: 64 << 10,
    max_vcpus: 254,
};

fn memory() -> &'static GuestMemoryMmap {
    static MEMORY: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEMORY.get_or_init(|| create_guest_memory(2 << 20, false).expect("2 MiB of memory"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = rest;
    if mode & 1 == 0 {
        // The handshake: one frame, which must be an Auth with the right MAC.
        if let Ok(frame) = read_frame(&mut input) {
            if frame.kind == Kind::Auth {
                let _ = open_auth("fuzz-token", &[0u8; 32], &frame.payload);
            }
        }
        return;
    }
    let Ok((state, _, _)) = land_pages(memory(), &mut input, |_, _, _| {}) else {
        return;
    };
    let paths = SnapshotPaths {
        state: "migration stream".into(),
        memory: "migration memory".into(),
    };
    let _ = decode_and_check(&paths, &state, 2 << 20, &LIMITS);
});
