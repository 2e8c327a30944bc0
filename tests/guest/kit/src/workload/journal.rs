//! `net udp-journal <port> [count]`: the fault-tolerance test workload. Every datagram
//! `REQ <n> <payload>` is journaled to the first block device as one checksummed record in the
//! sector that `n` maps to, the device's cache is flushed, and only then is `ACK <n> <digest>`
//! sent back. A request whose record is already on the disk is answered from that record, not
//! written again, so a client that resends after a failover gets the same digest.
//!
//! Datagrams that arrive together are journaled together (group commit): their sectors are read,
//! the new records written, one flush issued, then every reply sent. The formats are in the
//! guest README ("Journal workload"); the host side is `lockstep_tests::journal`.

use super::blk::{pipeline, Request, REQUEST_TIMEOUT_MS};
use super::pattern::{Fnv, SECTOR};
use super::{error, key_pressed, Machine};
use crate::frames::DmaBuf;
use crate::net::wire::Ip;
use crate::report;
use crate::virtio::blk::{Status, T_FLUSH, T_IN, T_OUT};
use crate::virtio::Waiter;

const NAME: &str = "net udp-journal";
/// First bytes of a journal record.
const RECORD_MAGIC: &[u8; 8] = b"LKSJREC1";
/// First bytes of the journal header (sector 0).
const HEADER_MAGIC: &[u8; 8] = b"LKSJHDR1";
/// Journal format version, in the header.
const VERSION: u32 = 1;
/// Largest payload of a request.
pub const PAYLOAD_MAX: usize = 256;
/// Where a record's payload starts.
const PAYLOAD_AT: usize = 24;
/// Where a sector's checksum (FNV-1a 64 of the bytes before it) is kept.
const CHECKSUM_AT: usize = SECTOR - 8;
/// Most requests journaled together.
const BATCH_MAX: usize = 16;
/// How long one wait for datagrams sleeps before looking at the console again.
const IDLE_WAIT_MS: u64 = 100;
/// The payload that ends the service.
const STOP: &[u8] = b"stop";
/// Longest reply: `ACK ` or `ERR `, 20 digits, a space, 16 hex digits or a reason.
const REPLY_MAX: usize = 64;

/// Where a reply goes: the requester's address, MAC and port.
type Peer = (Ip, [u8; 6], u16);

/// What became of a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not decided yet.
    Open,
    /// Written now; the digest of its record.
    Journaled(u64),
    /// Found on the disk (or written earlier in the batch); the digest of that record.
    Replayed(u64),
    /// Refused or failed, with the reason sent back.
    Failed(&'static str),
}

/// One request of a batch, copied out of its receive buffer.
#[derive(Clone, Copy)]
struct Pending {
    n: u64,
    len: usize,
    payload: [u8; PAYLOAD_MAX],
    peer: Peer,
    outcome: Outcome,
    /// Index of an earlier request of the batch with the same `n`, whose record answers this one.
    same_as: Option<usize>,
}

impl Pending {
    fn payload(&self) -> &[u8] {
        &self.payload[..self.len]
    }
}

/// Counters of one run, printed when it ends.
#[derive(Default)]
struct Counters {
    received: u64,
    journaled: u64,
    replayed: u64,
    failed: u64,
    malformed: u64,
    batches: u64,
    flushes: u64,
}

/// The digest an `ACK` carries: FNV-1a 64 of `n` (u64 little-endian) then the payload.
fn digest(n: u64, payload: &[u8]) -> u64 {
    let mut fnv = Fnv::new();
    fnv.update(&n.to_le_bytes());
    fnv.update(payload);
    fnv.value()
}

fn sector_checksum(sector: &[u8]) -> u64 {
    let mut fnv = Fnv::new();
    fnv.update(&sector[..CHECKSUM_AT]);
    fnv.value()
}

fn seal(sector: &mut [u8]) {
    let sum = sector_checksum(sector);
    sector[CHECKSUM_AT..SECTOR].copy_from_slice(&sum.to_le_bytes());
}

fn sealed(sector: &[u8]) -> bool {
    sector[CHECKSUM_AT..SECTOR] == sector_checksum(sector).to_le_bytes()
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(word)
}

