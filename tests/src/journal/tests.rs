//! The client against in-process stand-ins for the guest's service on loopback, and the checker
//! against images built here.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::*;

/// How a stand-in service misbehaves.
#[derive(Clone, Copy)]
enum Fault {
    /// Answers every request correctly.
    None,
    /// Ignores the first send of every third request (the client must resend).
    DropFirstOfEveryThird,
    /// Answers request 3 twice, the second time with another digest.
    ContradictOnThree,
    /// Never answers.
    Silent,
}

/// A service on loopback that answers `REQ` datagrams as the guest does, from memory.
struct StandIn {
    addr: SocketAddr,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StandIn {
    fn start(fault: Fault) -> StandIn {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let text = &buf[..len];
                let rest = text.strip_prefix(b"REQ ").unwrap();
                let space = rest.iter().position(|b| *b == b' ').unwrap();
                let n: u64 = std::str::from_utf8(&rest[..space])
                    .unwrap()
                    .parse()
                    .unwrap();
                let payload = &rest[space + 1..];
                let times = seen.entry(n).or_default();
                *times += 1;
                let answer = |d: u64| format!("ACK {n} {d:016x}");
                match fault {
                    Fault::Silent => continue,
                    Fault::DropFirstOfEveryThird if n.is_multiple_of(3) && *times == 1 => continue,
                    Fault::ContradictOnThree if n == 3 => {
                        socket
                            .send_to(answer(digest(n, payload)).as_bytes(), from)
                            .unwrap();
                        socket
                            .send_to(answer(digest(n, b"other")).as_bytes(), from)
                            .unwrap();
                    }
                    _ => {
                        socket
                            .send_to(answer(digest(n, payload)).as_bytes(), from)
                            .unwrap();
                    }
                }
            }
        });
        StandIn {
            addr,
            done,
            thread: Some(thread),
        }
    }

    fn config(&self, count: u64) -> ClientConfig {
        let mut config = ClientConfig::new(self.addr, count);
        config.bind = "127.0.0.1:0".parse().unwrap();
        config.resend_after = Duration::from_millis(30);
        config.deadline = Duration::from_secs(20);
        config
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn every_request_is_answered_once_with_its_digest() {
    let service = StandIn::start(Fault::None);
    let report = run_client(&service.config(200)).unwrap();
    assert_eq!(report.answered.len(), 200, "{report}");
    assert!(
        report.gaps().is_empty() && report.unanswered.is_empty(),
        "{report}"
    );
    assert!(report.consistent(), "{report}");
    assert_eq!(report.stopped_by, StoppedBy::Count);
    assert_eq!(report.sent, 200);
    let n = 17;
    assert_eq!(
        report.answered[&n].digest,
        digest(n, &request_payload(n, 64))
    );
    let p50 = report.latency_percentile(50.0).unwrap();
    let p99 = report.latency_percentile(99.0).unwrap();
    assert!(p50 <= p99 && p99 <= report.latency_percentile(100.0).unwrap());
}

#[test]
fn lost_datagrams_are_resent_until_answered() {
    let service = StandIn::start(Fault::DropFirstOfEveryThird);
    let report = run_client(&service.config(60)).unwrap();
    assert_eq!(report.answered.len(), 60, "{report}");
    assert!(
        report.resent >= 20,
        "every third request needed a resend: {report}"
    );
    assert!(report.answered[&3].sends >= 2, "{:?}", report.answered[&3]);
    assert!(report.consistent(), "{report}");
}

#[test]
fn a_second_answer_with_another_digest_is_a_conflict() {
    let service = StandIn::start(Fault::ContradictOnThree);
    let mut config = service.config(10);
    // One request at a time: the contradiction arrives before the next request's answer.
    config.window = 1;
    let report = run_client(&config).unwrap();
    let journal = Journal {
        slots: 100,
        records: (1..=10)
            .map(|n| {
                let payload = request_payload(n, 64);
                let record = Record {
                    n,
                    digest: digest(n, &payload),
                    payload,
                };
                (n, record)
            })
            .collect(),
        corrupt: Vec::new(),
    };
    assert!(journal.lost(&report).is_empty());
    assert_eq!(
        report.conflicts,
        vec![Conflict {
            n: 3,
            first: digest(3, &request_payload(3, 64)),
            later: digest(3, b"other"),
        }],
        "{report}"
    );
    assert!(!report.consistent());
}

#[test]
fn a_silent_service_is_given_up_on_within_bounds() {
    let service = StandIn::start(Fault::Silent);
    let mut config = service.config(20);
    config.max_sends = 3;
    let report = run_client(&config).unwrap();
    assert!(report.answered.is_empty());
    assert_eq!(report.unanswered.len(), 20, "{report}");
    assert_eq!(report.gaps(), (1..=20).collect::<Vec<_>>());
    assert_eq!(report.resent, 40, "{report}");
    assert_eq!(report.stopped_by, StoppedBy::Count);
    assert!(report.latency_percentile(50.0).is_none());

    config.max_sends = 1000;
    config.deadline = Duration::from_millis(300);
    let report = run_client(&config).unwrap();
    assert_eq!(report.stopped_by, StoppedBy::Deadline, "{report}");
    assert_eq!(
        report.unanswered.len(),
        8,
        "the window's requests: {report}"
    );
}

#[test]
fn replies_parse_and_requests_are_stable() {
    assert_eq!(
        parse_reply(b"ACK 12 00000000000000ff"),
        Some(Reply::Ack(12, 0xff))
    );
    assert_eq!(parse_reply(b"ERR 4 io"), Some(Reply::Err(4, "io")));
    assert_eq!(parse_reply(b"ACK 12 ff"), None);
    assert_eq!(parse_reply(b"ACK x 00000000000000ff"), None);
    assert_eq!(request_payload(5, 40), request_payload(5, 40));
    assert_ne!(request_payload(5, 40), request_payload(6, 40));
    assert_eq!(request_datagram(7, b"abc"), b"REQ 7 abc");
    // FNV-1a 64 of the eight zero bytes of n = 0 and an empty payload.
    assert_eq!(digest(0, b""), fnv1a64(&[0; 8]));
}

/// An image of `sectors` sectors with a header and the records of `ns` (64-byte payloads).
fn image(sectors: u64, ns: impl IntoIterator<Item = u64>) -> Vec<u8> {
    let mut image = vec![0u8; sectors as usize * SECTOR];
    let slots = sectors - 1;
    image[..SECTOR].copy_from_slice(&header_sector(slots));
    for n in ns {
        let at = (1 + n % slots) as usize * SECTOR;
        image[at..at + SECTOR].copy_from_slice(&record_sector(n, &request_payload(n, 64)));
    }
    image
}

fn answered(ns: impl IntoIterator<Item = u64>) -> ClientReport {
    let answered = ns
        .into_iter()
        .map(|n| {
            let answer = Answer {
                digest: digest(n, &request_payload(n, 64)),
                at: Duration::ZERO,
                latency: Duration::ZERO,
                sends: 1,
            };
            (n, answer)
        })
        .collect::<BTreeMap<_, _>>();
    ClientReport {
        count: answered.len() as u64,
        answered,
        conflicts: Vec::new(),
        wrong_digest: Vec::new(),
        repeats: 0,
        errors: Vec::new(),
        unanswered: BTreeSet::new(),
        unexpected: 0,
        sent: 0,
        resent: 0,
        elapsed: Duration::from_secs(1),
        stopped_by: StoppedBy::Count,
        first: 1,
    }
}

#[test]
fn the_checker_finds_every_record_and_refuses_damaged_ones() {
    let good = image(64, 1..=40);
    let journal = Journal::parse(&good).unwrap();
    assert_eq!(journal.slots, 63);
    assert_eq!(journal.records.len(), 40);
    assert!(journal.corrupt.is_empty());
    let report = answered(1..=40);
    assert!(journal.lost(&report).is_empty());

    // A flipped payload byte: the checksum no longer matches, the record is not counted.
    let mut flipped = good.clone();
    flipped[(1 + 7) * SECTOR + 30] ^= 1;
    let journal = Journal::parse(&flipped).unwrap();
    assert_eq!(journal.corrupt, vec![8]);
    assert_eq!(
        journal.lost(&report),
        vec![(7, report.answered[&7].digest, None)]
    );

    // A record never written (the sector left as it was).
    let missing = image(64, (1..=40).filter(|n| *n != 12));
    let journal = Journal::parse(&missing).unwrap();
    assert!(journal.corrupt.is_empty());
    assert_eq!(journal.lost(&report).len(), 1);

    // A valid record in a sector its number does not map to.
    let mut moved = good.clone();
    let record = record_sector(5, &request_payload(5, 64));
    moved[50 * SECTOR..51 * SECTOR].copy_from_slice(&record);
    assert_eq!(Journal::parse(&moved).unwrap().corrupt, vec![50]);

    // A record with another payload than the one answered.
    let mut other = good.clone();
    other[(1 + 9) * SECTOR..(2 + 9) * SECTOR].copy_from_slice(&record_sector(9, b"changed"));
    let lost = Journal::parse(&other).unwrap().lost(&report);
    assert_eq!(
        lost,
        vec![(9, report.answered[&9].digest, Some(digest(9, b"changed")))]
    );

    let mut headless = good;
    headless[3] ^= 1;
    assert!(matches!(
        Journal::parse(&headless),
        Err(JournalError::BadHeader("magic"))
    ));
    assert!(Journal::parse(&[0u8; 100]).is_err());
}
