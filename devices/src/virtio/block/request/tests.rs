use std::io::{Read, Seek, SeekFrom, Write};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::virtio::block::disk::CacheType;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const SECTORS: u64 = 64;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn disk(read_only: bool) -> (TempFile, Disk) {
    let f = TempFile::new().unwrap();
    let bytes: Vec<u8> = (0..SECTORS * 512).map(|i| (i % 253) as u8).collect();
    f.as_file().write_all(&bytes).unwrap();
    let d = Disk::open(f.as_path(), read_only, CacheType::Writeback).unwrap();
    (f, d)
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    mem.write_obj(
        RequestHeader {
            kind,
            reserved: 0,
            sector,
        },
        GuestAddress(HDR),
    )
    .unwrap();
}

/// Builds a chain from `descs` and parses and runs it.
fn run(
    mem: &GuestMemoryMmap,
    disk: &Disk,
    descs: &[RawDescriptor],
) -> Result<Outcome, Unanswerable> {
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let req = Request::parse(chain, mem, disk.sectors())?;
    Ok(req.execute(disk, b"drive-id-for-tests!!", mem))
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn read_copies_sectors_into_the_guest() {
    let m = mem();
    let (_f, d) = disk(false);
    header(&m, VIRTIO_BLK_T_IN, 2);
    let out = run(
        &m,
        &d,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(DATA + 512, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
    )
    .unwrap();
    assert_eq!(out.status, VIRTIO_BLK_S_OK);
    assert_eq!(out.used_len, 1025);
    let mut buf = vec![0u8; 1024];
    m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    let expected: Vec<u8> = (1024..2048u64).map(|i| (i % 253) as u8).collect();
    assert_eq!(buf, expected);
    assert_eq!(status(&m), VIRTIO_BLK_S_OK);
}

#[test]
fn write_reaches_the_file_and_flush_succeeds() {
    let m = mem();
    let (f, d) = disk(false);
    header(&m, VIRTIO_BLK_T_OUT, 5);
    m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let out = run(
        &m,
        &d,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    )
    .unwrap();
    assert_eq!(
        (out.status, out.used_len, out.bytes_written),
        (VIRTIO_BLK_S_OK, 1, 512)
    );
    let mut file = f.as_file();
    let mut buf = [0u8; 512];
    file.seek(SeekFrom::Start(5 * 512)).unwrap();
    file.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0xab; 512]);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let out = run(&m, &d, &[desc(HDR, 16, 0), desc(STATUS, 1, F_WRITE)]).unwrap();
    assert_eq!(out.status, VIRTIO_BLK_S_OK);
}

