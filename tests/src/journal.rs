//! The host side of the test guest's journal workload (`net udp-journal`, tests/guest/README.md
//! "Journal workload"), the fault-tolerance tests' measure of "nothing acknowledged is lost":
//! a UDP client that sends numbered requests with a window of them in flight, resends what goes
//! unanswered and records every answer; and a checker that reads the journal back out of a disk
//! image and compares it with what the client saw answered.
//!
//! The formats are the guest's: request `REQ <n> <payload>`, answer `ACK <n> <digest>` (16
//! lowercase hex digits) or `ERR <n> <reason>`; the digest is [`digest`]`(n, payload)`. The disk
//! holds a header in sector 0 and request `n`'s record in sector `1 + n % slots`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::pattern::fnv1a64;

/// Bytes per journal sector.
pub const SECTOR: usize = 512;
/// First bytes of a record.
pub const RECORD_MAGIC: &[u8; 8] = b"LKSJREC1";
/// First bytes of the header (sector 0).
pub const HEADER_MAGIC: &[u8; 8] = b"LKSJHDR1";
/// The header's format version.
pub const VERSION: u32 = 1;
/// Largest payload the guest journals (longer ones get `ERR <n> payload-too-long`).
pub const PAYLOAD_MAX: usize = 256;
const PAYLOAD_AT: usize = 24;
const CHECKSUM_AT: usize = SECTOR - 8;

/// The digest an `ACK` carries: FNV-1a 64 of `n` (u64 little-endian) then the payload.
pub fn digest(n: u64, payload: &[u8]) -> u64 {
    let mut bytes = n.to_le_bytes().to_vec();
    bytes.extend_from_slice(payload);
    fnv1a64(&bytes)
}

/// The payload the client sends with request `n`: `size` lowercase letters from a generator
/// seeded with `n`, so a resend carries the same bytes and the digest is known in advance.
pub fn request_payload(n: u64, size: usize) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

/// The datagram of request `n`: `REQ <n> <payload>`.
pub fn request_datagram(n: u64, payload: &[u8]) -> Vec<u8> {
    let mut datagram = format!("REQ {n} ").into_bytes();
    datagram.extend_from_slice(payload);
    datagram
}

/// What the client sends and how long it keeps at it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The guest's address and the service's port.
    pub target: SocketAddr,
    /// Local address to send from (port 0 for any).
    pub bind: SocketAddr,
    /// The first request number; requests `first .. first + count` are sent.
    pub first: u64,
    /// How many requests.
    pub count: u64,
    /// Most requests sent and not yet answered.
    pub window: usize,
    /// Payload bytes per request (at most [`PAYLOAD_MAX`] for the guest to journal it).
    pub payload_size: usize,
    /// A request unanswered this long is sent again.
    pub resend_after: Duration,
    /// A request sent this many times without an answer is given up.
    pub max_sends: u32,
    /// The client stops when this much time has passed, answered or not.
    pub deadline: Duration,
    /// The client stops when requests are in flight and no answer came for this long (the
    /// service is gone; keep it above a failover's length).
    pub quiet_limit: Duration,
}

impl ClientConfig {
    /// Requests `1..=count` to `target` from any local port, 8 in flight, 64-byte payloads,
    /// resent every 200 ms up to 25 times, for at most 60 s or 10 s without an answer.
    pub fn new(target: SocketAddr, count: u64) -> Self {
        let bind = match target {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        ClientConfig {
            target,
            bind,
            first: 1,
            count,
            window: 8,
            payload_size: 64,
            resend_after: Duration::from_millis(200),
            max_sends: 25,
            deadline: Duration::from_secs(60),
            quiet_limit: Duration::from_secs(10),
        }
    }
}

/// The first answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The digest it carried.
    pub digest: u64,
    /// When it arrived, from the client's start.
    pub at: Duration,
    /// From the request's first send to this answer.
    pub latency: Duration,
    /// How often the request had been sent by then.
    pub sends: u32,
}