/// Fills `sector` with the record of request `n`.
fn write_record(sector: &mut [u8], n: u64, payload: &[u8]) {
    sector.fill(0);
    sector[..8].copy_from_slice(RECORD_MAGIC);
    sector[8..16].copy_from_slice(&n.to_le_bytes());
    sector[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    sector[PAYLOAD_AT..PAYLOAD_AT + payload.len()].copy_from_slice(payload);
    seal(sector);
}

/// The payload of `sector` if it holds a valid record of request `n`.
fn read_record(sector: &[u8], n: u64) -> Option<&[u8]> {
    if !sector.starts_with(RECORD_MAGIC) || le_u64(&sector[8..]) != n || !sealed(sector) {
        return None;
    }
    let len = le_u32(&sector[16..]) as usize;
    (len <= PAYLOAD_MAX).then(|| &sector[PAYLOAD_AT..PAYLOAD_AT + len])
}

/// Fills `sector` with the journal header for `slots` records.
fn write_header(sector: &mut [u8], slots: u64) {
    sector.fill(0);
    sector[..8].copy_from_slice(HEADER_MAGIC);
    sector[8..12].copy_from_slice(&VERSION.to_le_bytes());
    sector[12..16].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    sector[16..24].copy_from_slice(&1u64.to_le_bytes());
    sector[24..32].copy_from_slice(&slots.to_le_bytes());
    seal(sector);
}

/// Parses `REQ <n>` or `REQ <n> <payload>` (the payload is every byte after the second space).
fn parse_request(datagram: &[u8]) -> Option<(u64, &[u8])> {
    let rest = datagram.strip_prefix(b"REQ ")?;
    let (number, payload) = match rest.iter().position(|b| *b == b' ') {
        Some(space) => (&rest[..space], &rest[space + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    if number.is_empty() || number.len() > 20 || !number.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = number.iter().try_fold(0u64, |n, digit| {
        n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })?;
    Some((n, payload))
}

/// Writes `ACK <n> <digest>` or `ERR <n> <reason>` into `out`; returns its length.
fn format_reply(out: &mut [u8; REPLY_MAX], n: u64, outcome: Outcome) -> usize {
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        out[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    };
    let (tag, digest) = match outcome {
        Outcome::Journaled(d) | Outcome::Replayed(d) => (&b"ACK "[..], Some(d)),
        Outcome::Failed(_) | Outcome::Open => (&b"ERR "[..], None),
    };
    push(tag);
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    push(&digits[at..]);
    push(b" ");
    match (digest, outcome) {
        (Some(d), _) => {
            let mut hex = [0u8; 16];
            for (i, nibble) in hex.iter_mut().enumerate() {
                let v = (d >> (60 - 4 * i)) & 0xf;
                *nibble = b"0123456789abcdef"[v as usize];
            }
            push(&hex);
        }
        (None, Outcome::Failed(reason)) => push(reason.as_bytes()),
        (None, _) => push(b"unanswered"),
    }
    len
}

/// The journal's place on the device.
struct Layout {
    dev: usize,
    slots: u64,
}

impl Layout {
    /// Record sectors follow the header; request `n` goes to sector `1 + n % slots`.
    fn sector_of(&self, n: u64) -> u64 {
        1 + n % self.slots
    }
}

/// `net udp-journal <port> [count]`.
pub(super) fn command(machine: &mut Machine, port: u16, count: Option<u64>) {
    let Some(net) = machine.devices.net() else {
        return error(NAME, "no-net-device");
    };
    if net.config.is_none() {
        return error(NAME, "no-address");
    }
    let Some(dev) = (0..machine.devices.len()).find(|n| machine.devices.blk(*n).is_some()) else {
        return error(NAME, "no-blk-device");
    };
    let Some(mut buffer) = machine.frames.alloc((BATCH_MAX + 1) * SECTOR) else {
        return error(NAME, "out-of-memory");
    };
    let blk = machine.devices.blk(dev).expect("found above");
    if blk.read_only() {
        return error(NAME, "read-only-device");
    }
    if blk.capacity < 2 {
        return error(NAME, "device-too-small");
    }
    let layout = Layout {
        dev,
        slots: blk.capacity - 1,
    };
    let flush = blk.has_flush();
    // The header: kept if it describes this layout, else written (and flushed) now.
    let header_at = buffer.addr() + (BATCH_MAX * SECTOR) as u64;
    let header = &mut buffer.bytes_mut()[BATCH_MAX * SECTOR..];
    let found = blk.request(T_IN, 0, header_at, SECTOR as u64, REQUEST_TIMEOUT_MS) == Status::Ok
        && header.starts_with(HEADER_MAGIC)
        && sealed(header)
        && le_u64(&header[24..]) == layout.slots;
    if !found {
        write_header(header, layout.slots);
        let mut status = blk.request(T_OUT, 0, header_at, SECTOR as u64, REQUEST_TIMEOUT_MS);
        if status == Status::Ok && flush {
            status = blk.request(T_FLUSH, 0, 0, 0, REQUEST_TIMEOUT_MS);
        }
        if status != Status::Ok {
            return report::line(format_args!(
                "{NAME} error=header-write status={}",
                status.name()
            ));
        }
    }
    report::line(format_args!(
        "{NAME} listening port={port} dev={dev} slots={} flush={} header={}",
        layout.slots,
        u8::from(flush),
        if found { "found" } else { "written" }
    ));
    let mut counters = Counters::default();
    let mut carry: Option<Pending> = None;
    let mut batch = [None; BATCH_MAX];
    let stopped_by = loop {
        let left = count.map(|count| count.saturating_sub(counters.received));
        if left == Some(0) && carry.is_none() {
            break "count";
        }
        let limit = left
            .map_or(BATCH_MAX, |left| (left as usize).min(BATCH_MAX))
            .max(usize::from(carry.is_some()));
        let (filled, stop) = collect(
            machine,
            &layout,
            port,
            &mut batch[..limit],
            &mut carry,
            &mut counters,
        );
        if filled > 0 {
            journal(
                machine,
                &layout,
                &mut buffer,
                &mut batch[..filled],
                &mut counters,
            );
            reply(machine, port, &mut batch[..filled], &mut counters);
        }
        if let Some(stop) = stop {
            break stop;
        }
    };
    report::line(format_args!(
        "{NAME} port={port} received={} journaled={} replayed={} failed={} malformed={} batches={} flushes={} stopped_by={stopped_by}",
        counters.received,
        counters.journaled,
        counters.replayed,
        counters.failed,
        counters.malformed,
        counters.batches,
        counters.flushes,
    ));
}

/// Fills `batch` with the requests that are waiting (waiting for the first one, bounded, if none
/// are); returns how many and why the service must stop, if it must. A request whose sector
/// another request of the batch already takes is kept in `carry` for the next batch.
fn collect(
    machine: &mut Machine,
    layout: &Layout,
    port: u16,
    batch: &mut [Option<Pending>],
    carry: &mut Option<Pending>,
    counters: &mut Counters,
) -> (usize, Option<&'static str>) {
    let mut filled = 0;
    if let Some(pending) = carry.take() {
        batch[0] = Some(pending);
        filled = 1;
    }
    let net = machine.devices.net().expect("checked at start");
    while filled < batch.len() && carry.is_none() {
        let Some(datagram) = net.poll(Some(port)) else {
            if filled > 0 {
                break;
            }
            if key_pressed() {
                return (0, Some("key"));
            }
            net.wait(&Waiter::new(IDLE_WAIT_MS));
            continue;
        };
        let payload = datagram.payload();
        if payload == STOP {
            net.release(datagram);
            return (filled, Some("stop"));
        }
        let peer = (datagram.src_ip, datagram.src_mac, datagram.src_port);
        let Some((n, body)) = parse_request(payload) else {
            counters.malformed += 1;
            net.release(datagram);
            continue;
        };
        let mut pending = Pending {
            n,
            len: body.len().min(PAYLOAD_MAX),
            payload: [0; PAYLOAD_MAX],
            peer,
            outcome: Outcome::Open,
            same_as: None,
        };
        pending.payload[..pending.len].copy_from_slice(&body[..pending.len]);
        if body.len() > PAYLOAD_MAX {
            pending.outcome = Outcome::Failed("payload-too-long");
        }
        net.release(datagram);
        counters.received += 1;
        let sector = layout.sector_of(n);
        let earlier = batch[..filled].iter().flatten().position(|other| {
            other.outcome == Outcome::Open && layout.sector_of(other.n) == sector
        });
        match earlier {
            Some(i) if batch[i].as_ref().is_some_and(|other| other.n != n) => {
                *carry = Some(pending);
                break;
            }
            Some(i) if pending.outcome == Outcome::Open => pending.same_as = Some(i),
            _ => {}
        }
        batch[filled] = Some(pending);
        filled += 1;
    }
    (filled, None)
}

/// Journals a batch: reads the sectors of its open requests into `buffer` (sector `i` of the
/// buffer for request `i`), writes the records not already there, flushes once, and settles every
/// request's outcome.
fn journal(
    machine: &mut Machine,
    layout: &Layout,
    buffer: &mut DmaBuf,
    batch: &mut [Option<Pending>],
    counters: &mut Counters,
) {
    let blk = machine.devices.blk(layout.dev).expect("checked at start");
    let base = buffer.addr();
    let slot = |i: usize| base + (i * SECTOR) as u64;
    let n_of = |batch: &[Option<Pending>], i: usize| batch[i].as_ref().map_or(0, |p| p.n);
    let mut reads = [0usize; BATCH_MAX];
    let mut listed = 0;
    for (i, pending) in batch.iter().enumerate() {
        if pending
            .as_ref()
            .is_some_and(|p| p.outcome == Outcome::Open && p.same_as.is_none())
        {
            reads[listed] = i;
            listed += 1;
        }
    }
    counters.batches += 1;
    let read = pipeline(blk, listed as u64, listed.max(1), |k, _| {
        let i = reads[k as usize];
        Request {
            kind: T_IN,
            sector: layout.sector_of(n_of(batch, i)),
            addr: slot(i),
            len: SECTOR as u64,
        }
    });
    let mut writes = [0usize; BATCH_MAX];
    let mut written = 0;
    for &i in &reads[..listed] {
        let Some(p) = batch[i].as_mut() else {
            continue;
        };
        if read.is_err() {
            p.outcome = Outcome::Failed("io");
            continue;
        }
        let sector = &mut buffer.bytes_mut()[i * SECTOR..(i + 1) * SECTOR];
        if let Some(stored) = read_record(sector, p.n) {
            p.outcome = Outcome::Replayed(digest(p.n, stored));
            continue;
        }
        write_record(sector, p.n, p.payload());
        writes[written] = i;
        written += 1;
    }
    let mut result = pipeline(blk, written as u64, written.max(1), |k, _| {
        let i = writes[k as usize];
        Request {
            kind: T_OUT,
            sector: layout.sector_of(n_of(batch, i)),
            addr: slot(i),
            len: SECTOR as u64,
        }
    });
    // The flush is what makes the records durable: no reply leaves before it completed.
    if written > 0 && result.is_ok() && blk.has_flush() {
        counters.flushes += 1;
        let status = blk.request(T_FLUSH, 0, 0, 0, REQUEST_TIMEOUT_MS);
        if status != Status::Ok {
            result = Err(status);
        }
    }
    for &i in &writes[..written] {
        if let Some(p) = batch[i].as_mut() {
            p.outcome = match result {
                Ok(()) => Outcome::Journaled(digest(p.n, p.payload())),
                Err(_) => Outcome::Failed("io"),
            };
        }
    }
    // Requests repeated within the batch take the outcome of their first copy.
    for i in 0..batch.len() {
        let Some(first) = batch[i].as_ref().and_then(|p| p.same_as) else {
            continue;
        };
        let outcome = match batch[first].as_ref().map(|p| p.outcome) {
            Some(Outcome::Journaled(d) | Outcome::Replayed(d)) => Outcome::Replayed(d),
            Some(Outcome::Failed(reason)) => Outcome::Failed(reason),
            _ => Outcome::Failed("io"),
        };
        if let Some(p) = batch[i].as_mut() {
            p.outcome = outcome;
        }
    }
}

/// Sends every request of the batch its answer and empties the batch.
fn reply(machine: &mut Machine, port: u16, batch: &mut [Option<Pending>], counters: &mut Counters) {
    let net = machine.devices.net().expect("checked at start");
    let last = batch.len() - 1;
    for (i, entry) in batch.iter_mut().enumerate() {
        let Some(p) = entry.take() else { continue };
        match p.outcome {
            Outcome::Journaled(_) => counters.journaled += 1,
            Outcome::Replayed(_) => counters.replayed += 1,
            Outcome::Failed(_) | Outcome::Open => counters.failed += 1,
        }
        let mut text = [0u8; REPLY_MAX];
        let len = format_reply(&mut text, p.n, p.outcome);
        net.send_udp(p.peer, port, len, i == last, |out| {
            out.copy_from_slice(&text[..len])
        });
    }
    net.dev.flush_tx();
}
