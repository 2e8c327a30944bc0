//! `bench/run.sh ft`: fault tolerance's cost and its failover time (issue #13, point 8).
//!
//! Two `lockstep host` processes (the release build, `LKS_LOCKSTEP_BIN`) on a bridge in a network
//! namespace of the benchmark's own, each VM port on its own tap, each side with its own disk
//! image, and a private etcd in the namespace as the arbiter. For each epoch length and run:
//!
//! - *journal*: a 256 MiB test guest serving `net udp-journal` (every request journaled to its
//!   disk and flushed before the answer). The client (`lockstep_tests::journal`) keeps `window`
//!   requests in flight for `seconds`: first with the VM unpaired (FT off), then paired (FT on),
//!   the same VM in the same run; throughput and p99 latency of each, and the pairing's pause
//!   percentiles and replication rate from its status. Then the primary's host is killed
//!   (SIGKILL) under load, with the taps and the namespace's loopback captured: failover is the
//!   primary's last frame to the secondary (a heartbeat or checkpoint, on loopback) to the first
//!   frame of the guest's on the secondary's tap; the kill to that frame, and the kill to the
//!   client's first answer after it, are the cross-checks.
//! - *memdirty*: a 256 MiB test guest rewriting 64 MiB at `dirty` MiB/s, paired for
//!   `dirty-seconds`:
//!   the pause percentiles and replication rate with a steady stream of dirty pages.
//!
//! Prints a Markdown table (medians, ranges) and writes every run's figures as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_tests::etcd::Etcd;
use lockstep_tests::host::TestHost;
use lockstep_tests::journal::{run_client, ClientConfig, ClientReport, SECTOR};
use lockstep_tests::netns::{NetNs, SeenAt};
use lockstep_tests::{guest_images, VmConfigBuilder};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);
const VM: &str = "bench";
const PORT: u16 = 7100;
const MAC: [u8; 6] = [0x06, 0x00, 0x0a, 0x4d, 0x00, 0x1f];
/// 16 MiB of journal: a header and 32767 record slots.
const DISK_SECTORS: u64 = 32768;
/// Requests in flight while the primary is killed.
const FAILOVER_WINDOW: usize = 8;

/// What to run, from the command line.
#[derive(Debug, Clone)]
struct Options {
    runs: usize,
    epochs: Vec<u64>,
    window: usize,
    seconds: u64,
    mem_mib: u64,
    dirty_mib_s: u64,
    dirty_seconds: u64,
    heartbeat_ms: u64,
    json: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: ft_bench [--runs N] [--epochs 25,50,100] [--window W] [--seconds S] \
         [--mem-mib M] [--dirty MiB/s] [--dirty-seconds S] [--heartbeat-ms T] [--json PATH]"
    );
    std::process::exit(2)
}

