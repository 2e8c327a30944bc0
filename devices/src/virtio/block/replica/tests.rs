use std::io::Write;
use std::os::fd::AsRawFd;

use vmm_sys_util::tempfile::TempFile;

use super::*;

const BS: u64 = REPLICA_BLOCK_SIZE;

/// A temp file holding `bytes`.
fn image(bytes: &[u8]) -> TempFile {
    let f = TempFile::new().unwrap();
    f.as_file().write_all(bytes).unwrap();
    f
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(31))
        .collect()
}

fn contents(f: &TempFile) -> Vec<u8> {
    std::fs::read(f.as_path()).unwrap()
}

#[test]
fn tracker_marks_exactly_the_blocks_a_write_touches() {
    // Five whole blocks and a short sixth one.
    let mut t = WriteTracker::new(5 * BS + 1000);
    assert_eq!(t.blocks(), 6);
    assert!(t.take().is_empty(), "nothing marked at first");
    t.mark(BS - 1, 2); // straddles blocks 0 and 1
    t.mark(3 * BS, BS); // exactly block 3
    t.mark(5 * BS + 999, 1); // the last byte of the short last block
    t.mark(2 * BS, 0); // empty: nothing
    t.mark(6 * BS, 4096); // past the end: ignored
    assert_eq!(t.take(), vec![0, 1, 3, 5]);
    assert!(t.take().is_empty(), "take clears");
    t.mark(5 * BS + 10, 1 << 20); // runs past the end: clamped to the last block
    assert_eq!(t.take(), vec![5]);
}

#[test]
fn tracker_spans_bitmap_words() {
    let mut t = WriteTracker::new(10_000 * BS);
    // From the middle of block 60 to the first byte of block 4130: across many words and
    // across a summary word (64 words).
    t.mark(60 * BS + 1, 4070 * BS);
    t.mark(9_999 * BS, BS);
    let mut want: Vec<u64> = (60..=4130).collect();
    want.push(9_999);
    assert_eq!(t.take(), want);
    assert!(t.take().is_empty());
}