/// Two answers to the same request with different digests: the service contradicted itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The request.
    pub n: u64,
    /// The digest of the first answer.
    pub first: u64,
    /// The digest of a later one.
    pub later: u64,
}

/// Why the client stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoppedBy {
    /// Every request was answered or given up.
    Count,
    /// The deadline passed first.
    Deadline,
    /// No answer came for the quiet limit.
    Quiet,
}

/// What the client saw.
#[derive(Debug, Clone)]
pub struct ClientReport {
    /// The first answer to every answered request, by request number.
    pub answered: BTreeMap<u64, Answer>,
    /// Later answers whose digest differs from the first (must be empty).
    pub conflicts: Vec<Conflict>,
    /// Answers whose digest is not that of the payload sent (must be empty).
    pub wrong_digest: Vec<(u64, u64)>,
    /// Later answers with the first's digest (resends both answered, or late duplicates).
    pub repeats: u64,
    /// `ERR` answers: request and reason.
    pub errors: Vec<(u64, String)>,
    /// Requests given up or still unanswered at the end.
    pub unanswered: BTreeSet<u64>,
    /// Datagrams that were not an answer to a request of this run.
    pub unexpected: u64,
    /// Requests sent (first sends).
    pub sent: u64,
    /// Sends beyond the first.
    pub resent: u64,
    /// How long the run took.
    pub elapsed: Duration,
    /// Why it stopped.
    pub stopped_by: StoppedBy,
    first: u64,
    count: u64,
}

impl ClientReport {
    /// Requests of the run that got no `ACK`, in order.
    pub fn gaps(&self) -> Vec<u64> {
        (self.first..self.first + self.count)
            .filter(|n| !self.answered.contains_key(n))
            .collect()
    }

    /// The `p`-th percentile (0..=100, nearest rank) of the answered requests' latencies.
    pub fn latency_percentile(&self, p: f64) -> Option<Duration> {
        let mut latencies: Vec<Duration> = self.answered.values().map(|a| a.latency).collect();
        if latencies.is_empty() {
            return None;
        }
        latencies.sort();
        let rank = ((p.clamp(0.0, 100.0) / 100.0) * latencies.len() as f64).ceil() as usize;
        Some(latencies[rank.clamp(1, latencies.len()) - 1])
    }

    /// Answered requests per second over the run.
    pub fn throughput(&self) -> f64 {
        self.answered.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Whether the service never contradicted itself or the payloads it was sent.
    pub fn consistent(&self) -> bool {
        self.conflicts.is_empty() && self.wrong_digest.is_empty() && self.errors.is_empty()
    }
}

impl fmt::Display for ClientReport {
    /// One line: `answered=<n> gaps=<n> conflicts=<n> ... p50_us=<n> p99_us=<n>`.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let us = |p| self.latency_percentile(p).map_or(0, |d| d.as_micros());
        write!(
            f,
            "answered={} gaps={} conflicts={} wrong_digest={} errors={} repeats={} unexpected={} \
             sent={} resent={} elapsed_ms={} per_s={:.0} p50_us={} p99_us={} max_us={} stopped_by={:?}",
            self.answered.len(),
            self.gaps().len(),
            self.conflicts.len(),
            self.wrong_digest.len(),
            self.errors.len(),
            self.repeats,
            self.unexpected,
            self.sent,
            self.resent,
            self.elapsed.as_millis(),
            self.throughput(),
            us(50.0),
            us(99.0),
            us(100.0),
            self.stopped_by,
        )
    }
}

/// A reply from the service.
#[derive(Debug, PartialEq, Eq)]
enum Reply<'a> {
    Ack(u64, u64),
    Err(u64, &'a str),
}

fn parse_reply(datagram: &[u8]) -> Option<Reply<'_>> {
    let text = std::str::from_utf8(datagram).ok()?;
    let mut words = text.splitn(3, ' ');
    let (tag, n, rest) = (words.next()?, words.next()?, words.next()?);
    let n = n.parse().ok()?;
    match tag {
        "ACK" if rest.len() == 16 => Some(Reply::Ack(n, u64::from_str_radix(rest, 16).ok()?)),
        "ERR" => Some(Reply::Err(n, rest)),
        _ => None,
    }
}

