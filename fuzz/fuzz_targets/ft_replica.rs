//! Fuzzes what an FT secondary does with the disk frames of the primary's stream: a full copy's
//! chunks written at their offsets, epochs of 4 KiB blocks staged within a byte limit and written
//! at the checkpoint or dropped with a half-received epoch, in any order and with any offsets,
//! block numbers and lengths. Checked against a model of the image after every step: nothing is
//! written outside the image or before its epoch commits, the image never changes size, and
//! every refusal is one the model expects.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lockstep_devices::virtio::block::replica::REPLICA_BLOCK_SIZE;
use lockstep_devices::virtio::block::{ReplicaError, ReplicaWriter};

/// Reads little-endian values off the front of the input, zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

fn image_path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("lks-ft-replica-{}.img", std::process::id()))
    })
}

/// `len` bytes of a pattern `seed` picks, so that an input's few bytes name many.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 7) as u8)).collect()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    // An image of 1 to 2048 sectors (a last block shorter than 4 KiB is common), and an epoch
    // limit of 4 to 19 blocks' worth.
    let size = (u64::from(input.u16() % 2048) + 1) * 512;
    let limit = (usize::from(input.u8() % 16) + 4) * REPLICA_BLOCK_SIZE as usize;
    let path = image_path();
    let mut model = pattern(0xa5, size as usize);
    std::fs::write(path, &model).expect("the image");
    let mut replica = ReplicaWriter::open(path, limit).expect("opens");
    assert_eq!(replica.size(), size);
    let blocks = size.div_ceil(REPLICA_BLOCK_SIZE);
    let mut staged: Vec<(u64, Vec<u8>)> = Vec::new();
    for _ in 0..64 {
        if input.0.is_empty() {
            break;
        }
        match input.u8() % 5 {
            0 => match replica.begin_full_copy(size) {
                Ok(()) => {
                    assert!(staged.is_empty(), "a full copy began over a staged epoch");
                    model.fill(0);
                }
                Err(ReplicaError::EpochStaged) => assert!(!staged.is_empty()),
                Err(e) => panic!("begin_full_copy: {e}"),
            },
            1 => {
                let offset = u64::from(input.u32()) % (size + 8192);
                let bytes = pattern(input.u8(), usize::from(input.u16() % 8192));
                let inside = offset + bytes.len() as u64 <= size;
                match replica.write_chunk(offset, &bytes) {
                    Ok(()) => {
                        assert!(inside, "a chunk at {offset}+{} was written", bytes.len());
                        model[offset as usize..][..bytes.len()].copy_from_slice(&bytes);
                    }
                    Err(_) => assert!(!inside, "a chunk inside the image was refused"),
                }
            }
            2 => {
                let block = u64::from(input.u16()) % (blocks + 2);
                let whole = block < blocks;
                let want = if whole {
                    (size - block * REPLICA_BLOCK_SIZE).min(REPLICA_BLOCK_SIZE) as usize
                } else {
                    0
                };
                // Mostly the right length, sometimes not.
                let len = match input.u8() % 4 {
                    0 => usize::from(input.u16() % 5000),
                    _ => want,
                };
                let bytes = pattern(input.u8(), len);
                let fits = (staged.len() + 1) * REPLICA_BLOCK_SIZE as usize <= limit;
                match replica.stage(block, &bytes) {
                    Ok(()) => {
                        assert!(
                            whole && len == want && fits,
                            "block {block} of {len} staged"
                        );
                        staged.push((block, bytes));
                    }
                    Err(_) => assert!(!(whole && len == want && fits), "block {block} refused"),
                }
                assert_eq!(replica.staged_blocks(), staged.len());
            }
            3 => {
                let written = replica.commit().expect("commit");
                assert_eq!(written, staged.len());
                for (block, bytes) in staged.drain(..) {
                    let at = (block * REPLICA_BLOCK_SIZE) as usize;
                    model[at..][..bytes.len()].copy_from_slice(&bytes);
                }
            }
            _ => {
                replica.discard();
                staged.clear();
            }
        }
        // Staged blocks are not on the image yet; everything else is.
        let on_disk = std::fs::read(path).expect("reads back");
        assert_eq!(on_disk.len() as u64, size, "the image changed size");
        assert!(on_disk == model, "the image differs from the model");
    }
});
