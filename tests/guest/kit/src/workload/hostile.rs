//! `hostile <n> <case>|all|list`: malformed descriptor chains and ring set-ups sent to a device, to
//! check that the VMM survives them. Each case starts from a freshly initialised device, injects
//! the bad request on the device's data queue (blk and rng: queue 0, net and vsock: the transmit
//! queue) with a notification, waits a moment, then checks the status register for DEVICE_NEEDS_RESET
//! and whether a valid request still completes (not for the `ring-*` cases, where the device looks
//! at rings the driver does not use). The device is reset and re-initialised afterwards and
//! checked again (`recovered=`).

use super::{error, usage, Args, Machine};
use crate::phys::store;
use crate::report;
use crate::time::Deadline;
use crate::virtio::blk::{Status, T_IN, T_OUT};
use crate::virtio::mmio::{status, QueueAddresses, Transport};
use crate::virtio::queue::{RawDesc, Virtqueue};
use crate::virtio::vsock::{op, Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use crate::virtio::{Device, Driver, Waiter};

/// The cases, in the order `all` runs them.
const CASES: [&str; 13] = [
    "desc-loop",
    "long-chain",
    "addr-outside-ram",
    "zero-len",
    "huge-len",
    "writable-out",
    "readonly-in",
    "head-out-of-range",
    "next-out-of-range",
    "avail-jump",
    "ring-unaligned",
    "ring-outside-ram",
    "notify-bad-queue",
];

/// Guest-physical address no RAM is at.
const OUTSIDE_RAM: u64 = 0xffff_ffff_0000;
const HUGE_LEN: u32 = 0xffff_f000;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// How long the device gets to react to a bad request, and a valid one to complete.
const SETTLE_MS: u64 = 300;
const PROBE_MS: u64 = 2000;
/// Descriptors `long-chain` leaves free for the check afterwards.
const SPARE_DESCS: u16 = 3;
/// Where the blk template's status byte is, from the scratch page.
const BLK_STATUS_OFFSET: u64 = 64;
/// EtherType of the probe frames (IEEE local experimental).
const ETHERTYPE_PROBE: u16 = 0x88b5;

/// What kind of queue is attacked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blk,
    Rng,
    NetTx,
    VsockTx,
}

/// One buffer of the template request before a case bends it.
#[derive(Clone, Copy)]
struct Buf {
    addr: u64,
    len: u32,
    write: bool,
}

/// `hostile <n> <case>|all|list`
pub(super) fn command(machine: &mut Machine, args: &mut Args) {
    let (Some(n), Some(case)) = (args.number(), args.word()) else {
        return usage("hostile", "<n> <case>|all|list");
    };
    if case == b"list" {
        let mut console = report::ConsoleGuard::lock();
        console.write(format_args!("LKS hostile cases="));
        for (i, name) in CASES.iter().enumerate() {
            console.write(format_args!("{}{name}", if i == 0 { "" } else { "," }));
        }
        return console.write(format_args!("\n"));
    }
    let Some(scratch) = machine.frames.alloc(2 * 4096).map(|b| b.addr()) else {
        return error("hostile", "out-of-memory");
    };
    let Some(device) = machine.devices.get(n as usize) else {
        return error("hostile", "no-such-device");
    };
    if kind_of(device).is_none() {
        return error("hostile", "no-driver-for-device");
    }
    if case == b"all" {
        for name in CASES {
            run_case(device, n, name, scratch);
        }
        return report::line(format_args!("hostile dev={n} done cases={}", CASES.len()));
    }
    match CASES.iter().find(|name| name.as_bytes() == case) {
        Some(name) => run_case(device, n, name, scratch),
        None => error("hostile", "unknown-case"),
    }
}