#[test]
fn get_id_and_unsupported() {
    let m = mem();
    let (_f, d) = disk(false);
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let out = run(
        &m,
        &d,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 20, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
    )
    .unwrap();
    assert_eq!((out.status, out.used_len), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"drive-id-for-tests!!");
    header(&m, 77, 0);
    let out = run(&m, &d, &[desc(HDR, 16, 0), desc(STATUS, 1, F_WRITE)]).unwrap();
    assert_eq!(out.status, VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn read_only_drive_refuses_writes() {
    let m = mem();
    let (f, d) = disk(true);
    header(&m, VIRTIO_BLK_T_OUT, 0);
    m.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    let out = run(
        &m,
        &d,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    )
    .unwrap();
    assert_eq!(out.status, VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
    let mut first = [0u8; 4];
    f.as_file().seek(SeekFrom::Start(0)).unwrap();
    f.as_file().read_exact(&mut first).unwrap();
    assert_eq!(first, [0, 1, 2, 3], "the image is unchanged");
}

#[test]
fn malformed_requests_get_ioerr() {
    let m = mem();
    let (_f, d) = disk(false);
    let cases: Vec<(&str, u32, u64, Vec<RawDescriptor>)> = vec![
        (
            "read into device-readable buffer",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 512, 0),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "write from device-writable buffer",
            VIRTIO_BLK_T_OUT,
            0,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 512, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "past the end",
            VIRTIO_BLK_T_IN,
            SECTORS,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 512, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "sector overflow",
            VIRTIO_BLK_T_IN,
            u64::MAX / 256,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 512, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "partial sector",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 100, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "buffer outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, 0),
                desc(0xffff_ffff_0000, 512, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "header outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(0xffff_ffff_0000, 16, 0),
                desc(DATA, 512, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "short header",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 8, 0),
                desc(DATA, 512, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "device-writable header",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, F_WRITE),
                desc(DATA, 512, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "status only",
            VIRTIO_BLK_T_IN,
            0,
            vec![desc(STATUS, 1, F_WRITE)],
        ),
        (
            "id buffer too small",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 4, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
        (
            "huge transfer",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 0xffff_fe00, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        ),
    ];
    for (name, kind, sector, descs) in cases {
        header(&m, kind, sector);
        let out = run(&m, &d, &descs).unwrap_or_else(|e| panic!("{name}: unanswerable {e:?}"));
        assert_eq!(out.status, VIRTIO_BLK_S_IOERR, "{name}");
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR, "{name}");
    }
}

#[test]
fn chains_without_a_status_byte_are_dropped() {
    let m = mem();
    let (_f, d) = disk(false);
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert!(run(
        &m,
        &d,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(STATUS, 1, 0)
        ]
    )
    .is_err());
    assert!(run(&m, &d, &[desc(HDR, 16, 0), desc(STATUS, 0, F_WRITE)]).is_err());
    assert!(run(
        &m,
        &d,
        &[desc(HDR, 16, 0), desc(0xffff_ffff_0000, 1, F_WRITE)]
    )
    .is_err());
}

#[test]
fn looping_and_out_of_range_chains_terminate() {
    let m = mem();
    let (_f, d) = disk(false);
    let vq = MockSplitQueue::new(&m, 16);
    // Descriptor 0 chains to itself.
    vq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            F_WRITE | F_NEXT,
            0,
        ))],
        0,
    )
    .unwrap();
    let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
    use virtio_queue::QueueOwnedT;
    let chain = q.iter(&m).unwrap().next().unwrap();
    let req = Request::parse(chain, &m, d.sectors()).unwrap();
    assert_eq!(
        req.early_status,
        Some(VIRTIO_BLK_S_IOERR),
        "a loop is cut at the queue size and refused"
    );

    // A head index beyond the queue size yields no descriptors at all.
    let vq = MockSplitQueue::new(&m, 16);
    vq.avail().ring().ref_at(0).unwrap().store(u16::to_le(200));
    vq.avail().idx().store(u16::to_le(1));
    let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
    let chain = q.iter(&m).unwrap().next().unwrap();
    assert!(Request::parse(chain, &m, d.sectors()).is_err());
}

#[test]
fn written_range_covers_a_write_and_nothing_else() {
    let m = mem();
    let (_f, d) = disk(false);
    let vq = MockSplitQueue::new(&m, 16);
    let parse = |kind: u32, sector: u64, data_flags: u16| {
        header(&m, kind, sector);
        let chain = vq
            .build_desc_chain(&[
                desc(HDR, 16, 0),
                desc(DATA, 512, data_flags),
                desc(DATA + 512, 512, data_flags),
                desc(STATUS, 1, F_WRITE),
            ])
            .unwrap();
        Request::parse(chain, &m, d.sectors()).unwrap()
    };
    // Sector 7 onwards: bytes 3584..4608, unaligned to 4 KiB.
    assert_eq!(
        parse(VIRTIO_BLK_T_OUT, 7, 0).written_range(),
        Some((3584, 1024))
    );
    assert_eq!(parse(VIRTIO_BLK_T_IN, 7, F_WRITE).written_range(), None);
    assert_eq!(
        parse(VIRTIO_BLK_T_OUT, SECTORS, 0).written_range(),
        None,
        "a write refused while parsing changes nothing"
    );
}
