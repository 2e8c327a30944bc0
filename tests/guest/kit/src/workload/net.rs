//! Network commands (`net ...`) and benchmarks (`bench net-tx`, `bench net-rx`). `net udp-stream`
//! sends paced, numbered datagrams for as long as a pause test needs.

use super::blk::bench_done;
use super::pattern::{check_udp, fill_udp, is_udp_test, Fnv, UDP_HEADER};
use super::{error, key_pressed, usage, Args, Machine};
use crate::cpu::rdtsc;
use crate::net::wire::{parse_ip_text, Ip, ShowIp, ShowMac, UDP_PAYLOAD_MAX};
use crate::net::Interface;
use crate::time::{cycles_to_us, us_to_cycles, Deadline};
use crate::virtio::{Completion, Waiter};
use crate::{keyboard, report};

/// Source port of the datagrams the guest sends.
pub const SOURCE_PORT: u16 = 40000;
/// How long one ping waits for its reply.
const PING_WAIT_MS: u64 = 1000;
/// Payload bytes of a ping.
const PING_PAYLOAD: usize = 56;
/// Frames queued between notifications in `bench net-tx`.
const TX_BATCH: u64 = 32;
/// `bench net-rx` and `net udp-echo` give up after this long without a datagram.
const IDLE_LIMIT_MS: u64 = 30_000;
/// The payload that ends `net udp-echo`, `bench net-rx` and `net udp-stream`.
const STOP: &[u8] = b"stop";
/// Default time between two datagrams of `net udp-stream` (microseconds).
const STREAM_INTERVAL_US: u64 = 1000;
/// Shorter waits between datagrams spin instead of sleeping (microseconds).
const SPIN_BELOW_US: u64 = 100;
/// `net udp-stream` gives up after this many sends in a row found no transmit slot (1 s each).
const STREAM_TX_FAILURES: u32 = 10;

fn interface<'m>(machine: &'m mut Machine, name: &str) -> Option<&'m mut Interface> {
    let net = machine.devices.net();
    match net {
        Some(net) if net.config.is_some() => Some(net),
        Some(_) => {
            error(name, "no-address");
            None
        }
        None => {
            error(name, "no-net-device");
            None
        }
    }
}

/// `net info|ping|udp-echo|udp-send|udp-stream|udp-journal|serve ...`
pub(super) fn command(machine: &mut Machine, args: &mut Args) {
    match args.word() {
        Some(b"info") => info(machine),
        Some(b"ping") => {
            let (Some(ip), count) = (args.word().and_then(parse_ip_text), args.number()) else {
                return usage("net ping", "<ip> [count]");
            };
            if let Some(net) = interface(machine, "net ping") {
                ping(net, ip, count.unwrap_or(3));
            }
        }
        Some(b"udp-echo") => {
            let (Some(port), count) = (args.number(), args.number()) else {
                return usage("net udp-echo", "<port> [count]");
            };
            if let Some(net) = interface(machine, "net udp-echo") {
                udp_echo(net, port as u16, count);
            }
        }
        Some(b"udp-send") => {
            let (Some(ip), Some(port), Some(count), Some(size)) = (
                args.word().and_then(parse_ip_text),
                args.number(),
                args.number(),
                args.number(),
            ) else {
                return usage("net udp-send", "<ip> <port> <count> <size>");
            };
            if let Some(net) = interface(machine, "net udp-send") {
                send_datagrams(net, "net udp-send", (ip, port as u16), count, size as usize, 1);
            }
        }
        Some(b"udp-stream") => {
            let (Some(ip), Some(port), Some(size)) = (
                args.word().and_then(parse_ip_text),
                args.number(),
                args.number(),
            ) else {
                return usage(
                    "net udp-stream",
                    "<ip> <port> <size> [count, 0 = until stopped] [interval_us]",
                );
            };
            let count = args.number().filter(|count| *count != 0);
            let interval_us = args.number().unwrap_or(STREAM_INTERVAL_US);
            if let Some(net) = interface(machine, "net udp-stream") {
                udp_stream(net, (ip, port as u16), size as usize, count, interval_us);
            }
        }
        Some(b"udp-journal") => {
            let (Some(port), count) = (args.number(), args.number()) else {
                return usage("net udp-journal", "<port> [count]");
            };
            super::journal::command(machine, port as u16, count);
        }
        Some(b"serve") => {
            let Some(seconds) = args.number() else {
                return usage("net serve", "<seconds>");
            };
            if let Some(net) = interface(machine, "net serve") {
                serve(net, seconds);
            }
        }
        _ => usage("net", "info|ping <ip> [count]|udp-echo <port> [count]|udp-send <ip> <port> <count> <size>|udp-stream <ip> <port> <size> [count] [interval_us]|udp-journal <port> [count]|serve <seconds>"),
    }
}