fn kind_of(device: &Device) -> Option<Kind> {
    match device.driver {
        Driver::Blk(_) => Some(Kind::Blk),
        Driver::Rng(_) => Some(Kind::Rng),
        Driver::Net(_) => Some(Kind::NetTx),
        Driver::Vsock(_) => Some(Kind::VsockTx),
        Driver::None => None,
    }
}

/// The attacked queue.
fn queue_of(device: &mut Device) -> Option<&mut Virtqueue> {
    match &mut device.driver {
        Driver::Blk(blk) => Some(blk.queue_mut()),
        Driver::Rng(rng) => Some(rng.queue_mut()),
        Driver::Net(net) => Some(net.dev.tx_queue_mut()),
        Driver::Vsock(vsock) => Some(vsock.tx_queue_mut()),
        Driver::None => None,
    }
}

/// Fills the scratch pages with a valid request for `kind` and returns its buffers (header page at
/// `scratch`, data page at `scratch + 4096`).
fn template(kind: Kind, scratch: u64, device: &Device, out: bool) -> ([Buf; 3], usize, usize) {
    let data = scratch + 4096;
    let none = Buf {
        addr: 0,
        len: 0,
        write: false,
    };
    match kind {
        Kind::Blk => {
            store(scratch, if out { T_OUT } else { T_IN });
            store(scratch + 4, 0u32);
            store(scratch + 8, 0u64);
            store(scratch + BLK_STATUS_OFFSET, 0xffu8);
            let bufs = [
                Buf {
                    addr: scratch,
                    len: 16,
                    write: false,
                },
                Buf {
                    addr: data,
                    len: 512,
                    write: !out,
                },
                Buf {
                    addr: scratch + BLK_STATUS_OFFSET,
                    len: 1,
                    write: true,
                },
            ];
            (bufs, 3, 1)
        }
        Kind::Rng => (
            [
                Buf {
                    addr: data,
                    len: 64,
                    write: true,
                },
                none,
                none,
            ],
            1,
            0,
        ),
        Kind::NetTx => {
            let mut frame = [0u8; 12 + 60];
            frame[12..18].fill(0xff);
            frame[24..26].copy_from_slice(&ETHERTYPE_PROBE.to_be_bytes());
            crate::phys::write_bytes(data, &frame);
            (
                [
                    Buf {
                        addr: data,
                        len: frame.len() as u32,
                        write: false,
                    },
                    none,
                    none,
                ],
                1,
                0,
            )
        }
        Kind::VsockTx => {
            let cid = match &device.driver {
                Driver::Vsock(vsock) => vsock.guest_cid,
                _ => 0,
            };
            let header = Header {
                src_cid: cid,
                dst_cid: HOST_CID,
                src_port: 1,
                dst_port: 1,
                kind: TYPE_STREAM,
                op: op::RST,
                ..Header::default()
            };
            crate::phys::write_bytes(data, &header.encode());
            (
                [
                    Buf {
                        addr: data,
                        len: HDR_LEN as u32,
                        write: false,
                    },
                    none,
                    none,
                ],
                1,
                0,
            )
        }
    }
}

/// Writes `bufs` as a chain into descriptors taken from the free list; returns their indices.
fn write_chain(queue: &mut Virtqueue, bufs: &[Buf], ids: &mut [u16]) -> Option<()> {
    for id in ids.iter_mut() {
        *id = queue.take_desc()?;
    }
    for (i, buf) in bufs.iter().enumerate() {
        let last = i + 1 == bufs.len();
        let mut flags = if last { 0 } else { DESC_F_NEXT };
        if buf.write {
            flags |= DESC_F_WRITE;
        }
        let next = if last { 0 } else { ids[i + 1] };
        queue.write_desc(
            ids[i],
            RawDesc {
                addr: buf.addr,
                len: buf.len,
                flags,
                next,
            },
        );
    }
    Some(())
}