fn options() -> Options {
    let mut o = Options {
        runs: 5,
        epochs: vec![25, 50, 100],
        window: 256,
        seconds: 5,
        mem_mib: 256,
        dirty_mib_s: 50,
        dirty_seconds: 10,
        heartbeat_ms: 100,
        json: PathBuf::from("target/bench/ft.json"),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        let number = || value.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--runs" => o.runs = number() as usize,
            "--window" => o.window = number() as usize,
            "--seconds" => o.seconds = number(),
            "--mem-mib" => o.mem_mib = number(),
            "--dirty" => o.dirty_mib_s = number(),
            "--dirty-seconds" => o.dirty_seconds = number(),
            "--heartbeat-ms" => o.heartbeat_ms = number(),
            "--json" => o.json = PathBuf::from(value),
            "--epochs" => {
                o.epochs = value
                    .split(',')
                    .map(|e| e.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            _ => usage(),
        }
    }
    if o.runs == 0 || o.epochs.is_empty() || o.window == 0 || o.seconds == 0 {
        usage()
    }
    o
}

fn mac_text() -> String {
    MAC.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn journal_vm(o: &Options, ns: &NetNs, disk: &Path) -> Value {
    let script = format!("net udp-journal {PORT}");
    lockstep_tests::journal::journal_vm(ns, disk, &script, VM, &mac_text())
        .mem_mib(o.mem_mib)
        .build()
}

fn memdirty_vm(o: &Options) -> Value {
    VmConfigBuilder::new(&guest_images().elf)
        .boot_args(&format!(
            "lks.mode=run lks.run=\"memdirty 64 {} 3600\"",
            o.dirty_mib_s
        ))
        .mem_mib(o.mem_mib)
        .set("name", json!(VM))
        .build()
}

fn migration(host: &TestHost, id: &str) -> Value {
    let reply = host.call(
        "GET",
        "/v1/migrations/{id}",
        &format!("/v1/migrations/{id}"),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

fn wait_for(host: &TestHost, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    host.wait_migration(id, what, WAIT, check)
}

/// A VM on `primary` paired with `secondary`: the pairing's ids and the secondary's listening
/// port, once a few checkpoints were acknowledged.
struct Pairing {
    out_id: String,
    in_id: String,
    port: u16,
}

fn pair(
    o: &Options,
    etcd: &Etcd,
    primary: &TestHost,
    secondary: &TestHost,
    epoch_ms: u64,
    pair_id: &str,
    overrides: Value,
) -> Pairing {
    let ft = |host: &str| {
        json!({ "arbiter": [etcd.endpoint().to_string()], "host_id": host, "pair": pair_id,
                "epoch_ms": epoch_ms, "heartbeat_timeout_ms": o.heartbeat_ms })
    };
    let mut body = json!({ "listen": "127.0.0.1:0", "name": VM, "ft": ft("b") });
    if let (Some(b), Some(more)) = (body.as_object_mut(), overrides.as_object()) {
        b.extend(more.clone());
    }
    let reply = secondary.call(
        "POST",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming",
        Some(&body),
    );
    assert_eq!(reply.status, 201, "{}", reply.text());
    let incoming = reply.json();
    let listen = incoming["listen"].as_str().unwrap_or_default().to_string();
    let port = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a listening address: {incoming}"));
    let reply = primary.call(
        "POST",
        "/v1/vms/{name}/migrate",
        &format!("/v1/vms/{VM}/migrate"),
        Some(&json!({ "destination": listen, "token": incoming["token"], "ft": ft("a") })),
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
    let out_id = reply.json()["id"].as_str().unwrap_or_default().to_string();
    let deadline = Instant::now() + WAIT;
    loop {
        let info = migration(primary, &out_id);
        if info["phase"] == "protecting" && info["ft"]["committed_epoch"].as_u64() >= Some(3) {
            break;
        }
        assert!(
            Instant::now() < deadline && info["phase"] != "failed",
            "migration {out_id}: no protection: {info}\nprimary:\n{}\nsecondary:\n{}",
            primary.log(),
            secondary.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Pairing {
        out_id,
        in_id: incoming["id"].as_str().unwrap_or_default().to_string(),
        port,
    }
}

/// The pairing's own figures (its status on the primary).
#[derive(Debug, Clone, Copy, Default)]
struct PauseFigures {
    pause_p50_ms: f64,
    pause_p99_ms: f64,
    replication_mib_s: f64,
    epoch: u64,
}

fn pause_figures(info: &Value) -> PauseFigures {
    let ft = &info["ft"];
    PauseFigures {
        pause_p50_ms: ft["pause_p50_ms"].as_f64().unwrap_or(f64::NAN),
        pause_p99_ms: ft["pause_p99_ms"].as_f64().unwrap_or(f64::NAN),
        replication_mib_s: ft["replication_mib_s"].as_f64().unwrap_or(f64::NAN),
        epoch: ft["epoch"].as_u64().unwrap_or(0),
    }
}

/// Runs the client in the namespace: requests from `first` on, `window` in flight, for `for_`.
fn load(
    ns: &NetNs,
    first: u64,
    window: usize,
    for_: Duration,
    resend_after: Duration,
) -> std::thread::JoinHandle<ClientReport> {
    let target = SocketAddr::new(ns.guest_ip().parse().expect("an address"), PORT);
    let mut config = ClientConfig::new(target, 100_000_000);
    config.bind = SocketAddr::new(ns.host_ip().parse().expect("an address"), 0);
    config.first = first;
    config.window = window;
    config.resend_after = resend_after;
    config.max_sends = 1000;
    config.deadline = for_;
    config.quiet_limit = Duration::from_secs(10);
    ns.run(move || run_client(&config).expect("the client's socket"))
}

/// The namespace's UDP receive-buffer errors so far (datagrams dropped at a full socket: the
/// client's, when answers come faster than it reads them).
fn udp_rcvbuf_errors(ns: &NetNs) -> u64 {
    let snmp = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default())
        .join()
        .unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Runs a load to its end: the client's report and the datagrams dropped at its socket.
fn measured(
    ns: &NetNs,
    first: u64,
    window: usize,
    for_: Duration,
    resend_after: Duration,
) -> (ClientReport, u64) {
    let before = udp_rcvbuf_errors(ns);
    let report = load(ns, first, window, for_, resend_after)
        .join()
        .expect("the client");
    (report, udp_rcvbuf_errors(ns).saturating_sub(before))
}

/// The first request number after what `report` sent.
fn next_first(first: u64, report: &ClientReport) -> u64 {
    first + report.sent + 1
}

/// Throughput and latency of one load.
#[derive(Debug, Clone, Copy)]
struct Load {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    resent: u64,
    dropped_at_client: u64,
}

fn load_figures((report, dropped): &(ClientReport, u64)) -> Load {
    let ms = |p| {
        report
            .latency_percentile(p)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    Load {
        per_s: report.throughput(),
        p50_ms: ms(50.0),
        p99_ms: ms(99.0),
        resent: report.resent,
        dropped_at_client: *dropped,
    }
}

/// One kill of the primary, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Failover {
    /// The primary's last frame to the secondary (loopback) to the new primary's first frame.
    last_heartbeat_to_first_frame: f64,
    /// The kill to the new primary's first frame.
    kill_to_first_frame: f64,
    /// The kill to the client's first answer after it.
    kill_to_first_answer: f64,
    /// The kill to the killed process's FIN or RST to the secondary (the kernel closes its
    /// sockets when the last of its threads is gone).
    kill_to_connection_end: f64,
    /// The kill to the secondary's "taking over" log line (the primary's end noticed).
    kill_to_taking_over: f64,
    /// The secondary's "taking over" to its "took over" log lines (the arbiter, starting the VM).
    takeover_log: f64,
}

/// A TCP segment to `port` seen on loopback between `from` and `to`: with `end`, the first
/// one with FIN or RST; without, the last one with a payload.
fn tcp_segment_to(
    frames: &[SeenAt],
    port: u16,
    from: Instant,
    to: Instant,
    end: bool,
) -> Option<Instant> {
    let matching = frames
        .iter()
        .filter(|(at, kind, _)| (from..=to).contains(at) && *kind == libc::PACKET_HOST)
        .filter(|(_, _, f)| {
            // Ethernet (14 bytes, IPv4), IPv4 header, TCP: destination port, flags, payload.
            if f.len() < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
                return false;
            }
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
            let tcp = 14 + ihl;
            if f.len() < tcp + 20 || u16::from_be_bytes([f[tcp + 2], f[tcp + 3]]) != port {
                return false;
            }
            let data_offset = usize::from(f[tcp + 12] >> 4) * 4;
            let (fin, rst) = (0x01, 0x04);
            if end {
                f[tcp + 13] & (fin | rst) != 0
            } else {
                total > ihl + data_offset
            }
        })
        .map(|(at, _, _)| *at);
    if end {
        matching.min()
    } else {
        matching.max()
    }
}

/// The first frame from the guest's MAC that came out of a tap's VMM (not the kernel's own).
fn first_from_guest(frames: &[SeenAt], after: Instant) -> Option<Instant> {
    frames
        .iter()
        .filter(|(at, kind, f)| {
            *at >= after && *kind != libc::PACKET_OUTGOING && f.get(6..12) == Some(&MAC[..])
        })
        .map(|(at, _, _)| *at)
        .min()
}

/// Seconds since the Unix epoch of the first JSON log line whose message contains `needle`.
fn log_ts(log: &str, needle: &str) -> Option<f64> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["msg"].as_str().is_some_and(|m| m.contains(needle)))
        .and_then(|v| v["ts"].as_f64())
}

/// Now, in seconds since the Unix epoch (the clock of the hosts' log lines).
fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(f64::NAN, |d| d.as_secs_f64())
}

fn ms_between(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// Everything one journal run measured.
#[derive(Debug, Clone)]
struct JournalRun {
    off: Load,
    on: Load,
    pause: PauseFigures,
    failover: Option<Failover>,
    note: String,
}

fn image(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(DISK_SECTORS * SECTOR as u64))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn journal_run(
    o: &Options,
    ns: &NetNs,
    etcd: &Etcd,
    tap_b: &str,
    epoch_ms: u64,
    run: usize,
) -> JournalRun {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (disk_a, disk_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    image(&disk_a);
    image(&disk_b);
    let primary = TestHost::start_in(vec![journal_vm(o, ns, &disk_a)], json!({}), Some(ns.name()));
    let secondary = TestHost::start_in(vec![], json!({}), Some(ns.name()));
    primary.wait_serial(VM, "LKS net udp-journal listening", WAIT);
    let seconds = Duration::from_secs(o.seconds);
    let patient = Duration::from_secs(1);
    // Warm up (the image's pages, the guest's ARP entry), then FT off.
    let warm = load(ns, 1, o.window, Duration::from_secs(1), patient)
        .join()
        .expect("the client");
    let first = next_first(1, &warm);
    let off = measured(ns, first, o.window, seconds, patient);
    let first = next_first(first, &off.0);
    let p = pair(
        o,
        etcd,
        &primary,
        &secondary,
        epoch_ms,
        &format!("bench-{epoch_ms}-{run}"),
        json!({
            "network_overrides": [{ "iface_id": "eth0", "host_dev_name": tap_b }],
            "drive_overrides": [{ "drive_id": "journal", "path_on_host": disk_b }],
        }),
    );
    let on = measured(ns, first, o.window, seconds, patient);
    let first = next_first(first, &on.0);
    let info = migration(&primary, &p.out_id);
    let pause = pause_figures(&info);
    let mut note = String::new();
    if info["phase"] != "protecting" {
        note = format!("pairing not protecting after the load: {info}");
    }
    // Failover: the primary killed under load, every frame on both taps and loopback captured.
    let stop = Arc::new(AtomicBool::new(false));
    let on_a = ns.capture_timed(ns.tap(), stop.clone());
    let on_b = ns.capture_timed(tap_b, stop.clone());
    let on_lo = ns.capture_timed("lo", stop.clone());
    let started = Instant::now();
    // A light load (8 in flight) resent every 20 ms: the first answer after the takeover comes
    // within 20 ms of the new primary's being able to give it.
    let running = load(
        ns,
        first,
        FAILOVER_WINDOW,
        Duration::from_secs(3),
        Duration::from_millis(20),
    );
    // The kill point, 1 s into the load (not an assertion: the load runs on meanwhile).
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    let killed_wall = unix_seconds();
    // SAFETY: signals our own child, the primary's host process.
    unsafe { libc::kill(primary.pid() as i32, libc::SIGKILL) };
    let took = wait_for(&secondary, &p.in_id, "the takeover", |i| {
        ["completed", "failed", "cancelled"].contains(&i["phase"].as_str().unwrap_or(""))
    });
    let report = running.join().expect("the client");
    stop.store(true, Ordering::Relaxed);
    let (a, b, lo) = (
        on_a.join().expect("capture"),
        on_b.join().expect("capture"),
        on_lo.join().expect("capture"),
    );
    let log = secondary.log();
    let failover = if took["phase"] != "completed" {
        note.push_str(&format!(" no takeover: {took}"));
        None
    } else {
        let first_b = first_from_guest(&b, started);
        let last_hb = tcp_segment_to(&lo, p.port, started, killed, false);
        // Answers the old primary released just before it died can still arrive after the
        // kill: the new primary's come after its first frame.
        let first_answer = report
            .answered
            .values()
            .map(|a| started + a.at)
            .filter(|at| first_b.is_some_and(|b| *at >= b))
            .min();
        let last_a = a
            .iter()
            .filter(|(at, kind, f)| {
                *at <= killed && *kind != libc::PACKET_OUTGOING && f.get(6..12) == Some(&MAC[..])
            })
            .map(|(at, _, _)| *at)
            .max();
        eprintln!(
            "  kill: last frame on tap A {:.1} ms before, last to the secondary {:.1} ms before; \
             client: answered={} resent={}",
            last_a.map_or(f64::NAN, |t| ms_between(t, killed)),
            last_hb.map_or(f64::NAN, |t| ms_between(t, killed)),
            report.answered.len(),
            report.resent,
        );
        let taking = log_ts(&log, "taking over");
        let took_at = log_ts(&log, "took over pair");
        match (first_b, last_hb, first_answer) {
            (Some(first_b), Some(last_hb), Some(answer)) => Some(Failover {
                kill_to_connection_end: tcp_segment_to(&lo, p.port, killed, Instant::now(), true)
                    .map_or(f64::NAN, |t| ms_between(killed, t)),
                last_heartbeat_to_first_frame: ms_between(last_hb, first_b),
                kill_to_first_frame: ms_between(killed, first_b),
                kill_to_first_answer: ms_between(killed, answer),
                kill_to_taking_over: taking.map_or(f64::NAN, |t| (t - killed_wall) * 1000.0),
                takeover_log: match (taking, took_at) {
                    (Some(from), Some(to)) => (to - from) * 1000.0,
                    _ => f64::NAN,
                },
            }),
            missing => {
                note.push_str(&format!(
                    " failover not measured (first frame on B, last to the secondary, first \
                     answer): {missing:?}"
                ));
                None
            }
        }
    };
    JournalRun {
        off: load_figures(&off),
        on: load_figures(&on),
        pause,
        failover,
        note,
    }
}

fn memdirty_run(o: &Options, ns: &NetNs, etcd: &Etcd, epoch_ms: u64, run: usize) -> PauseFigures {
    let primary = TestHost::start_in(vec![memdirty_vm(o)], json!({}), Some(ns.name()));
    let secondary = TestHost::start_in(vec![], json!({}), Some(ns.name()));
    primary.wait_serial(VM, "LKS memdirty start", WAIT);
    let p = pair(
        o,
        etcd,
        &primary,
        &secondary,
        epoch_ms,
        &format!("dirty-{epoch_ms}-{run}"),
        json!({}),
    );
    // The measurement interval: the pairing's own percentiles cover it.
    std::thread::sleep(Duration::from_secs(o.dirty_seconds));
    let info = migration(&primary, &p.out_id);
    assert_eq!(info["phase"], "protecting", "{info}\n{}", primary.log());
    pause_figures(&info)
}

/// The median of the finite values, which are left sorted in `values`.
fn median(values: &mut Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// `median (min-max)` of `values`, with `digits` decimals.
fn spread(values: &[f64], digits: usize) -> String {
    let mut v = values.to_vec();
    let m = median(&mut v);
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => format!("{m:.digits$} ({lo:.digits$}-{hi:.digits$})"),
        _ => "n/a".to_string(),
    }
}

fn main() {
    let o = options();
    // The hosts' logs as JSON lines with timestamps (the takeover's length from the secondary's).
    std::env::set_var("LOCKSTEP_LOG_FORMAT", "json");
    assert!(
        std::env::var_os("LKS_LOCKSTEP_BIN").is_some(),
        "LKS_LOCKSTEP_BIN: the release lockstep to measure (bench/run.sh ft sets it)"
    );
    let ns = NetNs::create();
    let tap_b = ns.bridge_with_second_tap();
    let Some(etcd) = Etcd::start_in("ft_bench", Some(ns.name())) else {
        eprintln!("ft_bench: etcd is not installed (scripts/setup-host.sh installs it)");
        std::process::exit(1)
    };
    let mut journal: BTreeMap<u64, Vec<JournalRun>> = BTreeMap::new();
    let mut dirty: BTreeMap<u64, Vec<PauseFigures>> = BTreeMap::new();
    for run in 0..o.runs {
        for &epoch_ms in &o.epochs {
            let j = journal_run(&o, &ns, &etcd, &tap_b, epoch_ms, run);
            eprintln!("epoch {epoch_ms} ms, run {run}: journal {j:?}");
            journal.entry(epoch_ms).or_default().push(j);
            let d = memdirty_run(&o, &ns, &etcd, epoch_ms, run);
            eprintln!("epoch {epoch_ms} ms, run {run}: memdirty {d:?}");
            dirty.entry(epoch_ms).or_default().push(d);
        }
    }
    print_table(&o, &journal, &dirty);
    write_json(&o, &journal, &dirty);
}

fn print_table(
    o: &Options,
    journal: &BTreeMap<u64, Vec<JournalRun>>,
    dirty: &BTreeMap<u64, Vec<PauseFigures>>,
) {
    println!(
        "\nFT benchmark: test guest, 1 vCPU, {} MiB; journal client window {}, {} s per load; \
         {} run(s); median (min-max)\n",
        o.mem_mib, o.window, o.seconds, o.runs
    );
    print!("| metric |");
    for e in journal.keys() {
        print!(" {e} ms epochs |");
    }
    println!();
    print!("|---|");
    for _ in journal.keys() {
        print!("---|");
    }
    println!();
    type Pick = fn(&JournalRun) -> Option<f64>;
    let rows: Vec<(&str, Pick, usize)> = vec![
        ("journal requests/s, FT off", |r| Some(r.off.per_s), 0),
        ("journal requests/s, FT on", |r| Some(r.on.per_s), 0),
        (
            "throughput FT on / off",
            |r| Some(r.on.per_s / r.off.per_s),
            2,
        ),
        ("journal p99 latency ms, FT off", |r| Some(r.off.p99_ms), 2),
        ("journal p99 latency ms, FT on", |r| Some(r.on.p99_ms), 1),
        ("journal p50 latency ms, FT on", |r| Some(r.on.p50_ms), 1),
        (
            "journal guest: pause p50 ms",
            |r| Some(r.pause.pause_p50_ms),
            2,
        ),
        (
            "journal guest: pause p99 ms",
            |r| Some(r.pause.pause_p99_ms),
            2,
        ),
        (
            "journal guest: replication MiB/s",
            |r| Some(r.pause.replication_mib_s),
            2,
        ),
        (
            "failover: last frame to the secondary to first frame on B, ms",
            |r| r.failover.map(|f| f.last_heartbeat_to_first_frame),
            1,
        ),
        (
            "failover: kill to first frame on B, ms",
            |r| r.failover.map(|f| f.kill_to_first_frame),
            1,
        ),
        (
            "failover: kill to the client's first answer from the new primary, ms",
            |r| r.failover.map(|f| f.kill_to_first_answer),
            1,
        ),
        (
            "failover: kill to the dead primary's FIN/RST to the secondary, ms",
            |r| r.failover.map(|f| f.kill_to_connection_end),
            1,
        ),
        (
            "failover: kill to the secondary's \"taking over\" (its log), ms",
            |r| r.failover.map(|f| f.kill_to_taking_over),
            1,
        ),
        (
            "failover: secondary's log, taking over to took over, ms",
            |r| r.failover.map(|f| f.takeover_log),
            1,
        ),
    ];
    for (label, pick, digits) in rows {
        print!("| {label} |");
        for runs in journal.values() {
            let v: Vec<f64> = runs.iter().filter_map(pick).collect();
            print!(" {} |", spread(&v, digits));
        }
        println!();
    }
    type PickD = fn(&PauseFigures) -> f64;
    let rows: Vec<(&str, PickD, usize)> = vec![
        ("memdirty guest: pause p50 ms", |p| p.pause_p50_ms, 2),
        ("memdirty guest: pause p99 ms", |p| p.pause_p99_ms, 2),
        (
            "memdirty guest: replication MiB/s",
            |p| p.replication_mib_s,
            1,
        ),
    ];
    for (label, pick, digits) in rows {
        print!("| {label} (dirtying {} MiB/s) |", o.dirty_mib_s);
        for runs in dirty.values() {
            let v: Vec<f64> = runs.iter().map(pick).collect();
            print!(" {} |", spread(&v, digits));
        }
        println!();
    }
    for (e, runs) in journal {
        let sum = |f: fn(&Load) -> u64| -> (u64, u64) {
            (
                runs.iter().map(|r| f(&r.off)).sum(),
                runs.iter().map(|r| f(&r.on)).sum(),
            )
        };
        let (resent, dropped) = (sum(|l| l.resent), sum(|l| l.dropped_at_client));
        println!(
            "\n{e} ms epochs, all runs: requests resent (1 s timer) FT off {}, on {}; answers \
             dropped at the client's full socket FT off {}, on {}",
            resent.0, resent.1, dropped.0, dropped.1
        );
    }
    for (e, runs) in journal {
        for (i, r) in runs.iter().enumerate() {
            if !r.note.is_empty() {
                println!("epoch {e} ms, run {i}: {}", r.note.trim());
            }
        }
    }
}

fn write_json(
    o: &Options,
    journal: &BTreeMap<u64, Vec<JournalRun>>,
    dirty: &BTreeMap<u64, Vec<PauseFigures>>,
) {
    let load = |l: &Load| {
        json!({ "per_s": l.per_s, "p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "resent": l.resent,
                              "dropped_at_client": l.dropped_at_client })
    };
    let pause = |p: &PauseFigures| {
        json!({ "pause_p50_ms": p.pause_p50_ms, "pause_p99_ms": p.pause_p99_ms,
                "replication_mib_s": p.replication_mib_s, "epochs": p.epoch })
    };
    let runs: Value = journal
        .iter()
        .map(|(e, runs)| {
            let list: Vec<Value> = runs
                .iter()
                .map(|r| {
                    json!({
                        "ft_off": load(&r.off), "ft_on": load(&r.on), "pairing": pause(&r.pause),
                        "failover_ms": r.failover.map(|f| json!({
                            "last_heartbeat_to_first_frame": f.last_heartbeat_to_first_frame,
                            "kill_to_first_frame": f.kill_to_first_frame,
                            "kill_to_first_answer": f.kill_to_first_answer,
                            "kill_to_connection_end": f.kill_to_connection_end,
                            "kill_to_taking_over": f.kill_to_taking_over,
                            "takeover_log": f.takeover_log,
                        })),
                        "note": r.note,
                    })
                })
                .collect();
            let d: Vec<Value> = dirty.get(e).into_iter().flatten().map(pause).collect();
            (e.to_string(), json!({ "journal": list, "memdirty": d }))
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    let doc = json!({
        "runs": o.runs, "window": o.window, "seconds": o.seconds, "mem_mib": o.mem_mib,
        "dirty_mib_s": o.dirty_mib_s, "dirty_seconds": o.dirty_seconds, "heartbeat_timeout_ms": o.heartbeat_ms, "epochs": runs,
    });
    if let Some(dir) = o.json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&o.json, serde_json::to_vec_pretty(&doc).unwrap_or_default()) {
        Ok(()) => println!("\nJSON: {}", o.json.display()),
        Err(e) => eprintln!("ft_bench: {}: {e}", o.json.display()),
    }
}