#[test]
fn read_blocks_coalesces_and_handles_the_short_last_block() {
    let size = 3 * BS + 100;
    let bytes = pattern(size, 1);
    let f = image(&bytes);
    let mut out = EpochBlocks::new();
    read_blocks(f.as_file(), size, &[0, 1, 3, 2], &mut out).unwrap();
    let got: Vec<(u64, Vec<u8>)> = out.iter().map(|(b, d)| (b, d.to_vec())).collect();
    let want: Vec<(u64, Vec<u8>)> = [0u64, 1, 3, 2]
        .iter()
        .map(|&b| {
            let start = (b * BS) as usize;
            let end = ((b + 1) * BS).min(size) as usize;
            (b, bytes[start..end].to_vec())
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(got[2].1.len(), 100, "the last block is short");
    assert_eq!(out.bytes(), (3 * BS + 100) as usize);

    // Reused: the earlier blocks are gone.
    read_blocks(f.as_file(), size, &[2], &mut out).unwrap();
    assert_eq!(out.len(), 1);
    let err = read_blocks(f.as_file(), size, &[2, 3, 4], &mut out).unwrap_err();
    assert!(
        matches!(err, ReplicaError::BlockOutOfRange { block: 4, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("block 4"), "{err}");
}

/// Whether the file system reports holes (tmpfs and ext4 do).
fn reports_holes(f: &File) -> bool {
    // SAFETY: lseek on an open descriptor; it touches no memory.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    let size = f.metadata().unwrap().len();
    hole >= 0 && (hole as u64) < size
}

#[test]
fn full_copy_skips_holes_and_reproduces_the_file() {
    let size: u64 = 8 << 20;
    let src = TempFile::new().unwrap();
    let file = src.as_file();
    file.set_len(size).unwrap();
    let regions: [(u64, u64); 3] = [(0, 5000), ((3 << 20) + 17, 2 << 20), (size - 100, 100)];
    for (i, &(at, len)) in regions.iter().enumerate() {
        file.write_all_at(&pattern(len, i as u8 + 1), at).unwrap();
    }
    file.sync_all().unwrap();

    // The replica starts with other bytes everywhere: holes must not keep them.
    let dst = image(&vec![0x5a; (size / 2) as usize]);
    let mut writer = ReplicaWriter::open(dst.as_path(), 0).unwrap();
    let copy = FullCopy::new(File::open(src.as_path()).unwrap(), 1 << 20).unwrap();
    assert_eq!(copy.size(), size);
    writer.begin_full_copy(copy.size()).unwrap();
    let mut copied = 0u64;
    let mut chunks = Vec::new();
    for chunk in copy {
        let (offset, bytes) = chunk.unwrap();
        assert!(bytes.len() <= 1 << 20, "chunks are bounded");
        copied += bytes.len() as u64;
        chunks.push((offset, bytes.len() as u64));
        writer.write_chunk(offset, &bytes).unwrap();
    }
    assert_eq!(writer.commit().unwrap(), 0);
    assert_eq!(contents(&dst), contents(&src), "byte for byte");
    if reports_holes(src.as_file()) {
        assert!(copied < 4 << 20, "holes skipped: {copied} bytes copied");
        let in_hole = |o: u64| chunks.iter().any(|&(at, len)| at <= o && o < at + len);
        assert!(!in_hole(2 << 20), "the hole at 2 MiB was read: {chunks:?}");
        assert!(!in_hole(6 << 20), "the hole at 6 MiB was read: {chunks:?}");
    }
}

#[test]
fn full_copy_of_an_empty_or_dense_file() {
    let empty = TempFile::new().unwrap();
    assert_eq!(FullCopy::open(empty.as_path()).unwrap().count(), 0);
    let bytes = pattern(3 * BS + 7, 9);
    let dense = image(&bytes);
    let copy = FullCopy::new(File::open(dense.as_path()).unwrap(), 5000).unwrap();
    let mut joined = Vec::new();
    for chunk in copy {
        let (offset, data) = chunk.unwrap();
        assert_eq!(offset, joined.len() as u64);
        joined.extend_from_slice(&data);
    }
    assert_eq!(joined, bytes);
}

#[test]
fn replica_refuses_what_lies_outside_the_image() {
    let size = 2 * BS + 10;
    let before = pattern(size, 3);
    let f = image(&before);
    let mut w = ReplicaWriter::open(f.as_path(), 1 << 20).unwrap();
    let full = vec![0xee; BS as usize];
    let err = w.stage(3, &full).unwrap_err();
    assert!(
        matches!(err, ReplicaError::BlockOutOfRange { block: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("block 3"), "{err}");
    assert!(matches!(
        w.stage(u64::MAX, &full),
        Err(ReplicaError::BlockOutOfRange { .. })
    ));
    // The short last block takes exactly its 10 bytes.
    assert!(matches!(
        w.stage(2, &full),
        Err(ReplicaError::BlockLength {
            block: 2,
            want: 10,
            ..
        })
    ));
    assert!(matches!(
        w.stage(0, &full[..100]),
        Err(ReplicaError::BlockLength { block: 0, .. })
    ));
    assert!(matches!(
        w.write_chunk(size - 5, &[1; 10]),
        Err(ReplicaError::RangeOutOfImage { .. })
    ));
    assert!(matches!(
        w.write_chunk(u64::MAX - 2, &[1; 10]),
        Err(ReplicaError::RangeOutOfImage { .. })
    ));
    assert_eq!(w.staged_blocks(), 0);
    assert_eq!(w.commit().unwrap(), 0);
    assert_eq!(contents(&f), before, "nothing was written");
}

#[test]
fn discard_applies_nothing() {
    let before = pattern(4 * BS, 4);
    let f = image(&before);
    let mut w = ReplicaWriter::open(f.as_path(), 1 << 20).unwrap();
    w.stage(1, &[0x11; BS as usize]).unwrap();
    w.stage(2, &[0x22; BS as usize]).unwrap();
    assert_eq!(w.staged_blocks(), 2);
    w.discard();
    assert_eq!(w.staged_blocks(), 0);
    assert_eq!(w.commit().unwrap(), 0);
    assert_eq!(contents(&f), before);
    // Nothing reaches the image before the commit either.
    w.stage(3, &[0x33; BS as usize]).unwrap();
    assert_eq!(contents(&f), before);
}

#[test]
fn an_epoch_past_the_limit_is_refused_not_grown() {
    let f = image(&pattern(8 * BS, 5));
    let limit = 2 * BS as usize + 100;
    let mut w = ReplicaWriter::open(f.as_path(), limit).unwrap();
    w.stage(0, &[1; BS as usize]).unwrap();
    w.stage(1, &[2; BS as usize]).unwrap();
    let err = w.stage(2, &[3; BS as usize]).unwrap_err();
    assert!(matches!(err, ReplicaError::EpochTooLarge { .. }), "{err}");
    assert!(w.data.capacity() <= limit, "staging grew past the limit");
    assert_eq!(w.staged_blocks(), 2);

    // The short last block counts as a whole one: repeating it cannot pile up entries.
    let f = image(&pattern(BS + 1, 5));
    let mut w = ReplicaWriter::open(f.as_path(), 3 * BS as usize).unwrap();
    for _ in 0..3 {
        w.stage(1, &[9]).unwrap();
    }
    assert!(matches!(
        w.stage(1, &[9]),
        Err(ReplicaError::EpochTooLarge { .. })
    ));
}

#[test]
fn commit_makes_the_replica_equal_to_the_source() {
    // The source and the replica start equal; the source then changes in some blocks,
    // including the short last one.
    let size = 40 * BS + 123;
    let start = pattern(size, 6);
    let src = image(&start);
    let dst = image(&start);
    let mut tracker = WriteTracker::new(size);
    let writes: [(u64, u64); 4] = [
        (5, 3000),
        (BS * 7 + 4000, 200),
        (BS * 20, 3 * BS),
        (size - 50, 50),
    ];
    for (i, &(at, len)) in writes.iter().enumerate() {
        src.as_file()
            .write_all_at(&pattern(len, 100 + i as u8), at)
            .unwrap();
        tracker.mark(at, len);
    }
    let blocks = tracker.take();
    assert_eq!(blocks, vec![0, 7, 8, 20, 21, 22, 40]);
    let mut epoch = EpochBlocks::new();
    read_blocks(src.as_file(), size, &blocks, &mut epoch).unwrap();
    let mut w = ReplicaWriter::open(dst.as_path(), 1 << 20).unwrap();
    for (block, data) in epoch.iter() {
        w.stage(block, data).unwrap();
    }
    assert_ne!(contents(&dst), contents(&src), "staged, not yet written");
    assert_eq!(w.commit().unwrap(), blocks.len());
    assert_eq!(contents(&dst), contents(&src));
}

#[test]
fn a_block_staged_twice_ends_with_its_later_bytes() {
    let f = image(&pattern(3 * BS, 7));
    let mut w = ReplicaWriter::open(f.as_path(), 1 << 20).unwrap();
    w.stage(1, &[0xaa; BS as usize]).unwrap();
    w.stage(2, &[0xbb; BS as usize]).unwrap();
    w.stage(1, &[0xcc; BS as usize]).unwrap();
    w.commit().unwrap();
    let got = contents(&f);
    assert!(got[BS as usize..2 * BS as usize].iter().all(|&b| b == 0xcc));
    assert!(got[2 * BS as usize..].iter().all(|&b| b == 0xbb));
}

#[test]
fn a_full_copy_waits_for_a_staged_epoch() {
    let f = image(&pattern(2 * BS, 8));
    let mut w = ReplicaWriter::open(f.as_path(), 1 << 20).unwrap();
    w.stage(0, &[0; BS as usize]).unwrap();
    assert!(matches!(
        w.begin_full_copy(BS),
        Err(ReplicaError::EpochStaged)
    ));
    w.discard();
    w.begin_full_copy(3 * BS).unwrap();
    assert_eq!(w.size(), 3 * BS);
    assert_eq!(
        contents(&f),
        vec![0; 3 * BS as usize],
        "emptied to the new size"
    );
    assert!(w.stage(2, &[1; BS as usize]).is_ok(), "the new size counts");
}