fn info(machine: &mut Machine) {
    let Some(net) = machine.devices.net() else {
        return error("net info", "no-net-device");
    };
    let stats = net.stats;
    let mut console = report::ConsoleGuard::lock();
    console.write(format_args!("LKS net info mac={}", ShowMac(net.dev.mac)));
    match net.config {
        Some(config) => {
            console.write(format_args!(
                " ip={}/{}",
                ShowIp(config.addr),
                config.prefix
            ));
            if let Some(gateway) = config.gateway {
                console.write(format_args!(" gw={}", ShowIp(gateway)));
            }
        }
        None => console.write(format_args!(" ip=none")),
    }
    console.write(format_args!(
        " csum_offload={} rx={} tx={} arp_answered={} echo_answered={} dropped={} bad_checksum={} mode={}\n",
        u8::from(net.dev.tx_checksum_offload()),
        stats.rx_frames,
        stats.tx_frames,
        stats.arp_answered,
        stats.echo_answered,
        stats.dropped,
        stats.bad_checksum,
        net.dev.completion().name(),
    ));
}

fn ping(net: &mut Interface, ip: Ip, count: u64) {
    let Some(mac) = net.resolve(ip) else {
        return report::line(format_args!(
            "net ping ip={} sent=0 received=0 error=arp-timeout",
            ShowIp(ip)
        ));
    };
    let (mut received, mut min, mut max, mut total) = (0u64, u64::MAX, 0u64, 0u64);
    for seq in 0..count {
        let seq = seq as u16;
        let sent_at = rdtsc();
        if !net.send_ping(ip, mac, seq, PING_PAYLOAD) {
            continue;
        }
        let waiter = Waiter::new(PING_WAIT_MS);
        loop {
            if let Some(datagram) = net.poll(None) {
                net.release(datagram);
            }
            if let Some(at) = net.echo_reply(seq) {
                let us = cycles_to_us(at - sent_at);
                received += 1;
                min = min.min(us);
                max = max.max(us);
                total += us;
                break;
            }
            if !net.wait(&waiter) {
                break;
            }
        }
    }
    let avg = total.checked_div(received).unwrap_or(0);
    report::line(format_args!(
        "net ping ip={} sent={count} received={received} rtt_us_min={} rtt_us_avg={avg} rtt_us_max={max}",
        ShowIp(ip),
        if received > 0 { min } else { 0 },
    ));
}

