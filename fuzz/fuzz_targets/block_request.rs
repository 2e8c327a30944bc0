//! Fuzzes virtio-blk request handling: the input lays out a descriptor table, an available
//! ring and data in guest memory, exactly as an untrusted guest could, and every chain is parsed
//! and executed against a real (temporary) disk image.

#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use lockstep_devices::virtio::block::request::Request;
use lockstep_devices::virtio::block::{CacheType, Disk};
use lockstep_devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const DATA: u64 = 0x3000;

fuzz_target!(|input: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    // The first 16 descriptors (256 bytes) and the available ring (idx + 16 entries) come from
    // the input; the rest of the input is data the descriptors may point at.
    let (table, rest) = input.split_at(input.len().min(256));
    mem.write_slice(table, GuestAddress(DESC_TABLE)).unwrap();
    let (avail, data) = rest.split_at(rest.len().min(36));
    mem.write_slice(avail, GuestAddress(AVAIL_RING)).unwrap();
    mem.write_slice(data, GuestAddress(DATA)).unwrap();

    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().write_all(&[0x5a; 64 * 512]).unwrap();
    let disk = Disk::open(
        image.as_path(),
        data.first().is_some_and(|b| b & 1 == 1),
        CacheType::Writeback,
    )
    .unwrap();

    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    let Ok(iter) = queue.iter(&mem) else { return };
    let chains: Vec<_> = iter.collect();
    for chain in chains {
        let head = chain.head_index();
        let used = match Request::parse(chain, &mem, disk.sectors()) {
            Ok(req) => req.execute(&disk, b"fuzz-drive-id-000000", &mem).used_len,
            Err(_) => 0,
        };
        let _ = queue.add_used(&mem, head, used);
    }
});