/// Injects `case`; returns false if it does not apply to this kind of queue.
fn inject(device: &mut Device, kind: Kind, case: &str, scratch: u64) -> bool {
    let out = case == "writable-out";
    if (out && kind == Kind::Rng)
        || (case == "readonly-in" && matches!(kind, Kind::NetTx | Kind::VsockTx))
    {
        return false;
    }
    let (mut bufs, count, data) = template(kind, scratch, device, out);
    let transport = device.transport;
    let features = device.features();
    match case {
        "ring-unaligned" | "ring-outside-ram" => {
            let Some(queue) = queue_of(device) else {
                return false;
            };
            let real = queue.rings();
            let rings = if case == "ring-unaligned" {
                QueueAddresses {
                    desc: real.desc + 8,
                    avail: real.avail + 1,
                    used: real.used + 2,
                }
            } else {
                QueueAddresses {
                    desc: OUTSIDE_RAM,
                    avail: OUTSIDE_RAM + 0x1000,
                    used: OUTSIDE_RAM + 0x2000,
                }
            };
            if transport.begin(features).is_err() {
                return true;
            }
            let (index, size) = (queue.index(), queue.size());
            transport.setup_queue(index, size, rings);
            transport.driver_ok();
            let mut ids = [0u16; 3];
            if write_chain(queue, &bufs[..count], &mut ids[..count]).is_some() {
                queue.push_avail(ids[0]);
            }
            queue.notify(&transport);
            return true;
        }
        "notify-bad-queue" => {
            transport.notify(0xffff);
            transport.notify(200);
            return true;
        }
        _ => {}
    }
    let Some(queue) = queue_of(device) else {
        return false;
    };
    let size = queue.size();
    match case {
        "addr-outside-ram" => bufs[data].addr = OUTSIDE_RAM,
        "zero-len" => bufs[data].len = 0,
        "huge-len" => bufs[data].len = HUGE_LEN,
        "writable-out" => bufs[data].write = true,
        "readonly-in" => bufs[data].write = false,
        _ => {}
    }
    match case {
        "head-out-of-range" => queue.push_avail(size + 5),
        "avail-jump" => queue.skip_avail(size + 100),
        "long-chain" => {
            // Every descriptor but a few spares, the last pointing back to the head.
            let mut ids = [0u16; crate::virtio::queue::MAX_SIZE as usize];
            let len = usize::from(queue.num_free().saturating_sub(SPARE_DESCS)).max(count);
            let mut chain = [bufs[data]; crate::virtio::queue::MAX_SIZE as usize];
            chain[..count].copy_from_slice(&bufs[..count]);
            if write_chain(queue, &chain[..len], &mut ids[..len]).is_none() {
                return true;
            }
            close_loop(queue, &chain[len - 1], ids[len - 1], ids[0]);
            queue.push_avail(ids[0]);
        }
        _ => {
            let mut ids = [0u16; 3];
            if write_chain(queue, &bufs[..count], &mut ids[..count]).is_none() {
                return true;
            }
            match case {
                "desc-loop" => close_loop(queue, &bufs[count - 1], ids[count - 1], ids[0]),
                "next-out-of-range" => {
                    let first = &bufs[0];
                    let flags = DESC_F_NEXT | if first.write { DESC_F_WRITE } else { 0 };
                    queue.write_desc(
                        ids[0],
                        RawDesc {
                            addr: first.addr,
                            len: first.len,
                            flags,
                            next: size + 5,
                        },
                    );
                }
                _ => {}
            }
            queue.push_avail(ids[0]);
        }
    }
    queue.notify(&transport);
    true
}

/// Rewrites descriptor `id` (holding `buf`) to continue at `head`.
fn close_loop(queue: &mut Virtqueue, buf: &Buf, id: u16, head: u16) {
    let flags = DESC_F_NEXT | if buf.write { DESC_F_WRITE } else { 0 };
    queue.write_desc(
        id,
        RawDesc {
            addr: buf.addr,
            len: buf.len,
            flags,
            next: head,
        },
    );
}