/// How a receive loop ended.
fn stop_reason(stopped: Option<&'static str>) -> &'static str {
    stopped.unwrap_or("count")
}

fn udp_echo(net: &mut Interface, port: u16, count: Option<u64>) {
    report::line(format_args!("net udp-echo listening port={port}"));
    let (mut received, mut ok, mut bad, mut unchecked, mut bytes) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut stopped = None;
    let mut idle = Deadline::after_ms(IDLE_LIMIT_MS);
    while count.is_none_or(|count| received < count) {
        let Some(datagram) = net.poll(Some(port)) else {
            if key_pressed() {
                stopped = Some("key");
                break;
            }
            if idle.passed() {
                stopped = Some("idle");
                break;
            }
            net.wait(&Waiter::new(100));
            continue;
        };
        idle = Deadline::after_ms(IDLE_LIMIT_MS);
        let payload = datagram.payload();
        if payload == STOP {
            net.release(datagram);
            stopped = Some("stop");
            break;
        }
        received += 1;
        bytes += payload.len() as u64;
        match (is_udp_test(payload), check_udp(payload)) {
            (true, Some(_)) => ok += 1,
            (true, None) => bad += 1,
            (false, _) => unchecked += 1,
        }
        let to = (datagram.src_ip, datagram.src_mac, datagram.src_port);
        net.send_udp(to, port, payload.len(), true, |out| {
            out.copy_from_slice(payload)
        });
        net.release(datagram);
    }
    report::line(format_args!(
        "net udp-echo port={port} received={received} bytes={bytes} ok={ok} bad={bad} unchecked={unchecked} stopped_by={}",
        stop_reason(stopped)
    ));
}

/// Sends `count` test datagrams of `size` payload bytes, notifying the device every `batch`.
/// Returns the TSC cycles taken.
fn send_datagrams(
    net: &mut Interface,
    name: &str,
    to: (Ip, u16),
    count: u64,
    size: usize,
    batch: u64,
) -> Option<u64> {
    if !(UDP_HEADER..=UDP_PAYLOAD_MAX).contains(&size) {
        error(name, "size-out-of-range min=16 max=1472");
        return None;
    }
    let Some(mac) = net.resolve(to.0) else {
        error(name, "arp-timeout");
        return None;
    };
    let mut fnv = Fnv::new();
    let mut sent = 0;
    let start = rdtsc();
    for seq in 0..count {
        let kick = (seq + 1) % batch == 0 || seq + 1 == count;
        let ok = net.send_udp((to.0, mac, to.1), SOURCE_PORT, size, kick, |payload| {
            fill_udp(payload, seq as u32);
            if batch == 1 {
                fnv.update(payload);
            }
        });
        if !ok {
            break;
        }
        sent += 1;
    }
    net.dev.drain_tx(&Waiter::new(PING_WAIT_MS));
    let cycles = rdtsc() - start;
    if batch == 1 {
        report::line(format_args!(
            "{name} ip={} port={} count={count} size={size} sent={sent} fnv1a64={:016x}",
            ShowIp(to.0),
            to.1,
            fnv.value()
        ));
    }
    (sent == count).then_some(cycles)
}

/// `net udp-stream`: test payloads with sequence numbers 0.. from [`SOURCE_PORT`], one every
/// `interval_us` (a datagram that finds no transmit slot is retried with the same number), until
/// `count`, a `stop` datagram to [`SOURCE_PORT`], or a key. Every datagram is notified at once, so
/// the host sees the stream as it goes.
fn udp_stream(
    net: &mut Interface,
    to: (Ip, u16),
    size: usize,
    count: Option<u64>,
    interval_us: u64,
) {
    const NAME: &str = "net udp-stream";
    if !(UDP_HEADER..=UDP_PAYLOAD_MAX).contains(&size) {
        return error(NAME, "size-out-of-range min=16 max=1472");
    }
    let Some(mac) = net.resolve(to.0) else {
        return error(NAME, "arp-timeout");
    };
    report::line(format_args!(
        "{NAME} start ip={} port={} size={size} count={} interval_us={interval_us}",
        ShowIp(to.0),
        to.1,
        count.unwrap_or(0)
    ));
    let interval = us_to_cycles(interval_us);
    let (mut fnv, mut seq, mut failures) = (Fnv::new(), 0u64, 0u32);
    let mut next = rdtsc();
    let stopped_by = loop {
        if count.is_some_and(|count| seq >= count) {
            break "count";
        }
        if let Some(datagram) = net.poll(Some(SOURCE_PORT)) {
            let stop = datagram.payload() == STOP;
            net.release(datagram);
            if stop {
                break "stop";
            }
        }
        if key_pressed() {
            break "key";
        }
        let now = rdtsc();
        if now < next {
            let us = cycles_to_us(next - now);
            if us >= SPIN_BELOW_US {
                keyboard::nap_us(us);
            }
            continue;
        }
        let sent = net.send_udp((to.0, mac, to.1), SOURCE_PORT, size, true, |payload| {
            fill_udp(payload, seq as u32);
            fnv.update(payload);
        });
        if !sent {
            failures += 1;
            if failures == STREAM_TX_FAILURES {
                break "tx-timeout";
            }
            continue;
        }
        failures = 0;
        seq += 1;
        next = super::clock::next_tick(next, interval, now);
    };
    net.dev.drain_tx(&Waiter::new(PING_WAIT_MS));
    report::line(format_args!(
        "{NAME} ip={} port={} size={size} sent={seq} fnv1a64={:016x} stopped_by={stopped_by}",
        ShowIp(to.0),
        to.1,
        fnv.value()
    ));
}

fn serve(net: &mut Interface, seconds: u64) {
    let before = net.stats;
    let deadline = Deadline::after_ms(seconds * 1000);
    while !deadline.passed() {
        if let Some(datagram) = net.poll(None) {
            net.release(datagram);
        }
        net.wait(&Waiter::new(100));
    }
    report::line(format_args!(
        "net serve seconds={seconds} arp_answered={} echo_answered={}",
        net.stats.arp_answered - before.arp_answered,
        net.stats.echo_answered - before.echo_answered
    ));
}

/// `bench net-tx <ip> <port> <frames> <size>`: test datagrams as fast as the queue takes them.
pub(super) fn bench_tx(machine: &mut Machine, args: &mut Args) {
    let (Some(ip), Some(port), Some(frames), Some(size)) = (
        args.word().and_then(parse_ip_text),
        args.number(),
        args.number(),
        args.number(),
    ) else {
        return usage("bench", "net-tx <ip> <port> <frames> <size>");
    };
    let Some(net) = interface(machine, "bench") else {
        return;
    };
    if net.resolve(ip).is_none() {
        return error("bench", "arp-timeout");
    }
    report::line(format_args!(
        "bench start net-tx ip={} port={port} frames={frames} size={size}",
        ShowIp(ip)
    ));
    match send_datagrams(
        net,
        "bench",
        (ip, port as u16),
        frames,
        size as usize,
        TX_BATCH,
    ) {
        Some(cycles) => bench_done("net-tx", frames * size, frames, cycles, "ok"),
        None => bench_done("net-tx", 0, 0, 0, "send-failed"),
    }
}

/// `bench net-rx <port> <frames>`: counts datagrams to `port` until `frames` or a "stop" datagram.
pub(super) fn bench_rx(machine: &mut Machine, args: &mut Args) {
    let (Some(port), Some(frames)) = (args.number(), args.number()) else {
        return usage("bench", "net-rx <port> <frames>");
    };
    let Some(net) = interface(machine, "bench") else {
        return;
    };
    let port = port as u16;
    let completion = net.dev.completion();
    net.dev.set_completion(Completion::Poll);
    report::line(format_args!(
        "bench start net-rx port={port} frames={frames}"
    ));
    let (mut count, mut bytes, mut bad) = (0u64, 0u64, 0u64);
    let mut start = None;
    let mut stopped = None;
    let mut idle = Deadline::after_ms(IDLE_LIMIT_MS);
    while count < frames {
        let Some(datagram) = net.poll(Some(port)) else {
            if idle.passed() {
                stopped = Some("idle");
                break;
            }
            if key_pressed() {
                stopped = Some("key");
                break;
            }
            continue;
        };
        idle = Deadline::after_ms(IDLE_LIMIT_MS);
        let payload = datagram.payload();
        if payload == STOP {
            net.release(datagram);
            stopped = Some("stop");
            break;
        }
        start.get_or_insert_with(rdtsc);
        count += 1;
        bytes += payload.len() as u64;
        if is_udp_test(payload) && check_udp(payload).is_none() {
            bad += 1;
        }
        net.release(datagram);
    }
    let cycles = start.map_or(0, |start| rdtsc() - start);
    net.dev.set_completion(completion);
    report::line(format_args!(
        "bench done bytes={bytes} ops={count} name=net-rx us={} status=ok bad={bad} stopped_by={}",
        cycles_to_us(cycles),
        stop_reason(stopped)
    ));
}