/// One request in flight.
struct InFlight {
    first_sent: Instant,
    last_sent: Instant,
    sends: u32,
}

/// Sends requests `first .. first + count` to the service, at most `window` unanswered at a
/// time, resending each after `resend_after` up to `max_sends` times, until every request is
/// answered or given up, the deadline passes, or nothing was answered for the quiet limit. Call it from a thread in the guest's network
/// namespace ([`crate::netns::NetNs::run`]). Fails only if the socket does.
pub fn run_client(config: &ClientConfig) -> io::Result<ClientReport> {
    let socket = UdpSocket::bind(config.bind)?;
    let start = Instant::now();
    let deadline = start + config.deadline;
    let end = config.first + config.count;
    let payload = |n| request_payload(n, config.payload_size);
    let mut report = ClientReport {
        answered: BTreeMap::new(),
        conflicts: Vec::new(),
        wrong_digest: Vec::new(),
        repeats: 0,
        errors: Vec::new(),
        unanswered: BTreeSet::new(),
        unexpected: 0,
        sent: 0,
        resent: 0,
        elapsed: Duration::ZERO,
        stopped_by: StoppedBy::Count,
        first: config.first,
        count: config.count,
    };
    let mut in_flight: BTreeMap<u64, InFlight> = BTreeMap::new();
    let mut next = config.first;
    let mut buffer = [0u8; 2048];
    let mut last_answer = start;
    loop {
        let now = Instant::now();
        if now >= deadline {
            report.stopped_by = StoppedBy::Deadline;
            break;
        }
        if !in_flight.is_empty() && now >= last_answer + config.quiet_limit {
            report.stopped_by = StoppedBy::Quiet;
            break;
        }
        while in_flight.len() < config.window.max(1) && next < end {
            socket.send_to(&request_datagram(next, &payload(next)), config.target)?;
            report.sent += 1;
            in_flight.insert(
                next,
                InFlight {
                    first_sent: now,
                    last_sent: now,
                    sends: 1,
                },
            );
            next += 1;
        }
        if in_flight.is_empty() && next == end {
            break;
        }
        let mut given_up = Vec::new();
        for (n, request) in in_flight.iter_mut() {
            if now < request.last_sent + config.resend_after {
                continue;
            }
            if request.sends >= config.max_sends {
                given_up.push(*n);
                continue;
            }
            socket.send_to(&request_datagram(*n, &payload(*n)), config.target)?;
            request.sends += 1;
            request.last_sent = now;
            report.resent += 1;
        }
        let freed = !given_up.is_empty();
        for n in given_up {
            in_flight.remove(&n);
            report.unanswered.insert(n);
        }
        if freed {
            // Room in the window: send the next requests before waiting.
            continue;
        }
        let wake = in_flight
            .values()
            .map(|r| r.last_sent + config.resend_after)
            .min()
            .unwrap_or(deadline)
            .min(deadline)
            .min(last_answer + config.quiet_limit);
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait))?;
        let (len, from) = match socket.recv_from(&mut buffer) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let arrived = Instant::now();
        let reply = parse_reply(&buffer[..len]).filter(|_| from == config.target);
        if reply.is_some() {
            last_answer = arrived;
        }
        match reply {
            Some(Reply::Ack(n, got)) if (config.first..end).contains(&n) && n < next => {
                if got != digest(n, &payload(n)) {
                    report.wrong_digest.push((n, got));
                }
                match report.answered.get(&n) {
                    Some(first) if first.digest != got => report.conflicts.push(Conflict {
                        n,
                        first: first.digest,
                        later: got,
                    }),
                    Some(_) => report.repeats += 1,
                    None => {
                        let (first_sent, sends) = match in_flight.remove(&n) {
                            Some(r) => (r.first_sent, r.sends),
                            // Given up on, then answered after all: latency unknown past
                            // the give-up, counted from the start of the run.
                            None => (start, config.max_sends),
                        };
                        report.unanswered.remove(&n);
                        report.answered.insert(
                            n,
                            Answer {
                                digest: got,
                                at: arrived - start,
                                latency: arrived - first_sent,
                                sends,
                            },
                        );
                    }
                }
            }
            Some(Reply::Err(n, reason)) if (config.first..end).contains(&n) && n < next => {
                in_flight.remove(&n);
                report.errors.push((n, reason.to_string()));
            }
            _ => report.unexpected += 1,
        }
    }
    report.unanswered.extend(in_flight.keys());
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Sends `stop` to the service from `bind` (ends `net udp-journal`).
pub fn send_stop(bind: SocketAddr, target: SocketAddr) -> io::Result<()> {
    UdpSocket::bind(bind)?.send_to(b"stop", target).map(|_| ())
}