/// Sends one valid request and waits for it: "ok", an error status name, or "timeout".
fn check(device: &mut Device, scratch: u64) -> &'static str {
    let data = scratch + 4096;
    match &mut device.driver {
        Driver::Blk(blk) => blk.request(T_IN, 0, data, 512, PROBE_MS).name(),
        Driver::Rng(rng) => match rng.fill(data, 16, PROBE_MS) {
            Some(_) => "ok",
            None => "timeout",
        },
        Driver::Net(net) => {
            let waiter = Waiter::new(PROBE_MS);
            let Some(mut slot) = net.dev.tx_slot(&waiter) else {
                return "timeout";
            };
            let frame = slot.frame_mut();
            frame[..6].fill(0xff);
            frame[6..12].copy_from_slice(&net.dev.mac);
            frame[12..14].copy_from_slice(&ETHERTYPE_PROBE.to_be_bytes());
            frame[14..60].fill(0);
            net.dev.transmit(slot, 60, None, true);
            if net.dev.drain_tx(&waiter) {
                "ok"
            } else {
                "timeout"
            }
        }
        Driver::Vsock(vsock) => {
            let header = Header {
                src_cid: vsock.guest_cid,
                dst_cid: HOST_CID,
                src_port: 1,
                dst_port: 1,
                kind: TYPE_STREAM,
                op: op::RST,
                ..Header::default()
            };
            let waiter = Waiter::new(PROBE_MS);
            if vsock.send(&header, &[], &waiter) && vsock.drain_tx(&waiter) {
                "ok"
            } else {
                "timeout"
            }
        }
        Driver::None => "no-driver",
    }
}

fn needs_reset(transport: &Transport) -> bool {
    transport.status() & status::DEVICE_NEEDS_RESET != 0
}

fn run_case(device: &mut Device, n: u64, case: &str, scratch: u64) {
    let Some(kind) = kind_of(device) else {
        return;
    };
    report::line(format_args!("hostile dev={n} case={case} start"));
    if let Err(e) = device.reinit() {
        return report::line(format_args!(
            "hostile dev={n} case={case} result=init-failed error={}",
            e.name()
        ));
    }
    if !inject(device, kind, case, scratch) {
        return report::line(format_args!(
            "hostile dev={n} case={case} result=skipped reason=not-applicable"
        ));
    }
    // Give the device time to look at the request; collect anything it returns.
    let settle = Deadline::after_ms(SETTLE_MS);
    while !settle.passed() {
        core::hint::spin_loop();
    }
    let transport = device.transport;
    let status_after = transport.status();
    let (mut result, probe) = if needs_reset(&transport) {
        ("needs-reset", "skipped")
    } else if case.starts_with("ring-") {
        // The device looks at other rings than the driver's: a request cannot be checked.
        ("unflagged", "skipped")
    } else {
        let probe = check(device, scratch);
        let result = match probe {
            "ok" => "survived",
            "timeout" => "no-answer",
            _ => "probe-error",
        };
        (result, probe)
    };
    if result != "needs-reset" && needs_reset(&transport) {
        result = "needs-reset";
    }
    let bad_used = queue_of(device).map_or(0, |q| {
        while q.pop().is_some() {}
        q.bogus_used
    });
    // What a block device said about the bad request (the status byte of its template).
    let bad_status = Status::from_byte(crate::phys::load(scratch + BLK_STATUS_OFFSET));
    let recovered = device.reinit().is_ok() && check(device, scratch) == "ok";
    let mut console = report::ConsoleGuard::lock();
    console.write(format_args!(
        "LKS hostile dev={n} case={case} result={result} probe={probe} status={status_after:#x} bad_used={bad_used} recovered={}",
        if recovered { "yes" } else { "no" }
    ));
    if kind == Kind::Blk {
        console.write(format_args!(" bad_status={}", bad_status.name()));
    }
    console.write(format_args!("\n"));
}