/// One valid record found on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The request number.
    pub n: u64,
    /// The payload journaled.
    pub payload: Vec<u8>,
    /// Its digest, as an `ACK` carries it.
    pub digest: u64,
}

/// The journal as read from a disk image.
#[derive(Debug, Clone)]
pub struct Journal {
    /// Record slots (the image's sectors less the header).
    pub slots: u64,
    /// Valid records by request number.
    pub records: BTreeMap<u64, Record>,
    /// Sectors that start like a record but are not a valid one (bad checksum, length, or a
    /// number that belongs in another sector).
    pub corrupt: Vec<u64>,
}

/// Why an image holds no journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The image could not be read.
    #[error("reading the image: {0}")]
    Io(#[source] io::Error),
    /// Sector 0 is not a valid journal header.
    #[error("no journal header in sector 0: {0}")]
    BadHeader(&'static str),
}

fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))
}

fn sealed(sector: &[u8]) -> bool {
    le_u64(&sector[CHECKSUM_AT..]) == fnv1a64(&sector[..CHECKSUM_AT])
}

/// The sector image of request `n`'s record, as the guest writes it (for tests of the checker).
pub fn record_sector(n: u64, payload: &[u8]) -> [u8; SECTOR] {
    let mut sector = [0u8; SECTOR];
    sector[..8].copy_from_slice(RECORD_MAGIC);
    sector[8..16].copy_from_slice(&n.to_le_bytes());
    sector[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    sector[PAYLOAD_AT..PAYLOAD_AT + payload.len()].copy_from_slice(payload);
    let sum = fnv1a64(&sector[..CHECKSUM_AT]);
    sector[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
    sector
}

/// The header sector for `slots` records, as the guest writes it.
pub fn header_sector(slots: u64) -> [u8; SECTOR] {
    let mut sector = [0u8; SECTOR];
    sector[..8].copy_from_slice(HEADER_MAGIC);
    sector[8..12].copy_from_slice(&VERSION.to_le_bytes());
    sector[12..16].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    sector[16..24].copy_from_slice(&1u64.to_le_bytes());
    sector[24..32].copy_from_slice(&slots.to_le_bytes());
    let sum = fnv1a64(&sector[..CHECKSUM_AT]);
    sector[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
    sector
}

impl Journal {
    /// Reads the journal of a raw disk image file.
    pub fn read(path: &Path) -> Result<Journal, JournalError> {
        Journal::parse(&std::fs::read(path).map_err(JournalError::Io)?)
    }

    /// Reads the journal of a raw disk image: checks the header, then takes every sector that
    /// holds a valid record of a request that belongs there.
    pub fn parse(image: &[u8]) -> Result<Journal, JournalError> {
        let header = image
            .get(..SECTOR)
            .ok_or(JournalError::BadHeader("image shorter than a sector"))?;
        if !header.starts_with(HEADER_MAGIC) {
            return Err(JournalError::BadHeader("magic"));
        }
        if !sealed(header) {
            return Err(JournalError::BadHeader("checksum"));
        }
        if le_u32(&header[8..]) != VERSION
            || le_u32(&header[12..]) != SECTOR as u32
            || le_u64(&header[16..]) != 1
        {
            return Err(JournalError::BadHeader("version or layout"));
        }
        let slots = le_u64(&header[24..]);
        if slots == 0 || slots > (image.len() / SECTOR) as u64 - 1 {
            return Err(JournalError::BadHeader("slot count beyond the image"));
        }
        let mut journal = Journal {
            slots,
            records: BTreeMap::new(),
            corrupt: Vec::new(),
        };
        for s in 1..=slots {
            let sector = &image[s as usize * SECTOR..(s as usize + 1) * SECTOR];
            if !sector.starts_with(RECORD_MAGIC) {
                continue;
            }
            let (n, len) = (le_u64(&sector[8..]), le_u32(&sector[16..]) as usize);
            if !sealed(sector) || len > PAYLOAD_MAX || 1 + n % slots != s {
                journal.corrupt.push(s);
                continue;
            }
            let payload = sector[PAYLOAD_AT..PAYLOAD_AT + len].to_vec();
            let digest = digest(n, &payload);
            journal.records.insert(n, Record { n, payload, digest });
        }
        Ok(journal)
    }

    /// Every request the client saw answered whose record is missing from the journal or
    /// carries another digest: (request, the answer's digest, the record's digest if any).
    pub fn lost(&self, report: &ClientReport) -> Vec<(u64, u64, Option<u64>)> {
        report
            .answered
            .iter()
            .filter_map(|(n, answer)| {
                let found = self.records.get(n).map(|r| r.digest);
                (found != Some(answer.digest)).then_some((*n, answer.digest, found))
            })
            .collect()
    }
}

/// Checks that every request `report` saw answered is in the journal of `image` with the
/// digest it was answered with, that the service never contradicted itself, and that no
/// journal sector is corrupt. Returns the journal, or what is wrong.
pub fn check_answered_on_disk(report: &ClientReport, image: &Path) -> Result<Journal, String> {
    let journal = Journal::read(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let lost = journal.lost(report);
    if !lost.is_empty() {
        return Err(format!(
            "{} answered requests are not on {} as answered (request, answered digest, \
             record's digest): {:?}\nclient: {report}",
            lost.len(),
            image.display(),
            &lost[..lost.len().min(20)]
        ));
    }
    if !report.consistent() {
        return Err(format!(
            "the service contradicted itself: conflicts {:?}, wrong digests {:?}, errors {:?}",
            report.conflicts, report.wrong_digest, report.errors
        ));
    }
    if !journal.corrupt.is_empty() {
        return Err(format!(
            "corrupt journal sectors on {}: {:?}",
            image.display(),
            journal.corrupt
        ));
    }
    Ok(journal)
}

/// [`check_answered_on_disk`], panicking with what is wrong.
pub fn assert_answered_on_disk(report: &ClientReport, image: &Path) -> Journal {
    check_answered_on_disk(report, image).unwrap_or_else(|e| panic!("{e}"))
}

/// The test guest running `script` (a journal service, then the monitor) as `name`, with `disk`
/// as its journal (write-back: flushes reach the image) and `ns`'s tap with `mac`.
pub fn journal_vm(
    ns: &crate::netns::NetNs,
    disk: &Path,
    script: &str,
    name: &str,
    mac: &str,
) -> crate::VmConfigBuilder {
    use serde_json::json;
    crate::VmConfigBuilder::new(&crate::guest_images().elf)
        .boot_args(&format!(
            "lks.mode=monitor lks.ip={}/24 lks.run=\"{script}\"",
            ns.guest_ip()
        ))
        .set("name", json!(name))
        .set(
            "drives",
            json!([{ "drive_id": "journal", "path_on_host": disk, "is_root_device": false,
                     "is_read_only": false, "cache_type": "Writeback" }]),
        )
        .set(
            "network-interfaces",
            json!([{ "iface_id": "eth0", "host_dev_name": ns.tap(), "guest_mac": mac }]),
        )
}

#[cfg(test)]
mod tests;
